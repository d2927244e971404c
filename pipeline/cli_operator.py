"""Operator commands: ``reidstream query timeline|crops|sightings|search|merge|split|constraints`` and
``reidstream report``.

Each ``query`` command mirrors one route of the operator API (:mod:`stages.query`) and prints a table,
or with ``--format json`` the object the route returns. Bad input or an unknown id prints one
``error:`` line and exits 1. :func:`register` adds them to the main app (``pipeline/cli.py``).

Example::

    reidstream query timeline G000042 --config my.yaml
    reidstream query search --tracklet left-3-120 --k 5 --config my.yaml
    reidstream query search --crop a.jpg --crop b.jpg --config my.yaml
    reidstream query merge G000042 --from G000051 --operator alice --reason "same coat" --config my.yaml
    reidstream report --output report.html --config my.yaml --limit 100
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from pipeline.cli_common import err, out, print_table, run_reporting

__all__ = ["page_line", "register"]

_CONFIG_HELP = "YAML config file."


class Fmt(str, Enum):
    table = "table"
    json = "json"


def _cli() -> Any:
    from pipeline import cli

    return cli


def _run(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; bad input (ValueError) and unknown ids (LookupError) become one ``error:`` line."""
    return run_reporting(fn, (ValueError, LookupError))


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _time(text: str | None) -> float | None:
    return None if text is None else _cli().parse_time(text)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _score(v: float | None) -> str:
    return "founded" if v is None else f"{v:.3f}"


def page_line(result: dict[str, Any], page: int, limit: int, what: str, to_stderr: bool) -> None:
    """Print where a page lies (``page 2 of 5 (230 identities); next: --page 3``)."""
    total = result["total"]
    if total is None:
        where = f"page {page} ({what}: more than {page * limit}, not counted)"
    else:
        where = f"page {page} of {max(1, -(-total // limit))} ({total} {what})"
    if result["next_offset"] is not None:
        where += f"; next: --page {page + 1}"
    (err if to_stderr else out).print(where, highlight=False)




_SIGHTING_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("tracklet", lambda r: r["tracklet_id"]), ("camera", lambda r: r["camera"]),
    ("global id", lambda r: r["global_id"]), ("start s", lambda r: f"{r['start_s']:.1f}"),
    ("end s", lambda r: f"{r['end_s']:.1f}"), ("score", lambda r: _score(r["score"])),
    ("crop", lambda r: "yes" if r["thumbnail_url"] else "-"),
]


def timeline_command(global_id: str = typer.Argument(..., help="Global id (a merged-away id follows the merge)."),
                     config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help=_CONFIG_HELP),
                     fmt: Fmt = typer.Option(Fmt.table, "--format", help="table or json."),
                     page: int = typer.Option(1, "--page", min=1),
                     limit: int = typer.Option(1000, "--limit", min=1)) -> None:
    """An identity's sightings ordered by start time (as GET /identities/{id}/timeline)."""
    from stages import query

    store = _cli()._store(config)
    found = _run(lambda: query.timeline(store, global_id, (page - 1) * limit, limit))
    if found is None:
        _fail(f"identity {global_id!r} is unknown")
    if fmt is Fmt.json:
        _json(found)
        return
    merged = f" (asked as {found['merged_from']})" if found["merged_from"] else ""
    print_table(f"timeline of {found['global_id']}{merged}: {', '.join(found['cameras'])}, "
           f"{found['first_seen_s']:.1f}–{found['last_seen_s']:.1f} s", found["sightings"], _SIGHTING_COLUMNS)
    page_line(found, page, limit, "tracklets", False)


def crops_command(global_id: str = typer.Argument(..., help="Global id."),
                  config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help=_CONFIG_HELP),
                  fmt: Fmt = typer.Option(Fmt.table, "--format", help="table or json."),
                  camera_name: str | None = typer.Option(None, "--camera", help="Only this camera."),
                  save_dir: Path | None = typer.Option(
                      None, "--save-dir", help="Also write each crop as DIR/<camera>/<tracklet>.jpg.")) -> None:
    """An identity's crops per camera (as GET /identities/{id}/crops)."""
    from stages import query

    store = _cli()._store(config)
    found = _run(lambda: query.crops(store, global_id, camera_name))
    if found is None:
        _fail(f"identity {global_id!r} is unknown")
    if save_dir is not None:
        for cam, items in found["cameras"].items():
            for item in items:
                data = store.thumbnail(item["tracklet_id"])
                if data:
                    path = save_dir / cam / f"{item['tracklet_id'].replace('/', '_')}.jpg"
                    run_reporting(lambda p=path, d=data: _write(p, d), (OSError,))
    if fmt is Fmt.json:
        _json(found)
        return
    rows = [{"camera": cam, **item} for cam, items in found["cameras"].items() for item in items]
    print_table(f"crops of {found['global_id']}", rows, [
        ("camera", lambda r: r["camera"]), ("tracklet", lambda r: r["tracklet_id"]),
        ("start s", lambda r: f"{r['start_s']:.1f}"), ("end s", lambda r: f"{r['end_s']:.1f}"),
        ("url", lambda r: r["thumbnail_url"])])
    if save_dir is not None:
        out.print(f"wrote {len(rows)} crop(s) under {save_dir}", highlight=False)


