"""The matcher stage of a zoned deployment: one :class:`CrossCameraMatcher` per zone this instance owns.

A **zone** (``zones`` in the config) is a set of cameras people walk between. It is the unit of
matching: a tracklet is only matched against identities of its own zone, and with the single zone
``default`` (no ``zones`` configured) the behaviour is exactly the single-matcher one.

It is also the unit of scale-out. The re-id stage keys each embedding by its camera's zone, so a
zone's embeddings are in one partition of the ``embeddings`` topic (murmur2 of the key, as the Java
client), in order. Any number of ``reidstream matcher`` processes join one consumer group
(``matcher.group_id``); Kafka gives each partition to one of them, hence each zone to one matcher.
More instances than partitions leave the extra ones idle; several zones may share a partition.

:class:`ZonedMatcher` routes each record by its camera's zone to that zone's matcher. A zone's matcher
is built when its partition is assigned (the configured zones and ``default``, mapped to partitions
with murmur2 and the topic's partition count), or else when the zone's first record arrives: its
:meth:`CrossCameraMatcher.setup` rebuilds the window, scoring space and threshold from the zone's keys
in Redis (:meth:`IdentityStore.for_zone`), so it continues where the previous owner stopped (and runs
a re-association the previous owner left pending). On a rebalance (:meth:`on_revoke`) every zone
matcher is dropped: kafka-python rebalances eagerly (each rebalance revokes every partition), and a
partition that comes back may have been processed by another instance meanwhile, so in-memory state
is never trusted across a rebalance. The runner has committed what was processed before the
revocation; the next owner replays the rest, and replays are no-ops (a linked tracklet is skipped).

Redis is the single source of truth for what two instances share (identities, links, the id
sequence, the audit): links are written by one atomic script and re-associations under WATCH (see
:mod:`pipeline.store`), so two instances briefly writing one zone during a hand-over link every
tracklet exactly once.

Cross-zone identities: identities are zone-local. A person who walks from one zone into another gets
one identity per zone; ``reidstream query`` and the API list identities of all zones, and
search-by-example over the stored embeddings spans all zones.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeline.config import DEFAULT_ZONE, Config
from pipeline.messages import EmbeddingRecord
from pipeline.runner import Output, TransientError
from pipeline.store import IdentityStore
from stages.matcher.matcher import CrossCameraMatcher

log = logging.getLogger(__name__)


class ZonedMatcher:
    """Route records by zone to per-zone :class:`CrossCameraMatcher` s (see the module docstring).

    Args:
        store: The namespace's store (zone views are made with :meth:`IdentityStore.for_zone`).
        make_matcher: Builds the (not yet set up) matcher of one zone from that zone's store view.
        zones: Camera name → zone name; other cameras are in zone ``default``.
        partitions: Partitions of the input topic; with it, :meth:`on_assign` builds the matchers of the
            zones (those of ``zones`` and ``default``) keyed to the assigned partitions at once. None:
            every zone waits for its first record.

    Example:
        >>> stage = ZonedMatcher(store, lambda s: CrossCameraMatcher(s, threshold=0.6),   # doctest: +SKIP
        ...                      {"gate": "north", "dock": "south"})
        >>> stage.setup(); stage.process(records)                                         # doctest: +SKIP
    """

    def __init__(self, store: IdentityStore, make_matcher: Callable[[IdentityStore], CrossCameraMatcher],
                 zones: Mapping[str, str] | None = None, partitions: int | None = None) -> None:
        self.store = store
        self.make_matcher = make_matcher
        self.zones = dict(zones or {})
        self.partitions = partitions
        self.matchers: dict[str, CrossCameraMatcher] = {}

    @classmethod
    def from_config(cls, cfg: Config, partitions: int | None = None) -> ZonedMatcher:
        """Build from the config's ``store``, ``zones`` and ``matcher`` sections.

        Args:
            cfg: The config.
            partitions: Partitions of ``bus.topics.embeddings`` (see the class).

        Raises:
            CalibrationError: ``matcher.calibration`` is unreadable (checked now, not at the first record).
            DeviceUnavailable: ``matcher.index.kind`` is ``gpu`` and ``matcher.index.device`` cannot be
                used (checked now: a zone's matcher is built later, where a failure is retried as an
                outage).
        """
        if cfg.matcher.calibration is not None:
            from stages.matcher.calibration import read_calibration

            read_calibration(cfg.matcher.calibration)
        if cfg.matcher.index.kind == "gpu":
            from stages.matcher.index import check_device

            check_device(cfg.matcher.index.device)
        store = IdentityStore.from_config(cfg.store)
        return cls(store, lambda zone_store: CrossCameraMatcher.from_config(cfg, store=zone_store), cfg.camera_zones(),
                   partitions)

    def zone_of(self, camera: str) -> str:
        """The zone of ``camera`` (``default`` when no zone lists it)."""
        return self.zones.get(camera, DEFAULT_ZONE)

    def zone_partition(self, zone: str) -> int | None:
        """The partition ``zone``'s embeddings go to (murmur2 of the key, as kafka-python's and the Java
        client's default partitioner), or None without a partition count."""
        if not self.partitions:
            return None
        from kafka.partitioner.default import murmur2

        return (murmur2(zone.encode("utf-8")) & 0x7FFFFFFF) % self.partitions

    def setup(self) -> None:
        """Check Redis (zone matchers are built when their first record arrives).

        Raises:
            StoreError: Redis is unreachable.
        """
        self.store.check()
        log.info("matcher: store %s, zones %s; a zone's state loads from Redis when its partition is assigned",
                 self.store.url, sorted({*self.zones.values(), DEFAULT_ZONE}))

    def _count_identities(self) -> None:
        for m in self.matchers.values():
            m._identities.set(len(m.gallery))

    def matcher(self, zone: str) -> CrossCameraMatcher:
        """The matcher of ``zone``, built and loaded from Redis on first use.

        Raises:
            TransientError: It could not be built or loaded (Redis unreachable, calibration file gone):
                the runner retries the batch; the records are not at fault.
        """
        m = self.matchers.get(zone)
        if m is not None:
            return m
        try:
            m = self.make_matcher(self.store.for_zone(zone))
            m.setup()
        except Exception as exc:  # noqa: BLE001 - never dead-letter records for a failed start-up
            raise TransientError(f"matcher of zone {zone!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
        log.info("matcher: zone %s loaded from Redis (%d tracklets in its window)", zone, len(m.window),
                 extra={"camera": f"zone:{zone}"})
        self.matchers[zone] = m
        return m

    def process(self, records: list[EmbeddingRecord]) -> list[Output]:
        """Link each record in its zone (records of one zone keep their order); outputs nothing.

        Raises:
            TransientError: Redis is unreachable (the runner retries; replays are no-ops).
            ValueError: A record does not fit its zone's window (dead-lettered by the runner).
        """
        by_zone: dict[str, list[EmbeddingRecord]] = {}
        for rec in records:
            by_zone.setdefault(self.zone_of(rec.camera), []).append(rec)
        for zone, recs in by_zone.items():
            self.matcher(zone).process(recs)
        self._count_identities()
        return []

    def idle(self) -> None:
        """Give each zone matcher its quiet moment (re-association when due).

        Raises:
            TransientError: Redis is unreachable.
        """
        for m in list(self.matchers.values()):
            m.idle()
        self._count_identities()

    def on_revoke(self, partitions: Sequence[Any]) -> None:
        """Drop every zone matcher (a rebalance revokes all partitions; state is rebuilt from Redis)."""
        if self.matchers:
            log.info("matcher: rebalance (%d partition(s) revoked): dropping zones %s; they reload from Redis "
                     "when assigned again", len(partitions), sorted(self.matchers))
        for m in self.matchers.values():
            m.release()
        self.matchers.clear()
        # the dropped galleries were frozen out of the cyclic garbage collector when they were
        # restored (CrossCameraMatcher.setup): hand everything back to it, so that what of them sits in
        # reference cycles is freed; the galleries loaded next are frozen again
        gc.unfreeze()
        gc.collect()

    def on_assign(self, partitions: Sequence[Any]) -> None:
        """Build, from Redis, the matchers of the known zones keyed to ``partitions`` (kafka-python
        ``TopicPartition`` s of the input topic); a zone that fails to load (Redis down) is logged and
        loads with its next record instead."""
        assigned = {tp.partition for tp in partitions}
        for zone in sorted({*self.zones.values(), DEFAULT_ZONE}):
            if self.zone_partition(zone) in assigned:
                try:
                    self.matcher(zone)
                except TransientError as exc:
                    log.warning("matcher: %s; it loads with its next record", exc)
        self._count_identities()

    def close(self) -> None:
        for m in self.matchers.values():
            m.release()
        self.matchers.clear()
        self.store.close()


__all__ = ["ZonedMatcher"]
