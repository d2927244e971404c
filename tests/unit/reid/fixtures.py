"""Builders of tiny fake video re-id data sets in the published on-disk layouts.

Each builder writes into a directory (a pytest ``tmp_path``) small generated images (8 x 4 pixels
by default) and the index files of the real distribution, and returns a small record of what it
wrote so tests can state their expectations. The layouts mirror the real data sets file for file:

* MARS: ``bbox_train/``, ``bbox_test/``, ``info/*.txt``, ``info/*.mat`` (written with
  ``scipy.io.savemat``, float64 matrices like the MATLAB originals).
* iLIDS-VID: ``i-LIDS-VID/sequences/cam{1,2}/personXXX/*.png`` and
  ``train-test people splits/train_test_splits_ilidsvid.mat``.
* PRID-2011: ``prid_2011/multi_shot/cam_{a,b}/person_XXXX/*.png`` and optionally
  ``splits_prid2011.json``.
* DukeMTMC-VideoReID: ``{train,query,gallery}/<pid4>/<tracklet4>/<pid4>_C<c>_F<f4>_X<id>.jpg``.
* Mined tracklets: written with :func:`stages.reid.training.datasets.tracklets.write_tracklet_folder`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy.io import savemat

from stages.reid.training.datasets.tracklets import write_tracklet_folder

IMAGE_HW = (8, 4)


def write_image(path: Path, rng: np.random.Generator, size_hw: tuple[int, int] = IMAGE_HW) -> None:
    """Write a random BGR uint8 image (format from the suffix) and create parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, size=(*size_hw, 3), dtype=np.uint8)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


# ------------------------------------------------------------------------------------------ MARS


@dataclass(frozen=True)
class MarsTrack:
    pid: int
    cam: int  # 1-based, as in MARS
    track: int
    num_frames: int


MARS_TRAIN = (
    MarsTrack(1, 1, 1, 3),
    MarsTrack(1, 2, 1, 2),
    MarsTrack(3, 1, 1, 2),
    MarsTrack(7, 4, 2, 2),
)
MARS_TEST = (
    MarsTrack(2, 1, 1, 3),  # row 1: query
    MarsTrack(2, 3, 1, 2),  # row 2: gallery, true match
    MarsTrack(2, 1, 2, 2),  # row 3: gallery, same pid and camera as query 1
    MarsTrack(5, 2, 1, 2),  # row 4: query
    MarsTrack(5, 6, 1, 2),  # row 5: gallery, true match
    MarsTrack(0, 1, 1, 2),  # row 6: gallery, distractor
    MarsTrack(-1, 2, 1, 2),  # row 7: gallery, junk
)
MARS_QUERY_IDX = (1, 4)  # 1-based rows of MARS_TEST


def mars_pid_dir(pid: int) -> str:
    """MARS directory / name prefix of a pid: ``0001``, ``0000``, junk ``00-1``."""
    return "00-1" if pid == -1 else f"{pid:04d}"


def mars_name(track: MarsTrack, frame: int) -> str:
    """``0001C1T0001F001.jpg``."""
    return f"{mars_pid_dir(track.pid)}C{track.cam}T{track.track:04d}F{frame:03d}.jpg"


