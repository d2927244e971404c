"""Shared pieces of the re-id networks: the model contract, output record and tensor helpers.

Shapes used throughout: ``B`` clips per batch, ``T`` frames per clip, ``C`` backbone channels,
``h × w`` backbone feature-map size (rows × columns), ``D`` embedding size.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from stages.reid.backbones import Backbone, build_backbone, static_shape

__all__ = [
    "EmbeddingHead",
    "check_non_negative_float",
    "check_positive_int",
    "ReidModel",
    "ReidOutput",
    "part_masks",
    "validate_clips",
]

TINY = 1e-12
"""Lower bound of denominators of normalisations, so that an all-zero input gives zeros, not NaN.

A floor (rather than an added epsilon) keeps normalisations scale-invariant for small activations.
"""


class ReidOutput(NamedTuple):
    """What :meth:`ReidModel.forward_train` returns.

    Attributes:
        features: ``float32 [B, D]`` clip embeddings, **not** L2-normalised (losses such as
            softmax cross-entropy and triplet work on them).
        regularizer: ``float32`` scalar tensor, the model's regularisation term already multiplied
            by its weight, to be added to the loss. ``0.`` for models without one and in eval mode.
    """

    features: torch.Tensor
    regularizer: torch.Tensor


def validate_clips(x: Any, name: str = "x") -> None:
    """Check that ``x`` is a clip batch ``float [B, T, 3, H, W]``.

    Raises:
        ValueError: If ``x`` is not a floating-point tensor of that shape (B, T ≥ 1, 3 channels).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [B, T, 3, H, W], got {type(x).__name__}")
    shape = static_shape(x)
    if len(shape) != 5 or shape[2] != 3:
        raise ValueError(f"{name} must be a clip batch [B, T, 3, H, W] (RGB), got shape {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point (normalised RGB), got dtype {x.dtype}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} needs at least one clip and one frame, got shape {shape}")


