"""Embedding hygiene at decode: zero, non-unit, non-finite and wrong-dimension vectors are poison."""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest

from pipeline import metrics
from pipeline.config import LimitsConfig
from pipeline.messages import EmbeddingRecord, MessageError, check_embedding, decode, encode
from pipeline.runner import Output, StageRunner
from tests.unit.pipeline import fakes
from tests.unit.pipeline.test_messages import make_tracklet


def _wire(vec: np.ndarray) -> bytes:
    """An embedding message carrying ``vec`` as is (bypassing the constructor's checks)."""
    good = EmbeddingRecord.from_tracklet(make_tracklet().meta(), np.array([1.0], np.float32), "m", None, 0.0)
    obj = json.loads(encode(good))
    obj["embedding_f32"] = base64.b64encode(np.asarray(vec, "<f4").tobytes()).decode()
    return json.dumps(obj).encode()


def _unit(d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=d).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize(("vec", "match"), [
    (np.full(2560, 1e6, np.float32), "L2 norm 5.05964e\\+07"),  # the vector of issue 7
    (np.zeros(16, np.float32), "zero vector"),
    (np.array([np.nan, 1.0], np.float32), "non-finite"),
    (np.array([np.inf, 0.0], np.float32), "non-finite"),
    (_unit(16) * 1.01, "not 1 within 0.001"),
    (_unit(9000), "outside 1..8192"),
])
def test_bad_vectors_are_message_errors(vec, match):
    with pytest.raises(MessageError, match=match) as info:
        decode(_wire(vec), EmbeddingRecord)
    assert info.value.kind == "embedding"


def test_unit_vectors_within_tolerance_pass_and_dimension_can_be_pinned():
    rec = decode(_wire(_unit(64) * 1.0005), EmbeddingRecord)
    assert rec.vector.shape == (64,)
    with pytest.raises(MessageError, match="differs from the configured 128"):
        decode(_wire(_unit(64)), EmbeddingRecord, LimitsConfig(embedding_dim=128))
    check_embedding(_unit(128), LimitsConfig(embedding_dim=128))


def test_constructor_applies_the_same_checks():
    with pytest.raises(ValueError, match="zero vector"):
        EmbeddingRecord.from_tracklet(make_tracklet().meta(), np.zeros(4, np.float32), "m", None, 0.0)


class Collect:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def setup(self) -> None: ...

    def close(self) -> None: ...

    def process(self, records):
        self.seen.extend(r.tracklet_id for r in records)
        return []


def test_runner_dead_letters_and_counts_bad_embeddings():
    good = [EmbeddingRecord.from_tracklet(make_tracklet(tracklet_id=f"g{i}").meta(), _unit(8, i), "m", None, 0.0)
            for i in range(3)]
    values = [_wire(np.full(8, 1e6, np.float32)), encode(good[0]), _wire(np.zeros(8, np.float32)),
              encode(good[1]), encode(good[2])]
    counter = metrics.REJECTED.labels(stage="hygiene", kind="embedding")
    before = counter._value.get()
    stage, producer, consumer = Collect(), fakes.Producer(), fakes.Consumer(values)
    stats = StageRunner(stage, "hygiene", consumer, producer, EmbeddingRecord, "dead", 16, 10,
                        threading.Event()).run(idle_exit_s=0.0)
    assert stage.seen == ["g0", "g1", "g2"] and stats.dead_lettered == 2
    assert counter._value.get() == before + 2
    assert len(producer.sent["dead"]) == 2 and consumer.committed == 5
    assert all(b"zero vector" in dict(h)["reason"] or b"L2 norm" in dict(h)["reason"]
               for _, _, h in producer.sent["dead"])


def test_reid_stage_renormalises_engine_output():
    from stages.reid.stage import ReidStage
    from tests.unit.stages.test_reid_stage import jpeg

    class Engine:
        def setup(self) -> None: ...

        def close(self) -> None: ...

        def infer(self, clips):
            return np.full((len(clips), 4), 0.5004, np.float16)  # norm 1.0008: off by more than 1e-3

    stage = ReidStage(Engine(), "fake", 2, (32, 16), (0.5,) * 3, (0.5,) * 3, "emb")
    outs = stage.process([make_tracklet(crops_jpeg=[jpeg((0, 0, 0))] * 2)])
    vec = decode(outs[0].value, EmbeddingRecord).vector
    assert isinstance(outs[0], Output) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-6


def test_runner_waits_out_a_failing_poll():
    from kafka.errors import KafkaConnectionError

    class Flaky(fakes.Consumer):
        def __init__(self, values):
            super().__init__(values)
            self.failures = 2

        def poll(self, timeout_ms=0, max_records=64):
            if self.failures:
                self.failures -= 1
                raise KafkaConnectionError("111 ECONNREFUSED")
            return super().poll(timeout_ms, max_records)

    good = EmbeddingRecord.from_tracklet(make_tracklet(tracklet_id="g").meta(), _unit(8), "m", None, 0.0)
    stage, consumer = Collect(), Flaky([encode(good)])
    StageRunner(stage, "flaky", consumer, fakes.Producer(), EmbeddingRecord, "dead", 16, 10,
                threading.Event()).run(idle_exit_s=0.0)
    assert stage.seen == ["g"] and consumer.failures == 0 and consumer.committed == 1
