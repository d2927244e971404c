"""Re-id ranking metrics (CMC, mAP), chunked evaluation from features, and k-reciprocal re-ranking.

Protocol (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015, and the MARS
evaluation of Zheng et al., ECCV 2016): each query ranks the gallery by increasing distance; for
that query,

* gallery items with the query's pid **and** camid are removed (the same person seen by the same
  camera is too easy a match);
* gallery items with pid ``-1`` (junk, MARS) are removed for every query;
* the remaining items with the query's pid are the true matches; a query without any is skipped
  and counted in :attr:`EvalResult.num_skipped`.

CMC@k is the fraction of (non-skipped) queries whose first true match is within the first ``k``
remaining items. AP of a query is the mean, over its true matches, of the precision at the rank of
each match (non-interpolated); mAP is the mean AP over queries. When fewer than ``max_rank`` items
remain, CMC at the missing ranks is 1 (the first match was found earlier). Ties in distance keep
gallery order (stable sort).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from stages.reid.training.datasets.base import JUNK_PID

log = logging.getLogger(__name__)

Metric = Literal["euclidean", "cosine"]


@dataclass(frozen=True, eq=False)
class EvalResult:
    """Ranking metrics.

    Attributes:
        cmc: ``float64 [max_rank]``, CMC@1..max_rank in [0, 1].
        mAP: Mean average precision in [0, 1].
        num_queries: Queries evaluated (with at least one valid match); summed over splits.
        num_skipped: Queries skipped for lack of a valid match; summed over splits.
        num_splits: Number of splits averaged (1 for a single evaluation).
        cmc_std: Standard deviation of CMC over splits (:func:`mean_over_splits`), else None.
        mAP_std: Standard deviation of mAP over splits, else None.
    """

    cmc: np.ndarray
    mAP: float
    num_queries: int
    num_skipped: int
    num_splits: int = 1
    cmc_std: np.ndarray | None = None
    mAP_std: float | None = None

    def rank(self, k: int) -> float:
        """CMC@k (1-based).

        Raises:
            ValueError: ``k`` outside ``1..len(cmc)``.
        """
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank {k} is outside 1..{len(self.cmc)} (max_rank of this evaluation)")
        return float(self.cmc[k - 1])

    @property
    def rank1(self) -> float:
        """CMC@1."""
        return self.rank(1)

    @property
    def rank5(self) -> float:
        """CMC@5."""
        return self.rank(5)

    @property
    def rank10(self) -> float:
        """CMC@10."""
        return self.rank(10)

    @property
    def rank20(self) -> float:
        """CMC@20."""
        return self.rank(20)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (``mAP``, ``rank1/5/10/20`` when available, ``cmc`` list, counts)."""
        out: dict[str, Any] = {"mAP": float(self.mAP)}
        for k in (1, 5, 10, 20):
            if k <= len(self.cmc):
                out[f"rank{k}"] = float(self.cmc[k - 1])
        out.update(cmc=self.cmc.tolist(), num_queries=self.num_queries, num_skipped=self.num_skipped,
                   num_splits=self.num_splits)
        if self.mAP_std is not None:
            out["mAP_std"] = float(self.mAP_std)
        return out


