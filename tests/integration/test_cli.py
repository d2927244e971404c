"""The command line: local services, clear one-line errors, and the light `pipeline` import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.services import free_port
from tests.conftest import ROOT, run_cli

DEMO = str(ROOT / "configs" / "demo.yaml")


def error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


def assert_one_clear_error(proc, *needles: str) -> None:
    assert proc.returncode != 0, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_importing_pipeline_does_not_import_heavy_libraries():
    code = ("import sys, pipeline, pipeline.config, pipeline.messages, pipeline.bus, pipeline.store, "
            "pipeline.metrics, pipeline.runner, pipeline.services, pipeline.demo, pipeline.cli, pipeline.report, "
            "stages.reid.models;"
            "print(sorted(m for m in ('torch', 'ultralytics', 'tensorrt', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_up_status_down(tmp_path):
    kp, rp = free_port(), free_port()
    env = {"REIDSTREAM__SERVICES__DATA_DIR": str(tmp_path / "data"), "REIDSTREAM__SERVICES__KAFKA_PORT": str(kp),
           "REIDSTREAM__SERVICES__REDIS_PORT": str(rp), "REIDSTREAM__BUS__BOOTSTRAP_SERVERS": f"127.0.0.1:{kp}",
           "REIDSTREAM__STORE__URL": f"redis://127.0.0.1:{rp}/0", "REIDSTREAM__BUS__CONNECT_TIMEOUT_S": "1"}
    try:
        up = run_cli("up", "--config", DEMO, env=env, timeout=60)
        assert up.returncode == 0, up.stderr
        assert f"127.0.0.1:{kp}" in up.stdout and f"redis://127.0.0.1:{rp}/0" in up.stdout
        again = run_cli("up", "--config", DEMO, env=env, timeout=60)  # already running: reused, same pids
        assert again.returncode == 0 and again.stdout == up.stdout
        st = run_cli("status", "--config", DEMO, env=env, timeout=60)
        assert st.returncode == 0 and st.stdout.count("ready") == 2
    finally:
        down = run_cli("down", "--config", DEMO, env=env, timeout=60)
    assert down.returncode == 0 and "kafka" in down.stdout and "redis" in down.stdout
    st = run_cli("status", "--config", DEMO, env=env, timeout=60)
    assert st.returncode == 1 and st.stdout.count("DOWN") == 2


def test_malformed_config_names_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmatcher:\n  threshold: 0.5\n  treshold: 0.7\n")
    proc = run_cli("status", "--config", str(bad), timeout=60)
    assert proc.returncode == 2
    assert_one_clear_error(proc, f"{bad}:4:", "matcher.treshold", "unknown key")


def test_missing_video_file(tmp_path, kafka_server):
    env = {"REIDSTREAM__BUS__BOOTSTRAP_SERVERS": kafka_server, "REIDSTREAM__METRICS__CAMERA_BASE_PORT": "0"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"cameras:\n  - name: gate\n    source: {tmp_path / 'missing.avi'}\n")
    proc = run_cli("camera", "--config", str(cfg), "--camera", "gate", env=env, timeout=120)
    assert_one_clear_error(proc, "video file not found", "missing.avi")


def test_unreachable_rtsp_url_is_retried_then_fails(tmp_path):
    url = f"rtsp://127.0.0.1:{free_port()}/stream"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"cameras:\n  - name: door\n    source: {url}\n"
                   "    reconnect: {initial_s: 0.1, max_s: 0.2, max_attempts: 2}\n")
    proc = run_cli("camera", "--config", str(cfg), "--camera", "door", timeout=120,
                   env={"REIDSTREAM__METRICS__CAMERA_BASE_PORT": "0"})
    assert_one_clear_error(proc, "cannot open", "after 2 attempt")
    assert "retry 1" in proc.stderr  # the backoff was logged


def test_broker_down():
    env = {"REIDSTREAM__BUS__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "REIDSTREAM__BUS__CONNECT_TIMEOUT_S": "1",
           "REIDSTREAM__METRICS__REID_PORT": "0", "REIDSTREAM__REID__MODEL__PRETRAINED": "false"}
    proc = run_cli("reid", "--config", DEMO, env=env, timeout=120)
    assert_one_clear_error(proc, "Kafka broker", "not reachable")


def test_redis_down():
    env = {"REIDSTREAM__STORE__URL": f"redis://127.0.0.1:{free_port()}/0", "REIDSTREAM__STORE__CONNECT_TIMEOUT_S": "1"}
    proc = run_cli("query", "identities", "--config", DEMO, env=env, timeout=60)
    assert_one_clear_error(proc, "Redis", "not reachable")


def test_a_matcher_whose_index_device_is_missing_says_so_in_one_line(kafka_server, redis_server):
    """``matcher.index.kind: gpu`` on a host with no usable CUDA device: the matcher stops at setup with
    one error line naming the field and the fix, exit 1, and no traceback."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device: the gpu index would start")
    env = {"REIDSTREAM__BUS__BOOTSTRAP_SERVERS": kafka_server, "REIDSTREAM__STORE__URL": redis_server,
           "REIDSTREAM__METRICS__MATCHER_PORT": "0", "REIDSTREAM__MATCHER__INDEX__KIND": "gpu"}
    proc = run_cli("matcher", "--config", DEMO, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert_one_clear_error(proc, "matcher.index.device 'cuda'", "set matcher.index.kind to auto")


def test_unknown_camera(tmp_path):
    proc = run_cli("camera", "--config", DEMO, "--camera", "roof", timeout=60)
    assert proc.returncode == 2
    assert_one_clear_error(proc, "no camera 'roof'", "left")


@pytest.mark.parametrize("fmt", ["json", "table"])
def test_query_empty_store(redis_server, unique, fmt):
    env = {"REIDSTREAM__STORE__URL": redis_server, "REIDSTREAM__STORE__NAMESPACE": f"empty-{unique}"}
    proc = run_cli("query", "links", "--config", DEMO, "--format", fmt, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if fmt == "json":
        assert proc.stdout.strip() == "[]"
    missing = run_cli("query", "tracklet", "nope", "--config", DEMO, env=env, timeout=60)
    assert_one_clear_error(missing, "not linked")
