"""Temporal sampling, clip augmentation, TrackletDataset and PKSampler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stages.reid.training.datasets import TrackletItem
from stages.reid.training.sampling import (
    AugmentParams,
    ClipAugment,
    PKSampler,
    TrackletDataset,
    chunk_indices,
    sample_indices,
)

# ------------------------------------------------------------------------------------ index sampling


@pytest.mark.parametrize(
    ("n", "t", "expected"),
    [
        (10, 4, [0, 3, 6, 9]),  # linspace(0, 9, 4) = 0, 3, 6, 9
        (3, 5, [0, 0, 1, 2, 2]),  # linspace(0, 2, 5) = 0, .5, 1, 1.5, 2 -> rint (half to even)
        (1, 3, [0, 0, 0]),
        (7, 1, [0]),
        (8, 8, list(range(8))),
    ],
)
def test_evenly(n, t, expected):
    assert sample_indices(n, t, "evenly").tolist() == expected


@pytest.mark.parametrize(("n", "t"), [(30, 8), (8, 8), (5, 8), (1, 4)])
def test_random_is_an_ordered_subset_with_repeat_padding(n, t):
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = sample_indices(n, t, "random", rng)
        assert idx.shape == (t,) and idx.dtype == np.int64
        assert np.all(np.diff(idx) >= 0) and idx.min() >= 0 and idx.max() < n
        if n >= t:
            assert len(set(idx.tolist())) == t  # distinct frames
        else:
            assert set(idx.tolist()) == set(range(n))  # every frame, padded by repeats


def test_random_is_seeded_and_varies():
    draws = [tuple(sample_indices(50, 6, "random", np.random.default_rng(s))) for s in range(5)]
    assert draws[0] == tuple(sample_indices(50, 6, "random", np.random.default_rng(0)))
    assert len(set(draws)) > 1


def test_restricted_draws_one_frame_per_segment():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(50):
        idx = sample_indices(20, 4, "restricted", rng)
        # Segments [0,5), [5,10), [10,15), [15,20).
        assert all(5 * i <= v < 5 * (i + 1) for i, v in enumerate(idx.tolist()))
        seen.add(tuple(idx.tolist()))
    assert len(seen) > 1
    assert sample_indices(20, 4, "restricted").tolist() == [0, 5, 10, 15]  # deterministic: segment starts
    assert sample_indices(2, 4, "restricted").tolist() == [0, 0, 1, 1]


def test_all_and_chunks():
    assert sample_indices(5, 3, "all").tolist() == [0, 1, 2, 3, 4]
    assert chunk_indices(5, 2).tolist() == [[0, 1], [2, 3], [4, 4]]
    assert chunk_indices(4, 2).tolist() == [[0, 1], [2, 3]]
    assert chunk_indices(2, 4).tolist() == [[0, 1, 1, 1]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 4, "evenly", None), "num_frames"),
        ((5, 0, "evenly", None), "seq_len"),
        ((5, 4, "chunk", None), "unknown sampling mode"),
        ((5, 4, "random", None), "Generator"),
    ],
)
def test_sample_indices_errors(args, message):
    with pytest.raises(ValueError, match=message):
        sample_indices(*args)


# -------------------------------------------------------------------------------------- augmentation


def test_augment_is_consistent_across_frames():
    aug = ClipAugment(flip_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, erase_p=1.0)
    clip = torch.rand(5, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    params = aug.sample(np.random.default_rng(0), 32, 16)
    assert params.flip and params.erase is not None
    fill = (0.485, 0.456, 0.406)
    out = ClipAugment.apply(clip, params, fill)
    # Same transform for every frame: applying it to each frame alone gives the same result.
    for t in range(len(clip)):
        assert torch.allclose(out[t], ClipAugment.apply(clip[t : t + 1], params, fill)[0], atol=1e-6)
    top, left, h, w = params.erase
    erased = out[:, :, top : top + h, left : left + w]
    assert torch.allclose(erased, torch.tensor(fill).view(1, 3, 1, 1).expand_as(erased))
    assert not torch.allclose(out, clip)
    assert clip.shape == out.shape and out.min() >= 0 and out.max() <= 1


def test_flip_only_mirrors_every_frame():
    params = AugmentParams(flip=True, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, erase=None)
    clip = torch.rand(3, 3, 8, 4)
    out = ClipAugment.apply(clip, params, (0.0, 0.0, 0.0))
    assert torch.equal(out, clip.flip(-1))
    assert not torch.equal(out, clip)


def test_augment_none_is_identity_and_input_untouched():
    clip = torch.rand(4, 3, 16, 8)
    before = clip.clone()
    out = ClipAugment.none()(clip, np.random.default_rng(0), (0.5, 0.5, 0.5))
    assert torch.equal(out, clip) and torch.equal(clip, before)
    aug = ClipAugment(erase_p=1.0, flip_p=1.0)
    aug(clip, np.random.default_rng(0), (0.5, 0.5, 0.5))
    assert torch.equal(clip, before)  # never modified in place


@pytest.mark.parametrize(
    "kwargs",
    [{"flip_p": 1.5}, {"brightness": -0.1}, {"hue": 0.6}, {"erase_area": (0.5, 0.2)}, {"erase_aspect": (0.0, 1.0)}],
)
def test_augment_validates(kwargs):
    with pytest.raises(ValueError):
        ClipAugment(**kwargs)


# ---------------------------------------------------------------------------------- TrackletDataset


def _colour_tracklet(folder: Path, n: int, pid: int = 3, camid: int = 1) -> TrackletItem:
    """Frames of solid colour: BGR = (10 * i mod 250, 100, 200) for frame i, written as PNG (lossless)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = np.empty((8, 4, 3), np.uint8)
        image[:] = ((10 * i) % 250, 100, 200)
        path = folder / f"{i:03d}.png"
        cv2.imwrite(str(path), image)
        paths.append(str(path))
    return TrackletItem(paths=tuple(paths), pid=pid, camid=camid, tracklet_id=folder.name)


