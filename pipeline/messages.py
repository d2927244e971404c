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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TRACKLET_SCHEMA = "reidstream.tracklet.v1"
EMBEDDING_SCHEMA = "reidstream.embedding.v1"

Box = Annotated[list[float], Field(min_length=4, max_length=4)]


class MessageError(ValueError):
    """A message could not be decoded or failed validation (a poison message)."""


_WIRE = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")


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
    def _crops(self) -> TrackletRecord:
        if len(self.crops_jpeg) != len(self.frames):
            raise ValueError(f"{len(self.crops_jpeg)} crops for {len(self.frames)} frames")
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
    def _vector(self) -> EmbeddingRecord:
        if len(self.embedding_f32) == 0 or len(self.embedding_f32) % 4:
            raise ValueError(f"embedding_f32 has {len(self.embedding_f32)} bytes, not a float32 vector")
        vec = np.frombuffer(self.embedding_f32, dtype="<f4")
        if not np.all(np.isfinite(vec)):
            raise ValueError("embedding has non-finite values")
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


def decode(value: bytes, expected: type[_Record] | None = None) -> Any:
    """Parse a wire message back into its record.

    Args:
        value: Kafka message value.
        expected: Record class the caller accepts; ``None`` accepts any known schema.

    Returns:
        The validated record.

    Raises:
        MessageError: Not JSON, an unknown or unexpected ``schema``, or invalid fields; the message
            says which.
    """
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise MessageError(f"not a JSON record: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageError(f"not a JSON object: {type(obj).__name__}")
    schema = obj.get("schema")
    cls = _BY_SCHEMA.get(schema) if isinstance(schema, str) else None
    if cls is None:
        raise MessageError(f"unknown schema {schema!r}; known: {sorted(_BY_SCHEMA)}")
    if expected is not None and cls is not expected:
        raise MessageError(f"expected {expected.__name__}, got schema {schema!r}")
    try:
        return cls.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MessageError(f"invalid {schema}: {where}: {first['msg']} ({exc.error_count()} error(s))") from None
