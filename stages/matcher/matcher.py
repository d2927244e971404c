"""Cross-camera matcher: assign each embedded tracklet a global identity, and keep them right.

``reidstream matcher --config C`` consumes the ``embeddings`` topic; a :class:`CrossCameraMatcher`
owns one zone's identities (:mod:`stages.matcher.zones` holds one per zone an instance is assigned).
Two decisions, one rule set (:mod:`stages.matcher.association`):

**Online, per tracklet** (within the latency budget). For a tracklet ``x`` of camera ``c`` spanning
``[start_s, end_s]``:

1. Its embedding is mapped into the site's *scoring space* (centred on the site's mean embedding and
   projected onto its principal directions, fitted by the last re-association or a calibration).
2. **Candidates** are the gallery's identities (:mod:`stages.matcher.gallery`: every identity seen
   within ``gallery_ttl_s``, in memory; older ones are archived in Redis) none of whose members is
   cannot-linked to ``x``: on camera ``c`` a member may not overlap ``x`` in time (and with ``reentry``
   off no member may be on ``c`` at all); on another camera a member may overlap ``x`` by at most
   ``max_overlap_s``, or, for a camera pair of the configured topology, must leave at least
   ``min_transit_s`` between them. The gallery's index (:mod:`stages.matcher.index`: exact below
   ``index.exact_below`` identities, faiss IVF above, plus an exact hot tier of recent identities)
   only *finds* candidates; these rules and the score below are applied exactly to them.
3. An identity's **score** is the mean cosine between ``x`` and its prototypes (per camera, the
   ``prototypes_per_camera`` longest-observed members): the average linkage of the re-association.
   A learned (or configured) hand-off gap adds up to ``transit.weight`` per prototype.
4. ``x`` **joins** the best candidate when its score is at least the threshold (calibrated label-free:
   see :mod:`stages.matcher.calibration`), else it **founds** a new identity.

**Re-association, periodic** (every ``reassociation.every_s`` while tracklets arrive, and once
``reassociation.idle_s`` pass without any). The whole recent window (``window_s`` stream seconds, at
most ``max_tracklets``) is re-scored in a scoring space fitted on it, the threshold is recalibrated on
it when it holds enough cannot-link evidence, hand-off gaps are learned from a first clustering, and
the constrained average linkage is run again with them; operators' splits are cannot-links and their
merges are kept joined. The result depends only on the window's tracklets (not on their arrival
order). Clusters map onto the existing ids so that ids stay stable: an id stays with the cluster
holding most of its members, a merge keeps the oldest id, a split gives the breakaway part a new id.
Moves, identity updates and one audit record per merge or split are written to Redis in one
transaction; ``query``, the API, ``links.json`` and the report read the *current* id. The new scoring
space is rotated onto the old one (same cosines), and the prototypes of identities outside the window
are carried into it by the affine change of space when it moved by more than
:data:`REEXPRESS_TOLERANCE`.

Replaying a message changes nothing (a tracklet id already linked is skipped), and re-associating an
unchanged window changes nothing. The runner commits Kafka offsets only after :meth:`process` returns,
i.e. after Redis has the link. Operators' merges and splits (audit records with ``reason: operator``)
are taken in before each batch and when idle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from pipeline import metrics
from pipeline.config import Config, ReassociationConfig
from pipeline.messages import EmbeddingRecord
from pipeline.runner import Output, TransientError
from pipeline.store import DEFAULT_ZONE, IdentityStore, Link, Reassignment, WindowEntry
from stages.matcher.association import Rules, ScoringSpace, associate
from stages.matcher.gallery import Candidates, Gallery, Member
from stages.matcher.index import IndexSettings

log = logging.getLogger(__name__)

STAGE = "matcher"


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where a tracklet goes: ``global_id`` (None: found a new one) and its mean ``score``."""

    global_id: str | None
    score: float | None


@dataclasses.dataclass(frozen=True)
class _Staged:
    """A link decided and applied in memory whose write to Redis is queued (see :meth:`CrossCameraMatcher.process`).

    ``embedding``: ``float32 [D]`` as stored; ``decide_s``: seconds the decision took; ``joined``: the
    tracklet joined an identity (else it founded ``link.global_id``)."""

    link: Link
    embedding: np.ndarray
    thumbnail: bytes | None
    quality: int
    decide_s: float
    joined: bool


@dataclasses.dataclass(frozen=True)
class ReassociationResult:
    """What one re-association did.

    Attributes:
        tracklets: Window size.
        identities: Identities in the window afterwards.
        threshold: Threshold used.
        calibrated: Whether the threshold was recalibrated on this window.
        merges: Identities merged into another.
        splits: Identities that lost part of their members to another.
        moved: Tracklets whose global id changed.
        seconds: Wall time.
    """

    tracklets: int
    identities: int
    threshold: float
    calibrated: bool
    merges: int
    splits: int
    moved: int
    seconds: float


