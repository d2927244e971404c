"""Typed, validated records passed between stages, and their versioned wire format.

Wire format (schema version 1): one Kafka message value is a UTF-8 JSON object whose ``schema`` field
names the record type and version (``reidstream.tracklet.v1``, ``reidstream.embedding.v1``); binary
fields (JPEG crops, the float32 embedding) are base64 strings. Messages are keyed by camera id so
one camera's records stay ordered in one partition.

Conventions (see docs/ARCHITECTURE.md): boxes are ``[x1, y1, x2, y2]`` in source-video pixels;
``*_s`` are seconds — stream times (``timestamps_s``, ``start_s``, ``end_s``) on the camera's clock,
``closed_wall_s`` on the worker's Unix clock; crops are JPEG files encoded from **BGR** ``uint8`` images
by OpenCV (decode with ``cv2.imdecode`` to get BGR back).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from pipeline.config import LimitsConfig

TRACKLET_SCHEMA = "reidstream.tracklet.v1"
EMBEDDING_SCHEMA = "reidstream.embedding.v1"
JPEG_MAGIC = b"\xff\xd8"  # JPEG start-of-image marker

Box = Annotated[list[float], Field(min_length=4, max_length=4)]
DEFAULT_LIMITS = LimitsConfig()


class MessageError(ValueError):
    """A message could not be decoded or failed validation (a poison message).

    Attributes:
        kind: What was wrong, for metrics: ``oversized``, ``not_json``, ``schema``, ``invalid``, or
            ``embedding`` (a vector that is zero, not unit-norm, non-finite or of the wrong dimension).
    """

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def _limits(info: ValidationInfo | None) -> LimitsConfig:
    ctx = info.context if info is not None else None
    lim = ctx.get("limits") if isinstance(ctx, dict) else None
    return lim if isinstance(lim, LimitsConfig) else DEFAULT_LIMITS


def _check_jpeg(data: bytes, what: str, limits: LimitsConfig) -> None:
    if len(data) > limits.max_crop_kb * 1024:
        raise ValueError(f"{what} has {len(data)} bytes, over the limit of {limits.max_crop_kb} KiB")
    if not data.startswith(JPEG_MAGIC):
        raise ValueError(f"{what} is not a JPEG (no start-of-image marker)")


def check_embedding(vec: np.ndarray, limits: LimitsConfig = DEFAULT_LIMITS) -> None:
    """Reject an embedding that cannot be a model's L2-normalised output.

    Args:
        vec: ``float32 [D]``.
        limits: Dimension bounds and the norm tolerance.

    Raises:
        ValueError: Empty, over ``max_embedding_dim`` or not ``embedding_dim``, non-finite, zero, or an L2
            norm outside ``1 ± norm_tolerance``; the message starts with ``embedding``.
    """
    d = int(vec.shape[0])
    if d == 0 or d > limits.max_embedding_dim:
        raise ValueError(f"embedding dimension {d} is outside 1..{limits.max_embedding_dim}")
    if limits.embedding_dim is not None and d != limits.embedding_dim:
        raise ValueError(f"embedding dimension {d} differs from the configured {limits.embedding_dim}")
    if not np.all(np.isfinite(vec)):
        raise ValueError("embedding has non-finite values")
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    if norm == 0.0:
        raise ValueError("embedding is the zero vector")
    if abs(norm - 1.0) > limits.norm_tolerance:
        raise ValueError(f"embedding has L2 norm {norm:.6g}, not 1 within {limits.norm_tolerance:g} "
                         f"(embeddings must be L2-normalised)")


_WIRE = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64", allow_inf_nan=False)


class _Record(BaseModel):
    model_config = _WIRE


class TrackletMeta(_Record):
    """What a tracklet is, without its pixels: shared by tracklet and embedding records."""

    tracklet_id: str = Field(..., min_length=1, description="Unique, deterministic id: camera, session, track, first frame.")
    camera: str = Field(..., min_length=1, description="Camera id.")
    track_id: int = Field(..., ge=0, description="Tracker id, unique within one camera session.")
    frames: list[int] = Field(..., min_length=1, description="Source-video frame index of each crop.")
    timestamps_s: list[float] = Field(..., min_length=1, description="Stream time of each crop, seconds.")
    boxes: list[Box] = Field(..., min_length=1, description="[x1, y1, x2, y2] of each crop, source pixels.")
    start_s: float = Field(..., description="Stream time the track was first seen, seconds.")
    end_s: float = Field(..., description="Stream time the track was last seen, seconds.")
    observed_frames: int = Field(..., ge=1, description="Frames in which the tracker saw the track.")
    closed_wall_s: float = Field(..., description="Unix time the worker closed the tracklet, seconds.")
    close_reason: Literal["lost", "max_length", "end_of_stream"] = Field(..., description="Why it was closed.")

    @model_validator(mode="after")
    def _consistent(self) -> TrackletMeta:
        n = len(self.frames)
        if len(self.timestamps_s) != n or len(self.boxes) != n:
            raise ValueError(
                f"frames ({n}), timestamps_s ({len(self.timestamps_s)}) and boxes ({len(self.boxes)}) differ in length"
            )
        if self.end_s < self.start_s:
            raise ValueError(f"end_s ({self.end_s}) < start_s ({self.start_s})")
        for box in self.boxes:
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"box {box} is not [x1, y1, x2, y2] with x2 > x1 and y2 > y1")
        return self

    def meta(self) -> TrackletMeta:
        """This record's :class:`TrackletMeta` fields only."""
        return TrackletMeta(**{k: getattr(self, k) for k in TrackletMeta.model_fields})


