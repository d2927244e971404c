"""Standard evaluation of a re-id network on a data set's query and gallery (``reidstream evaluate``).

Steps:

1. **Embeddings.** Every query and gallery tracklet becomes one ``float32 [D]`` L2-normalised
   embedding, by one of two test-time samplings (``sampling``):

   * ``"all"`` (default, the usual video re-id protocol): all frames of the tracklet, cut into
     consecutive chunks of ``T`` frames (the last chunk padded by repeating its last frame, see
     :func:`stages.reid.training.sampling.chunk_indices`); each chunk is embedded by the network and the
     tracklet's embedding is the mean of its chunk embeddings, L2-normalised again.
   * ``"evenly"``: one clip of ``T`` evenly spaced frames, first and last included (what the
     streaming re-id stage feeds the network); cheaper, usually a little worse.

   Frames are read with OpenCV (BGR), resized to the network input, turned to RGB in [0, 1] and
   normalised with the network's mean / std (:class:`stages.reid.training.sampling.TrackletDataset`).
2. **Ranking.** Squared Euclidean distance between the unit embeddings (rank-equivalent to cosine),
   optionally k-reciprocal re-ranking (Zhong et al., CVPR 2017), and for a network with a pair score
   (Siamese SGRU) optionally pairwise re-ranking of each query's top ``k`` by that score
   (:func:`pair_rerank`, over region features cached with the embeddings); CMC Rank-1/5/10/20 and mAP with the
   protocol of :mod:`stages.reid.training.evaluation` (same pid *and* camera excluded, junk ignored), computed
   in chunks of queries so MARS fits in a few hundred MB.
3. **Splits.** iLIDS-VID and PRID-2011 are reported as the mean over their 10 train/test splits
   (``split="all"``, their default); the embeddings of a tracklet are computed once and reused by all
   splits. The published protocol trains one network per split: give a checkpoint path containing
   ``{split}`` (``runs/ilids-{split}/best.pt``) to use split ``s``'s network on split ``s``. A single
   checkpoint evaluated on a split other than the one it was trained on sees test identities it was
   trained on; the report records a warning.

Outputs (:func:`write_report`): ``metrics.json`` (the report: metrics, per-split metrics, settings)
and ``cmc.png`` (the CMC curve, with the per-split spread when there are several splits).

Example:
    >>> report = run_evaluation("ilidsvid:/data/ilids-vid", checkpoint="runs/ilids-{split}/best.pt")  # doctest: +SKIP
    >>> print(f"mAP {report.result.mAP:.1%}  rank-1 {report.result.rank1:.1%}")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.reid.training.datasets.base import TrackletItem
from stages.reid.training.evaluation import EvalResult

log = logging.getLogger(__name__)

__all__ = [
    "Embeddings",
    "EvaluationReport",
    "evaluate_embeddings",
    "evaluate_model",
    "extract_embeddings",
    "pair_rerank",
    "plot_cmc",
    "run_evaluation",
    "write_report",
]

TEST_SAMPLING = ("all", "evenly")
METRICS_FILE = "metrics.json"
CMC_FILE = "cmc.png"

Progress = Callable[[str, int, int], None]
"""``progress(label, done, total)``: tracklets embedded so far out of ``total`` for ``label``."""


@dataclass(frozen=True)
class Embeddings:
    """Embeddings of a list of tracklets with their labels.

    Attributes:
        features: ``float32 [N, D]``, L2-normalised rows.
        pids: ``int64 [N]``.
        camids: ``int64 [N]``.
        regions: For a network with a pair score and ``with_regions``: one ``float32 [T_i, R, d]``
            array per tracklet (its region features, the frames of all its clips in time order),
            else None.
    """

    features: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    regions: tuple[np.ndarray, ...] | None = None


def _check_sampling(sampling: str) -> None:
    if sampling not in TEST_SAMPLING:
        raise ValueError(f"test sampling must be one of {TEST_SAMPLING}, got {sampling!r}")


def extract_embeddings(
    model: Any,
    items: Sequence[TrackletItem],
    seq_len: int,
    input_size: tuple[int, int],
    *,
    sampling: str = "all",
    batch_size: int = 16,
    device: str = "cpu",
    num_workers: int = 0,
    progress: Progress | None = None,
    label: str = "embedding",
    with_regions: bool = False,
) -> Embeddings:
    """Embed tracklets with ``model`` (see the module docstring for the two samplings).

    The model is run in eval mode under ``torch.inference_mode`` and put back in its previous mode.

    Args:
        model: A :class:`~stages.reid.models.ReidModel` (already on ``device``, or moved there).
        items: Tracklets.
        seq_len: ``T`` (chunk length with ``"all"``).
        input_size: ``(height, width)`` pixels.
        sampling: ``"all"`` (chunks of T, mean) or ``"evenly"``.
        batch_size: Clips (chunks) per forward pass, ``>= 1``.
        device: Torch device string.
        num_workers: DataLoader worker processes reading frames.
        progress: Called as ``progress(label, done, len(items))``.
        label: Name passed to ``progress``.
        with_regions: Also keep each tracklet's region features for :func:`pair_rerank` (networks
            with ``pair_score`` only; the backbone still runs once per clip).

    Returns:
        :class:`Embeddings` in the order of ``items``.

    Raises:
        ValueError: Unknown ``sampling``, ``batch_size < 1`` or empty ``items``.
        FileNotFoundError: A frame is missing or unreadable.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from stages.reid.training.sampling import TrackletDataset

    _check_sampling(sampling)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not items:
        raise ValueError("no tracklets to embed")
    n = len(items)
    flow = (getattr(model, "config", None) or {}).get("flow")  # RCN with optical-flow channels
    keep_regions = with_regions and has_pair_score(model)
    region_parts: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def embed(clips: torch.Tensor, owners: Sequence[int]) -> torch.Tensor:
        if not keep_regions:
            return model(clips.to(device)).float().cpu()
        emb, v = model.embed_with_regions(clips.to(device))  # one backbone pass for both
        for owner, part in zip(owners, v.float().cpu()):
            region_parts[owner].append(part)
        return emb.float().cpu()

    was_training = model.training
    model.to(device).eval()
    dim = int(model.embedding_dim)
    sums = torch.zeros(n, dim, dtype=torch.float32)
    counts = torch.zeros(n, dtype=torch.float32)
    done = 0
    try:
        with torch.inference_mode():
            if sampling == "evenly":
                data = TrackletDataset(items, seq_len, "evenly", input_size, model.mean, model.std, flow=flow)
                loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
                for clips, _pids, _camids in loader:
                    emb = embed(clips, range(done, done + len(clips)))
                    sums[done : done + len(emb)] = emb
                    counts[done : done + len(emb)] = 1.0
                    done += len(emb)
                    if progress is not None:
                        progress(label, done, n)
            else:
                data = TrackletDataset(items, seq_len, "all", input_size, model.mean, model.std, chunked=True,
                                       flow=flow)
                loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=num_workers)
                buffer: list[torch.Tensor] = []
                owners: list[int] = []

                def flush() -> None:
                    emb = embed(torch.cat(buffer), owners)
                    index = torch.tensor(owners, dtype=torch.long)
                    sums.index_add_(0, index, emb)
                    counts.index_add_(0, index, torch.ones(len(owners)))
                    buffer.clear()
                    owners.clear()

                for i, (chunks, _pid, _camid) in enumerate(loader):  # chunks [C, T, 3, H, W]
                    for start in range(0, len(chunks), batch_size):
                        part = chunks[start : start + batch_size]
                        buffer.append(part)
                        owners.extend([i] * len(part))
                        if len(owners) >= batch_size:
                            flush()
                    done = i + 1
                    if progress is not None and (done % 8 == 0 or done == n):
                        progress(label, done, n)
                if buffer:
                    flush()
    finally:
        model.train(was_training)
    features = F.normalize(sums / counts.clamp_min(1.0)[:, None], dim=1).numpy().astype(np.float32)
    pids = np.array([item.pid for item in items], dtype=np.int64)
    camids = np.array([item.camid for item in items], dtype=np.int64)
    regions = tuple(torch.cat(parts).numpy() for parts in region_parts) if keep_regions else None
    return Embeddings(features, pids, camids, regions)