def _trace_safe_int(value: int | torch.Tensor) -> int:
    """``int(value)`` for validation, without the tracer's "frozen into the trace" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(value)


def part_masks(
    height: int | torch.Tensor, num_parts: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Assign the rows of a feature map to ``num_parts`` horizontal stripes.

    Row ``r`` goes to stripe ``floor(r * num_parts / height)``, so stripes differ by at most one row.

    Args:
        height: Number of rows ``h`` of the feature map (a size from ``tensor.shape``; a tensor
            while tracing).
        num_parts: Number of stripes ``K`` (top to bottom).
        device: Device of the result.
        dtype: Floating dtype of the result.

    Returns:
        ``[K, h]`` one-hot matrix, ``M[k, r] = 1`` when row ``r`` belongs to stripe ``k``.

    Raises:
        ValueError: If ``height < num_parts`` (a stripe would be empty): use a larger input or fewer
            parts.
    """
    rows_available = _trace_safe_int(height)
    if rows_available < num_parts:
        raise ValueError(
            f"feature map has {rows_available} rows, fewer than num_parts={num_parts}: use a taller input "
            "or fewer parts"
        )
    rows = torch.arange(height, device=device)
    owner = torch.div(rows * num_parts, height, rounding_mode="floor")
    parts = torch.arange(num_parts, device=device)
    return (parts[:, None] == owner[None, :]).to(dtype)


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is a positive int.

    Raises:
        ValueError: Otherwise, naming the argument.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_non_negative_float(value: Any, name: str) -> float:
    """Return ``value`` as float if it is a finite number ≥ 0.

    Raises:
        ValueError: Otherwise, naming the argument.
    """
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class EmbeddingHead(nn.Module):
    """Optional final projection: identity, or ``Linear`` + ``BatchNorm1d`` to ``embedding_dim``.

    The batch-norm "neck" follows the strong-baseline re-id practice (Luo et al., CVPRW 2019). In
    training mode ``BatchNorm1d`` needs more than one clip per batch.

    Args:
        in_dim: Size of the incoming features.
        embedding_dim: Output size, or ``None`` for the identity (output size ``in_dim``).

    Raises:
        ValueError: If ``embedding_dim`` is not a positive int or None.
    """

    def __init__(self, in_dim: int, embedding_dim: int | None) -> None:
        super().__init__()
        if embedding_dim is not None:
            check_positive_int(embedding_dim, "embedding_dim")
        self.out_dim = int(in_dim if embedding_dim is None else embedding_dim)
        if embedding_dim is None:
            self.proj: nn.Module = nn.Identity()
        else:
            self.proj = nn.Sequential(
                nn.Linear(in_dim, embedding_dim, bias=False), nn.BatchNorm1d(embedding_dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``float32 [B, in_dim]`` to ``float32 [B, out_dim]``."""
        return self.proj(x)


class ReidModel(nn.Module):
    """Base class of the video re-id networks (the contract of ``docs/ARCHITECTURE.md``).

    Subclasses build their layers after calling ``super().__init__`` and implement
    :meth:`forward_train`; :meth:`forward` returns its L2-normalised features.

    Args:
        config: The subclass's constructor keyword arguments (JSON-serialisable), stored as
            ``config`` so that ``build_model(name, **config)`` rebuilds the model. It must contain
            ``backbone``, ``pretrained`` and ``last_stride``, which build the shared backbone.

    Attributes:
        backbone: The :class:`~stages.reid.backbones.Backbone` applied to every frame.
        config: Copy of the constructor keyword arguments.
        embedding_dim: ``D``, the size of the embeddings (set by the subclass).
        mean: RGB channel means for inputs in [0, 1] (from the backbone).
        std: RGB channel standard deviations for inputs in [0, 1] (from the backbone).

    Raises:
        ValueError: If the backbone name or ``last_stride`` is invalid.
        stages.reid.backbones.WeightsUnavailableError: If pretrained weights are missing.
    """

    embedding_dim: int

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(config)
        self.backbone: Backbone = build_backbone(
            config["backbone"], pretrained=config["pretrained"], last_stride=config["last_stride"]
        )
        self.mean: tuple[float, float, float] = self.backbone.mean
        self.std: tuple[float, float, float] = self.backbone.std

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """Run the backbone on every frame.

        Args:
            x: ``float32 [B, T, 3, H, W]`` normalised RGB clips.

        Returns:
            ``float32 [B, T, C, h, w]`` feature maps.

        Raises:
            ValueError: If ``x`` is not a clip batch (see :func:`validate_clips`).
        """
        validate_clips(x)
        t = x.shape[1]
        maps = self.backbone(x.flatten(0, 1))
        return maps.reshape(-1, t, *maps.shape[1:])

    def forward_train(self, x: torch.Tensor) -> ReidOutput:
        """Embed clips for training.

        Args:
            x: ``float32 [B, T, 3, H, W]`` normalised RGB clips.

        Returns:
            :class:`ReidOutput` with un-normalised ``features [B, embedding_dim]`` and the weighted
            ``regularizer`` (``0.`` in eval mode or for models without one).

        Raises:
            ValueError: If ``x`` is not a clip batch.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed clips for retrieval.

        Args:
            x: ``float32 [B, T, 3, H, W]`` RGB clips, scaled to [0, 1] then normalised with
                ``mean`` / ``std``.

        Returns:
            ``float32 [B, embedding_dim]`` embeddings with unit L2 norm per row.

        Raises:
            ValueError: If ``x`` is not a 5-D floating-point clip batch with 3 channels.
        """
        return F.normalize(self.forward_train(x).features, dim=1)

    @staticmethod
    def zero(reference: torch.Tensor) -> torch.Tensor:
        """A scalar ``0.`` with the dtype and device of ``reference`` (the "no regulariser" value)."""
        return reference.new_zeros(())
