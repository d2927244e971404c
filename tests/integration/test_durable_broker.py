"""Durable broker mode: Tansu over a local S3 server (moto) keeps topics, messages and committed
offsets across a broker kill -9; the default memory:// mode does not (documented data-loss window)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline import services
from pipeline.bus import ensure_topics, make_consumer, make_producer
from pipeline.config import BusConfig, TopicsConfig

pytest.importorskip("moto.server", reason="durable mode needs moto[server]")


def _cfg(address: str, unique: str) -> BusConfig:
    return BusConfig(bootstrap_servers=address, partitions=1, session_timeout_ms=1000, heartbeat_interval_ms=200,
                     topics=TopicsConfig(tracklets=f"t-{unique}", embeddings=f"e-{unique}", dead_letter=f"d-{unique}"))


def _consume(cfg: BusConfig, group: str, n: int, timeout_s: float = 20.0) -> list[bytes]:
    consumer = make_consumer(cfg, cfg.topics.tracklets, group, "test-durable")
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            got.extend(batch)
    if got:
        consumer.commit()
    consumer.close()
    return [m.value for m in got]


def test_durable_mode_survives_broker_kill(tmp_path, unique):
    kport, rport, sport = services.free_port(), services.free_port(), services.free_port()
    state = services.up(tmp_path, kport, rport, "s3://tansu/", s3_port=sport)
    try:
        assert set(state) == {"s3", "kafka", "redis"}
        cfg = _cfg(state["kafka"].address, unique)
        ensure_topics(cfg)
        producer = make_producer(cfg, "test-durable")
        for i in range(6):
            producer.send(cfg.topics.tracklets, key=b"k", value=f"m{i}".encode()).get(timeout=20)
        producer.close()
        assert _consume(cfg, f"g-{unique}", 6) == [f"m{i}".encode() for i in range(6)]  # and committed

        os.kill(state["kafka"].pid, signal.SIGKILL)
        services.terminate(state["kafka"].pid)
        again = services.up(tmp_path, kport, rport, "s3://tansu/", s3_port=sport)
        assert again["kafka"].pid != state["kafka"].pid and again["s3"].pid == state["s3"].pid
        state = again
        everything = _consume(cfg, f"fresh-{unique}", 6)
        assert everything == [f"m{i}".encode() for i in range(6)]  # messages survived the kill
        assert _consume(cfg, f"g-{unique}", 1, timeout_s=4) == []  # so did the committed offset
    finally:
        services.down(tmp_path)


def test_memory_mode_loses_everything_on_restart(tmp_path, unique):
    """The documented data-loss window of the default mode: a broker restart wipes topics and offsets."""
    port = services.free_port()
    info = services.start_kafka(port, tmp_path)
    cfg = _cfg(info.address, unique)
    try:
        ensure_topics(cfg)
        producer = make_producer(cfg, "test-memory")
        producer.send(cfg.topics.tracklets, value=b"gone").get(timeout=20)
        producer.close()
        os.kill(info.pid, signal.SIGKILL)
        services.terminate(info.pid)
        info = services.start_kafka(port, tmp_path)
        from kafka import KafkaConsumer

        c = KafkaConsumer(bootstrap_servers=info.address)
        try:
            assert cfg.topics.tracklets not in c.topics()
        finally:
            c.close()
    finally:
        services.terminate(info.pid)
