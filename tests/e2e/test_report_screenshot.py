"""The demo report rendered by a real browser (headless Chromium) looks like a report, not a blank page."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest

from pipeline.report import write_report

WIDTH, HEIGHT = 1200, 1600
# One saturated BGR colour per identity, so its crops can be found in the screenshot.
COLOURS = {
    "g-0001": (0, 0, 230),  # red
    "g-0002": (0, 200, 0),  # green
    "g-0003": (230, 0, 0),  # blue
    "g-0004": (200, 0, 200),  # magenta
}


def _crop_jpeg(colour: tuple[int, int, int], seed: int) -> bytes:
    """A 128x64 (H x W) BGR 'person crop': a coloured body on a grey background, JPEG-encoded."""
    image = np.full((128, 64, 3), 90, np.uint8)
    top = 8 + seed % 10
    cv2.rectangle(image, (10, top), (54, 120), colour, thickness=-1)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _synthetic_run():
    """Identities, links and thumbnails of a small 3-camera run (g-0002 lacks one thumbnail)."""
    plan = {  # global_id -> [(camera, start_s, end_s, score)]
        "g-0001": [("left", 1.0, 4.5, None), ("left", 12.0, 15.0, 0.91), ("right", 6.0, 9.0, 0.84)],
        "g-0002": [("left", 2.0, 3.0, None), ("right", 7.5, 11.0, 0.77), ("lobby", 20.0, 26.0, 0.72)],
        "g-0003": [("right", 30.0, 33.0, None)],
        "g-0004": [("lobby", 5.0, 8.0, None), ("lobby", 40.0, 41.5, 0.88)],
    }
    identities, links, thumbnails = [], [], {}
    n = 0
    for gid, tracklets in plan.items():
        ids = []
        for camera, start, end, score in tracklets:
            n += 1
            tid = f"{camera}-{n}"
            ids.append(tid)
            links.append({
                "tracklet_id": tid, "camera": camera, "track_id": n, "global_id": gid, "score": score,
                "start_s": start, "end_s": end, "frames": [int(start * 10), int(end * 10)],
                "boxes": [[10.0, 20.0, 74.0, 148.0], [12.0, 22.0, 76.0, 150.0]],
            })
            if not (gid == "g-0002" and camera == "lobby"):
                thumbnails[tid] = _crop_jpeg(COLOURS[gid], n)
        identities.append({
            "global_id": gid,
            "cameras": sorted({c for c, *_ in tracklets}),
            "tracklets": ids,
            "first_seen_s": min(s for _, s, _, _ in tracklets),
            "last_seen_s": max(e for _, _, e, _ in tracklets),
            "n_tracklets": len(ids),
        })
    return identities, links, thumbnails


class _Structure(HTMLParser):
    """Records identity sections and, per section, the camera rows."""

    def __init__(self):
        super().__init__()
        self.sections: list[str] = []
        self.rows: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "identity" in classes:
            self.sections.append(attrs["data-global-id"])
        elif tag == "div" and "camera-row" in classes:
            self.rows.append((self.sections[-1], attrs["data-camera"]))


def _screenshot(html_path, png_path, profile_dir, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    """Render ``html_path`` with headless Chromium into ``png_path``; kills its process group on timeout."""
    args = [
        shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--user-data-dir={profile_dir}", f"--screenshot={png_path}", f"--window-size={WIDTH},{HEIGHT}",
        html_path.resolve().as_uri(),
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"chromium did not finish within {timeout_s} s")
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def _colour_mask(image: np.ndarray, bgr: tuple[int, int, int], tol: int = 45) -> np.ndarray:
    return np.all(np.abs(image.astype(np.int16) - np.array(bgr, np.int16)) <= tol, axis=2)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("report")
    identities, links, thumbnails = _synthetic_run()
    html_path = write_report(tmp / "report.html", identities, links, thumbnails, title="reidstream e2e")
    png_path = tmp / "report.png"
    result = _screenshot(html_path, png_path, tmp / "chromium-profile")
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return identities, links, html_path, png_path


def test_screenshot_is_a_rendered_page(rendered):
    _, _, _, png_path = rendered
    assert png_path.is_file() and png_path.stat().st_size > 0
    image = cv2.imread(str(png_path), cv2.IMREAD_COLOR)
    assert image is not None, "not a decodable PNG"
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert float(image.std()) > 10.0, "blank page"
    # The inlined JPEG crops were decoded and drawn: every identity's colour is on screen, in report
    # order (more cameras first: g-0002 with 3, g-0001 with 2, then by first_seen_s: g-0004 before g-0003,
    # which lies below the 1600 px fold).
    tops = {}
    for gid in ("g-0002", "g-0001", "g-0004"):
        mask = _colour_mask(image, COLOURS[gid])
        assert mask.sum() > 2000, f"crops of {gid} not visible ({int(mask.sum())} px)"
        tops[gid] = int(np.argwhere(mask)[:, 0].min())
    assert tops["g-0002"] < tops["g-0001"] < tops["g-0004"], tops


def test_html_has_one_section_per_identity_and_one_row_per_camera(rendered):
    identities, links, html_path, _ = rendered
    page = html_path.read_text(encoding="utf-8")
    structure = _Structure()
    structure.feed(page)
    assert sorted(structure.sections) == sorted(i["global_id"] for i in identities)
    assert len(structure.rows) == len(set(structure.rows))
    assert set(structure.rows) == {(link["global_id"], link["camera"]) for link in links}
    assert structure.sections == ["g-0002", "g-0001", "g-0004", "g-0003"]
    assert page.count('class="placeholder"') == 1  # the one tracklet without a thumbnail
    assert page.count("data:image/jpeg;base64,") == len(links) - 1
    assert "http://" not in page and "https://" not in page


def test_report_command_on_a_live_store_renders_timelines(store, tmp_path):
    """`reidstream report` on a store filled through the matcher's write path, rendered by Chromium."""
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium)")
    from tests.conftest import ROOT, run_cli
    from tests.operator_seed import near, seed_store, unit

    identities, links, thumbnails = _synthetic_run()
    plan = {i["global_id"]: [(lk["tracklet_id"], lk["camera"], lk["start_s"], lk["end_s"])
                             for lk in links if lk["global_id"] == i["global_id"]] for i in identities}
    vectors = {lk["tracklet_id"]: near(unit(k), k) for k, lk in enumerate(links)}
    gids = seed_store(store, plan, vectors, thumbnails)
    port = store.r.connection_pool.connection_kwargs["port"]
    env = {"REIDSTREAM__STORE__URL": f"redis://127.0.0.1:{port}/0", "REIDSTREAM__STORE__NAMESPACE": store.ns}
    html_path = tmp_path / "report.html"
    proc = run_cli("report", "--output", str(html_path), "--config", str(ROOT / "configs" / "demo.yaml"),
                   env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    page = html_path.read_text(encoding="utf-8")
    assert page.count('class="timeline"') == len(identities) and page.count('class="bar"') == len(links)
    assert "http://" not in page and "https://" not in page
    png_path = tmp_path / "report.png"
    result = _screenshot(html_path, png_path, tmp_path / "chromium-profile")
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    image = cv2.imread(str(png_path), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (HEIGHT, WIDTH, 3)
    assert float(image.std()) > 10.0, "blank page"
    # crops of the two identities with three and two cameras, and the second lane's timeline bars
    for name in ("g-0002", "g-0001"):
        assert _colour_mask(image, COLOURS[name]).sum() > 2000, f"crops of {gids[name]} not visible"
    assert _colour_mask(image, (0x2F, 0x81, 0xE1), tol=12).sum() > 200, "no timeline bar drawn"
