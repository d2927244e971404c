"""Diversity-regularised spatiotemporal attention (DRSTA) for video re-id.

S. Li, S. Bak, P. Carr, X. Wang, "Diversity Regularized Spatiotemporal Attention for Video-based
Person Re-identification", CVPR 2018 (arXiv 1803.09882).

``K`` spatial attention models each find one body region in every frame; a temporal attention per
model then weighs the frames; the ``K`` pooled region features are concatenated. A diversity
regulariser keeps the ``K`` spatial attention maps of a frame apart. Notation (labels (D1)–(D5) are
ours, in the paper's order):

* ``f_{t,l} ∈ R^C``: backbone feature of frame ``t`` at location ``l = 1..L`` (``L = h·w``).
* (D1) spatial attention model ``k = 1..K``:
  ``e_{t,k,l} = w_kᵀ ReLU(W_k f_{t,l} + b_k) + b'_k``,
  ``s_{t,k,l} = exp(e_{t,k,l}) / Σ_{l'} exp(e_{t,k,l'})`` (softmax over space).
* (D2) attended region feature: ``x_{t,k} = Σ_l s_{t,k,l} f_{t,l}``.
* (D3) diversity regulariser on ``Q_t = [√s_{t,1}; …; √s_{t,K}] ∈ R^{K×L}``:
  ``R = ‖Q_t Q_tᵀ − I‖_F²``. Off-diagonal entries of ``Q_t Q_tᵀ`` are the Bhattacharyya
  coefficients ``Σ_l √(s_i s_j) = 1 − H²(s_i, s_j)`` (``H``: Hellinger distance), diagonal entries
  are 1, so minimising ``R`` maximises the pairwise Hellinger distances. ``R = 0`` for maps with
  disjoint supports and reaches its maximum ``K(K − 1)`` for identical maps.
* (D4) temporal attention per model: ``ε_{t,k} = u_kᵀ x_{t,k} + c_k``,
  ``τ_{t,k} = exp(ε_{t,k}) / Σ_{t'} exp(ε_{t',k})`` (softmax over frames).
* (D5) clip feature: ``v = FC([x_1; …; x_K])`` with ``x_k = Σ_t τ_{t,k} x_{t,k}`` (FC optional here).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import EmbeddingHead, ReidModel, ReidOutput, check_non_negative_float, check_positive_int

__all__ = ["DRSTA", "diversity_regularizer"]

_SQRT_FLOOR = 1e-12
"""Floor under attention weights before the square root of (D3), keeping its gradient finite."""


def diversity_regularizer(attention: torch.Tensor) -> torch.Tensor:
    """Diversity regulariser (D3): ``‖Q Qᵀ − I‖_F²`` with ``Q = √attention``, averaged.

    Args:
        attention: ``float32 [..., K, L]`` attention maps, each row a distribution over the ``L``
            locations (non-negative, summing to 1).

    Returns:
        ``float32`` scalar: the mean over the leading dimensions of ``‖Q Qᵀ − I‖_F²``; 0 for maps with
        disjoint supports, ``K(K − 1)`` (its maximum) for ``K`` identical maps.
    """
    q = attention.clamp_min(_SQRT_FLOOR).sqrt()  # [..., K, L]
    gram = q @ q.transpose(-1, -2)  # [..., K, K]
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return (gram - eye).square().sum(dim=(-2, -1)).mean()


class DRSTA(ReidModel):
    """Diversity-regularised spatiotemporal attention (Li et al., CVPR 2018); see the module docstring.

    Args:
        backbone: Backbone name (the paper uses ResNet-50).
        pretrained: Load offline ImageNet weights into the backbone.
        last_stride: 1 (output stride 16) or 2 (output stride 32, the paper's 8×4 maps).
        num_models: ``K``, the number of spatial attention models (paper: 6).
        attention_dim: Hidden size of each spatial attention model (``W_k`` in D1).
        embedding_dim: ``None`` (default): no FC, the embedding is the concatenation of the ``K``
            region features (size ``K·C``). An int adds ``Linear`` + ``BatchNorm1d`` to that size.
        reg_weight: Weight of the diversity regulariser (D3) returned by :meth:`forward_train` in
            training mode (not tuned here).

    Attributes:
        embedding_dim: ``K·C`` (7680 with ``mobilenet_v2`` and ``K = 6``) or ``embedding_dim``.

    Raises:
        ValueError: If an argument is invalid.
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        pretrained: bool = True,
        last_stride: int = 1,
        num_models: int = 6,
        attention_dim: int = 256,
        embedding_dim: int | None = None,
        reg_weight: float = 1.0,
    ) -> None:
        num_models = check_positive_int(num_models, "num_models")
        attention_dim = check_positive_int(attention_dim, "attention_dim")
        reg_weight = check_non_negative_float(reg_weight, "reg_weight")
        super().__init__(
            dict(
                backbone=backbone,
                pretrained=pretrained,
                last_stride=last_stride,
                num_models=num_models,
                attention_dim=attention_dim,
                embedding_dim=embedding_dim,
                reg_weight=reg_weight,
            )
        )
        c = self.backbone.out_channels
        self.num_models = num_models
        self.reg_weight = reg_weight
        # (D1): K independent two-layer scorers as grouped 1×1 convolutions.
        self.spatial = nn.Sequential(
            nn.Conv2d(c, num_models * attention_dim, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_models * attention_dim, num_models, kernel_size=1, groups=num_models),
        )
        # (D4): one linear scorer per model.
        self.temporal_weight = nn.Parameter(torch.empty(num_models, c))
        self.temporal_bias = nn.Parameter(torch.zeros(num_models))
        nn.init.normal_(self.temporal_weight, std=c**-0.5)
        self.head = EmbeddingHead(num_models * c, embedding_dim)
        self.embedding_dim = self.head.out_dim

    def spatial_attention(self, f: torch.Tensor) -> torch.Tensor:
        """Spatial attention maps (D1).

        Args:
            f: ``float32 [B, T, C, h, w]`` backbone maps.

        Returns:
            ``float32 [B, T, K, h·w]``, each ``[b, t, k]`` a softmax over the ``h·w`` locations
            (row-major).
        """
        logits = self.spatial(f.flatten(0, 1))  # [B·T, K, h, w]
        logits = logits.reshape(f.shape[0], f.shape[1], self.num_models, -1)
        return logits.softmax(dim=-1)

    def forward_train(self, x: torch.Tensor) -> ReidOutput:
        """See :meth:`ReidModel.forward_train`.

        In training mode the regulariser is ``reg_weight · R`` (D3) averaged over clips and frames.
        """
        f = self.frame_features(x)  # [B, T, C, h, w]
        s = self.spatial_attention(f)  # [B, T, K, L]
        regions = torch.einsum("btkl,btcl->btkc", s, f.flatten(3))  # (D2) [B, T, K, C]
        scores = torch.einsum("btkc,kc->btk", regions, self.temporal_weight) + self.temporal_bias
        tau = scores.softmax(dim=1)  # (D4) over frames
        pooled = torch.einsum("btk,btkc->bkc", tau, regions)  # [B, K, C]
        features = self.head(pooled.flatten(1))  # (D5)
        if self.training and self.reg_weight > 0:
            reg = self.reg_weight * diversity_regularizer(s)
        else:
            reg = self.zero(features)
        return ReidOutput(features, reg)