def test_dataset_reads_rgb_in_temporal_order(tmp_path):
    item = _colour_tracklet(tmp_path / "t", 10)
    ds = TrackletDataset([item], seq_len=4, sampling="evenly", input_size=(16, 8), mean=(0, 0, 0), std=(1, 1, 1))
    clip, pid, camid = ds[0]
    assert clip.shape == (4, 3, 16, 8) and clip.dtype == torch.float32
    assert (pid, camid) == (3, 1)
    # RGB order: R = 200, G = 100, B = 10 * frame; evenly spaced frames 0, 3, 6, 9.
    assert torch.allclose(clip[:, 0], torch.full((4, 16, 8), 200 / 255))
    assert torch.allclose(clip[:, 1], torch.full((4, 16, 8), 100 / 255))
    assert torch.allclose(clip[:, 2].mean(dim=(1, 2)), torch.tensor([0, 30, 60, 90]) / 255)


def test_dataset_normalises_with_mean_and_std(tmp_path):
    item = _colour_tracklet(tmp_path / "t", 2)
    mean, std = (0.5, 0.25, 0.1), (0.2, 0.5, 0.25)
    clip, _, _ = TrackletDataset([item], 2, "evenly", (8, 4), mean, std)[0]
    expected_r = (200 / 255 - 0.5) / 0.2
    expected_g = (100 / 255 - 0.25) / 0.5
    expected_b = torch.tensor([0.0, 10 / 255]).sub(0.1).div(0.25)
    assert torch.allclose(clip[:, 0], torch.full_like(clip[:, 0], expected_r), atol=1e-6)
    assert torch.allclose(clip[:, 1], torch.full_like(clip[:, 1], expected_g), atol=1e-6)
    assert torch.allclose(clip[:, 2].mean(dim=(1, 2)), expected_b, atol=1e-6)


def test_dataset_all_frames_and_chunks(tmp_path):
    item = _colour_tracklet(tmp_path / "t", 5)
    full, _, _ = TrackletDataset([item], 2, "all", (8, 4))[0]
    assert full.shape == (5, 3, 8, 4)
    chunks, _, _ = TrackletDataset([item], 2, "all", (8, 4), chunked=True)[0]
    assert chunks.shape == (3, 2, 3, 8, 4)
    assert torch.equal(chunks[2, 0], full[4]) and torch.equal(chunks[2, 1], full[4])  # last chunk padded
    assert torch.equal(chunks[1, 1], full[3])


