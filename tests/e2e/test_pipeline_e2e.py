"""End to end: the demo over 28 s of the sample video, on a real Tansu and Redis.

Camera workers, the re-id stage and the matcher run as separate processes exactly as
``reidstream demo`` runs them, with the demo's defaults (zero-shot part pooling, the label-free
threshold and re-association); the stretch (frames 380–659) ends with people walking from one half of
the picture into the other (50–62 s). The links are scored against the hand-checked ground truth of
``tests/data/vtest_gt.csv`` (docs/GROUND_TRUTH.md): a cross-camera pairwise F1 floor, and the same
final identities from a second fresh run whose cameras race differently.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

START, FRAMES = 380, 280


@pytest.fixture(scope="module")
def demo_env(kafka_server, redis_server, tmp_path_factory):
    import uuid

    u = uuid.uuid4().hex[:8]
    return {
        "REIDSTREAM__BUS__BOOTSTRAP_SERVERS": kafka_server,
        "REIDSTREAM__BUS__TOPICS__TRACKLETS": f"tracklets-{u}",
        "REIDSTREAM__BUS__TOPICS__EMBEDDINGS": f"embeddings-{u}",
        "REIDSTREAM__BUS__TOPICS__DEAD_LETTER": f"dead-{u}",
        "REIDSTREAM__STORE__URL": redis_server,
        "REIDSTREAM__STORE__NAMESPACE": f"e2e-{u}",
        "REIDSTREAM__REID__GROUP_ID": f"reid-{u}",
        "REIDSTREAM__MATCHER__GROUP_ID": f"matcher-{u}",
        "REIDSTREAM__METRICS__CAMERA_BASE_PORT": "0",
        "REIDSTREAM__METRICS__REID_PORT": "0",
        "REIDSTREAM__METRICS__MATCHER_PORT": "0",
        "REIDSTREAM__DEFAULTS__START_FRAME": str(START),
        "REIDSTREAM__DEFAULTS__MAX_FRAMES": str(FRAMES),
        "REIDSTREAM__SERVICES__DATA_DIR": str(tmp_path_factory.mktemp("services")),
    }


@pytest.fixture(scope="module")
def demo_run(demo_env, tmp_path_factory, sample_video):
    out = tmp_path_factory.mktemp("demo")
    proc = run_cli("demo", "--config", str(ROOT / "configs" / "demo.yaml"), "--output", str(out), "--fresh",
                   env=demo_env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_identities_linked_across_the_two_cameras(demo_run):
    out, proc = demo_run
    links = json.loads((out / "links.json").read_text())
    identities = json.loads((out / "identities.json").read_text())
    assert len(links) >= 4
    cross = [i for i in identities if set(i["cameras"]) == {"left", "right"}]
    assert cross, f"no identity spans both cameras: {identities}"
    assert "span several cameras" in proc.stdout
    by_id = {lk["tracklet_id"]: lk for lk in links}
    for ident in cross:  # its tracklets really come from both cameras
        assert {by_id[t]["camera"] for t in ident["tracklets"] if t in by_id} == {"left", "right"}
    assert sum(i["n_tracklets"] for i in identities) == len(links)


def test_links_json_has_source_coordinates_and_frames(demo_run):
    out, _ = demo_run
    for lk in json.loads((out / "links.json").read_text()):
        assert set(lk) == {"tracklet_id", "camera", "track_id", "global_id", "score", "start_s", "end_s",
                           "frames", "boxes"}
        assert 1 <= len(lk["frames"]) <= 8 and len(lk["boxes"]) == len(lk["frames"])
        assert all(START <= f < START + FRAMES for f in lk["frames"])
        assert lk["start_s"] <= lk["end_s"] and lk["start_s"] >= START / 10.0 - 1e-6
        boxes = np.array(lk["boxes"])
        x_lo, x_hi = (0, 384) if lk["camera"] == "left" else (384, 768)  # ROI offset applied
        assert boxes[:, 0].min() >= x_lo - 1 and boxes[:, 2].max() <= x_hi + 1
        assert (boxes[:, 3] <= 577).all() and (boxes[:, 2] > boxes[:, 0]).all()
        assert lk["score"] is None or -1 <= lk["score"] <= 1


def test_query_cli_agrees_with_links_json(demo_run, demo_env):
    out, _ = demo_run
    proc = run_cli("query", "links", "--config", str(ROOT / "configs" / "demo.yaml"), "--format", "json",
                   env=demo_env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    queried = sorted(json.loads(proc.stdout), key=lambda r: r["tracklet_id"])
    written = sorted(json.loads((out / "links.json").read_text()), key=lambda r: r["tracklet_id"])
    assert queried == written
    ids = run_cli("query", "identities", "--config", str(ROOT / "configs" / "demo.yaml"), "--format", "json",
                  "--min-cameras", "2", env=demo_env, timeout=60)
    assert {i["global_id"] for i in json.loads(ids.stdout)} == {
        i["global_id"] for i in json.loads((out / "identities.json").read_text()) if len(i["cameras"]) >= 2}


def test_report_screenshot_shows_crops_grouped_by_identity(demo_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed")
    out, _ = demo_run
    html = (out / "report.html").read_text()
    identities = json.loads((out / "identities.json").read_text())
    assert html.count("data:image/jpeg;base64,") >= len(json.loads((out / "links.json").read_text()))
    assert all(i["global_id"] in html for i in identities)
    png = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,1600", (out / "report.html").as_uri()], capture_output=True, timeout=120)
    import cv2

    img = cv2.imread(str(png))
    assert img is not None and img.shape[:2] == (1600, 1200)
    assert img.std() > 20  # crops and text, not a blank page


def test_running_again_gives_the_same_identities(demo_run, demo_env, tmp_path):
    out, _ = demo_run
    proc = run_cli("demo", "--config", str(ROOT / "configs" / "demo.yaml"), "--output", str(tmp_path), env=demo_env,
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "links.json").read_text()) == json.loads((out / "links.json").read_text())
    assert json.loads((tmp_path / "identities.json").read_text()) == json.loads((out / "identities.json").read_text())


def _partition(links: list[dict]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for lk in links:
        groups.setdefault(lk["global_id"], []).append(lk["tracklet_id"])
    return sorted(sorted(g) for g in groups.values())


def test_cross_camera_f1_against_the_ground_truth(demo_run):
    from stages.matcher.evaluation import evaluate_links, load_ground_truth, load_links

    out, _ = demo_run
    report = evaluate_links(load_ground_truth(ROOT / "tests" / "data" / "vtest_gt.csv"), load_links(out / "links.json"))
    cross = report.as_dict()["cross_camera"]
    # The stretch has 14 true cross-camera pairs, so one borderline merge moves F1 by about 0.15: the
    # floor guards against a regression to the old online matcher (F1 0.02 on the whole clip), not a
    # figure (measured: 0.48 live; 0.64 on the same stretch mined offline; 0.91 on the whole clip).
    assert cross["tp"] + cross["fn"] >= 5, cross
    assert cross["tp"] >= 3 and cross["f1"] >= 0.35, cross
    assert cross["precision"] >= 0.6, cross


def test_a_second_fresh_run_ends_with_the_same_identities(demo_run, demo_env, tmp_path):
    out, _ = demo_run
    env = {**demo_env, "REIDSTREAM__STORE__NAMESPACE": demo_env["REIDSTREAM__STORE__NAMESPACE"] + "-again",
           "REIDSTREAM__REID__GROUP_ID": demo_env["REIDSTREAM__REID__GROUP_ID"] + "-again",
           "REIDSTREAM__MATCHER__GROUP_ID": demo_env["REIDSTREAM__MATCHER__GROUP_ID"] + "-again"}
    for topic in ("TRACKLETS", "EMBEDDINGS", "DEAD_LETTER"):
        env[f"REIDSTREAM__BUS__TOPICS__{topic}"] = demo_env[f"REIDSTREAM__BUS__TOPICS__{topic}"] + "-again"
    proc = run_cli("demo", "--config", str(ROOT / "configs" / "demo.yaml"), "--output", str(tmp_path), "--fresh",
                   env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "links.json").read_text())
    again = json.loads((tmp_path / "links.json").read_text())
    assert {lk["tracklet_id"] for lk in again} == {lk["tracklet_id"] for lk in first}
    assert _partition(again) == _partition(first)
