"""``reidstream mine | train | evaluate | export`` on the command line, and the per-model example configs.

The commands are registered on a local typer app with :func:`pipeline.cli_reid.register`, so these
tests do not depend on ``pipeline/cli.py``; mining runs the real detector and tracker over 40 frames of
``samples/vtest.avi`` at 320 pixels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli_reid import register
from pipeline.config import load_config

try:  # works both as a package module and as a rootdir-inserted module
    from .fixtures import MinedTracklet, write_mined
except ImportError:
    from fixtures import MinedTracklet, write_mined  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[3]
MODEL_CONFIGS = sorted((ROOT / "configs" / "models").glob("*.yaml"))


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:  # a callback keeps the sub-command names on the command line
        """Test app."""

    return app


def invoke(app: typer.Typer, *args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"REIDSTREAM_LOG_LEVEL": "WARNING", **(env or {})})


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_importing_the_cli_module_does_not_import_torch():
    code = "import sys, pipeline.cli_reid; print('torch' in sys.modules, 'stages.reid.training.mine' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------- mine


def test_mine_writes_tracklet_folders_the_loader_reads(app, sample_video, tmp_path, monkeypatch):
    from stages.reid.training.datasets import load_dataset
    from stages.reid.training.datasets.tracklets import read_tracklet_meta

    monkeypatch.chdir(ROOT)  # the config's video path is relative to the repository
    out = tmp_path / "mined"
    env = {"REIDSTREAM__DEFAULTS__DETECTOR__IMGSZ": "320"}
    result = invoke(app, "mine", "--config", ROOT / "configs" / "demo.yaml", "--output", out, "--camera", "right",
                    "--max-frames", "40", "--crops", "12", env=env)
    assert result.exit_code == 0, result.output + result.stderr
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert folders, "no tracklet mined from 40 frames of the right half"
    assert f"{len(folders)} tracklets written" in result.stdout
    for folder in folders:
        meta = read_tracklet_meta(folder)
        assert meta["camera"] == "right" and meta["pid"] is None
        assert 1 <= len(meta["frames"]) <= 12 and max(meta["frames"]) < 40
        assert len(list(folder.glob("*.jpg"))) == len(meta["frames"])
        assert all(b[2] > b[0] and b[3] > b[1] and b[0] >= 384 - 1 for b in meta["boxes"])  # right half, source px
    ds = load_dataset(f"tracklets:{out}", holdout_fraction=0.5)
    assert len(ds.train) + len(ds.query) == len(folders)  # each tracklet its own identity, halves protocol
    assert len(ds.query) == len(ds.gallery)

    again = invoke(app, "mine", "--config", ROOT / "configs" / "demo.yaml", "--output", out, env=env)
    assert again.exit_code == 1
    assert "already holds" in one_error_line(again) and "--append" in again.stderr


def test_mine_unknown_camera_is_a_config_error(app, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = invoke(app, "mine", "--config", ROOT / "configs" / "demo.yaml", "--output", tmp_path / "m",
                    "--camera", "nope")
    assert result.exit_code == 2
    assert "no camera 'nope'" in one_error_line(result)


# --------------------------------------------------------------------------------- train / evaluate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A mined fixture data set and a checkpoint trained on it for one step (T=4, 64 x 32)."""
    from stages.reid.training.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    data = write_mined(root / "mined", tuple(MinedTracklet(f"c-{i:02d}", f"cam{i % 2}", 5) for i in range(10)))
    cfg = TrainConfig(model="temporal_pool", data=f"tracklets:{data}", output_dir=root / "run", epochs=1,
                      pretrained=False, seq_len=4, input_size=(64, 32), p=4, k=2, device="cpu",
                      max_steps_per_epoch=1, dataset_options={"holdout_fraction": 0.3})
    return data, train(cfg).last_checkpoint


def test_cli_checkpoint_mismatch_is_one_clear_error_line(app, tiny):
    data, ckpt = tiny
    result = invoke(app, "evaluate", "--checkpoint", ckpt, "--data", f"tracklets:{data}", "--seq-len", "8",
                    "--workers", "0")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "T=4" in line and "seq_len=8" in line and "disagrees" in line

    result = invoke(app, "evaluate", "--checkpoint", ckpt, "--data", f"tracklets:{data}", "--config",
                    ROOT / "configs" / "models" / "sta.yaml", "--workers", "0")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "network 'temporal_pool'" in line and "'sta'" in line and "[64, 32]" in line

    result = invoke(app, "train", "--data", f"tracklets:{data}", "--output", ckpt.parent, "--resume", ckpt,
                    "--height", "128", "--width", "64", "--p", "4", "--k", "2", "--workers", "0", "--holdout", "0.3")
    assert result.exit_code == 1
    assert "cannot resume" in one_error_line(result) and "input size [64, 32]" in result.stderr


def test_cli_evaluate_and_export(app, tiny, tmp_path):
    data, ckpt = tiny
    result = invoke(app, "evaluate", "--checkpoint", ckpt, "--data", f"tracklets:{data}", "--output",
                    tmp_path / "eval", "--workers", "0", "--sampling", "evenly")
    assert result.exit_code == 0, result.stderr
    assert "Rank-1" in result.stdout and "mAP" in result.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["settings"]["sampling"] == "evenly" and metrics["settings"]["model"] == "temporal_pool"
    assert 0.0 <= metrics["metrics"]["mAP"] <= 1.0 and (tmp_path / "eval" / "cmc.png").is_file()

    pytest.importorskip("onnxruntime")
    result = invoke(app, "export", "--checkpoint", ckpt, "--format", "onnx", "--output", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert "max |difference|" in result.stdout


def test_cli_train_resume_continues(app, tiny, tmp_path):
    data, _ = tiny
    args = ["train", "--data", f"tracklets:{data}", "--model", "temporal_pool", "--no-pretrained", "--seq-len", "4",
            "--height", "64", "--width", "32", "--p", "4", "--k", "2", "--workers", "0", "--max-steps-per-epoch",
            "1", "--holdout", "0.3", "--eval-every", "0", "--output", tmp_path / "run"]
    first = invoke(app, *args, "--epochs", "1")
    assert first.exit_code == 0, first.stderr
    # resumed without repeating the shape and data options: they come from the checkpoint
    second = invoke(app, "train", "--data", f"tracklets:{data}", "--output", tmp_path / "run", "--epochs", "2",
                    "--resume", tmp_path / "run" / "last.pt", "--p", "4", "--k", "2", "--workers", "0",
                    "--max-steps-per-epoch", "1", "--eval-every", "0")
    assert second.exit_code == 0, second.stderr
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]


# ---------------------------------------------------------------------------------- model configs


def test_there_is_one_config_per_seed_network():
    assert [p.stem for p in MODEL_CONFIGS] == ["conv_attention", "drsta", "rcn", "siamese_sgru", "sta"]


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_model_config_loads_and_builds(path):
    from stages.reid.models import build_model

    cfg = load_config(path)
    m = cfg.reid.model
    assert m.type == path.stem and m.checkpoint is None
    assert [c.name for c in cfg.cameras] == ["left", "right"]
    assert "# checkpoint:" in path.read_text()
    model = build_model(m.type, backbone=m.backbone, **m.options, pretrained=False)
    assert model.config["backbone"] == m.backbone
    assert all(model.config[key] == value for key, value in m.options.items())
    assert model.embedding_dim > 0
