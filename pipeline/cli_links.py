"""``reidstream evaluate-links``: score the matcher's global identities against a ground truth.

:func:`register` adds the command to the main typer app (``pipeline/cli.py``). The work lives in
:mod:`stages.matcher.evaluation`, imported when the command runs. A missing or malformed file prints
one ``error:`` line and exits 1.

Example::

    reidstream demo --output out/demo
    reidstream evaluate-links --ground-truth tests/data/vtest_gt.csv --links out/demo/links.json
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from pipeline.cli_common import out, run_reporting

__all__ = ["register"]


class LinksFormat(str, Enum):
    table = "table"
    json = "json"


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _print_table(report: Any) -> None:
    pairs = Table(title=f"pairwise scores over {report.matched} matched tracklets")
    for col in ("pairs", "TP", "FP", "FN", "precision", "recall", "F1"):
        pairs.add_column(col, justify="left" if col == "pairs" else "right")
    for name, s in (("cross-camera", report.cross_camera), ("same-camera", report.same_camera),
                    ("all", report.all_pairs)):
        pairs.add_row(name, str(s.tp), str(s.fp), str(s.fn), _fmt(s.precision), _fmt(s.recall), _fmt(s.f1))
    out.print(pairs)
    summary = Table(title="identities and tracklets", show_header=False)
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    i = report.identity_f1
    for key, value in (
        ("tracklets (matched / unmatched)", f"{report.tracklets} ({report.matched} / {len(report.unmatched)})"),
        ("true cross-camera pairs", str(report.gt_cross_camera_pairs)),
        ("GT persons (on >= 2 cameras)", f"{report.persons} ({report.persons_multi_camera})"),
        ("predicted identities", str(report.predicted_identities)),
        ("purity", _fmt(report.purity)),
        ("fragmentation (persons on >= 2 cameras)",
         f"{_fmt(report.fragmentation, 2)} ({_fmt(report.fragmentation_multi_camera, 2)})"),
        ("IDF1 (IDP / IDR)", f"{_fmt(i.idf1)} ({_fmt(i.idp)} / {_fmt(i.idr)})"),
        ("impure tracklets (two people)", str(len(report.impure))),
        ("false-positive tracklets (unmatched)", str(len(report.unmatched))),
        (f"fragments (gap <= {report.settings['fragment_gap_s']:g} s)", str(len(report.fragments))),
    ):
        summary.add_row(key, value)
    out.print(summary)
    if report.impure:
        out.print("impure: " + ", ".join(report.impure), highlight=False)
    if report.unmatched:
        out.print("unmatched: " + ", ".join(report.unmatched), highlight=False)


def evaluate_links_command(
    ground_truth: Path = typer.Option(..., "--ground-truth", "-g",
                                      help="Ground-truth CSV (frame,person,x1,y1,x2,y2), e.g. tests/data/vtest_gt.csv."),
    links: Path = typer.Option(..., "--links", "-l", help="links.json written by `reidstream demo`."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the JSON report to this file."),
    fmt: LinksFormat = typer.Option(LinksFormat.table, "--format", help="table or json (on stdout)."),
    min_iou: float = typer.Option(0.5, "--min-iou", min=0.01, max=1.0,
                                  help="IoU of a tracklet box and a GT box for a vote."),
    min_iot: float = typer.Option(0.8, "--min-iot", min=0.01, max=1.0,
                                  help="Intersection over the tracklet box for a vote (ROI-cut boxes)."),
    fragment_gap_s: float = typer.Option(2.0, "--fragment-gap", min=0.0,
                                         help="Seconds between two tracklets of one person on one camera "
                                              "that make a broken track."),
) -> None:
    """Cross-camera pairwise precision / recall / F1, purity, fragmentation, IDF1 and tracklet quality."""
    from stages.matcher import evaluation

    def work() -> Any:
        gt = evaluation.load_ground_truth(ground_truth)
        tracklets = evaluation.load_links(links)
        return evaluation.evaluate_links(gt, tracklets, min_iou=min_iou, min_iot=min_iot,
                                         fragment_gap_s=fragment_gap_s)

    report = run_reporting(work, (ValueError,))
    data = report.as_dict()
    if output is not None:
        run_reporting(lambda: output.write_text(json.dumps(data, indent=2) + "\n"), (OSError,))
    if fmt is LinksFormat.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        _print_table(report)
        if output is not None:
            out.print(f"wrote {output}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``evaluate-links`` to ``app``.

    Example:
        >>> import typer
        >>> app = typer.Typer()
        >>> register(app)
    """
    app.command("evaluate-links")(evaluate_links_command)
