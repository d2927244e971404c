"""StageRunner against a real Tansu broker: publish, dead-letter, commit-after-process, retries."""

from __future__ import annotations

import threading

import pytest

from pipeline.bus import ensure_topics, make_consumer, make_producer
from pipeline.messages import EmbeddingRecord, TrackletRecord, encode
from pipeline.runner import Output, StageRunner, TransientError
from tests.unit.pipeline.test_messages import make_tracklet


class EchoStage:
    """Re-publishes each tracklet id; fails on ids containing 'boom'; TransientError the first N calls."""

    def __init__(self, out_topic: str, transient_failures: int = 0) -> None:
        self.out_topic = out_topic
        self.transient_failures = transient_failures
        self.calls = 0
        self.setup_called = self.closed = False

    def setup(self) -> None:
        self.setup_called = True

    def process(self, records):
        self.calls += 1
        if self.transient_failures:
            self.transient_failures -= 1
            raise TransientError("store down")
        if any("boom" in r.tracklet_id for r in records):
            raise RuntimeError("cannot handle boom")
        return [Output(self.out_topic, r.camera, r.tracklet_id.encode()) for r in records]

    def close(self) -> None:
        self.closed = True


def _drain(bus, topic, group, n, timeout_s=20.0):
    consumer = make_consumer(bus, topic, group, "test-drain")
    got = []
    import time

    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            got.extend(batch)
    consumer.close()
    return got


def _publish(bus, records_or_bytes):
    producer = make_producer(bus, "test")
    for item in records_or_bytes:
        value = item if isinstance(item, bytes) else encode(item)
        producer.send(bus.topics.tracklets, key=b"cam", value=value)
    producer.flush()
    producer.close()


def _run(bus, stage, group, idle_s=3.0, on_ready=None):
    consumer = make_consumer(bus, bus.topics.tracklets, group, "test-runner")
    producer = make_producer(bus, "test-runner")
    runner = StageRunner(stage, "test", consumer, producer, TrackletRecord, bus.topics.dead_letter,
                         max_batch=16, max_wait_ms=200, stop=threading.Event(), on_ready=on_ready)
    stats = runner.run(idle_exit_s=idle_s)
    consumer.close()
    producer.close()
    return stats


def test_poison_goes_to_dead_letter_rest_is_published_and_committed(bus_config, unique):
    ensure_topics(bus_config)
    good = [make_tracklet(tracklet_id=f"t{i}") for i in range(5)]
    boom = make_tracklet(tracklet_id="t-boom")
    wrong_schema = encode(EmbeddingRecord.from_tracklet(good[0].meta(), __import__("numpy").ones(4, "f4") / 2, "m", None, 0))
    _publish(bus_config, [*good[:2], b"{not json", boom, wrong_schema, *good[2:]])

    stage = EchoStage(bus_config.topics.embeddings)
    ready = []
    stats = _run(bus_config, stage, f"g-{unique}", on_ready=lambda: ready.append(stage.setup_called))
    assert ready == [True]  # once, after setup, when the partitions were assigned
    assert stage.setup_called and stage.closed
    assert (stats.consumed, stats.processed, stats.dead_lettered, stats.published) == (8, 5, 3, 5)

    out = _drain(bus_config, bus_config.topics.embeddings, f"check-{unique}", 5)
    assert sorted(m.value.decode() for m in out) == [f"t{i}" for i in range(5)]

    dead = _drain(bus_config, bus_config.topics.dead_letter, f"dead-{unique}", 3)
    reasons = sorted(dict(m.headers)["reason"].decode().split(":")[0] for m in dead)
    assert reasons == ["decode", "decode", "process"]
    boom_msg = next(m for m in dead if b"t-boom" in m.value)
    assert boom_msg.value == encode(boom)  # original bytes kept
    assert dict(boom_msg.headers)["source_topic"].decode() == bus_config.topics.tracklets

    # offsets were committed: the same group sees nothing more
    again = EchoStage(bus_config.topics.embeddings)
    assert _run(bus_config, again, f"g-{unique}", idle_s=2.0).consumed == 0


def test_transient_failure_is_retried_not_dead_lettered(bus_config, unique):
    ensure_topics(bus_config)
    _publish(bus_config, [make_tracklet(tracklet_id="x1"), make_tracklet(tracklet_id="x2")])
    stage = EchoStage(bus_config.topics.embeddings, transient_failures=2)
    stats = _run(bus_config, stage, f"g-{unique}")
    assert stats.dead_lettered == 0 and stats.processed == 2 and stage.calls >= 3


def test_ensure_topics_creates_with_partitions(bus_config):
    from kafka import KafkaConsumer

    ensure_topics(bus_config)
    ensure_topics(bus_config)  # idempotent
    c = KafkaConsumer(bootstrap_servers=bus_config.bootstrap_servers)
    try:
        assert c.partitions_for_topic(bus_config.topics.tracklets) == {0, 1}
    finally:
        c.close()


def test_unreachable_broker_is_bus_error():
    from pipeline.bus import BusError, check_broker
    from pipeline.config import BusConfig
    from pipeline.services import free_port

    with pytest.raises(BusError, match="not reachable"):
        check_broker(BusConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", connect_timeout_s=1.0))