class _Window:
    """The recent tracklets (the re-association's input), column-wise: ids, cameras, times, quality,
    current global id, raw embedding ``float32 [N, D]`` and projected scoring-space vector ``y``
    (``float32 [K]``, un-normalised: see :meth:`ScoringSpace.project`) and arrival order."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.cams: list[str] = []
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.quality: list[int] = []
        self.gids: list[str] = []
        self.emb: list[np.ndarray] = []
        self.y: list[np.ndarray] = []
        self.arrival: list[int] = []
        self.index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, e: WindowEntry, y: np.ndarray, arrival: int) -> None:
        self.index[e.tracklet_id] = len(self.ids)
        self.ids.append(e.tracklet_id)
        self.cams.append(e.camera)
        self.starts.append(e.start_s)
        self.ends.append(e.end_s)
        self.quality.append(e.quality)
        self.gids.append(e.global_id)
        self.emb.append(np.asarray(e.embedding, np.float32))
        self.y.append(y)
        self.arrival.append(arrival)

    def member(self, i: int) -> Member:
        return Member(self.ids[i], self.cams[i], self.starts[i], self.ends[i], self.quality[i], self.y[i],
                      self.arrival[i])

    def groups(self, rows: Iterable[int] | None = None) -> dict[str, list[Member]]:
        """Members per global id (all rows, or ``rows``)."""
        out: dict[str, list[Member]] = defaultdict(list)
        for i in (range(len(self.ids)) if rows is None else rows):
            out[self.gids[i]].append(self.member(i))
        return out

    def keep(self, rows: np.ndarray) -> None:
        """Keep only ``rows`` (indices, in the order given)."""
        for name in ("ids", "cams", "starts", "ends", "quality", "gids", "emb", "y", "arrival"):
            col = getattr(self, name)
            setattr(self, name, [col[i] for i in rows])
        self.index = {t: i for i, t in enumerate(self.ids)}


_MIN_SHARE = 16  # fewest records worth a search call of their own (see CrossCameraMatcher._tail_share)
# records processed between two freezes of what the gallery gained (see CrossCameraMatcher._freeze_gallery)
_FREEZE_EVERY = 16384


def _running_mean(mean: float | None, value: float, weight: float = 0.2) -> float:
    """Exponentially weighted running mean (the first value starts it)."""
    return value if mean is None else mean + weight * (value - mean)


def _one_faiss_thread() -> None:
    """Initialiser of a search thread: its faiss searches run on one OpenMP thread (the setting is
    the calling thread's own), so that the search threads and the decisions share the cores."""
    import faiss

    faiss.omp_set_num_threads(1)


@contextlib.contextmanager
def _on_one_faiss_thread() -> Iterator[None]:
    """Block in which this thread's faiss searches run on one OpenMP thread (restored after)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Block without cyclic garbage collections (reference counting still frees what is dropped).
    Restoring a gallery creates a few objects per identity, 3 million at 10^6, and as the heap grows
    the collector runs a full collection each time it has grown by a quarter, each walking every
    object made so far: at 3·10^5 identities a restore took 12.1 s with them, 10.5–10.9 s without.
    The collector is back on after the block if it was on before."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _unit_queries(ys: list[np.ndarray]) -> np.ndarray:
    """Projected vectors (``float32 [K]`` each) as unit query rows, ``float32 [B, K]``, the way
    :meth:`CrossCameraMatcher._decide` normalises one."""
    z = np.stack(ys).astype(np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def search_threads(configured: int | None) -> int:
    """Search threads of the online path: as configured, else one per core this process may run on
    (its CPU affinity: a container's or ``taskset``'s share, not the machine's count) but the one the
    decisions run on; 0 on one core."""
    if configured is not None:
        return configured
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        cores = os.cpu_count() or 1
    return max(0, cores - 1)


class CrossCameraMatcher:
    """Assign tracklets to global identities (see the module docstring for the rules).

    Args:
        store: The Redis identity store.
        threshold: Score needed to join an identity until a calibration applies, in [-1, 1].
        rules: Cannot-links, scoring space and hand-off rules (default :class:`Rules`).
        prototypes_per_camera: Members per camera an identity is scored by.
        reassociation: Re-association settings (None: never re-associate).
        calibration_threshold: A calibrated threshold that replaces ``threshold`` (from a file).
        gallery_ttl_s: Identities unseen for longer (stream seconds) are no candidates and leave memory
            (they stay in Redis, searchable through the API); None keeps all.
        index: How the gallery is searched (exact below a size, faiss IVF above).
        clock: Unix-seconds clock (link times, latency metric).
        monotonic: Clock for re-association scheduling, seconds.

    Raises:
        ValueError: An argument is out of range.
    """

    def __init__(self, store: IdentityStore, threshold: float = 0.15, rules: Rules | None = None,
                 prototypes_per_camera: int = 8, reassociation: ReassociationConfig | None = None,
                 calibration_threshold: float | None = None, gallery_ttl_s: float | None = None, clock=time.time,
                 monotonic=time.monotonic, index: IndexSettings | None = None) -> None:
        rules = rules or Rules()
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [-1, 1], got {threshold}")
        if rules.max_overlap_s < 0:
            raise ValueError(f"max_overlap_s must be >= 0, got {rules.max_overlap_s}")
        if prototypes_per_camera < 1:
            raise ValueError(f"prototypes_per_camera must be >= 1, got {prototypes_per_camera}")
        self.store = store
        self.rules = rules
        self.base_threshold = threshold if calibration_threshold is None else calibration_threshold
        self.threshold = self.base_threshold
        self.prototypes_per_camera = prototypes_per_camera
        self.reassociation = reassociation
        self.gallery_ttl_s = gallery_ttl_s
        self.clock = clock
        self.monotonic = monotonic
        self.window = _Window()
        self.gallery = Gallery(prototypes_per_camera, index)
        self._arrival = 0
        self._blas: Any = None  # threadpoolctl controller, made on first use (see online())
        self._searcher: Any = None  # executor of the online path's index searches (see _search_shared)
        # seconds a search thread spends per query, and this thread per decided record (running
        # means, see _tail_share); None until measured
        self._search_s: float | None = None
        self._decide_s: float | None = None
        self._unsaved: set[str] = set()  # identities whose prototypes changed since they were saved
        self._fresh_ids: list[str] = []  # global ids reserved in Redis, not used yet (see _new_global_id)
        # tracklet id -> global id of links applied in memory whose write may have failed (see _recover)
        self._unsure: dict[str, str] = {}
        self._newest_end = -np.inf
        self._dim: int | None = None
        self._epoch = 0
        self._audit_seen: str | None = None
        self.space: ScoringSpace | None = None
        self.transit = rules.empty_transit()
        self.links_total = 0
        self._since_reassociation = 0
        self._last_reassociation = monotonic()
        self._last_arrival = monotonic()
        self._unfrozen = 0  # records processed since the gallery's objects were last frozen
        self._zone = str(getattr(store, "zone", DEFAULT_ZONE))  # no store: benchmarks of decide()
        self._identities = metrics.IDENTITIES.labels(stage=STAGE, zone=self._zone)
        self._hot_identities = metrics.HOT_IDENTITIES.labels(stage=STAGE, zone=self._zone)
        self._threshold_gauge = metrics.MATCH_THRESHOLD.labels(stage=STAGE, zone=self._zone)

    @classmethod
    def from_config(cls, cfg: Config, store: IdentityStore | None = None) -> CrossCameraMatcher:
        """Build from the ``matcher`` section (and read its calibration file, if set).

        Args:
            cfg: The config.
            store: The store (view) to use, e.g. one zone's :meth:`IdentityStore.for_zone`; None
                connects to ``cfg.store`` (the zone ``default``).

        Raises:
            CalibrationError: The calibration file is unreadable.
        """
        m = cfg.matcher
        cal = None
        if m.calibration is not None:
            from stages.matcher.calibration import read_calibration

            cal = read_calibration(m.calibration).threshold
        store = store if store is not None else IdentityStore.from_config(cfg.store)
        return cls(store, m.threshold, Rules.from_config(m), m.prototypes_per_camera,
                   m.reassociation if m.reassociation.enabled else None, cal, m.gallery_ttl_s,
                   index=IndexSettings(**m.index.model_dump()))

    # ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check Redis and restore what it holds for this matcher's zone (its store view's keys, see
        :meth:`IdentityStore.for_zone`), so that a restarted matcher, or one that was handed the zone
        after a rebalance, continues where the previous one was: the scoring space, threshold and
        hand-off gaps, the re-association window (whose identities' prototypes are recomputed from it),
        and the stored prototypes of the zone's other identities (unseen for at most ``gallery_ttl_s``).

        Raises:
            StoreError: Redis is unreachable.
        """
        t0 = time.perf_counter()
        self.store.check()
        if self.gallery.settings.kind == "gpu":  # before the restore, which may build the device copy
            from stages.matcher.index import check_device

            log.info("matcher: zone %s: identity index on %s", self._zone, check_device(self.gallery.settings.device))
        from stages.matcher import kernels

        log.debug("matcher: decision kernels ready in %.2f s", kernels.warm())
        state = self.store.matcher_state()
        if "mean" in state:
            arrays = {"mean": np.frombuffer(state["mean"], "<f4").copy()}
            if "components" in state:
                dim = int(state["dim"])
                arrays["components"] = np.frombuffer(state["components"], "<f4").reshape(-1, dim).copy()
            self.space = ScoringSpace.from_arrays(arrays)
        if "threshold" in state:
            self.threshold = float(state["threshold"])
        if "transit" in state:
            gaps = {tuple(k.split("|")): tuple(v) for k, v in json.loads(state["transit"]).items()}
            self.transit = dataclasses.replace(self.transit, gaps=gaps)
        self._epoch = int(state.get("epoch", b"0"))
        self._audit_seen = self.store.last_audit_id()  # what is in Redis now is what this loads
        with collector_paused():
            in_window = self._restore()
        self.links_total = self.store.count_zone_links()
        if self.store.reassociation_status().get("links", -1) < self.links_total:
            self._since_reassociation = 1  # links arrived after the last re-association: redo it when idle
        self._gallery_gauges()
        self._threshold_gauge.set(self.threshold)
        # the restored gallery lives as long as the matcher: out of the cyclic garbage collector's
        # sight, a full collection does not walk it (at 10^6 identities, 3 million tracked objects,
        # one took 0.9 s, every few 10^5 links); collected once first, since the restore ran without
        self._freeze_gallery()
        log.info("matcher: zone %s: %d tracklets of %d identities in the window, %d identities in the gallery "
                 "(%s search), threshold %.3f, restored in %.2f s, store %s", self.store.zone, len(self.window),
                 len(in_window), len(self.gallery),
                 self.gallery.index.mode if self.gallery.index is not None else "exact",
                 self.threshold, time.perf_counter() - t0, self.store.url)

    def _restore(self) -> set[str]:
        """The re-association window and the zone's stored prototypes into memory (see :meth:`setup`);
        returns the global ids of the window's identities."""
        window_s = self.reassociation.window_s if self.reassociation else None
        limit = self.reassociation.max_tracklets if self.reassociation else None
        entries = self.store.load_window(None, limit)
        if entries and window_s is not None:
            newest = max(e.end_s for e in entries)
            entries = [e for e in entries if e.end_s >= newest - window_s]
        for e in entries:
            self._arrival += 1
            self.window.add(e, self._project(e.embedding), self._arrival)
            self._dim = len(e.embedding)
            self._newest_end = max(self._newest_end, e.end_s)
        in_window = set(self.window.gids)
        stored = self.store.load_prototypes(exclude=in_window)
        dim = self.window.y[0].shape[0] if len(self.window) else \
            (self.space.dim if self.space is not None and self.rules.center else None)
        stale = 0
        if dim is not None:
            with self.gallery.bulk(dim):
                self.gallery.replace(self.window.groups())
                keep = {}
                for gid, (epoch, protos) in stored.items():
                    if self.gallery_ttl_s is not None and np.isfinite(self._newest_end) and \
                            max(p.end_s for p in protos) < self._newest_end - self.gallery_ttl_s:
                        continue
                    if len(protos[0].y) != dim:
                        continue  # written in another scoring space dimension: unusable
                    stale += epoch != self._epoch
                    keep[gid] = protos
                    self._newest_end = max(self._newest_end, max(p.end_s for p in protos))
                self.gallery.replace(keep)
        if stale:
            log.warning("matcher: %d stored identities have prototypes of an older scoring space (used as they are)",
                        stale)
        return in_window

    def _project(self, embedding: np.ndarray) -> np.ndarray:
        """Projected (un-normalised) scoring-space vector ``float32 [K]`` of one embedding
        (``float32 [D]``); the raw unit embedding before any scoring space is fitted (or with
        ``center`` off). Raises ValueError when ``D`` is not the scoring space's."""
        return self._project_rows(np.atleast_2d(embedding))[0]

    def _project_rows(self, x: np.ndarray) -> np.ndarray:
        """:meth:`_project` of each row of ``x`` (``float32 [N, D]``), one matrix product: ``float32 [N, K]``."""
        if self.space is None or not self.rules.center:
            x = np.asarray(x, np.float32)
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return self.space.project(x)

    def _project_batch(self, embeddings: list[np.ndarray]) -> list[np.ndarray | None]:
        """:meth:`_project` of a polled batch's embeddings (``float32 [D]`` each) in one matrix product;
        None for an embedding whose dimension is not the gallery's (:meth:`_check_dim` rejects its
        record when its turn comes). At 1,024 records of 256 dimensions: 1 ms, against 25 ms one by one.

        Raises:
            ValueError: An embedding's dimension differs from the scoring space's, as :meth:`_project`.
        """
        rows = [i for i, v in enumerate(embeddings) if self._dim is None or len(v) == self._dim]
        out: list[np.ndarray | None] = [None] * len(embeddings)
        if len({len(embeddings[i]) for i in rows}) > 1:  # a first batch of mixed dimensions: one by one
            for i in rows:
                out[i] = self._project(embeddings[i])
            return out
        if rows:
            y = self._project_rows(np.stack([embeddings[i] for i in rows]).astype(np.float32))
            for j, i in enumerate(rows):
                out[i] = y[j].copy()  # its own array: a member outlives its batch
        return out

    def _transform(self, embedding: np.ndarray) -> np.ndarray:
        """Unit scoring-space vector of one embedding, ``float32 [K]``."""
        y = self._project(embedding)
        return y / max(float(np.linalg.norm(y)), 1e-12)

    # ---------------------------------------------------------------------------------------------
    def decide(self, camera: str, start_s: float, end_s: float, embedding: np.ndarray,
               prefetched: Candidates | None = None, also: Iterable[int] = ()) -> Decision:
        """Pick the identity for a tracklet (pure: changes nothing).

        Args:
            camera: The tracklet's camera.
            start_s: First sighting, stream seconds.
            end_s: Last sighting, stream seconds.
            embedding: ``float32 [D]``, L2-normalised.
            prefetched: Gallery candidates for it, searched beforehand (:meth:`process` searches a
                whole sub-batch at once, :meth:`Gallery.candidates`).
            also: Identity codes changed since ``prefetched`` was searched (scored whatever it says).

        Returns:
            The decision; ``global_id`` None means "found a new identity".

        Raises:
            ValueError: ``embedding`` has another dimension than the gallery's.
        """
        self._check_dim(embedding.shape[0])
        with self.online():
            return self._decide(camera, start_s, end_s, self._project(embedding), prefetched, also)

    def online(self) -> contextlib.AbstractContextManager:
        """Context for the online path (decisions of a batch). While the gallery is searched through
        faiss, numpy's BLAS is held to one thread inside it: its idle workers spin and starve faiss'
        OpenMP threads of the cores (measured at 10⁶ identities on 2 cores: 1,380 embeddings/s
        without this, 2,260 with it). With the device copy (``index.kind`` ``gpu``) it is held too, so
        that the host's share of the search (exact re-scoring) runs on the search threads alone and
        the decisions keep their core (not measured: no GPU was at hand). Re-association, outside, keeps every thread."""
        index = self.gallery.index
        if index is None or not index.built:
            return contextlib.nullcontext()
        if self._blas is None:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()
        return self._blas.limit(limits=1, user_api="blas")

    def _check_dim(self, dim: int) -> None:
        if self._dim is not None and dim != self._dim:
            raise ValueError(f"embedding dimension {dim} differs from the gallery's "
                             f"{self._dim} (was the re-id model changed? use a new store namespace)")

    def _decide(self, camera: str, start_s: float, end_s: float, y: np.ndarray,
                prefetched: Candidates | None, also: Iterable[int]) -> Decision:
        """:meth:`decide` for a projected vector ``y`` (``float32 [K]``, :meth:`_project`)."""
        if not len(self.gallery):
            return Decision(None, None)
        z = y / max(float(np.linalg.norm(y)), 1e-12)
        gid, score = self.gallery.best(z, camera, start_s, end_s, self.threshold, self.rules, self.transit,
                                       self.gallery_ttl_s, prefetched, list(also))
        return Decision(gid, score)

    # ---------------------------------------------------------------------------------------------
    def _stage(self, rec: EmbeddingRecord, vec: np.ndarray, y: np.ndarray, prefetched: Any, also: Iterable[int],
               ahead: int) -> _Staged:
        """Decide where ``rec`` goes and apply the link in memory (window, gallery), so that later
        decisions see it; its write is queued (:meth:`_write`). ``vec``: the embedding as stored, ``y``:
        its projection; ``ahead``: records left in the polled batch (new ids are reserved for them).

        Raises:
            redis.ConnectionError, redis.TimeoutError: Reserving new global ids failed.
        """
        t = time.perf_counter()
        decision = self._decide(rec.camera, rec.start_s, rec.end_s, y, prefetched, also)
        gid = decision.global_id or self._new_global_id(ahead)
        link = Link(rec.tracklet_id, rec.camera, rec.track_id, gid, decision.score, rec.start_s, rec.end_s,
                    list(rec.frames), [list(b) for b in rec.boxes], rec.closed_wall_s, self.clock())
        entry = WindowEntry(rec.tracklet_id, rec.camera, rec.start_s, rec.end_s, rec.observed_frames, gid, vec)
        self._arrival += 1
        self.window.add(entry, y, self._arrival)
        if self.gallery.add(gid, self.window.member(len(self.window) - 1)):
            self._unsaved.add(gid)  # saved once per batch (process())
        self._dim = len(vec)
        self._newest_end = max(self._newest_end, rec.end_s)
        return _Staged(link, vec, rec.thumbnail_jpeg, rec.observed_frames, time.perf_counter() - t,
                       decision.global_id is not None)

    def _new_global_id(self, ahead: int) -> str:
        """A new global id, from a block reserved in Redis: as many ids as records are left in the
        polled batch, at most 64 (one round trip per block; ids a stopped matcher leaves unused are
        skipped, never given twice)."""
        if not self._fresh_ids:
            self._fresh_ids = self.store.reserve_global_ids(min(max(ahead, 1), 64))
        return self._fresh_ids.pop(0)

    def _write(self, staged: list[_Staged]) -> set[str]:
        """Write the links ``staged`` (applied in memory already) in one pipelined round trip, then
        count them. A link another matcher wrote first (the tracklet was linked since this batch's
        replay check, e.g. by the previous owner of the partition during a rebalance) is taken back:
        the identities involved are reloaded from Redis. Returns the identities reloaded.

        Raises:
            TransientError: Redis is unreachable; what this batch applied in memory is reconciled with
                Redis before the next batch (:meth:`_recover`).
            redis.RedisError: Redis refused a write (likewise reconciled).
        """
        import redis

        if not staged:
            return set()
        t = time.perf_counter()
        try:
            written = self.store.record_links([(s.link, s.embedding, s.thumbnail, s.quality) for s in staged])
        except redis.RedisError as exc:
            self._unsure.update({s.link.tracklet_id: s.link.global_id for s in staged})
            if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                raise TransientError(f"Redis unavailable: {exc}") from exc
            raise
        share = (time.perf_counter() - t) / len(staged)
        now = self.clock()
        for s, ok in zip(staged, written):
            if not ok:
                continue
            link = s.link
            self.links_total += 1
            self._since_reassociation += 1
            kind = "joined" if s.joined else "founded"
            metrics.LINKS.labels(stage=STAGE, camera=link.camera, kind=kind).inc()
            metrics.TRACKLET_LINK_LATENCY.labels(camera=link.camera).observe(max(now - link.closed_wall_s, 0.0))
            metrics.STAGE_LATENCY.labels(stage=STAGE, camera=link.camera).observe(s.decide_s + share)
            log.info("matcher: %s → %s (%s%s)", link.tracklet_id, link.global_id, kind,
                     f", score {link.score:.3f}" if link.score is not None else "", extra={"camera": link.camera})
        taken = [s for s, ok in zip(staged, written) if not ok]
        return self._take_back(taken) if taken else set()

    def _take_back(self, taken: list[_Staged]) -> set[str]:
        """Undo in memory the links ``taken``, which Redis refused because their tracklets were linked
        meanwhile: their identities here, and the ones Redis holds them in, are reloaded from Redis
        (returned)."""
        import redis

        self._unsure.update({s.link.tracklet_id: s.link.global_id for s in taken})
        for s in taken:
            log.warning("matcher: %s was linked by another matcher meanwhile; taking its identity in",
                        s.link.tracklet_id, extra={"camera": s.link.camera})
        try:
            return self._recover()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc

    def _recover(self) -> set[str]:
        """Make memory agree with Redis about the links of :attr:`_unsure` (applied here, but their
        write failed or was refused): the window drops those Redis does not hold, and every identity
        involved (as assigned here, and as Redis holds the tracklet) is reloaded from Redis (returned).

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis is unreachable (nothing changed; retried).
        """
        if not self._unsure:
            return set()
        tids = list(self._unsure)
        held = self.store.tracklet_rows(tids)  # what Redis holds of them, in one round trip
        gids = set(self._unsure.values()) | {row[0] for row in held.values()}
        lost = set(tids) - set(held)
        if lost:
            self.window.keep(np.array([i for i, t in enumerate(self.window.ids) if t not in lost], np.int64))
        self._reload(gids)
        log.info("matcher: reconciled %d links with Redis (%d not written, %d identities reloaded)",
                 len(tids), len(lost), len(gids))
        self._unsure = {}
        return gids

    def _prefetch(self, ys: list[np.ndarray | None]) -> list[Candidates | None]:
        """One search of the index and one of the hot tier for a whole batch of projected vectors
        (None: a record of another dimension, which :meth:`_check_dim` rejects), one candidate list
        per record."""
        dim = self.gallery.dim
        rows = [i for i, y in enumerate(ys) if y is not None and len(y) == dim]
        out: list[Candidates | None] = [None] * len(ys)
        if len(rows) < 2 or not len(self.gallery):
            return out
        # a hot identity under the threshold, less the largest hand-off bonus, cannot be chosen
        floor = self.threshold - max(self.rules.transit_weight, 0.0)
        for i, found in zip(rows, self.gallery.candidates(_unit_queries([ys[i] for i in rows]), floor=floor)):
            out[i] = found
        return out

    def _timed_prefetch(self, ys: list[np.ndarray | None]) -> list:
        """:meth:`_prefetch` on a search thread, keeping the running mean of its CPU seconds per query
        (CPU, not wall time: waits for the GIL, which the matcher's thread holds while it decides, are
        no search work)."""
        t = time.thread_time()
        out = self._prefetch(ys)
        if ys:
            self._search_s = _running_mean(self._search_s, (time.thread_time() - t) / len(ys))
        return out

    def _tail_share(self, searched: int, decided: int) -> int:
        """How many of the ``searched`` records of the next sub-batch this thread searches itself,
        after deciding the ``decided`` of the current one, so that it and the search threads end
        together (from the running means of their speeds): with ``n`` search threads at ``s`` seconds
        a query and this thread at ``d`` a record, ``decided·d + t·s = (searched − t)·s / n``. 0 while
        unmeasured or when fewer than :data:`_MIN_SHARE` (not worth a search call of their own); at
        most half."""
        n = search_threads(self.gallery.settings.search_threads)
        if self._search_s is None or self._decide_s is None or self._search_s <= 0 or n == 0:
            return 0
        t = round((searched * self._search_s / n - decided * self._decide_s) / (self._search_s * (1 + 1 / n)))
        return min(t, searched // 2) if t >= _MIN_SHARE else 0

    def _search_shared(self, ys: list[np.ndarray | None], now: bool = False, tail: int = 0) -> Callable[[], list]:
        """Start :meth:`_prefetch` of ``ys`` on the search threads, one share each, while the IVF is in
        use (else on this thread, at once); returns the call that waits for all the shares and gives
        their results in the order of ``ys`` (re-raising the first error, after every share ended).
        ``now``: the caller waits at once, so this thread searches a share too. ``tail``: the last
        ``tail`` records are queued last, for this thread to search when it comes to wait unless a
        search thread has started on them by then (see :meth:`_tail_share`)."""
        index = self.gallery.index
        threads = search_threads(self.gallery.settings.search_threads)
        if index is None or not index.built or not len(self.gallery) or threads == 0:
            with _on_one_faiss_thread() if threads == 0 else contextlib.nullcontext():
                done = self._prefetch(ys)
            return lambda: done
        if self._searcher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._searcher = ThreadPoolExecutor(threads, thread_name_prefix="matcher-search",
                                                initializer=_one_faiss_thread)
        tail = 0 if now else min(max(tail, 0), len(ys))
        head = len(ys) - tail
        shares = threads + 1 if now else threads
        step = max(1, -(-head // shares))
        spans = [(s, min(s + step, head)) for s in range(0, head, step)]
        mine = spans.pop() if now and len(spans) > 1 else None
        if tail:
            spans.append((head, len(ys)))
        jobs = [self._searcher.submit(self._timed_prefetch, ys[a:b]) for a, b in spans]
        if mine is not None:
            spans.append(mine)

        def results() -> list:
            parts: list[list] = [[] for _ in spans]
            error: BaseException | None = None
            own = [len(jobs)] if mine is not None else []
            if tail and jobs[-1].cancel():  # no search thread took the tail yet: searched here
                own.append(len(jobs) - 1)
            if own:
                with _on_one_faiss_thread():
                    for i in own:
                        try:
                            parts[i] = self._prefetch(ys[spans[i][0]:spans[i][1]])
                        except BaseException as exc:  # noqa: BLE001 (re-raised below, once the shares ended)
                            error = error or exc
            for i, job in enumerate(jobs):  # all of them, also after one failed: none may read the IVF after this
                if i in own:
                    continue
                try:
                    parts[i] = job.result()
                except BaseException as exc:  # noqa: BLE001 (re-raised below)
                    error = error or exc
            if error is not None:
                raise error
            return [r for part in parts for r in part]
        return results

    def _candidate_batches(self, ys: list[np.ndarray | None]) -> Iterator[tuple[range, list, list[int]]]:
        """The online path's index searches for records of projections ``ys`` (None: a record to skip).

        Yields ``(rows, prefetched, touched)`` per sub-batch of ``index.batch`` records (the last one
        a quarter of that, as nothing is searched while it is decided): ``rows``
        index ``ys``, ``prefetched[j]`` are the candidates of record ``rows[j]`` (:meth:`_prefetch`),
        and ``touched`` lists the identity codes changed since then; the caller passes it as ``also``
        to each decision and appends every code it changes. While the IVF is in use, every sub-batch
        is searched on ``index.search_threads`` threads, each a share of it, and the next sub-batch is
        searched that way while the caller decides and writes this one (faiss and numpy release the
        GIL; so do Redis round trips), inside :meth:`IdentityIndex.deferred`, but for a tail share
        the caller searches itself when it is done (:meth:`_tail_share`). The identities the
        caller changed meanwhile are re-scored for the whole next sub-batch in one matrix product
        before it is yielded (``prefetched[j]`` then carries them as ``known_codes`` and
        ``known_scores``, see :class:`~stages.matcher.gallery.Candidates`), so ``touched`` starts
        empty. Decisions are the same as with one search per sub-batch after the previous one: every
        changed identity is scored exactly.

        Use it under :func:`contextlib.closing`, so that an exception in the caller waits for the
        background search and ends the deferral at once.
        """
        size, n = self.gallery.settings.batch, len(ys)
        # the last sub-batch is decided with nothing searched meanwhile: a short one (a quarter)
        last = min(size // 4, n - size) if n > size else 0
        parts = [range(s, min(s + size, n - last)) for s in range(0, n - last, size)]
        parts += [range(n - last, n)] if last else []
        nxt = self._search_shared([ys[i] for i in parts[0]], now=True)() if parts else []
        before: list[int] = []  # changed while the current sub-batch's candidates were searched
        for j, rows in enumerate(parts):
            pre, touched = self._rescored(nxt, [ys[i] for i in rows], before), []
            index = self.gallery.index
            ahead = j + 1 < len(parts) and index is not None and index.built and len(self.gallery) > 0 \
                and search_threads(self.gallery.settings.search_threads) > 0
            if ahead:
                with index.deferred():
                    job = self._search_shared([ys[i] for i in parts[j + 1]],
                                              tail=self._tail_share(len(parts[j + 1]), len(rows)))
                    t = time.perf_counter()
                    try:
                        yield rows, pre, touched
                    finally:
                        self._decide_s = _running_mean(self._decide_s, (time.perf_counter() - t) / len(rows))
                        nxt = job()  # before the IVF may change again
                before = touched
            else:
                yield rows, pre, touched
                before = []
                if j + 1 < len(parts):  # the IVF may have been built meanwhile: one way to search
                    nxt = self._search_shared([ys[i] for i in parts[j + 1]], now=True)()

    def _rescored(self, pre: list, ys: list[np.ndarray | None], changed: list[int]) -> list:
        """``pre`` (candidates of the records of projections ``ys``), each with the exact scores of
        the identities ``changed`` since it was searched appended (see :meth:`Gallery.best`)."""
        rows = [j for j, p in enumerate(pre) if p is not None]
        if not changed or not rows:
            return pre
        codes, scores = self.gallery.rescore(_unit_queries([ys[j] for j in rows]), changed)
        out = list(pre)
        for r, j in enumerate(rows):
            p = pre[j]
            out[j] = Candidates(p.scores, p.codes, p.hot_scores, p.hot_codes, codes, scores[r])
        return out

    @contextlib.contextmanager
    def _saving_prototypes(self) -> Iterator[None]:
        """Save the prototypes the block changed in one pipelined write when it ends, also when it
        fails (what cannot be saved then is saved with the identity's next change; a restart
        recomputes the window's identities from their links anyway)."""
        import redis

        try:
            yield
        finally:
            changed, self._unsaved = self._unsaved, set()
            if changed:
                try:
                    self.store.save_prototypes({g: self.gallery.prototypes(g) for g in changed if g in self.gallery},
                                               self._epoch)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self._unsaved = changed
                    log.warning("matcher: %d identities' prototypes not saved yet (%s); retried with the next batch",
                                len(changed), exc)

    def process(self, records: list[EmbeddingRecord]) -> list[Output]:
        """Link each record (skipping ones already linked), then re-associate when it is due; outputs
        nothing downstream. The gallery index is searched once per sub-batch of ``index.batch`` records,
        the next sub-batch in the background while one is decided (:meth:`_candidate_batches`);
        identities changed by earlier records are scored exactly for the later ones. Each link is
        applied in memory as it is decided, and a sub-batch's links are written to Redis in one
        pipelined round trip once it is decided, also when a record fails it (:meth:`_write`).

        Raises:
            TransientError: Redis is unreachable (the runner retries; nothing is committed).
            ValueError: A record's embedding dimension does not fit the gallery (dead-lettered).
        """
        import redis

        try:
            self._recover()  # links of a failed write, before the replay check
            self.follow_operators()
            linked = self.store.linked_among(rec.tracklet_id for rec in records)  # replays, in one round trip
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        with self.online():
            # each embedding as Redis will hold it, projected once
            vecs = [self.store.stored_embedding(rec.vector) for rec in records]
            ys = self._project_batch(vecs)
            # closing: an exception ends the background search (and the deferral) before it propagates
            with contextlib.closing(self._candidate_batches(ys)) as batches, self._saving_prototypes():
                for rows, prefetched, touched in batches:
                    staged: list[_Staged] = []
                    try:
                        for i, pre in zip(rows, prefetched):
                            rec, vec, y = records[i], vecs[i], ys[i]
                            if rec.tracklet_id in linked:
                                log.debug("matcher: %s already linked (replay)", rec.tracklet_id)
                                continue
                            self._check_dim(len(vec))
                            staged.append(self._stage(rec, vec, y, pre, touched, len(records) - i))
                            linked.add(rec.tracklet_id)  # a copy later in the batch is a replay too
                            touched.append(self.gallery.code(staged[-1].link.global_id))
                    except (redis.ConnectionError, redis.TimeoutError) as exc:
                        raise TransientError(f"Redis unavailable: {exc}") from exc
                    finally:  # what was decided is written, also before a failure propagates
                        reloaded = self._write(staged)
                    # identities a taken-back link reloaded changed: scored exactly from now on
                    touched.extend(c for c in map(self.gallery.code, sorted(reloaded)) if c is not None)
        self._last_arrival = self.monotonic()
        self._unfrozen += len(records)
        if self._unfrozen >= _FREEZE_EVERY:
            self._freeze_gallery()
        if self.reassociation and self._since_reassociation and \
                self.monotonic() - self._last_reassociation >= self.reassociation.every_s:
            self._reassociate_reporting()
        self._gallery_gauges()
        return []

    def idle(self) -> None:
        """Called by the runner when no message came: re-associate once the input has been quiet for
        ``reassociation.idle_s`` and something arrived since the last re-association.

        Raises:
            TransientError: Redis is unreachable.
        """
        import redis

        try:
            self.follow_operators()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransientError(f"Redis unavailable: {exc}") from exc
        if self.reassociation and self._since_reassociation and \
                self.monotonic() - self._last_arrival >= self.reassociation.idle_s:
            self._reassociate_reporting()

    def archive(self) -> list[str]:
        """Drop from memory the identities unseen for more than ``gallery_ttl_s`` (they stay in Redis);
        returns their ids."""
        self.gallery.cool()
        if self.gallery_ttl_s is None or not np.isfinite(self._newest_end):
            return []
        gone = self.gallery.evict(self._newest_end - self.gallery_ttl_s)
        if gone:
            log.info("matcher: archived %d identities unseen for %.0f s", len(gone), self.gallery_ttl_s)
        return gone

    def _reassociate_reporting(self) -> None:
        import redis

        try:
            self.reassociate()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransientError(f"Redis unavailable during re-association: {exc}") from exc

    # ---------------------------------------------------------------------------------------------
    def _trim_window(self) -> None:
        if not self.reassociation or not len(self.window):
            return
        ends = np.asarray(self.window.ends)
        keep = np.flatnonzero(ends >= ends.max() - self.reassociation.window_s)
        keep = keep[np.argsort(ends[keep], kind="stable")][-self.reassociation.max_tracklets:]
        if len(keep) < len(self.window):
            self.window.keep(np.sort(keep))

    def reassociate(self) -> ReassociationResult:
        """Re-cluster the window and write the merges and splits (see the module docstring).

        Returns:
            What changed.

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis is unreachable (nothing is written).
        """
        t0 = time.perf_counter()
        self._trim_window()
        w = self.window
        n = len(w)
        self._since_reassociation = 0
        self._last_reassociation = self.monotonic()
        if n < 2:
            self.store.apply_reassociation(Reassignment({}, {}, [], self._summary(n, 0, 0, 0)))
            return ReassociationResult(n, n, self.threshold, False, 0, 0, 0, time.perf_counter() - t0)
        order = np.lexsort((np.asarray(w.ids), np.asarray(w.starts)))
        cfg = self.reassociation
        cannot, must = self._operator_constraints([w.ids[i] for i in order])
        result = associate([w.cams[i] for i in order], np.asarray(w.starts)[order], np.asarray(w.ends)[order],
                           np.stack([w.emb[i] for i in order]), self.rules, self.base_threshold,
                           cfg.min_negatives if cfg is not None and cfg.calibrate else None,
                           cfg.min_tracklets if cfg is not None else 3, cannot)
        labels, space, threshold, transit = _join(result.labels, must), result.space, result.threshold, result.transit
        calibrated = result.calibrated
        old = [w.gids[i] for i in order]
        change, new_gids = self._reassignment(labels, old, [w.ids[i] for i in order], threshold)
        self.store.apply_reassociation(change)
        # the new state, in memory and for a restart
        for j, i in enumerate(order):
            w.gids[i] = new_gids[j]
        if not self.rules.center:
            space = None
        reexpressed = 0
        if space is not None:
            space, _ = space.aligned_to(self.space)  # same cosines; kept prototypes barely move
            a, c = space.change_from(self.space)
            if _drift(a, c) > REEXPRESS_TOLERANCE:
                # prototypes of identities outside the window were projected in the old space
                reexpressed = self.gallery.reexpress(a, c, skip=set(w.gids))
                self._epoch += 1
            w.y = list(space.project(np.stack(w.emb)))
        self.space, self.threshold, self.transit = space, threshold, transit
        self.gallery.drop(g for g in change.retired if g not in set(w.gids))
        groups = w.groups()
        self.gallery.replace(groups)
        state: dict[str, Any] = {"threshold": repr(threshold), "epoch": self._epoch, "transit": json.dumps(
            {f"{a}|{b}": list(v) for (a, b), v in transit.gaps.items()})}
        if space is not None:
            arrays = space.to_arrays()
            state["mean"] = arrays["mean"].astype("<f4").tobytes()
            if "components" in arrays:
                state["components"] = arrays["components"].astype("<f4").tobytes()
                state["dim"] = arrays["components"].shape[1]
        self.store.save_matcher_state(state)
        saved = set(groups) if not reexpressed else set(self.gallery.gids())
        self.store.save_prototypes({g: self.gallery.prototypes(g) for g in saved}, self._epoch)
        self.archive()
        merges = sum(1 for r in change.audit if r["kind"] == "merge")
        splits = sum(1 for r in change.audit if r["kind"] == "split")
        seconds = time.perf_counter() - t0
        metrics.REASSOCIATIONS.labels(stage=STAGE).inc()
        metrics.REASSOCIATION_SECONDS.labels(stage=STAGE).observe(seconds)
        metrics.IDENTITY_CHANGES.labels(stage=STAGE, kind="merge").inc(merges)
        metrics.IDENTITY_CHANGES.labels(stage=STAGE, kind="split").inc(splits)
        self._threshold_gauge.set(threshold)
        self._gallery_gauges()
        log.info("matcher: re-associated %d tracklets in %.2f s: threshold %.3f%s, %d identities, %d merges, "
                 "%d splits, %d tracklets moved", n, seconds, threshold, " (recalibrated)" if calibrated else "",
                 len(set(new_gids)), merges, splits, len(change.moves))
        return ReassociationResult(n, len(set(new_gids)), threshold, calibrated, merges, splits, len(change.moves),
                                   seconds)

    def _operator_constraints(self, ids: list[str]) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
        """The operators' decisions over the window ``ids``: ``bool [N, N]`` cannot-links (splits; None
        when there are none) and must-link index pairs (merges)."""
        pos = {t: j for j, t in enumerate(ids)}
        cannot: np.ndarray | None = None
        must: list[tuple[int, int]] = []
        for c in self.store.constraints():
            a = [pos[t] for t in c.a if t in pos]
            b = [pos[t] for t in c.b if t in pos]
            if not a or not b:
                continue
            if c.kind == "cannot":
                if cannot is None:
                    cannot = np.zeros((len(ids), len(ids)), bool)
                cannot[np.ix_(a, b)] = True
                cannot[np.ix_(b, a)] = True
            else:
                must.extend((a[0], j) for j in [*a[1:], *b])
        return cannot, must

    def follow_operators(self) -> int:
        """Take in the operators' merges and splits written since the last look (the audit stream,
        records with ``reason: operator``): the identities they touched are reloaded from Redis into
        the window and the gallery. Returns how many identities were reloaded.

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis is unreachable.
        """
        records = self.store.audit_after(self._audit_seen)
        if not records:
            return 0
        self._audit_seen = records[-1]["id"]
        touched: set[str] = set()
        for rec in records:
            if rec.get("reason") != "operator":
                continue
            into = rec.get("into")
            named = {rec.get("from"), *(into if isinstance(into, list) else [into])} - {None}
            # only this zone's identities: another zone's matcher takes in its own
            if any(g in self.gallery for g in named) or any(t in self.window.index for t in rec.get("tracklets", ())):
                touched |= named
        if touched:
            self._reload(touched)
            log.info("matcher: took in an operator's change of %d identities", len(touched))
        return len(touched)

    def _reload(self, gids: set[str]) -> None:
        """Rebuild identities ``gids`` from Redis (members, window ids, prototypes)."""
        groups: dict[str, list[Member]] = {}
        for gid in sorted(gids):
            ident = self.store.identity(gid)
            tids = ident.tracklets if ident is not None else []
            outside = [t for t in tids if t not in self.window.index]
            rows = self.store.tracklet_rows(outside) if outside else {}
            members = []
            for t in tids:
                i = self.window.index.get(t)
                if i is not None:
                    self.window.gids[i] = gid
                    members.append(self.window.member(i))
                elif t in rows:
                    _, cam, start, end, quality, vec = rows[t]
                    members.append(Member(t, cam, start, end, quality, self._project(vec), 0))
            groups[gid] = members
        for i, g in enumerate(self.window.gids):  # window members that left a reloaded identity
            if g in gids and self.window.ids[i] not in {m.tracklet_id for m in groups[g]}:
                moved = self.store.link(self.window.ids[i])
                if moved is not None:
                    self.window.gids[i] = moved.global_id
        self.gallery.replace(groups)
        self.store.save_prototypes({g: self.gallery.prototypes(g) for g in groups}, self._epoch)

    def _reassignment(self, labels: np.ndarray, old: list[str], ids: list[str],
                      threshold: float) -> tuple[Reassignment, list[str]]:
        """Map clusters onto global ids (stable: see the module docstring) and describe the change."""
        clusters: dict[int, list[int]] = defaultdict(list)
        for j, lab in enumerate(labels):
            clusters[int(lab)].append(j)
        holders: dict[str, Counter] = defaultdict(Counter)
        for j, lab in enumerate(labels):
            holders[old[j]][int(lab)] += 1
        assigned: dict[int, str] = {}
        for gid in sorted(holders, key=_gid_order):
            for lab, _ in sorted(holders[gid].items(), key=lambda kv: (-kv[1], clusters[kv[0]][0])):
                if lab not in assigned:
                    assigned[lab] = gid
                    break
        for lab in sorted(clusters, key=lambda c: clusters[c][0]):
            if lab not in assigned:
                assigned[lab] = self.store.next_global_id()
        new = [assigned[int(lab)] for lab in labels]
        moves = {ids[j]: (old[j], new[j]) for j in range(len(ids)) if old[j] != new[j]}
        if not moves:
            return Reassignment({}, {}, [], self._summary(len(ids), 0, 0, 0)), new
        window_members = Counter(old)
        moved_from: dict[str, Counter] = defaultdict(Counter)
        for o, nw in moves.values():
            moved_from[o][nw] += 1
        totals = self.store.identity_sizes(list(moved_from))
        retired: dict[str, str | None] = {}
        audit = []
        wall = self.clock()
        for src in sorted(moved_from, key=_gid_order):
            targets = moved_from[src]
            emptied = sum(targets.values()) >= max(totals.get(src, 0), window_members[src])
            tids = sorted(t for t, (o, _) in moves.items() if o == src)
            if emptied and len(targets) == 1:
                into = next(iter(targets))
                retired[src] = into
                audit.append({"kind": "merge", "from": src, "into": into, "tracklets": tids, "wall_s": wall,
                              "reason": "reassociation", "threshold": threshold})
            else:
                if emptied:
                    retired[src] = None
                audit.append({"kind": "split", "from": src, "into": sorted(targets, key=_gid_order), "tracklets": tids,
                              "wall_s": wall, "reason": "reassociation", "threshold": threshold})
        merges = sum(1 for r in audit if r["kind"] == "merge")
        return Reassignment(moves, retired, audit, self._summary(len(ids), merges, len(audit) - merges, len(moves))), new

    def _summary(self, tracklets: int, merges: int, splits: int, moved: int) -> dict[str, float | int]:
        return {"links": self.links_total, "tracklets": tracklets, "wall_s": self.clock(), "merges": merges,
                "splits": splits, "moved": moved}

    def close(self) -> None:
        self.release()
        self.store.close()

    def release(self) -> None:
        """Let go of what this matcher holds besides its store (a zone's matcher shares the zoned
        matcher's connection): the search threads and this zone's gauges."""
        if self._searcher is not None:
            self._searcher.shutdown(wait=True)
            self._searcher = None
        self.drop_metrics()

    def _freeze_gallery(self) -> None:
        """Collect the cyclic garbage made since the last freeze, then move every object left out of
        the cyclic collector's sight (``gc.freeze()``; reference counting still frees what is
        dropped). A gallery that grows online would otherwise be walked whole by every full
        collection, which Python runs each time the tracked objects grow by a quarter: measured
        while adding 400,000 identities one by one, 15 ms at 3,000 identities, 213 ms at 335,000,
        and growing with the gallery. Frozen every 16,384 records, no other full collection ran, and
        this one took about 6 ms: it walks only what came since the last freeze."""
        gc.collect()
        gc.freeze()
        self._unfrozen = 0

    def _gallery_gauges(self) -> None:
        self._identities.set(len(self.gallery))
        self._hot_identities.set(0 if self.gallery.hot is None else len(self.gallery.hot))

    def drop_metrics(self) -> None:
        """Remove this zone's gauges (the zone went to another instance, or this one stops)."""
        for gauge in (metrics.IDENTITIES, metrics.HOT_IDENTITIES, metrics.MATCH_THRESHOLD):
            try:
                gauge.remove(STAGE, self._zone)
            except KeyError:
                pass


def _join(labels: np.ndarray, must: list[tuple[int, int]]) -> np.ndarray:
    """Labels with the clusters of every must-linked pair joined (an operator's merge stands)."""
    if not must:
        return labels
    parent = {int(lab): int(lab) for lab in set(labels.tolist())}

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in must:
        a, b = root(int(labels[i])), root(int(labels[j]))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.asarray([root(int(lab)) for lab in labels], labels.dtype)


REEXPRESS_TOLERANCE = 1e-2
"""Largest change of scoring space (see :func:`_drift`) that leaves the prototypes of identities outside
the window as they are; a larger one maps them into the new space (:meth:`Gallery.reexpress`)."""


def _drift(a: np.ndarray | None, c: np.ndarray) -> float:
    """How far the map ``y ↦ y @ a + c`` is from the identity: ``‖a − I‖_F / √K + ‖c‖`` (infinite
    when the dimension changes)."""
    if a is not None and a.shape[0] != a.shape[1]:
        return float("inf")
    rot = 0.0 if a is None else float(np.linalg.norm(a - np.eye(a.shape[0], dtype=a.dtype)) / np.sqrt(a.shape[0]))
    return rot + float(np.linalg.norm(c))


def _gid_order(gid: str) -> tuple[int, str]:
    """Oldest first: ids are allocated ``G000001``, ``G000002``… (numeric part), then by text."""
    digits = "".join(ch for ch in gid if ch.isdigit())
    return (int(digits) if digits else 1 << 62, gid)


def run_matcher(cfg: Config, stop: threading.Event, idle_exit_s: float | None = None,
                on_ready: Any = None) -> Any:
    """Run the matcher against the configured Kafka and Redis until stopped: one instance of the
    consumer group ``matcher.group_id``, matching the zones of the ``embeddings`` partitions it is
    given (:class:`~stages.matcher.zones.ZonedMatcher`). Start as many as there are partitions at most.

    Raises:
        BusError: The broker is unreachable.
        StoreError: Redis is unreachable.
        CalibrationError: ``matcher.calibration`` is unreadable.
        DeviceUnavailable: ``matcher.index.kind`` is ``gpu`` and its device cannot be used.
    """
    from pipeline.runner import run_consuming_stage
    from stages.matcher.zones import ZonedMatcher

    from pipeline.bus import ensure_topics, partition_count

    ensure_topics(cfg.bus)
    matcher = ZonedMatcher.from_config(cfg, partition_count(cfg.bus, cfg.bus.topics.embeddings))
    matcher.store.check()
    metrics.serve(cfg.metrics.matcher_port, cfg.metrics.host)
    return run_consuming_stage(cfg.bus, matcher, STAGE, cfg.bus.topics.embeddings, cfg.matcher.group_id,
                               EmbeddingRecord, max_batch=cfg.matcher.max_batch, max_wait_ms=200, stop=stop,
                               idle_exit_s=idle_exit_s, on_ready=on_ready)


__all__ = ["CrossCameraMatcher", "Decision", "ReassociationResult", "run_matcher"]
