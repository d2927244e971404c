"""``reidstream`` command line: a thin layer over the Python API, one subcommand per job.

Every command reads a YAML config (``--config``, default ``configs/demo.yaml``; ``REIDSTREAM__*``
environment variables override keys). Expected failures (bad config, missing video, broker or Redis
down, bad checkpoint) print one ``error:`` line and exit non-zero: 2 for a config error, 1 otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli_common import EXIT_SOURCE_INCOMPLETE, EXIT_UNDELIVERED, err, out, print_table, run_reporting
from pipeline.config import Config, load_config
from pipeline.redact import redact, register_config_secrets

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Streaming cross-camera person re-identification.")
query_app = typer.Typer(no_args_is_help=True, help="Query global identities and cross-camera links in Redis.")
app.add_typer(query_app, name="query")

log = logging.getLogger("reidstream")

DEFAULT_CONFIG = Path("configs/demo.yaml")
ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="YAML config file.")


class Format(str, Enum):
    table = "table"
    json = "json"


def _run(fn: Callable[[], Any]) -> Any:
    """Call ``fn``; expected failures become one ``error:`` line and an exit code."""
    return run_reporting(fn)


def _config(path: Path) -> Config:
    cfg = _run(lambda: load_config(path))
    register_config_secrets(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# local services
@app.command()
def up(config: Path = ConfigOpt) -> None:
    """Start a local Tansu broker and Redis (loopback, data under services.data_dir)."""
    from pipeline import services

    cfg = _config(config)
    s = cfg.services
    password = cfg.store.password.get_secret_value() if cfg.store.password else None
    state = _run(lambda: services.up(s.data_dir, s.kafka_port, s.redis_port, s.kafka_storage, redis_password=password,
                                     redis_username=cfg.store.username, s3_port=s.s3_port,
                                     s3_endpoint=s.s3_endpoint))
    for name, info in state.items():
        out.print(f"{name:6s} {info.address}  (pid {info.pid}, log {info.log_path})")


@app.command()
def down(config: Path = ConfigOpt) -> None:
    """Stop the local services started by `up`."""
    from pipeline import services

    cfg = _config(config)
    stopped = services.down(cfg.services.data_dir)
    out.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status(config: Path = ConfigOpt) -> None:
    """Probe the configured Kafka broker and Redis; exit 1 if either is down."""
    from pipeline import services

    cfg = _config(config)
    st = services.status(cfg.bus.bootstrap_servers, cfg.store.url, cfg.bus.client_options(),
                         services.redis_options(cfg.store))
    out.print(redact(f"kafka  {cfg.bus.bootstrap_servers}: {'ready' if st['kafka'] else 'DOWN'}"), highlight=False)
    out.print(redact(f"redis  {cfg.store.url}: {'ready' if st['redis'] else 'DOWN'}"), highlight=False)
    if not all(st.values()):
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------------
# pipeline processes
@app.command()
def camera(camera_name: str = typer.Option(..., "--camera", help="Camera name from the config."),
           config: Path = ConfigOpt,
           summary: Path | None = typer.Option(None, help="Write a JSON run summary here when done.")) -> None:
    """Run one camera worker: read, detect, track, cut tracklets, publish to Kafka."""
    from pipeline.runner import setup_process

    cfg = _config(config)
    _run(lambda: cfg.camera(camera_name))
    stop = setup_process("camera", camera_name)
    _set_threads()
    from stages.camera import run_camera

    result = _run(lambda: run_camera(cfg, camera_name, stop))
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result.to_json()))
    if result.unacknowledged:
        err.print(f"[red]error:[/red] camera {camera_name}: {len(result.unacknowledged)} of "
                  f"{len(result.tracklet_ids)} tracklet(s) were not acknowledged by the broker", highlight=False)
        raise typer.Exit(EXIT_UNDELIVERED)
    if result.source_incomplete:
        err.print(f"[yellow]warning:[/yellow] camera {camera_name}: the source ended after {result.frames} "
                  f"frame(s) of the {result.frames_declared} its container declares (truncated or corrupt)",
                  highlight=False)
        raise typer.Exit(EXIT_SOURCE_INCOMPLETE)


def _touch(path: Path | None) -> Callable[[], None] | None:
    """A readiness callback that creates ``path`` (None: no callback)."""
    if path is None:
        return None
    return lambda: path.touch()


@app.command()
def reid(config: Path = ConfigOpt,
         idle_exit: float | None = typer.Option(None, help="Exit after this many idle seconds."),
         ready_file: Path | None = typer.Option(None, help="Touch this file once the stage consumes its topic.")) -> None:
    """Run the re-id stage: embed tracklets from every camera in batches."""
    from pipeline.runner import setup_process

    cfg = _config(config)
    stop = setup_process("reid")
    _set_threads()
    from stages.reid.stage import run_reid

    stats = _run(lambda: run_reid(cfg, stop, idle_exit, _touch(ready_file)))
    log.info("reid: %s", stats)


@app.command()
def matcher(config: Path = ConfigOpt,
            idle_exit: float | None = typer.Option(None, help="Exit after this many idle seconds."),
            ready_file: Path | None = typer.Option(None, help="Touch this file once the stage consumes its topic.")) -> None:
    """Run the cross-camera matcher: assign global identities, keep them in Redis."""
    from pipeline.runner import setup_process

    cfg = _config(config)
    stop = setup_process("matcher")
    from stages.matcher import run_matcher

    stats = _run(lambda: run_matcher(cfg, stop, idle_exit, _touch(ready_file)))
    log.info("matcher: %s", stats)


@app.command()
def api(config: Path = ConfigOpt, host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8080)) -> None:
    """Serve the operator API over HTTP (JSON, OpenAPI at /docs): identities, timelines, sightings,
    search by example, operator merge and split."""
    import uvicorn

    from pipeline import metrics
    from pipeline.runner import setup_process
    from pipeline.store import IdentityStore
    from stages.query import create_app

    cfg = _config(config)
    setup_process("api")
    store = IdentityStore.from_config(cfg.store)
    _run(store.check)
    metrics.serve(cfg.metrics.api_port, cfg.metrics.host)
    token = cfg.api.token.get_secret_value() if cfg.api.token else None
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("api: serving on %s without a bearer token (set api.token)", host)
    uvicorn.run(create_app(store, token, reid=cfg.reid), host=host, port=port, log_level="warning")


def _set_threads() -> None:
    """Apply ``REIDSTREAM_TORCH_THREADS`` (set by the demo for its child processes)."""
    threads = os.environ.get("REIDSTREAM_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


# --------------------------------------------------------------------------------------------------
# queries
def _store(config: Path):
    from pipeline.store import IdentityStore

    cfg = _config(config)
    store = IdentityStore.from_config(cfg.store)
    _run(store.check)
    return store


def _emit(rows: list[dict[str, Any]], fmt: Format, columns: list[tuple[str, Callable[[dict], str]]], title: str) -> None:
    if fmt is Format.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    print_table(title, rows, columns)


@query_app.command("identities")
def query_identities(config: Path = ConfigOpt, fmt: Format = typer.Option(Format.table, "--format"),
                     min_cameras: int = typer.Option(1, min=1, help="Only identities seen on this many cameras."),
                     camera_name: str | None = typer.Option(None, "--camera",
                                                            help="Only identities seen on this camera."),
                     since: str | None = typer.Option(None, help="Only identities last seen at or after this "
                                                      "(stream seconds, or ISO 8601 for Unix-time streams)."),
                     until: str | None = typer.Option(None, help="Only identities first seen at or before this."),
                     page: int = typer.Option(1, "--page", min=1, help="Page number, from 1."),
                     limit: int = typer.Option(100, "--limit", min=1, help="Identities per page."),
                     newest_first: bool = typer.Option(False, help="Newest first sighting first.")) -> None:
    """Global identities with their cameras and time spans, a page at a time (as GET /identities).

    ``--format json`` prints the page's identities as a list; the paging line goes to stderr.
    """
    from pipeline.cli_operator import page_line
    from stages import query

    store = _store(config)
    lo, hi = (None if t is None else parse_time(t) for t in (since, until))
    result = _run_query(lambda: query.identities(store, min_cameras, offset=(page - 1) * limit, limit=limit,
                                                 camera=camera_name, since_s=lo, until_s=hi,
                                                 newest_first=newest_first))
    _emit(result["items"], fmt, [("global id", lambda r: r["global_id"]),
                                 ("cameras", lambda r: ", ".join(r["cameras"])),
                                 ("tracklets", lambda r: str(r["n_tracklets"])),
                                 ("first seen s", lambda r: f"{r['first_seen_s']:.1f}"),
                                 ("last seen s", lambda r: f"{r['last_seen_s']:.1f}")], "global identities")
    page_line(result, page, limit, "identities", fmt is Format.json)


@query_app.command("links")
def query_links(config: Path = ConfigOpt, fmt: Format = typer.Option(Format.table, "--format"),
                cross_camera: bool = typer.Option(False, help="Only identities spanning two or more cameras."),
                camera_name: str | None = typer.Option(None, "--camera", help="Only this camera's tracklets."),
                page: int = typer.Option(1, "--page", min=1, help="Page number, from 1 (with --limit)."),
                limit: int | None = typer.Option(None, "--limit", min=1,
                                                 help="Links per page (default: all).")) -> None:
    """Tracklet → global identity links with similarity scores (as GET /links)."""
    from pipeline.cli_operator import page_line
    from stages import query

    store = _store(config)
    result = _run_query(lambda: query.links(store, cross_camera, camera_name,
                                            offset=(page - 1) * (limit or 0), limit=limit))
    _emit(result["items"], fmt, [("tracklet", lambda r: r["tracklet_id"]), ("camera", lambda r: r["camera"]),
                                 ("global id", lambda r: r["global_id"]),
                                 ("score", lambda r: "founded" if r["score"] is None else f"{r['score']:.3f}"),
                                 ("start s", lambda r: f"{r['start_s']:.1f}"),
                                 ("end s", lambda r: f"{r['end_s']:.1f}")], "links")
    if limit is not None:
        page_line(result, page, limit, "links", fmt is Format.json)


def _run_query(fn: Callable[[], Any]) -> Any:
    """``_run`` that also reports bad input (ValueError) and unknown ids (LookupError) as one line."""
    return run_reporting(fn, (ValueError, LookupError))


def _emit_one(row: dict[str, Any] | None, fmt: Format, what: str, missing: str) -> None:
    """Print one record as a two-column table or JSON; exit 1 with ``error: <what> <missing>`` when None."""
    if row is None:
        kind, _, name = what.partition(" ")
        err.print(f"[red]error:[/red] {kind} {escape(repr(name))} {missing}")
        raise typer.Exit(1)
    if fmt is Format.json:
        sys.stdout.write(json.dumps(row, indent=2) + "\n")
        return
    table = Table(title=what, show_header=False)
    for key, value in row.items():
        table.add_row(key, json.dumps(value) if isinstance(value, list | dict) else str(value))
    out.print(table)


@query_app.command("identity")
def query_identity(global_id: str, config: Path = ConfigOpt,
                   fmt: Format = typer.Option(Format.table, "--format")) -> None:
    """One identity (an id merged away shows the identity it was merged into); exit 1 when unknown."""
    from stages import query

    _emit_one(query.identity(_store(config), global_id), fmt, f"identity {global_id}", "is unknown")


@query_app.command("audit")
def query_audit(config: Path = ConfigOpt, fmt: Format = typer.Option(Format.table, "--format"),
                limit: int | None = typer.Option(None, "--limit", min=1, help="The newest N records only.")) -> None:
    """Merges and splits made by the matcher's re-association, oldest first."""
    from stages import query

    rows = query.audit(_store(config), limit)
    _emit(rows, fmt, [("kind", lambda r: r["kind"]), ("from", lambda r: r["from"]),
                      ("into", lambda r: ", ".join(r["into"]) if isinstance(r["into"], list) else r["into"]),
                      ("tracklets", lambda r: str(len(r["tracklets"]))),
                      ("threshold", lambda r: f"{r.get('threshold', float('nan')):.3f}")], "audit")


