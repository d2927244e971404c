"""Delivery guarantees of the matcher stage end to end: the real :class:`CrossCameraMatcher` driven by the
real :class:`StageRunner` over a real Tansu topic, writing to a real Redis.

``test_bus_runner.py`` covers the runner with a stand-in stage and ``test_matcher_store.py`` the matcher
with direct ``process`` calls; these tests put the two together: a crash before the commit replays the
batch, a Redis outage is waited out (never dead-lettered), duplicated and replayed messages change
nothing, and a restarted matcher continues from the gallery Redis holds.
"""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from pipeline import services
from pipeline.bus import ensure_topics, make_consumer, make_producer
from pipeline.messages import EmbeddingRecord, TrackletRecord, encode
from pipeline.runner import StageRunner
from pipeline.store import IdentityStore
from stages.matcher import CrossCameraMatcher
from stages.matcher.association import Rules
from tests.integration.test_bus_runner import EchoStage, _drain
from tests.integration.test_matcher_store import noisy, unit
from tests.unit.pipeline.test_messages import make_tracklet

THUMB = cv2.imencode(".jpg", np.full((32, 16, 3), 120, np.uint8))[1].tobytes()


def emb(tid: str, camera: str, start: float, vec: np.ndarray) -> bytes:
    meta = make_tracklet(tracklet_id=tid, camera=camera, start_s=start, end_s=start + 1,
                         timestamps_s=[start, start + 1]).meta()
    return encode(EmbeddingRecord.from_tracklet(meta, vec, "test", THUMB, 0.0))


def publish(bus, topic: str, values: list[bytes]) -> None:
    producer = make_producer(bus, "test-publish")
    for value in values:
        producer.send(topic, key=b"cam", value=value).get(timeout=30)
    producer.close()


def new_matcher(url: str, ns: str) -> CrossCameraMatcher:
    """A matcher as a fresh process builds it: its own store client, plain cosine scores, no re-association."""
    return CrossCameraMatcher(IdentityStore(url, namespace=ns, connect_timeout_s=1.0), threshold=0.8,
                              rules=Rules(max_overlap_s=0.5, center=False, transit_weight=0.0))


class Running:
    """A :class:`StageRunner` on its own consumer and producer, in a thread (``stop()`` to end it)."""

    def __init__(self, bus, stage, group: str, topic: str, record_type: type, idle_exit_s: float | None = None):
        self.consumer = make_consumer(bus, topic, group, "test-runner")
        self.producer = make_producer(bus, "test-runner")
        self.ready = threading.Event()
        self.stop_event = threading.Event()
        self.runner = StageRunner(stage, "matcher", self.consumer, self.producer, record_type, bus.topics.dead_letter,
                                  max_batch=16, max_wait_ms=200, stop=self.stop_event, on_ready=self.ready.set)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(idle_exit_s,), daemon=True)
        self.thread.start()

    def _run(self, idle_exit_s):
        try:
            self.runner.run(idle_exit_s=idle_exit_s)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def join(self, timeout_s: float = 60.0):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "runner did not stop"
        self.consumer.close(autocommit=False)
        self.producer.close()
        return self.runner.stats

    def stop(self):
        self.stop_event.set()
        return self.join()


def run_until_idle(bus, stage, group: str, topic: str, record_type: type = EmbeddingRecord, idle_s: float = 2.0):
    r = Running(bus, stage, group, topic, record_type, idle_exit_s=idle_s)
    stats = r.join(90)
    if r.error is not None:
        raise r.error
    return stats


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def snapshot(store: IdentityStore):
    return (sorted((lk.to_json() for lk in store.links()), key=lambda r: r["tracklet_id"]),
            [i.to_json() for i in store.identities()], store.audit())


class CrashesOnce(EchoStage):
    """Dies in the middle of its first batch as a killed process would (the runner does not catch it)."""

    def process(self, records):
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt("killed mid-batch")
        return super().process(records)


