"""Cannot-links, scoring space, constrained average linkage, transit statistics and label-free
calibration, on synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from stages.matcher.association import (
    Edge,
    Rules,
    ScoringSpace,
    TransitModel,
    associate,
    average_linkage,
    cannot_link,
    cannot_link_between,
    cannot_link_coded,
)
from stages.matcher.calibration import CalibrationError, calibrate, read_calibration, write_calibration


def test_cannot_link_rules():
    cams = ["a", "a", "b", "b", "a"]
    starts = np.array([0.0, 5.0, 9.5, 20.0, 30.0])
    ends = np.array([10.0, 8.0, 15.0, 25.0, 31.0])
    cl = cannot_link(cams, starts, ends, max_overlap_s=1.0)
    assert cl[0, 1] and cl[1, 0]            # same camera, overlapping: two people
    assert not cl[0, 4]                     # same camera, disjoint: a re-entry is possible
    assert not cl[0, 2]                     # 0.5 s overlap across cameras: within the border slack
    assert not cl[1, 2]                     # 1 ends before 2 starts on the other camera: possible
    assert not cl.diagonal().any() and (cl == cl.T).all()
    no_reentry = cannot_link(cams, starts, ends, max_overlap_s=1.0, reentry=False)
    assert no_reentry[0, 4] and not no_reentry[0, 3]
    wide = cannot_link(cams, starts, ends, max_overlap_s=0.1)
    assert wide[0, 2]


def test_topology_min_transit_replaces_the_overlap_rule():
    edge = Edge("a", "b", min_transit_s=3.0, max_transit_s=20.0)
    out = cannot_link_between(["a"], np.array([0.0]), np.array([2.0]), ["b", "b", "c"], np.array([4.0, 6.0, 4.0]),
                              np.array([5.0, 7.0, 5.0]), max_overlap_s=1.0, topology=(edge,))
    assert out.tolist() == [[True, False, False]]   # 2 s < 3 s: impossible; 4 s: fine; c is not on the edge
    with pytest.raises(ValueError, match="max_transit_s"):
        Edge("a", "b", 5.0, 1.0)


def test_average_linkage_respects_cannot_links_and_threshold():
    s = np.array([[1.0, 0.9, 0.8, 0.0],
                  [0.9, 1.0, 0.85, 0.0],
                  [0.8, 0.85, 1.0, 0.1],
                  [0.0, 0.0, 0.1, 1.0]])
    none = np.zeros((4, 4), bool)
    assert average_linkage(s, none, 0.5).tolist() == [0, 0, 0, 1]
    assert average_linkage(s, none, 0.95).tolist() == [0, 1, 2, 3]
    cl = none.copy()
    cl[0, 2] = cl[2, 0] = True              # 0 and 2 are known to be two people
    labels = average_linkage(s, cl, 0.5)
    assert labels[0] == labels[1] != labels[2] and labels[3] not in (labels[0], labels[2])


def test_average_linkage_is_the_mean_not_the_max():
    # 2 joins {0, 1} only if the mean of 0.9 and 0.1 (= 0.5) reaches the threshold
    s = np.array([[1, 0.95, 0.9], [0.95, 1, 0.1], [0.9, 0.1, 1]], float)
    none = np.zeros((3, 3), bool)
    assert average_linkage(s, none, 0.5).tolist() == [0, 0, 0]
    assert average_linkage(s, none, 0.51).tolist() == [0, 0, 1]


def test_scoring_space_centres_and_projects_only_large_windows():
    rng = np.random.default_rng(0)
    common = np.abs(rng.normal(size=64)) * 3
    x = common + np.abs(rng.normal(size=(10, 64)))
    small = ScoringSpace.fit(x, max_dim=8)
    assert small.components is None and small.dim == 64          # 10 < 2 * 8: centre only
    z = small.transform(x)
    assert np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert abs(float((z @ z.T)[np.triu_indices(10, 1)].mean())) < 0.3    # raw cosines are ~0.9
    big = ScoringSpace.fit(common + rng.normal(size=(100, 64)), max_dim=8)
    assert big.components.shape == (64, 8) and big.transform(x).shape == (10, 8)
    assert np.allclose(big.components.T @ big.components, np.eye(8), atol=1e-4)
    again = ScoringSpace.from_arrays(big.to_arrays())
    assert np.allclose(again.transform(x), big.transform(x))
    with pytest.raises(ValueError, match="dimension"):
        big.transform(np.ones(65, np.float32))


def test_transit_model_learns_gaps_per_camera_pair():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    cams = ["a", "b", "a", "b", "a", "b", "a"]
    starts = np.array([0, 12, 50, 61, 100, 111, 200], float)
    ends = np.array([10, 20, 60, 70, 110, 120, 210], float)
    tm = TransitModel.learn(labels, cams, starts, ends, bandwidth_s=1.0, min_links=3)
    assert sorted(tm.gaps[("a", "b")]) == [1.0, 1.0, 2.0]
    assert tm.support("a", "b", 1.3) > 0.8 and tm.support("b", "a", 30.0) < 1e-6
    assert tm.support("a", "a", 1.0) == 0.0
    too_few = TransitModel.learn(labels, cams, starts, ends, min_links=4)
    assert too_few.support("a", "b", 1.0) == 0.0
    edge = TransitModel(edges=(Edge("a", "b", 0.0, 5.0),))
    assert edge.support("b", "a", np.array([-1.0, 3.0, 6.0])).tolist() == [0.0, 1.0, 0.0]


def _synthetic_window(seed: int, people: int = 100, pos: float = 0.4, neg_sd: float = 0.1):
    """People walking past camera a, then camera b, each on their own (random times); pairwise scores
    drawn from a known positive (mean ``pos``) and negative (mean 0) distribution."""
    rng = np.random.default_rng(seed)
    cams, starts, pid = [], [], []
    for p in range(people):
        t0 = rng.uniform(0, 200)
        for c, cam in enumerate(("a", "b")):
            cams.append(cam)
            starts.append(t0 + c * rng.uniform(10, 40))
            pid.append(p)
    starts = np.array(starts)
    ends = starts + 6.0
    pid = np.array(pid)
    n = len(pid)
    s = rng.normal(0.0, neg_sd, (n, n))
    same = pid[:, None] == pid[None, :]
    s[same] = rng.normal(pos, 0.08, same.sum())
    s = np.clip((s + s.T) / 2, -1, 1)
    np.fill_diagonal(s, 1.0)
    return cams, starts, ends, pid, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_recovers_the_gap_between_known_distributions(seed, tmp_path):
    cams, starts, ends, pid, s = _synthetic_window(seed)
    cl = cannot_link(cams, starts, ends, max_overlap_s=0.5)
    cross = np.asarray(cams)[:, None] != np.asarray(cams)[None, :]
    assert not (cl & (pid[:, None] == pid[None, :])).any()       # the constraints hold for the truth
    cal = calibrate(s, cl, cross, cameras=2)
    # negatives ~ N(0, 0.1), positives ~ N(0.4, 0.08); below ~0.1 the mean of a few negative pairs
    # starts to pass, above ~0.3 true pairs start to fail
    assert 0.08 <= cal.threshold <= 0.35, cal.summary()
    labels = average_linkage(s, cl, cal.threshold)
    iu = np.triu_indices(len(pid), 1)
    pred = (labels[:, None] == labels[None, :])[iu] & cross[iu]
    true = (pid[:, None] == pid[None, :])[iu] & cross[iu]
    f1 = 2 * (pred & true).sum() / (pred.sum() + true.sum())
    assert f1 >= 0.9, (cal.threshold, f1)
    files = write_calibration(cal, tmp_path / "cal.json")
    assert files[1].stat().st_size > 1000
    assert read_calibration(files[0]) == cal


def test_calibration_needs_evidence():
    s = np.eye(3)
    with pytest.raises(CalibrationError, match="cannot-link"):
        calibrate(s, np.zeros((3, 3), bool), np.ones((3, 3), bool))


def test_associate_is_independent_of_input_order():
    rng = np.random.default_rng(3)
    protos = rng.normal(size=(5, 32))
    cams, starts, emb = [], [], []
    for p in range(5):
        for c, cam in enumerate("abc"):
            cams.append(cam)
            starts.append(30.0 * p + 8.0 * c)
            emb.append(protos[p] + 0.3 * rng.normal(size=32))
    starts = np.array(starts)
    emb = np.array(emb, np.float32)
    rules = Rules(max_overlap_s=0.5, transit_weight=0.0)
    ref = associate(cams, starts, starts + 5, emb, rules, 0.3).labels
    perm = rng.permutation(len(cams))
    got = associate([cams[i] for i in perm], starts[perm], starts[perm] + 5, emb[perm], rules, 0.3).labels
    same_ref = ref[:, None] == ref[None, :]
    same_got = np.empty_like(same_ref)
    same_got[np.ix_(perm, perm)] = got[:, None] == got[None, :]
    assert (same_ref == same_got).all() and len(set(ref)) == 5