def has_pair_score(model: Any) -> bool:
    """Whether ``model`` scores pairs from cached region features (``embed_with_regions``, ``pair_score``)."""
    return all(callable(getattr(model, name, None)) for name in ("embed_with_regions", "pair_score"))


def pair_rerank(
    dist: np.ndarray,
    query_regions: Sequence[np.ndarray],
    gallery_regions: Sequence[np.ndarray],
    score: Callable[[Any, Any], Any],
    k: int,
    *,
    device: str = "cpu",
) -> np.ndarray:
    """Re-rank each query's ``k`` nearest gallery items by a pairwise score (two-stage retrieval).

    The embedding distance picks the ``k`` candidates; their order is then given by
    ``score(query, candidate)`` (for the Siamese SGRU, :meth:`~stages.reid.models.siamese_sgru.
    SiameseSGRU.pair_score`, the paper's co-attended similarity), and the rest keep their order
    behind them. In the returned matrix the candidates get ``-1 - s`` (``s ∈ [-1, 1]``, so all are
    ``≤ 0``), below every other entry, which keeps its distance (``≥ 0``).

    Args:
        dist: ``float [Q, G]`` non-negative distances (e.g. squared Euclidean on unit embeddings).
        query_regions: ``Q`` arrays ``float32 [T_q, R, d]``.
        gallery_regions: ``G`` arrays ``float32 [T_g, R, d]``.
        score: ``score(a [N, T_a, R, d], b [N, T_b, R, d]) -> [N]`` torch tensors, similarities in
            ``[-1, 1]`` (called with the ``k`` candidates of one query, grouped by length ``T_g``).
        k: Candidates per query, ``>= 1`` (capped at ``G``).
        device: Torch device of the scoring.

    Returns:
        ``float32 [Q, G]`` re-ranked distances.

    Raises:
        ValueError: ``k < 1``, negative distances, or region counts that do not match ``dist``.
    """
    import torch

    dist = np.asarray(dist, dtype=np.float32)
    num_q, num_g = dist.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(query_regions) != num_q or len(gallery_regions) != num_g:
        raise ValueError(f"need {num_q} query and {num_g} gallery region arrays, got "
                         f"{len(query_regions)} and {len(gallery_regions)}")
    if num_g and float(dist.min()) < 0:
        raise ValueError("pair_rerank needs non-negative distances")
    k = min(k, num_g)
    out = dist.copy()
    top = np.argsort(dist, axis=1, kind="stable")[:, :k]
    with torch.inference_mode():
        for q in range(num_q):
            candidates = top[q]
            by_length: dict[int, list[int]] = {}
            for g in candidates.tolist():
                by_length.setdefault(len(gallery_regions[g]), []).append(g)
            for group in by_length.values():
                b = torch.from_numpy(np.stack([gallery_regions[g] for g in group])).to(device)
                a = torch.from_numpy(np.asarray(query_regions[q])).to(device).unsqueeze(0).expand(len(group), -1, -1, -1)
                s = score(a, b).float().cpu().numpy()
                out[q, group] = -1.0 - s
    return out


