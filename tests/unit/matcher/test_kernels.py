"""The compiled decision steps (stages.matcher.kernels) against the array rules every other path uses,
and the gallery's member arena and decisions against references written out in the tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.matcher import kernels
from stages.matcher.association import Edge, Rules, TransitModel, cannot_link_coded, topology_codes
from stages.matcher.gallery import Gallery, Member
from stages.matcher.index import IndexSettings

_EDGES = [(0, 1, 20.0), (1, 0, 20.0), (0, 2, -3.0), (2, 0, -3.0), (1, 2, 5.0), (1, 2, 60.0)]


def _arena(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mem = np.concatenate(groups) if groups else np.zeros((0, 3))
    count = np.array([len(g) for g in groups], np.int64)
    head = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return mem, head, count


def _table(edges, here: int, cameras: int) -> np.ndarray:
    t = np.full(cameras, np.nan)
    for a, b, m in edges:  # in order: a pair listed twice keeps its last
        if a == here:
            t[b] = m
    return t


@pytest.mark.parametrize("reentry", [True, False])
def test_the_compiled_cannot_link_rule_is_the_array_rule(reentry):
    # every other path (window, re-association) uses cannot_link_coded, so the decision's compiled
    # check must block the same identities, topology (a pair listed twice: the last wins) included
    rng = np.random.default_rng(7)
    checked = blocked = 0
    for _ in range(300):
        groups = []
        for _ in range(int(rng.integers(1, 6))):
            n = int(rng.integers(1, 5))
            starts = rng.choice([0.0, 10.0, 25.0, 50.0, 80.0], n) + rng.choice([0.0, 0.5, 2.0], n)
            groups.append(np.column_stack([rng.integers(0, 4, n).astype(np.float64), starts,
                                           starts + rng.choice([0.0, 3.0, 10.0], n)]))
        mem, head, count = _arena(groups)
        cam, start = int(rng.integers(0, 4)), float(rng.choice([20.0, 30.0, 55.0, 80.0]))
        end = start + float(rng.choice([0.0, 1.0, 8.0]))
        last = np.array([g[:, 2].max() for g in groups])
        codes = np.arange(len(groups), dtype=np.int64)
        reach = max(0.0, *(m for _, _, m in _EDGES))
        got = kernels.blocked(codes, cam, start, end, 1.0, reentry, _table(_EDGES, cam, 4), reach, math.nan, last,
                              mem, head, count)
        for g, one in zip(groups, got):
            want = cannot_link_coded(np.array([cam]), np.array([start]), np.array([end]), g[:, 0].astype(np.int64),
                                     g[:, 1], g[:, 2], 1.0, reentry, _EDGES)[0]
            assert bool(one) == bool(want.any())
            checked, blocked = checked + 1, blocked + int(one)
    assert 0.05 * checked < blocked < 0.95 * checked  # both outcomes exercised


def test_the_gallery_ttl_blocks_identities_unseen_for_longer():
    mem, head, count = _arena([np.array([[0.0, 0.0, 10.0]]), np.array([[0.0, 80.0, 90.0]])])
    last = np.array([10.0, 90.0])
    args = (np.arange(2, dtype=np.int64), 1, 100.0, 101.0, 0.5, True, np.full(2, np.nan), 0.0)
    assert kernels.blocked(*args, 50.0, last, mem, head, count).tolist() == [True, False]
    assert kernels.blocked(*args, math.nan, last, mem, head, count).tolist() == [False, False]


def test_gather_takes_each_identity_once_from_the_freshest_source():
    alive = np.ones(10, bool)
    alive[7] = False
    flag = np.zeros(10, bool)
    codes = np.array([1, 2, 3, 7, -1], np.int64)
    scores = np.array([0.9, 0.8, 0.7, 0.95, -np.inf], np.float32)
    known = np.array([2, 4], np.int64), np.array([0.5, 0.6], np.float32)  # 2 changed after the search
    also = np.array([3, 5], np.int64)  # changed on this sub-batch: scored exactly
    hot = np.array([1, 6, 4, 8], np.int64), np.array([0.9, 0.65, 0.6, 0.1], np.float32)
    exact = kernels.distinct_alive(np.array([5, 3, 5, -1, 7], np.int64), alive)
    assert exact.tolist() == [3, 5]
    exact_scores = np.array([0.75, 0.4], np.float32)
    stale = np.concatenate([also, known[0]])
    cand, base = kernels.gather(codes, scores, stale, *known, also, *hot, exact, exact_scores, alive, flag, True,
                                0.0, 0.45)
    # 1 from the search; 2 and 4 re-scored; 6 from the hot tier; 3 and 5 exact (5 below the threshold);
    # 7 is gone and 8 is below the threshold
    assert dict(zip(cand.tolist(), base.tolist())) == pytest.approx({1: 0.9, 3: 0.75, 6: 0.65, 4: 0.6, 2: 0.5})
    assert cand.tolist() == [1, 3, 6, 4, 2] and not flag.any()
    # a later pass: only the new search's codes, but those already scored
    cand, _ = kernels.gather(codes, scores, np.array([1], np.int64), *known, also, *hot, exact, exact_scores, alive,
                             flag, False, 0.0, 0.45)
    assert cand.tolist() == [2, 3] and not flag.any()
    found, floor = kernels.steady_floor(codes, scores, stale, flag)
    assert found == 4 and floor == pytest.approx(0.9) and not flag.any()  # 1 and 7 were not changed


def _reference(g: Gallery, z: np.ndarray, camera: str, start: float, end: float, threshold: float, rules: Rules,
               transit: TransitModel, ttl: float | None) -> tuple[str | None, float | None]:
    """Every identity scored from its prototypes and members, by the array rule, as the gallery's
    docstring defines it: ``z·m`` plus the mean bonus over prototypes, -inf where a rule blocks."""
    best, best_gid = -np.inf, None
    edges = topology_codes(rules.topology, [*g.cam_names, camera] if camera not in g.cam_names else g.cam_names)
    here = (g.cam_names.index(camera) if camera in g.cam_names else len(g.cam_names))
    for gid in g.gids():  # in code order: ties go to the older identity
        protos = g.prototypes(gid)
        ys = np.stack([p.y / np.linalg.norm(p.y) for p in protos])
        score = float(z.astype(np.float64) @ ys.mean(0))
        bonus = [rules.transit_weight * float(transit.support(camera, p.camera, start - p.end_s if start >= p.start_s
                                                              else p.start_s - end)) if p.camera != camera else 0.0
                 for p in protos]
        score += float(np.mean(bonus)) if rules.transit_weight > 0 else 0.0
        mem = g.members(gid)
        if cannot_link_coded(np.array([here]), np.array([start]), np.array([end]), mem[:, 0].astype(np.int64),
                             mem[:, 1], mem[:, 2], rules.max_overlap_s, rules.reentry, edges)[0].any():
            continue
        if ttl is not None and start - g.last_seen(gid) > ttl:
            continue
        if score > best + 1e-6:
            best, best_gid = score, gid
    return (best_gid, best) if best >= threshold else (None, None)


@pytest.mark.parametrize("weight", [0.0, 0.1])
def test_decisions_are_the_best_identity_under_the_rules(weight):
    rng = np.random.default_rng(3 + int(weight * 10))
    cams = ["a", "b", "c", "d"]
    rules = Rules(max_overlap_s=1.0, reentry=True, topology=(Edge("a", "b", 20.0, 60.0),), transit_weight=weight)
    loose = Rules(max_overlap_s=1e9, topology=(), transit_weight=weight)  # no rule blocks anyone
    transit = TransitModel(gaps={("a", "c"): (4.0, 5.0, 6.0, 5.5)}, edges=rules.topology)
    g = Gallery(prototypes_per_camera=2, settings=IndexSettings(kind="exact"))
    centres = rng.standard_normal((40, 16)).astype(np.float32)
    t = 0.0
    for i in range(300):
        who = int(rng.integers(0, 40))
        y = centres[who] + 0.5 * rng.standard_normal(16).astype(np.float32)
        t += float(rng.uniform(0.0, 4.0))
        g.add(f"G{who:03d}", Member(f"t{i}", cams[int(rng.integers(0, 4))], t, t + 6.0, int(rng.integers(1, 20)), y, i))
    joined = found = ruled = 0
    for q in range(200):
        who = int(rng.integers(0, 40))
        z = (centres[who] if q % 3 else rng.standard_normal(16).astype(np.float32))  # a third: new people
        z = z + 0.5 * rng.standard_normal(16).astype(np.float32)
        z /= np.linalg.norm(z)
        cam = cams[int(rng.integers(0, 4))]
        start = float(rng.uniform(0.0, t + 30.0))
        ttl = None if q % 2 else 200.0
        got = g.best(z, cam, start, start + 5.0, 0.5, rules, transit, ttl)
        want = _reference(g, z, cam, start, start + 5.0, 0.5, rules, transit, ttl)
        assert got[0] == want[0], (q, got, want)
        if got[0] is not None:
            assert got[1] == pytest.approx(want[1], abs=1e-5)
            joined += 1
        found += want[0] is None
        ruled += want[0] != _reference(g, z, cam, start, start + 5.0, 0.5, loose, transit, None)[0]
    assert 20 < joined < 180 and found > 10 and ruled > 5  # both outcomes, and the rules, exercised


def test_the_member_arena_keeps_every_identity_s_members_through_growth_and_packing():
    rng = np.random.default_rng(5)
    g = Gallery(settings=IndexSettings(kind="exact"))
    model: dict[str, list[list[float]]] = {}
    y = np.ones(4, np.float32)
    for i in range(4000):  # enough appends and replaces to move blocks and pack the arena several times
        gid = f"G{int(rng.integers(0, 300)):03d}"
        op = rng.random()
        if op < 0.8:
            cam = f"c{int(rng.integers(0, 3))}"
            g.add(gid, Member(f"t{i}", cam, float(i), float(i) + 1.0, 5, y, i))
            model.setdefault(gid, []).append([float(g.cam_names.index(cam)), float(i), float(i) + 1.0])
        elif op < 0.95:
            n = int(rng.integers(1, 12))
            g.replace({gid: [Member(f"r{i}-{j}", "c0", float(j), float(j) + 2.0, 5, y, i) for j in range(n)]})
            model[gid] = [[float(g.cam_names.index("c0")), float(j), float(j) + 2.0] for j in range(n)]
        else:
            g.drop([gid])
            model.pop(gid, None)
    assert sorted(g.gids()) == sorted(model)
    for gid, rows in model.items():
        assert g.members(gid).tolist() == rows
        assert g.last_seen(gid) == max(r[2] for r in rows)
    assert g.members("nobody").shape == (0, 3)


def test_the_compiled_bonus_is_the_transit_model_s_support():
    rng = np.random.default_rng(11)
    transit = TransitModel(gaps={("a", "c"): tuple(rng.normal(6.0, 1.5, 40)), ("b", "c"): (2.0, 2.5, 3.0)},
                           edges=(Edge("a", "b", 20.0, 60.0),))
    g = Gallery(prototypes_per_camera=3, settings=IndexSettings(kind="exact"))
    cams = ["a", "b", "c", "d"]
    for i in range(400):
        start = float(rng.uniform(0.0, 200.0))
        g.add(f"G{i % 50:02d}", Member(f"t{i}", cams[int(rng.integers(0, 4))], start, start + float(rng.uniform(0, 5)),
                                       int(rng.integers(1, 30)), np.ones(4, np.float32), i))
    weight, checked, curved = 0.2, 0, 0
    for camera in cams:
        here = g.cam_names.index(camera)
        kind, box, xs, ys = g._support_from(transit, here)
        for q in range(40):
            start = float(rng.uniform(0.0, 220.0))
            for gid in g.gids():
                protos = g.prototypes(gid)
                gaps = [start - p.end_s if start >= p.start_s else p.start_s - (start + 3.0) for p in protos]
                parts = [weight * float(transit.support(camera, p.camera, gap)) for p, gap in zip(protos, gaps)
                         if p.camera != camera]
                want = sum(parts) / len(protos) if parts else 0.0
                got = kernels.bonus(g.code(gid), here, start, start + 3.0, weight, kind, box, xs, ys, g._spans.mem,
                                    g._spans.head, g._spans.count)
                assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
                checked += 1
                curved += any(0.0 < x < weight for x in parts)  # between the grid's ends, off its peak
    assert checked == 4 * 40 * 50 and curved > 50


def test_the_kernels_compile_where_numba_finds_no_cache_directory(monkeypatch, caplog):
    made = []

    def fake_njit(**options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'kernels.py'")
        made.append(options)
        return lambda fn: fn

    monkeypatch.setattr(kernels, "_njit", fake_njit)
    with caplog.at_level("WARNING", logger="stages.matcher.kernels"):
        plus_one = kernels.njit(cache=True, nogil=True)(lambda x: x + 1)
    assert plus_one(1) == 2 and made == [{"nogil": True}]
    assert "NUMBA_CACHE_DIR" in caplog.text
