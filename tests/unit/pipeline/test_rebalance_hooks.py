"""The runner's rebalance callbacks: commit what was processed but not committed, tell the stage; and
what a failed start-up closes."""

from __future__ import annotations

import threading

import pytest
from kafka.errors import CommitFailedError
from kafka.structs import TopicPartition

from pipeline.messages import EmbeddingRecord, encode
from pipeline.runner import StageRunner, rebalance_listener
from tests.unit.pipeline import fakes
from tests.unit.pipeline.test_messages import make_tracklet


class FlakyCommits(fakes.Consumer):
    """Fails the first ``failures`` commits (a rebalance in progress), then commits."""

    def __init__(self, values, failures: int) -> None:
        super().__init__(values)
        self.failures = failures

    def commit(self, offsets: dict) -> None:
        if self.failures:
            self.failures -= 1
            raise CommitFailedError("rebalance in progress")
        super().commit(offsets)


class Hooked:
    def __init__(self) -> None:
        self.events: list[tuple[str, list]] = []

    def setup(self) -> None: ...

    def close(self) -> None: ...

    def process(self, records):
        return []

    def on_assign(self, partitions):
        self.events.append(("assign", list(partitions)))

    def on_revoke(self, partitions):
        self.events.append(("revoke", list(partitions)))


def _embedding(i: int) -> bytes:
    meta = make_tracklet(tracklet_id=f"t{i}").meta()
    return encode(EmbeddingRecord.from_tracklet(meta, [1.0, 0.0], "m", None, 0.0))


def test_revocation_commits_the_processed_offsets_a_failed_commit_left_and_tells_the_stage():
    consumer = FlakyCommits([_embedding(i) for i in range(3)], failures=1)
    stage = Hooked()
    runner = StageRunner(stage, "t", consumer, fakes.Producer(), EmbeddingRecord, "dead", 8, 1, threading.Event())
    runner.run(idle_exit_s=0.0)
    assert consumer.committed is None                       # the batch's commit failed (rebalance)
    tp = TopicPartition("in", 0)
    listener = rebalance_listener(lambda: runner)
    listener.on_partitions_revoked([tp])
    assert consumer.committed == 3                           # committed on revocation, before the next owner
    listener.on_partitions_assigned([tp])
    assert stage.events == [("revoke", [tp]), ("assign", [tp])]


class Plain:
    def setup(self) -> None: ...

    def close(self) -> None: ...

    def process(self, records):
        return []


def test_a_stage_without_hooks_and_an_unbuilt_runner_are_fine():
    tp = TopicPartition("in", 0)
    rebalance_listener(lambda: None).on_partitions_revoked([tp])          # before the runner exists
    runner = StageRunner(Plain(), "t", fakes.Consumer([]), fakes.Producer(), EmbeddingRecord, "dead", 8, 1,
                         threading.Event())
    runner.partitions_revoked([tp])
    runner.partitions_assigned([tp])


def test_a_producer_that_cannot_be_made_closes_the_consumer_made_before_it(monkeypatch):
    import pipeline.bus as bus
    from pipeline.config import BusConfig
    from pipeline.runner import run_consuming_stage

    class Closable(fakes.Consumer):
        closed = 0

        def close(self) -> None:
            Closable.closed += 1

    def no_producer(cfg, client_id):
        raise bus.BusError("Kafka producer for 127.0.0.1:9 failed: Unable to bootstrap")

    monkeypatch.setattr(bus, "ensure_topics", lambda cfg, topics=None: None)
    monkeypatch.setattr(bus, "make_consumer", lambda *a, **k: Closable([]))
    monkeypatch.setattr(bus, "make_producer", no_producer)
    with pytest.raises(bus.BusError, match="Unable to bootstrap"):
        run_consuming_stage(BusConfig(), Plain(), "t", "in", "g", EmbeddingRecord, 8, 1, threading.Event())
    assert Closable.closed == 1