def evaluate_embeddings(
    query: Embeddings,
    gallery: Embeddings,
    *,
    rerank: bool = False,
    max_rank: int = 20,
    chunk_size: int = 256,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    pair_score: Callable[[Any, Any], Any] | None = None,
    pair_k: int = 0,
    device: str = "cpu",
) -> EvalResult:
    """CMC and mAP of query against gallery embeddings.

    Args:
        query: Query embeddings.
        gallery: Gallery embeddings.
        rerank: Apply k-reciprocal re-ranking (Zhong et al., CVPR 2017) to the squared Euclidean
            distances; ``k1`` / ``k2`` are lowered to fit small sets (``k1 < Q + G``).
        max_rank: CMC length.
        chunk_size: Queries ranked at a time.
        k1, k2, lambda_value: Re-ranking parameters (the paper's defaults).
        pair_score: With ``pair_k > 0``: the pair scorer of :func:`pair_rerank` (needs ``regions``
            in both embeddings), applied after the k-reciprocal re-ranking when both are on.
        pair_k: Candidates per query re-ranked by ``pair_score`` (0: off).
        device: Torch device of the pair scoring.

    Returns:
        :class:`~stages.reid.training.evaluation.EvalResult`.

    Raises:
        ValueError: No query has a valid gallery match, or shape mismatches.
    """
    from stages.reid.training.evaluation import evaluate, evaluate_ranking, k_reciprocal_rerank, pairwise_distance

    pairs = pair_k > 0
    if pairs and (pair_score is None or query.regions is None or gallery.regions is None):
        raise ValueError("pairwise re-ranking needs a pair scorer and region features (a siamese_sgru network)")
    if not rerank and not pairs:
        return evaluate(query.features, gallery.features, query.pids, gallery.pids, query.camids, gallery.camids,
                        metric="euclidean", max_rank=max_rank, chunk_size=chunk_size)
    if not rerank:
        dist = pair_rerank(pairwise_distance(query.features, gallery.features), query.regions, gallery.regions,
                           pair_score, pair_k, device=device)
        return evaluate_ranking(dist, query.pids, gallery.pids, query.camids, gallery.camids, max_rank=max_rank,
                                chunk_size=chunk_size)
    n = len(query.features) + len(gallery.features)
    k1_used, k2_used = min(k1, n - 1), min(k2, n)
    if (k1_used, k2_used) != (k1, k2):
        log.warning("re-ranking: only %d tracklets, k1=%d k2=%d lowered to %d, %d", n, k1, k2, k1_used, k2_used)
    q_g = pairwise_distance(query.features, gallery.features)
    q_q = pairwise_distance(query.features, query.features)
    g_g = pairwise_distance(gallery.features, gallery.features)
    dist = k_reciprocal_rerank(q_g, q_q, g_g, k1=max(1, k1_used), k2=max(1, k2_used), lambda_value=lambda_value)
    if pairs:
        dist = pair_rerank(np.maximum(dist, 0.0), query.regions, gallery.regions, pair_score, pair_k, device=device)
    return evaluate_ranking(dist, query.pids, gallery.pids, query.camids, gallery.camids, max_rank=max_rank,
                            chunk_size=chunk_size)


