"""Unsupervised adaptation to a site's cameras (``reidstream adapt``): pseudo-identities, then training.

Cluster-contrast style (after Dai et al., "Cluster Contrast for Unsupervised Person
Re-Identification", 2021, and the pseudo-label loop of Fan et al., "Unsupervised Person
Re-identification: Clustering and Fine-tuning", TOMM 2018), with the matcher's own association as the
clustering:

1. Mine tracklets from the configured cameras (``reidstream mine``), or take mined folders.
2. Round ``r``: embed every tracklet (round 0 with the configured zero-shot model, later rounds with
   the network of round ``r - 1``), calibrate the threshold label-free on them and cluster them with the
   matcher's rules (cannot-links, constrained average linkage, learned hand-off gaps):
   :mod:`stages.matcher.offline`. Clusters of at least ``min_cluster`` tracklets become
   pseudo-identities; the others are left out of the round (outliers).
3. Train the chosen seed network (STA by default) on the pseudo-identities with the existing losses
   (:mod:`stages.reid.training.trainer`: identity loss on a BN-neck + batch-hard triplet + the
   model's regulariser), from its ImageNet backbone.
4. After the last round: ``OUTPUT/model.pt`` (the checkpoint), ``OUTPUT/model.calibration.json``
   (+ ``.png``, the label-free calibration of the adapted embeddings), ``OUTPUT/adapt.json`` (what
   each round did) and ``OUTPUT/overrides.json`` (the ``REIDSTREAM__*`` settings that serve them). The
   pipeline loads them by path: ``reid.model.checkpoint`` and ``matcher.calibration`` (see
   :func:`pipeline_overrides`); ``reidstream demo`` picks up ``services.data_dir/adapted/<namespace>``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config

log = logging.getLogger(__name__)

__all__ = ["AdaptConfig", "AdaptResult", "adapt", "pipeline_overrides"]


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """Settings of :func:`adapt`.

    Attributes:
        output_dir: Where rounds, the checkpoint and the calibration go (created).
        tracklets: Mined tracklet folders to adapt on; None mines the configured cameras into
            ``output_dir/mined``.
        model: Seed network to train (``sta``, ``drsta``, ... see :mod:`stages.reid.models`).
        rounds: Cluster-then-train rounds, >= 1.
        epochs: Training epochs per round.
        seq_len: ``T`` of the adapted network (the pipeline serves it with the same ``T``).
        input_size: ``(height, width)`` pixels of the adapted network.
        p: Pseudo-identities per batch; k: tracklets per pseudo-identity in a batch.
        lr: Adam learning rate.
        max_steps_per_epoch: Batches per epoch at most (None: all).
        min_cluster: Tracklets a cluster needs to become a pseudo-identity (>= 2).
        crops: Crops per tracklet when mining.
        model_options: Extra constructor arguments of the network.
        seed: Seed of training.
        holdout: Fraction of the tracklets kept out of clustering and training, drawn exactly as the
            ``tracklets`` data set's held-out split with the same fraction and ``holdout_seed``, so
            ``reidstream evaluate --data tracklets:DIR --holdout F`` scores the adapted network on
            tracklets it never saw (0: adapt on everything).
        holdout_seed: Seed of that draw.
    """

    output_dir: Path
    tracklets: Path | None = None
    model: str = "sta"
    rounds: int = 2
    epochs: int = 6
    seq_len: int = 4
    input_size: tuple[int, int] = (128, 64)
    p: int = 8
    k: int = 2
    lr: float = 3.5e-4
    max_steps_per_epoch: int | None = 40
    min_cluster: int = 2
    crops: int = 16
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    holdout: float = 0.0
    holdout_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rounds", "epochs", "seq_len", "p", "k", "crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"AdaptConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"AdaptConfig.holdout must be in [0, 1), got {self.holdout}")
        if self.min_cluster < 2:
            raise ValueError(f"AdaptConfig.min_cluster must be >= 2, got {self.min_cluster}")


@dataclasses.dataclass(frozen=True)
class AdaptResult:
    """What :func:`adapt` wrote and did: ``checkpoint`` and ``calibration`` paths (None when the footage
    holds too few cannot-links to calibrate), and one dict per round
    (``pseudo_identities``, ``tracklets_used``, ``threshold``, ``train``: the last epoch's record)."""

    checkpoint: Path
    calibration: Path | None
    rounds: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "calibration": self.calibration and str(self.calibration),
                "rounds": self.rounds}


