"""Scoring global identities against a ground truth (:mod:`stages.matcher.evaluation`).

Synthetic ground truths with hand-worked answers: tracklet assignment (majority vote, ROI-cut boxes,
unmatched and impure tracklets), pairwise precision / recall / F1, purity, fragmentation, fragments
and IDF1, plus loader errors.
"""

from __future__ import annotations

import json
from itertools import permutations

import numpy as np
import pytest

from stages.matcher.evaluation import (
    GroundTruth,
    LinkedTracklet,
    assign_tracklets,
    evaluate_links,
    idf1,
    load_ground_truth,
    load_links,
)

# two people standing still for 100 frames: person 1 on the left, person 2 on the right
BOX_1 = (10.0, 10.0, 40.0, 90.0)
BOX_2 = (200.0, 10.0, 230.0, 90.0)
EMPTY = (500.0, 400.0, 530.0, 480.0)  # where nobody is


def gt_of(rows: dict[int, dict[int, tuple[float, float, float, float]]]) -> GroundTruth:
    """``{frame: {person: box}}`` → :class:`GroundTruth`."""
    return GroundTruth({f: (np.array(list(ps), np.int64), np.array(list(ps.values()), np.float64))
                        for f, ps in rows.items()})


TWO_PEOPLE = gt_of({f: {1: BOX_1, 2: BOX_2} for f in range(100)})


def tracklet(tid: str, camera: str, gid: str, frames, boxes, start_s: float | None = None,
             end_s: float | None = None) -> LinkedTracklet:
    frames = tuple(frames)
    return LinkedTracklet(tid, camera, gid, frames[0] / 10 if start_s is None else start_s,
                          frames[-1] / 10 if end_s is None else end_s, frames, tuple(boxes))


def on(box, frames) -> tuple[list[int], list[tuple[float, ...]]]:
    frames = list(frames)
    return frames, [box] * len(frames)


# ------------------------------------------------------------------------------ assignment
def test_majority_vote_assigns_person_and_flags_impure() -> None:
    mostly_1 = tracklet("a", "L", "g", range(8), [BOX_1] * 5 + [BOX_2] * 3)    # 5/8 → person 1; 3/8 ≥ 25 %
    clean = tracklet("b", "L", "g", range(8), [BOX_1] * 6 + [BOX_2] + [EMPTY])  # 6/8; 1/8 < 25 %
    split = tracklet("c", "L", "g", range(8), [BOX_1] * 4 + [BOX_2] * 4)       # no majority
    nowhere = tracklet("d", "L", "g", *on(EMPTY, range(8)))
    got = {a.tracklet_id: a for a in assign_tracklets(TWO_PEOPLE, [mostly_1, clean, split, nowhere])}
    assert (got["a"].person, got["a"].impure, got["a"].votes) == (1, True, {1: 5, 2: 3})
    assert (got["b"].person, got["b"].impure, got["b"].votes) == (1, False, {1: 6, 2: 1})
    assert (got["c"].person, got["c"].impure) == (None, True)
    assert (got["d"].person, got["d"].impure, got["d"].votes) == (None, False, {})


def test_majority_needs_more_than_half_of_the_samples() -> None:
    # 3 votes for person 1 out of 8 samples (5 on nobody): a false-positive tracklet
    t = tracklet("a", "L", "g", range(8), [BOX_1] * 3 + [EMPTY] * 5)
    assert assign_tracklets(TWO_PEOPLE, [t])[0].person is None


def test_roi_cut_box_is_still_assigned() -> None:
    # a person straddling a virtual camera border at x = 384; the left camera sees [370, 384]
    gt = gt_of({0: {7: (370.0, 100.0, 400.0, 180.0)}})
    cut = (370.0, 100.0, 384.0, 180.0)  # IoU 14/30 = 0.47 < 0.5, but all of it lies on the person
    t = tracklet("a", "left", "g", [0], [cut])
    assert assign_tracklets(gt, [t])[0].person == 7
    assert assign_tracklets(gt, [t], min_iot=1.0)[0].person == 7
    # without the intersection-over-tracklet rule (min_iot = 1 and a box sticking out) it is lost
    sticking_out = (366.0, 100.0, 384.0, 180.0)
    assert assign_tracklets(gt, [tracklet("b", "left", "g", [0], [sticking_out])], min_iot=1.0)[0].person is None


