"""Tracklet folders mined by the pipeline (``reidstream mine``): writer, reader and a held-out protocol.

Layout under ``root``, one folder per tracklet::

    <tracklet_id>/meta.json
    <tracklet_id>/000.jpg, 001.jpg, ...       crops in temporal order, BGR-encoded JPEG (OpenCV)

``meta.json`` keys:

* ``tracklet_id`` (str, equal to the folder name), ``camera`` (str), ``track_id`` (int);
* ``frames`` (list of int, source-video frame index of each crop), ``timestamps_s`` (list of float,
  stream-time seconds), ``boxes`` (list of ``[x1, y1, x2, y2]`` float source-video pixels): one
  entry per crop;
* ``pid`` (int, optional): a person label. Without it, each tracklet is its own pseudo-identity.

Split protocol of :func:`load_tracklets` (deterministic for a given ``seed``):

* Pids: labelled tracklets keep ``pid``; unlabelled ones get pseudo-pids ``base, base+1, ...`` in
  sorted tracklet-id order, with ``base = max(labelled pids) + 1`` (0 without labels).
* A fraction ``holdout_fraction`` of the identities (``round``, at least one when the fraction is
  > 0) is drawn with ``numpy.random.default_rng(seed)``; all their tracklets are held out for
  testing, the others form ``train`` (real camera ids, pids relabelled ``0..N-1``).
* ``protocol="halves"`` (the default for unlabelled data): each held-out tracklet is cut in two
  in time; its first ``ceil(n/2)`` frames are a query item with ``camid 0``, the remaining frames a
  gallery item with ``camid 1`` (same pid, different camid, so the same-camera rule of the
  evaluation does not exclude the match). Only identities whose tracklets all have >= 2 frames
  can be held out. The camids of query/gallery items are therefore *not* cameras.
* ``protocol="cameras"`` (labelled data only): for each held-out pid seen by >= 2 cameras, one
  tracklet per camera (drawn with the same generator) is a query, all its other tracklets are
  gallery items; pids seen by one camera go to the gallery only (distractors). Camids are real
  camera indices (camera names sorted).
* ``protocol="auto"``: ``"cameras"`` when every tracklet has a ``pid``, else ``"halves"``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from stages.reid.training.datasets.base import TrackletItem, VideoReidDataset, relabel, require_paths

log = logging.getLogger(__name__)

META_FILE = "meta.json"
REQUIRED_KEYS = ("tracklet_id", "camera", "track_id", "frames", "timestamps_s", "boxes")
LAYOUT = """\
  ROOT/<tracklet_id>/meta.json (tracklet_id, camera, track_id, frames, timestamps_s, boxes, optional pid)
  ROOT/<tracklet_id>/000.jpg, 001.jpg, ... (one BGR JPEG crop per entry of frames)"""

Protocol = Literal["auto", "halves", "cameras"]


def crop_name(index: int) -> str:
    """File name of crop ``index`` in a tracklet folder (``000.jpg``, ``001.jpg``, ...)."""
    return f"{index:03d}.jpg"


def write_tracklet_folder(
    root: str | Path,
    tracklet_id: str,
    camera: str,
    track_id: int,
    frames: Sequence[int],
    timestamps_s: Sequence[float],
    boxes: Sequence[Sequence[float]],
    crops_bgr: Sequence[np.ndarray],
    pid: int | None = None,
    *,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> Path:
    """Write one tracklet folder (crops as JPEG, then ``meta.json``).

    ``meta.json`` is written last, through a temporary file and an atomic rename, so a folder with a
    ``meta.json`` is complete.

    Args:
        root: Directory of tracklet folders (created if missing).
        tracklet_id: Folder name; no path separators.
        camera: Camera id.
        track_id: Tracker id within the camera.
        frames: Source-video frame index of each crop.
        timestamps_s: Stream-time seconds of each crop.
        boxes: ``[x1, y1, x2, y2]`` source-video pixels of each crop.
        crops_bgr: Crops, ``numpy.uint8 [H, W, 3]`` **BGR** (sizes may differ).
        pid: Optional person label.
        jpeg_quality: OpenCV JPEG quality, 1..100.
        overwrite: Replace an existing folder's files instead of raising.

    Returns:
        The tracklet folder.

    Raises:
        ValueError: Empty or mismatched lengths, a crop that is not uint8 HxWx3, a box that is not 4
            numbers, or an invalid ``tracklet_id``.
        FileExistsError: The folder already has a ``meta.json`` and ``overwrite`` is False.
        OSError: OpenCV could not write a crop.

    Example:
        >>> write_tracklet_folder(out, "cam0-17", "cam0", 17, [3, 4], [0.1, 0.13],  # doctest: +SKIP
        ...                       [[10, 20, 50, 120], [11, 20, 51, 121]], [crop0, crop1])
    """
    import cv2

    if not tracklet_id or tracklet_id in (".", "..") or "/" in tracklet_id or os.sep in tracklet_id:
        raise ValueError(f"tracklet_id must be a plain folder name, got {tracklet_id!r}")
    n = len(crops_bgr)
    if n == 0:
        raise ValueError(f"tracklet {tracklet_id!r}: crops_bgr is empty")
    for field_name, values in (("frames", frames), ("timestamps_s", timestamps_s), ("boxes", boxes)):
        if len(values) != n:
            raise ValueError(f"tracklet {tracklet_id!r}: {field_name} has {len(values)} entries, crops_bgr has {n}")
    for i, crop in enumerate(crops_bgr):
        if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
            raise ValueError(
                f"tracklet {tracklet_id!r}: crops_bgr[{i}] must be numpy uint8 [H, W, 3] BGR, got "
                f"{getattr(crop, 'dtype', type(crop))} {getattr(crop, 'shape', '')}"
            )
        if crop.shape[0] == 0 or crop.shape[1] == 0:
            raise ValueError(f"tracklet {tracklet_id!r}: crops_bgr[{i}] is empty ({crop.shape})")
    for i, box in enumerate(boxes):
        if len(box) != 4:
            raise ValueError(f"tracklet {tracklet_id!r}: boxes[{i}] must be [x1, y1, x2, y2], got {box!r}")

    folder = Path(root) / tracklet_id
    meta_path = folder / META_FILE
    if meta_path.exists() and not overwrite:
        raise FileExistsError(f"{meta_path} exists; pass overwrite=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for stale in folder.glob("*.jpg"):
            stale.unlink()
    for i, crop in enumerate(crops_bgr):
        path = folder / crop_name(i)
        if not cv2.imwrite(str(path), crop, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]):
            raise OSError(f"OpenCV could not write {path}")
    meta = {
        "tracklet_id": tracklet_id,
        "camera": str(camera),
        "track_id": int(track_id),
        "frames": [int(f) for f in frames],
        "timestamps_s": [float(t) for t in timestamps_s],
        "boxes": [[float(v) for v in box] for box in boxes],
    }
    if pid is not None:
        meta["pid"] = int(pid)
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta), encoding="utf-8")
    tmp.replace(meta_path)
    return folder


def read_tracklet_meta(folder: str | Path) -> dict:
    """Read and validate ``folder/meta.json``.

    Returns:
        The meta dict (``pid`` is None when absent).

    Raises:
        FileNotFoundError: ``meta.json`` is missing.
        ValueError: Invalid JSON, a missing key, mismatched list lengths, or a ``tracklet_id``
            different from the folder name.
    """
    folder = Path(folder)
    path = folder / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected layout:\n{LAYOUT}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; expected layout:\n{LAYOUT}")
    if meta["tracklet_id"] != folder.name:
        raise ValueError(f"{path}: tracklet_id {meta['tracklet_id']!r} differs from the folder name {folder.name!r}")
    n = len(meta["frames"])
    if n == 0 or len(meta["timestamps_s"]) != n or len(meta["boxes"]) != n:
        raise ValueError(f"{path}: frames, timestamps_s and boxes must be non-empty lists of one length")
    pid = meta.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
        raise ValueError(f"{path}: pid must be an int >= 0 or absent, got {pid!r}")
    meta["pid"] = pid
    return meta


def _scan(root: Path) -> list[tuple[dict, tuple[str, ...]]]:
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if not (folder / META_FILE).is_file():
            log.warning("tracklets: %s has no %s; skipped", folder, META_FILE)
            continue
        meta = read_tracklet_meta(folder)
        paths = tuple(str(folder / crop_name(i)) for i in range(len(meta["frames"])))
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist ({len(paths)} crops listed in {folder / META_FILE})")
        out.append((meta, paths))
    if not out:
        raise FileNotFoundError(f"{root} holds no tracklet folders; expected layout:\n{LAYOUT}")
    return out


def load_tracklets(
    root: str | Path,
    *,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    protocol: Protocol = "auto",
) -> VideoReidDataset:
    """Load mined tracklet folders and split them with the held-out protocol of the module docstring.

    Args:
        root: Directory of tracklet folders.
        holdout_fraction: Fraction of identities held out for query/gallery, in ``[0, 1]``.
        seed: Seed of ``numpy.random.default_rng`` for the held-out draw.
        protocol: ``"auto"``, ``"halves"`` or ``"cameras"``.

    Returns:
        The data set (``name="tracklets"``).

    Raises:
        FileNotFoundError: ``root`` is missing or holds no tracklet folder, or a crop is missing.
        ValueError: Bad ``meta.json``, ``holdout_fraction`` outside ``[0, 1]``, an unknown
            ``protocol``, or ``"cameras"`` with unlabelled tracklets.

    Example:
        >>> ds = load_tracklets("runs/mined", holdout_fraction=0.3, seed=1)  # doctest: +SKIP
    """
    root = Path(root).expanduser()
    require_paths([root], LAYOUT)
    if not 0.0 <= holdout_fraction <= 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1], got {holdout_fraction}")
    if protocol not in ("auto", "halves", "cameras"):
        raise ValueError(f"protocol must be 'auto', 'halves' or 'cameras', got {protocol!r}")
    records = _scan(root)
    labelled = [meta["pid"] is not None for meta, _ in records]
    if protocol == "auto":
        protocol = "cameras" if all(labelled) else "halves"
    if protocol == "cameras" and not all(labelled):
        raise ValueError(
            f"{root}: protocol 'cameras' needs a pid in every meta.json ({labelled.count(False)} lack one)"
        )

    cameras = sorted({meta["camera"] for meta, _ in records})
    cam_index = {name: i for i, name in enumerate(cameras)}
    next_pid = max((meta["pid"] for meta, _ in records if meta["pid"] is not None), default=-1) + 1
    items: list[TrackletItem] = []
    for meta, paths in records:
        pid = meta["pid"]
        if pid is None:
            pid, next_pid = next_pid, next_pid + 1
        camid = cam_index[meta["camera"]]
        items.append(TrackletItem(paths=paths, pid=pid, camid=camid, tracklet_id=meta["tracklet_id"]))

    by_pid: dict[int, list[TrackletItem]] = defaultdict(list)
    for item in items:
        by_pid[item.pid].append(item)
    if protocol == "halves":
        eligible = sorted(pid for pid, group in by_pid.items() if all(len(item) >= 2 for item in group))
    else:
        eligible = sorted(by_pid)
    n_hold = 0
    if holdout_fraction > 0 and eligible:
        n_hold = min(len(eligible), max(1, round(holdout_fraction * len(eligible))))
    rng = np.random.default_rng(seed)
    held = sorted(eligible[i] for i in rng.permutation(len(eligible))[:n_hold])
    held_set = set(held)

    query: list[TrackletItem] = []
    gallery: list[TrackletItem] = []
    for pid in held:
        group = by_pid[pid]
        if protocol == "halves":
            for item in group:
                cut = math.ceil(len(item) / 2)
                query.append(TrackletItem(item.paths[:cut], pid, 0, f"{item.tracklet_id}/first"))
                gallery.append(TrackletItem(item.paths[cut:], pid, 1, f"{item.tracklet_id}/second"))
        else:
            by_cam: dict[int, list[TrackletItem]] = defaultdict(list)
            for item in group:
                by_cam[item.camid].append(item)
            for camid in sorted(by_cam):
                cam_items = by_cam[camid]
                pick = int(rng.integers(len(cam_items))) if len(by_cam) >= 2 else -1
                for j, item in enumerate(cam_items):
                    (query if j == pick else gallery).append(item)
    train, num_train_pids = relabel([item for item in items if item.pid not in held_set])
    log.info(
        "tracklets: %d tracklets from %d cameras %s; protocol %s, %d of %d identities held out (seed %d)",
        len(items), len(cameras), cameras, protocol, len(held), len(by_pid), seed,
    )
    return VideoReidDataset(
        name="tracklets", train=train, query=query, gallery=gallery, num_train_pids=num_train_pids, root=str(root)
    )
