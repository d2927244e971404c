"""Zones against a real Redis: zone-local identities and state, rebuild after a rebalance, and writers
racing on one identity (two matcher instances during a hand-over) losing no update."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from pipeline.config import ReassociationConfig
from pipeline.store import IdentityStore, Link, Reassignment
from stages.matcher import CrossCameraMatcher
from stages.matcher.zones import ZonedMatcher
from tests.integration.test_matcher_store import emb, noisy, plain, unit

ZONES = {"gate": "north", "lobby": "north", "dock": "south", "yard": "south"}


def zoned(store: IdentityStore) -> ZonedMatcher:
    m = ZonedMatcher(store, lambda s: CrossCameraMatcher(s, threshold=0.8, rules=plain(),
                                                         reassociation=ReassociationConfig(calibrate=False)), ZONES)
    m.setup()
    return m


def test_a_tracklet_is_matched_only_within_its_zone(store):
    stage = zoned(store)
    a = unit(1)
    stage.process([emb("N1", "gate", 0, 2, a), emb("S1", "dock", 0, 2, noisy(a, 1)),
                   emb("N2", "lobby", 3, 5, noisy(a, 2)), emb("S2", "yard", 3, 5, noisy(a, 3)),
                   emb("D1", "elsewhere", 0, 2, noisy(a, 4))])
    gid = {t: store.link(t).global_id for t in ("N1", "N2", "S1", "S2", "D1")}
    assert gid["N1"] == gid["N2"] and gid["S1"] == gid["S2"]         # one person, joined within each zone
    assert len({gid["N1"], gid["S1"], gid["D1"]}) == 3                  # but one identity per zone
    assert sorted(stage.matchers) == ["default", "north", "south"]
    # zone-scoped window indexes; the default zone keeps the single-zone key
    r, ns = store.r, store.ns
    assert {t.decode() for t in r.zrange(f"{ns}:zone:north:tracklets:end", 0, -1)} == {"N1", "N2"}
    assert {t.decode() for t in r.zrange(f"{ns}:zone:south:tracklets:end", 0, -1)} == {"S1", "S2"}
    assert {t.decode() for t in r.zrange(f"{ns}:tracklets:end", 0, -1)} == {"N1", "N2", "S1", "S2", "D1"}
    assert [e.tracklet_id for e in store.load_window()] == ["D1"]            # the default zone's window
    assert [e.tracklet_id for e in store.for_zone("north").load_window()] == ["N1", "N2"]
    assert store.count_zone_links() == 1 and r.smembers(f"{ns}:zones") == {b"north", b"south"}
    assert r.hget(f"{ns}:tracklet:N1", "zone") == b"north" and r.hget(f"{ns}:tracklet:D1", "zone") == b"default"
    stage.matchers["north"].reassociate()
    assert r.exists(f"{ns}:zone:north:reassociation") and not r.exists(f"{ns}:zone:south:reassociation")
    assert store.for_zone("north").reassociation_status()["tracklets"] == 2.0
    assert store.for_zone("north").count_zone_links() == 2 and store.count_all_links() == 5
    store.purge_camera("gate")              # purge finds the tracklet's zone index from its hash
    assert {t.decode() for t in r.zrange(f"{ns}:zone:north:tracklets:end", 0, -1)} == {"N2"}
    assert "N1" not in {t.decode() for t in r.zrange(f"{ns}:tracklets:end", 0, -1)}


def test_after_a_rebalance_a_zone_is_rebuilt_from_redis(store):
    first = zoned(store)
    a = unit(5)
    first.process([emb("N1", "gate", 0, 2, a)])
    # another instance takes the zone over and links more of it meanwhile
    other = zoned(store)
    other.process([emb("N2", "lobby", 3, 5, noisy(a, 1))])
    assert gc.get_freeze_count() > 0        # the restored gallery is out of the cyclic collector's sight
    first.on_revoke([])                     # the rebalance that gives the zone back to the first instance
    assert first.matchers == {} and gc.get_freeze_count() == 0  # handed back to it, to be freed
    first.on_assign([])
    first.process([emb("N3", "gate", 8, 9, noisy(a, 2)), emb("N2", "lobby", 3, 5, noisy(a, 1))])  # N2: a replay
    assert first.matchers["north"].window.ids == ["N1", "N2", "N3"]
    assert {store.link(t).global_id for t in ("N1", "N2", "N3")} == {store.link("N1").global_id}
    assert store.identity(store.link("N1").global_id).n_tracklets == 3


def test_gallery_gauges_are_per_zone_and_leave_with_the_zone(store):
    from prometheus_client import REGISTRY

    def gauge(zone: str) -> float | None:
        return REGISTRY.get_sample_value("reidstream_identities", {"stage": "matcher", "zone": zone})

    stage = zoned(store)
    a, b = unit(7), unit(8)
    stage.process([emb("N1", "gate", 0, 2, a), emb("N2", "lobby", 0, 2, b), emb("S1", "dock", 0, 2, a)])
    assert (gauge("north"), gauge("south")) == (2.0, 1.0)  # one series each, not one overwritten by the other
    hot = {z: REGISTRY.get_sample_value("reidstream_hot_identities", {"stage": "matcher", "zone": z})
           for z in ("north", "south")}
    assert hot == {"north": 2.0, "south": 1.0}  # all seen within the hour
    thresholds = {z: REGISTRY.get_sample_value("reidstream_match_threshold", {"stage": "matcher", "zone": z})
                  for z in ("north", "south")}
    assert thresholds == {"north": 0.8, "south": 0.8}
    stage.on_revoke([])                    # the zones go to another instance: this one stops reporting them
    assert gauge("north") is None and gauge("south") is None
    assert REGISTRY.get_sample_value("reidstream_hot_identities", {"stage": "matcher", "zone": "north"}) is None


def test_zone_names_are_checked(store):
    with pytest.raises(ValueError, match="zone name"):
        store.for_zone("a:b")


def _link(tid: str, cam: str, gid: str, start: float, end: float) -> Link:
    return Link(tid, cam, 1, gid, 0.9, start, end, [0], [[0, 0, 1, 1]], 1.7e9, 1.7e9)


def test_two_writers_racing_on_one_identity_lose_no_update(redis_server, store):
    """Two instances link into G000001 at once, each passing its own (stale) view of the identity."""
    n = 150
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        s = IdentityStore(redis_server, store.ns).for_zone("north")
        try:
            barrier.wait()
            for i in range(n):
                start = 1000.0 - k * 500 - i if k == 0 else 2000.0 + i   # writer 0 extends the start, 1 the end
                cam = f"cam{k}-{i % 3}"
                s.record_link(_link(f"T{k}-{i}", cam, "G000001", start, start + 1), np.ones(4, np.float32) / 2,
                              [cam], start, start + 1, b"\xff\xd8x" if i % 2 else None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ident = store.identity("G000001")
    h = store.r.hgetall(f"{store.ns}:identity:G000001")
    assert int(h[b"n_tracklets"]) == 2 * n == ident.n_tracklets
    assert ident.cameras == sorted({f"cam{k}-{j}" for k in range(2) for j in range(3)})
    assert ident.first_seen_s == 1000.0 - (n - 1) and ident.last_seen_s == 2000.0 + (n - 1) + 1
    assert store.r.zscore(f"{store.ns}:identities", "G000001") == ident.first_seen_s
    assert store.r.zcard(f"{store.ns}:zone:north:tracklets:end") == 2 * n


def test_reassociation_racing_a_link_keeps_the_identity_consistent(redis_server, store):
    """A re-association moving tracklets out of G1 while another writer links into G1: every round
    ends with each identity's count, cameras and span equal to its members."""
    vec = np.ones(4, np.float32) / 2
    rounds = 60
    for i in range(3):
        store.record_link(_link(f"base{i}", "gate", "G000001", float(i), i + 0.5), vec)
    errors: list[BaseException] = []
    for r in range(rounds):
        store.record_link(_link(f"mv{r}", "lobby", "G000001", 100.0 + r, 100.5 + r), vec)
        barrier = threading.Barrier(2)

        def link() -> None:
            s = IdentityStore(redis_server, store.ns)
            try:
                barrier.wait()
                s.record_link(_link(f"new{r}", f"cam{r}", "G000001", 500.0 + r, 500.5 + r), vec)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                s.close()

        def move() -> None:
            s = IdentityStore(redis_server, store.ns)
            try:
                barrier.wait()
                s.apply_reassociation(Reassignment({f"mv{r}": ("G000001", "G000002")}, {}, [],
                                                   {"links": r, "tracklets": 0}))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                s.close()

        threads = [threading.Thread(target=link), threading.Thread(target=move)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for gid in ("G000001", "G000002"):
            members = store.identity_sightings([gid])[gid]
            h = store.r.hgetall(f"{store.ns}:identity:{gid}")
            assert int(h[b"n_tracklets"]) == len(members), (r, gid)
            ident = store.identity(gid)
            assert ident.cameras == sorted({c for _, c, _, _ in members}), (r, gid)
            assert ident.first_seen_s == min(s for _, _, s, _ in members)
            assert ident.last_seen_s == max(e for *_, e in members)
            for tid, *_ in members:
                assert store.link(tid).global_id == gid


def test_a_rebuilt_zone_gallery_holds_only_the_zones_identities(store):
    """Prototypes are stored per zone: a zone matcher rebuilt from Redis never scores another zone's
    identities (the gallery also loads identities outside its window)."""
    stage = zoned(store)
    a = unit(11)
    stage.process([emb("N1", "gate", 0, 2, a), emb("S1", "dock", 0, 2, noisy(a, 1)),
                   emb("D1", "elsewhere", 0, 2, noisy(a, 2))])
    north, south, default = (store.link(t).global_id for t in ("N1", "S1", "D1"))
    rebuilt = zoned(store)
    assert rebuilt.matcher("north").gallery.gids() == [north]
    assert rebuilt.matcher("south").gallery.gids() == [south]
    assert rebuilt.matcher("default").gallery.gids() == [default]
    assert store.r.exists(f"{store.ns}:zone:north:proto:{north}") and store.r.exists(f"{store.ns}:proto:{default}")


def test_calibration_reads_the_window_of_the_zone_it_is_given(store, redis_server, tmp_path):
    import yaml

    from pipeline.config import load_config
    from stages.matcher.offline import default_calibration_path, from_store

    raw = {"version": 1, "store": {"url": redis_server, "namespace": store.ns},
           "cameras": [{"name": c, "source": "unused.avi"} for c in [*ZONES, "elsewhere"]],
           "zones": [{"name": z, "cameras": [c for c, zz in ZONES.items() if zz == z]} for z in ("north", "south")]}
    path = tmp_path / "zones.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, environ={})
    stage = zoned(store)
    a = unit(9)
    stage.process([emb("N1", "gate", 0, 2, a), emb("N2", "lobby", 3, 5, noisy(a, 1)),
                   emb("S1", "dock", 0, 2, noisy(a, 2)), emb("D1", "elsewhere", 0, 2, noisy(a, 3))])
    assert list(from_store(cfg, "north").ids) == ["N1", "N2"]
    assert list(from_store(cfg, "south").ids) == ["S1"]
    assert list(from_store(cfg).ids) == ["D1"]  # no zone given: the cameras in no zone
    with pytest.raises(ValueError, match="known: default, north, south"):
        from_store(cfg, "west")
    assert default_calibration_path(cfg, "north").name == f"{store.ns}.north.json"
    assert default_calibration_path(cfg).name == f"{store.ns}.json"
