"""Property-based fuzzing of the consuming stages' decode-and-process path.

Hypothesis generates batches of Kafka message values — valid tracklets and embeddings, mutations of
them (flipped, cut, spliced bytes), arbitrary JSON that claims a schema, random bytes, tombstones, and
oversized values — and feeds them through :class:`~pipeline.runner.StageRunner` driving the real re-id
stage (real JPEG decoding and preprocessing; a stand-in network) and the real matcher (on the session
Redis). No message may crash a runner: every one is processed or dead-lettered, each dead letter fits
the producer, and the offsets are committed. At least 10,000 messages are generated in all.
"""

from __future__ import annotations

import json
import threading

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import LimitsConfig
from pipeline.messages import EMBEDDING_SCHEMA, TRACKLET_SCHEMA, EmbeddingRecord, TrackletRecord, encode
from pipeline.runner import StageRunner
from tests.unit.pipeline import fakes
from tests.unit.pipeline.test_messages import make_tracklet

LIMITS = LimitsConfig(max_message_mb=16 / 1024, max_crops=8, max_crop_kb=4, dead_letter_preview_bytes=256)
LIMIT = LIMITS.max_message_bytes  # 16 KiB
PRODUCER_MAX = 24 * 1024  # the fake producer refuses larger values, as kafka-python does
EXAMPLES = 450
MIN_MESSAGES = 10_000
D = 8
seen = {"messages": 0, "processed": 0, "dead_lettered": 0, "oversized": 0, "envelopes": 0}


def _jpeg(v: int) -> bytes:
    return cv2.imencode(".jpg", np.full((16, 8, 3), v % 256, np.uint8))[1].tobytes()


JPEGS = [_jpeg(v) for v in range(0, 256, 32)]


@st.composite
def tracklets(draw) -> bytes:
    n = draw(st.integers(1, 3))
    t0 = draw(st.floats(0, 1e4, allow_nan=False))
    return encode(make_tracklet(
        tracklet_id=f"f{draw(st.integers(0, 10**9))}", camera=draw(st.sampled_from(["left", "right", "c3"])),
        track_id=draw(st.integers(0, 10**6)), frames=list(range(n)), timestamps_s=[t0] * n,
        boxes=[[0, 0, 8, 16]] * n, start_s=t0, end_s=t0 + draw(st.floats(0, 50)), observed_frames=n,
        crops_jpeg=[draw(st.sampled_from(JPEGS)) for _ in range(n)]))


@st.composite
def embeddings(draw) -> bytes:
    vec = np.asarray(draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=D, max_size=D)), np.float32)
    vec[0] = 1.0  # keeps the norm away from zero and underflow
    vec /= np.linalg.norm(vec)
    meta = make_tracklet(tracklet_id=f"e{draw(st.integers(0, 10**9))}",
                         camera=draw(st.sampled_from(["left", "right"])),
                         start_s=0.0, end_s=draw(st.floats(0, 5)), timestamps_s=[0.0, 0.0]).meta()
    thumb = draw(st.sampled_from([None, JPEGS[0]]))
    return encode(EmbeddingRecord.from_tracklet(meta, vec, "fuzz", thumb, 0.0))


@st.composite
def mutated(draw, base) -> bytes:
    value = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        i = draw(st.integers(0, max(len(value) - 1, 0)))
        if op == "flip" and value:
            value[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            value = value[:i]
        elif op == "insert":
            value[i:i] = draw(st.binary(max_size=16))
        else:
            value = value[:i] + value[i // 2:]
    return bytes(value)


JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | \
    st.sampled_from(["NaN", "", "\xff\xd8", "reidstream.tracklet.v1"])
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=4), max_leaves=12)


@st.composite
def claims_schema(draw) -> bytes:
    obj = draw(st.dictionaries(st.sampled_from(["tracklet_id", "camera", "frames", "boxes", "embedding_f32",
                                                "crops_jpeg", "start_s", "end_s", "x"]), JSON, max_size=6))
    obj["schema"] = draw(st.sampled_from([TRACKLET_SCHEMA, EMBEDDING_SCHEMA, "reidstream.tracklet.v2", 7]))
    return json.dumps(obj, allow_nan=True).encode()