def sightings_command(camera: str = typer.Argument(..., help="Camera name."),
                      config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help=_CONFIG_HELP),
                      fmt: Fmt = typer.Option(Fmt.table, "--format", help="table or json."),
                      since: str | None = typer.Option(None, help="Earliest start (stream seconds or ISO 8601)."),
                      until: str | None = typer.Option(None, help="Latest start."),
                      page: int = typer.Option(1, "--page", min=1),
                      limit: int = typer.Option(100, "--limit", min=1)) -> None:
    """A camera's tracklets starting in a time range (as GET /cameras/{camera}/sightings)."""
    from stages import query

    store = _cli()._store(config)
    lo, hi = _time(since), _time(until)
    found = _run(lambda: query.camera_sightings(store, camera, lo, hi, (page - 1) * limit, limit))
    if found is None:
        _fail(f"no sightings of camera {camera!r} are stored")
    if fmt is Fmt.json:
        _json(found)
        return
    print_table(f"sightings of {camera}", found["items"], _SIGHTING_COLUMNS)
    page_line(found, page, limit, "sightings", False)


def search_command(crop: list[Path] = typer.Option(None, "--crop", help="JPEG/PNG crop of the person (repeat)."),
                   tracklet: str | None = typer.Option(None, "--tracklet", help="Instead of crops: a linked tracklet."),
                   k: int = typer.Option(10, "--k", help="How many identities (1..100)."),
                   config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help=_CONFIG_HELP),
                   fmt: Fmt = typer.Option(Fmt.table, "--format", help="table or json.")) -> None:
    """Search by example: the top-k identities for crops or a tracklet (as POST /search).

    Crops are embedded with the config's re-id model (``reid`` section), as the re-id stage would.
    """
    from stages import query

    crops = list(crop or [])
    if bool(crops) == (tracklet is not None):
        _fail("give --crop FILE (one or more) or --tracklet ID")
    if not 1 <= k <= query.MAX_K:
        _fail(f"--k must be in 1..{query.MAX_K}, got {k}")
    cli = _cli()
    cfg = cli._config(config)
    store = cli._store(config)
    if tracklet is not None:
        result = _run(lambda: query.search(store, k, tracklet_id=tracklet))
    else:
        import cv2
        import numpy as np

        data = [run_reporting(lambda p=p: p.read_bytes(), (OSError,)) for p in crops]
        for path, raw in zip(crops, data):
            if cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) is None:
                _fail(f"crop {path} is not a decodable image")
        from stages.reid.embedder import CropEmbedder

        def embed() -> Any:
            embedder = CropEmbedder.from_config(cfg.reid)
            embedder.setup()
            return embedder.embed(data)

        vector = _run(embed)
        result = _run(lambda: query.search(store, k, vector=vector, n_crops=len(data)))
    if fmt is Fmt.json:
        _json(result)
        return
    print_table(f"identities most like {tracklet or f'{len(crops)} crop(s)'} ({result['space']})", result["results"], [
        ("rank", lambda r: str(result["results"].index(r) + 1)), ("global id", lambda r: r["global_id"]),
        ("score", lambda r: f"{r['score']:.3f}"), ("cameras", lambda r: ", ".join(r["cameras"])),
        ("tracklets", lambda r: str(r["n_tracklets"])), ("best tracklet", lambda r: r["best_tracklet"]),
        ("best score", lambda r: f"{r['best_score']:.3f}")])


def _operator(name: str | None) -> str:
    name = name or os.environ.get("USER")
    if not name:
        _fail("give --operator NAME (who decides; kept in the audit)")
    return str(name)