@query_app.command("tracklet")
def query_tracklet(tracklet_id: str, config: Path = ConfigOpt,
                   fmt: Format = typer.Option(Format.table, "--format")) -> None:
    """One tracklet's link; exit 1 when it is not linked."""
    from stages import query

    _emit_one(query.tracklet(_store(config), tracklet_id), fmt, f"tracklet {tracklet_id}", "is not linked")


def parse_time(text: str) -> float:
    """Unix seconds from ``text``: a number, or an ISO 8601 date/time (UTC when it has no offset).

    Raises:
        typer.BadParameter: Neither.
    """
    import datetime as dt

    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither Unix seconds nor an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


@app.command()
def purge(config: Path = ConfigOpt,
          identity: str | None = typer.Option(None, "--identity", help="Global id whose data to delete."),
          camera_name: str | None = typer.Option(None, "--camera", help="Camera whose tracklets to delete."),
          before: str | None = typer.Option(None, "--before", help="Delete tracklets closed before this time "
                                            "(Unix seconds or ISO 8601, UTC by default).")) -> None:
    """Delete stored links, embeddings, crops, identities and audit entries of one identity, one camera,
    or everything before a time. Run it with the matcher stopped (a running matcher keeps its gallery
    in memory until restarted)."""
    chosen = [o for o in (identity, camera_name, before) if o is not None]
    if len(chosen) != 1:
        err.print("[red]error:[/red] give exactly one of --identity, --camera, --before")
        raise typer.Exit(2)
    store = _store(config)
    if identity is not None:
        n, what = _run(lambda: store.purge_identity(identity)), f"identity {identity}"
    elif camera_name is not None:
        n, what = _run(lambda: store.purge_camera(camera_name)), f"camera {camera_name}"
    else:
        t = parse_time(before)
        n, what = _run(lambda: store.purge_before(t)), f"tracklets closed before {t:.0f} (Unix s)"
    out.print(f"purged {what}: {n} tracklet(s)", highlight=False)


