"""``reidstream calibrate``: the matcher's threshold from the site's own tracklets, without labels.

:func:`register` adds the command to the main typer app (``pipeline/cli.py``). Importing this module
imports no stage; the command imports what it needs when it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.cli_common import err, out, run_reporting
from pipeline.config import load_config

ConfigOpt = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help="YAML config file.")


def calibrate_command(
    config: Path = ConfigOpt,
    tracklets: Path | None = typer.Option(
        None, "--tracklets", help="Mined tracklet folders (`reidstream mine`) to embed with the configured model; "
        "default: the tracklets linked in the store."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Calibration JSON to write (a PNG plot goes beside it); default: beside the "
        "model's checkpoint, else services.data_dir/calibration/<namespace>.json."),
    plot: bool = typer.Option(True, help="Write the diagnostic plot."),
    zone: str | None = typer.Option(
        None, "--zone", help="With the store: the zone whose linked tracklets to read (see `zones:`); default: the "
        "cameras in no zone. Each zone's matcher also recalibrates online on its own window."),
) -> None:
    """Estimate the association threshold label-free (cannot-links + held-out constraints) and write it.

    Point `matcher.calibration` at the file written (or copy its threshold into `matcher.threshold`).
    """

    def run() -> None:
        from stages.matcher.calibration import write_calibration
        from stages.matcher.offline import calibrate_set, default_calibration_path, embed_folders, from_store

        cfg = load_config(config)
        if tracklets is not None:
            ts, source = embed_folders(cfg, tracklets), f"tracklets {tracklets}"
        else:
            ts = from_store(cfg, zone)
            source = f"store namespace {cfg.store.namespace}" + (f", zone {zone}" if zone else "")
        cal = calibrate_set(cfg, ts, source=f"({cfg.reid.model.type}, {source})")
        path = output or default_calibration_path(cfg, zone if tracklets is None else None)
        files = write_calibration(cal, path, plot=plot)
        out.print_json(json.dumps(cal.summary()))
        err.print("wrote " + ", ".join(str(f) for f in files))

    run_reporting(run, (ValueError,))


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` to ``app``."""
    app.command("calibrate")(calibrate_command)