def _print_change(result: dict[str, Any], fmt: Fmt) -> None:
    if fmt is Fmt.json:
        _json(result)
        return
    if result["kind"] == "merge":
        out.print(f"merged {len(result['moved'])} tracklet(s) into {result['global_id']} "
                  f"(audit {', '.join(result['audit_ids'])})", highlight=False)
    else:
        out.print(f"split {len(result['moved'])} tracklet(s) off {result['global_id']} into "
                  f"{result['new_global_id']} (audit {', '.join(result['audit_ids'])})", highlight=False)


def merge_command(into: str = typer.Argument(..., help="The identity that stays."),
                  sources: list[str] = typer.Option(..., "--from", help="Identity merged into it (repeat)."),
                  operator: str | None = typer.Option(None, "--operator", help="Who decides (default: $USER)."),
                  reason: str = typer.Option("", "--reason", help="Free-text note for the audit."),
                  config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help=_CONFIG_HELP),
                  fmt: Fmt = typer.Option(Fmt.table, "--format", help="table or json.")) -> None:
    """Operator merge: move every tracklet of the --from identities into INTO, with audit and a
    must-link constraint (as POST /identities/{id}/merge)."""
    from stages import query

    name = _operator(operator)
    store = _cli()._store(config)
    _print_change(_run(lambda: query.merge(store, into, sources, name, reason)), fmt)


def split_command(global_id: str = typer.Argument(..., help="The identity to split."),
                  tracklets: list[str] = typer.Option(..., "--tracklet", help="Member tracklet to move (repeat)."),
                  operator: str | None = typer.Option(None, "--operator", help="Who decides (default: $USER)."),
                  reason: str = typer.Option("", "--reason", help="Free-text note for the audit."),
                  config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help=_CONFIG_HELP),
                  fmt: Fmt = typer.Option(Fmt.table, "--format", help="table or json.")) -> None:
    """Operator split: move the --tracklet members of GLOBAL_ID to a new identity, with audit and a
    cannot-link constraint (as POST /identities/{id}/split)."""
    from stages import query

    name = _operator(operator)
    store = _cli()._store(config)
    _print_change(_run(lambda: query.split(store, global_id, tracklets, name, reason)), fmt)


def constraints_command(config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help=_CONFIG_HELP),
                        fmt: Fmt = typer.Option(Fmt.table, "--format", help="table or json.")) -> None:
    """Operators' must-link and cannot-link decisions, oldest first (as GET /constraints)."""
    from stages import query

    rows = _run(lambda: query.constraints(_cli()._store(config)))
    if fmt is Fmt.json:
        _json(rows)
        return
    print_table("constraints", rows, [("kind", lambda r: r["kind"]), ("a", lambda r: ", ".join(r["a"])),
                                 ("b", lambda r: ", ".join(r["b"])), ("operator", lambda r: r["operator"]),
                                 ("audit", lambda r: r["audit_id"] or "-")])


def report_command(output: Path = typer.Option(Path("report.html"), "--output", "-o", help="HTML file to write."),
                   config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help=_CONFIG_HELP),
                   limit: int = typer.Option(100, "--limit", min=1, help="Most recent identities shown."),
                   min_cameras: int = typer.Option(1, "--min-cameras", min=1,
                                                   help="Only identities seen on this many cameras."),
                   max_tracklets: int = typer.Option(50, "--max-tracklets", min=1,
                                                     help="Most recent tracklets shown per identity."),
                   title: str = typer.Option("reidstream identities", "--title")) -> None:
    """Render the current store as a self-contained HTML page: a timeline and the crops of each of the
    most recent identities. Runs at any time, also while the pipeline runs."""
    from pipeline.report import write_store_report

    store = _cli()._store(config)
    shown = _run(lambda: write_store_report(store, output, limit=limit, min_cameras=min_cameras,
                                            max_tracklets=max_tracklets, title=title))
    out.print(f"wrote {output} ({shown['identities']} of {shown['total'] if shown['total'] is not None else 'more'} "
              f"identities, {shown['tracklets']} tracklets)", highlight=False)


def register(app: typer.Typer, query_app: typer.Typer) -> None:
    """Add the operator ``query`` subcommands to ``query_app`` and ``report`` to ``app``.

    Example:
        >>> import typer
        >>> app, q = typer.Typer(), typer.Typer()
        >>> register(app, q)
    """
    query_app.command("timeline")(timeline_command)
    query_app.command("crops")(crops_command)
    query_app.command("sightings")(sightings_command)
    query_app.command("search")(search_command)
    query_app.command("merge")(merge_command)
    query_app.command("split")(split_command)
    query_app.command("constraints")(constraints_command)
    app.command("report")(report_command)
