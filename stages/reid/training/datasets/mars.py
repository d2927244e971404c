"""MARS (Zheng et al., "MARS: A Video Benchmark for Large-Scale Person Re-identification", ECCV 2016).

1,261 identities, 6 cameras; 8,298 training tracklets, 1,980 query and 9,330 gallery tracklets
(12,180 test tracklets in all, junk included).

Layout under ``root`` (as distributed, and as torchreid's loader expects)::

    bbox_train/<pid4>/<pid4>C<c>T<tttt>F<fff>.jpg     e.g. bbox_train/0001/0001C1T0001F001.jpg
    bbox_test/<pid4>/...                              pid directories "0000" (distractors), "00-1" (junk)
    info/train_name.txt          one image name per line, in tracklet order
    info/test_name.txt
    info/tracks_train_info.mat   variable ``track_train_info``: N x 4 (start, end, pid, camid);
    info/tracks_test_info.mat    variable ``track_test_info``;  start/end are 1-based, inclusive
                                 indices into the name list; camid is 1..6
    info/query_IDX.mat           variable ``query_IDX``: 1-based indices of the query rows of
                                 ``track_test_info``; the other test rows are the gallery

Junk and distractors (the MARS protocol):

* ``pid == -1`` (junk) test tracklets are **kept in the gallery with pid -1**; the evaluation
  (:func:`stages.reid.training.evaluation.evaluate_ranking`) drops pid -1 gallery items for every query, as
  the official MATLAB evaluation puts them in every query's junk list. They are neither matches nor
  mismatches. A junk row listed in ``query_IDX`` (none in the published files) is dropped from the
  query set with a warning. Junk rows in the training matrix are dropped.
* ``pid == 0`` (distractors) stay in the gallery as ordinary non-matching items.

Camera ids are made 0-based (``camid - 1``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stages.reid.training.datasets.base import JUNK_PID, TrackletItem, VideoReidDataset, relabel, require_paths

log = logging.getLogger(__name__)

LAYOUT = """\
  ROOT/bbox_train/<pid4>/<pid4>C<cam>T<track4>F<frame3>.jpg
  ROOT/bbox_test/<pid4>/...
  ROOT/info/train_name.txt, ROOT/info/test_name.txt
  ROOT/info/tracks_train_info.mat (variable track_train_info, N x 4: start, end, pid, camid)
  ROOT/info/tracks_test_info.mat (variable track_test_info)
  ROOT/info/query_IDX.mat (variable query_IDX, 1-based rows of track_test_info)"""

NUM_CAMERAS = 6


def _read_names(path: Path) -> list[str]:
    with path.open("r", encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _load_mat(path: Path, variable: str) -> np.ndarray:
    from scipy.io import loadmat

    data = loadmat(str(path))
    if variable not in data:
        found = sorted(k for k in data if not k.startswith("__"))
        raise ValueError(f"{path}: expected MATLAB variable {variable!r}, found {found}; layout:\n{LAYOUT}")
    return np.asarray(data[variable])


def _name_pid(name: str) -> int | None:
    """Pid encoded in the first 4 characters of a MARS image name ("0001", "0000", junk "00-1")."""
    prefix = name[:4]
    if prefix == "00-1":
        return JUNK_PID
    return int(prefix) if prefix.isdigit() else None


def _tracks(
    names: list[str],
    info: np.ndarray,
    rows: np.ndarray,
    image_dir: Path,
    subset: str,
    info_path: Path,
) -> list[TrackletItem]:
    """Build tracklet items for ``rows`` of a track info matrix."""
    items: list[TrackletItem] = []
    for row in rows:
        start, end, pid, cam = (int(v) for v in info[row, :4])
        if not 1 <= start <= end <= len(names):
            raise ValueError(
                f"{info_path}: row {row + 1} has start={start}, end={end} outside 1..{len(names)} "
                "(1-based, inclusive indices into the name list)"
            )
        if not 1 <= cam <= NUM_CAMERAS:
            raise ValueError(f"{info_path}: row {row + 1} has camid={cam}, expected 1..{NUM_CAMERAS}")
        frame_names = names[start - 1 : end]
        for name in frame_names:
            if len(name) < 6 or _name_pid(name) != pid or name[5] != str(cam):
                raise ValueError(
                    f"{info_path}: row {row + 1} (pid {pid}, camera {cam}) covers image {name!r} of another "
                    "person or camera; names must look like 0001C1T0001F001.jpg"
                )
        paths = tuple(str(image_dir / name[:4] / name) for name in frame_names)
        items.append(
            TrackletItem(
                paths=paths, pid=pid, camid=cam - 1, tracklet_id=f"{subset}/{row + 1:05d}/{frame_names[0][:11]}"
            )
        )
    return items


def load_mars(root: str | Path) -> VideoReidDataset:
    """Load MARS from ``root`` (the directory holding ``bbox_train``, ``bbox_test``, ``info``).

    Args:
        root: Data set directory.

    Returns:
        The data set: train pids relabelled; query and gallery keep MARS pids (0 distractors,
        -1 junk in the gallery, see the module docstring); camids 0..5.

    Raises:
        FileNotFoundError: A directory or info file is missing (the message shows the layout).
        ValueError: A .mat file lacks its variable, a matrix is not N x 4, indices are out of range,
            or a track covers images of another person or camera.

    Example:
        >>> ds = load_mars("/data/mars")  # doctest: +SKIP
        >>> len(ds.query), len(ds.gallery)  # doctest: +SKIP
        (1980, 9330)
    """
    root = Path(root).expanduser()
    info_dir = root / "info"
    train_names_path = info_dir / "train_name.txt"
    test_names_path = info_dir / "test_name.txt"
    train_info_path = info_dir / "tracks_train_info.mat"
    test_info_path = info_dir / "tracks_test_info.mat"
    query_idx_path = info_dir / "query_IDX.mat"
    require_paths(
        [root, root / "bbox_train", root / "bbox_test", train_names_path, test_names_path, train_info_path,
         test_info_path, query_idx_path],
        LAYOUT,
    )

    train_names = _read_names(train_names_path)
    test_names = _read_names(test_names_path)
    train_info = _load_mat(train_info_path, "track_train_info")
    test_info = _load_mat(test_info_path, "track_test_info")
    for path, info in ((train_info_path, train_info), (test_info_path, test_info)):
        if info.ndim != 2 or info.shape[1] < 4:
            raise ValueError(f"{path}: expected an N x 4 matrix (start, end, pid, camid), got shape {info.shape}")
    query_idx = _load_mat(query_idx_path, "query_IDX").astype(np.int64).ravel() - 1
    if query_idx.size and (query_idx.min() < 0 or query_idx.max() >= len(test_info)):
        raise ValueError(
            f"{query_idx_path}: query_IDX must hold 1-based indices in 1..{len(test_info)}, "
            f"got range [{query_idx.min() + 1}, {query_idx.max() + 1}]"
        )
    if len(np.unique(query_idx)) != len(query_idx):
        raise ValueError(f"{query_idx_path}: query_IDX holds duplicate indices")

    train_rows = np.flatnonzero(train_info[:, 2] != JUNK_PID)
    if len(train_rows) < len(train_info):
        log.warning("mars: dropped %d junk (pid -1) training tracks", len(train_info) - len(train_rows))
    query_rows = query_idx[test_info[query_idx, 2] != JUNK_PID]
    if len(query_rows) < len(query_idx):
        log.warning("mars: dropped %d junk (pid -1) query tracks", len(query_idx) - len(query_rows))
    gallery_mask = np.ones(len(test_info), dtype=bool)
    gallery_mask[query_idx] = False
    gallery_rows = np.flatnonzero(gallery_mask)

    train = _tracks(train_names, train_info, train_rows, root / "bbox_train", "train", train_info_path)
    query = _tracks(test_names, test_info, query_rows, root / "bbox_test", "test", test_info_path)
    gallery = _tracks(test_names, test_info, gallery_rows, root / "bbox_test", "test", test_info_path)
    train, num_train_pids = relabel(train)
    dataset = VideoReidDataset(
        name="mars", train=train, query=query, gallery=gallery, num_train_pids=num_train_pids, root=str(root)
    )
    log.info("loaded %s", dataset.summary())
    return dataset
