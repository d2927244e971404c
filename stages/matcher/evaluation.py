"""Measure the matcher's global identities against a ground truth of who is where.

Inputs:

* a **ground truth** (GT) CSV with header ``frame,person,x1,y1,x2,y2``: one row per person per
  frame; ``frame`` the 0-based source-video frame index, ``person`` an int >= 1, boxes
  ``[x1, y1, x2, y2]`` float source-video pixels (``tests/data/vtest_gt.csv``; see
  ``docs/GROUND_TRUTH.md``);
* the **links** (``links.json`` of ``reidstream demo``): one object per tracklet with its
  ``camera``, ``global_id``, ``start_s``, ``end_s`` and its sampled ``frames`` / ``boxes`` (source-video
  frame indices, ``[x1, y1, x2, y2]`` source-video pixels).

**Tracklet → person.** Each sampled ``(frame, box)`` of a tracklet votes for the GT person whose box on
that frame overlaps it best: the GT box of highest IoU when that IoU is at least ``min_iou`` (0.5);
otherwise the GT box covering the largest share of the tracklet box, when that share (intersection
over the *tracklet* box, "IoT") is at least ``min_iot`` (0.8). The second rule keeps boxes that a
virtual camera's ROI cut at its border: such a box lies inside the person's full-frame GT box but
covers only part of it, so its IoU can fall under 0.5. A sample with neither casts no vote. The
tracklet's person is the one with **more than half of its samples**; otherwise the tracklet is
``unmatched`` (a false-positive tracklet: a box on no GT person, or on an ambiguous one left out of
the GT, or one that flips between people).

**Pairwise scores.** Over every pair of *matched* tracklets: TP = same person and same global id,
FP = different persons but the same global id, FN = same person but different global ids;
precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean (``None`` when
undefined). Reported for pairs on different cameras (the re-identification the matcher exists for),
on the same camera, and over all pairs.

**Identity scores.** Purity: the share of matched tracklets that belong to the majority person of
their global id (tracklet-weighted). Fragmentation: distinct global ids per GT person (mean over the
persons with matched tracklets, and over those seen on at least two cameras); 1.0 is ideal.

**IDF1** (Ristani et al., "Performance Measures and a Data Set for Multi-Target, Multi-Camera
Tracking", ECCV 2016 workshops): on the frames that appear in the links, the GT boxes on those
frames are the true detections and every sampled tracklet box, labelled with its global id, is a
predicted detection. A predicted and a true detection on one frame correspond when the IoU / IoT
rule above holds. GT persons and global ids are matched one-to-one (min-cost bipartite matching,
:func:`scipy.optimize.linear_sum_assignment`) to maximise the corresponding detections (IDTP);
IDFP / IDFN are the predicted / true detections left over; IDF1 = 2 IDTP / (2 IDTP + IDFP + IDFN).
Tracklets carry only a few sampled frames, so a GT person on a link frame is often not sampled by
its own tracklet on that frame: IDR is bounded by that sampling and IDP is the more telling half.

**Tracklet quality.** Impure tracklets: a second person has at least ``impure_share`` (25 %) of
the samples (two people in one track). Fragments: consecutive matched tracklets of one person on one
camera separated by at most ``fragment_gap_s`` (2 s): a track the tracker broke.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "GroundTruth", "LinkedTracklet", "TrackletAssignment", "PairScores", "IdentityF1", "LinkEvaluation",
    "load_ground_truth", "load_links", "assign_tracklets", "pairwise_scores", "idf1", "evaluate_links",
    "MIN_IOU", "MIN_IOT", "IMPURE_SHARE", "FRAGMENT_GAP_S",
]

MIN_IOU = 0.5          # IoU of a tracklet box and a GT box for a vote
MIN_IOT = 0.8          # intersection over the tracklet box, for boxes cut by a virtual camera's ROI
IMPURE_SHARE = 0.25    # share of a tracklet's samples on a second person that makes it impure
FRAGMENT_GAP_S = 2.0   # seconds between two tracklets of one person on one camera: a broken track


# --------------------------------------------------------------------------------------------------
# records
@dataclasses.dataclass(frozen=True, eq=False)
class GroundTruth:
    """Per-person boxes by frame.

    Attributes:
        boxes: ``frame -> (persons int64 [N], boxes float64 [N, 4])``, ``[x1, y1, x2, y2]`` source pixels.
    """

    boxes: Mapping[int, tuple[np.ndarray, np.ndarray]]

    @property
    def persons(self) -> set[int]:
        return {int(p) for ps, _ in self.boxes.values() for p in ps}

    @property
    def frames(self) -> range:
        """``range(0, last GT frame + 1)``."""
        return range(0, max(self.boxes, default=-1) + 1)

    def at(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """GT on ``frame``: ``(persons int64 [N], boxes float64 [N, 4])`` (empty arrays when none)."""
        return self.boxes.get(frame, (np.zeros(0, np.int64), np.zeros((0, 4))))


@dataclasses.dataclass(frozen=True)
class LinkedTracklet:
    """One tracklet of ``links.json``: its camera, global id and sampled boxes.

    Attributes:
        tracklet_id: Tracklet id.
        camera: Camera id.
        global_id: Global identity the matcher gave it.
        start_s: First frame, seconds of stream time.
        end_s: Last frame, seconds of stream time.
        frames: Source-video frame indices of the sampled crops.
        boxes: ``[x1, y1, x2, y2]`` source-video pixels, one per frame.
    """

    tracklet_id: str
    camera: str
    global_id: str
    start_s: float
    end_s: float
    frames: tuple[int, ...]
    boxes: tuple[tuple[float, float, float, float], ...]

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.boxes):
            raise ValueError(f"tracklet {self.tracklet_id}: {len(self.frames)} frames but {len(self.boxes)} boxes")
        if not self.frames:
            raise ValueError(f"tracklet {self.tracklet_id}: no frames")
        if self.end_s < self.start_s:
            raise ValueError(f"tracklet {self.tracklet_id}: end_s {self.end_s} < start_s {self.start_s}")
        for b in self.boxes:
            if len(b) != 4 or not (b[2] > b[0] and b[3] > b[1]):
                raise ValueError(f"tracklet {self.tracklet_id}: box {list(b)} is not [x1, y1, x2, y2] with x2 > x1, y2 > y1")


@dataclasses.dataclass(frozen=True)
class TrackletAssignment:
    """Which GT person a tracklet shows.

    Attributes:
        tracklet_id: Tracklet id.
        camera: Camera id.
        global_id: Predicted global identity.
        person: GT person, or ``None`` when unmatched.
        votes: ``person -> number of samples`` that voted for it.
        samples: Number of sampled boxes.
        impure: A second person has at least ``impure_share`` of the samples.
    """

    tracklet_id: str
    camera: str
    global_id: str
    person: int | None
    votes: dict[int, int]
    samples: int
    impure: bool

    def as_dict(self) -> dict[str, Any]:
        return {"tracklet_id": self.tracklet_id, "camera": self.camera, "global_id": self.global_id,
                "person": self.person, "votes": {str(k): v for k, v in sorted(self.votes.items())},
                "samples": self.samples, "impure": self.impure}


@dataclasses.dataclass(frozen=True)
class PairScores:
    """Pairwise precision / recall over pairs of matched tracklets.

    Attributes:
        tp: Pairs of one person with one global id.
        fp: Pairs of two persons with one global id.
        fn: Pairs of one person with two global ids.
    """

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp + self.fp + self.fn else None

    def as_dict(self) -> dict[str, Any]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
                "recall": self.recall, "f1": self.f1}


@dataclasses.dataclass(frozen=True)
class IdentityF1:
    """IDF1 and its parts, counted in detections (sampled boxes / GT boxes)."""

    idtp: int
    idfp: int
    idfn: int

    @property
    def idp(self) -> float | None:
        return self.idtp / (self.idtp + self.idfp) if self.idtp + self.idfp else None

    @property
    def idr(self) -> float | None:
        return self.idtp / (self.idtp + self.idfn) if self.idtp + self.idfn else None

    @property
    def idf1(self) -> float | None:
        d = 2 * self.idtp + self.idfp + self.idfn
        return 2 * self.idtp / d if d else None

    def as_dict(self) -> dict[str, Any]:
        return {"idf1": self.idf1, "idp": self.idp, "idr": self.idr, "idtp": self.idtp, "idfp": self.idfp,
                "idfn": self.idfn}


@dataclasses.dataclass(frozen=True)
class LinkEvaluation:
    """What :func:`evaluate_links` found; :meth:`as_dict` is the JSON report.

    Attributes:
        tracklets: Tracklets in the links.
        matched: Tracklets assigned to a GT person.
        unmatched: Ids of tracklets with no majority person (false-positive tracklets).
        cross_camera / same_camera / all_pairs: Pairwise scores.
        gt_cross_camera_pairs: True cross-camera pairs among matched tracklets (``TP + FN``).
        purity: Tracklet-weighted majority share of the global ids (``None`` with no matched tracklet).
        fragmentation: Mean global ids per GT person with matched tracklets.
        fragmentation_multi_camera: The same over GT persons seen on >= 2 cameras (``None`` if none).
        persons: GT persons with matched tracklets.
        persons_multi_camera: Those seen on >= 2 cameras.
        predicted_identities: Distinct global ids in the links.
        identity_f1: IDF1 on the frames of the links.
        impure: Ids of tracklets holding two people.
        fragments: ``(earlier, later)`` tracklet ids of one person on one camera <= ``fragment_gap_s`` apart.
        assignments: Every tracklet's assignment.
        settings: The thresholds used.
    """

    tracklets: int
    matched: int
    unmatched: tuple[str, ...]
    cross_camera: PairScores
    same_camera: PairScores
    all_pairs: PairScores
    gt_cross_camera_pairs: int
    purity: float | None
    fragmentation: float | None
    fragmentation_multi_camera: float | None
    persons: int
    persons_multi_camera: int
    predicted_identities: int
    identity_f1: IdentityF1
    impure: tuple[str, ...]
    fragments: tuple[tuple[str, str], ...]
    assignments: tuple[TrackletAssignment, ...]
    settings: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tracklets": self.tracklets, "matched": self.matched, "unmatched": len(self.unmatched),
            "unmatched_tracklets": list(self.unmatched),
            "cross_camera": self.cross_camera.as_dict(), "same_camera": self.same_camera.as_dict(),
            "all_pairs": self.all_pairs.as_dict(), "gt_cross_camera_pairs": self.gt_cross_camera_pairs,
            "purity": self.purity, "fragmentation": self.fragmentation,
            "fragmentation_multi_camera": self.fragmentation_multi_camera, "persons": self.persons,
            "persons_multi_camera": self.persons_multi_camera, "predicted_identities": self.predicted_identities,
            "identity_f1": self.identity_f1.as_dict(),
            "impure": len(self.impure), "impure_tracklets": list(self.impure),
            "fragments": len(self.fragments), "fragment_pairs": [list(p) for p in self.fragments],
            "settings": dict(self.settings),
            "assignments": [a.as_dict() for a in self.assignments],
        }


# --------------------------------------------------------------------------------------------------
# loading
def load_ground_truth(path: Path | str) -> GroundTruth:
    """Read a GT CSV (header ``frame,person,x1,y1,x2,y2``).

    Raises:
        FileNotFoundError: No such file.
        ValueError: A missing column, a non-number, a negative frame, a person < 1, a box with
            ``x2 <= x1`` or ``y2 <= y1``, or one person twice on one frame; the message names the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ground-truth file")
    per_frame: dict[int, list[tuple[int, list[float]]]] = defaultdict(list)
    seen: set[tuple[int, int]] = set()
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        need = ["frame", "person", "x1", "y1", "x2", "y2"]
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in need):
            raise ValueError(f"{path}: header must hold {','.join(need)}, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                frame, person = int(row["frame"]), int(row["person"])
                box = [float(row[k]) for k in ("x1", "y1", "x2", "y2")]
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: not a number in {row}") from None
            if frame < 0 or person < 1:
                raise ValueError(f"{path}:{line}: frame must be >= 0 and person >= 1, got {frame}, {person}")
            if not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"{path}:{line}: box {box} must have x2 > x1 and y2 > y1")
            if (frame, person) in seen:
                raise ValueError(f"{path}:{line}: person {person} twice on frame {frame}")
            seen.add((frame, person))
            per_frame[frame].append((person, box))
    boxes = {f: (np.array([p for p, _ in rows], np.int64), np.array([b for _, b in rows], np.float64))
             for f, rows in per_frame.items()}
    return GroundTruth(boxes)


