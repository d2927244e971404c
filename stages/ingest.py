"""Ingest: read frames from a video file, an RTSP/HTTP stream or a device with OpenCV.

A :class:`VideoSource` yields :class:`Frame` records of one camera. An optional region of interest
``roi = [x, y, w, h]`` (source pixels) crops every frame, so one video can serve as several
non-overlapping virtual cameras; boxes found in the crop are shifted back by ``Frame.offset``.

Network sources that fail to open or stop delivering frames are reopened with doubling backoff
(``reconnect.initial_s`` … ``reconnect.max_s``); after ``reconnect.max_attempts`` failures in a row
a :class:`SourceError` is raised. Files are not retried: a missing or unreadable file is an error
at once, and the end of a file ends the stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline import metrics
from pipeline.config import CameraConfig, ReconnectConfig, source_kind

log = logging.getLogger(__name__)

STAGE = "ingest"


class SourceError(RuntimeError):
    """A video source cannot be opened or read (after the configured retries for streams)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Frame:
    """One frame of one camera.

    Attributes:
        camera: Camera id.
        index: Frame index in the source (0-based; counts every decoded frame, also skipped ones).
        timestamp_s: Stream time, seconds (media clock for files, Unix time for streams; see config).
        image: ``uint8 [H, W, 3]`` **BGR**, C-contiguous: the ROI of the source frame.
        offset: ``(x, y)`` of the ROI's top-left corner in source pixels.
        source_size: ``(width, height)`` of the full source frame, pixels.
    """

    camera: str
    index: int
    timestamp_s: float
    image: np.ndarray
    offset: tuple[int, int]
    source_size: tuple[int, int]

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(
                f"Frame.image must be uint8 [H, W, 3] BGR, got {getattr(img, 'dtype', type(img))} "
                f"{getattr(img, 'shape', '')}"
            )


def session_id(camera: CameraConfig, started_wall_s: float) -> str:
    """A short id distinguishing runs of one camera, part of every tracklet id.

    Files get a deterministic id (name, size, ROI, stride), so replaying a file reproduces the same
    tracklet ids and the matcher ignores the replay; streams get their start time.
    """
    if not camera.is_file:
        return format(int(started_wall_s * 1000), "x")
    path = Path(camera.source.removeprefix("file://"))
    size = path.stat().st_size if path.exists() else 0
    key = f"{path.name}|{size}|{camera.roi}|{camera.frame_stride}"
    return hashlib.sha1(key.encode()).hexdigest()[:8]


