"""Wire records: round trip, validation, and poison messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.messages import EmbeddingRecord, MessageError, TrackletRecord, decode, encode


def make_tracklet(**over):
    fields = dict(tracklet_id="cam-s-1-0", camera="cam", track_id=1, frames=[0, 5], timestamps_s=[0.0, 0.5],
                  boxes=[[1, 2, 11, 42], [3, 2, 13, 42]], start_s=0.0, end_s=0.5, observed_frames=6,
                  closed_wall_s=1.7e9, close_reason="lost", crops_jpeg=[b"\xff\xd8one", b"\xff\xd8two"],
                  crop_size=(256, 128))
    fields.update(over)
    return TrackletRecord(**fields)


def test_tracklet_round_trip_keeps_bytes_and_schema():
    rec = make_tracklet()
    wire = encode(rec)
    obj = json.loads(wire)
    assert obj["schema"] == "reidstream.tracklet.v1"
    assert isinstance(obj["crops_jpeg"][0], str)  # base64 text on the wire
    back = decode(wire)
    assert back == rec and back.crops_jpeg[1] == b"\xff\xd8two"


def test_embedding_round_trip_and_vector():
    vec = np.array([0.6, 0.8, 0.0], np.float32)
    emb = EmbeddingRecord.from_tracklet(make_tracklet().meta(), vec, "sta/mobilenet_v2", b"\xff\xd8jpg", 2.0)
    back = decode(encode(emb), EmbeddingRecord)
    np.testing.assert_array_equal(back.vector, vec)
    assert back.thumbnail_jpeg == b"\xff\xd8jpg" and back.tracklet_id == "cam-s-1-0"


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"frames": [0]}, "differ in length"),
        ({"boxes": [[10, 2, 1, 42], [3, 2, 13, 42]]}, "x2 > x1"),
        ({"end_s": -1.0}, "end_s"),
        ({"crops_jpeg": [b"x"]}, "crops for"),
        ({"close_reason": "bored"}, "close_reason"),
    ],
)
def test_invalid_tracklet_raises(over, match):
    with pytest.raises(ValueError, match=match):
        make_tracklet(**over)


def test_embedding_rejects_non_finite():
    with pytest.raises(ValueError, match="non-finite"):
        EmbeddingRecord.from_tracklet(make_tracklet().meta(), np.array([np.nan], np.float32), "m", None, 0.0)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (b"\x00\x01garbage", "not a JSON record"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"schema": "reidstream.other.v9"}', "unknown schema"),
        (b'{"schema": "reidstream.tracklet.v1", "camera": 3}', "invalid reidstream.tracklet.v1"),
    ],
)
def test_poison_messages_raise_message_error(value, match):
    with pytest.raises(MessageError, match=match):
        decode(value)


def test_decode_rejects_unexpected_record_type():
    with pytest.raises(MessageError, match="expected EmbeddingRecord"):
        decode(encode(make_tracklet()), EmbeddingRecord)