def _as_numpy(x: Any, dtype: Any | None = None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_labels(q_pids, g_pids, q_camids, g_camids, num_q: int, num_g: int):
    arrays = [_as_numpy(a).astype(np.int64).ravel() for a in (q_pids, g_pids, q_camids, g_camids)]
    for name, arr, n in zip(("q_pids", "g_pids", "q_camids", "g_camids"), arrays, (num_q, num_g, num_q, num_g)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} entries, expected {n}")
    return arrays


class _Accumulator:
    """Sums of per-query AP and CMC over chunks."""

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank
        self.ap_sum = 0.0
        self.cmc_sum = np.zeros(max_rank, dtype=np.float64)
        self.valid = 0
        self.skipped = 0

    def add(self, dist: np.ndarray, q_pids, g_pids, q_camids, g_camids) -> None:
        ap, cmc, valid = rank_chunk(dist, q_pids, g_pids, q_camids, g_camids, self.max_rank)
        self.ap_sum += float(ap[valid].sum())
        self.cmc_sum += cmc[valid].sum(axis=0)
        self.valid += int(valid.sum())
        self.skipped += int((~valid).sum())

    def result(self) -> EvalResult:
        if self.valid == 0:
            raise ValueError(f"no query has a valid gallery match ({self.skipped} queries skipped)")
        if self.skipped:
            log.info("evaluation: %d of %d queries have no valid gallery match and were skipped",
                     self.skipped, self.skipped + self.valid)
        return EvalResult(cmc=self.cmc_sum / self.valid, mAP=self.ap_sum / self.valid,
                          num_queries=self.valid, num_skipped=self.skipped)


def rank_chunk(
    dist: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query AP and CMC for a block of queries (vectorised over the block).

    Args:
        dist: ``[q, G]`` distances (smaller is closer) of ``q`` queries to the whole gallery.
        q_pids, q_camids: ``int64 [q]``.
        g_pids, g_camids: ``int64 [G]``.
        max_rank: CMC length.

    Returns:
        ``(ap float64 [q], cmc float64 [q, max_rank], valid bool [q])``; rows of invalid (skipped)
        queries hold zeros.

    Raises:
        ValueError: ``dist`` holds NaN.
    """
    if np.isnan(dist).any():
        raise ValueError("distance matrix holds NaN")
    order = np.argsort(dist, axis=1, kind="stable")
    g_pid_sorted = g_pids[order]
    same_pid = g_pid_sorted == q_pids[:, None]
    keep = ~((same_pid & (g_camids[order] == q_camids[:, None])) | (g_pid_sorted == JUNK_PID))
    hits = same_pid & keep
    num_rel = hits.sum(axis=1)
    valid = num_rel > 0
    position = np.cumsum(keep, axis=1) - 1  # 0-based rank among kept items (meaningful where keep)
    first = np.where(hits, position, np.iinfo(np.int64).max).min(axis=1)
    cmc = (np.arange(max_rank)[None, :] >= first[:, None]).astype(np.float64)
    cum_hits = np.cumsum(hits, axis=1)
    precision_sum = np.where(hits, cum_hits / (np.maximum(position, 0) + 1.0), 0.0).sum(axis=1)
    ap = np.divide(precision_sum, num_rel, out=np.zeros(len(num_rel)), where=valid)
    cmc[~valid] = 0.0
    return ap, cmc, valid


def evaluate_ranking(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 20,
    chunk_size: int | None = 256,
) -> EvalResult:
    """CMC and mAP from a query-gallery distance matrix (protocol in the module docstring).

    Args:
        distmat: ``[Q, G]`` distances (numpy or torch), smaller is closer.
        q_pids, q_camids: ``[Q]`` integer pids and camera ids of the queries.
        g_pids, g_camids: ``[G]`` integer pids (``-1`` junk) and camera ids of the gallery.
        max_rank: CMC length, ``>= 1``.
        chunk_size: Queries ranked at a time (bounds the ``[chunk, G]`` temporaries); None for all.

    Returns:
        :class:`EvalResult`.

    Raises:
        ValueError: Shape mismatches, NaN distances, ``max_rank < 1``, or no query with a valid
            match.

    Example:
        >>> r = evaluate_ranking(dist, q_pids, g_pids, q_camids, g_camids)  # doctest: +SKIP
        >>> print(f"mAP {r.mAP:.1%}  rank-1 {r.rank1:.1%}")  # doctest: +SKIP
    """
    dist = _as_numpy(distmat)
    if dist.ndim != 2:
        raise ValueError(f"distmat must be [Q, G], got shape {dist.shape}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    num_q, num_g = dist.shape
    qp, gp, qc, gc = _check_labels(q_pids, g_pids, q_camids, g_camids, num_q, num_g)
    step = num_q if chunk_size is None else int(chunk_size)
    if step < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    acc = _Accumulator(max_rank)
    for start in range(0, num_q, step):
        stop = min(start + step, num_q)
        acc.add(dist[start:stop], qp[start:stop], gp, qc[start:stop], gc)
    return acc.result()


def _features(x: Any, name: str) -> np.ndarray:
    arr = _as_numpy(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {arr.shape}")
    return arr


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pairwise_distance(x: Any, y: Any, metric: Metric = "euclidean") -> np.ndarray:
    """Distances between rows of ``x`` and ``y``.

    Args:
        x: ``[M, D]`` features (numpy or torch).
        y: ``[N, D]`` features.
        metric: ``"euclidean"`` (**squared** Euclidean distance, rank-equivalent to Euclidean) or
            ``"cosine"`` (``1 - cosine similarity``, in [0, 2]).

    Returns:
        ``float32 [M, N]``.

    Raises:
        ValueError: Not 2-D, different ``D``, or an unknown metric.
    """
    a, b = _features(x, "x"), _features(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    if metric == "cosine":
        return (1.0 - _normalise_rows(a) @ _normalise_rows(b).T).astype(np.float32)
    if metric == "euclidean":
        d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        return np.maximum(d, 0.0).astype(np.float32)
    raise ValueError(f"unknown metric {metric!r}; valid: 'euclidean', 'cosine'")


def evaluate(
    query_feats: Any,
    gallery_feats: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    metric: Metric = "euclidean",
    max_rank: int = 20,
    chunk_size: int = 256,
) -> EvalResult:
    """CMC and mAP from features, computing distances ``chunk_size`` queries at a time.

    At most ``chunk_size x G`` distances (and their sort order) exist at once, besides the features,
    so MARS (1,980 x 9,330, D = 2048, ~90 MB of float32 features) stays far below 2 GB with the
    default chunk (~150 MB of temporaries).

    Args:
        query_feats: ``[Q, D]`` float features (numpy or torch).
        gallery_feats: ``[G, D]``.
        q_pids, q_camids: ``[Q]``; g_pids, g_camids: ``[G]`` (see :func:`evaluate_ranking`).
        metric: ``"euclidean"`` (squared) or ``"cosine"``.
        max_rank: CMC length.
        chunk_size: Queries per chunk, ``>= 1``.

    Returns:
        :class:`EvalResult`, identical to ``evaluate_ranking(pairwise_distance(...), ...)``.

    Raises:
        ValueError: Shape mismatches, an unknown metric, ``chunk_size < 1``, or no valid query.
    """
    q, g = _features(query_feats, "query_feats"), _features(gallery_feats, "gallery_feats")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature dims differ: query {q.shape[1]} vs gallery {g.shape[1]}")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"unknown metric {metric!r}; valid: 'euclidean', 'cosine'")
    if chunk_size < 1 or max_rank < 1:
        raise ValueError(f"chunk_size and max_rank must be >= 1, got {chunk_size}, {max_rank}")
    qp, gp, qc, gc = _check_labels(q_pids, g_pids, q_camids, g_camids, len(q), len(g))
    acc = _Accumulator(max_rank)
    for start in range(0, len(q), chunk_size):
        stop = min(start + chunk_size, len(q))
        acc.add(pairwise_distance(q[start:stop], g, metric), qp[start:stop], gp, qc[start:stop], gc)
    return acc.result()


def mean_over_splits(results: Sequence[EvalResult]) -> EvalResult:
    """Average results over train/test splits (iLIDS-VID, PRID-2011 report the mean of 10 splits).

    Args:
        results: One :class:`EvalResult` per split, all with the same ``max_rank``.

    Returns:
        Mean CMC and mAP with their standard deviations (``ddof=0``) and summed query counts.

    Raises:
        ValueError: Empty input or different CMC lengths.
    """
    if not results:
        raise ValueError("mean_over_splits needs at least one result")
    lengths = {len(r.cmc) for r in results}
    if len(lengths) != 1:
        raise ValueError(f"results have different max_rank: {sorted(lengths)}")
    cmcs = np.stack([r.cmc for r in results])
    maps = np.array([r.mAP for r in results], dtype=np.float64)
    return EvalResult(
        cmc=cmcs.mean(axis=0),
        mAP=float(maps.mean()),
        num_queries=sum(r.num_queries for r in results),
        num_skipped=sum(r.num_skipped for r in results),
        num_splits=len(results),
        cmc_std=cmcs.std(axis=0),
        mAP_std=float(maps.std()),
    )


# --------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking
# --------------------------------------------------------------------------------------------------


def _row_block(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the stacked ``[[q_q, q_g], [q_g^T, g_g]]`` matrix (float64)."""
    num_q = q_q.shape[0]
    parts = []
    if start < num_q:
        s, e = start, min(stop, num_q)
        parts.append(np.concatenate([q_q[s:e], q_g[s:e]], axis=1))
    if stop > num_q:
        s, e = max(start, num_q) - num_q, stop - num_q
        parts.append(np.concatenate([q_g[:, s:e].T, g_g[s:e]], axis=1))
    return np.concatenate(parts, axis=0).astype(np.float64)


def _membership(neighbours: np.ndarray, n: int):
    """Sparse bool ``[N, N]`` with ``[i, j] = 1`` when ``j`` is in row ``i`` of ``neighbours``."""
    from scipy import sparse

    rows = np.repeat(np.arange(len(neighbours)), neighbours.shape[1])
    data = np.ones(rows.size, dtype=np.int32)
    return sparse.csr_matrix((data, (rows, neighbours.ravel())), shape=(n, n))


def k_reciprocal_rerank(
    q_g_dist: Any,
    q_q_dist: Any,
    g_g_dist: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    block_size: int = 512,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
    Encoding", CVPR 2017).

    Queries and gallery items are pooled (``N = Q + G``) and each row of the pooled distance matrix
    is divided by its maximum (so the Gaussian kernel is scale-free). Then, with ``N(p, k)`` the
    ``k + 1`` nearest items of ``p`` (itself included):

    1. k-reciprocal neighbours (Eq. 4): ``R(p, k) = {g in N(p, k) : p in N(g, k)}``.
    2. Expansion (Eq. 6): ``R*(p, k) = R(p, k) U R(q, k/2)`` for each ``q in R(p, k)`` with
       ``|R(p, k) ∩ R(q, k/2)| > 2/3 |R(q, k/2)|`` (strictly, as in the released code; ``k/2``
       rounded half to even).
    3. Gaussian-kernel encoding (Eqs. 7-8): ``V[p, g] = exp(-d(p, g))`` for ``g in R*(p, k)``, else
       0; each row is normalised to sum to 1 (as in the authors' released code).
    4. Local query expansion (Eq. 11): ``V[p] <- mean of V[g]`` over the ``k2`` nearest items of
       ``p`` (itself included); ``k2 = 1`` disables it.
    5. Jaccard distance (Eq. 10): ``d_J(p, g) = 1 - sum_j min(V[p, j], V[g, j]) / sum_j max(...)``.
    6. Final distance (Eq. 12): ``(1 - lambda) d_J + lambda d`` with ``d`` the row-normalised
       original distance.

    The sets are handled as sparse matrices (``R = A ∧ Aᵀ`` with ``A`` the k-NN membership, the
    overlaps of step 2 as ``R @ R_halfᵀ``), so memory is ``O(N k1²)`` besides the inputs and one
    ``[block_size, N]`` block of pooled distances at a time; the output is ``[Q, G]``.

    Args:
        q_g_dist: ``[Q, G]`` query-gallery distances (numpy or torch; e.g. from
            :func:`pairwise_distance`).
        q_q_dist: ``[Q, Q]`` query-query distances.
        g_g_dist: ``[G, G]`` gallery-gallery distances.
        k1: k of the k-reciprocal sets, ``1 <= k1 < Q + G``.
        k2: Neighbours of the local query expansion, ``1 <= k2 <= Q + G``.
        lambda_value: Weight of the original distance, in [0, 1].
        block_size: Pooled rows processed at a time.

    Returns:
        ``float32 [Q, G]`` re-ranked distances (smaller is closer).

    Raises:
        ValueError: Shape mismatches, NaN distances, or parameters out of range.

    Example:
        >>> qg, qq, gg = (pairwise_distance(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf)))  # doctest: +SKIP
        >>> r = evaluate_ranking(k_reciprocal_rerank(qg, qq, gg), q_pids, g_pids, q_cams, g_cams)  # doctest: +SKIP
    """
    from scipy import sparse

    q_g, q_q, g_g = _as_numpy(q_g_dist), _as_numpy(q_q_dist), _as_numpy(g_g_dist)
    if q_g.ndim != 2:
        raise ValueError(f"q_g_dist must be [Q, G], got shape {q_g.shape}")
    num_q, num_g = q_g.shape
    if q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
        raise ValueError(
            f"expected q_q_dist {(num_q, num_q)} and g_g_dist {(num_g, num_g)}, got {q_q.shape} and {g_g.shape}"
        )
    n = num_q + num_g
    if not 1 <= k1 < n or not 1 <= k2 <= n:
        raise ValueError(f"need 1 <= k1 < Q + G = {n} and 1 <= k2 <= {n}, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    for name, arr in (("q_g_dist", q_g), ("q_q_dist", q_q), ("g_g_dist", g_g)):
        if np.isnan(arr).any():
            raise ValueError(f"{name} holds NaN")

    k_half = int(np.around(k1 / 2.0))
    num_nbrs = max(k1 + 1, k2)
    neighbours = np.empty((n, num_nbrs), dtype=np.int64)
    row_max = np.empty(n, dtype=np.float64)
    for start in range(0, n, block_size):
        block = _row_block(q_g, q_q, g_g, start, min(start + block_size, n))
        row_max[start : start + len(block)] = block.max(axis=1)
        if num_nbrs < n:
            part = np.argpartition(block, num_nbrs - 1, axis=1)[:, :num_nbrs]
        else:
            part = np.tile(np.arange(n), (len(block), 1))
        part_d = np.take_along_axis(block, part, axis=1)
        order = np.lexsort((part, part_d), axis=1)  # by distance, ties by index
        neighbours[start : start + len(block)] = np.take_along_axis(part, order, axis=1)
    row_max[row_max <= 0] = 1.0

    # k-reciprocal sets (Eq. 4) for k1 and k1/2, as sparse 0/1 matrices.
    a_full = _membership(neighbours[:, : k1 + 1], n)
    recip = a_full.multiply(a_full.T).tocsr()
    a_half = _membership(neighbours[:, : k_half + 1], n)
    recip_half = a_half.multiply(a_half.T).tocsr()
    half_sizes = np.asarray(recip_half.sum(axis=1)).ravel()
    # Expansion (Eq. 6): overlap[p, q] = |R(p, k1) ∩ R(q, k1/2)| for q in R(p, k1).
    overlap = (recip @ recip_half.T).multiply(recip).tocoo()
    ok = 3 * overlap.data > 2 * half_sizes[overlap.col]  # strictly more than 2/3, as released
    accepted = sparse.csr_matrix(
        (np.ones(int(ok.sum()), dtype=np.int32), (overlap.row[ok], overlap.col[ok])), shape=(n, n)
    )
    expanded = ((recip + accepted @ recip_half) > 0).tocsr()
    expanded.sort_indices()

    # Gaussian-kernel encoding (Eqs. 7-8), row-normalised; and the normalised q->g original distance.
    data = np.empty(expanded.nnz, dtype=np.float64)
    original_qg = np.empty((num_q, num_g), dtype=np.float32)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        block = _row_block(q_g, q_q, g_g, start, stop) / row_max[start:stop, None]
        lo, hi = expanded.indptr[start], expanded.indptr[stop]
        rows = np.repeat(np.arange(stop - start), np.diff(expanded.indptr[start : stop + 1]))
        data[lo:hi] = np.exp(-block[rows, expanded.indices[lo:hi]])
        if start < num_q:
            original_qg[start : min(stop, num_q)] = block[: min(stop, num_q) - start, num_q:]
    encoding = sparse.csr_matrix((data, expanded.indices, expanded.indptr), shape=(n, n))
    encoding = sparse.diags(1.0 / np.asarray(encoding.sum(axis=1)).ravel()) @ encoding

    # Local query expansion (Eq. 11).
    if k2 > 1:
        expand = _membership(neighbours[:, :k2], n).astype(np.float64) / k2
        encoding = (expand @ encoding).tocsr()

    # Jaccard distance (Eq. 10) between query rows and gallery rows of the encoding.
    enc_q = encoding[:num_q].tocsr()
    enc_g = encoding[num_q:].tocsc()  # column j -> gallery items with V[g, j] > 0
    sums_q = np.asarray(enc_q.sum(axis=1)).ravel()
    sums_g = np.asarray(enc_g.sum(axis=1)).ravel()
    col_len = np.diff(enc_g.indptr)
    final = original_qg  # overwritten block by block with Eq. 12
    q_block = max(1, block_size // 8)
    for start in range(0, num_q, q_block):
        stop = min(start + q_block, num_q)
        sub = enc_q[start:stop].tocoo()
        lengths = col_len[sub.col]
        total = int(lengths.sum())
        # Flattened positions into enc_g.data/indices of every (query nonzero, gallery nonzero) pair.
        offsets = np.repeat(enc_g.indptr[sub.col] - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
        mins = np.minimum(np.repeat(sub.data, lengths), enc_g.data[offsets])
        flat = np.repeat(sub.row, lengths) * num_g + enc_g.indices[offsets]
        min_sum = np.bincount(flat, weights=mins, minlength=(stop - start) * num_g).reshape(stop - start, num_g)
        max_sum = sums_q[start:stop, None] + sums_g[None, :] - min_sum
        jaccard = 1.0 - min_sum / np.maximum(max_sum, 1e-12)
        final[start:stop] = (1.0 - lambda_value) * jaccard + lambda_value * original_qg[start:stop]
    return final


__all__ = [
    "EvalResult",
    "JUNK_PID",
    "evaluate",
    "evaluate_ranking",
    "k_reciprocal_rerank",
    "mean_over_splits",
    "pairwise_distance",
    "rank_chunk",
]

