"""Diversity-regularised spatiotemporal attention (DRSTA) for video re-id.

S. Li, S. Bak, P. Carr, X. Wang, "Diversity Regularized Spatiotemporal Attention for Video-based
Person Re-identification", CVPR 2018 (arXiv 1803.09882).

``K`` spatial attention models each find one body region in every frame; a temporal attention per
model then weighs the frames; the ``K`` pooled region features are concatenated. A diversity
regulariser keeps the ``K`` spatial attention maps of a frame apart. Notation (labels (D1)–(D5) are
ours, in the paper's order):

* ``f_{t,l} ∈ R^C``: backbone feature of frame ``t`` at location ``l = 1..L`` (``L = h·w``; the paper
  and the released code use 8×4 maps, ResNet-50 at output stride 32 on 256×128 crops, which is
  ``last_stride=2`` here).
* (D1) spatial attention model ``k = 1..K``:
  ``e_{t,k,l} = w_kᵀ ReLU(W_k f_{t,l} + b_k) + b'_k``,
  ``s_{t,k,l} = exp(e_{t,k,l}) / Σ_{l'} exp(e_{t,k,l'})`` (softmax over space).
* (D2) attended region feature ``x_{t,k} = Σ_l s_{t,k,l} f_{t,l}``, then, as in the released code,
  a linear map shared by the ``K`` models to ``d = 128`` and L2 normalisation:
  ``x̂_{t,k} = (W_x x_{t,k} + b_x) / ‖W_x x_{t,k} + b_x‖₂``.
* (D3) diversity regulariser on ``Q_t = [√s_{t,1}; …; √s_{t,K}] ∈ R^{K×L}``. The paper writes
  ``‖Q_t Q_tᵀ − I‖_F²`` per frame; the authors' released code takes the square root of its sum over
  all ``N`` frames of the batch, ``R = √(Σ_t ‖Q_t Q_tᵀ − I‖_F² + 10⁻⁵)`` (the Frobenius norm of the
  stacked ``Q Qᵀ − I``), which is what we use, with weight 1 as released. Off-diagonal entries of
  ``Q_t Q_tᵀ`` are the Bhattacharyya coefficients ``Σ_l √(s_i s_j) = 1 − H²(s_i, s_j)``
  (``H``: Hellinger distance), diagonal entries are 1, so minimising ``R`` maximises the pairwise
  Hellinger distances. Each frame's term is 0 for maps with disjoint supports and ``K(K − 1)``
  (its maximum) for identical maps, so ``R ≤ √(N K (K − 1) + 10⁻⁵)``.
* (D4) temporal attention per model: ``ε_{t,k} = u_kᵀ x̂_{t,k} + c_k``,
  ``τ_{t,k} = exp(ε_{t,k}) / Σ_{t'} exp(ε_{t',k})`` (softmax over frames).
* (D5) clip feature: ``v = [x_1; …; x_K]`` with ``x_k = Σ_t τ_{t,k} x̂_{t,k}`` (size ``K·d``; an
  optional FC + BN maps it to ``embedding_dim``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import TINY, EmbeddingHead, ReidModel, ReidOutput, check_non_negative_float, check_positive_int

__all__ = ["DRSTA", "diversity_regularizer"]

_SQRT_FLOOR = 1e-12
"""Floor under attention weights before the square root of (D3), keeping its gradient finite."""

RELEASED_EPSILON = 1e-5
"""Added under the outer square root of (D3) in the released code (keeps the gradient finite at 0)."""


def diversity_regularizer(attention: torch.Tensor) -> torch.Tensor:
    """Diversity regulariser (D3) in the released form: ``√(Σ ‖Q Qᵀ − I‖_F² + 10⁻⁵)``, ``Q = √attention``.

    Args:
        attention: ``float32 [..., K, L]`` attention maps, each row a distribution over the ``L``
            locations (non-negative, summing to 1); the leading dimensions (clips, frames) are the
            ``N`` frames summed over.

    Returns:
        ``float32`` scalar: the square root of the sum over all leading indices of
        ``‖Q Qᵀ − I‖_F²`` plus ``10⁻⁵``; ``√10⁻⁵`` for maps with disjoint supports,
        ``√(N K (K − 1) + 10⁻⁵)`` (its maximum) for ``N`` frames of ``K`` identical maps.
    """
    q = attention.clamp_min(_SQRT_FLOOR).sqrt()  # [..., K, L]
    gram = q @ q.transpose(-1, -2)  # [..., K, K]
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return ((gram - eye).square().sum() + RELEASED_EPSILON).sqrt()


class DRSTA(ReidModel):
    """Diversity-regularised spatiotemporal attention (Li et al., CVPR 2018); see the module docstring.

    Args:
        backbone: Backbone name (the paper uses ResNet-50).
        pretrained: Load offline ImageNet weights into the backbone.
        last_stride: 2 (default; output stride 32: the paper's 8×4 maps on 256×128 crops) or 1
            (16×8 maps).
        num_models: ``K``, the number of spatial attention models (paper: 6).
        attention_dim: Hidden size of each spatial attention model (``W_k`` in D1).
        region_dim: ``d``, size of the L2-normalised region features of (D2) (released code: 128).
        embedding_dim: ``None`` (default): no FC, the embedding is the concatenation of the ``K``
            pooled region features (size ``K·d``). An int adds ``Linear`` + ``BatchNorm1d``.
        reg_weight: Weight of the diversity regulariser (D3) returned by :meth:`forward_train` in
            training mode (1, as released).

    Attributes:
        embedding_dim: ``K·d`` (768 with ``K = 6``, ``d = 128``) or ``embedding_dim``.

    Raises:
        ValueError: If an argument is invalid.
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        pretrained: bool = True,
        last_stride: int = 2,
        num_models: int = 6,
        attention_dim: int = 256,
        region_dim: int = 128,
        embedding_dim: int | None = None,
        reg_weight: float = 1.0,
    ) -> None:
        num_models = check_positive_int(num_models, "num_models")
        attention_dim = check_positive_int(attention_dim, "attention_dim")
        region_dim = check_positive_int(region_dim, "region_dim")
        reg_weight = check_non_negative_float(reg_weight, "reg_weight")
        super().__init__(
            dict(
                backbone=backbone,
                pretrained=pretrained,
                last_stride=last_stride,
                num_models=num_models,
                attention_dim=attention_dim,
                region_dim=region_dim,
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
        self.region_fc = nn.Linear(c, region_dim)  # (D2) W_x, b_x, shared by the K models
        # (D4): one linear scorer per model.
        self.temporal_weight = nn.Parameter(torch.empty(num_models, region_dim))
        self.temporal_bias = nn.Parameter(torch.zeros(num_models))
        nn.init.normal_(self.temporal_weight, std=region_dim**-0.5)
        self.head = EmbeddingHead(num_models * region_dim, embedding_dim)
        self.embedding_dim = self.head.out_dim
        self.add_neck()

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

    def region_features(self, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """L2-normalised region features (D2).

        Args:
            f: ``float32 [B, T, C, h, w]`` backbone maps.
            s: ``float32 [B, T, K, h·w]`` spatial attention (D1).

        Returns:
            ``float32 [B, T, K, d]`` with unit L2 norm per region (an all-zero region stays zero).
        """
        regions = torch.einsum("btkl,btcl->btkc", s, f.flatten(3))  # [B, T, K, C]
        return F.normalize(self.region_fc(regions), dim=-1, eps=TINY)

    def forward_train(self, x: torch.Tensor) -> ReidOutput:
        """See :meth:`ReidModel.forward_train`.

        In training mode the regulariser is ``reg_weight · R`` (D3) over the ``B·T`` frames of the batch.
        """
        f = self.frame_features(x)  # [B, T, C, h, w]
        s = self.spatial_attention(f)  # [B, T, K, L]
        regions = self.region_features(f, s)  # (D2) [B, T, K, d]
        scores = torch.einsum("btkd,kd->btk", regions, self.temporal_weight) + self.temporal_bias
        tau = scores.softmax(dim=1)  # (D4) over frames
        pooled = torch.einsum("btk,btkd->bkd", tau, regions)  # [B, K, d]
        features = self.head(pooled.flatten(1))  # (D5)
        if self.training and self.reg_weight > 0:
            reg = self.reg_weight * diversity_regularizer(s)
        else:
            reg = self.zero(features)
        return ReidOutput(features, reg)
