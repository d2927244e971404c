"""The re-id stage: embed tracklets from every camera in batches and publish the embeddings.

``reidstream reid --config C`` consumes the ``tracklets`` topic in a consumer group (so several
re-id workers share the partitions), decodes each tracklet's JPEG crops, samples T of them evenly,
runs the configured network (STA by default) on up to ``reid.batch.max_tracklets`` tracklets per
forward pass, and publishes an :class:`~pipeline.messages.EmbeddingRecord` per tracklet to the
``embeddings`` topic, keyed by the camera's **zone** (``zones`` in the config; ``default`` for cameras
no zone lists). The producer's partitioner hashes the key with murmur2 (as the Java client does), so
all of a zone's embeddings land in one partition, in order, and the matcher instance that owns that
partition sees the whole zone (see :mod:`stages.matcher.zones`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline import metrics
from pipeline.config import DEFAULT_ZONE, Config, ReidConfig
from pipeline.messages import EmbeddingRecord, TrackletRecord, encode
from pipeline.runner import Output

log = logging.getLogger(__name__)

STAGE = "reid"


def preprocess(crops_jpeg: list[bytes], seq_len: int, input_size: tuple[int, int], mean: tuple[float, ...],
               std: tuple[float, ...], flow: str | None = None) -> np.ndarray:
    """Decode and normalise one tracklet's crops into the network input.

    The T crops are picked with the ``evenly`` sampling of training and evaluation
    (:func:`stages.reid.clips.sample_indices`), repeating crops when there are fewer than T.

    Args:
        crops_jpeg: JPEG crops (BGR-encoded by OpenCV), in time order; at least one.
        seq_len: T.
        input_size: ``(height, width)`` pixels.
        mean: RGB mean for inputs in [0, 1].
        std: RGB std for inputs in [0, 1].
        flow: None (default), ``"farneback"`` or ``"dis"``: append two optical-flow channels between
            consecutive sampled crops (:func:`stages.reid.models.flow.clip_flow`), for RCN with ``flow``.

    Returns:
        ``float32 [T, 3, H, W]``, RGB, ``(x / 255 - mean) / std``; ``[T, 5, H, W]`` with ``flow``.

    Raises:
        ValueError: No crops, a crop is not a decodable image, or an unknown ``flow``.
    """
    import cv2

    from stages.reid.clips import sample_indices

    h, w = input_size
    out = np.empty((seq_len, 3, h, w), np.float32)
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    decoded: dict[int, np.ndarray] = {}
    images: dict[int, np.ndarray] = {}
    order = sample_indices(len(crops_jpeg), seq_len, "evenly").tolist()
    for j, i in enumerate(order):
        if i not in decoded:
            img = cv2.imdecode(np.frombuffer(crops_jpeg[i], np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"crop {i} is not a decodable JPEG")
            if img.shape[:2] != (h, w):
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
            images[i] = img
            rgb = img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0
            decoded[i] = (rgb - m) / s
        out[j] = decoded[i]
    if flow is not None:
        from stages.reid.models.flow import append_flow

        return append_flow(out, [images[i] for i in order], flow)
    return out


def load_model(cfg: ReidConfig) -> tuple[Any, str]:
    """Build the configured network, from its checkpoint when one is set.

    Returns:
        ``(model in eval mode, description such as "sta/mobilenet_v2")``.

    Raises:
        CheckpointError: The checkpoint disagrees with ``cfg.model`` (network, T, input size).
        ValueError: Unknown network name.
        WeightsUnavailableError: Pretrained backbone weights are missing.
    """
    m = cfg.model
    size = (m.input_height, m.input_width)
    if m.checkpoint is not None:
        from stages.reid.checkpoint import load_for_inference

        model, ckpt = load_for_inference(m.checkpoint, m.type, m.seq_len, size)
        return model, f"{m.type}/{ckpt['config'].get('backbone', '?')}@{m.checkpoint.name}"
    from stages.reid.models import build_model

    model = build_model(m.type, backbone=m.backbone, pretrained=m.pretrained, **m.options)
    return model.eval(), f"{m.type}/{m.backbone}{'' if m.pretrained else '-random'}"


class ReidStage:
    """Embed batches of tracklets.

    Args:
        engine: An engine from :mod:`stages.reid.engines` (``setup/infer/close``).
        model_name: Description stored in each embedding record.
        seq_len: T.
        input_size: ``(height, width)``.
        mean: Normalisation mean (RGB, [0, 1] scale).
        std: Normalisation std.
        output_topic: Topic of embeddings.
        max_batch: Tracklets per forward pass at most.
        clock: Unix-seconds clock.
        flow: Optical-flow channels for the network (``model.config["flow"]`` of RCN), or None.
        blurrer: A :class:`stages.reid.faces.FaceBlurrer` applied to each stored thumbnail, or None.
        zones: Camera name → zone name; an embedding's Kafka key is its camera's zone (cameras not in
            the mapping, and every camera when it is None, are in zone ``default``).
    """

    def __init__(self, engine: Any, model_name: str, seq_len: int, input_size: tuple[int, int],
                 mean: tuple[float, ...], std: tuple[float, ...], output_topic: str, max_batch: int = 8,
                 clock=time.time, flow: str | None = None, blurrer: Any | None = None,
                 zones: Mapping[str, str] | None = None) -> None:
        self.blurrer = blurrer
        self.zones = dict(zones or {})
        self.engine = engine
        self.model_name = model_name
        self.seq_len = seq_len
        self.input_size = input_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.output_topic = output_topic
        self.max_batch = max_batch
        self.clock = clock
        self.flow = flow
        self._batch_size = metrics.REID_BATCH_SIZE.labels(stage=STAGE)

    @classmethod
    def from_config(cls, cfg: Config) -> ReidStage:
        from stages.reid.engines import build_engine

        r = cfg.reid
        model, name = load_model(r)
        size = (r.model.input_height, r.model.input_width)
        engine = build_engine(r.engine, model, r.model.seq_len, size, r.batch.max_tracklets)
        blurrer = None
        if r.blur_faces:
            from stages.reid.faces import FaceBlurrer

            blurrer = FaceBlurrer(threshold=r.face_threshold, threads=max(r.engine.threads, 1))
        return cls(engine, name, r.model.seq_len, size, model.mean, model.std, cfg.bus.topics.embeddings,
                   r.batch.max_tracklets, flow=getattr(model, "config", {}).get("flow"), blurrer=blurrer,
                   zones=cfg.camera_zones())

    def setup(self) -> None:
        """Load the engine (and the face detector when blurring).

        Raises:
            EngineError: The engine cannot be built.
            FaceModelUnavailableError: Blurring is on but its model is not installed.
        """
        self.engine.setup()
        if self.blurrer is not None:
            self.blurrer.setup()

    def embed(self, records: list[TrackletRecord]) -> np.ndarray:
        """Embeddings ``float32 [N, D]`` (L2-normalised) of ``records``, in batches of ``max_batch``.

        Raises:
            ValueError: A record's crops cannot be decoded.
        """
        out = []
        for start in range(0, len(records), self.max_batch):
            chunk = records[start:start + self.max_batch]
            clips = np.stack([preprocess(r.crops_jpeg, self.seq_len, self.input_size, self.mean, self.std,
                                         self.flow) for r in chunk])
            t = time.perf_counter()
            emb = self.engine.infer(clips)
            per_item = (time.perf_counter() - t) / len(chunk)
            self._batch_size.observe(len(chunk))
            for r in chunk:
                metrics.STAGE_LATENCY.labels(stage=STAGE, camera=r.camera).observe(per_item)
            out.append(emb)
        return np.concatenate(out, axis=0).astype(np.float32)

    def process(self, records: list[TrackletRecord]) -> list[Output]:
        """Embed ``records`` and return one ``embeddings`` message per tracklet (same order), keyed by
        the camera's zone.

        Raises:
            ValueError: A record's crops cannot be decoded, or the network returned a zero or non-finite
                embedding (the runner dead-letters the tracklet).
        """
        if not records:
            return []
        vectors = self.embed(records)
        now = self.clock()
        outputs = []
        # re-normalise in float32: an FP16 engine's rows can miss unit norm by more than the wire tolerance
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
        vectors = (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        for rec, vec in zip(records, vectors):
            thumb = rec.crops_jpeg[len(rec.crops_jpeg) // 2]
            if self.blurrer is not None:  # raises for an undecodable crop: never store it unblurred
                thumb = self.blurrer.blur_jpeg(thumb)
            emb = EmbeddingRecord.from_tracklet(rec.meta(), vec, self.model_name, thumb, now)
            outputs.append(Output(self.output_topic, self.zones.get(rec.camera, DEFAULT_ZONE), encode(emb)))
            metrics.EMBEDDINGS.labels(stage=STAGE, camera=rec.camera).inc()
        return outputs

    def close(self) -> None:
        self.engine.close()
        if self.blurrer is not None:
            self.blurrer.close()


def run_reid(cfg: Config, stop: threading.Event, idle_exit_s: float | None = None,
             on_ready: Any = None) -> Any:
    """Run the re-id stage against the configured Kafka until stopped.

    Raises:
        BusError: The broker is unreachable.
        CheckpointError, WeightsUnavailableError, EngineError: The model or engine cannot be loaded.
    """
    from pipeline.bus import check_broker
    from pipeline.runner import run_consuming_stage

    check_broker(cfg.bus)
    metrics.serve(cfg.metrics.reid_port, cfg.metrics.host)
    stage = ReidStage.from_config(cfg)
    batch = cfg.reid.batch
    return run_consuming_stage(cfg.bus, stage, STAGE, cfg.bus.topics.tracklets, cfg.reid.group_id, TrackletRecord,
                               batch.max_tracklets, batch.max_wait_ms, stop, idle_exit_s, on_ready=on_ready)
