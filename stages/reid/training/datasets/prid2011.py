"""PRID-2011 (Hirzer et al., "Person Re-Identification by Descriptive and Discriminative
Classification", SCIA 2011), multi-shot version.

Camera A holds 385 persons and camera B 749; the first 200 persons appear in both. The video re-id
protocol (Wang et al. ECCV 2014; McLaughlin et al. CVPR 2016) keeps the persons seen by both cameras
with at least 21 frames in each (178 persons) and draws 10 random half/half train/test splits.

Layout under ``root`` (as torchreid's loader expects)::

    prid_2011/multi_shot/cam_a/person_0001/0001.png ...
    prid_2011/multi_shot/cam_b/person_0001/...
    splits_prid2011.json      optional: list of 10 {"train": [...], "test": [...]} of directory names

With ``splits_prid2011.json`` (the commonly used file), its splits are used as they are. Without it,
10 seeded random half/half splits of the eligible persons are generated (``seed`` argument) and a
warning says so: numbers are then not comparable with published ones.

Test protocol: query = cam_a sequences of the test persons (camid 0), gallery = cam_b sequences
(camid 1). Query/gallery pids are the person numbers (``person_0042`` -> 42).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from stages.reid.training.datasets.base import (
    TrackletItem,
    VideoReidDataset,
    check_split_index,
    list_images,
    relabel,
    require_paths,
)

log = logging.getLogger(__name__)

LAYOUT = """\
  ROOT/prid_2011/multi_shot/cam_a/person_XXXX/*.png
  ROOT/prid_2011/multi_shot/cam_b/person_XXXX/*.png
  ROOT/splits_prid2011.json (optional: list of {"train": [dir names], "test": [dir names]})"""

SPLITS_FILE = "splits_prid2011.json"
MIN_SEQ_LEN = 21
NUM_SPLITS = 10
_PERSON = re.compile(r"^person_(\d+)$")
_CAMS = ("cam_a", "cam_b")


def _cam_dir(root: Path, cam: str) -> Path:
    return root / "prid_2011" / "multi_shot" / cam


def _frames(root: Path, cam: str, person: str) -> list[str]:
    seq_dir = _cam_dir(root, cam) / person
    return list_images(seq_dir, (".png",)) if seq_dir.is_dir() else []


def eligible_persons(root: str | Path, min_seq_len: int = MIN_SEQ_LEN) -> list[str]:
    """Person directories present in both cameras with ``>= min_seq_len`` frames in each.

    Args:
        root: Data set directory.
        min_seq_len: Minimum number of frames per camera (21 in the protocol).

    Returns:
        Sorted directory names (``person_XXXX``).

    Raises:
        FileNotFoundError: A camera directory is missing.
    """
    root = Path(root).expanduser()
    require_paths([_cam_dir(root, cam) for cam in _CAMS], LAYOUT)
    both = set.intersection(
        *({p.name for p in _cam_dir(root, cam).iterdir() if p.is_dir() and _PERSON.match(p.name)} for cam in _CAMS)
    )
    return sorted(p for p in both if all(len(_frames(root, cam, p)) >= min_seq_len for cam in _CAMS))


def generate_splits(persons: list[str], num_splits: int = NUM_SPLITS, seed: int = 0) -> list[dict[str, list[str]]]:
    """Seeded random half/half splits (train gets ``len // 2`` persons, test the rest).

    Args:
        persons: Eligible person directory names.
        num_splits: Number of splits.
        seed: Seed of ``numpy.random.default_rng``.

    Returns:
        ``[{"train": [...], "test": [...]}, ...]`` with sorted names.
    """
    rng = np.random.default_rng(seed)
    half = len(persons) // 2
    splits = []
    for _ in range(num_splits):
        order = rng.permutation(len(persons))
        splits.append(
            {"train": sorted(persons[i] for i in order[:half]), "test": sorted(persons[i] for i in order[half:])}
        )
    return splits


def _read_splits(path: Path) -> list[dict[str, list[str]]]:
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(splits, list) or not splits:
        raise ValueError(f"{path}: expected a non-empty list of {{'train': [...], 'test': [...]}} objects")
    for i, split in enumerate(splits):
        if not isinstance(split, dict) or not {"train", "test"} <= split.keys():
            raise ValueError(f"{path}: split {i} must be an object with 'train' and 'test' lists")
        if set(split["train"]) & set(split["test"]):
            raise ValueError(f"{path}: split {i} has persons in both train and test")
    return splits


def _sequences(root: Path, persons: list[str], cams: tuple[str, ...]) -> list[TrackletItem]:
    items = []
    for person in persons:
        match = _PERSON.match(person)
        if match is None:
            raise ValueError(f"person directory names must look like person_0001, got {person!r}")
        for cam in cams:
            paths = _frames(root, cam, person)
            if not paths:
                raise FileNotFoundError(f"{_cam_dir(root, cam) / person} holds no .png frames; layout:\n{LAYOUT}")
            items.append(
                TrackletItem(
                    paths=tuple(paths), pid=int(match.group(1)), camid=_CAMS.index(cam), tracklet_id=f"{cam}/{person}"
                )
            )
    return items


def load_prid2011(
    root: str | Path, split: int = 0, *, seed: int = 0, min_seq_len: int = MIN_SEQ_LEN
) -> VideoReidDataset:
    """Load PRID-2011 (multi-shot) split ``split`` from ``root``.

    Args:
        root: Directory holding ``prid_2011/`` and, optionally, ``splits_prid2011.json``.
        split: Split index in ``[0, num_splits)``.
        seed: Seed for the generated splits (used only without ``splits_prid2011.json``).
        min_seq_len: Minimum frames per camera for generated splits (used only without the file).

    Returns:
        The data set (train: both cameras, relabelled; query: cam_a; gallery: cam_b).

    Raises:
        FileNotFoundError: A camera directory or a listed person's frames are missing.
        ValueError: Malformed splits file, ``split`` out of range, or fewer than 2 eligible persons.

    Example:
        >>> ds = load_prid2011("/data/prid2011", split=0)  # doctest: +SKIP
        >>> len(ds.query), len(ds.gallery)  # doctest: +SKIP
        (89, 89)
    """
    root = Path(root).expanduser()
    require_paths([root] + [_cam_dir(root, cam) for cam in _CAMS], LAYOUT)
    split_path = root / SPLITS_FILE
    if split_path.is_file():
        splits = _read_splits(split_path)
        source = str(split_path)
    else:
        persons = eligible_persons(root, min_seq_len)
        if len(persons) < 2:
            raise ValueError(
                f"{root}: {len(persons)} persons appear in both cameras with >= {min_seq_len} frames; need >= 2"
            )
        splits = generate_splits(persons, NUM_SPLITS, seed)
        source = f"generated splits (seed {seed})"
        log.warning(
            "prid2011: %s not found; generated %d random half/half splits of %d eligible persons with seed %d "
            "(results are not comparable with published numbers)",
            split_path, NUM_SPLITS, len(persons), seed,
        )
    check_split_index(split, len(splits), source)
    chosen = splits[split]
    train, num_train_pids = relabel(_sequences(root, list(chosen["train"]), _CAMS))
    query = _sequences(root, list(chosen["test"]), ("cam_a",))
    gallery = _sequences(root, list(chosen["test"]), ("cam_b",))
    dataset = VideoReidDataset(
        name="prid2011",
        train=train,
        query=query,
        gallery=gallery,
        num_train_pids=num_train_pids,
        split=split,
        num_splits=len(splits),
        root=str(root),
    )
    log.info("loaded %s", dataset.summary())
    return dataset