def test_highest_iou_wins_between_overlapping_people() -> None:
    gt = gt_of({0: {1: (0.0, 0.0, 40.0, 100.0), 2: (20.0, 0.0, 60.0, 100.0)}})
    t = tracklet("a", "L", "g", [0], [(18.0, 0.0, 58.0, 100.0)])
    assert assign_tracklets(gt, [t])[0].person == 2


def test_frame_without_ground_truth_casts_no_vote() -> None:
    t = tracklet("a", "L", "g", [0, 150, 151], [BOX_1, BOX_1, BOX_1])  # frames 150, 151 are past the GT
    assert assign_tracklets(TWO_PEOPLE, [t])[0].person is None


# ------------------------------------------------------------------------------ pairs, purity, fragmentation
def hand_example() -> list[LinkedTracklet]:
    """t1 L p1 g1, t2 R p1 g1, t3 R p2 g1, t4 L p2 g2, t5 L unmatched g3.

    cross-camera pairs: (t1,t2) TP; (t1,t3) FP; (t4,t3) FN; (t4,t2) neither → TP 1, FP 1, FN 1
    same-camera pairs:  (t2,t3) FP; (t1,t4) neither                       → TP 0, FP 1, FN 0
    purity: g1 holds p1, p1, p2 → 2; g2 holds p2 → 1; (2 + 1) / 4 = 0.75
    fragmentation: p1 → {g1}, p2 → {g1, g2}: mean 1.5 (both seen on two cameras)
    """
    return [
        tracklet("t1", "L", "g1", *on(BOX_1, range(0, 8))),
        tracklet("t2", "R", "g1", *on(BOX_1, range(20, 28))),
        tracklet("t3", "R", "g1", *on(BOX_2, range(40, 48))),
        tracklet("t4", "L", "g2", *on(BOX_2, range(60, 68))),
        tracklet("t5", "L", "g3", *on(EMPTY, range(80, 88))),
    ]


def test_hand_example_pairwise_scores() -> None:
    r = evaluate_links(TWO_PEOPLE, hand_example())
    assert (r.tracklets, r.matched, r.unmatched) == (5, 4, ("t5",))
    assert (r.cross_camera.tp, r.cross_camera.fp, r.cross_camera.fn) == (1, 1, 1)
    assert r.cross_camera.precision == pytest.approx(0.5)
    assert r.cross_camera.recall == pytest.approx(0.5)
    assert r.cross_camera.f1 == pytest.approx(0.5)
    assert (r.same_camera.tp, r.same_camera.fp, r.same_camera.fn) == (0, 1, 0)
    assert r.same_camera.precision == 0.0 and r.same_camera.recall is None and r.same_camera.f1 == 0.0
    assert (r.all_pairs.tp, r.all_pairs.fp, r.all_pairs.fn) == (1, 2, 1)
    assert r.gt_cross_camera_pairs == 2


def test_hand_example_identity_scores() -> None:
    r = evaluate_links(TWO_PEOPLE, hand_example())
    assert r.purity == pytest.approx(0.75)
    assert r.fragmentation == pytest.approx(1.5)
    assert r.fragmentation_multi_camera == pytest.approx(1.5)
    assert (r.persons, r.persons_multi_camera, r.predicted_identities) == (2, 2, 3)


def test_pair_counts_do_not_depend_on_tracklet_order() -> None:
    ts = hand_example()
    base = evaluate_links(TWO_PEOPLE, ts).as_dict()
    for perm in list(permutations(ts))[:24]:
        d = evaluate_links(TWO_PEOPLE, list(perm)).as_dict()
        for key in ("cross_camera", "same_camera", "all_pairs", "purity", "fragmentation", "identity_f1"):
            assert d[key] == base[key]


def test_perfect_matcher_scores_one() -> None:
    ts = [tracklet("a", "L", "x", *on(BOX_1, range(0, 5))), tracklet("b", "R", "x", *on(BOX_1, range(10, 15))),
          tracklet("c", "L", "y", *on(BOX_2, range(0, 5))), tracklet("d", "R", "y", *on(BOX_2, range(10, 15)))]
    r = evaluate_links(TWO_PEOPLE, ts)
    assert (r.cross_camera.tp, r.cross_camera.fp, r.cross_camera.fn) == (2, 0, 0)
    assert r.cross_camera.f1 == 1.0 and r.purity == 1.0 and r.fragmentation == 1.0
    assert r.identity_f1.idp == 1.0


