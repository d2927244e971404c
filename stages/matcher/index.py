"""Nearest-neighbour search over identity vectors, exact while small and approximate (faiss IVF) beyond.

The matcher scores a tracklet ``x`` against an identity by the mean cosine to its prototypes,
``mean_j x·z_j`` (see :mod:`stages.matcher.matcher`). Because ``x`` is fixed that mean equals
``x·m`` with ``m = mean_j z_j``, so one vector per identity (its *mean prototype*, not normalised)
ranks identities exactly as the association rule does. :class:`IdentityIndex` keeps those vectors
and finds the top-k by inner product:

* below ``exact_below`` vectors: exact, one matrix product over all of them;
* from there on: a faiss inverted-file index (Jégou et al., "Product quantization for nearest
  neighbor search", TPAMI 2011, for the IVF structure) with 8-bit scalar-quantised codes, ``nlist ≈
  4·√N`` cells trained on the vectors present, searching ``nprobe`` cells; the candidates it returns are
  re-scored exactly from the float32 copy this class keeps, so the codes only decide *which* vectors
  are looked at, never a score. The IVF is retrained when the index has grown ``retrain_growth``-fold
  since it was trained.

Updates are incremental: :meth:`upsert` replaces an identity's vector (a link changed its prototypes,
a merge or split changed its members), :meth:`remove` drops it (merged away, purged, archived).

Shapes: ``dim`` is the scoring-space dimension ``K``; vectors are ``float32 [K]``; keys are
non-negative ``int64`` identity codes. faiss is imported when the first IVF is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """How :class:`IdentityIndex` searches.

    Attributes:
        kind: ``auto`` (exact below ``exact_below`` vectors, IVF above), ``exact`` or ``ivf``.
        exact_below: Vectors under which search is exact.
        nprobe: IVF cells searched per query (more: slower, higher recall).
        candidates: Identities retrieved per query before the matcher's exact rules apply.
        retrain_growth: Retrain the IVF once the index holds this many times the vectors it was
            trained on.
        threads: faiss threads (None: all cores).
        hot_s: While the IVF is in use, identities seen within this many stream seconds of the newest
            sighting are also searched exactly (most people come back soon, and the IVF can miss a
            true match whose cell it does not probe); None: the IVF alone.
    """

    kind: str = "auto"
    exact_below: int = 20000
    nprobe: int = 256
    candidates: int = 64
    retrain_growth: float = 4.0
    threads: int | None = None
    hot_s: float | None = 3600.0

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "exact", "ivf"):
            raise ValueError(f"index kind must be auto, exact or ivf, got {self.kind!r}")
        for name in ("exact_below", "nprobe", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"index {name} must be >= 1, got {getattr(self, name)}")
        if self.retrain_growth <= 1:
            raise ValueError(f"index retrain_growth must be > 1, got {self.retrain_growth}")


class IdentityIndex:
    """Top-k inner-product search over one ``float32 [K]`` vector per key (see the module docstring).

    Args:
        dim: Vector dimension ``K``.
        settings: Search settings.

    Raises:
        ValueError: ``dim < 1``.
    """

    def __init__(self, dim: int, settings: IndexSettings | None = None) -> None:
        if dim < 1:
            raise ValueError(f"index dimension must be >= 1, got {dim}")
        self.dim = dim
        self.settings = settings or IndexSettings()
        self._vecs = np.zeros((1024, dim), np.float32)
        self._keys = np.full(1024, -1, np.int64)
        self._row: dict[int, int] = {}
        self._free: list[int] = []
        self._top = 0  # rows [0, _top) have been used
        self._ivf: Any = None
        self._trained_on = 0
        self._bulk = False
        self._changed_in_bulk = False

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, key: int) -> bool:
        return int(key) in self._row

    @property
    def approximate(self) -> bool:
        """Whether searches go through the IVF (else they are exact)."""
        return self._ivf is not None

    def vector(self, key: int) -> np.ndarray:
        """The stored vector of ``key`` (a copy). Raises KeyError when absent."""
        return self._vecs[self._row[int(key)]].copy()

    # ---------------------------------------------------------------------------------------------
    def upsert(self, keys: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Insert or replace the vectors of ``keys`` (``int64 [B]``, ``float32 [B, K]``).

        Raises:
            ValueError: Shapes disagree or a key is negative.
        """
        keys = np.asarray(keys, np.int64).reshape(-1)
        vectors = np.asarray(vectors, np.float32).reshape(len(keys), -1) if len(keys) else \
            np.zeros((0, self.dim), np.float32)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index {self.dim}")
        if len(keys) and keys.min() < 0:
            raise ValueError("index keys must be >= 0")
        rows = np.empty(len(keys), np.int64)
        replaced = []
        for i, key in enumerate(keys.tolist()):
            row = self._row.get(key)
            if row is None:
                row = self._free.pop() if self._free else self._grow()
                self._row[key] = row
                self._keys[row] = key
            else:
                replaced.append(row)
            rows[i] = row
        self._vecs[rows] = vectors
        if self._bulk:
            self._changed_in_bulk = True
        if self._ivf is not None:
            if replaced:
                self._ivf.remove_ids(np.asarray(replaced, np.int64))
            self._ivf.add_with_ids(vectors, rows)
        self._maybe_rebuild()

    def remove(self, keys: np.ndarray | list[int]) -> int:
        """Drop ``keys`` (absent ones are ignored); returns how many were present."""
        rows = [self._row.pop(int(k)) for k in np.asarray(keys, np.int64).reshape(-1).tolist() if int(k) in self._row]
        if not rows:
            return 0
        r = np.asarray(rows, np.int64)
        self._keys[r] = -1
        self._vecs[r] = 0
        self._free.extend(rows)
        if self._ivf is not None:
            self._ivf.remove_ids(r)
        return len(rows)

    def _grow(self) -> int:
        if self._top == len(self._keys):
            cap = 2 * len(self._keys)
            self._vecs = np.concatenate([self._vecs, np.zeros((cap - len(self._keys), self.dim), np.float32)])
            self._keys = np.concatenate([self._keys, np.full(cap - len(self._keys), -1, np.int64)])
        self._top += 1
        return self._top - 1

    # ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """Load many vectors at once: inside the block searches are exact and no IVF is trained or
        updated; on exit the IVF is (re)built once if the size calls for one."""
        self._bulk, self._ivf = True, None
        try:
            yield
        finally:
            self._bulk = False
            self._trained_on = 0
            self._maybe_rebuild()

    def _maybe_rebuild(self) -> None:
        if self._bulk:
            return
        s = self.settings
        n = len(self._row)
        if s.kind == "exact":
            return
        if self._ivf is None:
            if n >= (1 if s.kind == "ivf" else s.exact_below) and n >= 2:
                self.rebuild()
        elif n >= s.retrain_growth * max(self._trained_on, 1):
            self.rebuild()

    def rebuild(self) -> None:
        """(Re)train the IVF on the vectors present and add them all (exact search needs none)."""
        # OpenMP threads that spin while idle starve numpy's BLAS threads of the projection (and the
        # other way round): measured 110 vs 1,400 decisions/s at 10^5 identities, 2560-d, 2 cores.
        # Only effective when this is the process's first OpenMP library, as in a matcher.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import faiss

        if self.settings.threads is not None:
            faiss.omp_set_num_threads(self.settings.threads)
        live = np.flatnonzero(self._keys[:self._top] >= 0)
        n = len(live)
        nlist = int(min(max(4 * math.sqrt(n), 1), 65536, max(n // 39, 1)))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        rng = np.random.default_rng(0)
        sample = live if n <= 64 * nlist else np.sort(rng.choice(live, 64 * nlist, replace=False))
        ivf.cp.min_points_per_centroid = 1  # small indexes (kind: ivf in tests) train without warnings
        ivf.verbose = False
        ivf.train(self._vecs[sample])
        ivf.add_with_ids(self._vecs[live], live.astype(np.int64))
        ivf.nprobe = min(self.settings.nprobe, nlist)
        self._ivf, self._quantizer = ivf, quantizer
        self._trained_on = n
        log.info("identity index: IVF of %d cells over %d identities (nprobe %d)", nlist, n, ivf.nprobe)

    # ---------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` keys of highest inner product per query, scores exact, best first.

        Args:
            queries: ``float32 [B, K]``.
            k: Keys per query.

        Returns:
            ``(scores float32 [B, k], keys int64 [B, k])``; rows are padded with ``-inf`` / ``-1``
            when fewer than ``k`` keys exist (or the IVF cells searched held fewer).
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        b = q.shape[0]
        scores = np.full((b, k), -np.inf, np.float32)
        keys = np.full((b, k), -1, np.int64)
        if not self._row or b == 0:
            return scores, keys
        if self._ivf is None:
            live = self._keys[:self._top] >= 0
            sims = q @ self._vecs[:self._top].T
            sims[:, ~live] = -np.inf
            kk = min(k, int(live.sum()))
            part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < sims.shape[1] else \
                np.tile(np.arange(sims.shape[1]), (b, 1))
            rows = part
        else:
            # codes are 8-bit: fetch more than asked so that the exact re-scoring decides the last places
            _, rows = self._ivf.search(q, max(2 * k, k + 16))
        for i in range(b):
            r = rows[i][rows[i] >= 0]
            r = r[self._keys[r] >= 0]
            if not len(r):
                continue
            s = self._vecs[r] @ q[i]
            order = np.argsort(-s, kind="stable")[:k]
            scores[i, :len(order)] = s[order]
            keys[i, :len(order)] = self._keys[r[order]]
        return scores, keys

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` but always exact (brute force over every vector)."""
        ivf, self._ivf = self._ivf, None
        try:
            return self.search(queries, k)
        finally:
            self._ivf = ivf

    def suspend(self) -> Any:
        """Search exactly (and keep no IVF up to date) until :meth:`resume` is called with what this
        returns; benchmarks compare brute force with the index on one gallery."""
        ivf, self._ivf = self._ivf, None
        self._bulk, self._changed_in_bulk = True, False
        return ivf

    def resume(self, ivf: Any) -> None:
        """Undo :meth:`suspend`; the IVF is rebuilt when vectors changed meanwhile."""
        self._bulk = False
        self._ivf = ivf
        if ivf is not None and self._changed_in_bulk:
            self.rebuild()

    def scores(self, keys: np.ndarray | list[int], query: np.ndarray) -> np.ndarray:
        """Exact inner products of ``query`` (``float32 [K]``) with the vectors of ``keys``
        (``float32 [len(keys)]``). Raises KeyError for an absent key."""
        rows = np.fromiter((self._row[int(k)] for k in keys), np.int64)
        return self._vecs[rows] @ np.asarray(query, np.float32)


__all__ = ["IdentityIndex", "IndexSettings"]
