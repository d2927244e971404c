"""Records shared by every video re-id data set loader.

A loader turns a data set on disk into a :class:`VideoReidDataset`: three lists of
:class:`TrackletItem` (``train``, ``query``, ``gallery``). A tracklet item is a sequence of image
files of one person seen by one camera, in temporal order. Images stay on disk; the training and
test :class:`~stages.reid.training.sampling.TrackletDataset` reads them (OpenCV, BGR) and turns them into
RGB tensors.

Identity conventions (the same as the published protocols of MARS, iLIDS-VID, PRID-2011 and
DukeMTMC-VideoReID):

* ``train`` pids are relabelled to ``0 .. num_train_pids - 1`` (sorted by original pid or directory
  name), so they can index a classifier.
* ``query`` / ``gallery`` pids keep the data set's own labels (MARS and Duke pids, iLIDS-VID and
  PRID person numbers), so a query matches gallery items with the same pid.
* ``pid == -1`` marks junk (MARS only): such gallery items are ignored for every query by
  :func:`stages.reid.training.evaluation.evaluate_ranking`. ``pid == 0`` in MARS are distractors and are
  ordinary non-matching gallery items.
* ``camid`` is a 0-based camera index; the evaluation ignores gallery items with the query's pid
  *and* camid (the same person seen by the same camera).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

JUNK_PID = -1
"""Pid of junk tracklets (MARS): kept in the gallery, ignored by the evaluation."""

_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class TrackletItem:
    """One tracklet: image files of one person seen by one camera.

    Attributes:
        paths: Image file paths (str) in temporal order; at least one.
        pid: Person identity. Relabelled ``0..N-1`` in ``train``; the data set's own label in
            ``query``/``gallery``; ``-1`` for junk.
        camid: 0-based camera index (``>= 0``).
        tracklet_id: Identifier unique within the data set (readable, e.g. ``"0001C1T0001"``).

    Raises:
        ValueError: ``paths`` is empty or not a tuple of str, ``pid``/``camid`` is not an int,
            ``camid < 0`` or ``tracklet_id`` is empty.
    """

    paths: tuple[str, ...]
    pid: int
    camid: int
    tracklet_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.paths, tuple) or not self.paths:
            raise ValueError(f"TrackletItem.paths must be a non-empty tuple of str, got {self.paths!r}")
        if not all(isinstance(p, str) for p in self.paths):
            raise ValueError(f"TrackletItem.paths must hold str paths (tracklet {self.tracklet_id!r})")
        if isinstance(self.pid, bool) or not isinstance(self.pid, int):
            raise ValueError(f"TrackletItem.pid must be an int, got {self.pid!r}")
        if isinstance(self.camid, bool) or not isinstance(self.camid, int) or self.camid < 0:
            raise ValueError(f"TrackletItem.camid must be an int >= 0, got {self.camid!r}")
        if not isinstance(self.tracklet_id, str) or not self.tracklet_id:
            raise ValueError(f"TrackletItem.tracklet_id must be a non-empty str, got {self.tracklet_id!r}")

    def __len__(self) -> int:
        """Number of frames."""
        return len(self.paths)


@dataclass(frozen=True)
class VideoReidDataset:
    """A video re-id data set split into train, query and gallery tracklets.

    Attributes:
        name: Data set name (``"mars"``, ``"ilidsvid"``, ``"prid2011"``, ``"duke"``, ``"tracklets"``).
        train: Training tracklets, pids relabelled ``0..num_train_pids-1``.
        query: Query (probe) tracklets.
        gallery: Gallery tracklets.
        num_train_pids: Number of training identities.
        split: Index of the train/test split for split-based sets (iLIDS-VID, PRID-2011), else None.
        num_splits: Number of available splits for split-based sets, else None.

    Raises:
        ValueError: Train pids are not exactly ``0..num_train_pids-1``.
    """

    name: str
    train: list[TrackletItem]
    query: list[TrackletItem]
    gallery: list[TrackletItem]
    num_train_pids: int
    split: int | None = None
    num_splits: int | None = None
    root: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        train_pids = {item.pid for item in self.train}
        if train_pids != set(range(self.num_train_pids)):
            raise ValueError(
                f"{self.name}: train pids must be relabelled to 0..{self.num_train_pids - 1}, "
                f"got {len(train_pids)} distinct pids in [{min(train_pids, default=None)}, "
                f"{max(train_pids, default=None)}]"
            )

    @property
    def num_train_cams(self) -> int:
        """Number of distinct camera ids among training tracklets."""
        return len({item.camid for item in self.train})

    def summary(self) -> str:
        """A small text table (for logs): tracklets, identities and frames per subset."""
        lines = [f"{self.name}" + (f" (split {self.split}/{self.num_splits})" if self.split is not None else "")]
        lines.append(f"  {'subset':<8} {'pids':>6} {'tracklets':>10} {'frames':>9}")
        for subset in ("train", "query", "gallery"):
            items: list[TrackletItem] = getattr(self, subset)
            pids = len({item.pid for item in items})
            frames = sum(len(item) for item in items)
            lines.append(f"  {subset:<8} {pids:>6} {len(items):>10} {frames:>9}")
        return "\n".join(lines)


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded integers numerically (``f2`` before ``f10``)."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(name))


def require_paths(paths: Iterable[Path], layout: str) -> None:
    """Raise if any of ``paths`` is missing.

    Args:
        paths: Files or directories the loader needs.
        layout: Human-readable description of the expected layout, added to the message.

    Raises:
        FileNotFoundError: A path does not exist; the message names it and the expected layout.
    """
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; expected layout:\n{layout}")


def list_images(directory: Path, suffixes: Sequence[str]) -> list[str]:
    """Image files of ``directory`` in natural (temporal) order.

    Args:
        directory: Directory holding the frames of one tracklet.
        suffixes: Accepted lower-case suffixes, e.g. ``(".png",)``.

    Returns:
        Paths as str, sorted with :func:`natural_key` on the file name.
    """
    files = [p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in suffixes]
    return [str(p) for p in sorted(files, key=lambda p: natural_key(p.name))]


def relabel(items: Sequence[TrackletItem]) -> tuple[list[TrackletItem], int]:
    """Relabel the pids of ``items`` to ``0..N-1`` in increasing order of the original pid.

    Args:
        items: Training tracklets with their original pids.

    Returns:
        The relabelled items (same order) and the number of identities ``N``.
    """
    mapping = {pid: label for label, pid in enumerate(sorted({item.pid for item in items}))}
    out = [
        TrackletItem(paths=item.paths, pid=mapping[item.pid], camid=item.camid, tracklet_id=item.tracklet_id)
        for item in items
    ]
    return out, len(mapping)


def check_split_index(split: int, num_splits: int, source: str) -> None:
    """Raise ValueError unless ``0 <= split < num_splits``.

    Raises:
        ValueError: ``split`` is out of range; the message names ``source``.
    """
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split < num_splits:
        raise ValueError(f"split must be an int in [0, {num_splits - 1}] for {source}, got {split!r}")