class VideoSource:
    """Frames of one camera from OpenCV, with ROI cropping, frame striding and reconnects.

    Args:
        camera: Camera id (logs, metrics, records).
        source: File path, ``rtsp://``/``http(s)://`` URL, or a device index (``"0"``).
        roi: ``(x, y, w, h)`` source pixels, or None for the whole frame.
        frame_stride: Deliver every n-th decoded frame.
        max_frames: Stop after reading this many frames (None: until the end/forever).
        start_frame: Files only: seek to this frame first; indices and media times keep counting from
            the start of the file.
        clock: ``media`` (seconds from start, from frame index and fps), ``wall`` (Unix time of
            capture), or ``auto`` (media for files, wall for streams).
        realtime: Pace a file at its frame rate.
        reconnect: Backoff policy for network sources.
        stop: Event that ends the stream early.

    Example:
        >>> src = VideoSource("left", "samples/vtest.avi", roi=(0, 0, 384, 576))  # doctest: +SKIP
        >>> src.setup(); frame = src.process(); src.close()                       # doctest: +SKIP
    """

    def __init__(self, camera: str, source: str, roi: tuple[int, int, int, int] | None = None,
                 frame_stride: int = 1, max_frames: int | None = None, clock: str = "auto",
                 realtime: bool = False, reconnect: ReconnectConfig | None = None,
                 stop: threading.Event | None = None, start_frame: int = 0) -> None:
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        self.camera = camera
        self.source = source
        self.roi = roi
        self.frame_stride = frame_stride
        self.max_frames = max_frames
        self.start_frame = start_frame
        self.kind = source_kind(source)
        self.clock = ("media" if self.kind == "file" else "wall") if clock == "auto" else clock
        self.realtime = realtime
        self.reconnect = reconnect or ReconnectConfig()
        self.stop = stop or threading.Event()
        self.fps = 0.0
        self.source_size = (0, 0)
        self.frames_declared: int | None = None  # files: the container's frame count, when it states one
        self.incomplete = False  # files: ended before frames_declared (truncated or corrupt)
        self._cap = None
        self._index = -1
        self._read = 0
        self._t0_wall = 0.0
        self._up = metrics.SOURCE_UP.labels(stage=STAGE, camera=camera)
        self._frames = metrics.FRAMES.labels(stage=STAGE, camera=camera)

    @classmethod
    def from_config(cls, cam: CameraConfig, stop: threading.Event | None = None) -> VideoSource:
        return cls(cam.name, cam.source, cam.roi, cam.frame_stride, cam.max_frames, cam.clock, cam.realtime,
                   cam.reconnect, stop, cam.start_frame)

    # ---------------------------------------------------------------------------------------------
    def _open_once(self):
        import cv2

        if self.kind == "device":
            cap = cv2.VideoCapture(int(self.source))
        elif self.kind == "network":
            cap = cv2.VideoCapture(self.source, cv2.CAP_FFMPEG)
        else:
            cap = cv2.VideoCapture(self.source.removeprefix("file://"))
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def setup(self) -> None:
        """Open the source (with retries for streams).

        Raises:
            SourceError: A file is missing or undecodable; a stream failed ``max_attempts`` times.
        """
        if self.kind == "file":
            path = Path(self.source.removeprefix("file://"))
            if not path.is_file():
                raise SourceError(f"camera {self.camera}: video file not found: {path}")
            if not os.access(path, os.R_OK):
                raise SourceError(f"camera {self.camera}: video file not readable: {path}")
            self._cap = self._open_once()
            if self._cap is None:
                raise SourceError(f"camera {self.camera}: OpenCV cannot decode {path}")
            if self.start_frame:
                import cv2

                self._cap.set(cv2.CAP_PROP_POS_FRAMES, self.start_frame)
                self._index = int(self._cap.get(cv2.CAP_PROP_POS_FRAMES)) - 1
        else:
            self._cap = self._reopen()
        self._read_properties()
        self._t0_wall = time.time()

    def _read_properties(self) -> None:
        import cv2

        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0 < fps < 1000 else 25.0
        w = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        h = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.source_size = (w, h)
        if self.kind == "file":
            declared = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            self.frames_declared = declared if declared > 0 else None
        if self.roi is not None and w and h:
            x, y, rw, rh = self.roi
            if x + rw > w or y + rh > h:
                raise SourceError(f"camera {self.camera}: roi {list(self.roi)} exceeds the {w}x{h} frame")
        self._up.set(1)
        log.info("camera %s: opened %s (%dx%d @ %.2f fps, clock=%s)", self.camera, self.source, w, h, self.fps,
                 self.clock, extra={"camera": self.camera})

    def _reopen(self):
        delay = self.reconnect.initial_s
        attempts = 0
        while not self.stop.is_set():
            cap = self._open_once()
            if cap is not None:
                return cap
            attempts += 1
            self._up.set(0)
            metrics.RECONNECTS.labels(stage=STAGE, camera=self.camera).inc()
            if self.reconnect.max_attempts is not None and attempts >= self.reconnect.max_attempts:
                raise SourceError(f"camera {self.camera}: cannot open {self.source} after {attempts} attempt(s)")
            log.warning("camera %s: cannot open %s, retry %d in %.1f s", self.camera, self.source, attempts, delay,
                        extra={"camera": self.camera})
            self.stop.wait(delay)
            delay = min(delay * 2, self.reconnect.max_s)
        raise SourceError(f"camera {self.camera}: stopped while connecting to {self.source}")

    # ---------------------------------------------------------------------------------------------
    def process(self) -> Frame | None:
        """Read the next delivered frame.

        Returns:
            The next :class:`Frame`, or None at the end of a file, after ``max_frames``, or on stop. A
            file that ends before the frame count its container declares sets :attr:`incomplete`, logs
            a warning and counts ``reidstream_source_incomplete_total``.

        Raises:
            SourceError: A stream could not be reopened within ``reconnect.max_attempts``.
        """
        if self._cap is None:
            raise SourceError(f"camera {self.camera}: process() before setup()")
        while not self.stop.is_set():
            if self.max_frames is not None and self._read >= self.max_frames:
                return None
            ok, image = self._cap.read()
            if not ok or image is None:
                if self.kind == "file":
                    self._up.set(0)
                    self._check_complete()
                    return None
                log.warning("camera %s: stream stopped delivering frames, reconnecting", self.camera,
                            extra={"camera": self.camera})
                self._cap.release()
                self._cap = self._reopen()
                self._read_properties()
                continue
            self._index += 1
            self._read += 1
            self._frames.inc()
            if (self._index - self.start_frame) % self.frame_stride:
                continue
            if self.clock == "media":
                ts = self._index / self.fps
                if self.realtime:
                    lag = self._t0_wall + (self._index - self.start_frame) / self.fps - time.time()
                    if lag > 0:
                        self.stop.wait(lag)
            else:
                ts = time.time()
            x, y = 0, 0
            if self.roi is not None:
                x, y, w, h = self.roi
                image = image[y:y + h, x:x + w]
            return Frame(self.camera, self._index, ts, np.ascontiguousarray(image), (x, y),
                         (image.shape[1], image.shape[0]) if self.source_size == (0, 0) else self.source_size)
        return None

    def _check_complete(self) -> None:
        """At the end of a file: flag it incomplete when fewer frames decoded than the container declared."""
        decoded = self._index + 1  # frames up to the last one decoded (seeked-over ones included)
        if self.incomplete or self.frames_declared is None or decoded >= self.frames_declared:
            return
        self.incomplete = True
        metrics.SOURCE_INCOMPLETE.labels(stage=STAGE, camera=self.camera).inc()
        log.warning("camera %s: %s ended after %d of the %d frames its container declares: truncated or "
                    "corrupt file", self.camera, self.source, decoded, self.frames_declared,
                    extra={"camera": self.camera})

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.process()) is not None:
            yield frame

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._up.set(0)
