"""The cross-camera matcher and the identity store against a real Redis."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.messages import EmbeddingRecord
from stages.matcher import CrossCameraMatcher
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


@pytest.fixture
def matcher(store):
    m = CrossCameraMatcher(store, threshold=0.8, max_overlap_s=0.5, center=False)
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


def test_same_camera_only_identity_is_no_candidate(matcher, store):
    a = unit(3)
    matcher.process([emb("A1", "left", 0, 2, a), emb("A2", "left", 5, 7, noisy(a, 1))])
    assert store.link("A1").global_id != store.link("A2").global_id


def test_simultaneous_sightings_on_other_cameras_are_excluded(matcher, store):
    a = unit(4)
    matcher.process([emb("A1", "left", 0, 10, a)])
    matcher.process([emb("X", "right", 5, 12, noisy(a, 2))])      # overlaps 5 s > 0.5 s: another person
    matcher.process([emb("Y", "right", 9.8, 14, noisy(a, 3))])    # overlaps 0.2 s: allowed
    assert store.link("X").global_id != store.link("A1").global_id
    assert store.link("Y").global_id == store.link("A1").global_id


def test_below_threshold_founds_new_identity(matcher, store):
    matcher.process([emb("A1", "left", 0, 1, unit(5)), emb("B1", "right", 2, 3, unit(6))])
    assert store.link("A1").global_id != store.link("B1").global_id


def test_replay_changes_nothing_and_restart_reloads_gallery(matcher, store):
    a = unit(7)
    batch = [emb("A1", "left", 0, 1, a), emb("A2", "right", 2, 3, noisy(a, 4))]
    matcher.process(batch)
    before = [lk.to_json() for lk in store.links()]
    matcher.process(batch)  # replay
    assert [lk.to_json() for lk in store.links()] == before
    assert len(store.identities()) == 1

    restarted = CrossCameraMatcher(store, threshold=0.8, max_overlap_s=0.5, center=False)
    restarted.setup()
    assert set(restarted.gallery) == {before[0]["global_id"]}
    restarted.process([emb("A3", "left", 10, 11, noisy(a, 5))])
    assert store.link("A3").global_id == before[0]["global_id"]
    assert store.identities()[0].n_tracklets == 3


def test_centering_separates_non_negative_features(store):
    """Non-negative features share a large common component; centring removes it."""
    common = np.abs(unit(8)) * 3
    people = [np.abs(unit(20 + i)) for i in range(5)]
    vec = lambda p, s: (lambda v: v / np.linalg.norm(v))(common + p + np.abs(noisy(p, s, 0.02)))  # noqa: E731
    gallery = [emb(f"L{i}", "left", i * 10, i * 10 + 1, vec(p, i)) for i, p in enumerate(people[:4])]
    stranger = vec(people[4], 77)  # never seen before
    m_raw = CrossCameraMatcher(store, threshold=0.8, center=False)
    m_raw.setup()
    m_raw.process(gallery)
    assert m_raw.decide("right", 100, 101, stranger).global_id is not None  # a stranger would join someone

    m_c = CrossCameraMatcher(store, threshold=0.8, center=True)
    m_c.setup()  # reloads the same gallery and the stored running mean
    assert m_c.embedding_count == 4
    assert m_c.decide("right", 100, 101, stranger).global_id is None  # centred: founds a new identity
    for j in range(4):  # while every known person still finds their own identity
        assert m_c.decide("right", 100, 101, vec(people[j], 50 + j)).global_id == store.link(f"L{j}").global_id


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
