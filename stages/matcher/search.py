"""Search by example: rank the stored global identities by similarity to one query embedding.

Used by ``POST /search`` and ``reidstream query search``. The score of an identity is the mean cosine
between the query and the identity's member embeddings, both mapped into the matcher's scoring space
(:class:`~stages.matcher.association.ScoringSpace`, saved by the matcher in ``{ns}:matcher``), or the
plain cosine of the unit embeddings when no scoring space is saved. This is the same appearance score
the matcher's online decision averages over prototypes, but over every member.

Two ways to rank, with the same results while the index is exact:

* :func:`rank_identities`, brute force over every stored embedding, read in pipelined batches
  (:meth:`pipeline.store.IdentityStore.embedding_batches`) and reduced batch by batch, so memory
  stays at one batch plus one accumulator per identity; for one-off searches (``reidstream query
  search`` without a running API).
* :class:`SearchIndex`, for a long-running process (``reidstream api``): one
  :class:`~stages.matcher.index.IdentityIndex` over every identity's *mean member vector*
  ``m = mean_j z_j``, so that ``q·m`` **is** the score above (exact search below
  ``exact_below`` identities, faiss IVF above). It is built once from every stored embedding and
  then kept current between searches from Redis' change feeds: tracklets linked since the last
  search (``{ns}:tracklets`` is scored by write time) and audit records since the last one (every
  re-association or operator move names the identities it changed); each identity named is
  re-read whole, so applying a change twice is harmless. The ``max(4k, 64)`` best identities of the
  index (and those of excluded tracklets) are then re-scored exactly from their members in Redis,
  so a stale or approximate index can only miss an identity, never misreport a score. A purge (the
  store holds fewer tracklets than the index counted) or a new scoring space rebuild the index at
  the next search; after ``rebuild_s`` seconds it is rebuilt on a background thread while searches
  go on with the current one.

Example::

    from stages.matcher.search import rank_identities
    hits = rank_identities(store, store.embedding("left-3-120"), k=5, exclude=["left-3-120"])
    best = [(h.global_id, round(h.score, 3)) for h in hits]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np

from stages.matcher.association import ScoringSpace
from stages.matcher.index import IdentityIndex, IndexSettings

log = logging.getLogger(__name__)

__all__ = ["IdentityMatch", "SearchError", "SearchIndex", "load_scoring_space", "rank_identities"]

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
    q = _check_query(vector, k)
    if space is _UNSET:
        space = load_scoring_space(store)
    qz = _query_vector(q, space)
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
        _accumulate(same, z @ qz, sums, counts, best)
    if mismatched:
        log.warning("search: skipped %d stored embeddings whose dimension differs from the query's %d",
                    mismatched, q.size)
        if not counts:
            raise SearchError(f"no stored embedding has the query's dimension {q.size} (the re-id model "
                              f"differs from the one that embedded the stored tracklets)")
    return _matches(store, sums, counts, best, k)


def _check_query(vector: np.ndarray, k: int) -> np.ndarray:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = np.asarray(vector, np.float32)
    if q.ndim != 1 or q.size == 0 or not np.all(np.isfinite(q)) or not np.any(q):
        raise SearchError(f"the query must be a finite non-zero vector [D], got shape {q.shape}")
    return q


def _query_vector(q: np.ndarray, space: ScoringSpace | None) -> np.ndarray:
    if space is None:
        return _unit(q)
    try:
        return space.transform(q)
    except ValueError as exc:
        raise SearchError(str(exc)) from None


def _accumulate(rows: list[tuple[str, str, np.ndarray]], cos: np.ndarray, sums: dict[str, float],
                counts: dict[str, int], best: dict[str, tuple[float, str]]) -> None:
    """Add members' cosines ``cos`` (``[len(rows)]``) of ``rows`` ``(tracklet_id, global_id, embedding)``
    to their identities' sums, counts and best member (the first of equal cosines stays)."""
    for (tid, gid, _), c in zip(rows, cos.tolist()):
        sums[gid] = sums.get(gid, 0.0) + c
        counts[gid] = counts.get(gid, 0) + 1
        if gid not in best or c > best[gid][0]:
            best[gid] = (c, tid)


def _matches(store: Any, sums: dict[str, float], counts: dict[str, int], best: dict[str, tuple[float, str]],
             k: int) -> list[IdentityMatch]:
    """The ``k`` best of the accumulated scores as :class:`IdentityMatch` es (score, then global id)."""
    ranked = sorted(counts, key=lambda g: (-sums[g] / counts[g], g))[:k]
    sizes = store.identity_sizes(ranked)
    cameras = {i.global_id: i.cameras for i in store.identities_by_id(ranked)}
    return [IdentityMatch(g, sums[g] / counts[g], cameras.get(g, []), sizes.get(g, counts[g]), best[g][1],
                          best[g][0], counts[g]) for g in ranked]