def evaluate_model(
    model: Any,
    query: Sequence[TrackletItem],
    gallery: Sequence[TrackletItem],
    seq_len: int,
    input_size: tuple[int, int],
    *,
    sampling: str = "all",
    batch_size: int = 16,
    device: str = "cpu",
    num_workers: int = 0,
    rerank: bool = False,
    progress: Progress | None = None,
    pair_k: int = 0,
) -> EvalResult:
    """Embed query and gallery with ``model`` and rank (one split; used after each training epoch).

    Args:
        model: The network.
        query: Query tracklets.
        gallery: Gallery tracklets.
        seq_len: ``T``.
        input_size: ``(height, width)`` pixels.
        sampling: ``"all"`` or ``"evenly"``.
        batch_size: Clips per forward pass.
        device: Torch device string.
        num_workers: DataLoader workers.
        rerank: k-reciprocal re-ranking.
        progress: See :func:`extract_embeddings`.
        pair_k: Re-rank each query's top ``pair_k`` by the network's pair score (Siamese SGRU; 0: off).

    Returns:
        :class:`~stages.reid.training.evaluation.EvalResult`.

    Raises:
        ValueError: Empty query or gallery, no valid query, or ``pair_k`` for a network without a pair score.
    """
    _check_pair_k(model, pair_k)
    kw = dict(sampling=sampling, batch_size=batch_size, device=device, num_workers=num_workers, progress=progress,
              with_regions=pair_k > 0)
    q = extract_embeddings(model, query, seq_len, input_size, label="query", **kw)
    g = extract_embeddings(model, gallery, seq_len, input_size, label="gallery", **kw)
    return evaluate_embeddings(q, g, rerank=rerank, pair_k=pair_k, device=device,
                               pair_score=getattr(model, "pair_score", None))