class TrackletRecord(TrackletMeta):
    """A closed tracklet: up to T sampled person crops of one track plus their boxes and times."""

    schema_: Literal["reidstream.tracklet.v1"] = Field(TRACKLET_SCHEMA, alias="schema")
    crops_jpeg: list[bytes] = Field(..., min_length=1, description="JPEG crops (BGR-encoded), one per frame.")
    crop_size: tuple[int, int] = Field(..., description="(height, width) of every crop, pixels.")
    model_config = ConfigDict(**_WIRE, populate_by_name=True)

    @model_validator(mode="after")
    def _crops(self, info: ValidationInfo) -> TrackletRecord:
        if len(self.crops_jpeg) != len(self.frames):
            raise ValueError(f"{len(self.crops_jpeg)} crops for {len(self.frames)} frames")
        limits = _limits(info)
        if len(self.crops_jpeg) > limits.max_crops:
            raise ValueError(f"{len(self.crops_jpeg)} crops, over the limit of {limits.max_crops}")
        for i, crop in enumerate(self.crops_jpeg):
            _check_jpeg(crop, f"crop {i}", limits)
        return self


class EmbeddingRecord(TrackletMeta):
    """A tracklet's appearance embedding: float32 ``[D]``, L2-normalised."""

    schema_: Literal["reidstream.embedding.v1"] = Field(EMBEDDING_SCHEMA, alias="schema")
    embedding_f32: bytes = Field(..., description="Little-endian float32 vector, L2-normalised.")
    model: str = Field(..., description="Network and weights that produced it, e.g. 'sta/mobilenet_v2'.")
    thumbnail_jpeg: bytes | None = Field(None, description="One JPEG crop (BGR-encoded) for reports.")
    embedded_wall_s: float = Field(..., description="Unix time the embedding was computed, seconds.")
    model_config = ConfigDict(**_WIRE, populate_by_name=True)

    @model_validator(mode="after")
    def _vector(self, info: ValidationInfo) -> EmbeddingRecord:
        limits = _limits(info)
        if len(self.embedding_f32) == 0 or len(self.embedding_f32) % 4:
            raise ValueError(f"embedding_f32 has {len(self.embedding_f32)} bytes, not a float32 vector")
        if len(self.embedding_f32) > 4 * limits.max_embedding_dim:
            raise ValueError(f"embedding dimension {len(self.embedding_f32) // 4} is outside 1..{limits.max_embedding_dim}")
        check_embedding(np.frombuffer(self.embedding_f32, dtype="<f4"), limits)
        if self.thumbnail_jpeg is not None:
            _check_jpeg(self.thumbnail_jpeg, "thumbnail", limits)
        return self

    @property
    def vector(self) -> np.ndarray:
        """The embedding as ``float32 [D]`` (read-only view)."""
        return np.frombuffer(self.embedding_f32, dtype="<f4")

    @classmethod
    def from_tracklet(
        cls, meta: TrackletMeta, vector: np.ndarray, model: str, thumbnail: bytes | None, wall_s: float
    ) -> EmbeddingRecord:
        """Build the record for ``meta`` with ``vector`` (``float32 [D]``).

        Raises:
            ValueError: ``vector`` is not 1-D.
        """
        vec = np.asarray(vector, dtype="<f4")
        if vec.ndim != 1:
            raise ValueError(f"vector must be 1-D float32 [D], got shape {vec.shape}")
        fields = {k: getattr(meta, k) for k in TrackletMeta.model_fields}
        return cls(**fields, embedding_f32=vec.tobytes(), model=model, thumbnail_jpeg=thumbnail, embedded_wall_s=wall_s)


