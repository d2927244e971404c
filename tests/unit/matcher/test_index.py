"""The identity index and the gallery decision: exact where it must be, and the same decisions as
scoring every identity under the association rules."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from pipeline.store import Prototype, decode_prototypes, encode_prototypes
from stages.matcher.association import Edge, Rules, ScoringSpace, TransitModel, cannot_link_between
from stages.matcher.gallery import Gallery, Member
from stages.matcher.index import IdentityIndex, IndexSettings


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _vectors(n: int, k: int, seed: int = 0) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32))


def test_exact_search_is_the_brute_force_top_k():
    x, q = _vectors(500, 32), _vectors(7, 32, seed=1)
    idx = IdentityIndex(32, IndexSettings(kind="exact"))
    idx.upsert(np.arange(100, 600), x)
    scores, keys = idx.search(q, 5)
    want = np.argsort(-(q @ x.T), axis=1)[:, :5] + 100
    np.testing.assert_array_equal(keys, want)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, want - 100, 1), rtol=1e-5)


def test_search_pads_when_fewer_keys_than_asked():
    idx = IdentityIndex(4, IndexSettings(kind="exact"))
    idx.upsert([3], _vectors(1, 4))
    scores, keys = idx.search(_vectors(2, 4, 1), 3)
    assert keys.tolist() == [[3, -1, -1], [3, -1, -1]] and np.isinf(scores[:, 1:]).all()


@pytest.mark.parametrize("floor", [-np.inf, -1.0, 0.2, 0.45, 0.7, 2.0])
def test_search_above_is_the_exact_top_k_cut_at_the_floor(floor):
    """Few pass (0.45, 0.7), most pass (-1, 0.2: the partial-sort path), none (2), no floor; removed
    keys never come back."""
    x, q = _unit(_vectors(600, 16)), _unit(_vectors(40, 16, seed=2))
    idx = IdentityIndex(16, IndexSettings(kind="exact"))
    idx.upsert(np.arange(600), x)
    idx.remove(np.arange(0, 600, 7))
    want_s, want_k = idx.exact_search(q, 12)
    got_s, got_k = idx.search_above(q, 12, floor)
    below = want_s < floor
    np.testing.assert_array_equal(got_k, np.where(below, -1, want_k))
    np.testing.assert_allclose(got_s, np.where(below, -np.inf, want_s), rtol=0, atol=1e-6)
    assert not np.isin(got_k, np.arange(0, 600, 7)).any()


@pytest.mark.parametrize("kind", ["exact", "ivf", "gpu"])
def test_upsert_replaces_and_remove_forgets(kind):
    x = _vectors(400, 16)
    # every cell probed: exact; kind gpu on the CPU, from the first vector on
    idx = IdentityIndex(16, IndexSettings(kind=kind, nprobe=10_000, device="cpu", exact_below=1))
    idx.upsert(np.arange(400), x)
    assert idx.approximate is (kind == "ivf") and idx.mode == kind and idx.built is (kind != "exact")
    target = _vectors(1, 16, seed=5)[0]
    idx.upsert([7], target[None, :])           # key 7 now sits exactly on the query
    assert idx.search(target[None, :], 1)[1][0, 0] == 7
    assert idx.remove([7, 9999]) == 1 and len(idx) == 399
    _, keys = idx.search(target[None, :], 400)
    assert 7 not in keys[0] and set(keys[0][keys[0] >= 0]) == set(range(400)) - {7}


def test_ivf_with_every_cell_probed_is_exact_and_the_default_is_close():
    x, q = _vectors(4000, 32), _vectors(50, 32, seed=2)
    exact = IdentityIndex(32, IndexSettings(kind="exact"))
    exact.upsert(np.arange(4000), x)
    want = exact.search(q, 10)[1]
    full = IdentityIndex(32, IndexSettings(kind="ivf", nprobe=10_000))
    full.upsert(np.arange(4000), x)
    np.testing.assert_array_equal(full.search(q, 10)[1], want)
    some = IdentityIndex(32, IndexSettings(kind="ivf", nprobe=8))
    some.upsert(np.arange(4000), x)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(some.search(q, 10)[1], want)])
    assert 0.3 < recall < 1.0  # approximate, yet far from random (10 of 4000)


def test_auto_switches_to_ivf_at_the_threshold_and_bulk_trains_once():
    idx = IdentityIndex(8, IndexSettings(kind="auto", exact_below=300))
    idx.upsert(np.arange(299), _vectors(299, 8))
    assert not idx.approximate
    idx.upsert([299], _vectors(1, 8, 3))
    assert idx.approximate
    with idx.bulk():
        idx.upsert(np.arange(300, 1000), _vectors(700, 8, 4))
        assert not idx.approximate
    assert idx.approximate and idx._trained_on == 1000


@pytest.mark.parametrize("compact_every", [4096, 5])
def test_ivf_updates_are_searched_before_and_after_they_are_flushed(compact_every):
    """Random upserts and removals under an IVF that probes every cell and re-scores every code: each
    search equals an exact index holding the same vectors, whether a change still sits in the pending
    buffer or was written into the IVF (flush_every 7, so both happen), with the entries the flushes
    replaced left in place (4096) or removed every few flushes (5); rows freed by removals are taken
    by new keys meanwhile."""
    rng = np.random.default_rng(3)
    full = IndexSettings(kind="ivf", nprobe=10_000, fetch=100_000, flush_every=7, compact_every=compact_every)
    ivf, exact = IdentityIndex(16, full), IdentityIndex(16, IndexSettings(kind="exact"))
    x = _vectors(1500, 16)
    for idx in (ivf, exact):
        idx.upsert(np.arange(1500), x)
    assert ivf.approximate and not exact.approximate
    pending_seen = 0
    for step in range(120):
        keys = rng.choice(1600, int(rng.integers(1, 5)), replace=False)
        if rng.random() < 0.3:
            assert ivf.remove(keys) == exact.remove(keys)
        else:
            v = _vectors(len(keys), 16, seed=100 + step)
            ivf.upsert(keys, v)
            exact.upsert(keys, v)
        pending_seen += bool(ivf._pending_rows)
        q = _vectors(3, 16, seed=1000 + step)
        got, want = ivf.search(q, 10), exact.search(q, 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert len(ivf) == len(exact) and pending_seen > 20 and ivf._ivf.ntotal + len(ivf._pending_rows) >= len(ivf)
    ivf.flush()
    # the flushes left the entries they replaced in place (skipped by every search above), and a
    # compaction removes them: removed vectors leave the IVF too
    stale = len(ivf._stale_ids)
    assert not ivf._pending_rows and ivf._ivf.ntotal == len(ivf) + stale
    assert stale < 5 if compact_every == 5 else stale > 100
    assert ivf.compact() == stale and ivf._ivf.ntotal == len(ivf) and not ivf._stale_ids
    np.testing.assert_array_equal(ivf.search(q, 10)[1], exact.search(q, 10)[1])


def test_ivf_codes_keep_the_principal_directions():
    """A 128-d gallery that varies in 12 directions, coded on 32 principal directions: with every cell
    probed the codes lose nothing of the ranking, so the IVF top-10 is the exact one (and the query
    is projected, not centred, as the module explains)."""
    rng = np.random.default_rng(4)
    basis = np.linalg.qr(rng.standard_normal((128, 12)))[0].T
    offset = _vectors(1, 128, 9)[0] * 0.5   # a common direction, removed by the centring
    x = _unit(rng.standard_normal((3000, 12)) @ basis + offset)
    q = _unit(rng.standard_normal((20, 12)) @ basis + offset)
    ivf = IdentityIndex(128, IndexSettings(kind="ivf", nprobe=10_000, fetch=100_000, code_dim=32))
    ivf.upsert(np.arange(3000), x)
    assert ivf._proj is not None and ivf._proj.shape == (128, 32)
    want = np.argsort(-(q @ x.T), axis=1)[:, :10]
    np.testing.assert_array_equal(ivf.search(q, 10)[1], want)
    few = IdentityIndex(128, IndexSettings(kind="ivf", nprobe=1, code_dim=32))
    few.upsert(np.arange(3000), x)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(few.search(q, 10)[1], want)])
    assert recall < 1.0  # one cell of ~110: approximate, so the first assertion tested something


# -------------------------------------------------------------------------------------------------
def _reference(z, camera, start, end, idents, rules, transit, threshold, ttl=None):
    """Score every identity the way the matcher's rules read (mean over prototypes of cosine plus
    hand-off bonus; blocked by any cannot-linked member or the TTL)."""
    best, best_gid = -np.inf, None
    for gid, (members, protos) in idents.items():
        cannot = cannot_link_between([camera], np.array([start]), np.array([end]), [m.camera for m in members],
                                     np.array([m.start_s for m in members]), np.array([m.end_s for m in members]),
                                     rules.max_overlap_s, rules.reentry, rules.topology)[0]
        if cannot.any() or (ttl is not None and start - max(m.end_s for m in members) > ttl):
            continue
        s = []
        for p in protos:
            bonus = 0.0
            if p.camera != camera and rules.transit_weight > 0:
                gap = start - p.end_s if start >= p.start_s else p.start_s - end
                bonus = rules.transit_weight * float(transit.support(camera, p.camera, np.array([gap]))[0])
            s.append(float(_unit(p.y) @ z) + bonus)
        score = float(np.mean(s))
        if score > best:
            best, best_gid = score, gid
    return (best_gid, best) if best >= threshold else (None, None)


def _site(seed: int, n_ids: int = 60, dim: int = 24):
    rng = np.random.default_rng(seed)
    cams = ["a", "b", "c"]
    centres = _vectors(n_ids, dim, seed)
    groups, arrival = {}, 0
    for g in range(n_ids):
        members = []
        t = float(rng.uniform(0, 200))
        for _ in range(int(rng.integers(1, 5))):
            arrival += 1
            start = t + float(rng.uniform(0, 30))
            members.append(Member(f"t{arrival}", cams[int(rng.integers(3))], start, start + float(rng.uniform(1, 8)),
                                  int(rng.integers(1, 20)), (centres[g] + 0.3 * _vectors(1, dim, arrival)[0]) * 1.7,
                                  arrival))
        groups[f"G{g:06d}"] = members
    return groups, centres


@pytest.mark.parametrize("kind,candidates", [("exact", 64), ("exact", 1), ("ivf", 2), ("gpu", 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reentry,min_transit_s", [(True, 5.0), (True, 40.0), (False, 5.0)])
def test_gallery_decision_equals_scoring_every_identity(kind, candidates, seed, reentry, min_transit_s):
    """Identities last seen long before a tracklet (beyond the longest minimum transit) are not
    checked member by member; with a longer transit minimum, and without re-entry (where any
    member on the same camera blocks, however old), decisions are still those of every rule."""
    groups, centres = _site(seed)
    rules = Rules(max_overlap_s=0.5, reentry=reentry, topology=(Edge("a", "c", min_transit_s, 90.0),),
                  transit_weight=0.05)
    transit = TransitModel(edges=rules.topology, gaps={("a", "b"): tuple(np.linspace(2, 6, 20))})
    gallery = Gallery(prototypes_per_camera=2, settings=IndexSettings(kind=kind, nprobe=10_000, candidates=candidates,
                                                                      device="cpu", exact_below=1))
    gallery.replace(groups)
    idents = {g: (ms, gallery.prototypes(g)) for g, ms in groups.items()}
    assert all(len(p) <= 2 * 3 for _, p in idents.values())
    rng = np.random.default_rng(100 + seed)
    agree = 0
    for i in range(40):
        g = int(rng.integers(len(centres)))
        z = _unit(centres[g] + 0.4 * _vectors(1, centres.shape[1], 1000 + i)[0])
        cam = "abc"[i % 3]
        start = float(rng.uniform(0, 260))
        end = start + 5
        got = gallery.best(z, cam, start, end, 0.2, rules, transit, ttl_s=150.0)
        want = _reference(z, cam, start, end, idents, rules, transit, 0.2, ttl=150.0)
        assert got[0] == want[0]
        if want[0] is not None:
            assert got[1] == pytest.approx(want[1], abs=1e-5)
            agree += 1
    assert agree > 5  # the cases exercise joins, not only "found a new identity"


def test_prototypes_are_the_longest_observed_per_camera():
    g = Gallery(prototypes_per_camera=2)
    y = _vectors(5, 8)
    for i, (cam, q) in enumerate([("a", 3), ("a", 9), ("a", 5), ("b", 1), ("a", 9)]):
        g.add("G1", Member(f"t{i}", cam, float(i), i + 1.0, q, y[i], i))
    assert [p.tracklet_id for p in g.prototypes("G1")] == ["t1", "t4", "t3"]
    np.testing.assert_allclose(g.index.vector(g.code("G1")), _unit(y[[1, 4, 3]]).mean(0), rtol=1e-6)
    assert len(g.members("G1")) == 5


def test_changes_of_scoring_space_carry_kept_prototypes_over():
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((600, 40)).astype(np.float32) + 0.5)
    old = ScoringSpace.fit(x[:300], None)        # centre only: the map is exact
    new = ScoringSpace.fit(x[300:], None)
    a, c = new.change_from(old)
    assert a is None
    np.testing.assert_allclose(old.project(x[:5]) + c, new.project(x[:5]), atol=1e-5)
    a, c = new.change_from(None)                # raw unit embeddings into a fitted space: exact as well
    np.testing.assert_allclose((x[:5] if a is None else x[:5] @ a) + c, new.project(x[:5]), atol=1e-5)
    a, c = ScoringSpace.fit(x[300:], 16).change_from(None)
    np.testing.assert_allclose(x[:5] @ a + c, ScoringSpace.fit(x[300:], 16).project(x[:5]), atol=1e-5)
    p_old, p_new = ScoringSpace.fit(x[:300], 16), ScoringSpace.fit(x[300:], 16)
    aligned, r = p_new.aligned_to(p_old)
    assert r is not None
    zn, za = p_new.transform(x[:20]), aligned.transform(x[:20])
    np.testing.assert_allclose(zn @ zn.T, za @ za.T, atol=1e-5)   # a rotation: the same cosines
    assert np.linalg.norm(aligned.change_from(p_old)[0] - np.eye(16)) < np.linalg.norm(p_new.change_from(p_old)[0] - np.eye(16))
    g = Gallery()
    g.replace({"G1": [Member("t", "a", 0.0, 1.0, 3, old.project(x[0]), 1)]})
    g.reexpress(*new.change_from(old))
    np.testing.assert_allclose(g.prototypes("G1")[0].y, new.project(x[0]), atol=1e-5)
    np.testing.assert_allclose(g.index.vector(g.code("G1")), new.transform(x[0]), atol=1e-5)


def test_prototype_records_round_trip_compactly():
    protos = [Prototype("t1", "left", 1.5, 3.0, 12, _vectors(1, 256)[0], 4),
              Prototype("t2", "right", 4.0, 6.5, 3, _vectors(1, 256, 1)[0], 9)]
    blob = encode_prototypes(protos, 7)
    assert len(blob) < 2 * 256 * 2 + 200
    epoch, back = decode_prototypes(blob)
    assert epoch == 7 and [p.tracklet_id for p in back] == ["t1", "t2"] and back[1].camera == "right"
    np.testing.assert_allclose(back[0].y, protos[0].y, atol=2e-3)
    with pytest.raises(ValueError):
        decode_prototypes(blob[:-3])
    with pytest.raises(ValueError):
        decode_prototypes(b"nope" + blob[4:])


def test_the_hot_tier_finds_recent_identities_the_ivf_misses():
    dim, n = 32, 3000
    x = _vectors(n, dim, seed=3)
    groups = {f"G{i:05d}": [Member(f"t{i}", "a", float(i), i + 1.0, 5, x[i], i)] for i in range(n)}
    queries = _unit(x[-300:] + 0.5 * _vectors(300, dim, seed=4))   # the 300 most recent identities return
    rules = Rules(transit_weight=0.0)
    found = {}
    for hot_s in (None, 400.0):
        g = Gallery(settings=IndexSettings(kind="ivf", nprobe=1, candidates=8, hot_s=hot_s))
        with g.bulk(dim):
            g.replace(groups)
        assert g.index.approximate
        found[hot_s] = sum(g.best(q, "b", n + 10.0, n + 12.0, 0.3, rules, TransitModel())[0] == f"G{n - 300 + i:05d}"
                           for i, q in enumerate(queries))
    assert found[400.0] == 300 and found[None] < 290   # one probed cell misses many; the hot tier none


def test_the_hot_tier_keeps_the_most_recently_seen_up_to_hot_max():
    """At most ``hot_max`` identities are hot, the most recently seen; one that fell out comes back
    when it is seen again, and one that merely grew old leaves at the next cool()."""
    dim = 16
    x = _vectors(200, dim, seed=8)
    g = Gallery(settings=IndexSettings(kind="ivf", nprobe=1, hot_s=1000.0, hot_max=16))
    with g.bulk(dim):
        g.replace({f"G{i:03d}": [Member(f"g{i}", "a", float(i), i + 1.0, 5, x[i], i)] for i in range(100)})
    assert g.index.approximate and len(g.hot) == 14  # over 16: trimmed to 7/8 of it
    assert g.hot.rows_used <= 20  # and the rows the load freed packed: a search scans them all
    assert sorted(g.hot.keys().tolist()) == [g.code(f"G{i:03d}") for i in range(86, 100)]
    sizes = []
    for i in range(100, 200):  # one new identity per second
        g.add(f"G{i:03d}", Member(f"g{i}", "b", float(i), i + 1.0, 5, x[i], i))
        sizes.append(len(g.hot))
        assert g.code(f"G{i:03d}") in g.hot
    assert max(sizes) == 16 and min(sizes) == 14
    newest = sorted(g.gids(), key=g.last_seen)[-len(g.hot):]
    assert sorted(g.hot.keys().tolist()) == sorted(g.code(gid) for gid in newest)
    assert g.code("G050") not in g.hot
    g.add("G050", Member("again", "c", 300.0, 301.0, 5, x[50], 300))  # seen again: hot again
    assert g.code("G050") in g.hot
    g.add("G199", Member("late", "c", 1250.0, 1251.0, 5, x[199], 301))  # all others but G050 are now over 1000 s old
    hot = len(g.hot)
    assert g.cool() == hot - 2
    assert sorted(g.hot.keys().tolist()) == sorted([g.code("G050"), g.code("G199")])


def test_the_batch_path_searches_the_hot_tier_once_per_sub_batch():
    """The online path's candidates carry the hot tier's, searched for the whole sub-batch in one
    product: the recent identities a one-cell IVF misses are found as one decision at a time finds
    them, and only the ``hot_max`` most recent are certain to be."""
    from stages.matcher.matcher import CrossCameraMatcher

    dim, n = 32, 3000
    x = _vectors(n, dim, seed=3)
    queries = _unit(x[-300:] + 0.5 * _vectors(300, dim, seed=4))
    for hot_max, search_threads in ((4096, 1), (4096, 0), (100, 1)):
        m = CrossCameraMatcher(store=None, threshold=0.3, rules=Rules(transit_weight=0.0),  # type: ignore[arg-type]
                               index=IndexSettings(kind="ivf", nprobe=1, candidates=8, hot_s=400.0, hot_max=hot_max,
                                                   batch=64, search_threads=search_threads))
        with m.gallery.bulk(dim):
            m.gallery.replace({f"G{i:05d}": [Member(f"t{i}", "a", float(i), i + 1.0, 5, x[i], i)] for i in range(n)})
        ys = [m._project(q) for q in queries]
        got = []
        with m.online(), contextlib.closing(m._candidate_batches(ys)) as parts:
            for rows, pre, touched in parts:
                for i, p in zip(rows, pre):
                    assert p.hot_codes is not None and len(p.hot_codes) == 8
                    got.append(m._decide("b", n + 10.0, n + 12.0, ys[i], p, touched).global_id)
        one_by_one = [m._decide("b", n + 10.0, n + 12.0, y, None, ()).global_id for y in ys]
        assert got == one_by_one  # nothing changed the gallery meanwhile
        right = [gid == f"G{n - 300 + i:05d}" for i, gid in enumerate(got)]
        if hot_max >= 300:
            assert all(right)
        else:
            assert all(right[-(hot_max - hot_max // 8):]) and not all(right)
        m.release()


def test_online_path_holds_blas_to_one_thread_only_while_the_ivf_is_used():
    from threadpoolctl import threadpool_info

    from stages.matcher.matcher import CrossCameraMatcher

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    outside = blas_threads()
    m = CrossCameraMatcher(store=None, index=IndexSettings(kind="exact"))  # type: ignore[arg-type]
    m.gallery.replace({f"G{i}": [Member(f"t{i}", "a", 0.0, 1.0, 1, v, i)] for i, v in enumerate(_vectors(50, 8))})
    with m.online():
        assert blas_threads() == outside  # exact search: numpy keeps its threads
    m = CrossCameraMatcher(store=None, index=IndexSettings(kind="ivf"))  # type: ignore[arg-type]
    m.gallery.replace({f"G{i}": [Member(f"t{i}", "a", 0.0, 1.0, 1, v, i)] for i, v in enumerate(_vectors(50, 8))})
    assert m.gallery.index.approximate
    with m.online():
        assert blas_threads() and set(blas_threads()) == {1}
    assert blas_threads() == outside


def test_deferred_holds_the_ivf_still_and_catches_up_on_exit():
    """Inside ``deferred()`` no flush or retraining changes the IVF (a search may run on another
    thread); searches stay exact meanwhile, and on exit the due flush and retraining happen."""
    full = IndexSettings(kind="ivf", nprobe=10_000, fetch=100_000, flush_every=5, retrain_growth=1.5)
    ivf, exact = IdentityIndex(16, full), IdentityIndex(16, IndexSettings(kind="exact"))
    x = _vectors(400, 16)
    for idx in (ivf, exact):
        idx.upsert(np.arange(400), x)
    trained, total = ivf._ivf, ivf._ivf.ntotal
    with ivf.deferred():
        with ivf.deferred():  # blocks nest
            v = _vectors(300, 16, seed=9)
            for i in range(300):  # 60 flushes' worth of changes and a retraining's growth
                ivf.upsert([400 + i], v[i:i + 1])
                exact.upsert([400 + i], v[i:i + 1])
            ivf.remove([3, 4])
            exact.remove([3, 4])
        assert ivf._ivf is trained and ivf._ivf.ntotal == total and len(ivf._pending_rows) == 302
        q = _vectors(4, 16, seed=10)
        np.testing.assert_array_equal(ivf.search(q, 10)[1], exact.search(q, 10)[1])
    assert ivf._ivf is not trained and not ivf._pending_rows and ivf._ivf.ntotal == len(ivf) == 698
    np.testing.assert_array_equal(ivf.search(q, 10)[1], exact.search(q, 10)[1])


class _Searcher:
    """Stands in for the matcher's search thread at the two extremes of timing: the next sub-batch
    searched at once (before any change of the current one) or only when its result is asked for
    (after all of them)."""

    def __init__(self, when: str) -> None:
        self.when = when

    def submit(self, fn, *args):
        from concurrent.futures import Future

        done: Future = Future()
        if self.when == "early":
            done.set_result(fn(*args))
            return done

        class Late:
            def result(self):
                return fn(*args)

            def cancel(self):  # as if a search thread had started on it
                return False

        return Late()

    def shutdown(self, wait: bool = True) -> None:
        pass


@pytest.mark.parametrize("batch,timing,threads,tail", [
    (4, "thread", 1, False), (7, "thread", 2, False), (9, "thread", 3, False), (4, "early", 1, False),
    (6, "early", 2, False), (5, "late", 1, False), (8, "late", 2, False),
    (6, "thread", 1, True), (9, "thread", 2, True), (8, "early", 1, True), (7, "late", 2, True),
    (5, "thread", 0, False), (8, "thread", 0, True)])
def test_background_searches_decide_as_brute_force(batch, timing, threads, tail, monkeypatch):
    """The matcher's online path with the next sub-batch searched in the background (index.batch
    4 to 9 over polled batches of 48, shared by 1 to 3 search threads) sends every tracklet where
    scoring every identity does: new people seen again in the next sub-batch join the identity
    founded there, though the search that found the later one's candidates may have run before it
    existed (``early``), after (``late``) or meanwhile (real threads). ``tail``: half of each next
    sub-batch is left for the matcher's thread to search when it comes to wait (unless a search
    thread took it first), after this sub-batch's changes."""
    from stages.matcher.matcher import CrossCameraMatcher

    if tail:
        monkeypatch.setattr(CrossCameraMatcher, "_tail_share", lambda self, searched, decided: searched // 2)

    dim = 32
    gallery = _vectors(300, dim, seed=5)
    people = _vectors(24, dim, seed=6)

    def run(settings: IndexSettings, batched: bool = True) -> list[tuple[str | None, float | None]]:
        m = CrossCameraMatcher(store=None, threshold=0.85, rules=Rules(transit_weight=0.0),  # type: ignore[arg-type]
                               index=settings)
        if settings.kind in ("ivf", "gpu") and timing != "thread":
            m._searcher = _Searcher(timing)
        m.gallery.replace({f"G{i:04d}": [Member(f"g{i}", "a", 0.0, 1.0, 1, v, i)] for i, v in enumerate(gallery)})
        out, arrival = [], 1000
        for s in range(0, 96, 48):
            recs = []
            for j in range(48):
                n = s + j
                who = people[(n + 2) // 4 % 24] if n % 3 else gallery[n]  # a new person four times in a row
                recs.append((f"q{n}", "bcd"[n % 3], 10.0 + 10 * n, 15.0 + 10 * n,
                             _unit(who + 0.1 * _vectors(1, dim, seed=100 + n)[0])))
            ys = [m._project(r[4]) for r in recs]
            if not batched:  # one exact search per decision, after every earlier change: brute force
                for i, (tid, cam, start, end, _) in enumerate(recs):
                    d = m._decide(cam, start, end, ys[i], None, ())
                    out.append((d.global_id, d.score))
                    arrival += 1
                    m.gallery.add(d.global_id or f"N{tid}", Member(tid, cam, start, end, 1, ys[i], arrival))
                continue
            with m.online(), contextlib.closing(m._candidate_batches(ys)) as parts:
                for rows, pre, touched in parts:
                    for i, p in zip(rows, pre):
                        tid, cam, start, end, _ = recs[i]
                        d = m._decide(cam, start, end, ys[i], p, touched)
                        gid = d.global_id
                        out.append((gid, d.score))
                        arrival += 1
                        gid = gid or f"N{tid}"
                        m.gallery.add(gid, Member(tid, cam, start, end, 1, ys[i], arrival))
                        touched.append(m.gallery.code(gid))
        if settings.kind in ("ivf", "gpu"):  # searched in the background, unless no search thread is wanted
            assert m.gallery.index.built
            assert (m._searcher is not None) == (threads > 0) and not m.gallery.index._deferred
        if settings.kind == "gpu":  # nothing for a hot tier to make up for, though hot_s is set
            assert m.gallery.hot is None and settings.hot_s is not None
        elif settings.hot_s is not None:
            assert 0 < len(m.gallery.hot) <= settings.hot_max
        m.release()
        return out

    want = run(IndexSettings(kind="exact"), batched=False)
    for settings in (IndexSettings(kind="exact", batch=batch),
                     IndexSettings(kind="ivf", nprobe=10_000, fetch=100_000, flush_every=3, batch=batch, hot_s=None,
                                   search_threads=threads),
                     # with a hot tier, kept to 8 identities (trimmed within the polls) and searched with the rest
                     IndexSettings(kind="ivf", nprobe=10_000, fetch=100_000, flush_every=3, batch=batch, hot_s=200.0,
                                   hot_max=8, search_threads=threads),
                     # brute force on a device copy (the CPU here), written every 3 changes
                     IndexSettings(kind="gpu", device="cpu", exact_below=1, fetch=100_000, flush_every=3,
                                   batch=batch, search_threads=threads)):
        got = run(settings)
        assert [g for g, _ in got] == [g for g, _ in want]
        # the same scores too (the link's score), each changed identity's as it is now
        assert np.allclose([np.nan if s is None else s for _, s in got], [np.nan if s is None else s for _, s in want],
                           atol=1e-5, equal_nan=True)
    joined_new = sum(1 for n, (g, _) in enumerate(want) if n % 3 and g is not None and not g.startswith("G"))
    assert joined_new > 20  # later sightings of new people joined identities founded in the same poll


def test_search_threads_default_to_the_cores_this_process_may_use(monkeypatch):
    from stages.matcher import matcher as mod

    monkeypatch.setattr(mod.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert mod.search_threads(None) == 0  # one core (taskset, a container's quota): search in line
    monkeypatch.setattr(mod.os, "sched_getaffinity", lambda pid: {0, 1, 2, 5}, raising=False)
    assert mod.search_threads(None) == 3
    assert mod.search_threads(0) == 0 and mod.search_threads(2) == 2  # as configured
    with pytest.raises(ValueError, match="search_threads"):
        IndexSettings(search_threads=-1)


def test_tail_share_balances_the_matchers_thread_and_the_search_threads():
    """The share of the next sub-batch the matcher's thread searches itself: none until both speeds
    are measured, so that ``decided·d + t·s = (searched − t)·s / n``, at most half, none when small."""
    from stages.matcher.matcher import CrossCameraMatcher

    m = CrossCameraMatcher(store=None, index=IndexSettings(search_threads=1))  # type: ignore[arg-type]
    assert m._tail_share(256, 256) == 0  # nothing measured yet
    m._search_s, m._decide_s = 1e-3, 0.5e-3
    assert m._tail_share(256, 256) == 64  # 256·0.5 + 64·1 = 192·1
    m._decide_s = 1e-3
    assert m._tail_share(256, 256) == 0  # deciding is as slow as searching: no time left over
    m._decide_s = 0.0
    assert m._tail_share(256, 256) == 128  # at most half
    m._decide_s = 0.45e-3
    assert m._tail_share(256, 256) == 70 and m._tail_share(40, 40) == 0  # under _MIN_SHARE records: none
    m.gallery.settings = IndexSettings(search_threads=3)
    m._decide_s = 0.5e-3
    assert m._tail_share(256, 128) == 16  # 128·0.5 + 16·1 = 240·1 / 3


def test_the_tail_share_is_searched_by_the_caller_unless_a_search_thread_took_it():
    """A tail share no search thread has started when the caller comes to wait is searched on the
    caller's thread; one a search thread already took is waited for. The results come in the order
    of the records either way, as one search of all of them gives them."""
    from stages.matcher.matcher import CrossCameraMatcher

    m = CrossCameraMatcher(store=None, rules=Rules(transit_weight=0.0),  # type: ignore[arg-type]
                           index=IndexSettings(kind="ivf", nprobe=10_000, fetch=100_000, search_threads=1, hot_s=None))
    x = _vectors(200, 16, seed=3)
    m.gallery.replace({f"G{i:03d}": [Member(f"g{i}", "a", 0.0, 1.0, 1, v, i)] for i, v in enumerate(x)})
    ys = [m._project(v) for v in _vectors(12, 16, seed=4)]
    seen, real, main = [], m._prefetch, threading.get_ident()
    gate = threading.Event()

    def spy(part):
        seen.append((threading.get_ident() == main, len(part)))
        if threading.get_ident() == main:
            gate.set()  # the caller took the tail: the search thread may go on
        return real(part)

    try:
        alone = real(ys)
        m._prefetch = spy
        m._search_shared(ys[:1])()  # starts the search thread
        seen.clear()
        m._searcher.submit(gate.wait, 10)  # the search thread is busy: neither share has started
        got = m._search_shared(ys, tail=4)()
        assert sorted(seen) == [(False, 8), (True, 4)]  # the head on the search thread, the tail here
        assert [p.codes.tolist() for p in got] == [p.codes.tolist() for p in alone]
        seen.clear()
        results = m._search_shared(ys, tail=4)
        for _ in range(1000):  # the idle search thread takes both shares (waits up to 10 s)
            if len(seen) == 2:
                break
            threading.Event().wait(0.01)
        got = results()
        assert sorted(seen) == [(False, 4), (False, 8)]
        assert [p.codes.tolist() for p in got] == [p.codes.tolist() for p in alone]
        assert m._search_s is not None and m._search_s > 0  # the search threads' speed is measured
    finally:
        m.release()


def test_search_threads_run_faiss_on_one_thread_each():
    """The online path's search threads each run faiss on one OpenMP thread (the decisions need the
    other cores); the caller's own faiss setting is left alone."""
    import faiss

    from stages.matcher.matcher import CrossCameraMatcher

    m = CrossCameraMatcher(store=None, rules=Rules(transit_weight=0.0),  # type: ignore[arg-type]
                           index=IndexSettings(kind="ivf", nprobe=10_000, fetch=100_000, search_threads=2, hot_s=None))
    x = _vectors(200, 16, seed=3)
    m.gallery.replace({f"G{i:03d}": [Member(f"g{i}", "a", 0.0, 1.0, 1, v, i)] for i, v in enumerate(x)})
    before = faiss.omp_get_max_threads()
    try:
        got = m._search_shared([m._project(v) for v in _vectors(6, 16, seed=4)])()
        assert len(got) == 6 and all(c is not None for c in got)
        shares = [m._searcher.submit(faiss.omp_get_max_threads) for _ in range(4)]
        assert [f.result() for f in shares] == [1] * 4
        assert faiss.omp_get_max_threads() == before
        # a search the caller waits for at once: the caller's thread searches a share as well, on one
        # faiss thread, and gets its setting back; the results come in the order of the records
        seen, real, main = [], m._prefetch, threading.get_ident()

        def spy(ys):
            seen.append((threading.get_ident() == main, faiss.omp_get_max_threads(), len(ys)))
            return real(ys)

        m._prefetch = spy
        ys = [m._project(v) for v in _vectors(9, 16, seed=5)]
        now = m._search_shared(ys, now=True)()
        alone = real(ys)
        assert [p.codes.tolist() for p in now] == [p.codes.tolist() for p in alone]
        assert len(seen) == 3 and sum(n for *_, n in seen) == 9 and any(mine for mine, *_ in seen)
        assert all(t == 1 for _, t, _ in seen) and faiss.omp_get_max_threads() == before
    finally:
        m.release()


def test_a_bulk_load_gives_the_gallery_a_link_by_link_build_gives():
    # replace() writes the means in place and reserves the index's rows at once: the same vectors,
    # last sightings and prototypes as adding each member in turn
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    x[7] = 0  # a zero prototype counts as zero
    groups = {f"G{i:03d}": [Member(f"t{i}-{j}", f"c{(i + j) % 3}", float(i + 2 * j), i + 2 * j + 1.0, 3 + j % 2,
                                   x[(i + 5 * j) % 400], 10 * i + j) for j in range(1 + (i % 4 == 0) * 2)]
              for i in range(400)}
    bulk, online = Gallery(settings=IndexSettings(kind="exact")), Gallery(settings=IndexSettings(kind="exact"))
    with bulk.bulk(16):
        bulk.replace(groups)
    for gid, members in groups.items():
        for mem in members:
            online.add(gid, mem)
    assert bulk.gids() == online.gids() and len(bulk.index) == 400
    codes = np.array([bulk.code(g) for g in bulk.gids()])
    assert np.array_equal(bulk.index.vectors(codes), online.index.vectors(codes))  # bit for bit
    assert not bulk.index.vectors(np.array([bulk.code("G007")])).any()
    for gid in ("G000", "G001", "G399"):
        assert bulk.last_seen(gid) == online.last_seen(gid) == max(m.end_s for m in groups[gid])
        assert [p.tracklet_id for p in bulk.prototypes(gid)] == [p.tracklet_id for p in online.prototypes(gid)]
        assert np.array_equal(bulk.members(gid), online.members(gid))
    with pytest.raises(ValueError, match=r"prototypes of \[8, 16\] dimensions"):
        bulk.replace({"A": [Member("a", "c0", 0.0, 1.0, 1, x[0], 1)],
                      "B": [Member("b", "c0", 0.0, 1.0, 1, x[0][:8], 2)]})
    assert bulk.index.dim == 16 and len(bulk.index) == 400 and "A" not in bulk  # refused before any change


def test_index_rows_reserved_for_a_bulk_upsert_are_used_in_order():
    idx = IdentityIndex(4, IndexSettings(kind="exact"))
    idx.upsert([5], np.ones((1, 4), np.float32))
    idx.remove([5])  # a free row, taken first
    keys = np.arange(10, 3010)
    idx.upsert(keys, np.arange(3000 * 4, dtype=np.float32).reshape(3000, 4))
    assert len(idx) == 3000 and idx.rows_used == 3000
    want = np.arange(12000, dtype=np.float32).reshape(3000, 4)
    assert np.array_equal(idx.vectors(keys[[0, 1499, 2999]]), want[[0, 1499, 2999]])
    s, k = idx.search(np.array([[0, 0, 0, 1]], np.float32), 3)
    assert k[0].tolist() == [3009, 3008, 3007]
