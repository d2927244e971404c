"""Which frames of a tracklet make a clip: the temporal sampling shared by serving and training.

The re-id stage (serving) picks a tracklet's ``T`` crops with ``"evenly"``, the same rule the
evaluation uses, so a model is served the clips it was scored on. Training draws ``"random"`` or
``"restricted"`` clips (see :mod:`stages.reid.training.sampling`). Modes, for ``n`` frames and
clips of ``T``:

* ``"random"``: ``T`` distinct frames drawn uniformly without replacement, in temporal order; when
  ``n < T`` every frame is used and ``T - n`` extra frames are drawn with replacement.
* ``"restricted"``: restricted random sampling (Li et al., CVPR 2018): ``T`` equal segments, one
  frame drawn from each (the first of each segment without a generator).
* ``"evenly"``: ``round(linspace(0, n - 1, T))``, first and last frame included; deterministic.
* ``"all"``: every frame; :func:`chunk_indices` cuts them into consecutive chunks of ``T``.

Only numpy is imported here.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

SamplingMode = Literal["random", "restricted", "evenly", "all"]
SAMPLING_MODES: tuple[str, ...] = ("random", "restricted", "evenly", "all")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""RGB mean of ImageNet for inputs in [0, 1]."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""RGB standard deviation of ImageNet for inputs in [0, 1]."""


def sample_indices(
    num_frames: int, seq_len: int, mode: SamplingMode, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Frame indices of one clip, in temporal (non-decreasing) order.

    Args:
        num_frames: Frames in the tracklet, ``>= 1``.
        seq_len: Clip length ``T``, ``>= 1`` (ignored by ``"all"``).
        mode: ``"random"``, ``"restricted"``, ``"evenly"`` or ``"all"`` (see the module docstring).
        rng: Generator for ``"random"`` (required) and ``"restricted"`` (optional).

    Returns:
        ``int64 [T]`` indices in ``[0, num_frames)`` (``[num_frames]`` for ``"all"``).

    Raises:
        ValueError: Non-positive sizes, an unknown mode, or ``"random"`` without ``rng``.

    Example:
        >>> sample_indices(10, 4, "evenly").tolist()
        [0, 3, 6, 9]
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if mode == "all":
        return np.arange(num_frames, dtype=np.int64)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if mode == "evenly":
        return np.rint(np.linspace(0, num_frames - 1, seq_len)).astype(np.int64)
    if mode == "restricted":
        bounds = np.floor(np.arange(seq_len + 1) * num_frames / seq_len).astype(np.int64)
        starts = bounds[:-1]
        ends = np.maximum(bounds[1:], starts + 1)
        if rng is None:
            return starts
        return rng.integers(starts, ends).astype(np.int64)
    if mode == "random":
        if rng is None:
            raise ValueError("sampling mode 'random' needs a numpy Generator")
        if num_frames >= seq_len:
            chosen = rng.choice(num_frames, size=seq_len, replace=False)
        else:
            chosen = np.concatenate([np.arange(num_frames), rng.integers(0, num_frames, seq_len - num_frames)])
        return np.sort(chosen).astype(np.int64)
    raise ValueError(f"unknown sampling mode {mode!r}; valid modes: {list(SAMPLING_MODES)}")


def chunk_indices(num_frames: int, chunk_len: int) -> np.ndarray:
    """All frames cut into consecutive chunks; the last one padded by repeating its last frame.

    Args:
        num_frames: Frames in the tracklet, ``>= 1``.
        chunk_len: Frames per chunk, ``>= 1``.

    Returns:
        ``int64 [ceil(num_frames / chunk_len), chunk_len]``.

    Raises:
        ValueError: Non-positive sizes.

    Example:
        >>> chunk_indices(5, 2).tolist()
        [[0, 1], [2, 3], [4, 4]]
    """
    if num_frames < 1 or chunk_len < 1:
        raise ValueError(f"num_frames and chunk_len must be >= 1, got {num_frames}, {chunk_len}")
    num_chunks = math.ceil(num_frames / chunk_len)
    return np.minimum(np.arange(num_chunks * chunk_len), num_frames - 1).reshape(num_chunks, chunk_len)
