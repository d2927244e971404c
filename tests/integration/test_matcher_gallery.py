"""The matcher's gallery beyond the re-association window, against a real Redis: identities that left
the window stay candidates, a restart restores them from their compact prototypes, and identities
unseen for longer than ``gallery_ttl_s`` are archived (out of memory, still in Redis)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from pipeline.config import ReassociationConfig
from stages.matcher import CrossCameraMatcher
from stages.matcher.index import IndexSettings
from tests.integration.test_matcher_store import D, emb, noisy, plain, unit


def _matcher(store, **kw) -> CrossCameraMatcher:
    reassoc = ReassociationConfig(every_s=1e9, idle_s=1e9, max_tracklets=2, calibrate=False)
    m = CrossCameraMatcher(store, threshold=0.8, rules=plain(), reassociation=reassoc, **kw)
    m.setup()
    return m


def test_identities_outside_the_window_stay_candidates_and_survive_a_restart(store):
    m = _matcher(store)
    people = [unit(40 + i) for i in range(5)]
    m.process([emb(f"P{i}", "left", 10.0 * i, 10.0 * i + 2, v) for i, v in enumerate(people)])
    m.reassociate()                                # trims the window to the newest 2 tracklets
    assert len(m.window) == 2 and len(m.gallery) == 5
    m.process([emb("R0", "right", 100, 102, noisy(people[0], 7))])
    first = store.link("P0").global_id
    assert store.link("R0").global_id == first     # P0's identity left the window, not the gallery
    gc.unfreeze()
    restarted = _matcher(store)
    assert len(restarted.window) == 2 and len(restarted.gallery) == 5
    # the restored gallery is out of the cyclic collector's sight (no full collection walks it)
    tracked = {id(o) for o in gc.get_objects()}
    assert gc.get_freeze_count() > 0 and id(restarted.gallery.prototypes(first)[0]) not in tracked
    assert [p.tracklet_id for p in restarted.gallery.prototypes(store.link("P1").global_id)] == ["P1"]
    restarted.process([emb("R1", "right", 110, 112, noisy(people[1], 8))])
    assert store.link("R1").global_id == store.link("P1").global_id
    assert restarted.decide("right", 120, 122, noisy(people[2], 9)).global_id == store.link("P2").global_id


def test_a_gallery_grown_online_is_frozen_out_of_full_collections(store, monkeypatch):
    """Every ``_FREEZE_EVERY`` records the gallery's new objects leave the cyclic collector's sight,
    so full collections do not walk an ever larger gallery."""
    from stages.matcher import matcher as mod

    monkeypatch.setattr(mod, "_FREEZE_EVERY", 3)
    gc.unfreeze()
    m = _matcher(store)
    m.process([emb("F0", "left", 0, 2, unit(60)), emb("F1", "left", 10, 12, unit(61))])
    proto = m.gallery.prototypes(store.link("F1").global_id)[0]
    assert gc.is_tracked(proto) and id(proto) in {id(o) for o in gc.get_objects()}  # 2 of 3: not yet
    m.process([emb("F2", "right", 20, 22, unit(62))])
    # frozen: still tracked, but in no generation a collection walks (the frozen count is no
    # evidence: frozen objects that reference counting frees leave it, so it may even fall)
    assert m._unfrozen == 0 and gc.is_tracked(proto)
    assert id(proto) not in {id(o) for o in gc.get_objects()}
    m.process([emb("F3", "right", 30, 32, unit(63))])
    assert m._unfrozen == 1 and store.link("F3") is not None
    gc.unfreeze()


def test_identities_unseen_for_the_ttl_are_archived_but_kept_in_redis(store):
    m = _matcher(store, gallery_ttl_s=50.0)
    a, b = unit(60), unit(61)
    m.process([emb("A", "left", 0, 2, a), emb("B", "left", 100, 102, b)])
    assert m.archive() == [store.link("A").global_id]
    assert store.link("A").global_id not in m.gallery and store.identity(store.link("A").global_id) is not None
    m.process([emb("A2", "right", 104, 106, noisy(a, 3))])
    assert store.link("A2").global_id != store.link("A").global_id   # an archived identity is no candidate
    restarted = _matcher(store, gallery_ttl_s=50.0)
    assert store.link("A").global_id not in restarted.gallery and len(restarted.gallery) == 2


@pytest.mark.parametrize("kind", ["auto", "gpu"])
def test_a_large_gallery_switches_to_the_index_and_keeps_deciding_right(store, kind):
    """Past ``exact_below`` the gallery searches through its index (the IVF, or with ``gpu`` the device
    copy, here on the CPU), links returns right, and a restarted matcher rebuilds the same index from
    Redis."""
    settings = dict(kind=kind, exact_below=40, nprobe=10_000, device="cpu")
    m = _matcher(store, index=IndexSettings(**settings))
    vecs = [unit(200 + i) for i in range(60)]
    m.process([emb(f"T{i}", "left", 5.0 * i, 5.0 * i + 1, v) for i, v in enumerate(vecs)])
    assert m.gallery.index.mode == ("ivf" if kind == "auto" else "gpu") and len(m.gallery) == 60
    m.process([emb(f"S{i}", "right", 400.0 + i, 400.5 + i, noisy(vecs[i], 500 + i)) for i in range(0, 60, 7)])
    for i in range(0, 60, 7):
        assert store.link(f"S{i}").global_id == store.link(f"T{i}").global_id
    restarted = _matcher(store, index=IndexSettings(**settings))
    assert restarted.gallery.index.mode == m.gallery.index.mode and len(restarted.gallery) == 60
    z = np.stack([restarted._transform(v) for v in vecs])
    assert (restarted.gallery.search(z, 1)[1][:, 0] == [restarted.gallery.code(store.link(f"T{i}").global_id)
                                                         for i in range(60)]).all()


def test_operator_merge_and_split_are_taken_in_and_survive_reassociation(store):
    reassoc = ReassociationConfig(every_s=1e9, idle_s=1e9, calibrate=False)
    m = CrossCameraMatcher(store, threshold=0.8, rules=plain(), reassociation=reassoc)
    m.setup()
    a, b, c = unit(70), unit(71), unit(72)
    m.process([emb("A1", "left", 0, 2, a), emb("A2", "right", 3, 5, noisy(a, 1)),
               emb("B1", "left", 10, 12, b), emb("C1", "right", 20, 22, c)])
    ga, gb, gc = (store.link(t).global_id for t in ("A1", "B1", "C1"))
    assert store.link("A2").global_id == ga and len({ga, gb, gc}) == 3
    split = store.operator_split(ga, ["A2"], operator="test", note="two people")
    store.operator_merge(gb, [gc], operator="test", note="same coat")
    assert m.follow_operators() >= 3
    g_split = store.link("A2").global_id
    assert g_split == split.new_global_id != ga and m.window.gids[m.window.index["A2"]] == g_split
    assert set(m.gallery.gids()) == {ga, g_split, gb}
    assert [p.tracklet_id for p in m.gallery.prototypes(gb)] == ["B1", "C1"]
    result = m.reassociate()                     # the clustering alone would undo both decisions
    assert result.moved == 0
    assert store.link("A2").global_id == g_split != store.link("A1").global_id
    assert store.link("C1").global_id == store.link("B1").global_id == gb


def test_an_operator_change_is_taken_in_by_its_zone_only(store):
    reassoc = ReassociationConfig(every_s=1e9, idle_s=1e9, calibrate=False)
    north = CrossCameraMatcher(store.for_zone("north"), threshold=0.8, rules=plain(), reassociation=reassoc)
    south = CrossCameraMatcher(store.for_zone("south"), threshold=0.8, rules=plain(), reassociation=reassoc)
    north.setup()
    south.setup()
    north.process([emb("N1", "gate", 0, 2, unit(80)), emb("N2", "lobby", 10, 12, unit(81))])
    south.process([emb("S1", "dock", 0, 2, unit(82))])
    g1, g2 = store.link("N1").global_id, store.link("N2").global_id
    store.operator_merge(g1, [g2], operator="test")
    assert south.follow_operators() == 0 and south.gallery.gids() == [store.link("S1").global_id]
    assert north.follow_operators() == 2 and north.gallery.gids() == [g1]


@pytest.mark.parametrize("kind", ["ivf", "gpu"])
def test_background_index_searches_link_a_polled_batch_right_and_survive_a_poison_record(store, kind):
    """A polled batch of 40 over an IVF (or device-copy) gallery, searched 4 at a time with the next 4 searched in the
    background: people seen twice within the batch (the second sighting in the next sub-batch) join
    the identity founded by the first. A record of another dimension in the middle of a batch fails it
    (the runner dead-letters it one by one) and leaves the index neither deferred nor searching, so
    the retry links the rest."""
    m = _matcher(store, index=IndexSettings(kind=kind, nprobe=10_000, fetch=100_000, flush_every=3, batch=4,
                                            hot_s=None, exact_below=1, device="cpu"))
    base = [unit(300 + i) for i in range(30)]
    m.process([emb(f"B{i}", "left", 2.0 * i, 2.0 * i + 1, v) for i, v in enumerate(base)])
    assert m.gallery.index.mode == kind
    people = [unit(400 + i) for i in range(20)]
    batch = []
    for i, v in enumerate(people):
        batch.append(emb(f"P{i}", "left", 100.0 + 10 * i, 101.0 + 10 * i, v))
        batch.append(emb(f"Q{i}", "right", 103.0 + 10 * i, 104.0 + 10 * i, noisy(v, 600 + i)))
    # pairs P_i, Q_i straddle sub-batches: shift by one so that every other pair is split
    batch = [emb("S", "right", 60.0, 61.0, noisy(base[0], 5)), *batch[:-1]]
    m.process(batch)
    assert m._searcher is not None and not m.gallery.index._deferred
    assert store.link("S").global_id == store.link("B0").global_id
    for i in range(19):
        assert store.link(f"Q{i}").global_id == store.link(f"P{i}").global_id, i
    assert len({store.link(f"P{i}").global_id for i in range(19)}) == 19
    bad = emb("X", "left", 400.0, 401.0, np.ones(D + 3, np.float32) / np.sqrt(D + 3))
    good = [emb(f"R{i}", "right", 410.0 + i, 410.5 + i, noisy(people[i], 700 + i)) for i in range(12)]
    with pytest.raises(ValueError, match="dimension"):
        m.process([*good[:6], bad, *good[6:]])
    assert not m.gallery.index._deferred
    m.process(good)  # the runner's retry (the poison record dead-lettered)
    for i in range(12):
        assert store.link(f"R{i}").global_id == store.link(f"P{i}").global_id
    m.release()
    assert m._searcher is None


def test_a_batch_saves_its_prototypes_in_one_write_and_retries_a_failed_one(store, monkeypatch):
    import redis

    m = _matcher(store)
    calls = []
    save = store.save_prototypes
    monkeypatch.setattr(store, "save_prototypes", lambda protos, epoch: (calls.append(sorted(protos)),
                                                                         save(protos, epoch)))
    people = [unit(800 + i) for i in range(4)]
    m.process([emb(f"A{i}", "left", 10.0 * i, 10.0 * i + 1, v) for i, v in enumerate(people)] +
              [emb(f"B{i}", "right", 100.0 + i, 101.0 + i, noisy(v, 900 + i)) for i, v in enumerate(people)])
    gids = sorted({store.link(f"A{i}").global_id for i in range(4)})
    assert calls == [gids]  # one write for the batch, every changed identity in it
    stored = store.load_prototypes()
    assert {p.tracklet_id for p in stored[store.link("A2").global_id][1]} == {"A2", "B2"}

    def down(protos, epoch):
        raise redis.ConnectionError("down")

    monkeypatch.setattr(store, "save_prototypes", down)
    m.process([emb("C0", "gate", 200.0, 201.0, noisy(people[0], 950))])  # linked; its prototypes not saved
    monkeypatch.setattr(store, "save_prototypes", lambda protos, epoch: (calls.append(sorted(protos)),
                                                                         save(protos, epoch)))
    m.process([emb("D1", "gate", 210.0, 211.0, noisy(people[1], 951))])
    assert calls[-1] == sorted({store.link("A0").global_id, store.link("A1").global_id})  # the failed one retried
    assert {p.tracklet_id for p in store.load_prototypes()[store.link("A0").global_id][1]} == {"A0", "B0", "C0"}


def _members(m: CrossCameraMatcher, gid: str) -> set[str]:
    return {p.tracklet_id for p in m.gallery.prototypes(gid)}


def test_a_link_another_matcher_wrote_first_is_taken_back(store, monkeypatch):
    """A sub-batch's links are written in one pipelined round trip after it is decided. A tracklet
    linked by another matcher since the batch's replay check is refused by Redis: this matcher takes
    back what it applied in memory and takes in the other matcher's identity, and a later sighting
    of that person joins it."""
    m = _matcher(store, index=IndexSettings(batch=2))
    other = _matcher(store)
    person, stranger = unit(1000), unit(1001)
    other.process([emb("O1", "gate", 0.0, 1.0, person), emb("T1", "left", 10.0, 11.0, noisy(person, 1))])
    theirs = store.link("T1").global_id
    seen, calls = m.store.linked_among, []
    # the batch's replay check ran before "other" wrote (later looks see Redis as it is)
    monkeypatch.setattr(m.store, "linked_among", lambda tids: set() if not calls.append(1) and len(calls) == 1
                        else seen(tids))
    m.process([emb("S1", "right", 20.0, 21.0, stranger), emb("T1", "left", 10.0, 11.0, noisy(person, 1)),
               emb("S2", "gate", 30.0, 31.0, noisy(stranger, 2))])
    assert len(calls) == 1  # only the replay check was blind: the take-back read Redis as it is
    assert store.link("T1").global_id == theirs and store.identity(theirs).n_tracklets == 2  # Redis kept theirs
    assert m.window.gids[m.window.index["T1"]] == theirs and _members(m, theirs) >= {"T1"}
    assert store.link("S2").global_id == store.link("S1").global_id  # the rest of the batch linked normally
    assert m.links_total == 2 and sorted(g for g in m.gallery.gids()) == sorted({theirs, store.link("S1").global_id})
    m.process([emb("T2", "right", 40.0, 41.0, noisy(person, 3))])
    assert store.link("T2").global_id == theirs


def test_a_failed_link_write_is_reconciled_with_redis_before_the_retry(store, monkeypatch):
    """The connection drops while a sub-batch's links are written, after Redis ran some of them: the
    batch fails as an outage, and before the runner's retry the matcher finds out from Redis which
    links were written, drops the others from memory and reloads their identities, so that the retry
    links every tracklet exactly once and memory agrees with Redis."""
    import redis

    from pipeline.runner import TransientError

    m = _matcher(store, index=IndexSettings(batch=4))
    people = [unit(1100 + i) for i in range(6)]
    first = [emb(f"A{i}", "left", 10.0 * i, 10.0 * i + 1, v) for i, v in enumerate(people)]
    m.process(first)
    batch = [emb(f"B{i}", "right", 100.0 + i, 100.5 + i, noisy(v, 1200 + i)) for i, v in enumerate(people)]
    real = store.record_links

    def dies_half_way(links):
        real(links[:len(links) // 2])
        raise redis.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(store, "record_links", dies_half_way)
    with pytest.raises(TransientError):
        m.process(batch)
    assert store.count_links([r.tracklet_id for r in batch]) == 2  # the first sub-batch's first half
    assert len(m.window) == 6 + 4  # the first sub-batch was applied in memory meanwhile
    monkeypatch.setattr(store, "record_links", real)
    m.process(batch)  # the runner's retry
    assert store.count_links([r.tracklet_id for r in batch]) == 6
    assert sorted(m.window.ids) == sorted([r.tracklet_id for r in first + batch])  # each tracklet once
    for i in range(6):
        gid = store.link(f"A{i}").global_id
        assert store.link(f"B{i}").global_id == gid and store.identity(gid).n_tracklets == 2
        assert _members(m, gid) == {f"A{i}", f"B{i}"}
        assert m.window.gids[m.window.index[f"B{i}"]] == gid
    assert len(m.gallery) == 6


def test_new_identities_take_global_ids_from_reserved_blocks(store):
    """Founding identities reserves ids in Redis a block at a time (as many as the batch has records
    left, at most 64): two matchers never get the same id, and ids grow in founding order."""
    a, b = _matcher(store), _matcher(store)
    a.process([emb(f"A{i}", "left", 10.0 * i, 10.0 * i + 1, unit(1300 + i)) for i in range(3)])
    b.process([emb("B0", "left", 5.0, 6.0, unit(1400))])
    a.process([emb("A3", "left", 100.0, 101.0, unit(1303))])
    got = [store.link(t).global_id for t in ("A0", "A1", "A2", "B0", "A3")]
    assert got == ["G000001", "G000002", "G000003", "G000004", "G000005"]
    assert store.reserve_global_ids(2) == ["G000006", "G000007"] and store.next_global_id() == "G000008"
    with pytest.raises(ValueError):
        store.reserve_global_ids(0)


def test_a_restore_runs_no_cyclic_collection_and_leaves_the_collector_on(store, monkeypatch):
    """Restoring a gallery creates a few objects per identity; the collections that growth would
    trigger (each walking every object made so far) are paused while the window and the stored
    prototypes are loaded."""
    m = _matcher(store)
    m.process([emb(f"C{i}", "left" if i % 2 else "right", 5.0 * i, 5.0 * i + 2, unit(70 + i)) for i in range(300)])
    collections = []

    def seen(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    restore = CrossCameraMatcher._restore

    def watched(self):
        gc.callbacks.append(seen)
        try:
            return restore(self)
        finally:
            gc.callbacks.remove(seen)

    monkeypatch.setattr(CrossCameraMatcher, "_restore", watched)
    gc.unfreeze()
    restarted = _matcher(store)
    assert len(restarted.gallery) == len(m.gallery) > 250
    assert collections == [] and gc.isenabled()
    gc.unfreeze()
    # a restore that fails (Redis gone mid-way) still turns the collector back on
    broken = CrossCameraMatcher(store, threshold=0.8, rules=plain())
    monkeypatch.setattr(broken.store, "load_prototypes", lambda exclude=frozenset(): (_ for _ in ()).throw(OSError()))
    with pytest.raises(OSError):
        broken.setup()
    assert gc.isenabled()


def test_stored_prototypes_load_in_batches_read_ahead(store):
    """load_prototypes reads the next batch while it decodes one: every identity once, with its own
    record, whatever the batch size; a bad record fails the load."""
    from pipeline.store import Prototype, encode_prototypes

    records = {f"G{i:03d}": [Prototype(f"t{i}", "left" if i % 2 else "right", float(i), i + 1.0, 3, unit(300 + i), i)]
               for i in range(23)}
    store.save_prototypes(records, 4)
    store.r.zadd(store._k("identities"), {g: float(i) for i, g in enumerate(records)})
    for batch in (1, 5, 23, 100):
        got = store.load_prototypes(exclude={"G004"}, batch=batch)
        assert sorted(got) == sorted(set(records) - {"G004"})
        assert all(got[g][0] == 4 and [p.tracklet_id for p in got[g][1]] == [f"t{int(g[1:])}"] for g in got)
        np.testing.assert_allclose(got["G017"][1][0].y, records["G017"][0].y, atol=2e-3)
    store.r.set(store._zk("proto", "G020"), encode_prototypes(records["G020"], 4)[:-3])  # cut short
    with pytest.raises(ValueError, match="truncated reidstream prototype record"):
        store.load_prototypes(batch=5)
