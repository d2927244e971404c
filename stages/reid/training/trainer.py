"""Training of the video re-id networks: identity + batch-hard triplet losses on P x K batches.

Every network of :mod:`stages.reid.models` is trained the same way (``reidstream train``):

* **Batches**: :class:`~stages.reid.training.sampling.PKSampler` draws ``P`` identities x ``K`` tracklets;
  each tracklet gives one clip of ``T`` frames (``"restricted"`` random sampling by default, Li et
  al. CVPR 2018), augmented clip-consistently (:class:`~stages.reid.training.sampling.ClipAugment`), as
  ``float32 [P*K, T, 3, H, W]`` normalised **RGB**.
* **Identity loss**: softmax cross-entropy of a linear classifier (no bias) applied after a
  batch-norm "neck" on the clip features (Luo et al., "Bag of Tricks and a Strong Baseline for Deep
  Person Re-identification", CVPRW 2019), optionally with label smoothing (Szegedy et al.,
  "Rethinking the Inception Architecture for Computer Vision", CVPR 2016):
  ``L_id = CE(W · BN(f), y)``. The neck belongs to the model (``model.neck``) and the retrieval
  embedding is taken after it, ``forward(x) = BN(f) / ‖BN(f)‖`` (Luo et al.'s inference feature);
  only the classifier is training-only (:class:`TrainingHead`).
* **Triplet loss**: batch-hard triplet loss (Hermans, Beyer, Leibe, "In Defense of the Triplet Loss
  for Person Re-Identification", arXiv 1703.07737, 2017, Eq. 5) on the un-normalised features ``f``
  with Euclidean distance ``D``: for every anchor ``a`` of the batch,
  ``L_tri = mean_a [m + max_{p: y_p = y_a} D(a, p) - min_{n: y_n != y_a} D(a, n)]_+``, or the soft
  margin ``log(1 + exp(·))`` (their Eq. 6) when ``margin`` is None.
* **Regulariser**: each model's own term from ``forward_train`` (STA's inter-frame regulariser,
  DRSTA's diversity regulariser...), already weighted by the model.
* **Verification loss** (Siamese SGRU only, optional): the pair score of
  :meth:`~stages.reid.models.siamese_sgru.SiameseSGRU.similarity` (co-attention conditioned on the
  partner clip) trained with a binary cross-entropy on one positive and one negative pair per clip of
  the P x K batch, ``L_ver = BCE(s · sim(a, b) + c, [y_a = y_b])`` with a learned scale ``s`` and bias
  ``c`` (Wu et al., IEEE TMM 2018, train their Siamese network with a pair loss plus identity losses).
  The backbone runs once per clip; the pair embeddings reuse its region features.
  RCN (McLaughlin et al., CVPR 2016) was trained in its paper with a Siamese contrastive loss; here
  it gets the same identity + triplet losses as the other networks (batch-hard triplets are the
  stronger form of that pair loss).

Total: ``L = w_id L_id + w_tri L_tri + Reg + w_ver L_ver``. Optimiser Adam with weight decay; the
learning rate follows a per-epoch schedule (linear warm-up from 10 % of the rate, by default over 10
epochs as in Luo et al. but at most a quarter of the run, then ``step`` decays by ``gamma`` at the
given epochs, or ``cosine`` annealing to 1 % of the base rate). Mixed precision
(float16 autocast + gradient scaling) is used on CUDA only.

Outputs in ``output_dir`` (written every epoch):

* ``last.pt``: the checkpoint of the last finished epoch (:func:`~stages.reid.checkpoint.save_checkpoint`
  format: model name, config, T, input size, ``dataset`` {spec, split, options}, ``epoch``,
  ``metrics``, ``optimizer``, ``scheduler``, ``num_classes``, ``extra`` = {classifier (head state),
  scaler, history, best_mAP, train_config, rng});
* ``best.pt``: the checkpoint with the highest query/gallery mAP (only when the data set has a query
  and a gallery and evaluation is on);
* ``history.json``: ``{"epochs": [...], "steps": [...]}`` (losses, learning rate, accuracy, metrics);
* ``loss.png`` and ``metrics.png``: loss and mAP / Rank-1 curves (matplotlib, Agg backend).

Example:
    >>> cfg = TrainConfig(model="sta", data="mars:/data/mars", output_dir=Path("runs/sta"), epochs=60)
    >>> result = train(cfg)  # doctest: +SKIP
    >>> result.best_metrics["mAP"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.reid.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "Trainer",
    "TrainingHead",
    "batch_hard_triplet_loss",
    "plot_history",
    "train",
]

Scheduler = Literal["step", "cosine"]
TRAIN_SAMPLING = ("random", "restricted", "evenly")
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
HISTORY_FILE = "history.json"


# --------------------------------------------------------------------------------------------------
# configuration
@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (``reidstream train`` builds it from its options).

    Attributes:
        model: Registry name (``sta``, ``drsta``, ``siamese_sgru``, ``conv_attention``, ``rcn``,
            ``temporal_pool``, ``part_pool``).
        data: Data set spec, ``"name:/path"`` (see :func:`stages.reid.training.datasets.load_dataset`).
        output_dir: Directory of checkpoints, history and plots (created).
        epochs: Total number of epochs (a resumed run continues up to this number).
        backbone: Backbone name (``mobilenet_v2``, ``efficientnet_lite0``, ``resnet50``).
        pretrained: Start from the backbone's ImageNet weights.
        model_options: Other constructor keyword arguments of the model (e.g. ``num_parts``).
        seq_len: ``T``, frames per training clip.
        input_size: ``(height, width)`` pixels of the network input.
        sampling: Temporal sampling of training clips: ``"restricted"``, ``"random"`` or ``"evenly"``.
        augment: Clip-consistent flip / colour jitter / random erasing.
        p: Identities per batch.
        k: Tracklets per identity (batch-hard mining needs ``k >= 2``).
        lr: Base learning rate of Adam.
        weight_decay: L2 weight decay of Adam.
        scheduler: ``"step"`` or ``"cosine"`` (per epoch).
        lr_steps: Epochs (1-based) after which the ``step`` schedule multiplies the rate by
            ``gamma``; None: after 50 % and 75 % of ``epochs``.
        gamma: Decay factor of the ``step`` schedule.
        warmup_epochs: Epochs of linear warm-up from 10 % of ``lr`` (0: none; None: the default of
            :func:`default_warmup_epochs`, 10 epochs but at most ``epochs // 4``).
        label_smoothing: Label smoothing ``ε`` of the identity loss, in ``[0, 1)``.
        triplet_margin: Margin ``m`` of the triplet loss (distance units of the features), or None
            for the soft margin.
        id_weight: Weight ``w_id`` of the identity loss.
        triplet_weight: Weight ``w_tri`` of the triplet loss.
        verification_weight: Weight ``w_ver`` of the pair verification loss; used only by models with
            a pair score (``siamese_sgru``), 0 disables it.
        amp: Mixed precision on CUDA (ignored on CPU).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        num_workers: DataLoader worker processes.
        max_steps_per_epoch: Stop each epoch after this many batches (None: the whole epoch).
        eval_every: Evaluate on query/gallery every this many epochs and after the last one (0: never).
        eval_sampling: Test-time sampling, ``"all"`` (chunks of T, mean) or ``"evenly"``.
        eval_batch_size: Clips per forward pass at evaluation.
        split: Split index for iLIDS-VID / PRID-2011 (None: split 0, or the resumed checkpoint's).
        dataset_options: Extra keyword arguments of the data set loader (e.g. ``holdout_fraction``
            and ``seed`` of ``tracklets``); a resumed run starts from the checkpoint's own options
            when the data spec is the same, and these update them.
        seed: Seed of torch's generator (weights of new layers, augmentation) and of the sampler.
        resume: Checkpoint (``last.pt``) to continue from.

    Raises:
        ValueError: A value is out of range (the message names the field).
    """

    model: str
    data: str
    output_dir: Path
    epochs: int = 60
    backbone: str = "mobilenet_v2"
    pretrained: bool = True
    model_options: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 8
    input_size: tuple[int, int] = (256, 128)
    sampling: str = "restricted"
    augment: bool = True
    p: int = 8
    k: int = 4
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    scheduler: Scheduler = "step"
    lr_steps: tuple[int, ...] | None = None
    gamma: float = 0.1
    warmup_epochs: int | None = None
    label_smoothing: float = 0.1
    triplet_margin: float | None = 0.3
    id_weight: float = 1.0
    triplet_weight: float = 1.0
    verification_weight: float = 1.0
    amp: bool = True
    device: str = "auto"
    num_workers: int = 0
    max_steps_per_epoch: int | None = None
    eval_every: int = 1
    eval_sampling: str = "all"
    eval_batch_size: int = 16
    split: int | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    resume: Path | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")

        for name in ("epochs", "seq_len", "p", "k", "eval_batch_size"):
            positive(name)
        if self.max_steps_per_epoch is not None:
            positive("max_steps_per_epoch")
        for name in ("warmup_epochs", "eval_every", "num_workers"):
            value = getattr(self, name)
            if name == "warmup_epochs" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        if len(self.input_size) != 2 or any(int(v) != v or v < 1 for v in self.input_size):
            raise ValueError(f"TrainConfig.input_size must be (height, width) positive ints, got {self.input_size!r}")
        if self.sampling not in TRAIN_SAMPLING:
            raise ValueError(f"TrainConfig.sampling must be one of {TRAIN_SAMPLING}, got {self.sampling!r}")
        if self.eval_sampling not in ("all", "evenly"):
            raise ValueError(f"TrainConfig.eval_sampling must be 'all' or 'evenly', got {self.eval_sampling!r}")
        if self.scheduler not in ("step", "cosine"):
            raise ValueError(f"TrainConfig.scheduler must be 'step' or 'cosine', got {self.scheduler!r}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 < self.gamma <= 1:
            raise ValueError(
                f"TrainConfig needs lr > 0, weight_decay >= 0 and 0 < gamma <= 1, got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, gamma={self.gamma}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"TrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.triplet_margin is not None and self.triplet_margin < 0:
            raise ValueError(
                f"TrainConfig.triplet_margin must be >= 0 or None (soft margin), got {self.triplet_margin}"
            )
        for name in ("id_weight", "triplet_weight", "verification_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_steps is not None and any(int(s) != s or s < 1 for s in self.lr_steps):
            raise ValueError(f"TrainConfig.lr_steps must be epochs >= 1, got {self.lr_steps!r}")

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict of the fields (paths as str, tuples as lists)."""
        out = dataclasses.asdict(self)
        out["output_dir"] = str(self.output_dir)
        out["resume"] = None if self.resume is None else str(self.resume)
        out["input_size"] = list(self.input_size)
        out["lr_steps"] = None if self.lr_steps is None else list(self.lr_steps)
        return out


class EpochSchedule:
    """Learning-rate factor of an epoch (for :class:`torch.optim.lr_scheduler.LambdaLR`, picklable).

    Args:
        kind: ``"step"`` or ``"cosine"``.
        epochs: Total epochs.
        warmup_epochs: Linear warm-up epochs, from 0.1 to 1.
        lr_steps: 1-based epochs after which ``step`` multiplies the rate by ``gamma``.
        gamma: Step decay factor.
    """

    def __init__(self, kind: str, epochs: int, warmup_epochs: int, lr_steps: Sequence[int], gamma: float) -> None:
        self.kind = kind
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.lr_steps = tuple(int(s) for s in lr_steps)
        self.gamma = gamma

    def __call__(self, index: int) -> float:
        """Factor of the 0-based epoch ``index`` (epoch ``index + 1``)."""
        if index < self.warmup_epochs:
            return 0.1 + 0.9 * index / self.warmup_epochs
        if self.kind == "cosine":
            span = max(1, self.epochs - self.warmup_epochs)
            progress = min(1.0, (index - self.warmup_epochs) / span)
            return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.gamma ** sum(1 for s in self.lr_steps if index >= s)


def default_warmup_epochs(epochs: int) -> int:
    """Default warm-up: 10 epochs (Luo et al., CVPRW 2019: 10 of 120), at most a quarter of ``epochs``."""
    return min(10, epochs // 4)


def default_lr_steps(epochs: int) -> tuple[int, ...]:
    """Decay epochs of the ``step`` schedule when none are given: after 50 % and 75 % of training."""
    return tuple(sorted({s for s in (round(0.5 * epochs), round(0.75 * epochs)) if 1 <= s < epochs}))


# --------------------------------------------------------------------------------------------------
# losses
@dataclass(frozen=True)
class TripletStats:
    """Batch-hard triplet loss and its diagnostics.

    Attributes:
        loss: Scalar tensor (differentiable).
        active: Fraction of anchors with a non-zero hinge (``nan`` with the soft margin).
        positive: Mean hardest-positive distance.
        negative: Mean hardest-negative distance.
    """

    loss: torch.Tensor
    active: float
    positive: float
    negative: float


def batch_hard_triplet_loss(features: torch.Tensor, pids: torch.Tensor, margin: float | None = 0.3) -> TripletStats:
    """Batch-hard triplet loss (Hermans, Beyer, Leibe, arXiv 1703.07737, 2017, Eqs. 5 and 6).

    For every anchor ``a``: ``[m + max_p D(a, p) - min_n D(a, n)]_+`` over positives ``p != a`` with
    the anchor's pid and negatives ``n`` with another pid, ``D`` the Euclidean distance; the mean over
    anchors. With ``margin=None`` the hinge is replaced by the soft margin ``softplus(·)``. Anchors
    without a positive or without a negative in the batch are left out.

    Args:
        features: ``float32 [B, D]`` un-normalised features.
        pids: ``int64 [B]`` identity labels.
        margin: ``m >= 0``, or None for the soft margin.

    Returns:
        :class:`TripletStats`; the loss is ``0.`` (still attached to the graph) when no anchor is valid.

    Raises:
        ValueError: ``features`` is not 2-D or ``pids`` has another length.

    Example:
        >>> f = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
        >>> round(batch_hard_triplet_loss(f, torch.tensor([0, 0, 1, 1]), 0.3).loss.item(), 3)
        0.075
    """
    if features.dim() != 2 or pids.dim() != 1 or features.shape[0] != pids.shape[0]:
        raise ValueError(f"features must be [B, D] and pids [B], got {tuple(features.shape)} and {tuple(pids.shape)}")
    f = features.float()
    sq = (f * f).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * f @ f.T).clamp_min(1e-12).sqrt()
    same = pids[:, None] == pids[None, :]
    eye = torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    if not bool(valid.any()):
        zero = features.sum() * 0.0
        return TripletStats(zero, 0.0, float("nan"), float("nan"))
    hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).amax(dim=1)[valid]
    hardest_neg = dist.masked_fill(~neg_mask, float("inf")).amin(dim=1)[valid]
    gap = hardest_pos - hardest_neg
    if margin is None:
        losses = F.softplus(gap)
        active = float("nan")
    else:
        losses = F.relu(gap + margin)
        active = float((losses > 0).float().mean())
    return TripletStats(losses.mean(), active, float(hardest_pos.detach().mean()), float(hardest_neg.detach().mean()))


class TrainingHead(nn.Module):
    """Training-only layers: identity classifier and the verification affine map.

    The classifier is a bias-free ``Linear`` initialised with ``N(0, 0.001²)``, applied to the
    model's BN-neck output ``model.neck(features)`` (the neck, a ``BatchNorm1d`` with its shift
    frozen at 0, lives in the model so that retrieval uses the same normalised features). The verification map turns a pair
    similarity ``sim ∈ [-1, 1]`` into a logit ``s · sim + c`` (``s`` initialised to 5, ``c`` to 0).

    Args:
        in_dim: Feature size ``D``.
        num_classes: Training identities.

    Raises:
        ValueError: Non-positive sizes.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ValueError(f"in_dim and num_classes must be >= 1, got {in_dim}, {num_classes}")
        self.classifier = nn.Linear(in_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.verification_scale = nn.Parameter(torch.tensor(5.0))
        self.verification_bias = nn.Parameter(torch.tensor(0.0))

    def forward(self, necked: torch.Tensor) -> torch.Tensor:
        """Identity logits ``float32 [B, num_classes]`` of BN-neck features ``float32 [B, D]``."""
        return self.classifier(necked)

    def verification_logits(self, similarity: torch.Tensor) -> torch.Tensor:
        """Logits ``s · sim + c`` of pair similarities ``float32 [N]``."""
        return self.verification_scale * similarity + self.verification_bias


def _pick_partners(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a bool ``[B, B]`` mask with a True entry, one True column drawn uniformly.

    Returns:
        ``(rows, columns)``, ``int64 [N]`` each.
    """
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    if len(rows) == 0:
        return rows, rows
    cols = torch.multinomial(mask[rows].float(), 1).flatten()
    return rows, cols


def has_pair_score(model: nn.Module) -> bool:
    """Whether ``model`` exposes the Siamese SGRU pair interface (``regions``, ``context``, ``encode``)."""
    return all(callable(getattr(model, name, None)) for name in ("regions", "context", "encode", "similarity"))


def siamese_forward(
    model: nn.Module, x: torch.Tensor, pids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features and pair similarities of a P x K batch for a Siamese SGRU, with one backbone pass.

    The clip features are ``encode(v, context(v))`` (what ``forward_train`` returns); each clip is then
    paired with one random other clip of its identity (target 1) and one of another identity
    (target 0), and the pair score is Eq. (W6) of the model: the cosine of the two clips' features,
    each conditioned on the other's context.

    Args:
        model: A :class:`~stages.reid.models.siamese_sgru.SiameseSGRU`.
        x: ``float32 [B, T, 3, H, W]`` normalised RGB clips.
        pids: ``int64 [B]`` labels.

    Returns:
        ``(features float32 [B, d], similarity float32 [N], target float32 [N])``.
    """
    v = model.regions(x)
    ctx = model.context(v)
    features = model.encode(v, ctx)
    same = pids[:, None] == pids[None, :]
    eye = torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    pos_a, pos_b = _pick_partners(same & ~eye)
    neg_a, neg_b = _pick_partners(~same)
    a = torch.cat([pos_a, neg_a])
    b = torch.cat([pos_b, neg_b])
    target = torch.cat([torch.ones(len(pos_a)), torch.zeros(len(neg_a))]).to(x.device)
    if len(a) == 0:
        return features, features.new_zeros(0), target
    za = model.encode(v[a], ctx[b])
    zb = model.encode(v[b], ctx[a])
    return features, F.cosine_similarity(za, zb, dim=1), target


# --------------------------------------------------------------------------------------------------
# progress and results
class TrainProgress(Protocol):
    """Callbacks a front end (the CLI's progress bar) receives; all optional to act on."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, epoch: int, step: int, stats: dict[str, float]) -> None: ...

    def evaluating(self, epoch: int, clips: int) -> None: ...

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None: ...


class NullProgress:
    """A :class:`TrainProgress` that ignores everything."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        """Ignore."""

    def step(self, epoch: int, step: int, stats: dict[str, float]) -> None:
        """Ignore."""

    def evaluating(self, epoch: int, clips: int) -> None:
        """Ignore."""

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Ignore."""


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did.

    Attributes:
        output_dir: Where everything was written.
        last_checkpoint: ``last.pt``.
        best_checkpoint: ``best.pt``, or None when never evaluated.
        epochs_run: Epoch numbers trained in this call (empty when the resumed run was complete).
        history: The ``history.json`` content.
        best_metrics: Metrics of the best epoch (``mAP``, ``rank1``...), or None.
    """

    output_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    epochs_run: list[int]
    history: dict[str, list[dict[str, Any]]]
    best_metrics: dict[str, Any] | None


# --------------------------------------------------------------------------------------------------
# the trainer
class Trainer:
    """Builds data, model, head, optimiser and schedule from a :class:`TrainConfig` and runs epochs.

    Args:
        cfg: The run's configuration (``cfg.resume`` set: continue from that checkpoint).
        progress: Receiver of progress events (the CLI's progress bar), or None.

    Raises:
        ValueError: Bad data set spec, model name or options; fewer than ``p`` training identities.
        FileNotFoundError: Missing data set.
        CheckpointError: The resumed checkpoint is unreadable or disagrees with ``cfg`` (network,
            backbone, options, T, input size or number of identities).
    """

    def __init__(self, cfg: TrainConfig, progress: TrainProgress | None = None) -> None:
        from stages.reid.training.datasets import SPLIT_DATASETS, load_dataset
        from stages.reid.engines import resolve_device
        from stages.reid.models import build_model

        self.cfg = cfg
        self.progress: TrainProgress = progress or NullProgress()
        self.output_dir = Path(cfg.output_dir)
        self.device = torch.device(resolve_device(cfg.device))
        self.use_amp = bool(cfg.amp and self.device.type == "cuda")
        ckpt = read_checkpoint(cfg.resume) if cfg.resume is not None else None
        trained_on = (ckpt or {}).get("dataset") or {}
        same_data = trained_on.get("spec") == cfg.data
        # a resumed run keeps its data set's split and loader options unless told otherwise
        self.dataset_options = {**(trained_on.get("options") or {}), **cfg.dataset_options} if same_data \
            else dict(cfg.dataset_options)
        name = cfg.data.partition(":")[0].strip().lower()
        split = _first(cfg.split, trained_on.get("split") if same_data else None)
        if split is None and name in SPLIT_DATASETS:
            split = 0
        self.split = split
        self.dataset = load_dataset(cfg.data, split=split, **self.dataset_options)
        if len(self.dataset.train) == 0:
            raise ValueError(f"{cfg.data}: the data set has no training tracklets")
        if self.dataset.num_train_pids < cfg.p:
            raise ValueError(
                f"{cfg.data}: {self.dataset.num_train_pids} training identities, fewer than p={cfg.p}; lower --p"
            )
        if cfg.k < 2:
            log.warning("k=%d: batch-hard triplets need k >= 2 tracklets per identity; the triplet loss is 0", cfg.k)

        if ckpt is not None:
            self._check_resume(ckpt)
            model_kwargs = dict(ckpt["config"], pretrained=False)
        else:
            model_kwargs = dict(cfg.model_options, backbone=cfg.backbone, pretrained=cfg.pretrained)
        if ckpt is None:
            torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, **model_kwargs)
        self.head = TrainingHead(self.model.embedding_dim, self.dataset.num_train_pids)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["state_dict"])
            self.head.load_state_dict(ckpt["extra"]["classifier"])
        self.model.to(self.device)
        self.head.to(self.device)
        self.pair_loss = cfg.verification_weight > 0 and has_pair_score(self.model)

        params = [p for p in [*self.model.parameters(), *self.head.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.lr_steps if cfg.lr_steps is not None else default_lr_steps(cfg.epochs)
        warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else default_warmup_epochs(cfg.epochs)
        self.schedule = EpochSchedule(cfg.scheduler, cfg.epochs, warmup, steps, cfg.gamma)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

        self.history: dict[str, list[dict[str, Any]]] = {"epochs": [], "steps": []}
        self.best_map = float("-inf")
        self.best_metrics: dict[str, Any] | None = None
        self.start_epoch = 1
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            # restore the epoch counter and base rates, but keep this run's schedule (its total epochs may
            # be larger than the checkpoint's): LambdaLR would otherwise copy the old schedule's fields
            sched_state = {k: v for k, v in ckpt["scheduler"].items() if k != "lr_lambdas"}
            self.scheduler.load_state_dict({**sched_state, "lr_lambdas": [None] * len(self.optimizer.param_groups)})
            factor = self.schedule(self.scheduler.last_epoch)
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * factor
            extra = ckpt["extra"]
            if extra.get("scaler"):
                self.scaler.load_state_dict(extra["scaler"])
            self.history = extra.get("history", self.history)
            self.best_map = extra.get("best_mAP", self.best_map)
            self.best_metrics = extra.get("best_metrics")
            if "rng" in extra:
                torch.set_rng_state(extra["rng"])
            self.start_epoch = int(ckpt["epoch"]) + 1
            log.info("resuming %s from %s at epoch %d", cfg.model, cfg.resume, self.start_epoch)

        self.loader = self._train_loader()
        self.has_test = bool(self.dataset.query) and bool(self.dataset.gallery)

    # ----------------------------------------------------------------------------------------------
    def _check_resume(self, ckpt: dict[str, Any]) -> None:
        cfg = self.cfg
        problems = []
        if ckpt["model"] != cfg.model:
            problems.append(f"network {ckpt['model']!r} but the run says {cfg.model!r}")
        if int(ckpt["seq_len"]) != cfg.seq_len:
            problems.append(f"T={ckpt['seq_len']} but the run says seq_len={cfg.seq_len}")
        if list(ckpt["input_size"]) != list(cfg.input_size):
            problems.append(f"input size {ckpt['input_size']} but the run says {list(cfg.input_size)}")
        config = ckpt["config"]
        if config.get("backbone") != cfg.backbone:
            problems.append(f"backbone {config.get('backbone')!r} but the run says {cfg.backbone!r}")
        for key, value in cfg.model_options.items():
            if key in config and config[key] != value:
                problems.append(f"option {key}={config[key]!r} but the run says {value!r}")
        if ckpt.get("num_classes") != self.dataset.num_train_pids:
            problems.append(
                f"{ckpt.get('num_classes')} training identities but {cfg.data} has {self.dataset.num_train_pids}"
            )
        if "optimizer" not in ckpt or "scheduler" not in ckpt or "classifier" not in ckpt.get("extra", {}):
            problems.append("no optimizer/scheduler/classifier state (not a training checkpoint)")
        if problems:
            raise CheckpointError(f"{cfg.resume}: cannot resume: " + "; ".join(problems))
        data = ckpt.get("dataset") or {}
        if data.get("spec") != cfg.data or data.get("split") != self.split:
            log.warning("resuming on %s (split %s); the checkpoint was trained on %s (split %s)", cfg.data,
                        self.split, data.get("spec"), data.get("split"))

    def _train_loader(self) -> torch.utils.data.DataLoader:
        from stages.reid.training.sampling import ClipAugment, PKSampler, TrackletDataset

        cfg = self.cfg
        augment = ClipAugment() if cfg.augment else ClipAugment.none()
        data = TrackletDataset(self.dataset.train, cfg.seq_len, cfg.sampling, cfg.input_size, self.model.mean,
                               self.model.std, train=True, augment=augment, flow=self.model.config.get("flow"))
        self.sampler = PKSampler(self.dataset.train, cfg.p, cfg.k, seed=cfg.seed)
        return torch.utils.data.DataLoader(data, batch_size=self.sampler.batch_size, sampler=self.sampler,
                                           drop_last=True, num_workers=cfg.num_workers,
                                           pin_memory=self.device.type == "cuda",
                                           persistent_workers=False)

    # ----------------------------------------------------------------------------------------------
    def train_step(self, clips: torch.Tensor, pids: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch.

        Args:
            clips: ``float32 [B, T, 3, H, W]`` normalised RGB clips.
            pids: ``int64 [B]`` training labels in ``0..num_classes-1``.

        Returns:
            Floats ``loss``, ``id_loss``, ``triplet_loss``, ``regularizer``, ``verification_loss``,
            ``accuracy`` (identity classifier, in [0, 1]), ``triplet_active``, ``lr``.

        Raises:
            FloatingPointError: The loss is not finite.
        """
        cfg = self.cfg
        self.model.train()
        self.head.train()
        clips = clips.to(self.device, non_blocking=True)
        pids = pids.to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            if self.pair_loss:
                features, similarity, target = siamese_forward(self.model, clips, pids)
                regularizer = features.new_zeros(())
            else:
                out = self.model.forward_train(clips)
                features, regularizer = out.features, out.regularizer
                similarity = target = None
        features = features.float()
        logits = self.head(self.model.neck(features))
        id_loss = F.cross_entropy(logits, pids, label_smoothing=cfg.label_smoothing)
        triplet = batch_hard_triplet_loss(features, pids, cfg.triplet_margin)
        loss = cfg.id_weight * id_loss + cfg.triplet_weight * triplet.loss + regularizer.float()
        verification = features.new_zeros(())
        if similarity is not None and len(similarity):
            verification = F.binary_cross_entropy_with_logits(
                self.head.verification_logits(similarity.float()), target)
            loss = loss + cfg.verification_weight * verification
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss (id {id_loss.item():.4g}, triplet {triplet.loss.item():.4g}, "
                f"reg {float(regularizer):.4g}); lower --lr"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {
            "loss": float(loss.detach()),
            "id_loss": float(id_loss.detach()),
            "triplet_loss": float(triplet.loss.detach()),
            "regularizer": float(regularizer.detach()),
            "verification_loss": float(verification.detach()),
            "accuracy": float((logits.argmax(dim=1) == pids).float().mean()),
            "triplet_active": triplet.active,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Run one epoch (at most ``max_steps_per_epoch`` batches).

        Args:
            epoch: 1-based epoch number (selects the sampler's schedule).

        Returns:
            The epoch's record: mean of each step statistic, ``epoch``, ``steps``, ``seconds``, ``lr``.
        """
        cfg = self.cfg
        self.sampler.set_epoch(epoch)
        steps = len(self.sampler.batches(epoch))
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, cfg.max_steps_per_epoch)
        self.progress.start_epoch(epoch, cfg.epochs, steps)
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        done = 0
        for clips, pids, _camids in self.loader:
            stats = self.train_step(clips, pids)
            done += 1
            for key, value in stats.items():
                if not math.isnan(value):
                    sums[key] = sums.get(key, 0.0) + value
            global_step = len(self.history["steps"]) + 1
            self.history["steps"].append({"epoch": epoch, "step": done, "global_step": global_step, **stats})
            self.progress.step(epoch, done, stats)
            if done >= steps:
                break
        record: dict[str, Any] = {key: value / max(done, 1) for key, value in sums.items()}
        record.update(epoch=epoch, steps=done, seconds=time.perf_counter() - t0,
                      lr=float(self.optimizer.param_groups[0]["lr"]))
        self.scheduler.step()
        return record

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Query/gallery metrics of the current model (see :func:`stages.reid.training.evaluate.evaluate_model`)."""
        from stages.reid.training.evaluate import evaluate_model

        cfg = self.cfg
        self.progress.evaluating(epoch, len(self.dataset.query) + len(self.dataset.gallery))
        result = evaluate_model(self.model, self.dataset.query, self.dataset.gallery, cfg.seq_len, cfg.input_size,
                                sampling=cfg.eval_sampling, batch_size=cfg.eval_batch_size, device=str(self.device),
                                num_workers=cfg.num_workers)
        return result.as_dict()

    def _save(self, path: Path, epoch: int, metrics: dict[str, Any] | None) -> Path:
        cfg = self.cfg
        extra = {
            "classifier": self.head.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else None,
            "history": self.history,
            "best_mAP": self.best_map,
            "best_metrics": self.best_metrics,
            "train_config": cfg.to_json(),
            "rng": torch.get_rng_state(),
        }
        return save_checkpoint(
            path, cfg.model, self.model, cfg.seq_len, cfg.input_size,
            dataset={"spec": cfg.data, "split": self.split, "options": dict(self.dataset_options)},
            epoch=epoch, metrics=metrics, optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), num_classes=self.dataset.num_train_pids, extra=extra,
        )

    def fit(self) -> TrainResult:
        """Train from ``start_epoch`` to ``cfg.epochs``, checkpointing and plotting every epoch.

        Returns:
            :class:`TrainResult`.

        Raises:
            FloatingPointError: The loss diverged.
        """
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        last = self.output_dir / LAST_CHECKPOINT
        best = self.output_dir / BEST_CHECKPOINT
        epochs_run: list[int] = []
        log.info("training %s (%s) on %s: %d train tracklets, %d identities, T=%d, %dx%d, P=%d K=%d, %s, amp=%s",
                 cfg.model, self.model.config.get("backbone"), cfg.data, len(self.dataset.train),
                 self.dataset.num_train_pids, cfg.seq_len, cfg.input_size[0], cfg.input_size[1], cfg.p, cfg.k,
                 self.device, self.use_amp)
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            record = self.train_epoch(epoch)
            metrics = None
            if self.has_test and cfg.eval_every and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                metrics = self.evaluate(epoch)
                record["metrics"] = {k: v for k, v in metrics.items() if k != "cmc"}
            self.history["epochs"].append(record)
            if metrics is not None and metrics["mAP"] > self.best_map:
                self.best_map = float(metrics["mAP"])
                self.best_metrics = dict(metrics)
                self._save(best, epoch, metrics)
            self._save(last, epoch, metrics)
            self._write_history()
            epochs_run.append(epoch)
            self.progress.end_epoch(epoch, record)
        if not epochs_run:
            log.info("nothing to do: the checkpoint already finished epoch %d of %d", self.start_epoch - 1, cfg.epochs)
            if not last.is_file():
                self._save(last, self.start_epoch - 1, None)
            self._write_history()
        return TrainResult(self.output_dir, last, best if best.is_file() else None, epochs_run, self.history,
                           self.best_metrics)

    def _write_history(self) -> None:
        path = self.output_dir / HISTORY_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.history, indent=1, default=_json_default), encoding="utf-8")
        tmp.replace(path)
        plot_history(self.history, self.output_dir)


def _first(*values: Any) -> Any:
    """The first value that is not None (None when all are)."""
    return next((v for v in values if v is not None), None)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _save_figure(fig: Any, ax: Any, path: Path) -> Path:
    """Grid, legend and tight layout on ``ax``, then write ``fig`` to ``path`` (PNG, 100 dpi)."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_history(history: dict[str, list[dict[str, Any]]], output_dir: Path) -> list[Path]:
    """Write ``loss.png`` (per-step total and component losses) and ``metrics.png`` (mAP, Rank-1 per epoch).

    Uses matplotlib's object API with the Agg canvas (never ``pyplot``), so no global backend is set.

    Args:
        history: ``{"epochs": [...], "steps": [...]}`` as in ``history.json``.
        output_dir: Destination directory.

    Returns:
        The files written (``metrics.png`` only when some epoch has metrics).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas for PNG
    from matplotlib.ticker import MaxNLocator

    written: list[Path] = []
    steps = history.get("steps", [])
    if steps:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        x = [s["global_step"] for s in steps]
        for key, style in (("loss", "-"), ("id_loss", "--"), ("triplet_loss", ":"), ("regularizer", "-."),
                           ("verification_loss", "-.")):
            values = [s.get(key, float("nan")) for s in steps]
            if key != "loss" and not any(v for v in values if not math.isnan(v)):
                continue
            ax.plot(x, values, style, label=key, linewidth=1.5 if key == "loss" else 1.0)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
        written.append(_save_figure(fig, ax, output_dir / "loss.png"))
    evaluated = [e for e in history.get("epochs", []) if e.get("metrics")]
    if evaluated:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        x = [e["epoch"] for e in evaluated]
        for key in ("mAP", "rank1", "rank5"):
            if all(key in e["metrics"] for e in evaluated):
                ax.plot(x, [e["metrics"][key] for e in evaluated], "o-", label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.set_title("query / gallery metrics")
        written.append(_save_figure(fig, ax, output_dir / "metrics.png"))
    return written


def train(cfg: TrainConfig, progress: TrainProgress | None = None) -> TrainResult:
    """Train a re-id network (see the module docstring); the Python entry point of ``reidstream train``.

    Args:
        cfg: The run's configuration.
        progress: Receiver of progress events, or None.

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: Bad configuration, data set spec or model options.
        FileNotFoundError: Missing data set.
        CheckpointError: A ``resume`` checkpoint that does not fit the run.
        stages.reid.backbones.WeightsUnavailableError: Pretrained weights are missing.
        FloatingPointError: The loss diverged.
    """
    return Trainer(cfg, progress).fit()