# --------------------------------------------------------------------------------------------------
@app.command()
def demo(config: Path = ConfigOpt,
         output: Path = typer.Option(Path("out/demo"), "--output", "-o", help="Directory for links.json, "
                                     "identities.json, report.html and logs."),
         fresh: bool = typer.Option(False, help="Forget identities stored by earlier runs first."),
         timeout: float = typer.Option(1800.0, help="Give up after this many seconds."),
         keep_services: bool = typer.Option(True, help="Leave the local services running afterwards.")) -> None:
    """Run the whole pipeline on the config's cameras and write links, identities and a report."""
    from pipeline.demo import run_demo
    from pipeline.runner import setup_logging

    cfg = _config(config)
    setup_logging("demo")
    result = _run(lambda: run_demo(cfg, config, output, fresh=fresh, timeout_s=timeout, console=out,
                                   stop_services=not keep_services))
    table = Table(title=f"identities ({result['cross_camera']} span several cameras)")
    for col in ("global id", "cameras", "tracklets", "first seen s", "last seen s"):
        table.add_column(col)
    for ident in sorted(result["identities"], key=lambda i: (-len(i["cameras"]), i["first_seen_s"])):
        table.add_row(ident["global_id"], ", ".join(ident["cameras"]), str(ident["n_tracklets"]),
                      f"{ident['first_seen_s']:.1f}", f"{ident['last_seen_s']:.1f}")
    out.print(table)
    out.print(f"re-id model: {result['model']}; identities after re-association of every tracklet", highlight=False)
    out.print(f"wrote {output / 'links.json'}, {output / 'identities.json'}, {output / 'report.html'}")
    if result["cross_camera"] == 0:
        err.print("[yellow]warning:[/yellow] no identity spans two cameras")


from pipeline.cli_reid import register as _register_reid  # noqa: E402 - mine, train, evaluate, export

_register_reid(app)

from pipeline.cli_identity import register as _register_identity  # noqa: E402 - calibrate

_register_identity(app)

from pipeline.cli_links import register as _register_links  # noqa: E402 - evaluate-links

_register_links(app)

from pipeline.cli_operator import register as _register_operator  # noqa: E402 - query timeline/…, report

_register_operator(app, query_app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