def test_crash_before_commit_replays_the_batch_to_the_same_group(bus_config, unique):
    ensure_topics(bus_config)
    publish(bus_config, bus_config.topics.tracklets, [encode(make_tracklet(tracklet_id=f"c{i}")) for i in range(4)])
    group = f"g-{unique}"
    crashed = Running(bus_config, CrashesOnce(bus_config.topics.embeddings), group, bus_config.topics.tracklets,
                      TrackletRecord)
    stats = crashed.join(60)
    assert isinstance(crashed.error, KeyboardInterrupt) and stats.consumed == 4 and stats.processed == 0
    # nothing was committed: the same group gets the whole batch again and processes it
    stats = run_until_idle(bus_config, EchoStage(bus_config.topics.embeddings), group, bus_config.topics.tracklets,
                           TrackletRecord)
    assert (stats.consumed, stats.processed, stats.dead_lettered) == (4, 4, 0)
    # now it was: a third run of the group sees nothing
    assert run_until_idle(bus_config, EchoStage(bus_config.topics.embeddings), group, bus_config.topics.tracklets,
                          TrackletRecord).consumed == 0


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test only (append-only file in ``tmp_path``), so it can be stopped and restarted."""
    port = services.free_port()
    info = {"service": services.start_redis(port, tmp_path / "redis"), "port": port}
    yield info
    services.terminate(info["service"].pid)


def test_redis_outage_is_retried_never_dead_lettered(bus_config, own_redis, unique, tmp_path):
    ensure_topics(bus_config)
    url, ns = own_redis["service"].address, f"outage-{unique}"
    reader = IdentityStore(url, namespace=ns, connect_timeout_s=1.0)
    a = unit(1)
    running = Running(bus_config, new_matcher(url, ns), f"m-{unique}", bus_config.topics.embeddings, EmbeddingRecord)
    try:
        assert running.ready.wait(60), "matcher never got its partitions"
        publish(bus_config, bus_config.topics.embeddings, [emb("A1", "left", 0, a), emb("B1", "left", 0.2, unit(2))])
        wait_for(lambda: reader.count_links(["A1", "B1"]) == 2, 30, "the links before the outage")

        services.terminate(own_redis["service"].pid)  # Redis goes away (SIGTERM: its AOF is flushed)
        publish(bus_config, bus_config.topics.embeddings, [emb("A2", "right", 5, noisy(a, 3)),
                                                           emb("C1", "right", 5.5, unit(4))])
        time.sleep(4.0)  # the runner meets the outage and backs off (0.5, 1, 2 s...)
        assert running.runner.stats.dead_lettered == 0 and running.runner.stats.consumed == 4
        assert running.thread.is_alive() and running.error is None

        own_redis["service"] = services.start_redis(own_redis["port"], tmp_path / "redis")  # back, same data
        wait_for(lambda: reader.count_links(["A1", "B1", "A2", "C1"]) == 4, 60, "the links after the outage")
    finally:
        stats = running.stop()
    assert running.error is None, running.error
    assert stats.dead_lettered == 0 and stats.processed == 4
    assert _drain(bus_config, bus_config.topics.dead_letter, f"dl-{unique}", 1, timeout_s=8) == []
    assert reader.link("A2").global_id == reader.link("A1").global_id  # the gallery survived the outage
    assert reader.link("C1").global_id not in {reader.link("A1").global_id, reader.link("B1").global_id}
    assert sum(i.n_tracklets for i in reader.identities()) == 4
    reader.close()


def test_duplicated_and_replayed_messages_change_nothing(bus_config, redis_server, unique):
    ensure_topics(bus_config)
    ns, topic = f"replay-{unique}", bus_config.topics.embeddings
    a, b = unit(11), unit(12)
    messages = [emb("A1", "left", 0, a), emb("B1", "left", 0.3, b), emb("A2", "right", 4, noisy(a, 1)),
                emb("B2", "right", 4.2, noisy(b, 2))]
    publish(bus_config, topic, messages)
    reader = IdentityStore(redis_server, namespace=ns)
    try:
        stats = run_until_idle(bus_config, new_matcher(redis_server, ns), f"m-{unique}", topic)
        assert stats.processed == 4
        first = snapshot(reader)
        assert len(first[0]) == 4 and len(first[1]) == 2 and all(i["n_tracklets"] == 2 for i in first[1])

        # the same bytes published again (a producer retry, a re-id replay) reach the same group
        publish(bus_config, topic, messages)
        stats = run_until_idle(bus_config, new_matcher(redis_server, ns), f"m-{unique}", topic)
        assert (stats.consumed, stats.processed, stats.dead_lettered) == (4, 4, 0)
        assert snapshot(reader) == first

        # a new group replays the whole topic from the start
        stats = run_until_idle(bus_config, new_matcher(redis_server, ns), f"replay-{unique}", topic)
        assert (stats.consumed, stats.dead_lettered) == (8, 0)
        assert snapshot(reader) == first
        assert reader.count_all_links() == 4
    finally:
        reader.reset()
        reader.close()


def test_restarted_matcher_reloads_its_gallery(bus_config, redis_server, unique):
    ensure_topics(bus_config)
    ns, topic, group = f"restart-{unique}", bus_config.topics.embeddings, f"m-{unique}"
    a, b = unit(21), unit(22)
    publish(bus_config, topic, [emb("A1", "left", 0, a), emb("B1", "left", 0.4, b)])
    reader = IdentityStore(redis_server, namespace=ns)
    try:
        run_until_idle(bus_config, new_matcher(redis_server, ns), group, topic)
        gid_a, gid_b = reader.link("A1").global_id, reader.link("B1").global_id
        assert gid_a != gid_b

        restarted = new_matcher(redis_server, ns)  # a new process: nothing in memory
        publish(bus_config, topic, [emb("A2", "right", 6, noisy(a, 7)), emb("B2", "right", 6.3, noisy(b, 8))])
        stats = run_until_idle(bus_config, restarted, group, topic)
        assert stats.consumed == 2  # only the new messages: the first run committed its own
        assert sorted(restarted.window.ids) == ["A1", "A2", "B1", "B2"]
        assert reader.link("A2").global_id == gid_a and reader.link("A2").score is not None
        assert reader.link("B2").global_id == gid_b
        assert {i.global_id: i.cameras for i in reader.identities()} == {gid_a: ["left", "right"],
                                                                          gid_b: ["left", "right"]}
    finally:
        reader.reset()
        reader.close()