def load_links(path: Path | str) -> list[LinkedTracklet]:
    """Read ``links.json`` (a list of link objects, see ``docs/ARCHITECTURE.md``).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not JSON, not a list, or a link missing a field / with inconsistent frames and boxes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such links file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of links, got {type(data).__name__}")
    out = []
    for i, lk in enumerate(data):
        try:
            out.append(LinkedTracklet(
                tracklet_id=str(lk["tracklet_id"]), camera=str(lk["camera"]), global_id=str(lk["global_id"]),
                start_s=float(lk["start_s"]), end_s=float(lk["end_s"]),
                frames=tuple(int(f) for f in lk["frames"]),
                boxes=tuple(tuple(float(v) for v in b) for b in lk["boxes"])))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: link {i} lacks or mistypes a field ({exc!r})") from None
    ids = Counter(t.tracklet_id for t in out)
    dup = [k for k, n in ids.items() if n > 1]
    if dup:
        raise ValueError(f"{path}: tracklet ids appear twice: {dup[:5]}")
    return out


# --------------------------------------------------------------------------------------------------
# geometry
def _overlaps(box: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and intersection-over-``box`` of one box ``[4]`` against GT boxes ``[N, 4]``: two ``[N]``."""
    ix = np.clip(np.minimum(box[2], gt[:, 2]) - np.maximum(box[0], gt[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], gt[:, 3]) - np.maximum(box[1], gt[:, 1]), 0, None)
    inter = ix * iy
    a = (box[2] - box[0]) * (box[3] - box[1])
    b = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    return inter / (a + b - inter), inter / a


