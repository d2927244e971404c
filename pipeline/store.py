"""Identity state in Redis: global identities, tracklet → identity links, per-camera sightings.

Keys (``{ns}`` is ``store.namespace``; ``{zk}`` is ``{ns}`` for the zone ``default`` and
``{ns}:zone:{zone}`` for any other zone, see :meth:`IdentityStore.for_zone`):

===================================  ======  =====================================================
key                                  type    content
===================================  ======  =====================================================
``{ns}:seq:identity``                string  counter behind new global ids (``G000001``…)
``{ns}:identities``                  zset    global id → first seen (stream seconds)
``{ns}:identity:{gid}``              hash    first_seen_s, last_seen_s, n_tracklets, cameras (JSON)
``{ns}:identity:{gid}:tracklets``    zset    tracklet id → start_s
``{ns}:tracklet:{tid}``              hash    the link: global_id, camera, zone, track_id, score,
                                             start_s, end_s, frames, boxes (JSON), embedding (float32
                                             bytes), quality (frames observed), closed_wall_s,
                                             linked_wall_s
``{ns}:tracklets``                   zset    tracklet id → linked order (monotonic counter)
``{zk}:tracklets:end``               zset    tracklet id → end_s: the zone's matcher window
``{ns}:camera:{cam}:sightings``      zset    tracklet id → start_s
``{ns}:thumb:{tid}``                 string  JPEG crop (BGR-encoded)
``{ns}:merged:{gid}``                string  the identity ``gid`` was merged into (see :meth:`resolve`)
``{ns}:audit``                       stream  one entry per merge or split: field ``record`` (JSON)
``{zk}:matcher``                     hash    the zone matcher's scoring space (``mean``,
                                             ``components``: float32 bytes, ``dim``), ``threshold``,
                                             ``transit`` (JSON), ``model``
``{zk}:reassociation``               hash    the zone's last re-association: ``links`` (links it
                                             covered), ``tracklets`` (window size), ``wall_s``,
                                             ``merges``, ``splits``, ``moved``
===================================  ======  =====================================================

Identities, links, the id sequence and the audit are shared by all zones (an identity belongs to the
zone whose matcher founded it; global ids are unique across zones). The zone ``default`` uses the
keys of a single-zone deployment, so stores written before zones existed are read unchanged.

Concurrency: several matcher instances may write one namespace (each owns some zones, and during a
consumer-group rebalance two may briefly write the same zone). Redis is the single source of truth:

* :meth:`IdentityStore.record_link` is one Lua script: it writes the link only when the tracklet is
  not linked yet, and updates the identity *from what Redis holds* (``first_seen_s`` = min,
  ``last_seen_s`` = max, cameras = union, ``n_tracklets`` + 1), so two writers never lose an update
  and readers never see half a link; :meth:`IdentityStore.has_tracklet` makes replays no-ops.
* :meth:`IdentityStore.apply_reassociation` WATCHes the identities and tracklets it rewrites and
  retries when another writer changed them, so its recounts never overwrite a concurrent link.
* New global ids come from ``INCR`` (atomic).

``{ns}:tracklet:{tid}``'s ``global_id`` is always the tracklet's *current* identity.

Retention: with ``store.retention_days`` set, every per-tracklet and per-identity key written gets that
TTL, renewed on each write (an identity lives ``retention_days`` after its last link). Shared indexes
(``{ns}:identities``, ``{ns}:tracklets``, camera sightings) keep dangling members of expired keys until
:meth:`IdentityStore.purge_before` trims them; readers skip them. ``purge_identity``, ``purge_camera``
and ``purge_before`` remove a person's, a camera's or an era's data explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from pipeline.config import DEFAULT_ZONE, StoreConfig

log = logging.getLogger(__name__)

# Attempts of a WATCHed re-association write before it is reported as an outage (retried later).
_WATCH_ATTEMPTS = 10

# One link, atomically (see IdentityStore.record_link).
# KEYS: tracklet hash, {ns}:tracklets, the zone's end index, the identity's member zset, the camera's
#       sightings, the identity hash, {ns}:identities, the thumbnail key.
# ARGV: tracklet id, global id, camera, start_s, end_s, link order, retention seconds (0: none),
#       thumbnail ('' for none), linked_wall_s, then the tracklet hash's field/value pairs.
# Returns 1 when written (or when this very call's write is found: redis-py re-sends a command whose
# reply was lost), 0 when the tracklet was linked before.
_RECORD_LINK_LUA = """
local tid, gid, camera, start_s, end_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', KEYS[1]) == 1 then
  local prev = redis.call('HMGET', KEYS[1], 'global_id', 'linked_wall_s')
  if prev[1] == gid and prev[2] == ARGV[9] then return 1 end
  return 0
