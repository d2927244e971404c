"""Poison and oversized messages against a real Tansu: the stage never crash-loops, good messages after
them are processed, and an unacknowledged send is counted, not lost silently."""

from __future__ import annotations

import base64
import json
import time

import numpy as np

from pipeline import services
from pipeline.bus import CheckedSender, ensure_topics, make_producer
from pipeline.config import BusConfig
from pipeline.messages import EmbeddingRecord, encode
from tests.integration.test_bus_runner import EchoStage, _drain, _run
from tests.unit.pipeline.test_messages import make_tracklet


def _bad_messages() -> dict[str, bytes]:
    good = make_tracklet(tracklet_id="template")
    obj = json.loads(encode(good))
    many = dict(obj, crops_jpeg=[obj["crops_jpeg"][0]] * 65, frames=list(range(65)), timestamps_s=[0.0] * 65,
                boxes=[[1, 2, 11, 42]] * 65, tracklet_id="many")
    fat_crop = dict(obj, crops_jpeg=[base64.b64encode(b"\xff\xd8" + b"x" * 600_000).decode(), obj["crops_jpeg"][1]],
                    tracklet_id="fat")
    unit = np.array([0.6, 0.8], np.float32)
    emb = json.loads(encode(EmbeddingRecord.from_tracklet(good.meta(), unit, "m", None, 0.0)))
    return {
        "oversized_20mb": b'{"schema": "reidstream.tracklet.v1", "pad": "' + b"x" * (20 * 1024 * 1024) + b'"}',
        "not_json": b"\x00\xffgarbage",
        "wrong_schema": json.dumps(emb).encode(),
        "too_many_crops": json.dumps(many).encode(),
        "crop_too_large": json.dumps(fat_crop).encode(),
        "nan_time": json.dumps(dict(obj, start_s=float("nan"), tracklet_id="nan")).encode(),
    }


def test_poison_then_good_messages_are_processed(bus_config, unique):
    ensure_topics(bus_config)
    big = BusConfig(**{**bus_config.model_dump(), "max_request_mb": 64})  # a producer that can send 20 MB
    producer = make_producer(big, "test-poison")
    bad = _bad_messages()
    for value in bad.values():
        producer.send(bus_config.topics.tracklets, key=b"cam", value=value).get(timeout=30)
    good = [make_tracklet(tracklet_id=f"ok{i}") for i in range(4)]
    for rec in good:
        producer.send(bus_config.topics.tracklets, key=b"cam", value=encode(rec)).get(timeout=30)
    producer.close()

    stage = EchoStage(bus_config.topics.embeddings)
    stats = _run(bus_config, stage, f"g-{unique}")  # the runner's producer allows 16 MiB, limits 8 MiB
    assert (stats.consumed, stats.dead_lettered, stats.processed) == (len(bad) + 4, len(bad), 4)
    out = _drain(bus_config, bus_config.topics.embeddings, f"c-{unique}", 4)
    assert sorted(m.value.decode() for m in out) == [f"ok{i}" for i in range(4)]

    dead = _drain(bus_config, bus_config.topics.dead_letter, f"d-{unique}", len(bad))
    assert len(dead) == len(bad)
    truncated = [m for m in dead if dict(m.headers).get("truncated") == b"1"]
    assert len(truncated) == 1
    env = json.loads(truncated[0].value)
    assert env["original_value_bytes"] == len(bad["oversized_20mb"]) and "oversized" in env["reason"]
    assert len(truncated[0].value) < 16_000
    reasons = " | ".join(dict(m.headers)["reason"].decode() for m in dead)
    for expected in ("oversized", "not a JSON record", "expected TrackletRecord", "over the limit of 64",
                     "KiB", "start_s"):
        assert expected in reasons

    # committed: a restart of the same group meets none of them again (no crash loop)
    assert _run(bus_config, EchoStage(bus_config.topics.embeddings), f"g-{unique}", idle_s=2.0).consumed == 0


def test_unacknowledged_sends_are_counted(tmp_path, unique):
    """Sends to a broker that died are re-sent, then reported: none disappears silently."""
    port = services.free_port()
    info = services.start_kafka(port, tmp_path)
    try:
        cfg = BusConfig(bootstrap_servers=info.address, partitions=1, delivery_timeout_s=2.0, send_retries=1)
        ensure_topics(cfg, [f"t-{unique}"])
        producer = make_producer(cfg, "test-checked")
        sender = CheckedSender(producer, retries=1, timeout_s=20)
        for i in range(5):
            sender.send(f"t-{unique}", b"k", b"v", ident=f"before{i}")
        assert sender.finish() == (5, [])
        services.terminate(info.pid)
        t0 = time.monotonic()
        for i in range(3):
            sender.send(f"t-{unique}", b"k", b"v", ident=f"after{i}")
        acked, failed = sender.finish()
        assert acked == 5 and sorted(failed) == ["after0", "after1", "after2"]
        assert time.monotonic() - t0 < 30
        producer.close(timeout=1)
    finally:
        services.terminate(info.pid)