_BY_SCHEMA: dict[str, type[_Record]] = {TRACKLET_SCHEMA: TrackletRecord, EMBEDDING_SCHEMA: EmbeddingRecord}


def encode(record: TrackletRecord | EmbeddingRecord) -> bytes:
    """Serialise a record to its wire form (UTF-8 JSON, binary fields base64)."""
    return record.model_dump_json(by_alias=True).encode("utf-8")


def decode(value: bytes | None, expected: type[_Record] | None = None, limits: LimitsConfig | None = None) -> Any:
    """Parse a wire message back into its record, within ``limits``.

    Args:
        value: Kafka message value.
        expected: Record class the caller accepts; ``None`` accepts any known schema.
        limits: Size and embedding bounds (message bytes, crops, crop bytes, dimension, norm); ``None``
            uses the defaults of :class:`~pipeline.config.LimitsConfig`.

    Returns:
        The validated record.

    Raises:
        MessageError: Oversized, not JSON, an unknown or unexpected ``schema``, or invalid fields
            (including embedding hygiene); the message says which and ``kind`` classifies it.
    """
    limits = limits or DEFAULT_LIMITS
    if value is None:
        raise MessageError("empty message (no value)", "not_json")
    if len(value) > limits.max_message_bytes:
        raise MessageError(f"oversized: {len(value)} bytes, over the limit of {limits.max_message_mb:g} MiB",
                           "oversized")
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, RecursionError) as exc:
        raise MessageError(f"not a JSON record: {type(exc).__name__}: {str(exc)[:200]}", "not_json") from None
    if not isinstance(obj, dict):
        raise MessageError(f"not a JSON object: {type(obj).__name__}", "not_json")
    schema = obj.get("schema")
    cls = _BY_SCHEMA.get(schema) if isinstance(schema, str) else None
    if cls is None:
        shown = repr(schema)[:100]
        raise MessageError(f"unknown schema {shown}; known: {sorted(_BY_SCHEMA)}", "schema")
    if expected is not None and cls is not expected:
        raise MessageError(f"expected {expected.__name__}, got schema {schema!r}", "schema")
    try:
        return cls.model_validate_json(value, context={"limits": limits})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"])[:300]
        kind = "embedding" if "embedding" in msg else "invalid"
        raise MessageError(f"invalid {schema}: {where}: {msg} ({exc.error_count()} error(s))", kind) from None
