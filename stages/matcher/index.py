"""Nearest-neighbour search over identity vectors, exact while small and approximate (faiss IVF) beyond.

The matcher scores a tracklet ``x`` against an identity by the mean cosine to its prototypes,
``mean_j x·z_j`` (see :mod:`stages.matcher.matcher`). Because ``x`` is fixed that mean equals
``x·m`` with ``m = mean_j z_j``, so one vector per identity (its *mean prototype*, not normalised)
ranks identities exactly as the association rule does. :class:`IdentityIndex` keeps those vectors
(a float32 copy) and finds the top-k by inner product:

* below ``exact_below`` vectors: exact, one matrix product over all of them;
* from there on (``kind`` ``auto`` or ``ivf``): a faiss inverted-file index (Jégou et al., "Product quantization for nearest
  neighbor search", TPAMI 2011, for the IVF structure and the codes) built on a compressed copy:
  each vector is centred and projected onto the ``code_dim`` principal directions of the stored
  vectors (PCA of a sample, re-fitted at each training), then coded with 4 bits per dimension
  (a product quantiser with one dimension per sub-quantiser, scanned with faiss' SIMD "fast-scan"
  kernels, André et al., "Quicker ADC", TPAMI 2019); what is coded is each vector's offset from its
  cell's centroid (the IVF-ADC scheme of Jégou et al.), not the vector. ``nlist ≈ 2·√N`` cells;
  ``nprobe`` of them are scanned per query; the ``fetch`` best codes are scored exactly from the
  float32 copy (when ``fetch`` exceeds ``max(2k, 128)`` they are first re-ranked on the projected
  float32 vectors and only the best ``max(2k, 128)`` are scored), so the codes only decide *which*
  vectors are looked at, never a score. Since ``q·v = q·(v - μ) + q·μ`` and ``q·μ`` is the same
  for every ``v``, centring changes no ranking. The IVF is retrained when the index has grown
  ``retrain_growth``-fold since it was trained;
* or, with ``kind`` ``gpu``, from ``exact_below`` on: a copy of the vectors on a torch device
  (float16 on a CUDA device, float32 elsewhere), scored by one matrix product per batch of queries
  and a top-k there (:class:`DeviceCopy`). It picks the ``max(fetch, k)`` best rows per query, which
  are then scored exactly from the float32 copy as the IVF's are; so this search is exact but for
  rows whose rank the device's float16 rounding moves across the ``fetch`` boundary, and needs no
  hot tier.

Updates are incremental and cheap: :meth:`upsert` replaces an identity's vector (a link changed its
prototypes, a merge or split changed its members), :meth:`remove` drops it (merged away, purged,
archived). While the IVF is in use, changed vectors are first held in a small *pending* buffer that
every search scans exactly (one matrix product per batch of queries), and are written into the IVF
``flush_every`` at a time (one faiss addition, or one device write, per flush, instead of one per link); so a search
always sees every vector as it is now. The entries a flush replaces stay in the IVF under their old
id (an IVF id is ``generation << 31 | row``, and a row's generation grows when its entry is
replaced), skipped by every search, and are removed in one faiss removal once ``compact_every``
have gathered: a removal passes over every cell however few vectors it removes (6 ms at 10^6).

Searches may run on another thread than updates inside :meth:`IdentityIndex.deferred`: there the
IVF (or the device copy) itself is left alone (flushes and retraining wait for the end of the block), so a concurrent
search sees the IVF as it was when the block began; vectors changed meanwhile may be read half
written, so the caller must score every key it changed inside the block itself (the matcher passes
them as ``also`` to :meth:`~stages.matcher.gallery.Gallery.best`).

Shapes: ``dim`` is the scoring-space dimension ``K``; vectors are ``float32 [K]``; keys are
non-negative ``int64`` identity codes below 2³¹ (the gallery's codes are dense). faiss is imported
when the first IVF is built, torch when the first device copy is.
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

_MAX_KEY = 2 ** 31


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """How :class:`IdentityIndex` searches.

    Attributes:
        kind: ``auto`` (exact below ``exact_below`` vectors, IVF above), ``exact``, ``ivf``, or ``gpu``
            (exact below ``exact_below`` vectors, a copy on the torch ``device`` above).
        exact_below: Vectors under which search is exact.
        nprobe: IVF cells searched per query (more: slower, higher recall).
        candidates: Identities retrieved per query before the matcher's exact rules apply.
        fetch: IVF codes re-scored exactly per query (the ``candidates`` best of them are returned).
        code_dim: Principal directions the IVF codes keep (4 bits each); vectors of at most this
            dimension are coded whole.
        flush_every: Changed vectors held in the exactly-searched pending buffer before they are
            written into the IVF.
        batch: Queries per index search on the matcher's online path: a polled batch is split into
            sub-batches of this size, and while one is decided the next one's candidates are searched
            on other threads (see :meth:`IdentityIndex.deferred`).
        search_threads: Threads that search a sub-batch on the online path, each a share of it with
            one faiss (OpenMP) thread (None: one per core the process may run on but the one the
            decisions run on, so 0 on one core). The decisions run on the caller's thread meanwhile;
            a sub-batch searched right away (the first of a polled batch) gets a share on the
            caller's thread too. 0: the caller's thread searches each sub-batch itself once the one
            before is decided (on one core, a search thread only takes turns with it).
        retrain_growth: Retrain the IVF once the index holds this many times the vectors it was
            trained on.
        compact_every: Out-of-date IVF entries left in place (a flush adds a changed vector's new
            entry and only marks its old one, which searches skip) before they are removed in one
            pass over the IVF.
        threads: faiss threads of searches on the caller's thread and of training (None: all cores).
        hot_s: While the IVF is in use, identities seen within this many stream seconds of the newest
            sighting are also searched exactly (most people come back soon, and the IVF can miss a
            true match whose cell it does not probe); None: the IVF alone.
        hot_max: At most this many of them, the most recently seen: an exact search costs in
            proportion to the identities it scans, and a busy site sees far more than this in an hour.
        device: The torch device of ``kind`` ``gpu`` (``cuda``, ``cuda:1``; ``cpu`` runs the same
            path without a GPU, slower than ``exact``, for tests).
    """

    kind: str = "auto"
    exact_below: int = 20000
    nprobe: int = 256
    candidates: int = 64
    fetch: int = 128
    code_dim: int = 64
    flush_every: int = 256
    batch: int = 256
    search_threads: int | None = None
    retrain_growth: float = 4.0
    compact_every: int = 4096
    threads: int | None = None
    hot_s: float | None = 3600.0
    hot_max: int = 4096
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "exact", "ivf", "gpu"):
            raise ValueError(f"index kind must be auto, exact, ivf or gpu, got {self.kind!r}")
        if not self.device:
            raise ValueError("index device must not be empty")
        for name in ("exact_below", "nprobe", "candidates", "fetch", "flush_every", "batch", "compact_every",
                     "hot_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"index {name} must be >= 1, got {getattr(self, name)}")
        if self.search_threads is not None and self.search_threads < 0:
            raise ValueError(f"index search_threads must be >= 0, got {self.search_threads}")
        if self.code_dim < 2:
            raise ValueError(f"index code_dim must be >= 2, got {self.code_dim}")
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
        self._keys = np.full(1024, -1, np.int64)      # row -> key (-1: free, or removed)
        self._row_of = np.full(1024, -1, np.int64)    # key -> row (-1: absent)
        self._free: list[int] = []
        self._top = 0  # rows [0, _top) have been used
        self._n = 0
        self._ivf: Any = None
        self._device: DeviceCopy | None = None           # kind gpu: the rows on the torch device
        self._cells = np.zeros((0, 0), np.float32)    # float32 [nlist, r]: the IVF cells' centroids
        self._mu: np.ndarray | None = None            # float32 [K], centre of the codes
        self._proj: np.ndarray | None = None          # float32 [K, r], or None: coded whole
        self._low = np.zeros((0, 0), np.float32)      # float32 [rows, r]: _code() of each row (IVF only)
        self._in_ivf = np.zeros(1024, bool)           # row has a current entry in the IVF
        self._gen = np.zeros(1024, np.int64)          # the IVF id of a row's entry is gen << 31 | row
        self._stale_ids: list[int] = []               # IVF entries out of date, skipped by searches
        self._pending = np.zeros(1024, bool)          # row's IVF entry is out of date (new, changed, removed)
        self._pending_rows: list[int] = []
        self._trained_on = 0
        self._bulk = False
        self._changed_in_bulk = False
        self._deferred = 0  # depth of deferred() blocks: no flush or retraining inside

    def __len__(self) -> int:
        return self._n

    def __contains__(self, key: int) -> bool:
        key = int(key)
        return 0 <= key < len(self._row_of) and self._row_of[key] >= 0

    def keys(self) -> np.ndarray:
        """``int64 [n]``: the keys present, in row order."""
        keys = self._keys[:self._top]
        return keys[keys >= 0]

    @property
    def approximate(self) -> bool:
        """Whether searches go through the IVF (else they are exact, or exact up to the device's
        rounding with ``kind`` ``gpu``; only the IVF needs the hot tier)."""
        return self._ivf is not None

    @property
    def mode(self) -> str:
        """How searches run now: ``ivf``, ``gpu`` (the device copy, whatever its device) or ``exact``."""
        return "ivf" if self._ivf is not None else "gpu" if self._device is not None else "exact"

    @property
    def built(self) -> bool:
        """Whether searches go through a built structure (the IVF, or the device copy of ``kind``
        ``gpu``) that stays unchanged inside :meth:`deferred` blocks: such searches are worth running
        on search threads while the caller decides (the matcher's online path)."""
        return self._ivf is not None or self._device is not None

    def _rows(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys`` (``int64 [B]``); raises KeyError for an absent key."""
        ok = (keys >= 0) & (keys < len(self._row_of))
        rows = np.full(len(keys), -1, np.int64)
        rows[ok] = self._row_of[keys[ok]]
        if (rows < 0).any():
            raise KeyError(int(keys[np.argmax(rows < 0)]))
        return rows

    @property
    def rows_used(self) -> int:
        """Rows an exact search scans: those of present keys plus the free ones among them."""
        return self._top

    def vectors(self, keys: np.ndarray) -> np.ndarray:
        """The stored vectors of ``keys`` (``int64 [B]``): ``float32 [B, K]``, a copy. Raises KeyError
        when one is absent."""
        return self._vecs[self._rows(np.asarray(keys, np.int64).reshape(-1))]

    def vector(self, key: int) -> np.ndarray:
        """The stored vector of ``key`` (a copy). Raises KeyError when absent."""
        return self._vecs[self._rows(np.array([int(key)], np.int64))[0]].copy()

    # ---------------------------------------------------------------------------------------------
    def upsert(self, keys: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Insert or replace the vectors of ``keys`` (``int64 [B]``, ``float32 [B, K]``).

        Raises:
            ValueError: Shapes disagree, or a key is negative or not below 2³¹.
        """
        keys = np.asarray(keys, np.int64).reshape(-1)
        vectors = np.asarray(vectors, np.float32).reshape(len(keys), -1) if len(keys) else \
            np.zeros((0, self.dim), np.float32)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index {self.dim}")
        if not len(keys):
            return
        lo, hi = (int(keys[0]),) * 2 if len(keys) == 1 else (int(keys.min()), int(keys.max()))  # one: a link
        if lo < 0 or hi >= _MAX_KEY:
            raise ValueError("index keys must be >= 0 and < 2**31")
        if hi >= len(self._row_of):
            grown = np.full(max(2 * len(self._row_of), hi + 1), -1, np.int64)
            grown[:len(self._row_of)] = self._row_of
            self._row_of = grown
        rows = self._row_of[keys].copy()
        new = np.flatnonzero(rows < 0)
        if len(new) > 1:  # many new keys (a bulk load): room for all of them in one reallocation
            self._reserve(self._top + len(new) - len(self._free))
        for i in new.tolist():
            key = int(keys[i])
            row = self._row_of[key]  # a key repeated within this call
            if row < 0:
                row = self._free.pop() if self._free else self._grow()
                self._row_of[key] = row
                self._keys[row] = key
                self._n += 1
            rows[i] = row
        self._vecs[rows] = vectors
        if self._bulk:
            self._changed_in_bulk = True
        elif self.built:
            self._mark(rows)
        self._maybe_rebuild()

    def remove(self, keys: np.ndarray | list[int]) -> int:
        """Drop ``keys`` (absent ones are ignored); returns how many were present."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        keys = keys[(keys >= 0) & (keys < len(self._row_of))]
        rows = np.unique(self._row_of[keys])
        rows = rows[rows >= 0]
        if not len(rows):
            return 0
        self._row_of[self._keys[rows]] = -1
        self._keys[rows] = -1
        self._vecs[rows] = 0
        self._n -= len(rows)
        if self.built and not self._bulk:
            self._mark(rows)  # freed once the IVF (or the device copy) has forgotten them
        else:
            self._changed_in_bulk = self._changed_in_bulk or self._bulk
            self._free.extend(rows.tolist())
        return len(rows)

    def _mark(self, rows: np.ndarray) -> None:
        if len(rows) == 1:  # one link's change: no array operations
            row = int(rows[0])
            if not self._pending[row]:
                self._pending[row] = True
                self._pending_rows.append(row)
        else:
            fresh = rows[~self._pending[rows]]
            self._pending[fresh] = True
            self._pending_rows.extend(np.unique(fresh).tolist())
        if len(self._pending_rows) >= self.settings.flush_every and not self._deferred:
            self.flush()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Block in which the IVF is not changed: flushes of the pending buffer and retraining wait
        until the block ends, so that :meth:`search` may run on another thread meanwhile (faiss
        searches are read-only; upserts and removals only touch the float32 copy and the pending
        buffer, and freed rows are not reused until the next flush). Blocks nest."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
            if not self._deferred:
                if len(self._pending_rows) >= self.settings.flush_every:
                    self.flush()
                self._maybe_rebuild()

    def flush(self) -> int:
        """Write the pending changes into the IVF (one addition) or the device copy (one write);
        returns how many rows changed. Searches are the same before and after: pending vectors are
        searched exactly.

        The entries the changes replace stay in the IVF, marked out of date (searches skip them), and
        are removed together once ``compact_every`` have gathered: a faiss removal passes over every
        cell, whatever the number of vectors removed. The device copy is written in place."""
        if not self.built or not self._pending_rows:
            return 0
        rows = np.asarray(sorted(set(self._pending_rows)), np.int64)
        if self._device is not None:
            live = self._keys[rows] >= 0
            self._device.write(rows, self._vecs[rows], live)  # a removed row's vector is zero, its score -inf
            self._free.extend(rows[~live].tolist())
            self._pending[rows] = False
            self._pending_rows = []
            return len(rows)
        old = rows[self._in_ivf[rows]]
        if len(old):
            self._stale_ids.extend(self._ivf_ids(old).tolist())
            self._in_ivf[old] = False
            self._gen[old] += 1  # a freed row taken by another key gets a new id as well
        live = rows[self._keys[rows] >= 0]
        if len(live):
            if len(self._low) < len(self._vecs):
                self._low = np.concatenate([self._low, np.zeros((len(self._vecs) - len(self._low), self._low.shape[1]),
                                                                np.float32)])
            self._low[live] = self._code(self._vecs[live])
            self._ivf.add_with_ids(self._low[live], self._ivf_ids(live))
            self._in_ivf[live] = True
        self._free.extend(rows[self._keys[rows] < 0].tolist())
        self._pending[rows] = False
        self._pending_rows = []
        if len(self._stale_ids) >= self.settings.compact_every:
            self.compact()
        return len(rows)

    def compact(self) -> int:
        """Remove the out-of-date IVF entries (one faiss removal); returns how many. Only outside
        :meth:`deferred` blocks, as any change of the IVF."""
        if self._ivf is None or not self._stale_ids or self._deferred:
            return 0
        import faiss

        n = int(self._ivf.remove_ids(faiss.IDSelectorBatch(np.asarray(self._stale_ids, np.int64))))
        self._stale_ids = []
        return n

    def _ivf_ids(self, rows: np.ndarray) -> np.ndarray:
        """The IVF ids of the current entries of ``rows`` (``int64``)."""
        return (self._gen[rows] << 31) | rows

    def _grow(self) -> int:
        """A new row at the top (the arrays doubled when full)."""
        if self._top == len(self._keys):
            self._reserve(2 * len(self._keys))
        self._top += 1
        return self._top - 1

    def _reserve(self, rows: int) -> None:
        """Room for at least ``rows`` rows (at least doubled when it grows: each doubling copies the
        float32 copy, 1 GB at 10^6 identities of 256-d)."""
        if rows > len(self._keys):
            cap = max(rows, 2 * len(self._keys))
            extra = cap - len(self._keys)
            self._vecs = np.concatenate([self._vecs, np.zeros((extra, self.dim), np.float32)])
            self._keys = np.concatenate([self._keys, np.full(extra, -1, np.int64)])
            self._in_ivf = np.concatenate([self._in_ivf, np.zeros(extra, bool)])
            self._gen = np.concatenate([self._gen, np.zeros(extra, np.int64)])
            self._pending = np.concatenate([self._pending, np.zeros(extra, bool)])

    # ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """Load many vectors at once: inside the block searches are exact and no IVF is trained or
        updated; on exit the IVF is (re)built once if the size calls for one."""
        self._drop_ivf()
        self._bulk = True
        try:
            yield
        finally:
            self._bulk = False
            self._trained_on = 0
            self._maybe_rebuild()

    def _drop_ivf(self) -> None:
        """Forget the IVF and the device copy (searches are exact until the next build)."""
        self._ivf = None
        self._device = None
        dead = np.asarray(self._pending_rows, np.int64)
        if len(dead):
            self._free.extend(dead[self._keys[dead] < 0].tolist())
            self._pending[dead] = False
        self._pending_rows = []
        self._in_ivf[:] = False
        self._gen[:] = 0
        self._stale_ids = []

    def _maybe_rebuild(self) -> None:
        if self._bulk or self._deferred:
            return
        s = self.settings
        n = self._n
        if s.kind == "exact":
            return
        if s.kind == "gpu":  # built once; the copy grows with the rows, with no training to redo
            if self._device is None and n >= s.exact_below:
                self.rebuild()
            return
        if self._ivf is None:
            if n >= (1 if s.kind == "ivf" else s.exact_below) and n >= 2:
                self.rebuild()
        elif n >= s.retrain_growth * max(self._trained_on, 1):
            self.rebuild()

    def _code(self, v: np.ndarray) -> np.ndarray:
        """What the IVF holds of stored vectors ``float32 [B, K]``: centred, projected, ``[B, r]``."""
        c = v - self._mu
        return np.ascontiguousarray(c if self._proj is None else c @ self._proj, np.float32)

    def rebuild(self) -> None:
        """(Re)train the IVF (projection, cells, codes) on the vectors present and add them all; with
        ``kind`` ``gpu``, copy them all to the device instead.

        Raises:
            DeviceUnavailable: ``kind`` ``gpu`` and the device cannot be used.
        """
        if self.settings.kind == "gpu":
            self._drop_ivf()
            live = np.flatnonzero(self._keys[:self._top] >= 0)
            copy = DeviceCopy(self.dim, self.settings.device)
            for s in range(0, len(live), 65536):  # in slices, as the IVF's codes: bounded host copies
                rows = live[s:s + 65536].astype(np.int64)
                copy.write(rows, self._vecs[rows], np.ones(len(rows), bool))
            self._device = copy
            self._trained_on = len(live)
            log.info("identity index: copy of %d identities on %s (%s)", len(live), copy.device, copy.dtype)
            return
        # OpenMP threads that spin while idle starve numpy's BLAS threads of the projection (and the
        # other way round): measured 110 vs 1,400 decisions/s at 10^5 identities, 2560-d, 2 cores.
        # Only effective when this is the process's first OpenMP library, as in a matcher.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import faiss

        if self.settings.threads is not None:
            faiss.omp_set_num_threads(self.settings.threads)
        self._drop_ivf()
        live = np.flatnonzero(self._keys[:self._top] >= 0)
        n = len(live)
        nlist = int(min(max(2 * math.sqrt(n), 1), 65536, max(n // 39, 1)))
        rng = np.random.default_rng(0)
        sample = self._vecs[live if n <= 64 * nlist else np.sort(rng.choice(live, 64 * nlist, replace=False))]
        self._mu = sample.mean(axis=0).astype(np.float32)
        r = min(self.settings.code_dim, self.dim)
        r -= r % 2  # fast-scan codes come in pairs of dimensions
        if r < self.dim:
            c = (sample - self._mu).astype(np.float64)
            w, v = np.linalg.eigh(c.T @ c)
            self._proj = np.ascontiguousarray(v[:, np.argsort(-w)[:r]], np.float32)
        else:
            self._proj, r = None, self.dim
        # 4-bit fast-scan codes need 16 training points per cell of each sub-quantiser; tiny indexes
        # (kind: ivf in tests) keep their projected vectors whole
        codes = f"PQ{r}x4fs" if len(sample) >= 1024 and r % 2 == 0 else "Flat"
        ivf = faiss.index_factory(r, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
        if codes != "Flat":
            # code each vector's offset from its cell's centroid, not the vector itself: the offsets
            # spread far less, so 4 bits per dimension rank them well enough that the best 128 codes
            # hold what the best 1,024 did (faiss' default for inner product codes the vectors)
            ivf.by_residual = True
        ivf.cp.min_points_per_centroid = 1  # small indexes train without warnings
        ivf.verbose = False
        ivf.train(self._code(sample))
        self._low = np.zeros((len(self._vecs), r), np.float32)
        for s in range(0, n, 65536):  # in slices: a 10^6 gallery's float32 copy is 1 GB
            rows = live[s:s + 65536]
            self._low[rows] = self._code(self._vecs[rows])
            ivf.add_with_ids(self._low[rows], self._ivf_ids(rows.astype(np.int64)))
        ivf.nprobe = min(self.settings.nprobe, nlist)
        # the cells' centroids, for the coarse step of a search (see :meth:`_probe`)
        self._cells = np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, nlist), np.float32)
        self._ivf = ivf
        self._in_ivf[live] = True
        self._trained_on = n
        log.info("identity index: IVF of %d cells over %d identities (%s codes of %d dimensions, nprobe %d)",
                 nlist, n, codes, r, ivf.nprobe)

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
        return self._search(queries, k, self._ivf, self._device)

    def _search(self, queries: np.ndarray, k: int, ivf: Any, device: DeviceCopy | None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` through ``ivf`` or ``device`` (both None: exact)."""
        q, scores, keys = _padding(queries, k)
        b = q.shape[0]
        if not self._n or b == 0:
            return scores, keys
        if ivf is None and device is None:
            sims, _ = self._exact_scores(q)
            return self._top_k(sims, np.broadcast_to(np.arange(sims.shape[1]), sims.shape), k)
        if device is not None:
            rows = device.search(q, max(self.settings.fetch, k))
            # skip padding and rows pending (their copy on the device is out of date)
            rows = np.where((rows >= 0) & ~self._pending[np.maximum(rows, 0)], rows, -1)
        else:
            qc = q if self._proj is None else np.ascontiguousarray(q @ self._proj)
            cells, bias = self._probe(qc)
            _, ids = ivf.search_preassigned(qc, max(self.settings.fetch, k), cells, bias)
            rows = np.where(ids >= 0, ids & (_MAX_KEY - 1), 0)
            # skip padding, out-of-date entries (a later one of the row holds its vector) and rows pending
            rows = np.where((ids >= 0) & (self._ivf_ids(rows) == ids) & self._in_ivf[rows] & ~self._pending[rows],
                            rows, -1)
            # re-score in two steps, each reading few bytes: the codes' rank is refined on the r-dim float
            # copy, then the best of those are scored exactly on the K-dim vectors
            keep = min(max(2 * k, 128), rows.shape[1])
            if keep < rows.shape[1]:
                approx = _scores_by_row(qc, self._low, rows)
                rows = np.take_along_axis(rows, np.argpartition(-approx, keep - 1, axis=1)[:, :keep], axis=1)
        sims = _scores_by_row(q, self._vecs, rows)
        sims[self._keys[np.maximum(rows, 0)] < 0] = -np.inf
        pend = np.asarray(self._pending_rows, np.int64)
        pend = pend[self._keys[pend] >= 0]
        if len(pend):  # the same rows for every query: one matrix product
            sims = np.concatenate([sims, q @ self._vecs[pend].T], axis=1)
            rows = np.concatenate([rows, np.broadcast_to(pend, (b, len(pend)))], axis=1)
        return self._top_k(sims, rows, k)

    def _exact_scores(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inner products of queries ``float32 [B, K]`` with every used row: ``(float32 [B, rows], the
        row-to-key array they were masked with)``, ``-inf`` at free rows. The arrays are read once:
        another thread may add rows meanwhile."""
        top, vecs, keys_of = self._top, self._vecs, self._keys
        sims = q @ vecs[:top].T
        sims[:, keys_of[:top] < 0] = -np.inf
        return sims, keys_of

    def _probe(self, qc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The IVF cells a search scans: the ``nprobe`` of highest inner product between each coded
        query (``float32 [B, r]``) and the cells' centroids, as ``(cells int64 [B, nprobe], scores
        float32 [B, nprobe])``, unordered. The same cells faiss' own coarse step picks, found by one
        matrix product and a partial sort: 0.007 against 0.048 ms a query at 10^6 identities (2,000
        cells, nprobe 256, one core), where faiss keeps a heap per query."""
        nprobe = self._ivf.nprobe
        sims = qc @ self._cells.T
        if nprobe < sims.shape[1]:
            cells = np.argpartition(-sims, nprobe - 1, axis=1)[:, :nprobe]
        else:
            cells = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
        return np.ascontiguousarray(cells, np.int64), np.ascontiguousarray(np.take_along_axis(sims, cells, axis=1))

    def _top_k(self, sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` of each row of ``sims`` (``[B, F]``, ``-inf``: no candidate) as scores and keys."""
        b, f = sims.shape
        kk = min(k, f)
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < f else np.broadcast_to(np.arange(f), (b, f))
        top = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        picked = np.take_along_axis(np.asarray(rows)[np.arange(b)[:, None], part], order, axis=1)
        scores = np.full((b, k), -np.inf, np.float32)
        keys = np.full((b, k), -1, np.int64)
        ok = np.isfinite(top)
        scores[:, :kk] = np.where(ok, top, -np.inf)
        keys[:, :kk] = np.where(ok, self._keys[np.maximum(picked, 0)], -1)
        return scores, keys

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` but always exact (brute force over every vector)."""
        return self._search(queries, k, None, None)

    def search_above(self, queries: np.ndarray, k: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`exact_search`, but only scores of at least ``floor`` are returned. Cheaper than
        a partial sort of every query's scores when few pass, as with a join threshold (the matcher's
        hot tier).

        Args:
            queries: ``float32 [B, K]``.
            k: Keys per query.
            floor: Lowest inner product kept (``-inf``: all).

        Returns:
            ``(scores float32 [B, k], keys int64 [B, k])``, best first, the rest of each row padded
            with ``-inf`` / ``-1``.
        """
        q, scores, keys = _padding(queries, k)
        b = q.shape[0]
        if not self._n or b == 0:
            return scores, keys
        sims, keys_of = self._exact_scores(q)
        passed = sims >= floor
        if not np.isfinite(floor) or np.count_nonzero(passed) > k * b // 4:  # many: a partial sort of each row
            s, r = self._top_k(sims, np.broadcast_to(np.arange(sims.shape[1]), sims.shape), k)
            return np.where(s >= floor, s, np.float32(-np.inf)), np.where(s >= floor, r, -1)
        qi, col = np.nonzero(passed)
        val = sims[qi, col]
        order = np.lexsort((-val, qi))  # by query, best first
        qi, col, val = qi[order], col[order], val[order]
        rank = np.arange(len(qi)) - np.searchsorted(qi, np.arange(b))[qi]
        keep = rank < k
        scores[qi[keep], rank[keep]] = val[keep]
        keys[qi[keep], rank[keep]] = keys_of[col[keep]]
        return scores, keys

    def suspend(self) -> Any:
        """Search exactly (and keep no IVF or device copy up to date) until :meth:`resume` is called
        with what this returns; benchmarks compare brute force with the index on one gallery."""
        self.flush()
        saved = (self._ivf, self._device)
        self._ivf = self._device = None
        self._bulk, self._changed_in_bulk = True, False
        return saved

    def resume(self, saved: Any) -> None:
        """Undo :meth:`suspend`; the IVF (or device copy) is rebuilt when vectors changed meanwhile."""
        self._bulk = False
        self._ivf, self._device = saved
        if self.built and self._changed_in_bulk:
            self.rebuild()

    def scores(self, keys: np.ndarray | list[int], query: np.ndarray) -> np.ndarray:
        """Exact inner products of ``query`` (``float32 [K]``) with the vectors of ``keys``
        (``float32 [len(keys)]``). Raises KeyError for an absent key."""
        rows = self._rows(np.asarray(keys, np.int64).reshape(-1))
        return self._vecs[rows] @ np.asarray(query, np.float32)

    def scores_many(self, keys: np.ndarray | list[int], queries: np.ndarray) -> np.ndarray:
        """Exact inner products of ``queries`` (``float32 [B, K]``) with the vectors of ``keys``:
        ``float32 [B, len(keys)]`` (one matrix product). Raises KeyError for an absent key."""
        rows = self._rows(np.asarray(keys, np.int64).reshape(-1))
        return np.asarray(queries, np.float32) @ self._vecs[rows].T


class DeviceUnavailable(RuntimeError):
    """``kind`` ``gpu``: torch is missing, or the configured device cannot be used."""


def check_device(device: str) -> str:
    """Check that ``device`` (a torch device string: ``cuda``, ``cuda:1``, ``cpu``) can hold an index
    copy; returns its canonical name. Imports torch.

    Raises:
        DeviceUnavailable: torch is not installed, the string is no torch device, or the device is a
            CUDA one that this process cannot use (no CUDA build, no GPU, or no GPU of that number).
    """
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency of the package
        raise DeviceUnavailable(f"matcher.index.kind gpu needs torch: {exc}") from exc
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise DeviceUnavailable(f"matcher.index.device {device!r} is no torch device: {exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"matcher.index.device {device!r}: no CUDA device is usable here "
                                    "(torch.cuda.is_available() is False); set matcher.index.kind to auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"matcher.index.device {device!r}: this process sees "
                                    f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise DeviceUnavailable(f"matcher.index.device {device!r}: only cuda and cpu devices are supported")
    return str(dev)


class DeviceCopy:
    """The index's rows on a torch device, for ``kind`` ``gpu``: a ``[capacity, K]`` matrix (float16 on
    CUDA, float32 on the CPU) and a ``[capacity]`` bias that is 0 at live rows and ``-inf`` at free
    or removed ones. A search is brute force: per chunk of rows one ``addmm`` (bias plus the queries'
    inner products) and a top-k, then a top-k of the chunks' winners; only row numbers come back, the
    scores are recomputed exactly by :class:`IdentityIndex` from its float32 copy.

    Writes (:meth:`write`) and searches must not overlap: the index writes only in a flush, and
    flushes wait for the end of :meth:`IdentityIndex.deferred` blocks, inside which searches may run
    on other threads.

    Args:
        dim: Vector dimension ``K``.
        device: A torch device string (see :func:`check_device`).
        half: Keep the matrix in float16 (None: on CUDA devices only; float16 on the CPU is slow
            and serves to check the rounding without a GPU).

    Raises:
        DeviceUnavailable: See :func:`check_device`.
    """

    chunk = 1 << 18  # rows scored per matrix product: 256 queries x 2^18 rows of float16 are 128 MiB

    def __init__(self, dim: int, device: str, half: bool | None = None) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(check_device(device))
        if half is None:
            half = self.device.type == "cuda"
        self.dtype = torch.float16 if half else torch.float32
        self.dim = dim
        self._m = torch.zeros((0, dim), dtype=self.dtype, device=self.device)
        self._bias = torch.zeros(0, dtype=self.dtype, device=self.device)
        self._used = 0  # rows [0, _used) have been written

    def __len__(self) -> int:
        return self._used

    def write(self, rows: np.ndarray, vectors: np.ndarray, live: np.ndarray) -> None:
        """Set ``rows`` (``int64 [B]``, distinct) to ``vectors`` (``float32 [B, K]``) and mark them live
        or not (``bool [B]``: a row not live never comes back from a search)."""
        torch = self._torch
        if not len(rows):
            return
        need = int(rows.max()) + 1
        if need > self._m.shape[0]:
            cap = max(need, 2 * self._m.shape[0], 1024)
            m = torch.zeros((cap, self.dim), dtype=self.dtype, device=self.device)
            bias = torch.full((cap,), float("-inf"), dtype=self.dtype, device=self.device)
            m[:self._used] = self._m[:self._used]
            bias[:self._used] = self._bias[:self._used]
            self._m, self._bias = m, bias
        r = torch.from_numpy(np.ascontiguousarray(rows, np.int64)).to(self.device)
        self._m[r] = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(self.device, self.dtype)
        self._bias[r] = torch.from_numpy(np.where(live, 0.0, -np.inf).astype(np.float32)).to(self.device, self.dtype)
        self._used = max(self._used, need)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The rows of the ``k`` highest inner products per query (``float32 [B, K]``): ``int64
        [B, min(k, rows written)]``, best first by the device's arithmetic, ``-1`` where fewer live
        rows exist."""
        torch = self._torch
        n = self._used
        if not n:
            return np.full((len(queries), 0), -1, np.int64)
        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(self.device, self.dtype)
            best, where = [], []
            for s in range(0, n, self.chunk):
                e = min(s + self.chunk, n)
                sims = torch.addmm(self._bias[s:e], q, self._m[s:e].T)
                v, i = torch.topk(sims, min(k, e - s), dim=1)
                best.append(v)
                where.append(i + s)
            v, r = (best[0], where[0]) if len(best) == 1 else (torch.cat(best, 1), torch.cat(where, 1))
            if v.shape[1] > k:
                v, j = torch.topk(v, k, dim=1)
                r = torch.gather(r, 1, j)
            r = torch.where(torch.isfinite(v), r, torch.full_like(r, -1))
            return r.cpu().numpy().astype(np.int64, copy=False)


def _padding(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries as ``float32 [B, K]`` (contiguous), and empty results for them: ``-inf`` scores
    ``float32 [B, k]`` and ``-1`` keys ``int64 [B, k]``."""
    q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
    return q, np.full((q.shape[0], k), -np.inf, np.float32), np.full((q.shape[0], k), -1, np.int64)


def _scores_by_row(queries: np.ndarray, vecs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``float32 [B, F]``: the inner product of each query (``float32 [B, K]``) with the rows
    ``rows[b]`` (``int64 [B, F]``, ``-1``: none, scored ``-inf``) of ``vecs`` (``float32 [N, K]``).
    One faiss call (``fvec_inner_products_by_idx``), which reads the rows in place and releases the
    GIL, so the matcher's thread keeps deciding while a search thread re-scores; a numpy gather and
    product copied the rows and held the GIL for the gather (9.5 against 23 µs a query for 128 rows
    of 256 dimensions, one core). ``vecs`` must be C-contiguous ``float32``."""
    import faiss

    q = np.ascontiguousarray(queries, np.float32)
    ids = np.ascontiguousarray(rows, np.int64)
    out = np.empty(ids.shape, np.float32)
    # `vecs` is held by this frame for the call, so an index that grows meanwhile frees no row read here
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(vecs),
                                     faiss.swig_ptr(ids), q.shape[1], ids.shape[0], ids.shape[1])
    return out


__all__ = ["DeviceCopy", "DeviceUnavailable", "IdentityIndex", "IndexSettings", "check_device"]
