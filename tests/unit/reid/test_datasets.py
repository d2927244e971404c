"""Loaders of MARS, iLIDS-VID, PRID-2011, DukeMTMC-VideoReID and mined tracklets on fake data sets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.io import savemat

from stages.reid.training.datasets import DATASETS, TrackletItem, VideoReidDataset, load_dataset
from stages.reid.training.datasets.ilidsvid import load_ilidsvid
from stages.reid.training.datasets.mars import load_mars
from stages.reid.training.datasets.prid2011 import load_prid2011
from stages.reid.training.datasets.tracklets import load_tracklets, read_tracklet_meta, write_tracklet_folder
from stages.reid.training.evaluation import evaluate_ranking

try:  # works both as a package module and as a rootdir-inserted module
    from .fixtures import (
        DUKE_TRACKLETS, MARS_QUERY_IDX, MARS_TEST, MARS_TRAIN, PRID_ELIGIBLE, MinedTracklet, duke_name, mars_name,
        write_duke, write_ilidsvid, write_mars, write_mined, write_prid2011,
    )
except ImportError:
    from fixtures import (  # type: ignore[no-redef]
        DUKE_TRACKLETS, MARS_QUERY_IDX, MARS_TEST, MARS_TRAIN, PRID_ELIGIBLE, MinedTracklet, duke_name, mars_name,
        write_duke, write_ilidsvid, write_mars, write_mined, write_prid2011,
    )


def _all_paths_exist(items: list[TrackletItem]) -> bool:
    return all(Path(p).is_file() for item in items for p in item.paths)


# ------------------------------------------------------------------------------------------ records


def test_tracklet_item_validates_fields():
    with pytest.raises(ValueError, match="paths"):
        TrackletItem(paths=(), pid=1, camid=0, tracklet_id="a")
    with pytest.raises(ValueError, match="paths"):
        TrackletItem(paths=["a.jpg"], pid=1, camid=0, tracklet_id="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="camid"):
        TrackletItem(paths=("a.jpg",), pid=1, camid=-1, tracklet_id="a")
    with pytest.raises(ValueError, match="pid"):
        TrackletItem(paths=("a.jpg",), pid=1.0, camid=0, tracklet_id="a")  # type: ignore[arg-type]


def test_dataset_requires_relabelled_train_pids():
    item = TrackletItem(paths=("a.jpg",), pid=5, camid=0, tracklet_id="a")
    with pytest.raises(ValueError, match="relabelled"):
        VideoReidDataset(name="x", train=[item], query=[], gallery=[], num_train_pids=1)


# -------------------------------------------------------------------------------------------- MARS


def test_mars_follows_published_protocol(tmp_path):
    root = write_mars(tmp_path / "mars")
    ds = load_mars(root)

    assert ds.name == "mars" and ds.split is None
    # Train pids 1, 3, 7 relabelled to 0, 1, 2 in increasing order; cameras made 0-based.
    assert ds.num_train_pids == 3
    assert [(t.pid, t.camid) for t in ds.train] == [(0, 0), (0, 1), (1, 0), (2, 3)]
    assert [len(t) for t in ds.train] == [tr.num_frames for tr in MARS_TRAIN]
    # Frames in the order of train_name.txt, under bbox_train/<pid4>/.
    first = MARS_TRAIN[0]
    assert ds.train[0].paths == tuple(
        str(root / "bbox_train" / "0001" / mars_name(first, f)) for f in range(1, first.num_frames + 1)
    )
    # Query = test rows 1 and 4 (1-based query_IDX); gallery = the other rows, MARS pids kept,
    # distractors (pid 0) and junk (pid -1) stay in the gallery.
    expected_query = [(MARS_TEST[i - 1].pid, MARS_TEST[i - 1].cam - 1) for i in MARS_QUERY_IDX]
    assert [(q.pid, q.camid) for q in ds.query] == expected_query == [(2, 0), (5, 1)]
    assert [g.pid for g in ds.gallery] == [2, 2, 5, 0, -1]
    junk = ds.gallery[-1]
    assert Path(junk.paths[0]).parent.name == "00-1"
    everything = ds.train + ds.query + ds.gallery
    assert len({t.tracklet_id for t in everything}) == len(everything)
    assert _all_paths_exist(ds.train + ds.query + ds.gallery)


def test_mars_junk_is_ignored_by_evaluation(tmp_path):
    """Junk (pid -1) kept in the gallery never counts as a mismatch, even when nearest."""
    ds = load_mars(write_mars(tmp_path / "mars"))
    g_pids = np.array([g.pid for g in ds.gallery])
    g_cams = np.array([g.camid for g in ds.gallery])
    q_pids = np.array([q.pid for q in ds.query])
    q_cams = np.array([q.camid for q in ds.query])
    # Each query: junk nearest, then its own-pid items, then the rest.
    dist = np.where(g_pids[None, :] == -1, 0.0, np.where(g_pids[None, :] == q_pids[:, None], 1.0, 2.0))
    result = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    assert result.rank1 == 1.0 and result.mAP == 1.0 and result.num_queries == 2


@pytest.mark.parametrize(
    "missing", ["info/query_IDX.mat", "info/tracks_test_info.mat", "info/train_name.txt", "bbox_train"]
)
def test_mars_missing_file_names_it(tmp_path, missing):
    root = write_mars(tmp_path / "mars")
    target = root / missing
    if target.is_dir():
        for p in sorted(target.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(FileNotFoundError, match=Path(missing).name):
        load_mars(root)


def test_mars_wrong_mat_variable(tmp_path):
    root = write_mars(tmp_path / "mars")
    savemat(str(root / "info" / "tracks_test_info.mat"), {"tracks_test_info": np.zeros((1, 4))})
    with pytest.raises(ValueError, match="track_test_info"):
        load_mars(root)


def test_mars_query_idx_out_of_range(tmp_path):
    root = write_mars(tmp_path / "mars")
    savemat(str(root / "info" / "query_IDX.mat"), {"query_IDX": np.array([[1, len(MARS_TEST) + 1]], dtype=float)})
    with pytest.raises(ValueError, match="query_IDX"):
        load_mars(root)


def test_mars_track_covering_another_person(tmp_path):
    root = write_mars(tmp_path / "mars")
    names = (root / "info" / "test_name.txt").read_text().split()
    names[0], names[-1] = names[-1], names[0]  # first track now starts with a junk image
    (root / "info" / "test_name.txt").write_text("\n".join(names))
    with pytest.raises(ValueError, match="another"):
        load_mars(root)


# --------------------------------------------------------------------------------------- iLIDS-VID


@pytest.mark.parametrize("split", [0, 3, 9])
def test_ilidsvid_split_protocol(tmp_path, split):
    info = write_ilidsvid(tmp_path / "ilids")
    ds = load_ilidsvid(info.root, split=split)
    half = len(info.persons) // 2
    test_persons = sorted(info.persons[j - 1] for j in info.ls_set[split][:half])
    train_persons = sorted(info.persons[j - 1] for j in info.ls_set[split][half:])

    assert ds.split == split and ds.num_splits == 10
    # Query: cam1 of the test persons; gallery: cam2; pids are person numbers.
    assert [q.pid for q in ds.query] == [int(p[6:]) for p in test_persons]
    assert [g.pid for g in ds.gallery] == [int(p[6:]) for p in test_persons]
    assert {q.camid for q in ds.query} == {0} and {g.camid for g in ds.gallery} == {1}
    # Train: both cameras of the other persons, relabelled.
    assert ds.num_train_pids == len(train_persons)
    assert len(ds.train) == 2 * len(train_persons)
    assert sorted(t.tracklet_id for t in ds.train) == sorted(f"cam{c}/{p}" for p in train_persons for c in (1, 2))
    # Frames in temporal order.
    q0 = ds.query[0]
    expected_numbers = info.frames[(1, test_persons[0])]
    assert [int(Path(p).stem.rsplit("_", 1)[1]) for p in q0.paths] == expected_numbers
    assert _all_paths_exist(ds.train + ds.query + ds.gallery)


def test_ilidsvid_split_out_of_range(tmp_path):
    info = write_ilidsvid(tmp_path / "ilids", num_splits=10)
    with pytest.raises(ValueError, match="split"):
        load_ilidsvid(info.root, split=10)


def test_ilidsvid_bad_split_matrix(tmp_path):
    info = write_ilidsvid(tmp_path / "ilids")
    split_file = info.root / "train-test people splits" / "train_test_splits_ilidsvid.mat"
    savemat(str(split_file), {"ls_set": np.ones((10, 6))})
    with pytest.raises(ValueError, match="permutation"):
        load_ilidsvid(info.root)


def test_ilidsvid_missing_splits_file(tmp_path):
    info = write_ilidsvid(tmp_path / "ilids")
    (info.root / "train-test people splits" / "train_test_splits_ilidsvid.mat").unlink()
    with pytest.raises(FileNotFoundError, match="train_test_splits_ilidsvid.mat"):
        load_ilidsvid(info.root)


# --------------------------------------------------------------------------------------- PRID-2011


def test_prid_uses_published_splits_file(tmp_path):
    splits = [
        {"train": ["person_0001", "person_0002"], "test": ["person_0004", "person_0005", "person_0006"]},
        {"train": ["person_0005", "person_0006"], "test": ["person_0001", "person_0002", "person_0004"]},
    ]
    root = write_prid2011(tmp_path / "prid", splits=splits)
    ds = load_prid2011(root, split=1)
    assert ds.num_splits == 2 and ds.num_train_pids == 2
    assert [(q.pid, q.camid) for q in ds.query] == [(1, 0), (2, 0), (4, 0)]
    assert [(g.pid, g.camid) for g in ds.gallery] == [(1, 1), (2, 1), (4, 1)]
    assert sorted(t.tracklet_id for t in ds.train) == sorted(
        f"{c}/{p}" for p in ("person_0005", "person_0006") for c in ("cam_a", "cam_b")
    )
    # Frames 0001.png ... in order.
    assert [Path(p).name for p in ds.query[0].paths][:3] == ["0001.png", "0002.png", "0003.png"]
    with pytest.raises(ValueError, match="split"):
        load_prid2011(root, split=2)


def test_prid_generates_seeded_splits_and_says_so(tmp_path, caplog):
    root = write_prid2011(tmp_path / "prid")
    with caplog.at_level(logging.WARNING, logger="stages.reid.training.datasets.prid2011"):
        ds = load_prid2011(root, split=0, seed=0)
    assert any("generated 10 random" in r.getMessage() for r in caplog.records)
    assert ds.num_splits == 10
    # Only persons in both cameras with >= 21 frames each; half (floor) train, the rest test.
    train_dirs = {t.tracklet_id.split("/")[1] for t in ds.train}
    test_dirs = {q.tracklet_id.split("/")[1] for q in ds.query}
    assert train_dirs | test_dirs == set(PRID_ELIGIBLE) and not train_dirs & test_dirs
    assert len(train_dirs) == len(PRID_ELIGIBLE) // 2
    # Deterministic for a seed; another seed gives other splits.
    same = [load_prid2011(root, split=s, seed=0) for s in range(10)]
    other = [load_prid2011(root, split=s, seed=1) for s in range(10)]
    key = lambda d: sorted(q.pid for q in d.query)  # noqa: E731
    assert key(same[0]) == key(ds)
    assert [key(d) for d in same] != [key(d) for d in other]


def test_prid_missing_camera(tmp_path):
    root = write_prid2011(tmp_path / "prid")
    for p in sorted((root / "prid_2011" / "multi_shot" / "cam_b").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "prid_2011" / "multi_shot" / "cam_b").rmdir()
    with pytest.raises(FileNotFoundError, match="cam_b"):
        load_prid2011(root)


# --------------------------------------------------------------------------------------------- Duke


@pytest.mark.parametrize("wrapped", [False, True])
def test_duke_layout(tmp_path, wrapped):
    base = tmp_path / "duke"
    root = write_duke(base / "DukeMTMC-VideoReID" if wrapped else base)
    ds = load_dataset(f"duke:{base}")
    assert ds.num_train_pids == 2 and len(ds.train) == 3
    assert [(t.pid, t.camid) for t in ds.train] == [(0, 0), (0, 1), (1, 2)]
    # F0002, F0003, F0010: ordered by frame number although written shuffled.
    second = DUKE_TRACKLETS[1]
    assert ds.train[1].paths == tuple(str(root / "train" / "0001" / "0002" / duke_name(second, f)) for f in (2, 3, 10))
    assert [(q.pid, q.camid) for q in ds.query] == [(2, 0)]
    assert [(g.pid, g.camid) for g in ds.gallery] == [(2, 3), (2, 0), (9, 1)]


def test_duke_bad_image_name(tmp_path):
    root = write_duke(tmp_path / "duke")
    bad = root / "gallery" / "0009" / "0001" / "0010_C2_F0005_X1.jpg"  # pid 10 inside pid 9's folder
    bad.write_bytes(next((root / "gallery" / "0009" / "0001").glob("*.jpg")).read_bytes())
    with pytest.raises(ValueError, match="0009"):
        load_dataset(f"duke:{root}")


# ---------------------------------------------------------------------------------- mined tracklets


def test_write_tracklet_folder_round_trip(tmp_path):
    blue_bgr = np.zeros((16, 8, 3), dtype=np.uint8)
    blue_bgr[..., 0] = 255  # BGR: pure blue
    folder = write_tracklet_folder(
        tmp_path, "cam0-7", "cam0", 7, [3, 5], [0.12, 0.2], [[1, 2, 9, 18], [2, 2, 10, 18]], [blue_bgr, blue_bgr],
        pid=4,
    )
    meta = json.loads((folder / "meta.json").read_text())
    assert meta == {
        "tracklet_id": "cam0-7", "camera": "cam0", "track_id": 7, "frames": [3, 5], "timestamps_s": [0.12, 0.2],
        "boxes": [[1.0, 2.0, 9.0, 18.0], [2.0, 2.0, 10.0, 18.0]], "pid": 4,
    }
    assert sorted(p.name for p in folder.glob("*.jpg")) == ["000.jpg", "001.jpg"]
    decoded = cv2.imread(str(folder / "000.jpg"))  # BGR again
    assert decoded.shape == (16, 8, 3)
    assert decoded[..., 0].mean() > 240 and decoded[..., 2].mean() < 15
    assert read_tracklet_meta(folder)["pid"] == 4


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"frames": [1]}, "frames"),
        ({"crops_bgr": [np.zeros((4, 4, 3), np.float32)] * 2}, "uint8"),
        ({"crops_bgr": [np.zeros((4, 4), np.uint8)] * 2}, "uint8"),
        ({"boxes": [[1, 2, 3]] * 2}, "boxes"),
        ({"tracklet_id": "../x"}, "tracklet_id"),
    ],
)
def test_write_tracklet_folder_validates(tmp_path, kwargs, error):
    args = dict(
        root=tmp_path, tracklet_id="t", camera="c", track_id=1, frames=[0, 1], timestamps_s=[0.0, 0.1],
        boxes=[[0, 0, 4, 4]] * 2, crops_bgr=[np.zeros((4, 4, 3), np.uint8)] * 2,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=error):
        write_tracklet_folder(**args)


def test_write_tracklet_folder_refuses_to_overwrite(tmp_path):
    args = ("t", "c", 1, [0], [0.0], [[0, 0, 4, 4]], [np.zeros((4, 4, 3), np.uint8)])
    write_tracklet_folder(tmp_path, *args)
    with pytest.raises(FileExistsError):
        write_tracklet_folder(tmp_path, *args)
    write_tracklet_folder(tmp_path, *args, overwrite=True)


def _unlabelled(n: int = 10) -> tuple[MinedTracklet, ...]:
    return tuple(MinedTracklet(f"cam{i % 2}-{i:03d}", f"cam{i % 2}", 2 + i % 4) for i in range(n)) + (
        MinedTracklet("cam0-single", "cam0", 1),
    )


def test_tracklets_halves_protocol(tmp_path):
    tracklets = _unlabelled()
    root = write_mined(tmp_path / "mined", tracklets)
    ds = load_tracklets(root, holdout_fraction=0.3, seed=3)

    # 10 identities can be held out (the single-frame tracklet cannot): round(0.3 * 10) = 3.
    assert len(ds.query) == len(ds.gallery) == 3
    assert len(ds.train) == len(tracklets) - 3 and ds.num_train_pids == len(tracklets) - 3
    assert "cam0-single" in {t.tracklet_id for t in ds.train}
    for q, g in zip(ds.query, ds.gallery):
        assert (q.pid, q.camid, g.pid, g.camid) == (q.pid, 0, q.pid, 1)
        original = root / q.tracklet_id.rsplit("/", 1)[0]
        n = len(read_tracklet_meta(original)["frames"])
        # First ceil(n/2) frames are the query, the rest the gallery item, in order.
        assert q.paths + g.paths == tuple(str(original / f"{i:03d}.jpg") for i in range(n))
        assert len(q) == (n + 1) // 2
    held = {q.tracklet_id.rsplit("/", 1)[0] for q in ds.query}
    assert not held & {t.tracklet_id for t in ds.train}
    # Deterministic for a seed, and another seed holds out other tracklets.
    again = load_tracklets(root, holdout_fraction=0.3, seed=3)
    assert [q.paths for q in again.query] == [q.paths for q in ds.query]
    other = load_tracklets(root, holdout_fraction=0.3, seed=4)
    assert {q.tracklet_id for q in other.query} != {q.tracklet_id for q in ds.query}
    # Every query has exactly its own second half as a valid match.
    q_pids = np.array([q.pid for q in ds.query])
    g_pids = np.array([g.pid for g in ds.gallery])
    assert (q_pids[:, None] == g_pids[None, :]).sum(axis=1).tolist() == [1, 1, 1]


def test_tracklets_cameras_protocol(tmp_path):
    tracklets = (
        MinedTracklet("a0", "camA", 3, pid=10), MinedTracklet("a1", "camA", 3, pid=10),
        MinedTracklet("b0", "camB", 3, pid=10), MinedTracklet("a2", "camA", 2, pid=11),
        MinedTracklet("b1", "camB", 2, pid=11), MinedTracklet("a3", "camA", 2, pid=12),
        MinedTracklet("b2", "camB", 2, pid=13), MinedTracklet("a4", "camA", 2, pid=13),
    )
    root = write_mined(tmp_path / "mined", tracklets)
    ds = load_tracklets(root, holdout_fraction=1.0, seed=0)  # auto -> cameras (all labelled)
    assert ds.train == [] and ds.num_train_pids == 0
    # One query per (pid, camera) for pids seen by two cameras; pid 12 (one camera) is gallery only.
    assert sorted((q.pid, q.camid) for q in ds.query) == [(10, 0), (10, 1), (11, 0), (11, 1), (13, 0), (13, 1)]
    assert len(ds.query) + len(ds.gallery) == len(tracklets)
    assert [g.pid for g in ds.gallery] == [10, 12]

    part = load_tracklets(root, holdout_fraction=0.5, seed=0)
    held = {q.pid for q in part.query} | {g.pid for g in part.gallery}
    assert len(held) == 2 and part.num_train_pids == 2
    assert len(part.train) == sum(1 for t in tracklets if t.pid not in held)


def test_tracklets_cameras_protocol_needs_labels(tmp_path):
    root = write_mined(tmp_path / "mined", _unlabelled(3))
    with pytest.raises(ValueError, match="pid"):
        load_tracklets(root, protocol="cameras")


@pytest.mark.parametrize("damage", ["missing_key", "wrong_id", "missing_crop"])
def test_tracklets_bad_folder(tmp_path, damage):
    root = write_mined(tmp_path / "mined", _unlabelled(2))
    folder = root / "cam0-000"
    meta = json.loads((folder / "meta.json").read_text())
    if damage == "missing_key":
        del meta["boxes"]
        (folder / "meta.json").write_text(json.dumps(meta))
        expected: type[Exception] = ValueError
    elif damage == "wrong_id":
        meta["tracklet_id"] = "other"
        (folder / "meta.json").write_text(json.dumps(meta))
        expected = ValueError
    else:
        (folder / "001.jpg").unlink()
        expected = FileNotFoundError
    with pytest.raises(expected, match="cam0-000"):
        load_tracklets(root)


# ------------------------------------------------------------------------------------------ registry


def test_registry_dispatches_every_loader(tmp_path):
    write_mars(tmp_path / "mars")
    write_ilidsvid(tmp_path / "ilids")
    write_prid2011(tmp_path / "prid")
    write_duke(tmp_path / "duke")
    write_mined(tmp_path / "mined", _unlabelled(4))
    specs = {
        "mars": f"mars:{tmp_path / 'mars'}",
        "ilidsvid": f"ilidsvid:{tmp_path / 'ilids'}",
        "prid2011": f"prid2011:{tmp_path / 'prid'}",
        "duke": f"duke:{tmp_path / 'duke'}",
        "tracklets": f"tracklets:{tmp_path / 'mined'}",
    }
    assert set(specs) == set(DATASETS)
    for name, spec in specs.items():
        assert load_dataset(spec).name == name
    assert load_dataset(specs["ilidsvid"], split=4).split == 4


def test_registry_path_may_contain_colons(tmp_path):
    write_duke(tmp_path / "a:b")
    assert len(load_dataset(f"duke:{tmp_path / 'a:b'}").query) == 1


@pytest.mark.parametrize(
    ("spec", "split", "message"),
    [
        ("market:/x", None, "valid names"),
        ("mars", None, "name:/path"),
        ("mars:", None, "name:/path"),
        ("mars:/x", 1, "no splits"),
    ],
)
def test_registry_errors(spec, split, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(spec, split=split)


def test_registry_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="bbox_train"):
        load_dataset(f"mars:{tmp_path / 'nothing'}")