class SearchIndex:
    """Search by example through an index of the stored identities, kept current from Redis (see the
    module docstring); thread-safe (one lock around each search and its refresh).

    Args:
        store: An :class:`~pipeline.store.IdentityStore`.
        settings: Index settings (exact below ``exact_below`` identities, faiss IVF above).
        rebuild_s: Seconds after which the next search rebuilds the index from every stored embedding
            (bounds what the change feeds cannot see: tracklets expired by the store's retention).
        batch_size: Embeddings per pipelined read while building.

    Example::

        index = SearchIndex(store)
        hits = index.rank(store.embedding("left-3-120"), k=5, exclude=["left-3-120"])
    """

    def __init__(self, store: Any, settings: IndexSettings | None = None, rebuild_s: float = 3600.0,
                 batch_size: int = 1000) -> None:
        if rebuild_s <= 0:
            raise ValueError(f"rebuild_s must be > 0, got {rebuild_s}")
        self.store = store
        self.settings = settings or IndexSettings(hot_s=None)
        self.rebuild_s = rebuild_s
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self.index: IdentityIndex | None = None
        self.space: ScoringSpace | None = None
        self._space_key: tuple[bytes | None, ...] | None = None
        self._built_at = -np.inf
        self._fresh: threading.Thread | None = None        # a background rebuild, while one runs
        self._fresh_index: SearchIndex | None = None
        self._clear()

    def _clear(self) -> None:
        self.index = None
        self._code: dict[str, int] = {}
        self._gid: list[str] = []
        self._count: dict[str, int] = {}   # members behind each indexed mean
        self._dim: int | None = None
        self._linked_ns: int | None = None
        self._audit_id: str | None = None

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)

    # ---------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bring the index up to date with the store (rebuilt when due, else the change feeds).

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis is unreachable.
        """
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        if self._fresh is not None and not self._fresh.is_alive():
            self._adopt()  # then the feeds below bring it up to date
        key = tuple(self.store.matcher_state_fields("epoch", "mean", "components"))
        if self.index is None or key != self._space_key:
            self._build(key)
            return
        if self._fresh is None and time.monotonic() - self._built_at > self.rebuild_s:
            self._start_rebuild(key)
        tids, newest = self.store.links_since(self._linked_ns)
        audit = []
        while True:
            part = self.store.audit_after(audit[-1]["id"] if audit else self._audit_id, count=10000)
            audit.extend(part)
            if len(part) < 10000:
                break
        changed = self.store.global_ids_of(tids)
        for record in audit:
            into = record.get("into")
            changed |= {record.get("from"), *(into if isinstance(into, list) else [into])}
        changed.discard(None)
        self._linked_ns = newest
        if audit:
            self._audit_id = audit[-1]["id"]
        if changed:
            self._reload(sorted(changed))
        if self.store.count_tracklets() < sum(self._count.values()):
            log.info("search index: tracklets were purged; rebuilding")
            self._build(key)

    def _start_rebuild(self, key: tuple[bytes | None, ...]) -> None:
        """Rebuild on a background thread; searches use (and update) the current index meanwhile, and
        the first search after it finished adopts the new one and applies what changed since."""
        other = SearchIndex(self.store, self.settings, self.rebuild_s, self.batch_size)

        def build() -> None:
            try:
                other._build(key)
            except Exception as exc:  # noqa: BLE001 - a failed background rebuild keeps the current index
                log.warning("search index: background rebuild failed (%s: %s); keeping the current index",
                            type(exc).__name__, exc)
                other.index = None

        self._fresh = threading.Thread(target=build, name="search-index-rebuild", daemon=True)
        self._fresh_index = other
        self._fresh.start()

    def _adopt(self) -> None:
        other, self._fresh, self._fresh_index = self._fresh_index, None, None
        if other is None or other.index is None:
            self._built_at = time.monotonic()  # failed or empty: try again after rebuild_s
            return
        for name in ("index", "space", "_space_key", "_built_at", "_code", "_gid", "_count", "_dim", "_linked_ns",
                     "_audit_id"):
            setattr(self, name, getattr(other, name))
        log.info("search index: adopted the rebuilt index (%d identities)", len(self))

    def _build(self, key: tuple[bytes | None, ...]) -> None:
        t0 = time.perf_counter()
        self._clear()
        self.space = load_scoring_space(self.store)
        self._space_key = key
        # the feeds' positions first: what is written while the embeddings are read comes again
        self._audit_id = self.store.last_audit_id()
        newest = self.store.newest_link()
        self._built_at = time.monotonic()
        if newest is None:
            return
        tid, self._linked_ns = newest
        latest = self.store.embedding(tid)
        if latest is None:  # purged meanwhile: the next search builds again
            self._built_at = -np.inf
            return
        self._dim = latest.shape[0]  # the current re-id model's (older ones' embeddings are skipped)
        row_of: dict[str, int] = {}
        sums = np.zeros((0, 0), np.float32)  # float32 [identities, K], grown by doubling
        counts = np.zeros(0, np.int64)
        for rows in self.store.embedding_batches(self.batch_size):
            same = [r for r in rows if r[2].shape[0] == self._dim]
            if not same:
                continue
            z = self._transform(np.stack([r[2] for r in same]))
            at = np.array([row_of.setdefault(gid, len(row_of)) for _, gid, _ in same], np.int64)
            if len(row_of) > len(sums):
                grown = np.zeros((max(2 * len(sums), len(row_of), 1024), z.shape[1]), np.float32)
                if len(sums):
                    grown[:len(sums)] = sums
                sums, counts = grown, np.concatenate([counts, np.zeros(len(grown) - len(counts), np.int64)])
            np.add.at(sums, at, z)
            np.add.at(counts, at, 1)
        gids = list(row_of)
        self._count = {g: int(counts[i]) for i, g in enumerate(gids)}
        self._put(gids, sums[:len(gids)] / counts[:len(gids), None])
        log.info("search index: %d identities of %d tracklets indexed in %.2f s", len(self), sum(self._count.values()),
                 time.perf_counter() - t0)

    def _transform(self, x: np.ndarray) -> np.ndarray:
        return self.space.transform(x) if self.space is not None else _unit(x)

    def _put(self, gids: list[str], means: np.ndarray) -> None:
        """Index (or replace) the mean vectors ``float32 [len(gids), K]`` of identities ``gids``."""
        if not gids:
            return
        if self.index is None:
            self.index = IdentityIndex(means.shape[1], self.settings)
        codes = []
        for gid in gids:
            code = self._code.get(gid)
            if code is None:
                code = self._code[gid] = len(self._gid)
                self._gid.append(gid)
            codes.append(code)
        with self.index.bulk() if len(gids) > 1000 and not len(self.index) else contextlib.nullcontext():
            self.index.upsert(codes, means.astype(np.float32))

    def _members(self, gids: list[str], skip: Collection[str] = ()) -> list[tuple[str, str, np.ndarray]]:
        """``(tracklet_id, global_id, embedding float32 [D])`` of the members of ``gids`` read from
        Redis (but ``skip``), those of the indexed dimension only."""
        members = self.store.identity_members(gids)
        tids = [t for g in gids for t in members.get(g, []) if t not in skip]
        rows = self.store.tracklet_rows(tids)
        return [(t, rows[t][0], rows[t][5]) for t in tids if t in rows and rows[t][5].shape[0] == self._dim]

    def _reload(self, gids: list[str]) -> None:
        """Re-read identities whole from Redis (gone or emptied ones leave the index)."""
        by_gid: dict[str, list[np.ndarray]] = {}
        for _, gid, vec in self._members(gids):
            by_gid.setdefault(gid, []).append(vec)
        means: dict[str, np.ndarray] = {}
        for gid in gids:
            vecs = by_gid.get(gid)
            if not vecs:
                self._count.pop(gid, None)
                if gid in self._code and self.index is not None:
                    self.index.remove([self._code[gid]])
                continue
            means[gid] = self._transform(np.stack(vecs)).mean(axis=0).astype(np.float32)
            self._count[gid] = len(vecs)
        self._put(list(means), np.stack(list(means.values())) if means else np.zeros((0, 0), np.float32))

    # ---------------------------------------------------------------------------------------------
    def rank(self, vector: np.ndarray, k: int, *, exclude: Collection[str] = ()) -> list[IdentityMatch]:
        """As :func:`rank_identities` (same arguments, results and errors), through the index.

        A query whose dimension differs from the indexed embeddings' falls back to
        :func:`rank_identities`, which raises or skips as documented there.
        """
        q = _check_query(vector, k)
        with self._lock:
            self._refresh()
            space = self.space
            indexed = self.index is not None and len(self.index) > 0 and q.size == self._dim
            if indexed:
                qz = _query_vector(q, space)
                _, codes = self.index.search(qz[None, :], max(4 * k, 64))
                cand = {self._gid[c] for c in codes[0].tolist() if c >= 0}
        if not indexed:  # outside the lock: brute force is slow
            return rank_identities(self.store, vector, k, space=space, exclude=exclude)
        skip = set(exclude)
        if skip:
            cand |= self.store.global_ids_of(sorted(skip))
        return self._exact(qz, sorted(cand), skip, k)

    def _exact(self, qz: np.ndarray, gids: Iterable[str], skip: set[str], k: int) -> list[IdentityMatch]:
        """Score candidate identities exactly from their members in Redis (``qz``: the unit query in
        the scoring space, ``float32 [K]``)."""
        rows = self._members(list(gids), skip)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        best: dict[str, tuple[float, str]] = {}
        if rows:
            _accumulate(rows, self._transform(np.stack([r[2] for r in rows])) @ qz, sums, counts, best)
        return _matches(self.store, sums, counts, best, k)

