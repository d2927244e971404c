"""Cross-camera matcher: assign each embedded tracklet a global identity, and keep them right.

``reidstream matcher --config C`` consumes the ``embeddings`` topic (one matcher per deployment: it
owns the identity window). Two decisions, one rule set (:mod:`stages.matcher.association`):

**Online, per tracklet** (within the latency budget). For a tracklet ``x`` of camera ``c`` spanning
``[start_s, end_s]``:

1. Its embedding is mapped into the site's *scoring space* (centred on the site's mean embedding and
   projected onto its principal directions, fitted by the last re-association or a calibration).
2. **Candidates** are identities with members in the window none of which is cannot-linked to ``x``:
   on camera ``c`` a member may not overlap ``x`` in time (and with ``reentry`` off no member may be on
   ``c`` at all); on another camera a member may overlap ``x`` by at most ``max_overlap_s``, or, for a
   camera pair of the configured topology, must leave at least ``min_transit_s`` between them.
3. An identity's **score** is the mean cosine between ``x`` and its prototypes (per camera, the
   ``prototypes_per_camera`` longest-observed members): the average linkage of the re-association.
   A learned (or configured) hand-off gap adds up to ``transit.weight`` per prototype.
4. ``x`` **joins** the best candidate when its score is at least the threshold (calibrated label-free:
   see :mod:`stages.matcher.calibration`), else it **founds** a new identity.

**Re-association, periodic** (every ``reassociation.every_s`` while tracklets arrive, and once
``reassociation.idle_s`` pass without any). The whole recent window (``window_s`` stream seconds, at
most ``max_tracklets``) is re-scored in a scoring space fitted on it, the threshold is recalibrated on
it when it holds enough cannot-link evidence, hand-off gaps are learned from a first clustering, and
the constrained average linkage is run again with them. The result depends only on the window's
tracklets (not on their arrival order). Clusters map onto the existing ids so that ids stay stable: an
id stays with the cluster holding most of its members, a merge keeps the oldest id, a split gives the
breakaway part a new id. Moves, identity updates and one audit record per merge or split are written to
Redis in one transaction; ``query``, the API, ``links.json`` and the report read the *current* id.

Replaying a message changes nothing (a tracklet id already linked is skipped), and re-associating an
unchanged window changes nothing. The runner commits Kafka offsets only after :meth:`process` returns,
i.e. after Redis has the link.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from pipeline import metrics
from pipeline.config import Config, ReassociationConfig
from pipeline.messages import EmbeddingRecord
from pipeline.runner import Output, TransientError
from pipeline.store import IdentityStore, Link, Reassignment, WindowEntry
from stages.matcher.association import Rules, ScoringSpace, associate, cannot_link_between

log = logging.getLogger(__name__)

STAGE = "matcher"


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where a tracklet goes: ``global_id`` (None: found a new one) and its mean ``score``."""

    global_id: str | None
    score: float | None


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
    """The recent tracklets, column-wise: ids, cameras, times, quality, current global id, raw
    embedding ``float32 [N, D]`` and scoring-space vector ``float32 [N, K]``. The numeric columns are
    kept as numpy arrays (rebuilt lazily after a change) so that an online decision is vectorised."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.cams: list[str] = []
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.quality: list[int] = []
        self.gids: list[str] = []
        self.emb: list[np.ndarray] = []
        self.z: list[np.ndarray] = []
        self.index: dict[str, int] = {}
        self._arrays: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, e: WindowEntry, z: np.ndarray) -> None:
        self.index[e.tracklet_id] = len(self.ids)
        self.ids.append(e.tracklet_id)
        self.cams.append(e.camera)
        self.starts.append(e.start_s)
        self.ends.append(e.end_s)
        self.quality.append(e.quality)
        self.gids.append(e.global_id)
        self.emb.append(np.asarray(e.embedding, np.float32))
        self.z.append(z)
        if self._arrays is not None and self._arrays["z"].shape[1] == len(z):
            a = self._arrays  # append in place (amortised): the common case of one new link
            for name, value in (("z", z[None, :]), ("starts", [e.start_s]), ("ends", [e.end_s])):
                a[name] = np.concatenate([a[name], np.asarray(value, a[name].dtype)])
            a["cams"] = np.concatenate([a["cams"], np.asarray([e.camera], object)])
            code = a["gid_code"].setdefault(e.global_id, len(a["gid_code"]))
            a["gidx"] = np.concatenate([a["gidx"], [code]])
        else:
            self._arrays = None

    def changed(self) -> None:
        """Forget the cached arrays (global ids or scoring-space vectors were rewritten)."""
        self._arrays = None

    def arrays(self) -> dict[str, Any]:
        """``z [N, K]``, ``starts``/``ends [N]``, ``cams`` (object [N]), ``gidx`` (int [N], codes into
        ``gid_code``)."""
        if self._arrays is None:
            gid_code: dict[str, int] = {}
            gidx = np.fromiter((gid_code.setdefault(g, len(gid_code)) for g in self.gids), np.int64, len(self.gids))
            self._arrays = {"z": np.stack(self.z).astype(np.float32), "starts": np.asarray(self.starts, np.float64),
                            "ends": np.asarray(self.ends, np.float64), "cams": np.asarray(self.cams, object),
                            "gidx": gidx, "gid_code": gid_code}
        return self._arrays

    def keep(self, rows: np.ndarray) -> None:
        """Keep only ``rows`` (indices, in the order given)."""
        for name in ("ids", "cams", "starts", "ends", "quality", "gids", "emb", "z"):
            col = getattr(self, name)
            setattr(self, name, [col[i] for i in rows])
        self.index = {t: i for i, t in enumerate(self.ids)}
        self._arrays = None


class CrossCameraMatcher:
    """Assign tracklets to global identities (see the module docstring for the rules).

    Args:
        store: The Redis identity store.
        threshold: Score needed to join an identity until a calibration applies, in [-1, 1].
        rules: Cannot-links, scoring space and hand-off rules (default :class:`Rules`).
        prototypes_per_camera: Members per camera an identity is scored by.
        reassociation: Re-association settings (None: never re-associate).
        calibration_threshold: A calibrated threshold that replaces ``threshold`` (from a file).
        gallery_ttl_s: Identities unseen for longer (stream seconds) are no candidates; None keeps all.
        clock: Unix-seconds clock (link times, latency metric).
        monotonic: Clock for re-association scheduling, seconds.

    Raises:
        ValueError: An argument is out of range.
    """

    def __init__(self, store: IdentityStore, threshold: float = 0.15, rules: Rules | None = None,
                 prototypes_per_camera: int = 8, reassociation: ReassociationConfig | None = None,
                 calibration_threshold: float | None = None, gallery_ttl_s: float | None = None, clock=time.time,
                 monotonic=time.monotonic) -> None:
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
        self.space: ScoringSpace | None = None
        self.transit = rules.empty_transit()
        self.summaries: dict[str, dict[str, Any]] = {}
        self.links_total = 0
        self._since_reassociation = 0
        self._last_reassociation = monotonic()
        self._last_arrival = monotonic()
        self._proto: np.ndarray | None = None
        self._identities = metrics.IDENTITIES.labels(stage=STAGE)
        self._threshold_gauge = metrics.MATCH_THRESHOLD.labels(stage=STAGE)

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
                   m.reassociation if m.reassociation.enabled else None, cal, m.gallery_ttl_s)

    # ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check Redis and load the window and scoring space it holds for this matcher's zone (the
        store view's ``{zk}:matcher`` and ``{zk}:tracklets:end``), so that a restarted matcher, or the
        instance that takes a zone over after a rebalance, continues where the previous one was.

        Raises:
            StoreError: Redis is unreachable.
        """
        self.store.check()
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
        window_s = self.reassociation.window_s if self.reassociation else None
        limit = self.reassociation.max_tracklets if self.reassociation else None
        entries = self.store.load_window(None, limit)
        if entries and window_s is not None:
            newest = max(e.end_s for e in entries)
            entries = [e for e in entries if e.end_s >= newest - window_s]
        for e in entries:
            self.window.add(e, self._transform(e.embedding))
        self._refresh_summaries(set(self.window.gids))
        self._refresh_prototypes()
        self.links_total = self.store.count_zone_links()
        if self.store.reassociation_status().get("links", -1) < self.links_total:
            self._since_reassociation = 1  # links arrived after the last re-association: redo it when idle
        self._identities.set(len(set(self.window.gids)))
        self._threshold_gauge.set(self.threshold)
        log.info("matcher: zone %s: %d tracklets of %d identities in the window, threshold %.3f, store %s",
                 self.store.zone, len(self.window), len(set(self.window.gids)), self.threshold, self.store.url)

    def _transform(self, embedding: np.ndarray) -> np.ndarray:
        """Scoring-space vector of one embedding (a unit vector; the raw unit embedding before any
        scoring space is fitted)."""
        if self.space is None or not self.rules.center:
            v = np.asarray(embedding, np.float32)
            return v / max(float(np.linalg.norm(v)), 1e-12)
        return self.space.transform(embedding)

    def _refresh_summaries(self, gids: set[str]) -> None:
        for gid in gids:
            ident = self.store.identity(gid)
            if ident is not None:
                self.summaries[gid] = {"cameras": set(ident.cameras), "first": ident.first_seen_s,
                                       "last": ident.last_seen_s}
            else:
                self.summaries.pop(gid, None)

    def _refresh_prototypes(self) -> None:
        """Mark, per identity and camera, the ``prototypes_per_camera`` longest-observed members."""
        n = len(self.window)
        if n == 0:
            self._proto = np.zeros(0, bool)
            return
        a = self.window.arrays()
        cams = np.unique(a["cams"].astype(str), return_inverse=True)[1]
        group = a["gidx"] * (int(cams.max()) + 1) + cams
        order = np.lexsort((np.arange(n), -np.asarray(self.window.quality), group))
        starts = np.r_[True, group[order][1:] != group[order][:-1]]
        first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        rank = np.arange(n) - first
        proto = np.zeros(n, bool)
        proto[order] = rank < self.prototypes_per_camera
        self._proto = proto

    # ---------------------------------------------------------------------------------------------
    def decide(self, camera: str, start_s: float, end_s: float, embedding: np.ndarray) -> Decision:
        """Pick the identity for a tracklet (pure: changes nothing).

        Args:
            camera: The tracklet's camera.
            start_s: First sighting, stream seconds.
            end_s: Last sighting, stream seconds.
            embedding: ``float32 [D]``, L2-normalised.

        Returns:
            The decision; ``global_id`` None means "found a new identity".

        Raises:
            ValueError: ``embedding`` has another dimension than the window's.
        """
        n = len(self.window)
        if n == 0:
            return Decision(None, None)
        if embedding.shape[0] != self.window.emb[0].shape[0]:
            raise ValueError(f"embedding dimension {embedding.shape[0]} differs from the window's "
                             f"{self.window.emb[0].shape[0]} (was the re-id model changed? use a new store namespace)")
        a = self.window.arrays()
        z = self._transform(embedding)
        sims = a["z"] @ z
        starts, ends, cams = a["starts"], a["ends"], a["cams"]
        cannot = cannot_link_between([camera], np.array([start_s]), np.array([end_s]), cams, starts, ends,
                                     self.rules.max_overlap_s, self.rules.reentry, self.rules.topology)[0]
        sims = sims + self._transit_bonus(camera, start_s, end_s, cams, starts, ends)
        gidx, codes = a["gidx"], a["gid_code"]
        gids = np.array(list(codes), dtype=object)
        blocked = np.bincount(gidx, weights=cannot, minlength=len(gids)) > 0
        if self.gallery_ttl_s is not None:
            last = np.full(len(gids), -np.inf)
            np.maximum.at(last, gidx, ends)
            blocked |= start_s - last > self.gallery_ttl_s
        proto = self._proto if self._proto is not None and len(self._proto) == n else np.ones(n, bool)
        counts = np.bincount(gidx[proto], minlength=len(gids))
        totals = np.bincount(gidx[proto], weights=sims[proto], minlength=len(gids))
        score = np.where((counts > 0) & ~blocked, totals / np.maximum(counts, 1), -np.inf)
        best = int(np.argmax(score))
        if np.isfinite(score[best]) and score[best] >= self.threshold:
            return Decision(str(gids[best]), float(score[best]))
        return Decision(None, None)

    def _transit_bonus(self, camera: str, start_s: float, end_s: float, cams: np.ndarray, starts: np.ndarray,
                       ends: np.ndarray) -> np.ndarray:
        out = np.zeros(len(cams))
        if self.rules.transit_weight == 0:
            return out
        for other in set(cams.tolist()) - {camera}:
            idx = np.flatnonzero(cams == other)
            gap = np.where(start_s >= starts[idx], start_s - ends[idx], starts[idx] - end_s)
            out[idx] = self.rules.transit_weight * self.transit.support(camera, other, gap)
        return out

    # ---------------------------------------------------------------------------------------------
    def _apply(self, rec: EmbeddingRecord) -> bool:
        vec = rec.vector.astype(np.float32)
        decision = self.decide(rec.camera, rec.start_s, rec.end_s, vec)
        gid = decision.global_id or self.store.next_global_id()
        summary = self.summaries.get(gid) or {"cameras": set(), "first": rec.start_s, "last": rec.end_s}
        cameras = summary["cameras"] | {rec.camera}
        first, last = min(summary["first"], rec.start_s), max(summary["last"], rec.end_s)
        now = self.clock()
        link = Link(rec.tracklet_id, rec.camera, rec.track_id, gid, decision.score, rec.start_s, rec.end_s,
                    list(rec.frames), [list(b) for b in rec.boxes], rec.closed_wall_s, now)
        written = self.store.record_link(link, vec, cameras, first, last, rec.thumbnail_jpeg, rec.observed_frames)
        if not written:
            return False
        self.summaries[gid] = {"cameras": cameras, "first": first, "last": last}
        entry = WindowEntry(rec.tracklet_id, rec.camera, rec.start_s, rec.end_s, rec.observed_frames, gid, vec)
        self.window.add(entry, self._transform(vec))
        self.links_total += 1
        self._since_reassociation += 1
        self._refresh_prototypes()
        kind = "joined" if decision.global_id else "founded"
        metrics.LINKS.labels(stage=STAGE, camera=rec.camera, kind=kind).inc()
        metrics.TRACKLET_LINK_LATENCY.labels(camera=rec.camera).observe(max(now - rec.closed_wall_s, 0.0))
        log.info("matcher: %s → %s (%s%s)", rec.tracklet_id, gid, kind,
                 f", score {decision.score:.3f}" if decision.score is not None else "",
                 extra={"camera": rec.camera})
        return True

    def process(self, records: list[EmbeddingRecord]) -> list[Output]:
        """Link each record (skipping ones already linked), then re-associate when it is due; outputs
        nothing downstream.

        Raises:
            TransientError: Redis is unreachable (the runner retries; nothing is committed).
            ValueError: A record's embedding dimension does not fit the window (dead-lettered).
        """
        import redis

        for rec in records:
            t = time.perf_counter()
            try:
                if self.store.has_tracklet(rec.tracklet_id):
                    log.debug("matcher: %s already linked (replay)", rec.tracklet_id)
                    continue
                self._apply(rec)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise TransientError(f"Redis unavailable: {exc}") from exc
            metrics.STAGE_LATENCY.labels(stage=STAGE, camera=rec.camera).observe(time.perf_counter() - t)
        self._last_arrival = self.monotonic()
        if self.reassociation and self._since_reassociation and \
                self.monotonic() - self._last_reassociation >= self.reassociation.every_s:
            self._reassociate_reporting()
        self._identities.set(len(set(self.window.gids)))
        return []

    def idle(self) -> None:
        """Called by the runner when no message came: re-associate once the input has been quiet for
        ``reassociation.idle_s`` and something arrived since the last re-association.

        Raises:
            TransientError: Redis is unreachable.
        """
        if self.reassociation and self._since_reassociation and \
                self.monotonic() - self._last_arrival >= self.reassociation.idle_s:
            self._reassociate_reporting()

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
        result = associate([w.cams[i] for i in order], np.asarray(w.starts)[order], np.asarray(w.ends)[order],
                           np.stack([w.emb[i] for i in order]), self.rules, self.base_threshold,
                           cfg.min_negatives if cfg is not None and cfg.calibrate else None,
                           cfg.min_tracklets if cfg is not None else 3)
        labels, z, space, threshold, transit = result.labels, result.z, result.space, result.threshold, result.transit
        calibrated = result.calibrated
        old = [w.gids[i] for i in order]
        change, new_gids = self._reassignment(labels, old, [w.ids[i] for i in order], threshold)
        self.store.apply_reassociation(change)
        # the new state, in memory and for a restart
        for j, i in enumerate(order):
            w.gids[i] = new_gids[j]
            w.z[i] = z[j]
        w.changed()
        self.space, self.threshold, self.transit = space, threshold, transit
        state: dict[str, Any] = {"threshold": repr(threshold), "transit": json.dumps(
            {f"{a}|{b}": list(v) for (a, b), v in transit.gaps.items()})}
        if space is not None:
            arrays = space.to_arrays()
            state["mean"] = arrays["mean"].astype("<f4").tobytes()
            if "components" in arrays:
                state["components"] = arrays["components"].astype("<f4").tobytes()
                state["dim"] = arrays["components"].shape[1]
        self.store.save_matcher_state(state)
        self._refresh_summaries({g for pair in change.moves.values() for g in pair})
        self._refresh_prototypes()
        merges = sum(1 for r in change.audit if r["kind"] == "merge")
        splits = sum(1 for r in change.audit if r["kind"] == "split")
        seconds = time.perf_counter() - t0
        metrics.REASSOCIATIONS.labels(stage=STAGE).inc()
        metrics.REASSOCIATION_SECONDS.labels(stage=STAGE).observe(seconds)
        metrics.IDENTITY_CHANGES.labels(stage=STAGE, kind="merge").inc(merges)
        metrics.IDENTITY_CHANGES.labels(stage=STAGE, kind="split").inc(splits)
        self._threshold_gauge.set(threshold)
        self._identities.set(len(set(w.gids)))
        log.info("matcher: re-associated %d tracklets in %.2f s: threshold %.3f%s, %d identities, %d merges, "
                 "%d splits, %d tracklets moved", n, seconds, threshold, " (recalibrated)" if calibrated else "",
                 len(set(new_gids)), merges, splits, len(change.moves))
        return ReassociationResult(n, len(set(new_gids)), threshold, calibrated, merges, splits, len(change.moves),
                                   seconds)

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
        self.store.close()


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
    """
    from pipeline.runner import run_consuming_stage
    from stages.matcher.zones import ZonedMatcher

    from pipeline.bus import ensure_topics, partition_count

    ensure_topics(cfg.bus)
    matcher = ZonedMatcher.from_config(cfg, partition_count(cfg.bus, cfg.bus.topics.embeddings))
    matcher.store.check()
    metrics.serve(cfg.metrics.matcher_port, cfg.metrics.host)
    return run_consuming_stage(cfg.bus, matcher, STAGE, cfg.bus.topics.embeddings, cfg.matcher.group_id,
                               EmbeddingRecord, max_batch=64, max_wait_ms=200, stop=stop, idle_exit_s=idle_exit_s,
                               on_ready=on_ready)


__all__ = ["CrossCameraMatcher", "Decision", "ReassociationResult", "run_matcher"]
