"""The cross-camera matcher and the identity store against a real Redis."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.messages import EmbeddingRecord
from pipeline.config import ReassociationConfig
from stages.matcher import CrossCameraMatcher
from stages.matcher.association import Edge, Rules
from tests.unit.pipeline.test_messages import make_tracklet

D = 16


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=D).astype(np.float32)
    return v / np.linalg.norm(v)


def noisy(base: np.ndarray, seed: int, scale: float = 0.05) -> np.ndarray:
    v = base + np.random.default_rng(seed).normal(scale=scale, size=D).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def emb(tid: str, camera: str, start: float, end: float, vec: np.ndarray) -> EmbeddingRecord:
    meta = make_tracklet(tracklet_id=tid, camera=camera, start_s=start, end_s=end,
                         timestamps_s=[start, end]).meta()
    return EmbeddingRecord.from_tracklet(meta, vec, "test", b"\xff\xd8thumb", 0.0)


def plain(**kw) -> Rules:
    """Rules without a scoring space or hand-off bonus: scores are plain cosines."""
    return Rules(**{"max_overlap_s": 0.5, "center": False, "transit_weight": 0.0, **kw})


@pytest.fixture
def matcher(store):
    m = CrossCameraMatcher(store, threshold=0.8, rules=plain())
    m.setup()
    yield m


def test_founds_then_joins_across_cameras(matcher, store):
    a, b = unit(1), unit(2)
    matcher.process([emb("A1", "left", 0, 2, a), emb("B1", "left", 0, 2, b)])
    matcher.process([emb("A2", "right", 3, 5, noisy(a, 10)), emb("B2", "right", 3, 5, noisy(b, 11))])
    assert store.link("A1").score is None and store.link("B1").score is None
    assert store.link("A2").global_id == store.link("A1").global_id
    assert store.link("B2").global_id == store.link("B1").global_id
    assert store.link("A1").global_id != store.link("B1").global_id
    assert store.link("A2").score > 0.8
    idents = {i.global_id: i for i in store.identities()}
    assert idents[store.link("A1").global_id].cameras == ["left", "right"]
    assert store.thumbnail("A2") == b"\xff\xd8thumb"


@pytest.mark.parametrize("reentry", [True, False])
def test_same_camera_reentry_is_configurable(store, reentry):
    m = CrossCameraMatcher(store, threshold=0.8, rules=plain(reentry=reentry))
    m.setup()
    a = unit(3)
    m.process([emb("A1", "left", 0, 2, a), emb("A2", "left", 5, 7, noisy(a, 1))])
    assert (store.link("A1").global_id == store.link("A2").global_id) is reentry


def test_overlapping_tracks_of_one_camera_are_two_people(matcher, store):
    a = unit(3)
    matcher.process([emb("A1", "left", 0, 4, a), emb("A2", "left", 3, 7, noisy(a, 1))])
    assert store.link("A1").global_id != store.link("A2").global_id


def test_simultaneous_sightings_on_other_cameras_are_excluded(matcher, store):
    a = unit(4)
    matcher.process([emb("A1", "left", 0, 10, a)])
    matcher.process([emb("X", "right", 5, 12, noisy(a, 2))])      # overlaps 5 s > 0.5 s: another person
    matcher.process([emb("Y", "middle", 9.8, 14, noisy(a, 3))])   # overlaps 0.2 s: allowed
    assert store.link("X").global_id != store.link("A1").global_id
    assert store.link("Y").global_id == store.link("A1").global_id


def test_topology_min_transit_is_a_cannot_link(store):
    edge = Edge("left", "right", min_transit_s=5.0, max_transit_s=30.0)
    m = CrossCameraMatcher(store, threshold=0.8, rules=plain(topology=(edge,), reentry=False))
    m.setup()
    a = unit(12)
    m.process([emb("A1", "left", 0, 2, a), emb("A2", "right", 4, 6, noisy(a, 1)),    # 2 s: too fast
               emb("A3", "right", 9, 11, noisy(a, 2))])                               # 7 s: possible
    assert store.link("A2").global_id != store.link("A1").global_id
    assert store.link("A3").global_id == store.link("A1").global_id


def test_below_threshold_founds_new_identity(matcher, store):
    matcher.process([emb("A1", "left", 0, 1, unit(5)), emb("B1", "right", 2, 3, unit(6))])
    assert store.link("A1").global_id != store.link("B1").global_id


def test_replay_changes_nothing_and_restart_reloads_window(matcher, store):
    a = unit(7)
    batch = [emb("A1", "left", 0, 1, a), emb("A2", "right", 2, 3, noisy(a, 4))]
    matcher.process(batch)
    before = [lk.to_json() for lk in store.links()]
    matcher.process(batch)  # replay
    assert [lk.to_json() for lk in store.links()] == before
    assert len(store.identities()) == 1

    restarted = CrossCameraMatcher(store, threshold=0.8, rules=plain())
    restarted.setup()
    assert restarted.window.ids == ["A1", "A2"] and set(restarted.window.gids) == {before[0]["global_id"]}
    restarted.process([emb("A3", "left", 10, 11, noisy(a, 5))])
    assert store.link("A3").global_id == before[0]["global_id"]
    assert store.identities()[0].n_tracklets == 3


def test_scoring_space_separates_non_negative_features(store):
    """Non-negative features share a large common component; the fitted scoring space removes it."""
    common = np.abs(unit(8)) * 3
    people = [np.abs(unit(20 + i)) for i in range(5)]
    vec = lambda p, s: (lambda v: v / np.linalg.norm(v))(common + p + np.abs(noisy(p, s, 0.02)))  # noqa: E731
    gallery = [emb(f"L{i}", "left", i * 10, i * 10 + 1, vec(p, i)) for i, p in enumerate(people[:4])]
    stranger = vec(people[4], 77)  # never seen before
    m_raw = CrossCameraMatcher(store, threshold=0.8, rules=plain())
    m_raw.setup()
    m_raw.process(gallery)
    assert m_raw.decide("right", 100, 101, stranger).global_id is not None  # a stranger would join someone

    m_c = CrossCameraMatcher(store, threshold=0.5, rules=plain(center=True),
                             reassociation=ReassociationConfig(calibrate=False))
    m_c.setup()  # reloads the same window, then fits the scoring space on it
    m_c.reassociate()
    assert m_c.space is not None and store.matcher_state()["mean"]
    assert m_c.decide("right", 100, 101, stranger).global_id is None  # scoring space: founds a new identity
    for j in range(4):  # while every known person still finds their own identity
        assert m_c.decide("right", 100, 101, vec(people[j], 50 + j)).global_id == store.link(f"L{j}").global_id


def _partition(store) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for lk in store.links():
        groups.setdefault(lk.global_id, []).append(lk.tracklet_id)
    return sorted(sorted(v) for v in groups.values())


def test_reassociation_merges_with_audit_and_is_idempotent(store):
    """Online, B2 arrives before the link that explains it and founds its own identity; the
    re-association of the window merges it, keeps the oldest id, and audits the merge."""
    a = unit(30)
    m = CrossCameraMatcher(store, threshold=0.9, rules=plain(), reassociation=ReassociationConfig(calibrate=False))
    m.setup()
    m.process([emb("A1", "left", 0, 2, a)])
    m.process([emb("A2", "right", 3, 5, noisy(a, 1, 0.35))])   # a poor view: below 0.9 to A1 alone
    m.process([emb("A3", "middle", 6, 8, noisy(a, 2, 0.05))])
    assert len({store.link(t).global_id for t in ("A1", "A2", "A3")}) >= 2
    m.base_threshold = 0.6  # the re-association's threshold (e.g. a calibration) is lower than online
    result = m.reassociate()
    gid = store.link("A1").global_id
    assert {store.link(t).global_id for t in ("A1", "A2", "A3")} == {gid}
    assert result.merges >= 1 and result.moved >= 1
    records = store.audit()
    assert records and records[-1]["kind"] == "merge" and records[-1]["into"] == gid
    for r in records:
        assert store.resolve(r["from"]) == gid and store.identity(r["from"]) is None
    assert [i.global_id for i in store.identities()] == [gid]
    assert store.identity(gid).n_tracklets == 3 and store.identity(gid).cameras == ["left", "middle", "right"]
    before = ([lk.to_json() for lk in store.links()], store.audit())
    assert m.reassociate().moved == 0                                   # re-association of the same window
    m.process([emb("A2", "right", 3, 5, noisy(a, 1, 0.35))])            # replay of a message
    assert ([lk.to_json() for lk in store.links()], store.audit()) == before
    restarted = CrossCameraMatcher(store, threshold=0.6, rules=plain(), reassociation=ReassociationConfig(calibrate=False))
    restarted.setup()
    assert restarted.reassociate().moved == 0 and set(restarted.window.gids) == {gid}


def test_reassociation_splits_a_wrong_online_join(store):
    a, b = unit(40), unit(41)
    m = CrossCameraMatcher(store, threshold=0.9, rules=plain(), reassociation=ReassociationConfig(calibrate=False))
    m.setup()
    m.threshold = -1.0  # a permissive online state: everything joins the first identity
    m.process([emb("A1", "left", 0, 2, a), emb("B1", "right", 3, 5, b), emb("A2", "middle", 6, 8, noisy(a, 3))])
    gid = store.link("A1").global_id
    assert {store.link(t).global_id for t in ("A1", "B1", "A2")} == {gid}
    result = m.reassociate()
    assert result.splits == 1 and store.link("A1").global_id == gid == store.link("A2").global_id
    assert store.link("B1").global_id != gid
    (record,) = store.audit()
    assert record["kind"] == "split" and record["from"] == gid and record["tracklets"] == ["B1"]
    assert store.identity(gid).cameras == ["left", "middle"]


def test_final_identities_do_not_depend_on_arrival_order(redis_server):
    from pipeline.store import IdentityStore

    rng = np.random.default_rng(0)
    people = [unit(50 + i) for i in range(4)]
    records = [emb(f"P{p}-{c}", cam, 10 * p + 3 * c, 10 * p + 3 * c + 2, noisy(people[p], 100 * p + c, 0.12))
               for p in range(4) for c, cam in enumerate(("left", "right", "middle"))]
    parts = []
    for trial in range(3):
        ns = f"order-{trial}-{rng.integers(1 << 30)}"
        st = IdentityStore(redis_server, ns)
        m = CrossCameraMatcher(st, threshold=0.5, rules=plain(), reassociation=ReassociationConfig(calibrate=False))
        m.setup()
        for i in rng.permutation(len(records)):
            m.process([records[i]])
        m.reassociate()
        parts.append(_partition(st))
        st.reset()
    assert parts[0] == parts[1] == parts[2]
    assert len(parts[0]) == 4


def test_dimension_mismatch_is_an_error(matcher):
    matcher.process([emb("A1", "left", 0, 1, unit(9))])
    with pytest.raises(ValueError, match="dimension"):
        matcher.decide("right", 5, 6, np.ones(D + 1, np.float32))


def test_store_unreachable_is_store_error():
    from pipeline.services import free_port
    from pipeline.store import IdentityStore, StoreError

    s = IdentityStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    with pytest.raises(StoreError, match="not reachable"):
        s.check()


def test_redis_outage_is_transient(store):
    from pipeline.runner import TransientError
    from pipeline.services import free_port
    from pipeline.store import IdentityStore

    m = CrossCameraMatcher(IdentityStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.3))
    with pytest.raises(TransientError):
        m.process([emb("A1", "left", 0, 1, unit(1))])