def test_training_clips_are_reproducible_with_torch_seed(tmp_path):
    item = _colour_tracklet(tmp_path / "t", 30)
    ds = TrackletDataset([item], 6, "random", (8, 4), train=True)
    torch.manual_seed(0)
    a = ds[0][0]
    torch.manual_seed(0)
    b = ds[0][0]
    torch.manual_seed(1)
    c = ds[0][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_test_clips_are_deterministic(tmp_path):
    item = _colour_tracklet(tmp_path / "t", 30)
    ds = TrackletDataset([item], 6, "random", (8, 4), seed=5)
    assert torch.equal(ds[0][0], ds[0][0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampling": "all", "train": True}, "testing"),
        ({"augment": ClipAugment()}, "augment"),
        ({"chunked": True}, "chunked"),
        ({"seq_len": 0}, "seq_len"),
        ({"sampling": "dense"}, "unknown sampling"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
        ({"input_size": (16,)}, "input_size"),
    ],
)
def test_dataset_validates(kwargs, message):
    args = {"items": [], "seq_len": 4, "sampling": "evenly"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        TrackletDataset(**args)


def test_dataset_missing_image(tmp_path):
    item = TrackletItem(paths=(str(tmp_path / "nope.jpg"),), pid=0, camid=0, tracklet_id="x")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        TrackletDataset([item], 2, "evenly", (8, 4))[0]


# --------------------------------------------------------------------------------------- PKSampler


def _items(counts: dict[int, int]) -> list[TrackletItem]:
    return [
        TrackletItem(paths=(f"{pid}_{j}.jpg",), pid=pid, camid=j % 2, tracklet_id=f"{pid}-{j}")
        for pid, n in counts.items()
        for j in range(n)
    ]


def test_pk_sampler_batches():
    items = _items({0: 5, 1: 1, 2: 4, 3: 8, 4: 2, 5: 3})
    sampler = PKSampler(items, p=3, k=2, seed=0)
    expected_len = len(sampler)
    indices = list(sampler)
    assert len(indices) == expected_len > 0 and len(indices) % 6 == 0
    for b in range(0, len(indices), 6):
        batch = indices[b : b + 6]
        pids = [items[i].pid for i in batch]
        counts = Counter(pids)
        assert len(counts) == 3 and set(counts.values()) == {2}
        # Consecutive pairs belong to the same identity.
        assert all(pids[j] == pids[j + 1] for j in range(0, 6, 2))
    # pid 1 has a single tracklet: drawn with replacement (same index twice) when chosen.
    ones = [i for i in indices if items[i].pid == 1]
    assert len(ones) in (0, 2) and len(set(ones)) <= 1


def test_pk_sampler_seeded_epochs():
    items = _items({p: 4 for p in range(8)})
    a, b = PKSampler(items, 4, 2, seed=7), PKSampler(items, 4, 2, seed=7)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    second = list(a)
    assert second != first_a  # the epoch advanced
    a.set_epoch(0)
    assert list(a) == first_a
    assert list(PKSampler(items, 4, 2, seed=8)) != first_a
    # Identities with >= K tracklets contribute disjoint groups: no tracklet twice in an epoch.
    assert len(set(first_a)) == len(first_a)


def test_pk_sampler_with_dataloader(tmp_path):
    items = []
    for pid in range(4):
        for j in range(2):
            item = _colour_tracklet(tmp_path / f"{pid}-{j}", 3, pid=pid, camid=j)
            items.append(item)
    sampler = PKSampler(items, p=2, k=2, seed=0)
    ds = TrackletDataset(items, 4, "restricted", (8, 4), train=True)
    loader = DataLoader(ds, batch_size=sampler.batch_size, sampler=sampler, drop_last=True)
    clips, pids, camids = next(iter(loader))
    assert clips.shape == (4, 4, 3, 8, 4)
    assert pids.tolist()[0] == pids.tolist()[1] and pids.tolist()[2] == pids.tolist()[3]
    assert len(set(pids.tolist())) == 2


def test_pk_sampler_errors():
    with pytest.raises(ValueError, match="identities"):
        PKSampler(_items({0: 3, 1: 3}), p=3, k=2)
    with pytest.raises(ValueError, match=">= 1"):
        PKSampler(_items({0: 3}), p=1, k=0)
