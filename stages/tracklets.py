"""Cut tracklets: a track's sampled person crops plus boxes and timestamps.

:class:`TrackletBuilder` follows every track id of one camera. While a track lives it keeps a bounded,
evenly thinned sample of its observations (never more than ``2 T`` crops in memory, whatever the
track's length: when the buffer fills, every other sample is dropped and the sampling stride doubles).
A tracklet is closed when

* its track has not been seen for ``lost_frames`` processed frames (``close_reason="lost"``),
* it spans ``max_length`` source frames (``"max_length"``; a still-visible track starts a new
  tracklet), or
* the stream ends (``"end_of_stream"``, via :meth:`TrackletBuilder.flush`).

On closing, ``T = crops`` samples evenly spread over the kept ones become the tracklet; tracks seen in
fewer than ``min_length`` frames are dropped, and so are tracks whose box centre never moved
``min_motion_px`` pixels from its first position (static clutter such as a coat on the grass that the
detector takes for a person; off by default). Crops are resized to ``crop_height × crop_width`` and
JPEG-encoded from the BGR frame.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from pipeline import metrics
from pipeline.config import TrackletConfig
from pipeline.messages import TrackletRecord
from stages.detect_track import TrackedDetections
from stages.ingest import Frame

log = logging.getLogger(__name__)

STAGE = "tracklets"


@dataclasses.dataclass
class _Sample:
    frame: int
    ts: float
    box: list[float]
    jpeg: bytes


@dataclasses.dataclass
class _Track:
    track_id: int
    first_frame: int
    start_s: float
    last_frame: int
    last_s: float
    centre0: tuple[float, float] = (0.0, 0.0)
    max_motion: float = 0.0
    observed: int = 0
    stride: int = 1
    samples: list[_Sample] = dataclasses.field(default_factory=list)


def evenly_spaced(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices into ``range(n)``, evenly spread, first and last included.

    Raises:
        ValueError: ``n`` or ``k`` is negative.
    """
    if n < 0 or k < 0:
        raise ValueError(f"n and k must be >= 0, got {n}, {k}")
    if n <= k:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


