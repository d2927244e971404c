"""Scale-out: two ``reidstream matcher`` processes share a 4-partition ``embeddings`` topic in one
consumer group, over the session's real Tansu and Redis. One is killed with SIGKILL part-way; the
survivor takes its partitions over, rebuilds those zones from Redis, and every tracklet ends up
linked exactly once, in an identity of its own zone, with nothing dead-lettered."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.bus import ensure_topics, make_producer
from pipeline.config import load_config
from pipeline.messages import EmbeddingRecord, encode
from pipeline.store import IdentityStore
from stages.matcher import CrossCameraMatcher
from tests.conftest import ROOT
from tests.unit.pipeline.test_messages import make_tracklet

PARTITIONS = 4
D = 32
PEOPLE_PER_ZONE = 15
TRACKLETS_PER_PERSON = 5          # 4 zones x 15 people x 5 = 300 tracklets
ASSIGNED = re.compile(r"partitions assigned: (\S+)\[([0-9, ]*)\]")


def _zone_names() -> list[str]:
    """One zone name per partition (murmur2 of the key, as the producer's partitioner computes)."""
    from kafka.partitioner.default import murmur2

    by_partition: dict[int, str] = {}
    for i in range(1000):
        name = f"zone{i}"
        by_partition.setdefault((murmur2(name.encode()) & 0x7FFFFFFF) % PARTITIONS, name)
        if len(by_partition) == PARTITIONS:
            return [by_partition[p] for p in range(PARTITIONS)]
    raise AssertionError("no zone names for every partition")


def _records(zones: list[str]) -> list[tuple[str, EmbeddingRecord]]:
    """``(zone, record)`` in publish order: zones interleaved, each person's tracklets alternating the
    zone's two cameras, in time order, never overlapping another person's."""
    rng = np.random.default_rng(3)
    out = []
    for k in range(TRACKLETS_PER_PERSON):
        for p in range(PEOPLE_PER_ZONE):
            for z, zone in enumerate(zones):
                base = np.random.default_rng(1000 * z + p).normal(size=D)
                vec = base / np.linalg.norm(base) + rng.normal(scale=0.03, size=D)
                vec = (vec / np.linalg.norm(vec)).astype(np.float32)
                start = 100.0 * p + 10.0 * k
                cam = f"{zone}-cam{k % 2}"
                meta = make_tracklet(tracklet_id=f"{zone}-p{p}-k{k}", camera=cam, track_id=p * 10 + k,
                                     start_s=start, end_s=start + 5, timestamps_s=[start, start + 5]).meta()
                out.append((zone, EmbeddingRecord.from_tracklet(meta, vec, "test", None, time.time())))
    return out


def _assignment(log: Path, topic: str) -> set[int] | None:
    """The latest partitions of ``topic`` the process' log says it was assigned (None: none yet)."""
    last = None
    for m in ASSIGNED.finditer(log.read_text(errors="replace")):
        if m.group(1) == topic:
            last = {int(p) for p in m.group(2).replace(" ", "").split(",") if p}
    return last


def _wait(predicate, timeout_s: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tails}")
        time.sleep(0.1)


@pytest.fixture
def scaleout(kafka_server, redis_server, unique, tmp_path):
    zones = _zone_names()
    cameras = [f"{z}-cam{i}" for z in zones for i in range(2)]
    raw = {
        "version": 1,
        "bus": {"bootstrap_servers": kafka_server, "partitions": PARTITIONS, "session_timeout_ms": 1000,
                "heartbeat_interval_ms": 200, "delivery_timeout_s": 20,
                "topics": {"tracklets": f"tracklets-{unique}", "embeddings": f"embeddings-{unique}",
                           "dead_letter": f"dead-{unique}"}},
        "store": {"url": redis_server, "namespace": f"scaleout-{unique}"},
        "metrics": {"camera_base_port": 0, "reid_port": 0, "matcher_port": 0, "api_port": 0},
        "cameras": [{"name": c, "source": "unused.avi"} for c in cameras],
        "zones": [{"name": z, "cameras": [f"{z}-cam0", f"{z}-cam1"]} for z in zones],
        "matcher": {"threshold": 0.8, "center": False, "group_id": f"matcher-{unique}",
                    "transit": {"weight": 0.0},
                    "reassociation": {"calibrate": False, "every_s": 2.0, "idle_s": 0.5}},
    }
    path = tmp_path / "scaleout.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, environ={})
    ensure_topics(cfg.bus)
    store = IdentityStore.from_config(cfg.store)
    yield cfg, path, zones, store
    store.reset()
    store.close()


def test_two_matchers_one_killed_link_every_tracklet_exactly_once(scaleout, tmp_path):
    cfg, config, zones, store = scaleout
    topic = cfg.bus.topics.embeddings
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    ready = {name: tmp_path / f"{name}.ready" for name in ("a", "b")}
    for name in ("a", "b"):
        with open(logs[name], "wb") as out:
            procs[name] = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "matcher", "--config", str(config),
                                            "--ready-file", str(ready[name])], cwd=ROOT, env=env, stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    all_logs = list(logs.values())
    records = _records(zones)
    tids = [r.tracklet_id for _, r in records]
    producer = make_producer(cfg.bus, "scaleout-test")
    partition_of_zone: dict[str, set[int]] = {z: set() for z in zones}

    def publish(batch, gap_s: float = 0.0, on_each=None) -> None:
        futures = []
        for i, (zone, rec) in enumerate(batch):
            futures.append((zone, producer.send(topic, key=zone.encode(), value=encode(rec))))
            if on_each is not None:
                on_each(i)
            if gap_s:
                time.sleep(gap_s)
        producer.flush(timeout=20)
        for zone, fut in futures:  # every produce checked
            partition_of_zone[zone].add(fut.get(timeout=20).partition)

    try:
        t0 = time.monotonic()
        _wait(lambda: all(p.exists() for p in ready.values()), 30, "both matchers to join the group", all_logs)
        _wait(lambda: all(_assignment(lg, topic) for lg in all_logs) and
              set().union(*(_assignment(lg, topic) for lg in all_logs)) == set(range(PARTITIONS)),
              20, "the group to share the 4 partitions", all_logs)
        owned = {name: _assignment(logs[name], topic) for name in logs}
        assert owned["a"].isdisjoint(owned["b"]), owned

        # wave 1: both instances link their zones
        publish(records[:120])
        _wait(lambda: store.count_links(tids[:120]) == 120, 30, "wave 1 linked", all_logs)
        for name in logs:
            assert " → G" in logs[name].read_text(errors="replace"), f"matcher {name} linked nothing"

        # wave 2: kill -9 instance a while its partitions receive records
        def kill_midway(i: int) -> None:
            if i == 40:
                procs["a"].send_signal(signal.SIGKILL)

        publish(records[120:220], gap_s=0.005, on_each=kill_midway)
        procs["a"].wait(timeout=10)
        publish(records[220:])
        _wait(lambda: _assignment(logs["b"], topic) == set(range(PARTITIONS)), 20,
              "the survivor to take every partition", all_logs)
        _wait(lambda: store.count_links(tids) == len(tids), 40, "every tracklet linked", all_logs)
        elapsed = time.monotonic() - t0
    finally:
        producer.close(timeout=5)
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # one zone -> one partition, and the four zones spread over the four partitions
    assert all(len(p) == 1 for p in partition_of_zone.values()), partition_of_zone
    assert {next(iter(p)) for p in partition_of_zone.values()} == set(range(PARTITIONS))
    from stages.matcher.zones import ZonedMatcher

    mapping = ZonedMatcher(store, CrossCameraMatcher, partitions=PARTITIONS)  # the matcher's own zone -> partition
    assert {z: {mapping.zone_partition(z)} for z in zones} == partition_of_zone
    survivor = logs["b"].read_text(errors="replace")
    after_takeover = survivor[survivor.rindex(f"partitions assigned: {topic}[0, 1, 2, 3]"):]
    for p in owned["a"]:  # zone i is keyed to partition i: the survivor rebuilt a's zones from Redis
        assert f"zone {zones[p]} loaded from Redis" in after_takeover, after_takeover[-3000:]
    assert "Traceback" not in survivor, survivor[-3000:]

    # every tracklet linked exactly once, identities disjoint, counts right, zone-local
    r, ns = store.r, store.ns
    zone_of = {c: z for z in zones for c in (f"{z}-cam0", f"{z}-cam1")}
    member_of: dict[str, str] = {}
    for gid in [g.decode() for g in r.zrange(f"{ns}:identities", 0, -1)]:
        members = [t.decode() for t in r.zrange(f"{ns}:identity:{gid}:tracklets", 0, -1)]
        assert members, gid
        for t in members:
            assert t not in member_of, f"{t} is in {member_of[t]} and {gid}"
            member_of[t] = gid
            assert r.hget(f"{ns}:tracklet:{t}", "global_id").decode() == gid
        h = r.hgetall(f"{ns}:identity:{gid}")
        assert int(h[b"n_tracklets"]) == len(members), gid
        cams = {r.hget(f"{ns}:tracklet:{t}", "camera").decode() for t in members}
        assert sorted(cams) == store.identity(gid).cameras
        assert len({zone_of[c] for c in cams}) == 1, f"{gid} spans zones: {cams}"
    assert sorted(member_of) == sorted(tids)
    assert r.zcard(f"{ns}:tracklets") == len(tids)
    for z in zones:  # each zone's window index holds exactly its tracklets
        assert {t.decode() for t in r.zrange(f"{ns}:zone:{z}:tracklets:end", 0, -1)} == \
            {t for t in tids if t.startswith(f"{z}-")}
    # the matching itself: a person's five tracklets end in one identity (re-association included)
    people = {t.rsplit("-k", 1)[0] for t in tids}
    together = sum(len({member_of[f"{p}-k{k}"] for k in range(TRACKLETS_PER_PERSON)}) == 1 for p in people)
    assert together >= 0.9 * len(people), (together, len(people))

    # nothing dead-lettered
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    dl = KafkaConsumer(bootstrap_servers=cfg.bus.bootstrap_servers, enable_auto_commit=False, group_id=None)
    parts = [TopicPartition(cfg.bus.topics.dead_letter, p) for p in range(PARTITIONS)]
    dl.assign(parts)
    dl.seek_to_beginning(*parts)
    dead = [m for _ in range(5) for batch in dl.poll(timeout_ms=300).values() for m in batch]
    dl.close()
    assert dead == [], [dict(m.headers) for m in dead]
    print(f"[scaleout] {len(tids)} tracklets, {len(member_of)} linked once, {len(set(member_of.values()))} identities, "
          f"matcher b took over {sorted(owned['a'])} in {elapsed:.1f} s of run")
