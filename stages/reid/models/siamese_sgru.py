"""Siamese spatial-GRU attention network ("where and when to look") for video re-id.

L. Wu, Y. Wang, J. Gao, X. Li, "Where-and-When to Look: Deep Siamese Attention Networks for
Video-based Person Re-identification", IEEE Transactions on Multimedia 2018 (arXiv 1808.01911).

Local convolutional features of the horizontal regions of each frame are read, top to bottom, by a
spatial gated recurrent unit whose update gate is an attention weight ("where"); a temporal GRU and a
temporal attention over its outputs ("when") pool the frames. Both attentions are conditioned on a
context vector: the partner clip's summary when a pair is compared (:meth:`SiameseSGRU.pair_score`,
co-attention), the clip's own summary when a single clip is embedded for gallery search
(:meth:`SiameseSGRU.forward`). Retrieval therefore runs in two stages: the self-conditioned embedding
ranks the gallery, then the pair score, which is what the paper compares, re-ranks the top ``k``
(:func:`stages.reid.training.evaluate.pair_rerank`). The pair score needs only each clip's region
features ``float32 [T, R, d]`` (:meth:`SiameseSGRU.regions`), which can be cached beside the
embedding: a pair then costs two runs of the spatial and temporal GRUs, not of the backbone. This module is our reading of the paper's design, not a port of its
code; equation labels (W1)–(W6) are ours.

* (W1) local features: ``u_t = ReLU(W_u * f_t)`` (1×1 conv of the backbone map), region ``i = 1..R``
  feature ``v_{t,i}`` = mean of ``u_t`` over the rows of horizontal stripe ``i``.
* (W2) context of a clip: ``c = (1/(T R)) Σ_{t,i} v_{t,i}``.
* (W3) spatial attention given a context ``c'``:
  ``α_{t,i} = softmax_i(w_sᵀ tanh(W_s v_{t,i} + U_s c'))``.
* (W4) attention-gated spatial GRU over the regions (``h_{t,0} = 0``):
  ``ρ_i = σ(W_ρ v_{t,i} + U_ρ h_{t,i-1} + b_ρ)``,
  ``h̃_i = tanh(W_h v_{t,i} + ρ_i ⊙ (U_h h_{t,i-1}) + b_h)``,
  ``h_{t,i} = α_{t,i} h̃_i + (1 − α_{t,i}) h_{t,i-1}``; frame feature ``a_t = h_{t,R}``.
* (W5) temporal GRU ``o_t = GRU(a_t, o_{t-1})`` and temporal attention
  ``β_t = softmax_t(w_tᵀ tanh(W_t o_t + U_t c'))``; clip feature ``z = Σ_t β_t o_t``.
* (W6) pair score: ``sim(A, B) = cos(z_{A|c_B}, z_{B|c_A})`` in ``[-1, 1]``. It is symmetric,
  ``sim(A, B) = sim(B, A)``, because each clip is conditioned on the other's context and the cosine
  is symmetric.

Training (not in this module) follows the paper's Siamese setup: pairs embedded with
:meth:`SiameseSGRU.embed_pair`, a contrastive / verification loss on their similarity and an
identity loss on each branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ReidModel, ReidOutput, check_positive_int, part_masks, validate_clips

__all__ = ["SiameseSGRU"]


class _AdditiveAttention(nn.Module):
    """Scores ``wᵀ tanh(W v + U c)`` of items ``v [..., N, d]`` given a context ``c [B, d]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.item = nn.Linear(dim, dim)
        self.context = nn.Linear(dim, dim, bias=False)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, items: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Return softmax weights over the item axis (``-2``): ``[..., N]``.

        ``items`` is ``[B, ..., N, d]``; ``context`` ``[B, d]`` is broadcast over the middle axes.
        """
        ctx = self.context(context).reshape(context.shape[0], *([1] * (items.dim() - 2)), -1)
        return self.score(torch.tanh(self.item(items) + ctx)).squeeze(-1).softmax(dim=-1)


class SiameseSGRU(ReidModel):
    """Deep Siamese attention network with spatial GRUs (Wu et al., 2018); see the module docstring.

    Args:
        backbone: Backbone name.
        pretrained: Load offline ImageNet weights into the backbone.
        last_stride: 1 (output stride 16) or 2 (output stride 32).
        num_regions: ``R``, horizontal regions per frame (the map needs at least ``R`` rows).
        hidden_size: ``d``, size of the local features, GRU states and the embedding.

    Attributes:
        embedding_dim: ``hidden_size``.

    Raises:
        ValueError: If an argument is invalid.

    Example:
        >>> model = SiameseSGRU(pretrained=False).eval()
        >>> a, b = torch.rand(2, 4, 3, 256, 128), torch.rand(2, 6, 3, 256, 128)
        >>> model.similarity(a, b).shape
        torch.Size([2])
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        pretrained: bool = True,
        last_stride: int = 1,
        num_regions: int = 6,
        hidden_size: int = 256,
    ) -> None:
        num_regions = check_positive_int(num_regions, "num_regions")
        hidden_size = check_positive_int(hidden_size, "hidden_size")
        super().__init__(
            dict(
                backbone=backbone,
                pretrained=pretrained,
                last_stride=last_stride,
                num_regions=num_regions,
                hidden_size=hidden_size,
            )
        )
        d = hidden_size
        self.num_regions = num_regions
        self.local = nn.Sequential(
            nn.Conv2d(self.backbone.out_channels, d, kernel_size=1), nn.ReLU(inplace=True)
        )  # (W1)
        self.spatial_attention = _AdditiveAttention(d)  # (W3)
        self.reset_gate = nn.Linear(2 * d, d)  # W_ρ, U_ρ, b_ρ of (W4)
        self.candidate_input = nn.Linear(d, d)  # W_h, b_h
        self.candidate_state = nn.Linear(d, d, bias=False)  # U_h
        self.temporal_gru = nn.GRU(d, d, batch_first=True)  # (W5)
        self.temporal_attention = _AdditiveAttention(d)
        self.embedding_dim = d
        self.add_neck()

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        """Region features (W1).

        Args:
            x: ``float32 [B, T, 3, H, W]`` normalised RGB clips.

        Returns:
            ``float32 [B, T, R, d]``.

        Raises:
            ValueError: If ``x`` is not a clip batch or its map has fewer than ``R`` rows.
        """
        f = self.frame_features(x)
        u = self.local(f.flatten(0, 1)).mean(dim=3)  # [B·T, d, h]: mean over columns
        masks = part_masks(u.shape[-1], self.num_regions, u.device, u.dtype)
        masks = masks / masks.sum(dim=1, keepdim=True)
        v = torch.einsum("ndh,rh->nrd", u, masks)
        return v.reshape(f.shape[0], f.shape[1], self.num_regions, -1)

    @staticmethod
    def context(regions: torch.Tensor) -> torch.Tensor:
        """Clip context (W2): ``float32 [B, T, R, d] -> [B, d]``."""
        return regions.mean(dim=(1, 2))

    def encode(self, regions: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Attend over regions and frames given a context, Eqs. (W3)–(W5).

        Args:
            regions: ``float32 [B, T, R, d]`` region features of the clip.
            context: ``float32 [B, d]``: the partner's context (pairs) or the clip's own.

        Returns:
            ``float32 [B, d]`` clip feature ``z`` (not normalised).
        """
        alpha = self.spatial_attention(regions, context).unsqueeze(-1)  # (W3) [B, T, R, 1]
        state = torch.zeros_like(regions[:, :, 0])  # [B, T, d]
        for i in range(regions.shape[2]):  # (W4), regions top to bottom
            v = regions[:, :, i]
            rho = torch.sigmoid(self.reset_gate(torch.cat([v, state], dim=-1)))
            cand = torch.tanh(self.candidate_input(v) + rho * self.candidate_state(state))
            a = alpha[:, :, i]
            state = a * cand + (1 - a) * state
        outputs, _ = self.temporal_gru(state)  # (W5) [B, T, d]
        beta = self.temporal_attention(outputs, context)  # [B, T]
        return torch.einsum("bt,btd->bd", beta, outputs)

    def forward_train(self, x: torch.Tensor) -> ReidOutput:
        """Self-conditioned embedding for gallery search; the regulariser is always 0.

        See :meth:`ReidModel.forward_train`.
        """
        v = self.regions(x)
        features = self.encode(v, self.context(v))
        return ReidOutput(features, self.zero(features))

    def embed_with_regions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval embeddings and the region features to cache for :meth:`pair_score`, in one backbone pass.

        Args:
            x: ``float32 [B, T, 3, H, W]`` normalised RGB clips.

        Returns:
            ``(embeddings, regions)``: ``float32 [B, d]`` equal to ``forward(x)`` (L2-normalised,
            after the neck) and ``float32 [B, T, R, d]``.

        Raises:
            ValueError: If ``x`` is not a clip batch or its map has fewer than ``R`` rows.
        """
        v = self.regions(x)
        return F.normalize(self.neck(self.encode(v, self.context(v))), dim=1), v

    def pair_score(self, feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
        """Pair scores (W6) of clips given their cached region features.

        Args:
            feats_a: ``float32 [N, T_a, R, d]`` region features of the first clips
                (:meth:`regions`).
            feats_b: ``float32 [N, T_b, R, d]`` region features of their partners (``T_b`` may
                differ from ``T_a``; ``R`` and ``d`` must be the model's).

        Returns:
            ``float32 [N]`` ``cos(z_{a|c_b}, z_{b|c_a})`` in ``[-1, 1]``, symmetric:
            ``pair_score(a, b) == pair_score(b, a)``.

        Raises:
            ValueError: If the shapes are not ``[N, T, R, d]`` with equal ``N`` and the model's
                ``R``, ``d``.

        Example:
            >>> model = SiameseSGRU(pretrained=False).eval()
            >>> va = model.regions(torch.rand(3, 8, 3, 256, 128))  # cache these per tracklet
            >>> model.pair_score(va, va.flip(0)).shape
            torch.Size([3])
        """
        expected = (self.num_regions, self.embedding_dim)
        for name, v in (("feats_a", feats_a), ("feats_b", feats_b)):
            if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[2:]) != expected or v.shape[1] < 1:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{name} must be region features [N, T, {expected[0]}, {expected[1]}], got {shape}")
        if feats_a.shape[0] != feats_b.shape[0]:
            raise ValueError(f"feats_a and feats_b must hold the same number of clips, got "
                             f"{feats_a.shape[0]} and {feats_b.shape[0]}")
        za = self.encode(feats_a, self.context(feats_b))
        zb = self.encode(feats_b, self.context(feats_a))
        return F.cosine_similarity(za, zb, dim=1)

    def embed_pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Co-attended features of clip pairs, each conditioned on its partner (W6).

        Args:
            a: ``float32 [B, T_a, 3, H, W]`` normalised RGB clips.
            b: ``float32 [B, T_b, 3, H, W]`` normalised RGB clips (``T_b`` may differ from ``T_a``).

        Returns:
            ``(z_a, z_b)``, each ``float32 [B, d]``, not normalised.

        Raises:
            ValueError: If an input is not a clip batch or the batch sizes differ.
        """
        validate_clips(a, "a")
        validate_clips(b, "b")
        if a.shape[0] != b.shape[0]:
            raise ValueError(
                f"a and b must hold the same number of clips, got {a.shape[0]} and {b.shape[0]}"
            )
        va, vb = self.regions(a), self.regions(b)
        return self.encode(va, self.context(vb)), self.encode(vb, self.context(va))

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pair score with pair-conditioned attention, Eq. (W6).

        Args:
            a: ``float32 [B, T_a, 3, H, W]`` normalised RGB clips.
            b: ``float32 [B, T_b, 3, H, W]`` normalised RGB clips.

        Returns:
            ``float32 [B]`` cosine similarities in ``[-1, 1]``, differentiable, symmetric in ``a``
            and ``b``.

        Raises:
            ValueError: If an input is not a clip batch or the batch sizes differ.
        """
        validate_clips(a, "a")
        validate_clips(b, "b")
        if a.shape[0] != b.shape[0]:
            raise ValueError(
                f"a and b must hold the same number of clips, got {a.shape[0]} and {b.shape[0]}"
            )
        return self.pair_score(self.regions(a), self.regions(b))