def write_mars(
    root: Path,
    train: tuple[MarsTrack, ...] = MARS_TRAIN,
    test: tuple[MarsTrack, ...] = MARS_TEST,
    query_idx: tuple[int, ...] = MARS_QUERY_IDX,
    seed: int = 0,
) -> Path:
    """Write a MARS-layout data set under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    (root / "info").mkdir(parents=True, exist_ok=True)
    for subset, tracks, txt, mat, var in (
        ("bbox_train", train, "train_name.txt", "tracks_train_info.mat", "track_train_info"),
        ("bbox_test", test, "test_name.txt", "tracks_test_info.mat", "track_test_info"),
    ):
        names: list[str] = []
        rows = []
        for track in tracks:
            start = len(names) + 1
            for frame in range(1, track.num_frames + 1):
                name = mars_name(track, frame)
                write_image(root / subset / mars_pid_dir(track.pid) / name, rng)
                names.append(name)
            rows.append([start, len(names), track.pid, track.cam])
        (root / "info" / txt).write_text("\n".join(names) + "\n")
        savemat(str(root / "info" / mat), {var: np.asarray(rows, dtype=np.float64)})
    savemat(str(root / "info" / "query_IDX.mat"), {"query_IDX": np.asarray([query_idx], dtype=np.float64)})
    return root


# ------------------------------------------------------------------------------------- iLIDS-VID

ILIDS_PERSONS = (1, 2, 4, 7, 10, 11)  # gaps, as in the real person numbering


@dataclass(frozen=True)
class IlidsInfo:
    root: Path
    persons: tuple[str, ...]  # sorted directory names
    ls_set: np.ndarray  # [num_splits, num_persons], 1-based indices into persons
    frames: dict[tuple[int, str], list[int]] = field(default_factory=dict)  # (cam, person) -> frame numbers


def write_ilidsvid(
    root: Path, persons: tuple[int, ...] = ILIDS_PERSONS, num_splits: int = 10, seed: int = 0
) -> IlidsInfo:
    """Write an iLIDS-VID-layout data set; frame numbers are random, sorted, zero-padded to 5."""
    rng = np.random.default_rng(seed)
    names = tuple(f"person{p:03d}" for p in persons)
    frames: dict[tuple[int, str], list[int]] = {}
    for cam in (1, 2):
        for name in names:
            numbers = sorted(rng.choice(np.arange(90, 400), size=int(rng.integers(3, 6)), replace=False).tolist())
            frames[(cam, name)] = numbers
            for number in numbers:
                path = root / "i-LIDS-VID" / "sequences" / f"cam{cam}" / name / f"cam{cam}_{name}_{number:05d}.png"
                write_image(path, rng)
    ls_set = np.stack([rng.permutation(len(names)) + 1 for _ in range(num_splits)]).astype(np.float64)
    split_dir = root / "train-test people splits"
    split_dir.mkdir(parents=True, exist_ok=True)
    savemat(str(split_dir / "train_test_splits_ilidsvid.mat"), {"ls_set": ls_set})
    return IlidsInfo(root=root, persons=names, ls_set=ls_set.astype(np.int64), frames=frames)


# ------------------------------------------------------------------------------------- PRID-2011

# person number -> (frames in cam_a, frames in cam_b); 0 = absent from that camera.
PRID_PERSONS = {
    1: (21, 23),
    2: (24, 21),
    3: (22, 5),  # too short in cam_b: not eligible
    4: (21, 21),
    5: (25, 22),
    6: (23, 26),
    7: (21, 0),  # cam_a only
    8: (0, 22),  # cam_b only
}
PRID_ELIGIBLE = ("person_0001", "person_0002", "person_0004", "person_0005", "person_0006")


def write_prid2011(root: Path, persons: dict[int, tuple[int, int]] = PRID_PERSONS, splits: list[dict] | None = None,
                   seed: int = 0) -> Path:
    """Write a PRID-2011 multi-shot layout; with ``splits``, also ``splits_prid2011.json``."""
    rng = np.random.default_rng(seed)
    for number, counts in persons.items():
        for cam, count in zip(("cam_a", "cam_b"), counts):
            for frame in range(1, count + 1):
                write_image(root / "prid_2011" / "multi_shot" / cam / f"person_{number:04d}" / f"{frame:04d}.png", rng)
    if splits is not None:
        (root / "splits_prid2011.json").write_text(json.dumps(splits))
    return root


# ------------------------------------------------------------------------------ DukeMTMC-VideoReID


@dataclass(frozen=True)
class DukeTracklet:
    subset: str
    pid: int
    tracklet: int
    cam: int  # 1-based
    frames: tuple[int, ...]  # F numbers


DUKE_TRACKLETS = (
    DukeTracklet("train", 1, 1, 1, (1, 2, 3)),
    DukeTracklet("train", 1, 2, 2, (2, 3, 10)),  # starts at F0002, F0010 sorts after F0003
    DukeTracklet("train", 5, 1, 3, (1, 2)),
    DukeTracklet("query", 2, 1, 1, (1, 2, 3)),
    DukeTracklet("gallery", 2, 2, 4, (1, 2)),
    DukeTracklet("gallery", 2, 3, 1, (1, 2)),
    DukeTracklet("gallery", 9, 1, 2, (1, 2)),
)


def duke_name(t: DukeTracklet, frame: int) -> str:
    """``0001_C6_F0099_X30823.jpg``."""
    return f"{t.pid:04d}_C{t.cam}_F{frame:04d}_X{30000 + frame:05d}.jpg"


def write_duke(root: Path, tracklets: tuple[DukeTracklet, ...] = DUKE_TRACKLETS, seed: int = 0) -> Path:
    """Write a DukeMTMC-VideoReID layout under ``root`` (frames written in shuffled order)."""
    rng = np.random.default_rng(seed)
    for t in tracklets:
        for frame in rng.permutation(t.frames).tolist():
            write_image(root / t.subset / f"{t.pid:04d}" / f"{t.tracklet:04d}" / duke_name(t, frame), rng)
    for subset in ("train", "query", "gallery"):
        (root / subset).mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------------- mined tracklets


@dataclass(frozen=True)
class MinedTracklet:
    tracklet_id: str
    camera: str
    num_frames: int
    pid: int | None = None


def write_mined(
    root: Path, tracklets: tuple[MinedTracklet, ...], seed: int = 0, size_hw: tuple[int, int] = (16, 8)
) -> Path:
    """Write tracklet folders with :func:`write_tracklet_folder` (random crops, plausible metadata)."""
    rng = np.random.default_rng(seed)
    for i, t in enumerate(tracklets):
        frames = list(range(10 * i, 10 * i + t.num_frames))
        crops = [rng.integers(0, 256, size=(*size_hw, 3), dtype=np.uint8) for _ in frames]
        write_tracklet_folder(
            root, t.tracklet_id, t.camera, i, frames, [f / 25.0 for f in frames],
            [[1.0, 2.0, 11.0, 22.0] for _ in frames], crops, pid=t.pid,
        )
    return root
