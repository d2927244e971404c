"""Truncated sources and unacknowledged tracklets: warning, summary status, metric, distinct exit code."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from typer.testing import CliRunner

from pipeline import metrics
from pipeline.cli_common import EXIT_SOURCE_INCOMPLETE, EXIT_UNDELIVERED
from stages.camera import CameraSummary
from stages.ingest import VideoSource


def _incomplete_count(camera: str) -> float:
    return metrics.SOURCE_INCOMPLETE.labels(stage="ingest", camera=camera)._value.get()


def test_truncated_file_is_flagged(sample_video, tmp_path, caplog):
    cut = tmp_path / "cut.avi"
    cut.write_bytes(sample_video.read_bytes()[:1_000_000])
    before = _incomplete_count("cut")
    src = VideoSource("cut", str(cut))
    src.setup()
    with caplog.at_level(logging.WARNING, logger="stages.ingest"):
        n = sum(1 for _ in src)
    src.close()
    assert src.frames_declared == 795 and n < 795
    assert src.incomplete and _incomplete_count("cut") == before + 1
    assert "truncated or corrupt" in caplog.text


def test_complete_file_and_max_frames_are_not_flagged(sample_video):
    for max_frames in (None, 30):
        src = VideoSource("whole", str(sample_video), max_frames=max_frames, frame_stride=5)
        src.setup()
        n = sum(1 for _ in src)
        src.close()
        assert not src.incomplete and n == (159 if max_frames is None else 6)


@pytest.mark.parametrize(("summary", "code", "status"), [
    (CameraSummary("left", 10, 3, ("a", "b"), 1.0), 0, "ok"),
    (CameraSummary("left", 10, 3, ("a", "b"), 1.0, unacknowledged=("b",)), EXIT_UNDELIVERED, "undelivered"),
    (CameraSummary("left", 97, 3, ("a",), 1.0, source_incomplete=True, frames_declared=795),
     EXIT_SOURCE_INCOMPLETE, "source_incomplete"),
])
def test_camera_command_exit_codes(monkeypatch, tmp_path, summary, code, status):
    import pipeline.runner
    import stages.camera
    from pipeline.cli import app

    monkeypatch.setattr(pipeline.runner, "setup_process", lambda *a, **k: threading.Event())
    monkeypatch.setattr(stages.camera, "run_camera", lambda cfg, name, stop: summary)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cameras: [{name: left, source: x.avi}]\n")
    out = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["camera", "--camera", "left", "--config", str(cfg), "--summary", str(out)])
    assert result.exit_code == code, result.output
    written = json.loads(out.read_text())
    assert written["status"] == status and written["unacknowledged"] == list(summary.unacknowledged)
    if code == EXIT_UNDELIVERED:
        assert "1 of 2 tracklet(s) were not acknowledged" in result.output
    if code == EXIT_SOURCE_INCOMPLETE:
        assert "97 frame(s) of the 795" in result.output
