"""Bounded messages: size limits at decode, truncated dead-letter envelopes, checked sends."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from pipeline.bus import DEAD_LETTER_ENVELOPE_SCHEMA, CheckedSender, DeliveryError, dead_letter
from pipeline.config import LimitsConfig
from pipeline.messages import EmbeddingRecord, MessageError, TrackletRecord, decode, encode
from pipeline.runner import RepeatFilter
from tests.unit.pipeline import fakes
from tests.unit.pipeline.test_messages import make_tracklet

SMALL = LimitsConfig(max_message_mb=0.05, max_crops=4, max_crop_kb=2, dead_letter_preview_bytes=64)


def Msg(value: bytes | None) -> fakes.Record:  # noqa: N802 - reads like the record it builds
    """A consumer record of the ``tracklets`` topic at partition 1, offset 42, with a trace header."""
    return fakes.Record(value, topic="tracklets", partition=1, offset=42, headers=[("trace", b"abc")])


class Future:
    def __init__(self, exc: BaseException | None = None) -> None:
        self.is_done = True
        self.exception = exc

    def get(self, timeout=None):
        if self.exception is not None:
            raise self.exception
        return "ok"


class FakeProducer:
    """Records sends; refuses values over ``max_bytes`` like kafka-python (synchronously), and fails the
    first ``fail_first`` sends' futures with ``fail_with``."""

    def __init__(self, max_bytes: int = 1 << 20, fail_first: int = 0, fail_with: BaseException | None = None):
        self.max_bytes = max_bytes
        self.fail_first = fail_first
        self.fail_with = fail_with or KafkaTimeoutError("broker gone")
        self.sent: list[tuple[str, bytes | None, bytes | None, list]] = []
        self.attempts = 0

    def send(self, topic, value=None, key=None, headers=None):
        self.attempts += 1
        if value is not None and len(value) > self.max_bytes:
            raise MessageSizeTooLargeError(f"{len(value)} > {self.max_bytes}")
        if self.fail_first > 0:
            self.fail_first -= 1
            return Future(self.fail_with)
        self.sent.append((topic, key, value, headers or []))
        return Future()

    def flush(self, timeout=None):
        pass


def test_oversized_message_is_rejected_before_parsing():
    with pytest.raises(MessageError, match="oversized") as info:
        decode(b"{" + b" " * 60_000 + b"}", TrackletRecord, SMALL)
    assert info.value.kind == "oversized"


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"crops_jpeg": [b"\xff\xd8x"] * 5, "frames": list(range(5)), "timestamps_s": [0.0] * 5,
          "boxes": [[0, 0, 1, 1]] * 5}, "over the limit of 4"),
        ({"crops_jpeg": [b"\xff\xd8" + b"x" * 3000, b"\xff\xd8y"]}, "KiB"),
        ({"crops_jpeg": [b"GIF89a", b"\xff\xd8y"]}, "not a JPEG"),
    ],
)
def test_tracklet_limits(over, match):
    wire = encode(make_tracklet())
    obj = json.loads(wire)
    for k, v in over.items():
        obj[k] = [base64.b64encode(c).decode() for c in v] if k == "crops_jpeg" else v
    with pytest.raises(MessageError, match=match):
        decode(json.dumps(obj).encode(), TrackletRecord, SMALL)


def test_embedding_thumbnail_must_be_a_small_jpeg():
    vec = np.array([0.6, 0.8], np.float32)
    meta = make_tracklet().meta()
    big = EmbeddingRecord.model_construct(**EmbeddingRecord.from_tracklet(meta, vec, "m", None, 0.0).__dict__)
    obj = json.loads(encode(big))
    obj["thumbnail_jpeg"] = base64.b64encode(b"\xff\xd8" + b"x" * 4000).decode()
    with pytest.raises(MessageError, match="thumbnail has 4002 bytes"):
        decode(json.dumps(obj).encode(), EmbeddingRecord, SMALL)
    obj["thumbnail_jpeg"] = base64.b64encode(b"<html>").decode()
    with pytest.raises(MessageError, match="thumbnail is not a JPEG"):
        decode(json.dumps(obj).encode(), EmbeddingRecord, SMALL)


def test_deeply_nested_json_is_a_message_error():
    with pytest.raises(MessageError):
        decode(b"[" * 100_000 + b"]" * 100_000, limits=LimitsConfig(max_message_mb=1))


def test_small_poison_is_dead_lettered_whole():
    producer = FakeProducer()
    assert dead_letter(producer, "dead", "reid", Msg(b"{bad"), "decode: not JSON", SMALL) is True
    (topic, key, value, headers) = producer.sent[0]
    assert (topic, key, value) == ("dead", b"cam", b"{bad")
    assert dict(headers)["source_offset"] == b"42" and "truncated" not in dict(headers)


