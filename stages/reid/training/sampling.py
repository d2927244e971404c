"""Temporal sampling, clip augmentation, torch data sets and the P x K identity sampler.

Frames of a tracklet are read with OpenCV (**BGR**), resized to ``input_size`` (bilinear), turned to
**RGB**, scaled to [0, 1], augmented (training), and normalised with the backbone's RGB
``mean``/``std``: the contract of ``docs/ARCHITECTURE.md`` (``float32 [T, 3, H, W]`` per clip,
``[B, T, 3, H, W]`` once batched).

Temporal sampling modes (:func:`sample_indices`), for a tracklet of ``n`` frames and clips of ``T``:

* ``"random"``: a random *ordered subset*: ``T`` distinct frames drawn uniformly without
  replacement, in temporal order, so a clip spans the whole tracklet with random gaps. When
  ``n < T`` every frame is used and ``T - n`` extra frames are drawn with replacement (repeat
  padding), all in temporal order.
* ``"restricted"``: restricted random sampling (Li et al., "Diversity Regularized Spatiotemporal
  Attention for Video-based Person Re-identification", CVPR 2018): the tracklet is cut into ``T``
  equal segments and one frame is drawn from each. Without a generator (test) the first frame of
  each segment is taken.
* ``"evenly"``: ``T`` evenly spaced indices ``round(linspace(0, n - 1, T))``, first and last frame
  included; when ``n < T`` frames repeat in temporal order. Deterministic.
* ``"all"``: every frame (test). :class:`TrackletDataset` can cut them into consecutive chunks of
  ``T`` frames, the last chunk padded by repeating its last frame (:func:`chunk_indices`).

Augmentation (:class:`ClipAugment`) draws its parameters once per clip and applies them to every
frame: horizontal flip, colour jitter (brightness, contrast, saturation, hue; torchvision v2
functional ops) and random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020)
of the same rectangle in every frame, filled with the normalisation mean (0 after normalisation).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from stages.reid.clips import (  # noqa: F401 - re-exported: the training side's sampling API
    IMAGENET_MEAN,
    IMAGENET_STD,
    SAMPLING_MODES,
    SamplingMode,
    chunk_indices,
    sample_indices,
)
from stages.reid.training.datasets.base import TrackletItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentParams:
    """Augmentation parameters drawn for one clip (shared by all its frames).

    Attributes:
        flip: Mirror horizontally.
        brightness, contrast, saturation: Multiplicative factors (1 = unchanged).
        hue: Hue shift in [-0.5, 0.5] turns (0 = unchanged).
        erase: ``(top, left, height, width)`` pixels of the erased rectangle, or None.
    """

    flip: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    erase: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class ClipAugment:
    """Clip-consistent training augmentation; parameters are drawn once per clip.

    Attributes:
        flip_p: Probability of a horizontal flip.
        brightness: Brightness factor drawn from ``[1 - b, 1 + b]`` (0 disables).
        contrast: Contrast factor drawn from ``[1 - c, 1 + c]`` (0 disables).
        saturation: Saturation factor drawn from ``[1 - s, 1 + s]`` (0 disables).
        hue: Hue shift drawn from ``[-h, h]``, ``h <= 0.5`` (0 disables).
        erase_p: Probability of random erasing.
        erase_area: Erased area as a fraction of the image, ``(min, max)``.
        erase_aspect: Aspect ratio (height / width) of the rectangle, ``(min, max)``; drawn
            log-uniformly.

    Raises:
        ValueError: A probability outside [0, 1], a negative jitter, ``hue > 0.5`` or bad ranges.
    """

    flip_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.15
    saturation: float = 0.1
    hue: float = 0.0
    erase_p: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.4)
    erase_aspect: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self) -> None:
        for name in ("flip_p", "erase_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ClipAugment.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                raise ValueError(f"ClipAugment.{name} must be >= 0, got {getattr(self, name)}")
        if self.hue > 0.5:
            raise ValueError(f"ClipAugment.hue must be <= 0.5, got {self.hue}")
        lo, hi = self.erase_area
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"ClipAugment.erase_area must satisfy 0 < min <= max < 1, got {self.erase_area}")
        lo, hi = self.erase_aspect
        if not 0.0 < lo <= hi:
            raise ValueError(f"ClipAugment.erase_aspect must satisfy 0 < min <= max, got {self.erase_aspect}")

    @classmethod
    def none(cls) -> ClipAugment:
        """An augmentation that changes nothing (for training without augmentation)."""
        return cls(flip_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, erase_p=0.0)

    def sample(self, rng: np.random.Generator, height: int, width: int) -> AugmentParams:
        """Draw the parameters for one clip of ``height x width`` pixel frames."""

        def factor(amount: float) -> float:
            return float(rng.uniform(1.0 - amount, 1.0 + amount)) if amount > 0 else 1.0

        flip = bool(rng.random() < self.flip_p)
        brightness, contrast, saturation = factor(self.brightness), factor(self.contrast), factor(self.saturation)
        hue = float(rng.uniform(-self.hue, self.hue)) if self.hue > 0 else 0.0
        erase = None
        if rng.random() < self.erase_p:
            for _ in range(10):
                area = rng.uniform(*self.erase_area) * height * width
                aspect = math.exp(rng.uniform(math.log(self.erase_aspect[0]), math.log(self.erase_aspect[1])))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if 0 < h < height and 0 < w < width:
                    erase = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
                    break
        return AugmentParams(flip, brightness, contrast, saturation, hue, erase)

    @staticmethod
    def apply(clip: torch.Tensor, params: AugmentParams, fill: Sequence[float]) -> torch.Tensor:
        """Apply ``params`` to every frame of ``clip`` (a new tensor; the input is not modified).

        Args:
            clip: ``float32 [T, 3, H, W]`` RGB in [0, 1].
            params: Parameters from :meth:`sample`.
            fill: RGB value in [0, 1] of erased pixels (the normalisation mean).

        Returns:
            ``float32 [T, 3, H, W]`` RGB in [0, 1].
        """
        from torchvision.transforms.v2 import functional as tvf

        out = clip.flip(-1) if params.flip else clip.clone()
        if params.brightness != 1.0:
            out = tvf.adjust_brightness(out, params.brightness)
        if params.contrast != 1.0:
            out = tvf.adjust_contrast(out, params.contrast)
        if params.saturation != 1.0:
            out = tvf.adjust_saturation(out, params.saturation)
        if params.hue != 0.0:
            out = tvf.adjust_hue(out, params.hue)
        if params.erase is not None:
            top, left, h, w = params.erase
            out[:, :, top : top + h, left : left + w] = torch.tensor(fill, dtype=out.dtype).view(1, 3, 1, 1)
        return out

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator, fill: Sequence[float]) -> torch.Tensor:
        """Draw parameters with ``rng`` and apply them to all frames of ``clip`` (see :meth:`apply`)."""
        return self.apply(clip, self.sample(rng, clip.shape[-2], clip.shape[-1]), fill)


def read_frames(paths: Sequence[str], input_size: tuple[int, int]) -> torch.Tensor:
    """Read images with OpenCV, resize and convert them to RGB.

    Args:
        paths: Image files (any format OpenCV reads; decoded as **BGR**).
        input_size: ``(height, width)`` pixels of the output.

    Returns:
        ``float32 [len(paths), 3, H, W]`` **RGB** in [0, 1].

    Raises:
        FileNotFoundError: A file is missing or OpenCV cannot decode it.
    """
    import cv2

    height, width = input_size
    frames = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"{path}: missing or not an image OpenCV can read")
        if image.shape[:2] != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        frames[i] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)


class TrackletDataset(Dataset):
    """Clips of tracklets as normalised RGB tensors, for training or testing.

    ``dataset[i]`` returns ``(clip, pid, camid)``:

    * ``clip``: ``float32 [T, 3, H, W]`` RGB, scaled to [0, 1] then normalised with ``mean``/``std``;
      with ``sampling="all"`` ``T`` is the tracklet's frame count, and with ``chunked=True`` the clip
      is ``[C, T, 3, H, W]`` (``C = ceil(frames / seq_len)`` chunks of ``seq_len`` frames), ready to
      be fed to a model as a batch; with ``"all"`` use a DataLoader ``batch_size`` of 1.
    * with ``flow`` set, each frame gets two optical-flow channels after RGB (``[..., 5, H, W]``),
      computed between consecutive frames of the clip, after augmentation
      (:func:`stages.reid.models.flow.clip_flow`; for RCN with ``flow``).
    * ``pid``, ``camid``: ints from the :class:`TrackletItem`.

    Randomness: in training, each call draws a fresh seed from torch's global generator, so
    ``torch.manual_seed`` makes a run reproducible and DataLoader workers (seeded by torch) differ.
    At test time ``"random"``/``"restricted"`` draws use ``numpy.random.default_rng((seed, index))``.

    Args:
        items: Tracklets.
        seq_len: Clip length ``T`` (chunk length with ``"all"`` + ``chunked``).
        sampling: ``"random"``, ``"restricted"``, ``"evenly"`` or ``"all"``.
        input_size: ``(height, width)`` pixels, e.g. ``(256, 128)``.
        mean: RGB normalisation mean for inputs in [0, 1].
        std: RGB normalisation standard deviation (> 0).
        train: Training mode (augmentation on; ``"all"`` not allowed).
        augment: Training augmentation; defaults to ``ClipAugment()`` when ``train`` (use
            ``ClipAugment.none()`` to disable). Must be None when not training.
        chunked: With ``"all"``: return ``[C, seq_len, 3, H, W]`` chunks.
        seed: Seed of test-time random draws.
        flow: None, ``"farneback"`` or ``"dis"``: append optical-flow channels.

    Raises:
        ValueError: Bad ``seq_len``, ``sampling``, ``input_size``, ``mean``/``std``, ``"all"`` in
            training, ``augment`` outside training, ``chunked`` without ``"all"``, unknown ``flow``.

    Example:
        >>> train_set = TrackletDataset(ds.train, 8, "restricted", train=True)  # doctest: +SKIP
        >>> loader = DataLoader(train_set, batch_size=32, sampler=PKSampler(ds.train, 8, 4),
        ...                     drop_last=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        items: Sequence[TrackletItem],
        seq_len: int,
        sampling: SamplingMode,
        input_size: tuple[int, int] = (256, 128),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train: bool = False,
        *,
        augment: ClipAugment | None = None,
        chunked: bool = False,
        seed: int = 0,
        flow: str | None = None,
    ) -> None:
        from stages.reid.models.flow import check_flow_method

        check_flow_method(flow)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {sampling!r}; valid modes: {list(SAMPLING_MODES)}")
        if len(input_size) != 2 or any(int(v) != v or v < 1 for v in input_size):
            raise ValueError(f"input_size must be (height, width) positive ints, got {input_size!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must be 3 RGB values with std > 0, got {mean!r}, {std!r}")
        if train and sampling == "all":
            raise ValueError("sampling 'all' gives clips of varying length; use it for testing (train=False)")
        if augment is not None and not train:
            raise ValueError("augment is for training clips; pass train=True or augment=None")
        if chunked and sampling != "all":
            raise ValueError("chunked=True needs sampling='all'")
        self.items = list(items)
        self.seq_len = seq_len
        self.sampling = sampling
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.train = train
        self.augment = (augment or ClipAugment()) if train else None
        self.chunked = chunked
        self.seed = seed
        self.flow = flow
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def _rng(self, index: int) -> np.random.Generator:
        if self.train:
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        return np.random.default_rng((self.seed, index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.items[index]
        rng = self._rng(index)
        if self.sampling == "restricted" and not self.train:
            indices = sample_indices(len(item), self.seq_len, "restricted", None)
        else:
            indices = sample_indices(len(item), self.seq_len, self.sampling, rng)
        unique, inverse = np.unique(indices, return_inverse=True)
        clip = read_frames([item.paths[i] for i in unique], self.input_size)[torch.from_numpy(inverse.ravel())]
        if self.augment is not None:
            clip = self.augment(clip, rng, self.mean)
        rgb01 = clip
        clip = (clip - self._mean_t) / self._std_t
        if self.flow is not None:
            from stages.reid.models.flow import clip_flow

            bgr = rgb01.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()[..., ::-1]
            clip = torch.cat([clip, torch.from_numpy(clip_flow(np.ascontiguousarray(bgr), self.flow))], dim=1)
        if self.chunked:
            clip = clip[torch.from_numpy(chunk_indices(len(item), self.seq_len))]
        return clip, item.pid, item.camid


class PKSampler(Sampler[int]):
    """Identity sampler for batch-hard triplet training: batches of P identities x K tracklets.

    Each epoch, every identity's tracklets are shuffled and cut into groups of K (an identity
    with fewer than K tracklets gives one group drawn with replacement; a remainder smaller than K is
    left out this epoch); then batches are formed by drawing P distinct identities that still have
    groups, until fewer than P remain. The sampler yields flat dataset indices: use it with
    ``DataLoader(..., batch_size=p * k, sampler=sampler, drop_last=True)``. The epoch counter
    advances at each iteration (or :meth:`set_epoch`), and the schedule of epoch ``e`` depends only
    on ``(seed, e)``; ``len(sampler)`` is exact for the next iteration.

    Args:
        items: Tracklets (their ``pid`` is used) in dataset order.
        p: Identities per batch, ``>= 1``.
        k: Tracklets per identity, ``>= 1`` (batch-hard mining needs ``k >= 2``).
        seed: Seed of the schedule.

    Raises:
        ValueError: ``p`` or ``k`` < 1, or fewer than ``p`` identities.
    """

    def __init__(self, items: Sequence[TrackletItem], p: int, k: int, seed: int = 0) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
        by_pid: dict[int, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_pid[item.pid].append(index)
        if len(by_pid) < p:
            raise ValueError(f"PKSampler needs at least p={p} identities, got {len(by_pid)}")
        self.p, self.k, self.seed = p, k, seed
        self._by_pid = {pid: np.asarray(idx, dtype=np.int64) for pid, idx in sorted(by_pid.items())}
        self._epoch = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    @property
    def batch_size(self) -> int:
        """``p * k``."""
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield the schedule of ``epoch``."""
        self._epoch = int(epoch)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The schedule of ``epoch``: a list of ``int64 [p * k]`` index arrays."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng((self.seed, epoch))
        groups: dict[int, list[np.ndarray]] = {}
        for pid, idx in self._by_pid.items():
            if len(idx) < self.k:
                groups[pid] = [rng.choice(idx, size=self.k, replace=True)]
            else:
                shuffled = rng.permutation(idx)
                n = len(idx) // self.k
                groups[pid] = [shuffled[i * self.k : (i + 1) * self.k] for i in range(n)]
        out = []
        available = sorted(groups)
        while len(available) >= self.p:
            chosen = rng.choice(len(available), size=self.p, replace=False)
            out.append(np.concatenate([groups[available[c]].pop() for c in chosen]))
            available = [pid for pid in available if groups[pid]]
        self._cache = (epoch, out)
        return out

    def __iter__(self) -> Iterator[int]:
        schedule = self.batches(self._epoch)
        self._epoch += 1
        for batch in schedule:
            yield from batch.tolist()

    def __len__(self) -> int:
        return len(self.batches(self._epoch)) * self.batch_size