def _corresponding(box: np.ndarray, gt: np.ndarray, min_iou: float, min_iot: float) -> np.ndarray:
    """Mask ``bool [N]`` of GT boxes that ``box`` may stand for (IoU >= min_iou or IoT >= min_iot)."""
    if len(gt) == 0:
        return np.zeros(0, bool)
    iou, iot = _overlaps(box, gt)
    return (iou >= min_iou) | (iot >= min_iot)


def best_person(gt: GroundTruth, frame: int, box: Sequence[float], min_iou: float = MIN_IOU,
                min_iot: float = MIN_IOT) -> int | None:
    """The GT person a box on ``frame`` votes for, or ``None`` (see the module docstring)."""
    persons, boxes = gt.at(frame)
    if len(persons) == 0:
        return None
    iou, iot = _overlaps(np.asarray(box, np.float64), boxes)
    i = int(np.argmax(iou))
    if iou[i] >= min_iou:
        return int(persons[i])
    j = int(np.argmax(iot))
    if iot[j] >= min_iot:
        return int(persons[j])
    return None


# --------------------------------------------------------------------------------------------------
# the parts
def assign_tracklets(gt: GroundTruth, tracklets: Iterable[LinkedTracklet], min_iou: float = MIN_IOU,
                     min_iot: float = MIN_IOT, impure_share: float = IMPURE_SHARE) -> list[TrackletAssignment]:
    """Give each tracklet its GT person by majority vote of its sampled boxes."""
    out = []
    for t in tracklets:
        votes: Counter[int] = Counter()
        for f, b in zip(t.frames, t.boxes):
            p = best_person(gt, f, b, min_iou, min_iot)
            if p is not None:
                votes[p] += 1
        n = len(t.frames)
        ranked = votes.most_common()
        person = ranked[0][0] if ranked and ranked[0][1] * 2 > n else None
        impure = len(ranked) >= 2 and ranked[1][1] >= impure_share * n
        out.append(TrackletAssignment(t.tracklet_id, t.camera, t.global_id, person, dict(votes), n, impure))
    return out


