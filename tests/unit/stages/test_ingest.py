"""VideoSource on a generated video file and on an unreachable stream."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from pipeline.config import ReconnectConfig
from stages.ingest import Frame, SourceError, VideoSource


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "counting.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (64, 48))
    for i in range(12):
        img = np.zeros((48, 64, 3), np.uint8)
        img[:, :32] = (i * 20, 0, 0)      # left half encodes the frame index in blue
        img[:, 32:] = (0, 0, 250)          # right half red
        writer.write(img)
    writer.release()
    return path


def test_reads_all_frames_with_media_clock(video):
    src = VideoSource("cam", str(video))
    src.setup()
    frames = list(src)
    src.close()
    assert [f.index for f in frames] == list(range(12))
    assert frames[5].timestamp_s == pytest.approx(1.0)  # 5 fps
    assert frames[0].image.shape == (48, 64, 3) and frames[0].image.dtype == np.uint8
    assert src.source_size == (64, 48)


def test_roi_stride_and_max_frames(video):
    src = VideoSource("cam", str(video), roi=(32, 8, 32, 40), frame_stride=3, max_frames=10)
    src.setup()
    frames = list(src)
    src.close()
    assert [f.index for f in frames] == [0, 3, 6, 9]
    f = frames[1]
    assert f.image.shape == (40, 32, 3) and f.offset == (32, 8)
    assert f.image[:, :, 2].mean() > 200 and f.image[:, :, 0].mean() < 40  # only the red half (BGR)


def test_roi_outside_frame_is_an_error(video):
    src = VideoSource("cam", str(video), roi=(40, 0, 64, 48))
    with pytest.raises(SourceError, match="exceeds"):
        src.setup()


def test_missing_file_is_clear_error(tmp_path):
    with pytest.raises(SourceError, match="video file not found"):
        VideoSource("cam", str(tmp_path / "none.avi")).setup()


def test_undecodable_file_is_clear_error(tmp_path):
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video" * 10)
    with pytest.raises(SourceError, match="cannot decode"):
        VideoSource("cam", str(bad)).setup()


def test_unreachable_stream_retries_with_backoff_then_fails():
    from pipeline import metrics
    from pipeline.services import free_port

    url = f"rtsp://127.0.0.1:{free_port()}/nothing"
    counter = metrics.RECONNECTS.labels(stage="ingest", camera="net")
    before = counter._value.get()
    src = VideoSource("net", url, reconnect=ReconnectConfig(initial_s=0.1, max_s=0.2, max_attempts=3))
    t = time.monotonic()
    with pytest.raises(SourceError, match="after 3 attempt"):
        src.setup()
    assert counter._value.get() == before + 3
    assert time.monotonic() - t >= 0.1 + 0.2  # waited between attempts


def test_frame_validates_image():
    with pytest.raises(ValueError, match="uint8"):
        Frame("c", 0, 0.0, np.zeros((4, 4), np.uint8), (0, 0), (4, 4))


def test_start_frame_seeks_and_keeps_file_indices(video):
    src = VideoSource("cam", str(video), start_frame=4, max_frames=3)
    src.setup()
    frames = list(src)
    src.close()
    assert [f.index for f in frames] == [4, 5, 6]
    assert frames[0].timestamp_s == pytest.approx(0.8)
    assert frames[0].image[:, :32, 0].mean() == pytest.approx(80, abs=6)  # blue = 20 * index
