"""STA: spatial-temporal attention for video re-id.

Y. Fu, X. Wang, Y. Wei, T. Huang, "STA: Spatial-Temporal Attention for Large-Scale Video-based
Person Re-Identification", AAAI 2019 (arXiv 1811.04129).

The attention is parameter-free: it is read off the backbone maps, so the network adds no weights
except an optional final FC. Notation (equation labels (S1)–(S7) are ours and follow the paper's
order; the paper's own numbering may differ):

* ``f_t ∈ R^{C×h×w}``: backbone map of frame ``t = 1..T``; ``f_t(i, j) ∈ R^C`` its feature at row
  ``i``, column ``j``.
* (S1) spatial attention, the squared channel-wise L2 norm of each location's feature (its sum of
  squares over the ``C`` channels) normalised over the frame:
  ``g_t(i, j) = ‖f_t(i, j)‖₂² / Σ_{i', j'} ‖f_t(i', j')‖₂²`` (the paper's Eq. 1).
* (S2) the map is split into ``K`` horizontal parts ``P_1..P_K`` (top to bottom); part score
  ``s_{t,k} = Σ_{(i,j) ∈ P_k} g_t(i, j)``.
* (S3) part-wise L1 normalisation across frames, giving the 2-D attention score matrix
  ``S(t, k) = s_{t,k} / Σ_{t'} s_{t',k}`` (each column sums to 1 over the T frames).
* (S4) feature fusion, highest-score map: ``F1|_{P_k} = f_{t*_k}|_{P_k}``, ``t*_k = argmax_t S(t, k)``.
* (S5) feature fusion, weighted map: ``F2|_{P_k} = Σ_t S(t, k) f_t|_{P_k}``.
* (S6) clip feature: ``v = BN(FC([GAP(F1); GAP(F2)]))`` (``GAP``: global average pooling over the
  ``h × w`` map; the paper concatenates F1, F2 along channels then pools, which is the same vector;
  the FC to 1024 + batch norm is on by default, ``embedding_dim=None`` removes it).
* (S7) inter-frame regularisation: ``Reg = ‖g_i − g_j‖_F`` for two different frames ``i, j`` drawn at
  random from the clip; the training loss is ``L = L_triplet + L_softmax + λ Reg``.

The eval path has no data-dependent Python control flow (the argmax of S4 is a tensor gather through
a one-hot mask), so the model exports to ONNX with a dynamic batch axis.
"""

from __future__ import annotations

import torch

from .base import (
    TINY,
    EmbeddingHead,
    ReidModel,
    ReidOutput,
    check_non_negative_float,
    check_positive_int,
    part_masks,
)

__all__ = ["STA", "inter_frame_regularizer", "spatial_attention"]


def spatial_attention(f: torch.Tensor) -> torch.Tensor:
    """Spatial attention maps, Eq. (S1): squared channel norm per location, L1-normalised per map.

    Args:
        f: ``float32 [..., C, h, w]`` feature maps.

    Returns:
        ``float32 [..., h, w]`` non-negative maps; each sums to 1 over ``h × w`` (an all-zero map
        stays zero).
    """
    energy = f.square().sum(dim=-3)  # [..., h, w]: squared L2 norm of each location's feature
    return energy / energy.sum(dim=(-2, -1), keepdim=True).clamp_min(TINY)


