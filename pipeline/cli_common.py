"""What every ``reidstream`` command shares: the consoles and the one-line error reporting."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.config import ConfigError
from pipeline.redact import redact

EXIT_CONFIG = 2  # the config is invalid
EXIT_UNDELIVERED = 3  # a camera's tracklets were not all acknowledged by the broker
EXIT_SOURCE_INCOMPLETE = 4  # a video file ended before the frame count its container declares

out = Console()
err = Console(stderr=True)
log = logging.getLogger("reidstream")


def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, Callable[[dict], str]]]) -> None:
    """Print ``rows`` on stdout as a rich table, one column per ``(header, cell of a row)`` pair."""
    from rich.table import Table

    table = Table(title=title)
    for name, _ in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(*[fn(row) for _, fn in columns])
    out.print(table)

# (module, exception) pairs that mean "the user must fix something"; looked up only when the module
# is already imported, so this file imports no stage.
_STAGE_ERRORS = (
    ("pipeline.bus", "BusError"), ("pipeline.services", "ServiceError"), ("pipeline.store", "StoreError"),
    ("pipeline.demo", "DemoError"), ("pipeline.runner", "TransientError"), ("stages.ingest", "SourceError"), ("stages.reid.checkpoint", "CheckpointError"),
    ("stages.reid.engines", "EngineError"), ("stages.reid.backbones", "WeightsUnavailableError"),
    ("stages.reid.backbones", "WeightsMismatchError"), ("stages.matcher.calibration", "CalibrationError"),
    ("stages.reid.faces", "FaceModelUnavailableError"), ("pipeline.bus", "DeliveryError"),
    ("stages.matcher.index", "DeviceUnavailable"),
)


def expected_errors(extra: tuple[type[BaseException], ...] = ()) -> tuple[type[BaseException], ...]:
    """Exception types reported as one ``error:`` line instead of a traceback."""
    types: list[type[BaseException]] = [FileNotFoundError, PermissionError, *extra]
    for mod, name in _STAGE_ERRORS:
        module = sys.modules.get(mod)
        if module is not None and hasattr(module, name):
            types.append(getattr(module, name))
    return tuple(types)


def run_reporting(fn: Callable[[], Any], extra: tuple[type[BaseException], ...] = ()) -> Any:
    """Call ``fn``; report expected failures as ``error: …`` and exit (2: config error, 1: other).

    A config error lists each problem on its own line (file:line: key: message); any other expected
    error is folded into a single line. Unexpected exceptions propagate with their traceback.

    Raises:
        typer.Exit: On an expected failure.
    """
    try:
        return fn()
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {escape(redact(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except Exception as exc:
        if isinstance(exc, expected_errors(extra)):
            log.debug("command failed", exc_info=True)
            message = redact(" ".join(str(exc).split()))
            err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        raise