def _model_config(cfg: Config, acfg: AdaptConfig, checkpoint: Path) -> Config:
    """``cfg`` with the re-id model replaced by the adapted network at ``checkpoint``."""
    h, w = acfg.input_size
    model = cfg.reid.model.model_copy(update={
        "type": acfg.model, "checkpoint": checkpoint, "seq_len": acfg.seq_len, "input_height": h,
        "input_width": w, "options": dict(acfg.model_options), "pretrained": True})
    return cfg.model_copy(update={"reid": cfg.reid.model_copy(update={"model": model})})


def pipeline_overrides(result: AdaptResult, acfg: AdaptConfig) -> dict[str, str]:
    """``REIDSTREAM__*`` environment overrides that make a pipeline serve the adapted network with its
    calibration (the config file stays as it is)."""
    h, w = acfg.input_size
    env = {"REIDSTREAM__REID__MODEL__TYPE": acfg.model, "REIDSTREAM__REID__MODEL__CHECKPOINT": str(result.checkpoint),
           "REIDSTREAM__REID__MODEL__SEQ_LEN": str(acfg.seq_len), "REIDSTREAM__REID__MODEL__INPUT_HEIGHT": str(h),
           "REIDSTREAM__REID__MODEL__INPUT_WIDTH": str(w),
           "REIDSTREAM__REID__MODEL__OPTIONS": json.dumps(acfg.model_options)}
    if result.calibration is not None:
        env["REIDSTREAM__MATCHER__CALIBRATION"] = str(result.calibration)
    return env


def _write_pseudo_labels(src: Path, dst: Path, ids: tuple[str, ...], labels: np.ndarray, min_cluster: int) -> int:
    """Tracklet folders of ``src`` re-labelled with their cluster as ``pid`` in ``dst`` (crops are
    linked, not copied); clusters smaller than ``min_cluster`` are left out. Returns the number of
    pseudo-identities."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    sizes = np.bincount(labels)
    keep = sorted(int(c) for c in np.flatnonzero(sizes >= min_cluster))
    pid_of = {c: i for i, c in enumerate(keep)}
    for tid, lab in zip(ids, labels):
        if int(lab) not in pid_of:
            continue
        folder = dst / tid
        folder.mkdir()
        meta = json.loads((src / tid / "meta.json").read_text())
        meta["pid"] = pid_of[int(lab)]
        for i in range(len(meta["frames"])):
            os.symlink((src / tid / f"{i:03d}.jpg").resolve(), folder / f"{i:03d}.jpg")
        (folder / "meta.json").write_text(json.dumps(meta))
    return len(keep)


def _held_out(root: Path, acfg: AdaptConfig) -> set[str]:
    """Tracklet ids of the ``tracklets`` data set's held-out split (query and gallery halves)."""
    from stages.reid.training.datasets.tracklets import load_tracklets

    ds = load_tracklets(root, holdout_fraction=acfg.holdout, seed=acfg.holdout_seed)
    held = {Path(item.paths[0]).parent.name for item in (*ds.query, *ds.gallery)}
    log.info("adapt: %d of the tracklets held out for evaluation", len(held))
    return held


