"""TrackletBuilder on synthetic frames and detections."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stages.detect_track import TrackedDetections
from stages.ingest import Frame
from stages.tracklets import TrackletBuilder, evenly_spaced


def frame(i: int, offset=(100, 0)) -> Frame:
    img = np.full((120, 80, 3), (i * 3) % 255, np.uint8)
    img[:, :, 2] = 200  # red in BGR
    return Frame("cam", i, i / 10.0, img, offset, (400, 120))


def dets(*tracks: tuple[int, float]) -> TrackedDetections:
    """Tracks as (id, x1 in ROI pixels); every box is 20 x 60 pixels."""
    roi = np.array([[x, 10, x + 20, 70] for _, x in tracks], np.float32).reshape(-1, 4)
    return TrackedDetections(roi + np.array([100, 0, 100, 0], np.float32), roi,
                             np.array([t for t, _ in tracks], np.int64), np.full(len(tracks), 0.9, np.float32),
                             np.zeros(len(tracks), np.int64))


def run(builder, n_frames, tracks_at):
    closed = []
    for i in range(n_frames):
        closed += builder.process(frame(i), dets(*tracks_at(i)))
    return closed


def test_evenly_spaced():
    assert evenly_spaced(3, 8) == [0, 1, 2]
    assert evenly_spaced(9, 3) == [0, 4, 8]
    assert evenly_spaced(10, 1) == [5]
    with pytest.raises(ValueError):
        evenly_spaced(-1, 2)


def test_lost_track_closes_with_t_crops_in_source_pixels():
    b = TrackletBuilder("cam", "s1", crops=4, min_length=3, lost_frames=2, crop_size=(64, 32), min_box_height=10)
    closed = run(b, 20, lambda i: [(7, 5.0 + i)] if i < 12 else [])
    assert len(closed) == 1
    t = closed[0]
    assert t.close_reason == "lost" and t.track_id == 7 and t.observed_frames == 12
    assert t.tracklet_id == "cam-s1-7-0"
    assert len(t.frames) == 4 and t.frames[0] == 0 and t.frames == sorted(t.frames)
    assert t.start_s == 0.0 and t.end_s == pytest.approx(1.1)
    # boxes shifted by the ROI offset (x + 100), and matching the frame they were cut from
    for f, box in zip(t.frames, t.boxes):
        assert box == pytest.approx([105.0 + f, 10, 125.0 + f, 70])
    crop = cv2.imdecode(np.frombuffer(t.crops_jpeg[0], np.uint8), cv2.IMREAD_COLOR)
    assert crop.shape == (64, 32, 3) and crop[:, :, 2].mean() > 150  # BGR red channel survived


def test_closed_after_exactly_lost_frames():
    b = TrackletBuilder("cam", "s", crops=2, min_length=1, lost_frames=3)
    seen = lambda i: [(1, 10.0)] if i < 5 else []  # noqa: E731 - last seen at frame 4
    assert run(b, 8, seen) == []  # frames 5..7: unseen for 3 frames, not yet more than 3
    assert len(b.process(frame(8), dets())) == 1


def test_short_tracks_dropped_and_counted():
    from pipeline import metrics

    before = metrics.TRACKLETS.labels(stage="tracklets", camera="cam", outcome="too_short")._value.get()
    b = TrackletBuilder("cam", "s", crops=4, min_length=5, lost_frames=1)
    assert run(b, 10, lambda i: [(3, 1.0)] if i < 3 else []) == []
    after = metrics.TRACKLETS.labels(stage="tracklets", camera="cam", outcome="too_short")._value.get()
    assert after == before + 1


def test_max_length_splits_and_memory_is_bounded():
    b = TrackletBuilder("cam", "s", crops=4, min_length=2, lost_frames=5, max_length=50)
    closed = []
    for i in range(120):
        closed += b.process(frame(i), dets((9, 1.0 + (i % 30))))
        assert all(len(t.samples) < 2 * 4 for t in b.active.values())
    closed += b.flush()
    assert [t.close_reason for t in closed] == ["max_length", "max_length", "end_of_stream"]
    assert [t.frames[0] for t in closed] == [0, 50, 100]
    assert len({t.tracklet_id for t in closed}) == 3
    first = closed[0].frames
    assert len(first) == 4 and first[0] == 0 and first[-1] >= 40  # spread over the whole life


def test_two_tracks_and_small_boxes_ignored():
    b = TrackletBuilder("cam", "s", crops=2, min_length=2, lost_frames=1, min_box_height=100)
    assert run(b, 6, lambda i: [(1, 0.0), (2, 40.0)]) == [] and b.active == {}  # 60 px boxes < 100 px


def test_out_of_order_frames_rejected():
    b = TrackletBuilder("cam", "s", crops=2, min_length=1)
    b.process(frame(5), dets((1, 0.0)))
    with pytest.raises(ValueError, match="out of order"):
        b.process(frame(5), dets((1, 0.0)))


def test_static_boxes_dropped_when_motion_filter_on():
    from pipeline import metrics

    static = metrics.TRACKLETS.labels(stage="tracklets", camera="cam", outcome="static")
    before = static._value.get()
    b = TrackletBuilder("cam", "s", crops=2, min_length=2, lost_frames=1, min_motion_px=15)
    moving_and_still = lambda i: [(1, 2.0 + i), (2, 30.0 + (i % 2))]  # noqa: E731 - track 2 jitters 1 px
    closed = run(b, 20, moving_and_still) + b.flush()
    assert [t.track_id for t in closed] == [1]
    assert static._value.get() == before + 1