def inter_frame_regularizer(
    attention: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> torch.Tensor:
    """Inter-frame regularisation, Eq. (S7): ``mean_b ‖g_{b,first_b} − g_{b,second_b}‖_F``.

    Args:
        attention: ``float32 [B, T, h, w]`` spatial attention maps ``g`` (Eq. S1).
        first: ``int64 [B]`` frame index ``i`` per clip, in ``[0, T)``.
        second: ``int64 [B]`` frame index ``j`` per clip, in ``[0, T)``.

    Returns:
        ``float32`` scalar ≥ 0; 0 exactly when the two chosen maps are equal in every clip. Its
        gradient at 0 is 0 (not NaN).
    """
    batch = torch.arange(attention.shape[0], device=attention.device)
    diff = attention[batch, first] - attention[batch, second]  # [B, h, w]
    return torch.linalg.vector_norm(diff.flatten(1), dim=1).mean()


class STA(ReidModel):
    """Spatial-temporal attention network (Fu et al., AAAI 2019); see the module docstring.

    Args:
        backbone: Backbone name (the paper uses ``resnet50`` with ``last_stride=1``).
        pretrained: Load offline ImageNet weights into the backbone.
        last_stride: 1 (output stride 16: 256×128 → 16×8 maps, as in the paper) or 2.
        num_parts: ``K``, horizontal parts per map (paper: 4). The map needs at least ``K`` rows.
        embedding_dim: Size of the paper's FC after fusion (``Linear`` + ``BatchNorm1d``; default
            1024). ``None``: no FC, the embedding is ``[GAP(F1); GAP(F2)]`` of size ``2C``.
        reg_weight: ``λ``, weight of the inter-frame regulariser (S7) returned by
            :meth:`forward_train` in training mode (1, as in the paper's loss).

    Attributes:
        embedding_dim: The given ``embedding_dim``, or ``2C`` (2560 with ``mobilenet_v2``) without FC.

    Raises:
        ValueError: If an argument is invalid.

    Example:
        >>> model = STA(pretrained=False).eval()
        >>> model(torch.rand(2, 8, 3, 256, 128)).shape
        torch.Size([2, 1024])
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        pretrained: bool = True,
        last_stride: int = 1,
        num_parts: int = 4,
        embedding_dim: int | None = 1024,
        reg_weight: float = 1.0,
    ) -> None:
        num_parts = check_positive_int(num_parts, "num_parts")
        reg_weight = check_non_negative_float(reg_weight, "reg_weight")
        super().__init__(
            dict(
                backbone=backbone,
                pretrained=pretrained,
                last_stride=last_stride,
                num_parts=num_parts,
                embedding_dim=embedding_dim,
                reg_weight=reg_weight,
            )
        )
        self.num_parts = num_parts
        self.reg_weight = reg_weight
        self.head = EmbeddingHead(2 * self.backbone.out_channels, embedding_dim)
        self.embedding_dim = self.head.out_dim
        self.add_neck()

    def attention_scores(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Spatial maps and the 2-D attention score matrix, Eqs. (S1)–(S3).

        Args:
            f: ``float32 [B, T, C, h, w]`` backbone maps.

        Returns:
            ``(g, S, masks)``: ``g`` ``float32 [B, T, h, w]`` spatial attention; ``S`` ``float32
            [B, T, K]`` scores, each ``S[b, :, k]`` summing to 1; ``masks`` ``[K, h]`` row-to-part
            assignment (see :func:`~stages.reid.models.base.part_masks`).

        Raises:
            ValueError: If the map has fewer than ``K`` rows.
        """
        g = spatial_attention(f)  # (S1)
        masks = part_masks(g.shape[2], self.num_parts, g.device, g.dtype)
        s = torch.einsum("bthw,kh->btk", g, masks)  # (S2)
        scores = s / s.sum(dim=1, keepdim=True).clamp_min(TINY)  # (S3)
        return g, scores, masks

    def forward_train(self, x: torch.Tensor) -> ReidOutput:
        """See :meth:`ReidModel.forward_train`.

        In training mode with ``T ≥ 2`` the regulariser is ``λ · Reg`` (S7) with a fresh random pair
        of distinct frames per clip; it is 0 in eval mode and for ``T = 1``.
        """
        f = self.frame_features(x)  # [B, T, C, h, w]
        t, h = f.shape[1], f.shape[3]
        g, scores, masks = self.attention_scores(f)
        rows = f.mean(dim=4)  # [B, T, C, h]: column means, so GAP = mean over rows below
        # (S4) one-hot over frames of the best frame per part; argmax is not differentiable, the
        # selected features are.
        best = scores.argmax(dim=1)  # [B, K]
        frames = torch.arange(t, device=f.device).view(1, t, 1)
        pick = (frames == best.unsqueeze(1)).to(f.dtype)  # [B, T, K]
        # per-row frame weights of F1 and F2, then GAP (S6) as a weighted row mean
        w1 = torch.einsum("btk,kh->bth", pick, masks)
        w2 = torch.einsum("btk,kh->bth", scores, masks)  # (S5)
        gap1 = torch.einsum("bth,btch->bc", w1, rows) / h
        gap2 = torch.einsum("bth,btch->bc", w2, rows) / h
        features = self.head(torch.cat([gap1, gap2], dim=1))
        if self.training and t > 1 and self.reg_weight > 0:
            b = f.shape[0]
            first = torch.randint(0, t, (b,), device=f.device)
            second = (first + torch.randint(1, t, (b,), device=f.device)) % t  # distinct frame
            reg = self.reg_weight * inter_frame_regularizer(g, first, second)
        else:
            reg = self.zero(features)
        return ReidOutput(features, reg)