@st.composite
def oversized(draw) -> bytes:
    n = draw(st.integers(LIMIT + 1, 3 * LIMIT))
    kind = draw(st.sampled_from(["pad", "json", "crop"]))
    if kind == "pad":
        return b"\x00" * n
    if kind == "json":
        return json.dumps({"schema": TRACKLET_SCHEMA, "pad": "x" * n}).encode()
    obj = json.loads(encode(make_tracklet()))
    obj["crops_jpeg"][0] = "/9j/" + "A" * n  # base64 of a huge "JPEG"
    return json.dumps(obj).encode()


MESSAGE = st.one_of(
    tracklets(), embeddings(), mutated(tracklets()), mutated(embeddings()), claims_schema(),
    st.binary(max_size=64), st.just(b""), st.none(), oversized(),
)


class FakeEngine:
    def setup(self) -> None: ...

    def close(self) -> None: ...

    def infer(self, clips: np.ndarray) -> np.ndarray:
        v = clips.reshape(len(clips), -1)[:, :D].astype(np.float32) + 1.5
        return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def stages(redis_server):
    from pipeline.store import IdentityStore
    from stages.matcher import CrossCameraMatcher
    from stages.reid.stage import ReidStage

    import logging

    quiet = logging.getLogger("pipeline")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a warning per dead letter would dominate the run time
    store = IdentityStore(redis_server, namespace="fuzz")
    store.reset()
    reid = ReidStage(FakeEngine(), "fuzz", 2, (16, 8), (0.5,) * 3, (0.5,) * 3, "embeddings", max_batch=4)
    matcher = CrossCameraMatcher(store, threshold=0.9)
    yield {"reid": (reid, TrackletRecord), "matcher": (matcher, EmbeddingRecord)}
    quiet.setLevel(level)
    store.reset()
    store.close()


def _drive(stage, record_type, values: list) -> None:
    producer, consumer = fakes.Producer(max_bytes=PRODUCER_MAX), fakes.Consumer(values)
    runner = StageRunner(stage, "fuzz", consumer, producer, record_type, "dead", max_batch=8, max_wait_ms=1,
                         stop=threading.Event(), limits=LIMITS)
    stats = runner.run(idle_exit_s=0.0)
    assert stats.consumed == len(values)
    assert stats.processed + stats.dead_lettered == stats.consumed
    assert consumer.committed == len(values)
    seen["processed"] += stats.processed
    seen["dead_lettered"] += stats.dead_lettered
    seen["oversized"] += sum(1 for v in values if v is not None and len(v) > LIMIT)
    for _key, value, headers in producer.sent.get("dead", []):
        seen["envelopes"] += dict(headers).get("truncated") == b"1"
        assert value is None or len(value) <= PRODUCER_MAX
        if value is not None and len(value) > LIMIT:
            raise AssertionError("a dead letter over the message limit was sent whole")
        assert dict(headers)["stage"] == b"fuzz"


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(values=st.lists(MESSAGE, min_size=24, max_size=28), which=st.sampled_from(["reid", "matcher"]))
def test_no_message_crashes_a_stage(stages, values, which):
    stage, record_type = stages[which]
    stage.setup()
    _drive(stage, record_type, values)
    seen["messages"] += len(values)


def test_fuzz_volume():
    """Runs after the property test in file order: it generated at least 10,000 messages, valid ones
    were processed, and oversized ones went to the dead-letter topic as truncated envelopes."""
    if seen["messages"] == 0:
        pytest.skip("counts the messages of test_no_message_crashes_a_stage: run the whole file")
    print(f"[fuzz] {seen}")
    assert seen["messages"] >= MIN_MESSAGES, seen
    assert seen["processed"] >= 1000 and seen["dead_lettered"] >= 1000, seen
    assert seen["envelopes"] >= seen["oversized"] > 100, seen
