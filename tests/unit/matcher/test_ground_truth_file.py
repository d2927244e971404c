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
