"""Search by example: rank the stored global identities by similarity to one query embedding.

Used by ``POST /search`` and ``reidstream query search``. The score of an identity is the mean cosine
between the query and the identity's member embeddings, both mapped into the matcher's scoring space
(:class:`~stages.matcher.association.ScoringSpace`, saved by the matcher in ``{ns}:matcher``), or the
plain cosine of the unit embeddings when no scoring space is saved. This is the same appearance score
the matcher's online decision averages over prototypes, but over every member.

The ranking is brute force over every stored embedding, read in pipelined batches
(:meth:`pipeline.store.IdentityStore.embedding_batches`) and reduced batch by batch, so memory stays
at one batch plus one accumulator per identity. An ANN index can replace it behind
:func:`rank_identities` without changing callers.

Example::

    from stages.matcher.search import rank_identities
    hits = rank_identities(store, store.embedding("left-3-120"), k=5, exclude=["left-3-120"])
    best = [(h.global_id, round(h.score, 3)) for h in hits]
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from typing import Any

import numpy as np

from stages.matcher.association import ScoringSpace

log = logging.getLogger(__name__)

__all__ = ["IdentityMatch", "SearchError", "load_scoring_space", "rank_identities"]

_UNSET: Any = object()


class SearchError(ValueError):
    """The query cannot be compared with the stored embeddings (wrong dimension, zero vector)."""


@dataclasses.dataclass(frozen=True)
class IdentityMatch:
    """One ranked identity.

    Attributes:
        global_id: The identity.
        score: Mean cosine of the query to its members (scoring space), in [-1, 1].
        cameras: Its cameras, sorted.
        n_tracklets: Its member tracklets (also those excluded from the score).
        best_tracklet: The member most similar to the query.
        best_score: That member's cosine.
        compared: Members the score averages over.
    """

    global_id: str
    score: float
    cameras: list[str]
    n_tracklets: int
    best_tracklet: str
    best_score: float
    compared: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_scoring_space(store: Any) -> ScoringSpace | None:
    """The scoring space the matcher saved in ``{ns}:matcher`` (``mean``, ``components``, ``dim``:
    float32 bytes, as :meth:`CrossCameraMatcher.setup` reads them), or None when none is saved."""
    state = store.matcher_state()
    if "mean" not in state:
        return None
    arrays = {"mean": np.frombuffer(state["mean"], "<f4").copy()}
    if "components" in state:
        dim = int(state["dim"])
        arrays["components"] = np.frombuffer(state["components"], "<f4").reshape(-1, dim).copy()
    return ScoringSpace.from_arrays(arrays)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def rank_identities(store: Any, vector: np.ndarray, k: int, *, space: ScoringSpace | None = _UNSET,
                    exclude: Collection[str] = (), batch_size: int = 1000) -> list[IdentityMatch]:
    """The ``k`` identities most similar to ``vector``, best first.

    Args:
        store: An :class:`~pipeline.store.IdentityStore`.
        vector: The query embedding, ``float32 [D]`` (normalised here), from the configured re-id model
            or a stored tracklet.
        k: How many identities, >= 1.
        space: Scoring space to compare in; by default the one saved by the matcher
            (:func:`load_scoring_space`); None compares plain cosines.
        exclude: Tracklet ids left out of every score (the query tracklet itself); an identity left
            without compared members is not ranked.
        batch_size: Embeddings per pipelined read.

    Returns:
        At most ``k`` matches ordered by score descending, then global id. Stored embeddings whose
        dimension differs from the query's are skipped (logged).

    Raises:
        ValueError: ``k < 1``.
        SearchError: ``vector`` is not a finite non-zero 1-D vector, its dimension differs from the
            scoring space's, or no stored embedding has its dimension while some exist.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = np.asarray(vector, np.float32)
    if q.ndim != 1 or q.size == 0 or not np.all(np.isfinite(q)) or not np.any(q):
        raise SearchError(f"the query must be a finite non-zero vector [D], got shape {q.shape}")
    if space is _UNSET:
        space = load_scoring_space(store)
    if space is not None:
        try:
            qz = space.transform(q)
        except ValueError as exc:
            raise SearchError(str(exc)) from None
    else:
        qz = _unit(q)
    skip = set(exclude)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    best: dict[str, tuple[float, str]] = {}
    mismatched = 0
    for rows in store.embedding_batches(batch_size):
        rows = [r for r in rows if r[0] not in skip]
        same = [r for r in rows if r[2].shape == q.shape]
        mismatched += len(rows) - len(same)
        if not same:
            continue
        x = np.stack([r[2] for r in same]).astype(np.float32)
        z = space.transform(x) if space is not None else _unit(x)
        cos = z @ qz
        for (tid, gid, _), c in zip(same, cos.tolist()):
            sums[gid] = sums.get(gid, 0.0) + c
            counts[gid] = counts.get(gid, 0) + 1
            if gid not in best or c > best[gid][0]:
                best[gid] = (c, tid)
    if mismatched:
        log.warning("search: skipped %d stored embeddings whose dimension differs from the query's %d",
                    mismatched, q.size)
        if not counts:
            raise SearchError(f"no stored embedding has the query's dimension {q.size} (the re-id model "
                              f"differs from the one that embedded the stored tracklets)")
    ranked = sorted(counts, key=lambda g: (-sums[g] / counts[g], g))[:k]
    sizes = store.identity_sizes(ranked)
    cameras = {i.global_id: i.cameras for i in store.identities_by_id(ranked)}
    return [IdentityMatch(g, sums[g] / counts[g], cameras.get(g, []), sizes.get(g, counts[g]), best[g][1],
                          best[g][0], counts[g]) for g in ranked]
