"""The committed ground truth of ``samples/vtest.avi`` (``tests/data``) parses and is consistent.

``vtest_gt.csv`` must be exactly what ``scripts/build_ground_truth.py`` builds from the committed raw
tracks and labels, every raw track must be labelled, and the boxes must lie in the 768×576 frame.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import yaml

from stages.matcher.evaluation import load_ground_truth

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data"
WIDTH, HEIGHT, FRAMES = 768, 576, 795


def _builder():
    spec = importlib.util.spec_from_file_location("build_ground_truth", ROOT / "scripts" / "build_ground_truth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_ground_truth_parses_and_is_plausible() -> None:
    gt = load_ground_truth(DATA / "vtest_gt.csv")
    assert len(gt.persons) >= 8
    assert min(gt.boxes) >= 0 and max(gt.boxes) < FRAMES
    for frame, (persons, boxes) in gt.boxes.items():
        assert len(set(persons.tolist())) == len(persons)
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, :2] >= -1).all() and (boxes[:, 2] <= WIDTH + 1).all() and (boxes[:, 3] <= HEIGHT + 1).all()
        heights = boxes[:, 3] - boxes[:, 1]
        assert (heights >= 20).all(), f"frame {frame}: a box under 20 px high"


def test_every_person_is_described_and_seen() -> None:
    labels = yaml.safe_load((DATA / "vtest_labels.yaml").read_text())
    described = {int(p) for p in labels["persons"]}
    gt = load_ground_truth(DATA / "vtest_gt.csv")
    assert gt.persons == described
    assert all(str(d).strip() for d in labels["persons"].values())


def test_ground_truth_is_rebuilt_from_tracks_and_labels() -> None:
    b = _builder()
    tracks = b.read_tracks(DATA / "vtest_tracks.csv")
    rows, stats = b.build_ground_truth(tracks, b.read_labels(DATA / "vtest_labels.yaml"))
    with (DATA / "vtest_gt.csv").open() as fh:
        committed = [(int(r["frame"]), int(r["person"]), *(float(r[k]) for k in ("x1", "y1", "x2", "y2")))
                     for r in csv.DictReader(fh)]
    assert [tuple(r) for r in rows] == committed
    assert stats["raw_rows"] == stats["labelled_rows"] + stats["dropped_rows"] + stats["ambiguous_rows"]


def test_builder_refuses_unlabelled_and_contradictory_labels() -> None:
    b = _builder()
    tracks = b.read_tracks(DATA / "vtest_tracks.csv")
    labels = b.read_labels(DATA / "vtest_labels.yaml")
    some_track = labels["segments"][0]["track"]
    missing = dict(labels, segments=[s for s in labels["segments"] if s["track"] != some_track])
    with pytest.raises(ValueError, match=f"track {some_track} frame"):
        b.build_ground_truth(tracks, missing)
    # person 4's long track 77 relabelled as person 3, who is elsewhere on the same frames (track 70)
    merged = dict(labels, segments=[dict(s, person=3) if s["track"] == 77 else s for s in labels["segments"]])
    with pytest.raises(ValueError, match="two separate boxes"):
        b.build_ground_truth(tracks, merged)


@pytest.mark.parametrize("rois", [[(0, 384), (384, 768)], [(0, 256), (256, 512), (512, 768)]])
def test_oracle_links_cut_by_virtual_cameras_score_perfectly(rois) -> None:
    """Tracklets made from the GT itself, cut at the virtual cameras' borders, one id per person.

    Every tracklet must find its person (the cut boxes through the intersection-over-tracklet rule),
    and the pairwise scores, purity and fragmentation must be perfect.
    """
    from stages.matcher.evaluation import LinkedTracklet, evaluate_links

    gt = load_ground_truth(DATA / "vtest_gt.csv")
    runs: dict[tuple[int, str], list[list]] = {}
    for frame in sorted(gt.boxes):
        persons, boxes = gt.boxes[frame]
        for p, b in zip(persons.tolist(), boxes):
            for cam, (lo, hi) in enumerate(rois):
                x1, x2 = max(b[0], lo), min(b[2], hi)
                if x2 - x1 < 0.3 * (b[2] - b[0]):
                    continue
                seg = runs.setdefault((p, str(cam)), [[]])
                if seg[-1] and (frame - seg[-1][-1][0] > 5 or len(seg[-1]) >= 100):
                    seg.append([])
                seg[-1].append((frame, (x1, b[1], x2, b[3])))
    tracklets = []
    for (p, cam), segs in runs.items():
        for seg in segs:
            pick = [seg[i] for i in sorted({round(k * (len(seg) - 1) / 7) for k in range(8)})]
            tracklets.append(LinkedTracklet(f"{cam}-{p}-{seg[0][0]}", cam, f"id{p}", seg[0][0] / 10, seg[-1][0] / 10,
                                            tuple(f for f, _ in pick), tuple(b for _, b in pick)))
    r = evaluate_links(gt, tracklets)
    assert r.matched == r.tracklets and not r.impure
    assert r.cross_camera.fp == 0 and r.cross_camera.fn == 0 and r.cross_camera.tp > 100
    assert r.purity == 1.0 and r.fragmentation == 1.0
    assert r.identity_f1.idp > 0.95
