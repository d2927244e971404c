"""Parameter-free pooling baselines for video re-id.

* :class:`TemporalPool` – temporal average pooling of per-frame global features, the baseline of
  Gao & Nevatia, "Revisiting Temporal Modeling for Video-based Person ReID" (arXiv 1805.02104, 2018).
* :class:`PartPool` – the same per horizontal stripe, concatenated (the part pooling of Sun et al.,
  "Beyond Part Models: Person Retrieval with Refined Part Pooling", ECCV 2018, without refinement).

Neither adds parameters to the backbone, so with ImageNet weights they give meaningful embeddings
before any re-id training; keep them next to every attention model as baselines.
"""

from __future__ import annotations

import torch

from .base import ReidModel, ReidOutput, check_positive_int, part_masks

__all__ = ["PartPool", "TemporalPool"]


class TemporalPool(ReidModel):
    """Global average pooling per frame, then the mean over frames.

    ``v = (1/T) Σ_t GAP(f_t)``, with ``f_t ∈ R^{C×h×w}`` the backbone map of frame ``t``.

    Args:
        backbone: Backbone name (see :func:`stages.reid.backbones.build_backbone`).
        pretrained: Load offline ImageNet weights into the backbone.
        last_stride: 1 (output stride 16) or 2 (output stride 32).

    Attributes:
        embedding_dim: ``C`` (1280 with ``mobilenet_v2``).

    Raises:
        ValueError: If an argument is invalid.
    """

    def __init__(
        self, backbone: str = "mobilenet_v2", pretrained: bool = True, last_stride: int = 1
    ) -> None:
        super().__init__(dict(backbone=backbone, pretrained=pretrained, last_stride=last_stride))
        self.embedding_dim = self.backbone.out_channels
        self.add_neck()

    def forward_train(self, x: torch.Tensor) -> ReidOutput:
        """See :meth:`ReidModel.forward_train`; the regulariser is always 0."""
        f = self.frame_features(x)  # [B, T, C, h, w]
        features = f.mean(dim=(3, 4)).mean(dim=1)  # [B, C]
        return ReidOutput(features, self.zero(features))


class PartPool(ReidModel):
    """Average pooling of ``K`` horizontal stripes per frame, mean over frames, concatenated.

    ``v = [v_1; …; v_K]``, ``v_k = (1/T) Σ_t mean_{(r, c) ∈ stripe k} f_t(r, c)``; stripe ``k`` holds rows
    ``r`` with ``floor(r K / h) = k`` (top to bottom).

    Args:
        backbone: Backbone name (see :func:`stages.reid.backbones.build_backbone`).
        pretrained: Load offline ImageNet weights into the backbone.
        last_stride: 1 (output stride 16) or 2 (output stride 32).
        num_parts: ``K``; the feature map must have at least ``K`` rows.

    Attributes:
        embedding_dim: ``K · C`` (5120 with ``mobilenet_v2`` and 4 parts), ordered part-major
            (the ``C`` values of the top stripe first).

    Raises:
        ValueError: If an argument is invalid, or at run time if the map has fewer than ``K`` rows.
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        pretrained: bool = True,
        last_stride: int = 1,
        num_parts: int = 4,
    ) -> None:
        num_parts = check_positive_int(num_parts, "num_parts")
        super().__init__(
            dict(
                backbone=backbone,
                pretrained=pretrained,
                last_stride=last_stride,
                num_parts=num_parts,
            )
        )
        self.num_parts = num_parts
        self.embedding_dim = num_parts * self.backbone.out_channels
        self.add_neck()

    def forward_train(self, x: torch.Tensor) -> ReidOutput:
        """See :meth:`ReidModel.forward_train`; the regulariser is always 0."""
        f = self.frame_features(x)  # [B, T, C, h, w]
        rows = f.mean(dim=(1, 4))  # [B, C, h]: mean over frames and columns
        masks = part_masks(rows.shape[-1], self.num_parts, rows.device, rows.dtype)  # [K, h]
        masks = masks / masks.sum(dim=1, keepdim=True)
        parts = torch.einsum("bch,kh->bkc", rows, masks)  # [B, K, C]
        features = parts.flatten(1)
        return ReidOutput(features, self.zero(features))
