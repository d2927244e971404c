"""Recurrent convolutional network (RCN) for video re-id, and its convolutional-recurrent variant.

* N. McLaughlin, J. Martinez del Rincon, P. Miller, "Recurrent Convolutional Network for
  Video-based Person Re-Identification", CVPR 2016 (``cell="rnn"``).
* L. Wu, C. Shen, A. van den Hengel, "Deep Recurrent Convolutional Networks for Video-based Person
  Re-identification: An End-to-End Approach", arXiv 1606.01609, 2016 (``cell="convgru"``: a GRU whose
  products are convolutions, run over the feature maps, as in Ballas et al.'s GRU-RCN).

Per-frame CNN features feed a recurrent layer whose outputs are averaged over time. Equations
(labels ours; McLaughlin et al. Sec. 3):

* (R0) input: colour, optionally followed by the two optical-flow channels ``(dx, dy)`` of the frame
  (``flow="farneback"`` or ``"dis"``, computed with OpenCV by :mod:`stages.reid.models.flow`); the
  paper feeds 5 channels (YUV + flow). The ImageNet backbone's first convolution is widened to 5
  inputs with zero weights on the flow channels (:func:`~stages.reid.backbones.expand_input_channels`),
  so the flow starts with no influence and is learnt in training.
* (R1) ``a_t = W_f GAP(f_t) + b_f``: per-frame feature (backbone map ``f_t``, then a linear layer).
* (R2) ``o_t = W_i δ(a_t) + W_s δ(r_{t-1})``, ``r_t = tanh(o_t)``, ``r_0 = 0`` (``cell="rnn"``; the
  pooled quantity is the pre-activation output ``o_t`` as in the paper). ``δ`` is dropout with
  probability ``dropout`` (0.6 in the authors' released code, on the input and on the recurrent
  path), active in training only.
* (R2') ``cell="convgru"`` over the maps, ``X_t = δ(f_t)``:
  ``z_t = σ(W_z * X_t + U_z * H_{t-1})``, ``q_t = σ(W_q * X_t + U_q * H_{t-1})``,
  ``H̃_t = tanh(W_h * X_t + U_h * (q_t ⊙ δ(H_{t-1})))``, ``H_t = (1 − z_t) ⊙ H_{t-1} + z_t ⊙ H̃_t``,
  ``H_0 = 0`` (``*``: convolution; ``W_·`` 1×1 from the ``C`` backbone channels, ``U_·`` 3×3); the
  output is ``o_t = GAP(H_t)``. Wu et al. place recurrent convolutional layers at several depths of
  their own CNN; here there is one, on the last map of the ImageNet backbone.
* (R3) temporal average pooling: ``v = (1/T) Σ_t o_t``.

Training (not in this module): the paper trains a Siamese pair of weight-sharing branches with a
contrastive loss plus an identity loss; here the shared recipe (identity + batch-hard triplet) is used.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.reid.backbones import expand_input_channels

from .base import ReidModel, ReidOutput, check_positive_int
from .flow import check_flow_method

__all__ = ["RCN"]

_CELLS = ("rnn", "convgru")
FLOW_CHANNELS = 2


class RCN(ReidModel):
    """Recurrent convolutional network with temporal average pooling; see the module docstring.

    Args:
        backbone: Backbone name.
        pretrained: Load offline ImageNet weights into the backbone.
        last_stride: 1 (output stride 16) or 2 (output stride 32).
        hidden_size: Size ``e`` of the recurrent layer (channels of ``H_t`` for ``convgru``) and of
            the embedding (McLaughlin et al.: 128).
        cell: ``"rnn"`` (McLaughlin et al., Eq. R2) or ``"convgru"`` (Wu et al., Eq. R2').
        dropout: Dropout probability on the recurrent layer's input and recurrent path, in
            ``[0, 1)`` (released code: 0.6).
        flow: ``None`` (RGB frames, ``[B, T, 3, H, W]``), ``"farneback"`` or ``"dis"``: frames carry
            two optical-flow channels after RGB, ``[B, T, 5, H, W]`` (the method names how the
            preprocessing computes them; the network only sees the channels).

    Attributes:
        embedding_dim: ``hidden_size``.
        input_channels: 3, or 5 with ``flow``.

    Raises:
        ValueError: If an argument is invalid.
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        pretrained: bool = True,
        last_stride: int = 1,
        hidden_size: int = 128,
        cell: str = "rnn",
        dropout: float = 0.6,
        flow: str | None = None,
    ) -> None:
        hidden_size = check_positive_int(hidden_size, "hidden_size")
        if cell not in _CELLS:
            raise ValueError(f"cell must be one of {', '.join(_CELLS)}, got {cell!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        check_flow_method(flow)
        super().__init__(
            dict(
                backbone=backbone,
                pretrained=pretrained,
                last_stride=last_stride,
                hidden_size=hidden_size,
                cell=cell,
                dropout=float(dropout),
                flow=flow,
            )
        )
        if flow is not None:
            expand_input_channels(self.backbone, 3 + FLOW_CHANNELS)
        self.input_channels = self.backbone.in_channels
        self.cell = cell
        self.hidden_size = hidden_size
        c, e = self.backbone.out_channels, hidden_size
        self.input_dropout = nn.Dropout(dropout)
        self.state_dropout = nn.Dropout(dropout)
        if cell == "convgru":
            self.gates_input = nn.Conv2d(c, 3 * e, kernel_size=1)  # W_z, W_q, W_h (with biases)
            self.gates_state = nn.Conv2d(e, 2 * e, kernel_size=3, padding=1, bias=False)  # U_z, U_q
            self.candidate_state = nn.Conv2d(e, e, kernel_size=3, padding=1, bias=False)  # U_h
        else:
            self.frame_fc = nn.Linear(c, e)  # (R1)
            self.input_proj = nn.Linear(e, e)  # W_i (with bias)
            self.state_proj = nn.Linear(e, e, bias=False)  # W_s
        self.embedding_dim = e
        self.add_neck()

    def _rnn(self, f: torch.Tensor) -> torch.Tensor:
        """Eqs. (R1)–(R2): ``f [B, T, C, h, w]`` → outputs ``o [B, T, e]``."""
        a = self.frame_fc(f.mean(dim=(3, 4)))  # (R1) [B, T, e]
        drive = self.input_proj(self.input_dropout(a))  # W_i δ(a_t) for all t at once
        state = torch.zeros_like(drive[:, 0])
        steps = []
        for t in range(drive.shape[1]):  # (R2)
            o = drive[:, t] + self.state_proj(self.state_dropout(state))
            state = torch.tanh(o)
            steps.append(o)
        return torch.stack(steps, dim=1)

    def _convgru(self, f: torch.Tensor) -> torch.Tensor:
        """Eq. (R2'): ``f [B, T, C, h, w]`` → outputs ``o [B, T, e]``."""
        b, t = f.shape[0], f.shape[1]
        drive = self.gates_input(self.input_dropout(f.flatten(0, 1)))  # [B·T, 3e, h, w]
        drive = drive.reshape(b, t, *drive.shape[1:])
        state = torch.zeros_like(drive[:, 0, : self.hidden_size])
        steps = []
        for step in range(t):
            wz, wq, wh = drive[:, step].chunk(3, dim=1)
            uz, uq = self.gates_state(state).chunk(2, dim=1)
            z = torch.sigmoid(wz + uz)
            q = torch.sigmoid(wq + uq)
            cand = torch.tanh(wh + self.candidate_state(q * self.state_dropout(state)))
            state = (1 - z) * state + z * cand
            steps.append(state.mean(dim=(2, 3)))
        return torch.stack(steps, dim=1)

    def forward_train(self, x: torch.Tensor) -> ReidOutput:
        """See :meth:`ReidModel.forward_train`; the regulariser is always 0.

        ``x`` is ``float32 [B, T, 3, H, W]``, or ``[B, T, 5, H, W]`` (RGB + flow) with ``flow`` set.
        """
        f = self.frame_features(x)  # [B, T, C, h, w]
        outputs = self._convgru(f) if self.cell == "convgru" else self._rnn(f)
        features = outputs.mean(dim=1)  # (R3)
        return ReidOutput(features, self.zero(features))
