"""Video re-id networks behind one contract, built by name from a lazy registry.

Every model maps a clip batch ``float32 [B, T, 3, H, W]`` (RGB, scaled to [0, 1] then normalised
with the model's ``mean`` / ``std``) to L2-normalised embeddings ``float32 [B, D]``; see
``docs/ARCHITECTURE.md``, section "Re-id model contract", and :class:`ReidModel`.

Importing this package imports neither torch nor any model module: :func:`build_model` imports
the one it builds, and ``ReidOutput`` / ``ReidModel`` are loaded from :mod:`.base` on first use.

Example:
    >>> import torch
    >>> from stages.reid.models import build_model
    >>> model = build_model("temporal_pool", pretrained=False).eval()
    >>> model(torch.rand(2, 4, 3, 256, 128)).shape
    torch.Size([2, 1280])
    >>> rebuilt = build_model("temporal_pool", **model.config)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import ReidModel, ReidOutput

__all__ = ["MODELS", "ReidModel", "ReidOutput", "available_models", "build_model"]

MODELS: dict[str, str] = {
    "sta": "stages.reid.models.sta:STA",
    "drsta": "stages.reid.models.drsta:DRSTA",
    "siamese_sgru": "stages.reid.models.siamese_sgru:SiameseSGRU",
    "conv_attention": "stages.reid.models.conv_attention:ConvAttention",
    "rcn": "stages.reid.models.rcn:RCN",
    "temporal_pool": "stages.reid.models.pooling:TemporalPool",
    "part_pool": "stages.reid.models.pooling:PartPool",
}
"""Registry: model name → ``"module:class"``, imported only when built."""


def available_models() -> tuple[str, ...]:
    """Return the valid model names, sorted."""
    return tuple(sorted(MODELS))


def build_model(name: str, **kwargs: Any) -> ReidModel:
    """Build a re-id model by registry name.

    Args:
        name: One of :func:`available_models` (``sta``, ``drsta``, ``siamese_sgru``,
            ``conv_attention``, ``rcn``, ``temporal_pool``, ``part_pool``).
        **kwargs: Constructor keyword arguments of that model (all have defaults), e.g.
            ``backbone="mobilenet_v2"``, ``pretrained=True``, ``last_stride=1``. A model's
            ``config`` attribute holds them, so ``build_model(name, **model.config)`` rebuilds it.

    Returns:
        The model, a :class:`ReidModel` (``torch.nn.Module``) in training mode.

    Raises:
        ValueError: If ``name`` is not registered (the message lists the valid names) or a keyword
            argument is invalid.
        TypeError: If a keyword argument is unknown to the model.
        stages.reid.backbones.WeightsUnavailableError: If pretrained backbone weights are missing.

    Example:
        >>> model = build_model("sta", pretrained=False, num_parts=4, embedding_dim=None)
        >>> model.embedding_dim
        2560
    """
    if name not in MODELS:
        valid = ", ".join(available_models())
        raise ValueError(f"unknown model name {name!r}; valid names: {valid}")
    module_name, _, class_name = MODELS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**kwargs)


def __getattr__(attr: str) -> Any:
    """Load ``ReidModel`` and ``ReidOutput`` (which need torch) on first access."""
    if attr in ("ReidModel", "ReidOutput"):
        from . import base

        return getattr(base, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
