"""iLIDS-VID (Wang et al., "Person Re-Identification by Video Ranking", ECCV 2014).

300 identities, each seen once by each of 2 cameras (600 sequences of 23-192 frames).

Layout under ``root`` (as distributed, and as torchreid's loader expects)::

    i-LIDS-VID/sequences/cam1/person001/cam1_person001_00317.png ...
    i-LIDS-VID/sequences/cam2/person001/...
    train-test people splits/train_test_splits_ilidsvid.mat   variable ``ls_set``: 10 x 300

Each row of ``ls_set`` is a permutation of 1-based indices into the sorted list of person
directories. **Protocol** (Wang et al. ECCV 2014; torchreid): the *first* half of a row are the
test persons and the *second* half the training persons. Training uses both cameras' sequences of
the training persons; the test query set is the cam1 sequences of the test persons and the gallery
their cam2 sequences. Query/gallery pids are the person numbers (``person042`` -> 42); camids are 0
(cam1) and 1 (cam2).
"""

from __future__ import annotations

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
  ROOT/i-LIDS-VID/sequences/cam1/personXXX/*.png
  ROOT/i-LIDS-VID/sequences/cam2/personXXX/*.png
  ROOT/train-test people splits/train_test_splits_ilidsvid.mat (variable ls_set, splits x persons)"""

SPLITS_FILE = Path("train-test people splits") / "train_test_splits_ilidsvid.mat"
_PERSON = re.compile(r"^person(\d+)$")


def _person_dirs(cam_dir: Path) -> list[str]:
    names = sorted(p.name for p in cam_dir.iterdir() if p.is_dir() and _PERSON.match(p.name))
    if not names:
        raise FileNotFoundError(f"{cam_dir} holds no personXXX directories; expected layout:\n{LAYOUT}")
    return names


def read_ilidsvid_splits(root: str | Path) -> tuple[list[list[str]], list[list[str]]]:
    """Read the published splits as person directory names.

    Args:
        root: Data set directory.

    Returns:
        ``(train, test)``: per split, the sorted person directory names of the training and of the
        test persons.

    Raises:
        FileNotFoundError: The splits file or camera directories are missing.
        ValueError: ``ls_set`` is missing, or a row is not a permutation of ``1..num_persons``, or
            the two cameras do not hold the same persons.
    """
    from scipy.io import loadmat

    root = Path(root).expanduser()
    cam1, cam2 = root / "i-LIDS-VID" / "sequences" / "cam1", root / "i-LIDS-VID" / "sequences" / "cam2"
    split_path = root / SPLITS_FILE
    require_paths([root, cam1, cam2, split_path], LAYOUT)
    persons = _person_dirs(cam1)
    persons2 = _person_dirs(cam2)
    if persons != persons2:
        only = sorted(set(persons) ^ set(persons2))
        raise ValueError(f"{cam1} and {cam2} must hold the same persons; differing: {only[:10]}")
    data = loadmat(str(split_path))
    if "ls_set" not in data:
        raise ValueError(f"{split_path}: expected MATLAB variable 'ls_set'; layout:\n{LAYOUT}")
    ls_set = np.asarray(data["ls_set"]).astype(np.int64)
    num_persons = len(persons)
    if ls_set.ndim != 2 or ls_set.shape[1] != num_persons or num_persons % 2:
        raise ValueError(
            f"{split_path}: ls_set must be (num_splits, {num_persons}) for {num_persons} persons "
            f"(an even count), got shape {ls_set.shape}"
        )
    half = num_persons // 2
    train_splits, test_splits = [], []
    for i, row in enumerate(ls_set):
        if sorted(row.tolist()) != list(range(1, num_persons + 1)):
            raise ValueError(f"{split_path}: ls_set row {i} is not a permutation of 1..{num_persons}")
        test_splits.append(sorted(persons[j - 1] for j in row[:half]))
        train_splits.append(sorted(persons[j - 1] for j in row[half:]))
    return train_splits, test_splits


def _sequences(root: Path, persons: list[str], cams: tuple[int, ...]) -> list[TrackletItem]:
    items = []
    for person in persons:
        pid = int(_PERSON.match(person).group(1))
        for cam in cams:
            seq_dir = root / "i-LIDS-VID" / "sequences" / f"cam{cam}" / person
            paths = list_images(seq_dir, (".png",)) if seq_dir.is_dir() else []
            if not paths:
                raise FileNotFoundError(f"{seq_dir} holds no .png frames; expected layout:\n{LAYOUT}")
            items.append(TrackletItem(paths=tuple(paths), pid=pid, camid=cam - 1, tracklet_id=f"cam{cam}/{person}"))
    return items


def load_ilidsvid(root: str | Path, split: int = 0) -> VideoReidDataset:
    """Load iLIDS-VID split ``split`` from ``root``.

    Args:
        root: Directory holding ``i-LIDS-VID/`` and ``train-test people splits/``.
        split: Split index, ``0 <= split < 10`` for the published file.

    Returns:
        The data set (train: both cameras of the training persons, relabelled; query: cam1 of the
        test persons; gallery: cam2 of the test persons).

    Raises:
        FileNotFoundError: A directory, the splits file or a sequence's frames are missing.
        ValueError: Malformed splits file or ``split`` out of range.

    Example:
        >>> ds = load_ilidsvid("/data/ilids-vid", split=3)  # doctest: +SKIP
        >>> len(ds.query), len(ds.gallery), ds.num_train_pids  # doctest: +SKIP
        (150, 150, 150)
    """
    root = Path(root).expanduser()
    train_splits, test_splits = read_ilidsvid_splits(root)
    check_split_index(split, len(train_splits), str(root / SPLITS_FILE))
    train, num_train_pids = relabel(_sequences(root, train_splits[split], (1, 2)))
    query = _sequences(root, test_splits[split], (1,))
    gallery = _sequences(root, test_splits[split], (2,))
    dataset = VideoReidDataset(
        name="ilidsvid",
        train=train,
        query=query,
        gallery=gallery,
        num_train_pids=num_train_pids,
        split=split,
        num_splits=len(train_splits),
        root=str(root),
    )
    log.info("loaded %s", dataset.summary())
    return dataset