def test_multi_camera_fragmentation_only_counts_people_on_two_cameras() -> None:
    ts = [tracklet("a", "L", "x", *on(BOX_1, range(0, 5))), tracklet("b", "R", "z", *on(BOX_1, range(10, 15))),
          tracklet("c", "L", "y", *on(BOX_2, range(0, 5))), tracklet("d", "L", "w", *on(BOX_2, range(30, 35)))]
    r = evaluate_links(TWO_PEOPLE, ts)
    assert r.fragmentation == pytest.approx(2.0)
    assert r.fragmentation_multi_camera == pytest.approx(2.0)   # person 1 only
    assert (r.persons, r.persons_multi_camera) == (2, 1)
    assert (r.cross_camera.tp, r.cross_camera.fn, r.same_camera.fn) == (0, 1, 1)


def test_empty_links_report_none_not_zero_division() -> None:
    r = evaluate_links(TWO_PEOPLE, [])
    assert r.tracklets == 0 and r.cross_camera.f1 is None and r.purity is None and r.fragmentation is None
    assert r.identity_f1.idf1 is None
    json.dumps(r.as_dict())


# ------------------------------------------------------------------------------ tracklet quality
def test_fragments_are_close_tracklets_of_one_person_on_one_camera() -> None:
    ts = [
        tracklet("a", "L", "x", *on(BOX_1, range(0, 8)), start_s=0.0, end_s=1.0),
        tracklet("b", "L", "y", *on(BOX_1, range(20, 28)), start_s=2.5, end_s=3.0),   # 1.5 s later: fragment
        tracklet("c", "L", "z", *on(BOX_1, range(40, 48)), start_s=6.0, end_s=7.0),   # 3 s later: a new pass
        tracklet("d", "R", "x", *on(BOX_1, range(50, 58)), start_s=3.5, end_s=4.0),   # other camera
        tracklet("e", "L", "w", *on(BOX_2, range(30, 38)), start_s=3.1, end_s=3.9),   # other person
    ]
    r = evaluate_links(TWO_PEOPLE, ts)
    assert r.fragments == (("a", "b"),)
    assert evaluate_links(TWO_PEOPLE, ts, fragment_gap_s=3.0).fragments == (("a", "b"), ("b", "c"))


def test_impure_and_unmatched_are_listed() -> None:
    ts = [tracklet("mix", "L", "x", range(8), [BOX_1] * 5 + [BOX_2] * 3),
          tracklet("fp", "L", "y", *on(EMPTY, range(8)))]
    d = evaluate_links(TWO_PEOPLE, ts).as_dict()
    assert (d["impure"], d["impure_tracklets"]) == (1, ["mix"])
    assert (d["unmatched"], d["unmatched_tracklets"]) == (1, ["fp"])
    by_id = {a["tracklet_id"]: a for a in d["assignments"]}
    assert by_id["mix"]["votes"] == {"1": 5, "2": 3} and by_id["fp"]["person"] is None


# ------------------------------------------------------------------------------ IDF1
def test_idf1_hand_example() -> None:
    """Frames 0-3, person 1 at BOX_1 and person 2 at BOX_2 on each: 8 true detections.

    id x: BOX_1 on frames 0, 1, 2 and BOX_2 on frame 3; id y: BOX_2 on frames 0, 1 → 6 predicted.
    Corresponding detections: (p1, x) 3, (p2, x) 1, (p2, y) 2. The best one-to-one matching
    p1↔x, p2↔y gives IDTP 5, IDFP 6 - 5 = 1, IDFN 8 - 5 = 3, IDF1 = 10 / 14.
    """
    ts = [tracklet("t1", "L", "x", *on(BOX_1, [0, 1, 2])), tracklet("t2", "R", "x", *on(BOX_2, [3])),
          tracklet("t3", "R", "y", *on(BOX_2, [0, 1]))]
    r = idf1(TWO_PEOPLE, ts)
    assert (r.idtp, r.idfp, r.idfn) == (5, 1, 3)
    assert r.idf1 == pytest.approx(10 / 14)
    assert r.idp == pytest.approx(5 / 6) and r.idr == pytest.approx(5 / 8)


def test_idf1_leaves_an_unpaired_identity_out() -> None:
    # three ids for two people: the worst one must stay unpaired (all its detections are IDFP)
    ts = [tracklet("a", "L", "x", *on(BOX_1, [0, 1, 2, 3])), tracklet("b", "L", "y", *on(BOX_2, [0, 1, 2])),
          tracklet("c", "R", "z", *on(BOX_2, [3]))]
    r = idf1(TWO_PEOPLE, ts)
    assert (r.idtp, r.idfp, r.idfn) == (7, 1, 1)


