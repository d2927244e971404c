"""DukeMTMC-VideoReID (Wu et al., "Exploit the Unknown Gradually: One-Shot Video-Based Person
Re-Identification by Stepwise Learning", CVPR 2018; videos of Ristani et al., ECCVW 2016).

702 training identities (2,196 tracklets), 702 test identities plus 408 gallery distractor
identities (702 query and 2,636 gallery tracklets), 8 cameras.

Layout under ``root`` (``root`` may also be the parent of ``DukeMTMC-VideoReID/``)::

    train/<pid4>/<tracklet4>/<pid4>_C<cam>_F<frame4>_X<frameid>.jpg   e.g. train/0001/0001/0001_C6_F0001_X30823.jpg
    query/<pid4>/<tracklet4>/...
    gallery/<pid4>/<tracklet4>/...

The camera comes from the image name (``C6`` -> camid 5); the older name form without underscores
(``0001C6F0001X30823.jpg``) is accepted too. Frames are ordered by their ``F`` number.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from stages.reid.training.datasets.base import TrackletItem, VideoReidDataset, relabel, require_paths

log = logging.getLogger(__name__)

LAYOUT = """\
  ROOT/train/<pid4>/<tracklet4>/<pid4>_C<cam>_F<frame4>_X<frameid>.jpg
  ROOT/query/<pid4>/<tracklet4>/...
  ROOT/gallery/<pid4>/<tracklet4>/..."""

WRAPPER = "DukeMTMC-VideoReID"
_NAME = re.compile(r"^(\d+)_?C(\d+)_?F(\d+)")


def _resolve_root(root: Path) -> Path:
    if not (root / "train").is_dir() and (root / WRAPPER / "train").is_dir():
        return root / WRAPPER
    return root


def _subset(subset_dir: Path, subset: str) -> list[TrackletItem]:
    items: list[TrackletItem] = []
    for pid_dir in sorted(p for p in subset_dir.iterdir() if p.is_dir()):
        if not pid_dir.name.isdigit():
            raise ValueError(f"{pid_dir}: identity directories must be 4-digit pids; layout:\n{LAYOUT}")
        pid = int(pid_dir.name)
        for track_dir in sorted(p for p in pid_dir.iterdir() if p.is_dir()):
            frames = []
            cams = set()
            for image in track_dir.iterdir():
                if image.suffix.lower() != ".jpg":
                    continue
                match = _NAME.match(image.name)
                if match is None or int(match.group(1)) != pid:
                    raise ValueError(
                        f"{image}: expected a name like {pid_dir.name}_C<cam>_F<frame4>_X<id>.jpg of pid {pid}"
                    )
                cams.add(int(match.group(2)))
                frames.append((int(match.group(3)), str(image)))
            if not frames:
                log.warning("duke: %s holds no .jpg frames; skipped", track_dir)
                continue
            if len(cams) != 1 or min(cams) < 1:
                raise ValueError(f"{track_dir}: frames of one tracklet must share one camera >= 1, got {sorted(cams)}")
            frames.sort()
            items.append(
                TrackletItem(
                    paths=tuple(path for _, path in frames),
                    pid=pid,
                    camid=cams.pop() - 1,
                    tracklet_id=f"{subset}/{pid_dir.name}/{track_dir.name}",
                )
            )
    return items


def load_duke(root: str | Path) -> VideoReidDataset:
    """Load DukeMTMC-VideoReID from ``root``.

    Args:
        root: Directory holding ``train``, ``query`` and ``gallery`` (or their parent
            ``DukeMTMC-VideoReID``).

    Returns:
        The data set: train pids relabelled, query/gallery keep Duke pids, camids 0..7.

    Raises:
        FileNotFoundError: A subset directory is missing.
        ValueError: A directory or image name does not follow the layout.

    Example:
        >>> ds = load_duke("/data/DukeMTMC-VideoReID")  # doctest: +SKIP
        >>> len(ds.train), len(ds.query), len(ds.gallery)  # doctest: +SKIP
        (2196, 702, 2636)
    """
    root = _resolve_root(Path(root).expanduser())
    require_paths([root / "train", root / "query", root / "gallery"], LAYOUT)
    train, num_train_pids = relabel(_subset(root / "train", "train"))
    dataset = VideoReidDataset(
        name="duke",
        train=train,
        query=_subset(root / "query", "query"),
        gallery=_subset(root / "gallery", "gallery"),
        num_train_pids=num_train_pids,
        root=str(root),
    )
    log.info("loaded %s", dataset.summary())
    return dataset
