"""``reidstream evaluate-links`` on the command line: exit codes, table and JSON output, ``--output``.

The command is registered on a local typer app with :func:`pipeline.cli_links.register`; one test
checks that ``pipeline/cli.py`` registers it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli_links import register

GT = "frame,person,x1,y1,x2,y2\n" + "".join(
    f"{f},1,10,10,40,90\n{f},2,200,10,230,90\n" for f in range(20))


def link(tid: str, camera: str, gid: str, box: list[float], frames: list[int]) -> dict:
    return {"tracklet_id": tid, "camera": camera, "track_id": 1, "global_id": gid, "score": None,
            "start_s": frames[0] / 10, "end_s": frames[-1] / 10, "frames": frames, "boxes": [box] * len(frames)}


LINKS = [link("l1", "left", "G1", [10, 10, 40, 90], [0, 1, 2]),
         link("r1", "right", "G1", [10, 10, 40, 90], [10, 11, 12]),   # person 1 on both: a true pair
         link("r2", "right", "G1", [200, 10, 230, 90], [5, 6, 7]),    # person 2 merged into G1: false pairs
         link("l2", "left", "G9", [500, 400, 530, 480], [3, 4, 5])]   # on nobody


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:  # a callback keeps the sub-command name on the command line
        """Test app."""

    return app


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    gt, links = tmp_path / "gt.csv", tmp_path / "links.json"
    gt.write_text(GT)
    links.write_text(json.dumps(LINKS))
    return gt, links


def test_json_output(app, files) -> None:
    gt, links = files
    res = CliRunner().invoke(app, ["evaluate-links", "--ground-truth", str(gt), "--links", str(links),
                                   "--format", "json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert (d["tracklets"], d["matched"], d["unmatched"]) == (4, 3, 1)
    # cross-camera pairs: (l1, r1) TP, (l1, r2) FP
    assert (d["cross_camera"]["tp"], d["cross_camera"]["fp"], d["cross_camera"]["fn"]) == (1, 1, 0)
    assert d["cross_camera"]["precision"] == pytest.approx(0.5) and d["cross_camera"]["recall"] == 1.0
    assert d["unmatched_tracklets"] == ["l2"]
    assert d["purity"] == pytest.approx(2 / 3)


def test_table_output_and_report_file(app, files, tmp_path) -> None:
    gt, links = files
    report = tmp_path / "out" / "report.json"
    report.parent.mkdir()
    res = CliRunner().invoke(app, ["evaluate-links", "-g", str(gt), "-l", str(links), "--output", str(report)])
    assert res.exit_code == 0, res.output
    assert "cross-camera" in res.stdout and "purity" in res.stdout and "IDF1" in res.stdout
    assert json.loads(report.read_text())["cross_camera"]["tp"] == 1


def test_missing_file_is_one_error_line(app, files, tmp_path) -> None:
    gt, _ = files
    res = CliRunner().invoke(app, ["evaluate-links", "--ground-truth", str(gt), "--links",
                                   str(tmp_path / "missing.json")])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.json" in lines[0]


def test_malformed_input_is_one_error_line(app, files) -> None:
    gt, links = files
    links.write_text('{"not": "a list"}')
    res = CliRunner().invoke(app, ["evaluate-links", "--ground-truth", str(gt), "--links", str(links)])
    assert res.exit_code == 1
    assert res.output.strip().startswith("error:") and "expected a list" in res.output
    gt.write_text("frame,person\n0,1\n")
    links.write_text(json.dumps(LINKS))
    res = CliRunner().invoke(app, ["evaluate-links", "--ground-truth", str(gt), "--links", str(links)])
    assert res.exit_code == 1 and "header" in res.output


def test_required_options(app) -> None:
    res = CliRunner().invoke(app, ["evaluate-links"])
    assert res.exit_code == 2


def test_main_cli_registers_the_command() -> None:
    from pipeline.cli import app as main_app

    res = CliRunner().invoke(main_app, ["evaluate-links", "--help"])
    assert res.exit_code == 0 and "--ground-truth" in res.output