end
local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[6], tid)
redis.call('ZADD', KEYS[3], end_s, tid)
redis.call('ZADD', KEYS[4], start_s, tid)
redis.call('ZADD', KEYS[5], start_s, tid)
local cur = redis.call('HMGET', KEYS[6], 'first_seen_s', 'last_seen_s', 'cameras')
local first, last = start_s, end_s
if cur[1] and tonumber(cur[1]) < tonumber(first) then first = cur[1] end
if cur[2] and tonumber(cur[2]) > tonumber(last) then last = cur[2] end
local cameras = {}
if cur[3] then cameras = cjson.decode(cur[3]) end
local known = false
for _, c in ipairs(cameras) do if c == camera then known = true end end
if not known then cameras[#cameras + 1] = camera end
table.sort(cameras)
redis.call('HSET', KEYS[6], 'first_seen_s', first, 'last_seen_s', last, 'cameras', cjson.encode(cameras))
redis.call('HINCRBY', KEYS[6], 'n_tracklets', 1)
redis.call('ZADD', KEYS[7], 'LT', first, gid)
if ARGV[8] ~= '' then redis.call('SET', KEYS[8], ARGV[8]) end
local ttl = tonumber(ARGV[7])
if ttl > 0 then
  for _, k in ipairs({KEYS[1], KEYS[6], KEYS[4], KEYS[8]}) do redis.call('EXPIRE', k, ttl) end
end
return 1
"""


class StoreError(RuntimeError):
    """Redis is unreachable or answered an error."""


@dataclasses.dataclass(frozen=True)
class Sighting:
    """One tracklet of an identity: where and when (stream seconds)."""

    tracklet_id: str
    camera: str
    start_s: float
    end_s: float


@dataclasses.dataclass(frozen=True)
class Link:
    """A tracklet's assignment to a global identity.

    ``score`` is the cosine similarity to the identity it joined, or ``None`` when the tracklet
    founded a new identity. Boxes are ``[x1, y1, x2, y2]`` source-video pixels; times are seconds.
    """

    tracklet_id: str
    camera: str
    track_id: int
    global_id: str
    score: float | None
    start_s: float
    end_s: float
    frames: list[int]
    boxes: list[list[float]]
    closed_wall_s: float
    linked_wall_s: float

    def to_json(self) -> dict[str, Any]:
        """The ``links.json`` object of this link (see docs/ARCHITECTURE.md)."""
        return {
            "tracklet_id": self.tracklet_id, "camera": self.camera, "track_id": self.track_id,
            "global_id": self.global_id, "score": self.score, "start_s": self.start_s, "end_s": self.end_s,
            "frames": list(self.frames), "boxes": [list(b) for b in self.boxes],
        }


@dataclasses.dataclass(frozen=True)
class Identity:
    """A global identity: cameras it was seen on, its tracklets and time span (stream seconds)."""

    global_id: str
    cameras: list[str]
    tracklets: list[str]
    first_seen_s: float
    last_seen_s: float

    @property
    def n_tracklets(self) -> int:
        return len(self.tracklets)

    def to_json(self) -> dict[str, Any]:
        """The ``identities.json`` object of this identity."""
        return {"global_id": self.global_id, "cameras": list(self.cameras), "tracklets": list(self.tracklets),
                "first_seen_s": self.first_seen_s, "last_seen_s": self.last_seen_s, "n_tracklets": self.n_tracklets}


@dataclasses.dataclass(frozen=True)
class WindowEntry:
    """A linked tracklet as the matcher's window holds it.

    Attributes:
        tracklet_id: The tracklet.
        camera: Its camera.
        start_s: First sighting, stream seconds.
        end_s: Last sighting, stream seconds.
        quality: Frames in which the tracker saw it (prototypes prefer the longest-observed).
        global_id: Its current global identity.
        embedding: ``float32 [D]``, as the re-id stage sent it.
    """

    tracklet_id: str
    camera: str
    start_s: float
    end_s: float
    quality: int
    global_id: str
    embedding: np.ndarray


@dataclasses.dataclass(frozen=True)
class Reassignment:
    """What one re-association changes, to be written atomically.

    Attributes:
        moves: tracklet id → (old global id, new global id), every tracklet whose identity changes.
        retired: Global ids left without tracklets, with the id each was merged into (None for an
            identity emptied by a split into new identities).
        audit: One JSON-serialisable record per merge or split.
        summary: Counts for ``{ns}:reassociation`` (``links``, ``tracklets``, ``merges``, ``splits``...).
    """

    moves: dict[str, tuple[str, str]]
    retired: dict[str, str | None]
    audit: list[dict[str, Any]]
    summary: dict[str, float | int]


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError, OSError)


def redis_auth_errors() -> tuple[type[BaseException], ...]:
    """redis-py's exceptions for missing or wrong credentials (NOAUTH, WRONGPASS, NOPERM)."""
    import redis

    return (redis.AuthenticationError, redis.exceptions.NoPermissionError, redis.ResponseError)


class IdentityStore:
    """Redis-backed identity store (of the zone ``default``; :meth:`for_zone` gives another zone's view).

    Args:
        url: Redis URL (``redis://[user:password@]host:port/db``; ``rediss://`` for TLS).
        namespace: Key prefix.
        connect_timeout_s: Socket connect/read timeout, seconds.
        username: ACL user (overrides the URL's).
        password: Password (overrides the URL's); never logged: :attr:`url` is the redacted URL.
        tls: Connect with TLS.
        tls_ca_file: CA bundle (PEM) for the server certificate.
        tls_cert_file: Client certificate (PEM), mutual TLS.
        tls_key_file: Client key (PEM), mutual TLS.
        retention_days: TTL of every per-tracklet and per-identity key written, days; None: no expiry.

    Raises:
        StoreError: From :meth:`check` when Redis does not answer or refuses the credentials.
    """

    def __init__(self, url: str, namespace: str = "reidstream", connect_timeout_s: float = 5.0,
                 username: str | None = None, password: str | None = None, tls: bool = False,
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None, tls_key_file: str | None = None,
                 retention_days: float | None = None) -> None:
        import redis

        from pipeline.redact import redact, register_secret

        register_secret(password)
        self.url = redact(url)  # for messages; the client keeps the credentials
        self.ns = namespace
        self.retention_s = int(retention_days * 86400) if retention_days else None
        opts: dict[str, Any] = {}
        if username is not None:
            opts["username"] = username
        if password is not None:
            opts["password"] = password
        if tls:
            opts["connection_class"] = redis.SSLConnection
        for key, value in (("ssl_ca_certs", tls_ca_file), ("ssl_certfile", tls_cert_file),
                           ("ssl_keyfile", tls_key_file)):
            if value is not None:
                opts[key] = str(value)
        self.r = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                      socket_timeout=max(connect_timeout_s, 5.0), health_check_interval=30, **opts)
        self.zone = DEFAULT_ZONE
        self._owns_client = True
        self._record_link = self.r.register_script(_RECORD_LINK_LUA)

    def for_zone(self, zone: str) -> IdentityStore:
        """A view of this store for one zone: the same Redis client and namespace, with the zone's own
        matcher state, re-association status and window index (``{ns}:zone:{zone}:…``; the zone
        ``default`` keeps the single-zone keys ``{ns}:matcher``…). Everything else (identities, links,
        id sequence, audit) is shared. Closing a view leaves the client open.

        Args:
            zone: Zone name (``[A-Za-z0-9_.-]+``, as in the config's ``zones``).

        Raises:
            ValueError: ``zone`` is empty or holds a character outside that set.
        """
        if not zone or any(not (ch.isascii() and (ch.isalnum() or ch in "_.-")) for ch in zone):
            raise ValueError(f"zone name {zone!r} must match [A-Za-z0-9_.-]+")
        view = copy.copy(self)
        view.zone = zone
        view._owns_client = False
        return view

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> IdentityStore:
        return cls(cfg.url, cfg.namespace, cfg.connect_timeout_s, username=cfg.username,
                   password=cfg.password.get_secret_value() if cfg.password else None, tls=cfg.tls,
                   tls_ca_file=cfg.tls_ca_file, tls_cert_file=cfg.tls_cert_file, tls_key_file=cfg.tls_key_file,
                   retention_days=cfg.retention_days)

    def _retain(self, pipe: Any, *keys: str) -> None:
        """Give ``keys`` the retention TTL (``store.retention_days``) in ``pipe``; no-op without one."""
        if self.retention_s:
            for key in keys:
                pipe.expire(key, self.retention_s)

    # ---------------------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def _zk(self, *parts: str) -> str:
        """A key of this view's zone: ``{ns}:…`` for ``default``, ``{ns}:zone:{zone}:…`` otherwise."""
        return self._k(*parts) if self.zone == DEFAULT_ZONE else self._k("zone", self.zone, *parts)

    def _end_index(self, zone: str) -> str:
        return self._k("tracklets", "end") if zone == DEFAULT_ZONE else self._k("zone", zone, "tracklets", "end")

    def check(self) -> None:
        """Ping Redis.

        Raises:
            StoreError: No answer; the message names the URL.
        """
        try:
            self.r.ping()
        except redis_auth_errors() as exc:  # before connection errors: AuthenticationError is one
            raise StoreError(f"Redis at {self.url} refused the credentials ({type(exc).__name__}: {exc}); "
                             f"set store.username / store.password") from None
        except _redis_errors() as exc:
            raise StoreError(f"Redis at {self.url} is not reachable ({exc}); start local services with "
                             f"`reidstream up`, or set store.url") from None

    def close(self) -> None:
        """Close the Redis client (a :meth:`for_zone` view leaves its parent's client open)."""
        if self._owns_client:
            self.r.close()

    def reset(self) -> int:
        """Delete every key of this namespace; returns how many."""
        n = 0
        batch: list[bytes] = []
        for key in self.r.scan_iter(match=f"{self.ns}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                n += self.r.delete(*batch)
                batch.clear()
        if batch:
            n += self.r.delete(*batch)
        return n

    # ---------------------------------------------------------------------------------------------
    # matcher side
    def has_tracklet(self, tracklet_id: str) -> bool:
        return bool(self.r.exists(self._k("tracklet", tracklet_id)))

    def next_global_id(self) -> str:
        """Allocate a new global id ``G`` + 6 digits (monotonic per namespace)."""
        return f"G{int(self.r.incr(self._k('seq', 'identity'))):06d}"

    def record_link(self, link: Link, embedding: np.ndarray, cameras: Iterable[str] | None = None,
                    first_seen_s: float | None = None, last_seen_s: float | None = None,
                    thumbnail: bytes | None = None, quality: int = 1) -> bool:
        """Store ``link`` and update its identity atomically (one Lua script), unless the tracklet is
        already linked.

        The identity's ``first_seen_s`` becomes min(stored, ``link.start_s``), ``last_seen_s``
        max(stored, ``link.end_s``), ``cameras`` the union of the stored ones and ``link.camera``, and
        ``n_tracklets`` grows by one, all computed in Redis, so concurrent writers to one identity lose
        no update. The tracklet is added to this view's zone window (``{zk}:tracklets:end``) and its
        hash records the zone.

        Args:
            link: The assignment.
            embedding: The tracklet's ``float32 [D]`` embedding.
            cameras: Ignored (kept for callers of the former signature): the identity's cameras are
                computed in Redis from what it holds and ``link.camera``.
            first_seen_s: Ignored, likewise (stream seconds).
            last_seen_s: Ignored, likewise (stream seconds).
            thumbnail: JPEG bytes of one crop, or None.
            quality: Frames in which the tracker saw the tracklet.

        Returns:
            True if written, False if the tracklet was already linked (a replay).

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis is unreachable; nothing or everything was
                written (a script is atomic), so the caller retries and a retry of a write that did
                happen is a replay.
        """
        del cameras, first_seen_s, last_seen_s  # the identity is updated from Redis' own state
        tid, gid = link.tracklet_id, link.global_id
        fields: dict[str, Any] = {
            "global_id": gid, "camera": link.camera, "zone": self.zone, "track_id": link.track_id,
            "score": "" if link.score is None else repr(float(link.score)),
            "start_s": repr(float(link.start_s)), "end_s": repr(float(link.end_s)),
            "frames": json.dumps(link.frames), "boxes": json.dumps(link.boxes),
            "embedding": np.asarray(embedding, "<f4").tobytes(), "quality": int(quality),
            "closed_wall_s": repr(link.closed_wall_s), "linked_wall_s": repr(link.linked_wall_s),
        }
        keys = [self._k("tracklet", tid), self._k("tracklets"), self._zk("tracklets", "end"),
                self._k("identity", gid, "tracklets"), self._k("camera", link.camera, "sightings"),
                self._k("identity", gid), self._k("identities"), self._k("thumb", tid)]
        args: list[Any] = [tid, gid, link.camera, fields["start_s"], fields["end_s"], time.time_ns(),
                           self.retention_s or 0, thumbnail or b"", fields["linked_wall_s"]]
        for name, value in fields.items():
            args.extend((name, value))
        return bool(self._record_link(keys=keys, args=args))

    def load_window(self, since_end_s: float | None = None, limit: int | None = None) -> list[WindowEntry]:
        """Linked tracklets of this view's zone whose last sighting is at or after ``since_end_s`` (all
        when None), the newest ``limit`` of them, ordered by end time; for a matcher (re)start."""
        lo = "-inf" if since_end_s is None else repr(float(since_end_s))
        tids = [t.decode() for t in self.r.zrangebyscore(self._zk("tracklets", "end"), lo, "+inf")]
        if limit is not None:
            tids = tids[-limit:]
        out = []
        fields = ("camera", "start_s", "end_s", "quality", "global_id", "embedding")
        for i in range(0, len(tids), 1000):
            chunk = tids[i:i + 1000]
            with self.r.pipeline(transaction=False) as pipe:
                for tid in chunk:
                    pipe.hmget(self._k("tracklet", tid), *fields)
                rows = pipe.execute()
            for tid, (cam, s, e, q, gid, emb) in zip(chunk, rows):
                if cam is None or emb is None:
                    continue
                out.append(WindowEntry(tid, cam.decode(), float(s), float(e), int(q or 1), gid.decode(),
                                       np.frombuffer(emb, "<f4").copy()))
        return out

    def identity_sightings(self, global_ids: Iterable[str]) -> dict[str, list[tuple[str, str, float, float]]]:
        """Every member ``(tracklet_id, camera, start_s, end_s)`` of each identity (also those outside
        the matcher's window)."""
        out: dict[str, list[tuple[str, str, float, float]]] = {}
        for gid in global_ids:
            tids = [t.decode() for t in self.r.zrange(self._k("identity", gid, "tracklets"), 0, -1)]
            with self.r.pipeline(transaction=False) as pipe:
                for tid in tids:
                    pipe.hmget(self._k("tracklet", tid), "camera", "start_s", "end_s")
                rows = pipe.execute()
            out[gid] = [(tid, c.decode(), float(s), float(e)) for tid, (c, s, e) in zip(tids, rows) if c is not None]
        return out

    def identity_sizes(self, global_ids: Iterable[str]) -> dict[str, int]:
        """Number of member tracklets of each identity (also those outside the matcher's window)."""
        ids = list(global_ids)
        with self.r.pipeline(transaction=False) as pipe:
            for gid in ids:
                pipe.zcard(self._k("identity", gid, "tracklets"))
            return {gid: int(n) for gid, n in zip(ids, pipe.execute())}

    def apply_reassociation(self, change: Reassignment) -> None:
        """Write a re-association atomically: move tracklets, refresh the identities they left and
        joined, retire emptied identities (``{ns}:merged:{gid}`` points at the survivor), append the
        audit records, and update this zone's ``{zk}:reassociation``. Idempotent: writing the same
        change twice leaves the same state.

        The identities' members and the moved tracklets are WATCHed while they are read; when another
        writer (a link, another instance's re-association) changes one before the transaction runs,
        everything is read again and recomputed, so no concurrent update is lost. A move whose
        tracklet meanwhile left the identity it is moved from (another writer moved it) or was purged
        is skipped.

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis is unreachable, or other writers kept
                changing these identities for ``_WATCH_ATTEMPTS`` tries (nothing is written).
        """
        import redis

        touched = sorted({g for old_new in change.moves.values() for g in old_new})
        watched = [self._k("identity", g, "tracklets") for g in touched] + \
            [self._k("identity", g) for g in touched] + [self._k("tracklet", t) for t in change.moves]
        for attempt in range(_WATCH_ATTEMPTS):
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    if watched:
                        pipe.watch(*watched)
                    self._write_reassociation(pipe, change, touched)
                    return
                except redis.WatchError:
                    log.info("store: re-association write conflicted with another writer (attempt %d); "
                             "reading again", attempt + 1)
                    time.sleep(min(0.01 * 2 ** attempt, 0.5))
        raise redis.ConnectionError(f"re-association of {len(change.moves)} moves conflicted with other writers "
                                    f"{_WATCH_ATTEMPTS} times; retrying later")

    def _write_reassociation(self, pipe: Any, change: Reassignment, touched: list[str]) -> None:
        """Read the touched identities (``pipe`` is watching them), compute and queue the writes."""
        moves = dict(change.moves)
        if moves:
            tids = list(moves)
            with self.r.pipeline(transaction=False) as read:
                for tid in tids:
                    read.hget(self._k("tracklet", tid), "global_id")
                current = dict(zip(tids, read.execute()))
            for tid, (old, new) in change.moves.items():
                now = current[tid].decode() if current[tid] is not None else None
                if now not in (old, new):
                    log.warning("store: %s is in %s now, not %s: another writer moved it; its move to %s is "
                                "skipped", tid, now, old, new)
                    del moves[tid]
        members = self.identity_sightings(touched)
        for tid, (old, new) in moves.items():
            row = next((m for m in members.get(old, []) if m[0] == tid), None) or \
                next((m for m in members.get(new, []) if m[0] == tid), None)
            members[old] = [m for m in members.get(old, []) if m[0] != tid]
            if row is not None and all(m[0] != tid for m in members.get(new, [])):
                members.setdefault(new, []).append(row)
        pipe.multi()
        for tid, (old, new) in moves.items():
            pipe.hset(self._k("tracklet", tid), "global_id", new)
            pipe.zrem(self._k("identity", old, "tracklets"), tid)
        for gid in touched:
            rows = members.get(gid, [])
            if not rows:
                pipe.delete(self._k("identity", gid), self._k("identity", gid, "tracklets"))
                pipe.zrem(self._k("identities"), gid)
                continue
            pipe.zadd(self._k("identity", gid, "tracklets"), {tid: s for tid, _, s, _ in rows})
            first = min(s for _, _, s, _ in rows)
            pipe.hset(self._k("identity", gid), mapping={
                "first_seen_s": repr(first), "last_seen_s": repr(max(e for *_, e in rows)),
                "cameras": json.dumps(sorted({c for _, c, _, _ in rows})), "n_tracklets": len(rows)})
            pipe.zadd(self._k("identities"), {gid: first})
            self._retain(pipe, self._k("identity", gid), self._k("identity", gid, "tracklets"))
        for gid, into in change.retired.items():
            if into is not None and not members.get(gid):
                pipe.set(self._k("merged", gid), into)
                self._retain(pipe, self._k("merged", gid))
        for record in change.audit:
            pipe.xadd(self._k("audit"), {"record": json.dumps(record)})
        pipe.hset(self._zk("reassociation"), mapping={k: repr(v) for k, v in change.summary.items()})
        pipe.execute()

    def resolve(self, global_id: str) -> str:
        """The current id of ``global_id``: itself, or the identity it was (transitively) merged into."""
        seen = {global_id}
        gid = global_id
        while (nxt := self.r.get(self._k("merged", gid))) is not None:
            gid = nxt.decode()
            if gid in seen:
                break
            seen.add(gid)
        return gid

    def audit(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Merge and split records, oldest first (the newest ``limit`` when given); each has the
        stream ``id`` added."""
        if limit is None:
            entries = self.r.xrange(self._k("audit"))
        else:
            entries = list(reversed(self.r.xrevrange(self._k("audit"), count=limit)))
        return [{"id": eid.decode(), **json.loads(fields[b"record"])} for eid, fields in entries]

    def save_matcher_state(self, fields: dict[str, bytes | str | float | int]) -> None:
        """Store this zone matcher's scoring space, threshold and transit statistics (``{zk}:matcher``)."""
        self.r.hset(self._zk("matcher"), mapping=fields)

    def matcher_state(self) -> dict[str, bytes]:
        """``{zk}:matcher`` of this view's zone as raw bytes per field (empty when never saved)."""
        return {k.decode(): v for k, v in self.r.hgetall(self._zk("matcher")).items()}

    def reassociation_status(self) -> dict[str, float]:
        """``{zk}:reassociation`` of this view's zone (empty before its first re-association)."""
        return {k.decode(): float(v) for k, v in self.r.hgetall(self._zk("reassociation")).items()}

    def count_all_links(self) -> int:
        """How many tracklets of this namespace are linked (all zones)."""
        return int(self.r.zcard(self._k("tracklets")))

    def count_zone_links(self) -> int:
        """How many tracklets of this view's zone are linked (its window index)."""
        return int(self.r.zcard(self._zk("tracklets", "end")))

    # ---------------------------------------------------------------------------------------------
    # query side
    def _link_from_hash(self, tid: str, h: dict[bytes, bytes]) -> Link:
        def s(k: str) -> str:
            return h[k.encode()].decode()

        score = s("score")
        return Link(tracklet_id=tid, camera=s("camera"), track_id=int(s("track_id")), global_id=s("global_id"),
                    score=float(score) if score else None, start_s=float(s("start_s")), end_s=float(s("end_s")),
                    frames=json.loads(s("frames")), boxes=json.loads(s("boxes")),
                    closed_wall_s=float(s("closed_wall_s")), linked_wall_s=float(s("linked_wall_s")))

    def link(self, tracklet_id: str) -> Link | None:
        """The link of ``tracklet_id``, or None when it is not linked (yet)."""
        h = self.r.hgetall(self._k("tracklet", tracklet_id))
        return self._link_from_hash(tracklet_id, h) if h else None

    def embedding(self, tracklet_id: str) -> np.ndarray | None:
        """The stored ``float32 [D]`` embedding of a linked tracklet."""
        raw = self.r.hget(self._k("tracklet", tracklet_id), "embedding")
        return np.frombuffer(raw, "<f4") if raw else None

    def links(self) -> list[Link]:
        """Every link, in the order they were stored."""
        tids = [t.decode() for t in self.r.zrange(self._k("tracklets"), 0, -1)]
        with self.r.pipeline(transaction=False) as pipe:
            for tid in tids:
                pipe.hgetall(self._k("tracklet", tid))
            return [self._link_from_hash(tid, h) for tid, h in zip(tids, pipe.execute()) if h]

    def count_links(self, tracklet_ids: Iterable[str]) -> int:
        """How many of ``tracklet_ids`` are linked."""
        ids = list(tracklet_ids)
        if not ids:
            return 0
        with self.r.pipeline(transaction=False) as pipe:
            for tid in ids:
                pipe.exists(self._k("tracklet", tid))
            return int(sum(pipe.execute()))

    def identities(self) -> list[Identity]:
        """Every global identity, by first sighting."""
        gids = [g.decode() for g in self.r.zrange(self._k("identities"), 0, -1)]
        out = []
        for gid in gids:
            ident = self.identity(gid)
            if ident is not None:
                out.append(ident)
        return out

    def identity(self, global_id: str) -> Identity | None:
        """One identity, or None."""
        h = self.r.hgetall(self._k("identity", global_id))
        if not h:
            return None
        tids = [t.decode() for t in self.r.zrange(self._k("identity", global_id, "tracklets"), 0, -1)]
        return Identity(global_id=global_id, cameras=json.loads(h[b"cameras"]), tracklets=tids,
                        first_seen_s=float(h[b"first_seen_s"]), last_seen_s=float(h[b"last_seen_s"]))

    def thumbnail(self, tracklet_id: str) -> bytes | None:
        """The JPEG thumbnail of a tracklet, or None."""
        return self.r.get(self._k("thumb", tracklet_id))

    # ---------------------------------------------------------------------------------------------
    # erasure: everything stored about one identity, one camera, or before a time
    def purge_identity(self, global_id: str) -> int:
        """Delete identity ``global_id``: its tracklets' links, embeddings and crops, its sightings, the
        identity itself, merge pointers from or to it, audit records naming it or its tracklets, and any
        key named after it or its tracklets. A running matcher keeps them in its window until it
        restarts; its saved scoring space is refitted at its next re-association.

        Returns:
            Tracklets removed (0 when the identity is unknown; the identity's keys are removed anyway).
        """
        tids = [t.decode() for t in self.r.zrange(self._k("identity", global_id, "tracklets"), 0, -1)]
        self._purge_tracklets(tids)
        self._rebuild_identity(global_id)
        self._purge_audit({global_id, *tids})
        return len(tids)

    def purge_camera(self, camera: str) -> int:
        """Delete every tracklet of ``camera`` (links, embeddings, crops, sightings, audit records and
        keys named after them); identities left without tracklets are deleted, the others are rebuilt
        from their remaining members (cameras, time span, count).

        Returns:
            Tracklets removed.
        """
        tids = [t.decode() for t in self.r.zrange(self._k("camera", camera, "sightings"), 0, -1)]
        emptied = self._purge_tracklets(tids)
        self.r.delete(self._k("camera", camera, "sightings"))
        self._purge_audit(set(tids) | emptied)
        return len(tids)

    def purge_before(self, wall_s: float) -> int:
        """Delete every tracklet its camera closed before ``wall_s`` (Unix seconds, ``closed_wall_s``),
        rebuilding or deleting their identities, and trim index entries whose keys already expired;
        audit records older than ``wall_s`` go too.

        Returns:
            Tracklets removed (expired leftovers included).
        """
        tids = [t.decode() for t in self.r.zrange(self._k("tracklets"), 0, -1)]
        old: list[str] = []
        with self.r.pipeline(transaction=False) as pipe:
            for tid in tids:
                pipe.hget(self._k("tracklet", tid), "closed_wall_s")
            for tid, closed in zip(tids, pipe.execute()):
                if closed is None or float(closed) < wall_s:
                    old.append(tid)
        emptied = self._purge_tracklets(old)
        self._purge_audit(set(old) | emptied, before_wall_s=wall_s)
        return len(old)

    def _keys_named_after(self, *idents: str) -> list[bytes]:
        """Keys of this namespace with one of ``idents`` as a ``:``-separated component (merge pointers
        and the like), found in one SCAN of the namespace."""
        wanted = set(idents)
        if not wanted:
            return []
        return [key for key in self.r.scan_iter(match=f"{self.ns}:*", count=1000)
                if wanted.intersection(key.decode("utf-8", "replace").split(":")[1:])]

    def _purge_audit(self, idents: set[str], before_wall_s: float | None = None) -> int:
        """Delete the audit records (``{ns}:audit``) that name one of ``idents`` (global ids or
        tracklet ids), or that are older than ``before_wall_s``; returns how many."""
        doomed = []
        for rec in self.audit():
            into = rec.get("into")
            named = {rec.get("from"), *(into if isinstance(into, list) else [into]), *rec.get("tracklets", ())}
            if named & idents or (before_wall_s is not None and rec.get("wall_s", float("inf")) < before_wall_s):
                doomed.append(rec["id"])
        for start in range(0, len(doomed), 1000):
            self.r.xdel(self._k("audit"), *doomed[start:start + 1000])
        if doomed and self.r.xlen(self._k("audit")) == 0:
            self.r.delete(self._k("audit"))
        return len(doomed)

    def _purge_tracklets(self, tids: list[str]) -> set[str]:
        """Delete ``tids`` everywhere; returns the identities left without tracklets (deleted)."""
        if not tids:
            return set()
        with self.r.pipeline(transaction=False) as pipe:
            for tid in tids:
                pipe.hmget(self._k("tracklet", tid), "global_id", "camera", "zone")
            rows = pipe.execute()
        gids: set[str] = set()
        with self.r.pipeline(transaction=True) as pipe:
            for tid, (gid, cam, zone) in zip(tids, rows):
                pipe.delete(self._k("tracklet", tid), self._k("thumb", tid))
                pipe.zrem(self._k("tracklets"), tid)
                pipe.zrem(self._end_index(zone.decode() if zone else DEFAULT_ZONE), tid)
                if gid is not None:
                    gids.add(gid.decode())
                    pipe.zrem(self._k("identity", gid.decode(), "tracklets"), tid)
                if cam is not None:
                    pipe.zrem(self._k("camera", cam.decode(), "sightings"), tid)
            pipe.execute()
        named = self._keys_named_after(*tids)
        for start in range(0, len(named), 1000):
            self.r.delete(*named[start:start + 1000])
        return {gid for gid in gids if not self._rebuild_identity(gid)}

    def _rebuild_identity(self, global_id: str) -> bool:
        """Recompute an identity from its remaining tracklets, or delete it (with the merge pointers
        from and to it) when none is left; returns whether it still exists."""
        ikey = self._k("identity", global_id)
        tids = [t.decode() for t in self.r.zrange(self._k("identity", global_id, "tracklets"), 0, -1)]
        rows = []
        if tids:
            with self.r.pipeline(transaction=False) as pipe:
                for tid in tids:
                    pipe.hmget(self._k("tracklet", tid), "camera", "start_s", "end_s")
                rows = [r for r in pipe.execute() if r[0] is not None]
        if not rows:
            named = self._keys_named_after(global_id)
            pointers = [k for k in self.r.scan_iter(match=self._k("merged", "*"), count=1000)
                        if self.r.get(k) == global_id.encode()]
            with self.r.pipeline(transaction=True) as pipe:
                pipe.delete(ikey, self._k("identity", global_id, "tracklets"), *named, *pointers)
                pipe.zrem(self._k("identities"), global_id)
                pipe.execute()
            return False
        first = min(float(r[1]) for r in rows)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(ikey, mapping={"first_seen_s": repr(first), "last_seen_s": repr(max(float(r[2]) for r in rows)),
                                     "cameras": json.dumps(sorted({r[0].decode() for r in rows})),
                                     "n_tracklets": len(rows)})
            pipe.zadd(self._k("identities"), {global_id: first})
            pipe.execute()
        return True