def pairwise_scores(assignments: Sequence[TrackletAssignment]) -> tuple[PairScores, PairScores, PairScores]:
    """``(cross-camera, same-camera, all)`` pair counts over the matched tracklets."""
    counts = {True: [0, 0, 0], False: [0, 0, 0]}  # cross-camera? -> tp, fp, fn
    matched = [a for a in assignments if a.person is not None]
    for a, b in combinations(matched, 2):
        c = counts[a.camera != b.camera]
        same_person, same_id = a.person == b.person, a.global_id == b.global_id
        if same_person and same_id:
            c[0] += 1
        elif same_id:
            c[1] += 1
        elif same_person:
            c[2] += 1
    cross, same = PairScores(*counts[True]), PairScores(*counts[False])
    return cross, same, PairScores(cross.tp + same.tp, cross.fp + same.fp, cross.fn + same.fn)


def idf1(gt: GroundTruth, tracklets: Sequence[LinkedTracklet], min_iou: float = MIN_IOU,
         min_iot: float = MIN_IOT) -> IdentityF1:
    """IDF1 of the global ids on the frames of the links (see the module docstring).

    Per frame, a (GT person, global id) pair counts one corresponding detection when any of the
    global id's boxes on that frame corresponds to the person's GT box; a global id with two boxes on
    one frame (one person in two overlapping virtual cameras) can therefore match once, and its
    second box is an IDFP.
    """
    frames = sorted({f for t in tracklets for f in t.frames})
    pred_by_frame: dict[int, list[tuple[str, np.ndarray]]] = defaultdict(list)
    for t in tracklets:
        for f, b in zip(t.frames, t.boxes):
            pred_by_frame[f].append((t.global_id, np.asarray(b, np.float64)))
    gids = sorted({t.global_id for t in tracklets})
    persons = sorted({int(p) for f in frames for p in gt.at(f)[0]})
    gi = {g: i for i, g in enumerate(gids)}
    pi = {p: i for i, p in enumerate(persons)}
    n_gt = np.zeros(len(persons))
    n_pred = np.zeros(len(gids))
    match = np.zeros((len(persons), len(gids)))
    for f in frames:
        gp, gb = gt.at(f)
        for p in gp:
            n_gt[pi[int(p)]] += 1
        hit: set[tuple[int, int]] = set()
        for g, b in pred_by_frame[f]:
            n_pred[gi[g]] += 1
            for k in np.flatnonzero(_corresponding(b, gb, min_iou, min_iot)):
                hit.add((pi[int(gp[k])], gi[g]))
        for r, c in hit:
            match[r, c] += 1
    if len(persons) == 0 or len(gids) == 0:
        return IdentityF1(0, int(n_pred.sum()), int(n_gt.sum()))
    from scipy.optimize import linear_sum_assignment

    # cost of pairing person r with id c = its unmatched detections on both sides; an unpaired person
    # or id costs all its detections, which the padding of the square matrix expresses
    n, m = len(persons), len(gids)
    cost = np.zeros((n + m, m + n))
    cost[:n, :m] = n_gt[:, None] + n_pred[None, :] - 2 * match
    cost[:n, m:] = np.where(np.eye(n, dtype=bool), n_gt[:, None], 1e12)
    cost[n:, :m] = np.where(np.eye(m, dtype=bool), n_pred[None, :], 1e12)
    rows, cols = linear_sum_assignment(cost)
    idtp = int(sum(match[r, c] for r, c in zip(rows, cols) if r < n and c < m))
    return IdentityF1(idtp, int(n_pred.sum()) - idtp, int(n_gt.sum()) - idtp)


