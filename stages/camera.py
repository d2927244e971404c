"""The per-camera worker: ingest → detect/track → tracklets → Kafka ``tracklets`` topic.

One process per camera (``reidstream camera --config C --camera NAME``). It publishes each closed
tracklet keyed by the camera id, flushes the open ones when the stream ends, and returns a
:class:`CameraSummary` listing what it published (the demo uses it to know when every tracklet has been
matched).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from pipeline import metrics
from pipeline.config import CameraConfig, Config
from pipeline.messages import TrackletRecord, encode
from stages.detect_track import UltralyticsDetectorTracker
from stages.ingest import VideoSource, session_id
from stages.tracklets import TrackletBuilder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CameraSummary:
    """What one camera worker run did."""

    camera: str
    frames: int
    detections: int
    tracklet_ids: tuple[str, ...]
    seconds: float
    unacknowledged: tuple[str, ...] = ()  # tracklet ids the broker never acknowledged
    source_incomplete: bool = False  # a file ended before its declared frame count
    frames_declared: int | None = None  # the file container's frame count, when stated

    def to_json(self) -> dict[str, Any]:
        """The ``--summary`` JSON of this run."""
        return {"camera": self.camera, "frames": self.frames, "detections": self.detections, "seconds": self.seconds,
                "fps": self.fps, "tracklet_ids": list(self.tracklet_ids),
                "unacknowledged": list(self.unacknowledged), "status": self.status,
                "source_incomplete": self.source_incomplete, "frames_declared": self.frames_declared}

    @property
    def status(self) -> str:
        """``ok``, ``undelivered`` (tracklets not acknowledged) or ``source_incomplete``."""
        if self.unacknowledged:
            return "undelivered"
        return "source_incomplete" if self.source_incomplete else "ok"

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class CameraWorker:
    """Chain the camera-side stages for one camera and publish its tracklets.

    Args:
        camera: The camera's config (defaults merged).
        topic: Topic of tracklets.
        publish: Callable ``(topic, key, value_bytes, tracklet_id)`` — a checked Kafka send, or a test sink.
        stop: Event that ends the run (open tracklets are still flushed).
        detector: Optional detector-tracker (built from config when None).
    """

    def __init__(self, camera: CameraConfig, topic: str, publish, stop: threading.Event | None = None,
                 detector: Any | None = None) -> None:
        self.cfg = camera
        self.topic = topic
        self.publish = publish
        self.stop = stop or threading.Event()
        self.source = VideoSource.from_config(camera, self.stop)
        self.detector = detector or UltralyticsDetectorTracker.from_config(camera)
        self.builder: TrackletBuilder | None = None
        self._latency = metrics.STAGE_LATENCY.labels(stage="detect", camera=camera.name)
        self._dets = metrics.DETECTIONS.labels(stage="detect", camera=camera.name)

    def setup(self) -> None:
        """Open the source and load the detector.

        Raises:
            SourceError: The source cannot be opened.
            FileNotFoundError: The detector weights are missing.
        """
        self.source.setup()
        self.detector.setup()
        self.builder = TrackletBuilder.from_config(self.cfg.name, session_id(self.cfg, time.time()),
                                                   self.cfg.tracklets, self.cfg.frame_stride)

    def _emit(self, records: list[TrackletRecord], published: list[str]) -> None:
        for rec in records:
            self.publish(self.topic, self.cfg.name, encode(rec), rec.tracklet_id)
            published.append(rec.tracklet_id)
            log.debug("camera %s: tracklet %s (%s, %d frames)", self.cfg.name, rec.tracklet_id, rec.close_reason,
                      rec.observed_frames, extra={"camera": self.cfg.name})

    def process(self) -> CameraSummary:
        """Run until the stream ends or ``stop`` is set.

        Returns:
            The run's summary.
        """
        if self.builder is None:
            raise RuntimeError("setup() must be called before process()")
        published: list[str] = []
        frames = detections = 0
        t0 = time.perf_counter()
        for frame in self.source:
            t = time.perf_counter()
            dets = self.detector.process(frame)
            closed = self.builder.process(frame, dets)
            self._latency.observe(time.perf_counter() - t)
            self._dets.inc(len(dets))
            frames += 1
            detections += len(dets)
            self._emit(closed, published)
            if frames % 200 == 0:
                log.info("camera %s: %d frames, %d tracklets", self.cfg.name, frames, len(published),
                         extra={"camera": self.cfg.name})
        self._emit(self.builder.flush(), published)
        seconds = time.perf_counter() - t0
        log.info("camera %s: done, %d frames in %.1f s (%.2f fps), %d tracklets", self.cfg.name, frames, seconds,
                 frames / seconds if seconds else 0, len(published), extra={"camera": self.cfg.name})
        return CameraSummary(self.cfg.name, frames, detections, tuple(published), seconds,
                             source_incomplete=self.source.incomplete, frames_declared=self.source.frames_declared)

    def close(self) -> None:
        self.source.close()
        self.detector.close()


def run_camera(cfg: Config, name: str, stop: threading.Event) -> CameraSummary:
    """Run camera ``name`` of ``cfg`` against the configured Kafka.

    Every tracklet's send is checked (:class:`~pipeline.bus.CheckedSender`): a failed send is re-sent
    ``bus.send_retries`` times, then counted (``reidstream_undelivered_total``), logged, and listed in
    the summary's ``unacknowledged``.

    Raises:
        ConfigError: No such camera.
        BusError: The broker is unreachable.
        SourceError: The source cannot be opened.
    """
    from pipeline.bus import CheckedSender, ensure_topics, make_producer

    cam = cfg.camera(name)
    sender: CheckedSender | None = None  # created after setup(): a bad source or missing weights fail first
    undelivered = metrics.UNDELIVERED.labels(stage="camera", camera=name)

    def publish(topic: str, key: str, value: bytes, ident: str = "") -> None:
        sender.send(topic, key.encode("utf-8"), value, ident=ident)

    worker = CameraWorker(cam, cfg.bus.topics.tracklets, publish, stop)
    producer = None
    try:
        worker.setup()
        metrics.serve(cfg.camera_metrics_port(name), cfg.metrics.host)
        ensure_topics(cfg.bus)
        producer = make_producer(cfg.bus, client_id=f"camera-{name}")
        sender = CheckedSender(producer, cfg.bus.send_retries, cfg.bus.delivery_timeout_s,
                               cfg.bus.limits.max_message_bytes, on_failure=lambda _i, _e: undelivered.inc(),
                               context=f"camera {name}")
        summary = worker.process()
        _, failed = sender.finish()
        if failed:
            log.error("camera %s: %d of %d tracklet(s) were not acknowledged by the broker", name, len(failed),
                      len(summary.tracklet_ids), extra={"camera": name})
        return dataclasses.replace(summary, unacknowledged=tuple(failed))
    finally:
        worker.close()
        if producer is not None:
            producer.close(timeout=5)