def adapt(cfg: Config, acfg: AdaptConfig, progress: Any = None) -> AdaptResult:
    """Adapt a seed network to the configured cameras without labels (see the module docstring).

    Args:
        cfg: The pipeline config (cameras, the zero-shot re-id model of round 0, the matcher rules).
        acfg: Adaptation settings.
        progress: A :class:`stages.reid.training.trainer.TrainProgress` for the training bars, or None.

    Returns:
        The :class:`AdaptResult`.

    Raises:
        FileNotFoundError: ``acfg.tracklets`` holds no tracklet folder.
        ValueError: A round found fewer than 2 pseudo-identities (too little footage to adapt on).
    """
    from stages.matcher.calibration import CalibrationError, write_calibration
    from stages.matcher.offline import calibrate_set, cluster_set, embed_folders
    from stages.reid.training.trainer import TrainConfig, train

    out = Path(acfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = acfg.tracklets
    if root is None:
        from stages.reid.training.mine import mine

        root = out / "mined"
        mine(cfg, root, crops=acfg.crops, append=True)
    root = Path(root)
    held = _held_out(root, acfg) if acfg.holdout > 0 else set()
    ts = embed_folders(cfg, root).without(held)
    rounds: list[dict[str, Any]] = []
    checkpoint = None
    for r in range(acfg.rounds):
        try:
            threshold = calibrate_set(cfg, ts, source=f"adapt round {r}").threshold
        except CalibrationError as exc:
            threshold = cfg.matcher.threshold
            log.warning("adapt round %d: %s; clustering at matcher.threshold %.3f", r, exc, threshold)
        labels = cluster_set(cfg, ts, threshold)
        data = out / f"round{r}" / "data"
        n_ids = _write_pseudo_labels(root, data, ts.ids, labels, acfg.min_cluster)
        used = int(np.sum(np.bincount(labels)[labels] >= acfg.min_cluster))
        log.info("adapt round %d: %d pseudo-identities over %d of %d tracklets (threshold %.3f)", r, n_ids, used,
                 len(ts), threshold)
        if n_ids < 2:
            raise ValueError(f"adapt round {r}: only {n_ids} pseudo-identities in {len(ts)} tracklets; adapt on "
                             f"more footage (people must be seen by several cameras or several times)")
        tcfg = TrainConfig(model=acfg.model, data=f"tracklets:{data}", output_dir=out / f"round{r}",
                           epochs=acfg.epochs, seq_len=acfg.seq_len, input_size=acfg.input_size, p=min(acfg.p, n_ids),
                           k=acfg.k, lr=acfg.lr, scheduler="cosine", model_options=dict(acfg.model_options),
                           max_steps_per_epoch=acfg.max_steps_per_epoch, eval_every=0,
                           dataset_options={"holdout_fraction": 0.0}, seed=acfg.seed)
        result = train(tcfg, progress)
        checkpoint = Path(result.last_checkpoint)
        rounds.append({"round": r, "pseudo_identities": n_ids, "tracklets_used": used, "tracklets": len(ts),
                       "threshold": threshold, "checkpoint": str(checkpoint)})
        ts = embed_folders(_model_config(cfg, acfg, checkpoint), root).without(held)
    final = out / "model.pt"
    shutil.copyfile(checkpoint, final)
    adapted = _model_config(cfg, acfg, final)
    cal_path: Path | None = out / "model.calibration.json"
    try:
        cal = calibrate_set(adapted, ts, source=f"({acfg.model}, adapted)")
        write_calibration(cal, cal_path)
        final_threshold: float | None = cal.threshold
    except CalibrationError as exc:
        log.warning("adapt: no calibration of the adapted network (%s); the matcher keeps its threshold", exc)
        cal_path, final_threshold = None, None
    res = AdaptResult(final.resolve(), cal_path.resolve() if cal_path else None, rounds)
    (out / "overrides.json").write_text(json.dumps(pipeline_overrides(res, acfg), indent=1))
    (out / "adapt.json").write_text(json.dumps({**res.as_dict(), "final_threshold": final_threshold,
                                                "config": {k: str(v) for k, v in dataclasses.asdict(acfg).items()}},
                                               indent=1))
    return res