def _check_pair_k(model: Any, pair_k: int) -> None:
    if isinstance(pair_k, bool) or not isinstance(pair_k, int) or pair_k < 0:
        raise ValueError(f"pair_k must be an int >= 0, got {pair_k!r}")
    if pair_k and not has_pair_score(model):
        raise ValueError(f"pairwise re-ranking (pair_k={pair_k}) needs a network with a pair score (siamese_sgru)")


class _EmbeddingCache:
    """Embeddings of tracklets keyed by their frame paths, so splits sharing tracklets embed them once."""

    def __init__(self, embed: Callable[[list[TrackletItem], str], Embeddings]) -> None:
        self.embed = embed
        self.features: dict[tuple[str, ...], np.ndarray] = {}
        self.regions: dict[tuple[str, ...], np.ndarray] = {}

    def get(self, items: Sequence[TrackletItem], label: str) -> Embeddings:
        missing = list({item.paths: item for item in items if item.paths not in self.features}.values())
        if missing:
            new = self.embed(missing, label)
            for i, (item, vector) in enumerate(zip(missing, new.features)):
                self.features[item.paths] = vector
                if new.regions is not None:
                    self.regions[item.paths] = new.regions[i]
        has_regions = all(item.paths in self.regions for item in items)
        return Embeddings(
            np.stack([self.features[item.paths] for item in items]).astype(np.float32),
            np.array([item.pid for item in items], dtype=np.int64),
            np.array([item.camid for item in items], dtype=np.int64),
            tuple(self.regions[item.paths] for item in items) if has_regions else None,
        )


