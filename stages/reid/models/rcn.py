"""Recurrent convolutional network (RCN) for video re-id.

* N. McLaughlin, J. Martinez del Rincon, P. Miller, "Recurrent Convolutional Network for
  Video-based Person Re-Identification", CVPR 2016.
* L. Wu, C. Shen, A. van den Hengel, "Deep Recurrent Convolutional Networks for Video-based Person
  Re-identification: An End-to-End Approach", arXiv 1606.01609, 2016 (GRU variant).

Per-frame CNN features feed a recurrent layer whose outputs are averaged over time. Equations
(labels ours; McLaughlin et al. Sec. 3):

* (R1) ``a_t = W_f GAP(f_t) + b_f``: per-frame feature (backbone map ``f_t``, then a linear layer).
* (R2) ``o_t = W_i a_t + W_s r_{t-1}``, ``r_t = tanh(o_t)``, ``r_0 = 0`` (``cell="rnn"``; the pooled
  quantity is the pre-activation output ``o_t`` as in the paper). With ``cell="gru"`` (Wu et al.)
  ``o_t`` is the hidden state of a gated recurrent unit.
* (R3) temporal average pooling: ``v = (1/T) Σ_t o_t``.

Training (not in this module): the network is trained as a Siamese pair of weight-sharing branches
with a contrastive loss on the pair distance plus an identity (softmax) loss on each branch. The
paper's optical-flow input channels are not used; frames are RGB.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ReidModel, ReidOutput, check_positive_int

__all__ = ["RCN"]

_CELLS = ("rnn", "gru")


class RCN(ReidModel):
    """Recurrent convolutional network with temporal average pooling; see the module docstring.

    Args:
        backbone: Backbone name.
        pretrained: Load offline ImageNet weights into the backbone.
        last_stride: 1 (output stride 16) or 2 (output stride 32).
        hidden_size: Size ``e`` of the recurrent layer and of the embedding (McLaughlin et al.: 128).
        cell: ``"rnn"`` (McLaughlin et al., Eq. R2) or ``"gru"`` (Wu et al.).

    Attributes:
        embedding_dim: ``hidden_size``.

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
    ) -> None:
        hidden_size = check_positive_int(hidden_size, "hidden_size")
        if cell not in _CELLS:
            raise ValueError(f"cell must be one of {', '.join(_CELLS)}, got {cell!r}")
        super().__init__(
            dict(
                backbone=backbone,
                pretrained=pretrained,
                last_stride=last_stride,
                hidden_size=hidden_size,
                cell=cell,
            )
        )
        self.cell = cell
        self.hidden_size = hidden_size
        self.frame_fc = nn.Linear(self.backbone.out_channels, hidden_size)  # (R1)
        if cell == "gru":
            self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        else:
            self.input_proj = nn.Linear(hidden_size, hidden_size)  # W_i (with bias)
            self.state_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # W_s
        self.embedding_dim = hidden_size

    def forward_train(self, x: torch.Tensor) -> ReidOutput:
        """See :meth:`ReidModel.forward_train`; the regulariser is always 0."""
        f = self.frame_features(x)  # [B, T, C, h, w]
        a = self.frame_fc(f.mean(dim=(3, 4)))  # (R1) [B, T, e]
        if self.cell == "gru":
            outputs, _ = self.gru(a)  # [B, T, e]
        else:
            drive = self.input_proj(a)  # W_i a_t for all t at once
            state = torch.zeros_like(drive[:, 0])
            steps = []
            for t in range(drive.shape[1]):  # (R2)
                o = drive[:, t] + self.state_proj(state)
                state = torch.tanh(o)
                steps.append(o)
            outputs = torch.stack(steps, dim=1)
        features = outputs.mean(dim=1)  # (R3)
        return ReidOutput(features, self.zero(features))