def test_idf1_two_boxes_of_one_id_on_one_frame_match_once() -> None:
    # one person seen by two overlapping virtual cameras at once, both tracklets in one identity
    gt = gt_of({0: {1: (370.0, 100.0, 400.0, 180.0)}})
    ts = [tracklet("l", "left", "x", [0], [(370.0, 100.0, 384.0, 180.0)]),
          tracklet("r", "right", "x", [0], [(384.0, 100.0, 400.0, 180.0)])]
    r = idf1(gt, ts)
    assert (r.idtp, r.idfp, r.idfn) == (1, 1, 0)


def test_idf1_counts_gt_people_missed_on_link_frames() -> None:
    # only person 1 is sampled on frame 5; person 2 stands there too → one IDFN
    r = idf1(TWO_PEOPLE, [tracklet("a", "L", "x", *on(BOX_1, [5]))])
    assert (r.idtp, r.idfp, r.idfn) == (1, 0, 1)


# ------------------------------------------------------------------------------ loading and validation
def test_load_ground_truth_round_trip(tmp_path) -> None:
    p = tmp_path / "gt.csv"
    p.write_text("frame,person,x1,y1,x2,y2\n0,1,10,10,40,90\n0,2,200,10,230,90\n3,1,12,10,42,90\n")
    gt = load_ground_truth(p)
    assert gt.persons == {1, 2} and list(gt.frames) == [0, 1, 2, 3]
    persons, boxes = gt.at(0)
    assert persons.tolist() == [1, 2] and boxes.shape == (2, 4) and boxes.dtype == np.float64
    assert len(gt.at(1)[0]) == 0


@pytest.mark.parametrize("body, message", [
    ("frame,person,x1,y1,x2\n0,1,0,0,1\n", "header"),
    ("frame,person,x1,y1,x2,y2\n0,one,0,0,1,1\n", "not a number"),
    ("frame,person,x1,y1,x2,y2\n-1,1,0,0,1,1\n", "frame must be >= 0"),
    ("frame,person,x1,y1,x2,y2\n0,0,0,0,1,1\n", "person >= 1"),
    ("frame,person,x1,y1,x2,y2\n0,1,5,0,5,1\n", "x2 > x1"),
    ("frame,person,x1,y1,x2,y2\n0,1,0,0,1,1\n0,1,0,0,2,2\n", "twice on frame 0"),
])
def test_load_ground_truth_rejects_bad_rows(tmp_path, body: str, message: str) -> None:
    p = tmp_path / "gt.csv"
    p.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_ground_truth(p)


def test_load_links_reads_demo_format(tmp_path) -> None:
    p = tmp_path / "links.json"
    p.write_text(json.dumps([{"tracklet_id": "left-1", "camera": "left", "track_id": 3, "global_id": "G1",
                              "score": None, "start_s": 0.0, "end_s": 0.7, "frames": [0, 7],
                              "boxes": [[1, 2, 3, 4], [2, 3, 4, 5]]}]))
    (t,) = load_links(p)
    assert (t.tracklet_id, t.camera, t.global_id, t.frames) == ("left-1", "left", "G1", (0, 7))
    assert t.boxes[1] == (2.0, 3.0, 4.0, 5.0)


@pytest.mark.parametrize("data, message", [
    ({"not": "a list"}, "expected a list"),
    ([{"tracklet_id": "a"}], "lacks or mistypes"),
    ([{"tracklet_id": "a", "camera": "c", "global_id": "g", "start_s": 0, "end_s": 1, "frames": [0, 1],
       "boxes": [[0, 0, 1, 1]]}], "2 frames but 1 boxes"),
    ([{"tracklet_id": "a", "camera": "c", "global_id": "g", "start_s": 0, "end_s": 1, "frames": [0],
       "boxes": [[0, 0, 0, 1]]}], "x2 > x1"),
])
def test_load_links_rejects_bad_links(tmp_path, data, message: str) -> None:
    p = tmp_path / "links.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_links(p)


def test_missing_files_raise_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_ground_truth(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError):
        load_links(tmp_path / "nope.json")


@pytest.mark.parametrize("kwargs", [{"min_iou": 0.0}, {"min_iot": 1.5}, {"impure_share": -0.1},
                                    {"fragment_gap_s": -1.0}])
def test_thresholds_out_of_range_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        evaluate_links(TWO_PEOPLE, [], **kwargs)
