"""Video-based convolutional attention with an Attentive ConvLSTM.

M. Zamprogno, M. Passon, N. Martinel, G. Serra, G. Lancioni, C. Micheloni, C. Tasso, G. L. Foresti,
"Video-Based Convolutional Attention for Person Re-Identification", ICIAP 2019 (arXiv 1910.04856).
The attention module is the Attentive ConvLSTM of M. Cornia, L. Baraldi, G. Serra, R. Cucchiara,
"Predicting Human Eye Fixations via an LSTM-based Saliency Attentive Model", IEEE TIP 2018 (SAM).
As in SAM, the Attentive ConvLSTM refines the attention on the *same* map for ``S`` steps (SAM: 4)
and its hidden state is the module's output; here it does so for every frame in turn, and the state
left by frame ``t - 1`` is the starting state of frame ``t`` (our reading of the joint frame- and
video-level processing of Zamprogno et al.).

Equations (labels ours; ``*`` is convolution, ``⊙`` element-wise product, ``M = num_filters``,
``s = 1..S`` the refinement step):

* (C1) ``X_t = ReLU(W_r * f_t)``: backbone map ``f_t ∈ R^{C×h×w}`` reduced to ``c_h`` channels (1×1).
* (C2) ``Z_{t,s} = V_a * tanh(W_a * X_t + U_a * H_{t,s-1} + b_a) ∈ R^{M×h×w}`` and
  ``A_{t,s,m} = softmax_{h×w}(Z_{t,s,m})``. ``V_a`` is a 3×3 convolution initialised to zero (as in
  SAM), so the first attention is uniform.
* (C3) ``X̃_{t,s} = ((1/M) Σ_m A_{t,s,m}) ⊙ X_t`` (SAM's product, no rescaling).
* (C4) ConvLSTM on ``X̃_{t,s}``: ``[I; F; O; G] = W * [X̃_{t,s}; H_{t,s-1}] + b``,
  ``C_{t,s} = σ(F) ⊙ C_{t,s-1} + σ(I) ⊙ tanh(G)``, ``H_{t,s} = σ(O) ⊙ tanh(C_{t,s})``, with
  ``H_{1,0} = C_{1,0} = 0`` and ``(H_{t,0}, C_{t,0}) = (H_{t-1,S}, C_{t-1,S})``.
* (C5) frame descriptor: the attentive model's output and the attended backbone features of the last
  step, ``d_t = [GAP(H_{t,S}); Σ_l A_{t,S,1}(l) f_t(l); …; Σ_l A_{t,S,M}(l) f_t(l)] ∈ R^{c_h + M·C}``.
* (C6) clip descriptor: temporal average ``v = FC((1/T) Σ_t d_t)`` (FC optional), L2-normalised by
  :meth:`ReidModel.forward`.

The paper trains it as a Siamese network; here it returns one embedding per clip, compared by cosine
similarity.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import EmbeddingHead, ReidModel, ReidOutput, check_positive_int

__all__ = ["ConvAttention"]


class ConvAttention(ReidModel):
    """Attentive-ConvLSTM spatio-temporal attention (Zamprogno et al., 2019); see the module docstring.

    Args:
        backbone: Backbone name.
        pretrained: Load offline ImageNet weights into the backbone.
        last_stride: 1 (output stride 16) or 2 (output stride 32).
        num_filters: ``M``, attention maps per step (filters of ``V_a`` in C2; paper's best: 3).
        hidden_channels: ``c_h``, channels of the reduced features and ConvLSTM state.
        kernel_size: Odd kernel size of the attention (``W_a``, ``U_a``, ``V_a``) and ConvLSTM
            convolutions (SAM: 3).
        steps: ``S``, refinement steps per frame (SAM: 4).
        embedding_dim: ``None`` (default): no FC, the embedding is the temporal mean of ``d_t``
            (size ``c_h + M·C``). An int adds ``Linear`` + ``BatchNorm1d`` to that size.

    Attributes:
        embedding_dim: ``c_h + M·C`` (128 + 3·1280 = 3968 with ``mobilenet_v2``) or ``embedding_dim``.

    Raises:
        ValueError: If an argument is invalid.
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        pretrained: bool = True,
        last_stride: int = 1,
        num_filters: int = 3,
        hidden_channels: int = 128,
        kernel_size: int = 3,
        steps: int = 4,
        embedding_dim: int | None = None,
    ) -> None:
        num_filters = check_positive_int(num_filters, "num_filters")
        hidden_channels = check_positive_int(hidden_channels, "hidden_channels")
        kernel_size = check_positive_int(kernel_size, "kernel_size")
        steps = check_positive_int(steps, "steps")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(
            dict(
                backbone=backbone,
                pretrained=pretrained,
                last_stride=last_stride,
                num_filters=num_filters,
                hidden_channels=hidden_channels,
                kernel_size=kernel_size,
                steps=steps,
                embedding_dim=embedding_dim,
            )
        )
        c, ch, pad = self.backbone.out_channels, hidden_channels, kernel_size // 2
        self.num_filters = num_filters
        self.hidden_channels = hidden_channels
        self.steps = steps
        self.reduce = nn.Sequential(nn.Conv2d(c, ch, kernel_size=1), nn.ReLU(inplace=True))  # (C1)
        self.att_input = nn.Conv2d(ch, ch, kernel_size, padding=pad)  # W_a, b_a
        self.att_state = nn.Conv2d(ch, ch, kernel_size, padding=pad, bias=False)  # U_a
        self.att_out = nn.Conv2d(ch, num_filters, kernel_size, padding=pad, bias=False)  # V_a
        nn.init.zeros_(self.att_out.weight)
        self.gates = nn.Conv2d(2 * ch, 4 * ch, kernel_size, padding=pad)  # (C4)
        self.head = EmbeddingHead(ch + num_filters * c, embedding_dim)
        self.embedding_dim = self.head.out_dim
        self.add_neck()

    def refine(
        self, xt: torch.Tensor, state: torch.Tensor, cell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``S`` refinement steps of the Attentive ConvLSTM on one map, Eqs. (C2)–(C4).

        Args:
            xt: ``float32 [B, c_h, h, w]`` reduced frame map ``X_t`` (C1).
            state: ``float32 [B, c_h, h, w]`` hidden state ``H`` before the first step.
            cell: ``float32 [B, c_h, h, w]`` memory ``C`` before the first step.

        Returns:
            ``(H, C, A)`` after step ``S``: ``H``, ``C`` ``float32 [B, c_h, h, w]`` and the last
            attention ``A`` ``float32 [B, M, h·w]`` (each row a distribution over the locations).
        """
        att = xt.new_zeros(0)
        for _ in range(self.steps):
            z = self.att_out(torch.tanh(self.att_input(xt) + self.att_state(state)))  # (C2)
            att = z.flatten(2).softmax(dim=-1)  # [B, M, L]
            weight = att.mean(dim=1).reshape_as(xt[:, :1])  # (C3) [B, 1, h, w]
            i, fg, o, g = self.gates(torch.cat([weight * xt, state], dim=1)).chunk(4, dim=1)  # (C4)
            cell = torch.sigmoid(fg) * cell + torch.sigmoid(i) * torch.tanh(g)
            state = torch.sigmoid(o) * torch.tanh(cell)
        return state, cell, att

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Run the Attentive ConvLSTM over the frames and return each frame's last attention maps.

        Args:
            x: ``float32 [B, T, 3, H, W]`` normalised RGB clips.

        Returns:
            ``float32 [B, T, M, h·w]``; each ``[b, t, m]`` is a distribution over the locations.

        Raises:
            ValueError: If ``x`` is not a clip batch.
        """
        return self._run(self.frame_features(x))[1]

    def _run(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. (C1)–(C5) over ``f`` ``[B, T, C, h, w]``; returns ``(d [B, T, c_h + M·C], A [B, T, M, L])``."""
        b, t = f.shape[0], f.shape[1]
        reduced = self.reduce(f.flatten(0, 1))  # (C1) [B·T, c_h, h, w]
        reduced = reduced.reshape(b, t, *reduced.shape[1:])
        state = torch.zeros_like(reduced[:, 0])
        cell = torch.zeros_like(state)
        descriptors, maps = [], []
        for step in range(t):
            state, cell, att = self.refine(reduced[:, step], state, cell)
            pooled = torch.einsum("bml,bcl->bmc", att, f[:, step].flatten(2))  # (C5) [B, M, C]
            descriptors.append(torch.cat([state.mean(dim=(2, 3)), pooled.flatten(1)], dim=1))
            maps.append(att)
        return torch.stack(descriptors, dim=1), torch.stack(maps, dim=1)

    def forward_train(self, x: torch.Tensor) -> ReidOutput:
        """See :meth:`ReidModel.forward_train`; the regulariser is always 0."""
        descriptors, _ = self._run(self.frame_features(x))
        features = self.head(descriptors.mean(dim=1))  # (C6)
        return ReidOutput(features, self.zero(features))
