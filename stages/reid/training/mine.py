"""Mine person tracklets from the configured cameras into tracklet folders (``reidstream mine``).

Each selected camera runs the camera side of the pipeline (:class:`stages.camera.CameraWorker`:
ingest → detection + tracking → tracklets), one camera after the other, without Kafka: the worker's
``publish`` callback decodes each :class:`~pipeline.messages.TrackletRecord` and writes it with
:func:`stages.reid.training.datasets.tracklets.write_tracklet_folder` as ``OUTPUT/<tracklet_id>/`` (``meta.json``
+ ``000.jpg``...; crops decoded from the record's JPEG and re-encoded at quality 95, **BGR**). No
``pid`` is written, so each tracklet is its own pseudo-identity for the ``tracklets`` data set loader
(``load_dataset("tracklets:OUTPUT")``, held-out protocol ``"halves"``).

Tracklet ids of file sources are deterministic (camera, file, ROI, stride, track, first frame), so
mining the same file again into the same folder (``append=True``) skips the tracklets already there.

Example:
    >>> from pipeline.config import load_config
    >>> summary = mine(load_config("configs/demo.yaml"), "runs/mined", max_frames=200)  # doctest: +SKIP
    >>> summary.tracklets  # doctest: +SKIP
    23
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import CameraConfig, Config

log = logging.getLogger(__name__)

__all__ = ["CameraMining", "MineProgress", "MineSummary", "TrackletFolderSink", "camera_frame_total", "mine"]

TOPIC = "mined-tracklets"
"""Topic name passed to the worker (nothing is published to Kafka)."""


@dataclass(frozen=True)
class CameraMining:
    """What mining one camera produced.

    Attributes:
        camera: Camera name.
        frames: Frames processed (after ``frame_stride``).
        detections: Tracked person detections.
        tracklets: Tracklet folders written.
        skipped: Tracklets already present in the output (``append``), not rewritten.
        crops: Crops written.
        seconds: Wall time of the camera's run.
    """

    camera: str
    frames: int
    detections: int
    tracklets: int
    skipped: int
    crops: int
    seconds: float


@dataclass(frozen=True)
class MineSummary:
    """What :func:`mine` did.

    Attributes:
        output_dir: The tracklet folder root.
        cameras: One entry per mined camera, in order.
        seconds: Total wall time.
    """

    output_dir: Path
    cameras: tuple[CameraMining, ...]
    seconds: float

    @property
    def tracklets(self) -> int:
        """Tracklet folders written by this run."""
        return sum(c.tracklets for c in self.cameras)

    @property
    def crops(self) -> int:
        """Crops written by this run."""
        return sum(c.crops for c in self.cameras)


class MineProgress(Protocol):
    """Callbacks of a front end (the CLI's progress bar)."""

    def start_camera(self, camera: str, total_frames: int | None) -> None: ...

    def frame(self, camera: str, frames: int, tracklets: int) -> None: ...

    def end_camera(self, result: CameraMining) -> None: ...


class TrackletFolderSink:
    """A ``publish(topic, key, value)`` callable that writes tracklet records as folders.

    Args:
        output_dir: Root of the tracklet folders.
        skip_existing: Skip (and count) tracklets whose folder already has a ``meta.json``;
            otherwise such a tracklet raises ``FileExistsError``.

    Attributes:
        written: Tracklet folders written.
        skipped: Tracklets skipped because their folder existed.
        crops: Crops written.
    """

    def __init__(self, output_dir: Path, skip_existing: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.skip_existing = skip_existing
        self.written = 0
        self.skipped = 0
        self.crops = 0

    def __call__(self, topic: str, key: str, value: bytes, _tracklet_id: str = "") -> None:
        """Decode one wire-format tracklet record and write its folder.

        Raises:
            MessageError: ``value`` is not a valid tracklet record.
            ValueError: A crop is not a decodable JPEG.
            FileExistsError: The folder exists and ``skip_existing`` is False.
        """
        import cv2

        from pipeline.messages import TrackletRecord, decode
        from stages.reid.training.datasets.tracklets import META_FILE, write_tracklet_folder

        rec: TrackletRecord = decode(value, TrackletRecord)
        if self.skip_existing and (self.output_dir / rec.tracklet_id / META_FILE).exists():
            self.skipped += 1
            return
        crops = []
        for i, jpeg in enumerate(rec.crops_jpeg):
            image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"tracklet {rec.tracklet_id}: crop {i} is not a decodable JPEG")
            crops.append(image)
        write_tracklet_folder(self.output_dir, rec.tracklet_id, rec.camera, rec.track_id, rec.frames,
                              rec.timestamps_s, rec.boxes, crops)
        self.written += 1
        self.crops += len(crops)


class _CountingDetector:
    """Wrap a detector-tracker to report every processed frame (progress), nothing else changed."""

    def __init__(self, inner: Any, on_frame: Callable[[], None]) -> None:
        self.inner = inner
        self.on_frame = on_frame

    def setup(self) -> None:
        self.inner.setup()

    def process(self, frame: Any) -> Any:
        detections = self.inner.process(frame)
        self.on_frame()
        return detections

    def close(self) -> None:
        self.inner.close()


def camera_frame_total(cam: CameraConfig) -> int | None:
    """Frames the camera will deliver (file sources), or None when unknown (streams, devices).

    Uses OpenCV's frame count, ``start_frame``, ``max_frames`` (source frames read) and
    ``frame_stride``.
    """
    if not cam.is_file:
        return cam.max_frames and math.ceil(cam.max_frames / cam.frame_stride)
    import cv2

    cap = cv2.VideoCapture(cam.source.removeprefix("file://"))
    try:
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    finally:
        cap.release()
    if count <= 0:
        return None
    readable = max(0, count - cam.start_frame)
    if cam.max_frames is not None:
        readable = min(readable, cam.max_frames)
    return math.ceil(readable / cam.frame_stride)


def _existing_tracklets(output_dir: Path) -> int:
    if not output_dir.is_dir():
        return 0
    return sum(1 for p in output_dir.iterdir() if (p / "meta.json").is_file())


def mine(
    cfg: Config,
    output_dir: str | Path,
    *,
    cameras: Sequence[str] | None = None,
    max_frames: int | None = None,
    crops: int | None = None,
    append: bool = False,
    progress: MineProgress | None = None,
    stop: threading.Event | None = None,
    detector_factory: Callable[[CameraConfig], Any] | None = None,
) -> MineSummary:
    """Run ingest + detection + tracking over cameras and write their tracklets as folders.

    Args:
        cfg: Pipeline config (cameras with their detector, tracker and tracklet settings).
        output_dir: Root of the tracklet folders (created).
        cameras: Camera names to mine, in order (None: all configured cameras).
        max_frames: Override of each camera's ``max_frames`` (source frames read).
        crops: Override of ``tracklets.crops`` (T crops kept per tracklet, 1..64); more crops give
            longer mined tracklets.
        append: Allow an output directory that already holds tracklet folders (tracklets already
            there are skipped). Without it such a directory is an error.
        progress: Receiver of progress events, or None.
        stop: Event that ends the current camera early (its open tracklets are still written) and
            skips the remaining ones.
        detector_factory: Builds a camera's detector-tracker (default: from config, Ultralytics).

    Returns:
        :class:`MineSummary`.

    Raises:
        ConfigError: An unknown camera name.
        ValueError: ``max_frames < 1`` or ``crops`` outside 1..64.
        FileExistsError: ``output_dir`` holds tracklet folders and ``append`` is False.
        SourceError: A video cannot be opened.
        FileNotFoundError: Detector weights are missing.
    """
    from stages.camera import CameraWorker

    output_dir = Path(output_dir)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if crops is not None and not 1 <= crops <= 64:
        raise ValueError(f"crops must be in 1..64, got {crops}")
    existing = _existing_tracklets(output_dir)
    if existing and not append:
        raise FileExistsError(f"{output_dir} already holds {existing} tracklet folders; mine into a new directory "
                              "or pass --append")
    selected = [cfg.camera(name) for name in cameras] if cameras else list(cfg.cameras)
    if not selected:
        raise ValueError(f"{cfg.source_path or 'config'}: no cameras configured")
    output_dir.mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    if detector_factory is None:
        from stages.detect_track import UltralyticsDetectorTracker

        detector_factory = UltralyticsDetectorTracker.from_config

    t0 = time.perf_counter()
    results: list[CameraMining] = []
    for cam in selected:
        if stop.is_set():
            break
        update: dict[str, Any] = {}
        if max_frames is not None:
            update["max_frames"] = max_frames
        if crops is not None:
            update["tracklets"] = cam.tracklets.model_copy(update={"crops": crops})
        cam = cam.model_copy(update=update) if update else cam
        sink = TrackletFolderSink(output_dir, skip_existing=append)
        frames = [0]

        def on_frame(name: str = cam.name, sink: TrackletFolderSink = sink, frames: list[int] = frames) -> None:
            frames[0] += 1
            if progress is not None:
                progress.frame(name, frames[0], sink.written)

        if progress is not None:
            progress.start_camera(cam.name, camera_frame_total(cam))
        worker = CameraWorker(cam, TOPIC, sink, stop, detector=_CountingDetector(detector_factory(cam), on_frame))
        try:
            worker.setup()
            run = worker.process()
        finally:
            worker.close()
        result = CameraMining(cam.name, run.frames, run.detections, sink.written, sink.skipped, sink.crops,
                              run.seconds)
        log.info("mine: camera %s: %d frames, %d detections, %d tracklets written (%d skipped), %.1f s",
                 cam.name, run.frames, run.detections, sink.written, sink.skipped, run.seconds,
                 extra={"camera": cam.name})
        results.append(result)
        if progress is not None:
            progress.end_camera(result)
    return MineSummary(output_dir, tuple(results), time.perf_counter() - t0)