class TrackletBuilder:
    """Turn per-frame tracked detections of one camera into closed :class:`TrackletRecord` s.

    Args:
        camera: Camera id.
        session: Session id (see :func:`stages.ingest.session_id`), part of each tracklet id.
        crops: T, crops per tracklet.
        min_length: Minimum observed frames of a published tracklet.
        lost_frames: Processed frames without the track before it is closed.
        max_length: Longest span in source frames.
        crop_size: ``(height, width)`` of the crops, pixels.
        jpeg_quality: JPEG quality, 10–100.
        min_box_height: Boxes lower than this (pixels) are ignored.
        min_motion_px: Drop tracks whose box centre never moved this far (pixels); 0 disables.
        frame_stride: The source's frame stride (to count lost frames in processed frames).
        clock: Callable returning Unix seconds (for ``closed_wall_s``).
    """

    def __init__(self, camera: str, session: str, crops: int = 8, min_length: int = 8, lost_frames: int = 15,
                 max_length: int = 300, crop_size: tuple[int, int] = (256, 128), jpeg_quality: int = 90,
                 min_box_height: int = 24, min_motion_px: float = 0.0, frame_stride: int = 1,
                 clock=time.time) -> None:
        if crops < 1 or min_length < 1 or lost_frames < 1 or max_length < 2:
            raise ValueError("crops, min_length, lost_frames must be >= 1 and max_length >= 2")
        self.camera = camera
        self.session = session
        self.crops = crops
        self.min_length = min_length
        self.lost_frames = lost_frames
        self.max_length = max_length
        self.crop_size = crop_size
        self.jpeg_quality = jpeg_quality
        self.min_box_height = min_box_height
        self.min_motion_px = min_motion_px
        self.frame_stride = frame_stride
        self.clock = clock
        self.active: dict[int, _Track] = {}
        self._published = metrics.TRACKLETS.labels(stage=STAGE, camera=camera, outcome="published")
        self._too_short = metrics.TRACKLETS.labels(stage=STAGE, camera=camera, outcome="too_short")
        self._static = metrics.TRACKLETS.labels(stage=STAGE, camera=camera, outcome="static")

    @classmethod
    def from_config(cls, camera: str, session: str, cfg: TrackletConfig, frame_stride: int = 1) -> TrackletBuilder:
        return cls(camera, session, cfg.crops, cfg.min_length, cfg.lost_frames, cfg.max_length,
                   (cfg.crop_height, cfg.crop_width), cfg.jpeg_quality, cfg.min_box_height, cfg.min_motion_px,
                   frame_stride)

    # ---------------------------------------------------------------------------------------------
    def _crop(self, image: np.ndarray, roi_box: np.ndarray) -> bytes | None:
        import cv2

        h, w = image.shape[:2]
        x1, y1, x2, y2 = roi_box
        x1, y1 = max(int(x1), 0), max(int(y1), 0)
        x2, y2 = min(int(round(x2)), w), min(int(round(y2)), h)
        if x2 - x1 < 2 or y2 - y1 < self.min_box_height:
            return None
        crop = cv2.resize(image[y1:y2, x1:x2], (self.crop_size[1], self.crop_size[0]), interpolation=cv2.INTER_LINEAR)
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        return buf.tobytes() if ok else None

    def process(self, frame: Frame, dets: TrackedDetections) -> list[TrackletRecord]:
        """Add one frame's detections; return the tracklets this frame closes.

        Raises:
            ValueError: Frames are not in increasing index order.
        """
        closed: list[TrackletRecord] = []
        for i in range(len(dets)):
            tid = int(dets.track_ids[i])
            box = dets.boxes[i]
            if box[3] - box[1] < self.min_box_height:
                continue
            track = self.active.get(tid)
            if track is not None and frame.index <= track.last_frame:
                raise ValueError(f"camera {self.camera}: frame {frame.index} after {track.last_frame}: frames out of order")
            if track is not None and frame.index - track.first_frame + 1 > self.max_length:
                closed.extend(self._close(track, "max_length"))
                track = None
            centre = (float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2)
            if track is None:
                track = self.active[tid] = _Track(tid, frame.index, frame.timestamp_s, frame.index, frame.timestamp_s,
                                                  centre0=centre)
            track.max_motion = max(track.max_motion, float(np.hypot(centre[0] - track.centre0[0],
                                                                    centre[1] - track.centre0[1])))
            track.last_frame, track.last_s = frame.index, frame.timestamp_s
            track.observed += 1
            if (track.observed - 1) % track.stride == 0:
                jpeg = self._crop(frame.image, dets.roi_boxes[i])
                if jpeg is not None:
                    track.samples.append(_Sample(frame.index, frame.timestamp_s, [float(v) for v in box], jpeg))
                    if len(track.samples) >= 2 * self.crops:
                        track.samples = track.samples[::2]
                        track.stride *= 2
        lost_after = self.lost_frames * self.frame_stride
        for tid in [t for t, tr in self.active.items() if frame.index - tr.last_frame > lost_after]:
            closed.extend(self._close(self.active[tid], "lost"))
        return closed

    def flush(self) -> list[TrackletRecord]:
        """Close every open tracklet (end of stream)."""
        out: list[TrackletRecord] = []
        for track in list(self.active.values()):
            out.extend(self._close(track, "end_of_stream"))
        return out

    def _close(self, track: _Track, reason: str) -> list[TrackletRecord]:
        self.active.pop(track.track_id, None)
        if track.observed < self.min_length or not track.samples:
            self._too_short.inc()
            return []
        if track.max_motion < self.min_motion_px:
            self._static.inc()
            log.debug("camera %s: track %d dropped as static (moved %.1f px)", self.camera, track.track_id,
                      track.max_motion, extra={"camera": self.camera})
            return []
        picks = [track.samples[i] for i in evenly_spaced(len(track.samples), self.crops)]
        record = TrackletRecord(
            tracklet_id=f"{self.camera}-{self.session}-{track.track_id}-{track.first_frame}",
            camera=self.camera, track_id=track.track_id,
            frames=[s.frame for s in picks], timestamps_s=[s.ts for s in picks], boxes=[s.box for s in picks],
            start_s=track.start_s, end_s=track.last_s, observed_frames=track.observed,
            closed_wall_s=self.clock(), close_reason=reason,
            crops_jpeg=[s.jpeg for s in picks], crop_size=self.crop_size,
        )
        self._published.inc()
        return [record]