@dataclass(frozen=True)
class EvaluationReport:
    """Result of :func:`run_evaluation`.

    Attributes:
        result: The metrics (the mean over splits when several were evaluated).
        splits: Per-split results ``{split: EvalResult}`` for split-based data sets, else empty.
        settings: What was evaluated and how (model, checkpoint, data, sampling, T, input size...).
        warnings: Protocol caveats found on the way (e.g. a checkpoint evaluated on another split).
    """

    result: EvalResult
    splits: dict[int, EvalResult] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, the content of ``metrics.json``."""
        return {
            "metrics": self.result.as_dict(),
            "splits": {str(k): v.as_dict() for k, v in sorted(self.splits.items())},
            "settings": self.settings,
            "warnings": list(self.warnings),
        }


def _load_network(checkpoint: str | Path | None, model: str | None, backbone: str, pretrained: bool,
                  model_options: dict[str, Any], seq_len: int | None,
                  input_size: tuple[int, int] | None) -> tuple[Any, dict[str, Any] | None, int, tuple[int, int]]:
    from stages.reid.checkpoint import load_for_inference
    from stages.reid.models import build_model

    if checkpoint is not None:
        net, ckpt = load_for_inference(checkpoint, model, seq_len, input_size, source="the options")
        return net, ckpt, int(ckpt["seq_len"]), (int(ckpt["input_size"][0]), int(ckpt["input_size"][1]))
    if model is None:
        raise ValueError("give a checkpoint, or a model name to evaluate an untrained network")
    net = build_model(model, backbone=backbone, pretrained=pretrained, **model_options).eval()
    return net, None, seq_len or 8, tuple(input_size or (256, 128))  # type: ignore[return-value]


def run_evaluation(
    data: str,
    *,
    checkpoint: str | Path | None = None,
    model: str | None = None,
    backbone: str = "mobilenet_v2",
    pretrained: bool = True,
    model_options: dict[str, Any] | None = None,
    seq_len: int | None = None,
    input_size: tuple[int, int] | None = None,
    split: int | str | None = None,
    rerank: bool = False,
    sampling: str = "all",
    batch_size: int = 16,
    device: str = "auto",
    num_workers: int = 0,
    dataset_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    pair_k: int = 0,
) -> EvaluationReport:
    """Evaluate a checkpoint (or an untrained network) on a data set's query / gallery.

    Args:
        data: Data set spec ``"name:/path"``.
        checkpoint: Checkpoint file; may contain ``{split}`` (one network per split). None: build
            ``model`` untrained (ImageNet backbone when ``pretrained``).
        model: Expected network name (checked against the checkpoint), or the network to build.
        backbone: Backbone of an untrained network (ignored with a checkpoint).
        pretrained: ImageNet backbone weights for an untrained network.
        model_options: Constructor options of an untrained network.
        seq_len: Expected ``T``: a checkpoint trained with another ``T`` is an error. None: the
            checkpoint's (8 for an untrained network).
        input_size: Expected ``(height, width)``, checked the same way. None: the checkpoint's
            (256 x 128 untrained).
        split: Split-based data sets: a split index, or ``"all"``/None for the mean over all
            splits. Other data sets: None.
        rerank: k-reciprocal re-ranking.
        sampling: ``"all"`` or ``"evenly"`` (module docstring).
        batch_size: Clips per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...
        num_workers: DataLoader workers.
        dataset_options: Loader keyword arguments (``holdout_fraction``, ``seed`` for ``tracklets``).
            They update the checkpoint's own options when it was trained on the same spec (so by
            default a checkpoint is evaluated on the held-out part of its own training data);
            otherwise the loader's defaults.
        progress: See :func:`extract_embeddings`.
        pair_k: Re-rank each query's top ``pair_k`` gallery tracklets by the network's pair score
            (Siamese SGRU, :func:`pair_rerank`; 0: off).

    Returns:
        :class:`EvaluationReport`.

    Raises:
        CheckpointError: The checkpoint is unreadable or its network, T or input size differ from
            the expected ones.
        ValueError: Bad spec, split, sampling, model or options; a data set without query/gallery.
        FileNotFoundError: Missing data set.
    """
    from stages.reid.training.datasets import SPLIT_DATASETS, load_dataset
    from stages.reid.engines import resolve_device
    from stages.reid.training.evaluation import mean_over_splits

    _check_sampling(sampling)
    t0 = time.perf_counter()
    device = resolve_device(device)
    name = data.partition(":")[0].strip().lower()
    warnings: list[str] = []
    ckpt_path = None if checkpoint is None else str(checkpoint)
    templated = ckpt_path is not None and "{split}" in ckpt_path

    if name in SPLIT_DATASETS:
        if split is None or split == "all":
            splits: list[int | None] = []  # filled once the number of splits is known
        else:
            try:
                splits = [int(split)]
            except (TypeError, ValueError):
                raise ValueError(f"split must be an int or 'all', got {split!r}") from None
    else:
        if split not in (None, "all"):
            raise ValueError(f"data set {name!r} has no splits; leave --split out (got {split!r})")
        if templated:
            raise ValueError(f"checkpoint {ckpt_path!r} has a {{split}} placeholder but {name!r} has no splits")
        splits = [None]

    cache: _EmbeddingCache | None = None
    loaded_for: str | None = None
    results: dict[int, EvalResult] = {}
    single: EvalResult | None = None
    net = ckpt = None
    t_used, size_used = seq_len, input_size
    settings: dict[str, Any] = {}
    pending = list(splits) if splits else [0]
    index = 0
    while index < len(pending):
        s = pending[index]
        index += 1
        path = ckpt_path.format(split=s) if templated else ckpt_path
        if net is None or path != loaded_for:
            net, ckpt, t_used, size_used = _load_network(path, model, backbone, pretrained, dict(model_options or {}),
                                                         seq_len, input_size)
            _check_pair_k(net, pair_k)
            net.to(device)
            loaded_for = path
            cache = _EmbeddingCache(lambda items, label, _net=net, _t=t_used, _size=size_used: extract_embeddings(
                _net, items, _t, _size, sampling=sampling, batch_size=batch_size, device=device,
                num_workers=num_workers, progress=progress, label=label, with_regions=pair_k > 0))
        trained_on = (ckpt or {}).get("dataset") or {}
        options = dict(trained_on.get("options") or {}) if trained_on.get("spec") == data else {}
        options.update(dataset_options or {})
        ds = load_dataset(data, split=s, **options)
        if not ds.query or not ds.gallery:
            raise ValueError(f"{data}: no query/gallery to evaluate ({len(ds.query)} query, {len(ds.gallery)} gallery)")
        if not splits:
            splits = list(range(ds.num_splits or 1))
            pending = splits
        if trained_on.get("spec") == data and trained_on.get("split") != s and s is not None:
            msg = (f"split {s}: the checkpoint was trained on split {trained_on.get('split')} of this data set; "
                   f"split {s}'s test identities may be among its training identities")
            warnings.append(msg)
            log.warning(msg)
        if trained_on.get("spec") == data and s is None and trained_on.get("options", {}) != options:
            msg = f"data set options {options} differ from those of training {trained_on.get('options')}"
            warnings.append(msg)
            log.warning(msg)
        q = cache.get(ds.query, "query")
        g = cache.get(ds.gallery, "gallery")
        result = evaluate_embeddings(q, g, rerank=rerank, pair_k=pair_k, device=device,
                                     pair_score=getattr(net, "pair_score", None))
        if s is None:
            single = result
        else:
            results[s] = result
        settings = {
            "data": data,
            "dataset_options": options,
            "checkpoint": ckpt_path,
            "model": (ckpt or {}).get("model", model),
            "model_config": dict(net.config),
            "epoch": (ckpt or {}).get("epoch"),
            "seq_len": t_used,
            "input_size": list(size_used),
            "sampling": sampling,
            "rerank": rerank,
            "pair_rerank_k": pair_k,
            "metric": "squared euclidean on L2-normalised embeddings",
            "num_query": len(ds.query),
            "num_gallery": len(ds.gallery),
            "device": device,
        }
    if single is not None:
        final = single
    elif len(results) == 1:
        final = next(iter(results.values()))
    else:
        final = mean_over_splits([results[k] for k in sorted(results)])
    settings["splits"] = sorted(results) if results else None
    settings["seconds"] = round(time.perf_counter() - t0, 2)
    return EvaluationReport(final, results, settings, warnings)


def plot_cmc(report: EvaluationReport, path: Path, title: str | None = None) -> Path:
    """Write the CMC curve (ranks 1..max_rank) as a PNG; with several splits, a band of ±1 std.

    Args:
        report: The evaluation.
        path: PNG file to write.
        title: Plot title (default: model and data set).

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas for PNG
    from matplotlib.ticker import MaxNLocator

    r = report.result
    ranks = np.arange(1, len(r.cmc) + 1)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(ranks, r.cmc, "o-", markersize=3, label=f"mAP {r.mAP:.1%}, rank-1 {r.rank1:.1%}")
    if r.cmc_std is not None:
        ax.fill_between(ranks, r.cmc - r.cmc_std, np.minimum(r.cmc + r.cmc_std, 1.0), alpha=0.2,
                        label=f"± std over {r.num_splits} splits")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (CMC)")
    ax.set_ylim(0, 1.01)
    ax.set_xlim(1, len(r.cmc))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    s = report.settings
    ax.set_title(title or f"{s.get('model')} on {s.get('data', '')}"[:80])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_report(report: EvaluationReport, output_dir: str | Path) -> list[Path]:
    """Write ``metrics.json`` and ``cmc.png`` into ``output_dir`` (created).

    Returns:
        The two paths.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / METRICS_FILE
    metrics.write_text(json.dumps(report.as_dict(), indent=2, default=str), encoding="utf-8")
    return [metrics, plot_cmc(report, out / CMC_FILE)]
