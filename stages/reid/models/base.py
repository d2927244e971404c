"""Shared pieces of the re-id networks: the model contract, output record and tensor helpers.

Shapes used throughout: ``B`` clips per batch, ``T`` frames per clip, ``C`` backbone channels,
``h × w`` backbone feature-map size (rows × columns), ``D`` embedding size.
"""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)

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


def validate_clips(x: Any, name: str = "x", channels: int = 3) -> None:
    """Check that ``x`` is a clip batch ``float [B, T, channels, H, W]``.

    Args:
        x: The tensor to check.
        name: Argument name for the error message.
        channels: Expected channels: 3 (RGB), or 5 for RGB + optical flow ``(dx, dy)``
            (:mod:`stages.reid.models.flow`).

    Raises:
        ValueError: If ``x`` is not a floating-point tensor of that shape (B, T ≥ 1).
    """
    layout = "[B, T, 3, H, W] (RGB)" if channels == 3 else f"[B, T, {channels}, H, W] (RGB + flow dx, dy)"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    shape = static_shape(x)
    if len(shape) != 5 or shape[2] != channels:
        raise ValueError(f"{name} must be a clip batch {layout}, got shape {shape}")
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

    Subclasses build their layers after calling ``super().__init__``, set ``embedding_dim``, call
    :meth:`add_neck` last and implement :meth:`forward_train`. :meth:`forward` returns the
    L2-normalised features *after* the batch-norm neck (``neck``), as in the strong video
    baselines: the trainer puts its identity classifier on ``neck(features)`` and its triplet loss
    on ``features`` (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
    Re-identification", CVPRW 2019, Sec. 4.4). An untrained neck (running mean 0, variance 1,
    scale 1, shift 0) is the identity up to ``1/√(1 + 1e-5)``, so untrained models embed as before.

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
        input_channels: Channels of a frame: 3 (RGB, every model by default) or 5 (RGB + optical
            flow, RCN with ``flow`` set).
        neck: ``BatchNorm1d(embedding_dim)`` with its shift frozen at 0 (created by
            :meth:`add_neck`).

    Raises:
        ValueError: If the backbone name or ``last_stride`` is invalid.
        stages.reid.backbones.WeightsUnavailableError: If pretrained weights are missing.
    """

    embedding_dim: int
    input_channels: int = 3

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
        validate_clips(x, channels=self.input_channels)
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
            ``float32 [B, embedding_dim]`` embeddings ``normalize(neck(features))`` with unit L2
            norm per row.

        Raises:
            ValueError: If ``x`` is not a 5-D floating-point clip batch with 3 channels.
        """
        return F.normalize(self.neck(self.forward_train(x).features), dim=1)

    def add_neck(self) -> None:
        """Create the retrieval batch-norm neck over ``embedding_dim`` (call at the end of ``__init__``).

        A state dict without any ``neck.*`` entry (a checkpoint saved before the neck moved into the
        model) loads with an untrained neck, so such a checkpoint embeds as it did (a warning says so).
        """
        self.neck = nn.BatchNorm1d(self.embedding_dim)
        self.neck.bias.requires_grad_(False)
        self._register_load_state_dict_pre_hook(self._fill_missing_neck)

    def _fill_missing_neck(self, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
        keys = {prefix + "neck." + name: value for name, value in self.neck.state_dict().items()}
        if not any(key in state_dict for key in keys):
            logger.warning("state dict has no BN-neck (saved before retrieval moved after the neck): "
                           "using an untrained neck, embeddings as before")
            for key, value in keys.items():
                state_dict[key] = value.detach().clone()

    @staticmethod
    def zero(reference: torch.Tensor) -> torch.Tensor:
        """A scalar ``0.`` with the dtype and device of ``reference`` (the "no regulariser" value)."""
        return reference.new_zeros(())