def _fragments(assignments: Sequence[TrackletAssignment], tracklets: Mapping[str, LinkedTracklet],
               gap_s: float) -> list[tuple[str, str]]:
    groups: dict[tuple[int, str], list[LinkedTracklet]] = defaultdict(list)
    for a in assignments:
        if a.person is not None:
            groups[(a.person, a.camera)].append(tracklets[a.tracklet_id])
    out = []
    for ts in groups.values():
        ts.sort(key=lambda t: (t.start_s, t.end_s))
        for prev, nxt in zip(ts, ts[1:]):
            if nxt.start_s - prev.end_s <= gap_s:
                out.append((prev.tracklet_id, nxt.tracklet_id))
    return sorted(out)


def evaluate_links(gt: GroundTruth, tracklets: Sequence[LinkedTracklet], min_iou: float = MIN_IOU,
                   min_iot: float = MIN_IOT, impure_share: float = IMPURE_SHARE,
                   fragment_gap_s: float = FRAGMENT_GAP_S) -> LinkEvaluation:
    """Score the global identities of ``tracklets`` against ``gt``.

    Args:
        gt: Ground truth (:func:`load_ground_truth`).
        tracklets: The links (:func:`load_links`).
        min_iou: IoU of a tracklet box and a GT box for a vote, in (0, 1].
        min_iot: Intersection over the tracklet box for a vote when the IoU is too low (ROI-cut boxes).
        impure_share: Share of the samples on a second person that makes a tracklet impure.
        fragment_gap_s: Seconds between tracklets of one person on one camera that count as a broken track.

    Returns:
        The report.

    Raises:
        ValueError: A threshold out of range.

    Example::

        report = evaluate_links(load_ground_truth("tests/data/vtest_gt.csv"), load_links("out/demo/links.json"))
        report.cross_camera.f1
    """
    for name, v in (("min_iou", min_iou), ("min_iot", min_iot), ("impure_share", impure_share)):
        if not 0 < v <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {v}")
    if fragment_gap_s < 0:
        raise ValueError(f"fragment_gap_s must be >= 0, got {fragment_gap_s}")
    assignments = assign_tracklets(gt, tracklets, min_iou, min_iot, impure_share)
    matched = [a for a in assignments if a.person is not None]
    cross, same, every = pairwise_scores(assignments)
    by_gid: dict[str, Counter[int]] = defaultdict(Counter)
    by_person_ids: dict[int, set[str]] = defaultdict(set)
    by_person_cams: dict[int, set[str]] = defaultdict(set)
    for a in matched:
        by_gid[a.global_id][a.person] += 1
        by_person_ids[a.person].add(a.global_id)
        by_person_cams[a.person].add(a.camera)
    purity = (sum(c.most_common(1)[0][1] for c in by_gid.values()) / len(matched)) if matched else None
    frag = float(np.mean([len(v) for v in by_person_ids.values()])) if by_person_ids else None
    multi = [p for p, cams in by_person_cams.items() if len(cams) >= 2]
    frag_multi = float(np.mean([len(by_person_ids[p]) for p in multi])) if multi else None
    report = LinkEvaluation(
        tracklets=len(assignments), matched=len(matched),
        unmatched=tuple(a.tracklet_id for a in assignments if a.person is None),
        cross_camera=cross, same_camera=same, all_pairs=every, gt_cross_camera_pairs=cross.tp + cross.fn,
        purity=purity, fragmentation=frag, fragmentation_multi_camera=frag_multi,
        persons=len(by_person_ids), persons_multi_camera=len(multi),
        predicted_identities=len({t.global_id for t in tracklets}),
        identity_f1=idf1(gt, tracklets, min_iou, min_iot),
        impure=tuple(a.tracklet_id for a in assignments if a.impure),
        fragments=tuple(_fragments(assignments, {t.tracklet_id: t for t in tracklets}, fragment_gap_s)),
        assignments=tuple(assignments),
        settings={"min_iou": min_iou, "min_iot": min_iot, "impure_share": impure_share,
                  "fragment_gap_s": fragment_gap_s})
    log.info("evaluated %d tracklets (%d matched): cross-camera F1 %s", report.tracklets, report.matched,
             report.cross_camera.f1)
    return report