def test_oversized_poison_is_dead_lettered_as_truncated_envelope():
    producer = FakeProducer()
    value = b"\x00" * 200_000
    assert dead_letter(producer, "dead", "reid", Msg(value), "decode: oversized: 200000 bytes", SMALL) is False
    (_, key, env, headers) = producer.sent[0]
    h = dict(headers)
    assert key is None and h["truncated"] == b"1" and h["original_bytes"] == b"200003"
    obj = json.loads(env)
    assert obj["schema"] == DEAD_LETTER_ENVELOPE_SCHEMA and obj["source_offset"] == 42
    assert obj["original_value_bytes"] == 200_000 and obj["original_headers"] == {"trace": "abc"}
    assert base64.b64decode(obj["value_head_b64"]) == value[:64]
    assert len(env) < 2000


def test_producer_size_refusal_falls_back_to_envelope():
    """Within the configured limit but over what the producer accepts (the crash-loop of issue 7)."""
    producer = FakeProducer(max_bytes=1000)
    assert dead_letter(producer, "dead", "reid", Msg(b"x" * 5000), "process: boom",
                       LimitsConfig(max_message_mb=1)) is False
    assert json.loads(producer.sent[0][2])["original_value_bytes"] == 5000


def test_unacknowledged_dead_letter_raises_delivery_error():
    with pytest.raises(DeliveryError, match="dead-lettering tracklets\\[1\\]@42 failed"):
        dead_letter(FakeProducer(fail_first=5), "dead", "reid", Msg(b"{bad"), "decode: x", SMALL)


def test_checked_sender_resends_then_counts_failures():
    producer = FakeProducer(fail_first=2)  # the first message fails twice, then goes through
    sender = CheckedSender(producer, retries=3, timeout_s=5)
    sender.send("t", b"k", b"v1", ident="a")
    acked, failed = sender.finish()
    assert (acked, failed) == (1, []) and producer.attempts == 3

    producer = FakeProducer(fail_first=100)
    failures = []
    sender = CheckedSender(producer, retries=2, timeout_s=5, on_failure=lambda i, e: failures.append(i))
    for i in range(3):
        sender.send("t", b"k", b"v", ident=f"m{i}")
    acked, failed = sender.finish()
    assert acked == 0 and failed == ["m0", "m1", "m2"] == failures and producer.attempts == 9


def test_checked_sender_refuses_oversized_without_retrying():
    producer = FakeProducer(max_bytes=10)
    sender = CheckedSender(producer, retries=5, timeout_s=5)
    sender.send("t", None, b"x" * 11, ident="big")
    sender.send("t", None, b"ok", ident="small")
    assert sender.finish() == (1, ["big"]) and producer.attempts == 2


def test_repeat_filter_folds_repeats():
    f = RepeatFilter(window_s=60, prefix="kafka")
    rec = lambda: logging.LogRecord("kafka.conn", logging.ERROR, __file__, 1, "connection to %s lost", ("b",), None)  # noqa: E731
    assert f.filter(rec()) and not f.filter(rec()) and not f.filter(rec())
    f.window_s = 0
    r = rec()
    assert f.filter(r) and "2 similar" in r.msg


def test_repeat_filter_leaves_other_loggers_alone():
    f = RepeatFilter(window_s=60, prefix="kafka")
    rec = lambda: logging.LogRecord("pipeline.bus", logging.ERROR, __file__, 1, "x", (), None)  # noqa: E731
    assert f.filter(rec()) and f.filter(rec())


def test_checked_sender_survives_a_flush_timeout():
    class Pending(Future):
        def __init__(self) -> None:
            super().__init__()
            self.is_done = False

    class Stuck(FakeProducer):
        def send(self, topic, value=None, key=None, headers=None):
            return Pending()

        def flush(self, timeout=None):
            raise KafkaTimeoutError("Timeout waiting for future")

    sender = CheckedSender(Stuck(), retries=1, timeout_s=0.3)
    sender.send("t", None, b"v", ident="x")
    assert sender.finish() == (0, ["x"])


def test_runner_dead_letters_an_oversized_output_instead_of_blocking():
    import threading

    from pipeline.runner import Output, StageRunner

    class Bloat:
        def setup(self) -> None: ...

        def close(self) -> None: ...

        def process(self, records):
            return [Output("out", r.camera, b"x" * (100_000 if r.tracklet_id == "big" else 10)) for r in records]

    values = [encode(make_tracklet(tracklet_id=t)) for t in ("a", "big", "b")]
    producer, consumer = fakes.Producer(), fakes.Consumer(values)
    stats = StageRunner(Bloat(), "bloat", consumer, producer, TrackletRecord, "dead", 8, 1, threading.Event(),
                        limits=SMALL).run(idle_exit_s=0.0)
    assert len(producer.sent["out"]) == 2 and consumer.committed == 3 and stats.dead_lettered == 1
    (_, env, headers), = producer.sent["dead"]
    assert dict(headers)["truncated"] == b"1" and json.loads(env)["original_value_bytes"] == 100_000
