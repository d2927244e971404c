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
``{ns}:tracklets:end``               zset    tracklet id → end_s, every zone's (time filters; the
                                             window of zone ``default``: its members whose hash has
                                             no other ``zone``)
``{ns}:zone:{z}:tracklets:end``      zset    tracklet id → end_s of zone ``z`` (not ``default``): its
                                             matcher window
``{ns}:zones``                       set     the zones other than ``default`` that have links
``{ns}:camera:{cam}:sightings``      zset    tracklet id → start_s
``{ns}:thumb:{tid}``                 string  JPEG crop (BGR-encoded)
``{ns}:merged:{gid}``                string  the identity ``gid`` was merged into (see :meth:`resolve`)
``{zk}:proto:{gid}``                 string  the identity's prototypes, compact (see
                                             :meth:`save_prototypes`): scoring-space vectors as
                                             float16 plus camera, span, quality of each
``{ns}:audit``                       stream  one entry per merge or split: field ``record`` (JSON)
``{ns}:constraints``                 list    operators' must-link / cannot-link decisions, one JSON
                                             object each (:class:`OperatorConstraint`)
``{zk}:matcher``                     hash    the zone matcher's scoring space (``mean``,
                                             ``components``: float32 bytes, ``dim``), ``threshold``,
                                             ``transit`` (JSON), ``model``
``{zk}:reassociation``               hash    the zone's last re-association: ``links`` (links it
                                             covered), ``tracklets`` (window size), ``wall_s``,
                                             ``merges``, ``splits``, ``moved``
===================================  ======  =====================================================

Identities, links, the id sequence, the audit and the operators' constraints are shared by all zones
(an identity belongs to the zone whose matcher founded it; global ids are unique across zones). The
zone ``default`` uses the keys of a single-zone deployment, so stores written before zones existed
are read unchanged.

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

import concurrent.futures
import copy
import dataclasses
import json
import logging
import struct
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

import numpy as np

from pipeline.config import DEFAULT_ZONE, StoreConfig

log = logging.getLogger(__name__)

# Attempts of a WATCHed re-association write before it is reported as an outage (retried later).
_WATCH_ATTEMPTS = 10

# One link, atomically (see IdentityStore.record_link).
# KEYS: tracklet hash, {ns}:tracklets, {ns}:tracklets:end, the identity's member zset, the camera's
#       sightings, the identity hash, {ns}:identities, the thumbnail key, the zone's end index ('' for
#       the zone default), {ns}:zones.
# ARGV[10] is the zone.
# ARGV: tracklet id, global id, camera, start_s, end_s, link order, retention seconds (0: none),
#       thumbnail ('' for none), linked_wall_s, zone, then the tracklet hash's field/value pairs.
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
for i = 11, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[6], tid)
redis.call('ZADD', KEYS[3], end_s, tid)
if KEYS[9] ~= '' then
  redis.call('ZADD', KEYS[9], end_s, tid)
  redis.call('SADD', KEYS[10], ARGV[10])
end
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
class Prototype:
    """A member tracklet that represents its identity in the matcher's gallery.

    Attributes:
        tracklet_id: The tracklet.
        camera: Its camera.
        start_s: First sighting, stream seconds.
        end_s: Last sighting, stream seconds.
        quality: Frames the tracker saw it in (prototypes prefer the longest-observed).
        y: ``float32 [K]`` projected, un-normalised scoring-space vector.
        arrival: Arrival order at the matcher (ties between equal quality go to the earlier).
    """

    tracklet_id: str
    camera: str
    start_s: float
    end_s: float
    quality: int
    y: np.ndarray
    arrival: int


_PROTO_MAGIC = b"RSP1"
_PROTO_HEADER = struct.Struct("<4I")  # epoch, K, P, length of the JSON


def encode_prototypes(protos: list[Prototype], epoch: int) -> bytes:
    """Compact form of an identity's prototypes: ``RSP1``, then little-endian uint32 epoch, K, P and
    the length of a JSON list of ``[tracklet_id, camera, start_s, end_s, quality, arrival]``, that
    JSON, then ``float16 [P, K]`` vectors (512 bytes per 256-d prototype).

    Raises:
        ValueError: No prototypes, or vectors of different dimensions.
    """
    if not protos:
        raise ValueError("an identity needs at least one prototype")
    ys = np.stack([np.asarray(p.y, np.float32) for p in protos])
    meta = json.dumps([[p.tracklet_id, p.camera, p.start_s, p.end_s, int(p.quality), int(p.arrival)]
                       for p in protos], separators=(",", ":")).encode()
    header = np.asarray([epoch, ys.shape[1], ys.shape[0], len(meta)], "<u4").tobytes()
    return _PROTO_MAGIC + header + meta + ys.astype("<f2").tobytes()


def decode_prototypes(blob: bytes) -> tuple[int, list[Prototype]]:
    """Inverse of :func:`encode_prototypes`: ``(epoch, prototypes)``.

    Raises:
        ValueError: Not a prototype blob (wrong magic or truncated).
    """
    if blob[:4] != _PROTO_MAGIC or len(blob) < 20:
        raise ValueError("not a reidstream prototype record")
    epoch, k, n, m = _PROTO_HEADER.unpack_from(blob, 4)
    meta = json.loads(blob[20:20 + m])
    raw = blob[20 + m:]
    if len(raw) != 2 * k * n or len(meta) != n:
        raise ValueError("truncated reidstream prototype record")
    ys = np.frombuffer(raw, "<f2").reshape(n, k).astype(np.float32)
    return epoch, [Prototype(t, c, float(s), float(e), int(q), y, int(a)) for (t, c, s, e, q, a), y in zip(meta, ys)]


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
                 retention_days: float | None = None, embedding_dtype: str = "float16") -> None:
        import redis

        from pipeline.redact import redact, register_secret

        register_secret(password)
        self.url = redact(url)  # for messages; the client keeps the credentials
        if embedding_dtype not in _EMBEDDING_CODES:
            raise ValueError(f"embedding_dtype must be float16 or float32, got {embedding_dtype!r}")
        self.embedding_code = _EMBEDDING_CODES[embedding_dtype]
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
                   retention_days=cfg.retention_days, embedding_dtype=cfg.embedding_dtype)

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

    def linked_among(self, tracklet_ids: Iterable[str]) -> set[str]:
        """Which of ``tracklet_ids`` are linked already (one pipelined round trip)."""
        tids = list(tracklet_ids)
        if not tids:
            return set()
        with self.r.pipeline(transaction=False) as pipe:
            for tid in tids:
                pipe.exists(self._k("tracklet", tid))
            return {tid for tid, n in zip(tids, pipe.execute()) if n}

    def next_global_id(self) -> str:
        """Allocate a new global id ``G`` + 6 digits (monotonic per namespace)."""
        return f"G{int(self.r.incr(self._k('seq', 'identity'))):06d}"

    def reserve_global_ids(self, n: int) -> list[str]:
        """Allocate ``n`` new global ids at once (one round trip), in increasing order; ids from the
        same sequence as :meth:`next_global_id`, so no other caller gets any of them.

        Raises:
            ValueError: ``n`` < 1.
            redis.ConnectionError, redis.TimeoutError: Redis is unreachable (nothing allocated).
        """
        if n < 1:
            raise ValueError(f"reserve at least one global id, got {n}")
        top = int(self.r.incrby(self._k("seq", "identity"), n))
        return [f"G{i:06d}" for i in range(top - n + 1, top + 1)]

    def record_link(self, link: Link, embedding: np.ndarray, cameras: Iterable[str] | None = None,
                    first_seen_s: float | None = None, last_seen_s: float | None = None,
                    thumbnail: bytes | None = None, quality: int = 1) -> bool:
        """Store ``link`` and update its identity atomically (one Lua script), unless the tracklet is
        already linked.

        The identity's ``first_seen_s`` becomes min(stored, ``link.start_s``), ``last_seen_s``
        max(stored, ``link.end_s``), ``cameras`` the union of the stored ones and ``link.camera``, and
        ``n_tracklets`` grows by one, all computed in Redis, so concurrent writers to one identity lose
        no update. The tracklet is added to ``{ns}:tracklets:end`` and, for a zone other than
        ``default``, to the zone's window index; its hash records the zone.

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
        keys, args = self._link_call(link, embedding, thumbnail, quality)
        return bool(self._record_link(keys=keys, args=args))

    def record_links(self, links: list[tuple[Link, np.ndarray, bytes | None, int]]) -> list[bool]:
        """:meth:`record_link` for many links in one pipelined round trip: each ``(link, embedding,
        thumbnail, quality)`` is its own atomic script run, in order, as if written one by one.

        Returns:
            Per link, True if written, False if its tracklet was already linked (a replay, or a link
            by another writer since the caller last looked).

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis is unreachable; any prefix of the links
                may have been written (each one whole or not at all): the caller finds out which with
                :meth:`linked_among` once Redis is back.
        """
        if not links:
            return []
        with self.r.pipeline(transaction=False) as pipe:
            for link, embedding, thumbnail, quality in links:
                keys, args = self._link_call(link, embedding, thumbnail, quality)
                self._record_link(keys=keys, args=args, client=pipe)
            return [bool(x) for x in pipe.execute()]

    def _link_call(self, link: Link, embedding: np.ndarray, thumbnail: bytes | None,
                   quality: int) -> tuple[list[str], list[Any]]:
        """The link script's keys and arguments for ``link``."""
        tid, gid = link.tracklet_id, link.global_id
        fields: dict[str, Any] = {
            "global_id": gid, "camera": link.camera, "zone": self.zone, "track_id": link.track_id,
            "score": "" if link.score is None else repr(float(link.score)),
            "start_s": repr(float(link.start_s)), "end_s": repr(float(link.end_s)),
            "frames": json.dumps(link.frames), "boxes": json.dumps(link.boxes),
            "embedding": encode_embedding(embedding, self.embedding_code), "embedding_dtype": self.embedding_code,
            "quality": int(quality),
            "closed_wall_s": repr(link.closed_wall_s), "linked_wall_s": repr(link.linked_wall_s),
        }
        keys = [self._k("tracklet", tid), self._k("tracklets"), self._k("tracklets", "end"),
                self._k("identity", gid, "tracklets"), self._k("camera", link.camera, "sightings"),
                self._k("identity", gid), self._k("identities"), self._k("thumb", tid),
                "" if self.zone == DEFAULT_ZONE else self._end_index(self.zone), self._k("zones")]
        args: list[Any] = [tid, gid, link.camera, fields["start_s"], fields["end_s"], time.time_ns(),
                           self.retention_s or 0, thumbnail or b"", fields["linked_wall_s"], self.zone]
        for name, value in fields.items():
            args.extend((name, value))
        return keys, args

    def load_window(self, since_end_s: float | None = None, limit: int | None = None) -> list[WindowEntry]:
        """Linked tracklets of this view's zone whose last sighting is at or after ``since_end_s`` (all
        when None), the newest ``limit`` of them, ordered by end time; for a matcher (re)start. The
        zone ``default`` reads ``{ns}:tracklets:end`` and skips tracklets of other zones."""
        lo = "-inf" if since_end_s is None else repr(float(since_end_s))
        tids = [t.decode() for t in self.r.zrangebyscore(self._end_index(self.zone), lo, "+inf")]
        fields = ("camera", "start_s", "end_s", "quality", "global_id", "embedding", "zone", "embedding_dtype")
        out: list[WindowEntry] = []
        stop = len(tids)  # newest first, in chunks, until ``limit`` entries of this zone are found
        while stop > 0 and (limit is None or len(out) < limit):
            chunk = tids[max(stop - 1000, 0):stop]
            stop -= len(chunk)
            with self.r.pipeline(transaction=False) as pipe:
                for tid in chunk:
                    pipe.hmget(self._k("tracklet", tid), *fields)
                rows = pipe.execute()
            found = []
            for tid, (cam, s, e, q, gid, emb, zone, code) in zip(chunk, rows):
                if cam is None or emb is None or (zone.decode() if zone else DEFAULT_ZONE) != self.zone:
                    continue
                found.append(WindowEntry(tid, cam.decode(), float(s), float(e), int(q or 1), gid.decode(),
                                         decode_embedding(emb, code).copy()))
            out = found + out
        if limit is not None and len(out) > limit:
            out = out[len(out) - limit:]
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

    def audit_after(self, stream_id: str | None, count: int = 1000) -> list[dict[str, Any]]:
        """Audit records written after ``stream_id`` (None: from the start), oldest first, at most
        ``count``; each has the stream ``id`` added."""
        entries = self.r.xrange(self._k("audit"), min="-" if stream_id is None else f"({stream_id}", count=count)
        return [{"id": eid.decode(), **json.loads(fields[b"record"])} for eid, fields in entries]

    def last_audit_id(self) -> str | None:
        """The id of the newest audit record, None when there is none."""
        last = self.r.xrevrange(self._k("audit"), count=1)
        return last[0][0].decode() if last else None

    def tracklet_rows(self, tracklet_ids: list[str]) -> dict[str, tuple[str, str, float, float, int, np.ndarray]]:
        """For each linked tracklet of ``tracklet_ids``: ``(global_id, camera, start_s, end_s, quality,
        embedding float32 [D])``; unlinked ones are left out. Pipelined."""
        with self.r.pipeline(transaction=False) as pipe:
            for tid in tracklet_ids:
                pipe.hmget(self._k("tracklet", tid), "global_id", "camera", "start_s", "end_s", "quality", "embedding",
                           "embedding_dtype")
            rows = pipe.execute()
        out = {}
        for tid, (gid, cam, start, end, quality, raw, code) in zip(tracklet_ids, rows):
            if gid is None or raw is None:
                continue
            out[tid] = (gid.decode(), cam.decode(), float(start), float(end), int(quality or 1),
                        decode_embedding(raw, code))
        return out

    def links_since(self, linked_ns: int | None) -> tuple[list[str], int | None]:
        """Tracklets linked at or after ``linked_ns`` (Unix nanoseconds of the write, as Redis' double
        holds it; None: every one), oldest first, and the newest such time (``linked_ns`` when there is
        none): a change feed for readers that keep their own view of the store (the API's search
        index). Inclusive, so the newest of one read comes again in the next: apply it idempotently."""
        rows = self.r.zrangebyscore(self._k("tracklets"), "-inf" if linked_ns is None else linked_ns, "+inf",
                                    withscores=True)
        if not rows:
            return [], linked_ns
        return [t.decode() for t, _ in rows], int(rows[-1][1])

    def newest_link(self) -> tuple[str, int] | None:
        """The most recently linked tracklet and its write time (as :meth:`links_since` gives it)."""
        rows = self.r.zrevrange(self._k("tracklets"), 0, 0, withscores=True)
        return (rows[0][0].decode(), int(rows[0][1])) if rows else None

    def count_tracklets(self) -> int:
        """Linked tracklets held (all zones)."""
        return int(self.r.zcard(self._k("tracklets")))

    def matcher_state_fields(self, *names: str) -> list[bytes | None]:
        """Some fields of ``{zk}:matcher`` (None where absent), without reading the whole state."""
        return list(self.r.hmget(self._zk("matcher"), list(names))) if names else []

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
        """How many tracklets of this view's zone are linked (for ``default``: all links less those of
        the other zones in ``{ns}:zones``)."""
        if self.zone != DEFAULT_ZONE:
            return int(self.r.zcard(self._end_index(self.zone)))
        others = sorted(z.decode() for z in self.r.smembers(self._k("zones")))
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zcard(self._k("tracklets", "end"))
            for zone in others:
                pipe.zcard(self._end_index(zone))
            total, *counts = pipe.execute()
        return int(total) - int(sum(counts))

    def save_prototypes(self, protos: dict[str, list[Prototype]], epoch: int) -> None:
        """Store identities' prototypes compactly (``{zk}:proto:{gid}`` of this view's zone,
        :func:`encode_prototypes`); an empty list deletes the record. Pipelined in batches of 1000."""
        items = list(protos.items())
        for start in range(0, len(items), 1000):
            with self.r.pipeline(transaction=False) as pipe:
                for gid, rows in items[start:start + 1000]:
                    key = self._zk("proto", gid)
                    if rows:
                        pipe.set(key, encode_prototypes(rows, epoch))
                        self._retain(pipe, key)
                    else:
                        pipe.delete(key)
                pipe.execute()

    def load_prototypes(self, exclude: set[str] | frozenset = frozenset(),
                        batch: int = 5000) -> dict[str, tuple[int, list[Prototype]]]:
        """The stored prototypes of every identity of this view's zone (but ``exclude``):
        ``gid → (epoch, prototypes)``, vectors ``float32 [K]`` of the scoring space. Identities without
        a record in this zone (other zones', or never linked by a matcher of this version) are left out.

        Raises:
            ValueError: A stored record is not a prototype record (:func:`decode_prototypes`).
        """
        gids = [g.decode() for g in self.r.zrange(self._k("identities"), 0, -1)]
        gids = [g for g in gids if g not in exclude]
        parts = [gids[start:start + batch] for start in range(0, len(gids), batch)]
        out: dict[str, tuple[int, list[Prototype]]] = {}

        def fetch(part: list[str]) -> list[bytes | None]:
            return self.r.mget([self._zk("proto", g) for g in part])

        # the next batch is read (Redis gathering and sending it, the socket wait without the GIL)
        # while this one is decoded: at 10^6 identities the reads and the decoding take about as long
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reidstream-prototypes") as reader:
            ahead = reader.submit(fetch, parts[0]) if parts else None
            for i, part in enumerate(parts):
                blobs = ahead.result()
                ahead = reader.submit(fetch, parts[i + 1]) if i + 1 < len(parts) else None
                for gid, blob in zip(part, blobs):
                    if blob:
                        out[gid] = decode_prototypes(blob)
        return out

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
        raw, code = self.r.hmget(self._k("tracklet", tracklet_id), "embedding", "embedding_dtype")
        return decode_embedding(raw, code) if raw else None

    def stored_embedding(self, embedding: np.ndarray) -> np.ndarray:
        """``embedding`` as it will read back from this store (rounded to the stored dtype),
        ``float32 [D]``."""
        return decode_embedding(encode_embedding(embedding, self.embedding_code), self.embedding_code).copy()

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
        identity itself, merge pointers from or to it, audit records naming it or its tracklets, its
        tracklets in the operators' constraints, and any key named after it or its tracklets. A running
        matcher keeps them in its window until it
        restarts; its saved scoring space is refitted at its next re-association.

        Returns:
            Tracklets removed (0 when the identity is unknown; the identity's keys are removed anyway).
        """
        tids = [t.decode() for t in self.r.zrange(self._k("identity", global_id, "tracklets"), 0, -1)]
        self._purge_tracklets(tids)
        self._rebuild_identity(global_id)
        self._purge_audit({global_id, *tids})
        self._purge_constraints(set(tids))
        return len(tids)

    def purge_camera(self, camera: str) -> int:
        """Delete every tracklet of ``camera`` (links, embeddings, crops, sightings, audit records and
        keys named after them, their places in the operators' constraints); identities left without tracklets are deleted, the others are rebuilt
        from their remaining members (cameras, time span, count).

        Returns:
            Tracklets removed.
        """
        tids = [t.decode() for t in self.r.zrange(self._k("camera", camera, "sightings"), 0, -1)]
        emptied = self._purge_tracklets(tids)
        self.r.delete(self._k("camera", camera, "sightings"))
        self._purge_audit(set(tids) | emptied)
        self._purge_constraints(set(tids))
        return len(tids)

    def purge_before(self, wall_s: float) -> int:
        """Delete every tracklet its camera closed before ``wall_s`` (Unix seconds, ``closed_wall_s``),
        rebuilding or deleting their identities, and trim index entries whose keys already expired;
        audit records and operators' constraints older than ``wall_s`` go too.

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
        self._purge_constraints(set(old), before_wall_s=wall_s)
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

    def _purge_constraints(self, tids: set[str], before_wall_s: float | None = None) -> int:
        """Take the purged tracklets ``tids`` out of the operators' constraints (``{ns}:constraints``);
        a constraint left without tracklets on a side, or decided before ``before_wall_s`` (Unix
        seconds), is deleted. Rewritten under WATCH, so a constraint appended meanwhile is kept.
        Returns how many constraints changed or went."""
        key = self._k("constraints")
        changed = 0

        def rewrite(pipe: Any) -> None:
            nonlocal changed
            raws = pipe.lrange(key, 0, -1)
            kept, changed = [], 0
            for raw in raws:
                obj = json.loads(raw)
                a = [t for t in obj.get("a", ()) if t not in tids]
                b = [t for t in obj.get("b", ()) if t not in tids]
                old = before_wall_s is not None and float(obj.get("wall_s", float("inf"))) < before_wall_s
                if old or not a or not b:
                    changed += 1
                    continue
                if len(a) != len(obj.get("a", ())) or len(b) != len(obj.get("b", ())):
                    changed += 1
                    raw = json.dumps({**obj, "a": a, "b": b})
                kept.append(raw)
            if not changed:
                return
            pipe.multi()
            pipe.delete(key)
            if kept:
                pipe.rpush(key, *kept)

        if tids or before_wall_s is not None:
            self.r.transaction(rewrite, key)
        return changed

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
                pipe.zrem(self._k("tracklets", "end"), tid)
                if zone and zone.decode() != DEFAULT_ZONE:
                    pipe.zrem(self._end_index(zone.decode()), tid)
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

    # ---------------------------------------------------------------------------------------------
    # operator queries (the operator API, `reidstream query`, `reidstream report`)
    #
    # Reads here touch an index range and the rows they return, never every link: identities page
    # over ``{ns}:identities`` (first seen, then id), filters are answered from the smallest index
    # that narrows them (a camera's sightings, ``{ns}:tracklets:end``, the first-seen range) or by an
    # in-order scan of the first-seen index that stops once the page is full. Multi-row reads are
    # pipelined in chunks of OPERATOR_CHUNK commands. Operator merges and splits go through
    # :meth:`apply_reassociation` and are recorded as constraints (``{ns}:constraints``).
    def identities_page(self, offset: int = 0, limit: int | None = 50, *, camera: str | None = None,
                        since_s: float | None = None, until_s: float | None = None, min_cameras: int = 1,
                        newest_first: bool = False) -> Page[Identity]:
        """A page of global identities, ordered by first sighting, then global id.

        Filters combine (all must hold): ``camera`` among the identity's cameras; its span
        ``[first_seen_s, last_seen_s]`` overlaps ``[since_s, until_s]`` (stream seconds; either end
        open when None); at least ``min_cameras`` cameras.

        Cost: without filters, or with ``until_s`` alone, O(log N + limit) reads and an exact
        ``total``. With ``camera`` or ``since_s``, the candidates of the cheaper of the camera's
        sightings, the tracklets ending at or after ``since_s`` and the first-seen range are read (two
        fields each) and ``total`` is exact. When neither narrows better than the first-seen range
        (e.g. ``min_cameras`` alone), or the cheaper one holds more than ``OPERATOR_CANDIDATES``
        tracklets, that range is scanned in order until the page and one more match are found:
        ``total`` is then None unless the scan reached the end, and ``next_offset`` says whether
        another page exists.

        Args:
            offset: Matches to skip, >= 0.
            limit: Page size, >= 1; None returns every match.
            camera: Only identities seen on this camera.
            since_s: Only identities last seen at or after this (stream seconds).
            until_s: Only identities first seen at or before this (stream seconds).
            min_cameras: Only identities seen on at least this many cameras, >= 1.
            newest_first: Order by first sighting descending (then global id descending).

        Returns:
            The page; ``total`` counts matches (it may include identities whose keys expired under
            ``store.retention_days`` until :meth:`purge_before` trims the index; such rows are skipped).

        Raises:
            ValueError: ``offset < 0``, ``limit < 1``, ``min_cameras < 1`` or ``since_s > until_s``.
            redis.ConnectionError, redis.TimeoutError: Redis is unreachable.
        """
        _check_page(offset, limit)
        if min_cameras < 1:
            raise ValueError(f"min_cameras must be >= 1, got {min_cameras}")
        if since_s is not None and until_s is not None and since_s > until_s:
            raise ValueError(f"since_s ({since_s}) is after until_s ({until_s})")
        zkey = self._k("identities")
        hi = "+inf" if until_s is None else repr(float(until_s))
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zcount(zkey, "-inf", hi)
            if camera is not None:
                pipe.zcard(self._k("camera", camera, "sightings"))
            if since_s is not None:
                pipe.zcount(self._k("tracklets", "end"), repr(float(since_s)), "+inf")
            counts = iter(pipe.execute())
        n_range = int(next(counts))
        n_camera = int(next(counts)) if camera is not None else None
        n_ending = int(next(counts)) if since_s is not None else None

        def keep(first: float, last: float, cameras: list[str]) -> bool:
            return ((until_s is None or first <= until_s) and (since_s is None or last >= since_s)
                    and (camera is None or camera in cameras) and len(cameras) >= min_cameras)

        if camera is None and since_s is None and min_cameras == 1:  # the first-seen index answers alone
            lo, hi_rank = _rank_window(n_range, offset, limit, newest_first)
            gids = [] if lo > hi_rank else [g.decode() for g in self.r.zrange(zkey, lo, hi_rank)]
            if newest_first:
                gids.reverse()
            return Page(self.identities_by_id(gids), n_range, offset, limit, _next_offset(offset, limit, n_range))

        narrowing = [(n, src) for n, src in ((n_camera, "camera"), (n_ending, "ending")) if n is not None]
        if narrowing and min(narrowing)[0] < n_range and min(narrowing)[0] <= OPERATOR_CANDIDATES:
            source = min(narrowing)[1]
            if source == "camera":
                tids = [t.decode() for t in self.r.zrange(self._k("camera", str(camera), "sightings"), 0, -1)]
            else:
                tids = [t.decode() for t in self.r.zrangebyscore(self._k("tracklets", "end"),
                                                                 repr(float(since_s)), "+inf")]
            rows = self._identity_rows(sorted(self.global_ids_of(tids)))
            matched = sorted(((row[0], gid) for gid, row in rows.items() if keep(*row[1:])), reverse=newest_first)
            window = matched[offset:None if limit is None else offset + limit]
            return Page(self.identities_by_id([g for _, g in window]), len(matched), offset, limit,
                        _next_offset(offset, limit, len(matched)))

        def kept() -> Iterator[list[str]]:
            for gids in self._rank_chunks(zkey, n_range, newest_first):
                rows = self._identity_rows(gids)
                yield [g for g in gids if rows.get(g) is not None and keep(*rows[g][1:])]

        picked, count, complete = _scan_page(kept(), offset, limit)
        nxt = offset + limit if limit is not None and not complete else _next_offset(offset, limit, count)
        return Page(self.identities_by_id(picked), count if complete else None, offset, limit, nxt)

    def camera_sightings(self, camera: str, since_s: float | None = None, until_s: float | None = None,
                         offset: int = 0, limit: int | None = 100) -> Page[SightingRecord] | None:
        """A camera's tracklets that start in ``[since_s, until_s]`` (stream seconds, either end open when
        None), ordered by start, then tracklet id; one ``ZRANGEBYSCORE`` plus one pipelined read.

        Returns:
            The page with an exact ``total``, or None when nothing of ``camera`` is stored.

        Raises:
            ValueError: Bad ``offset``/``limit``, or ``since_s > until_s``.
        """
        _check_page(offset, limit)
        if since_s is not None and until_s is not None and since_s > until_s:
            raise ValueError(f"since_s ({since_s}) is after until_s ({until_s})")
        key = self._k("camera", camera, "sightings")
        lo = "-inf" if since_s is None else repr(float(since_s))
        hi = "+inf" if until_s is None else repr(float(until_s))
        with self.r.pipeline(transaction=False) as pipe:
            pipe.exists(key)
            pipe.zcount(key, lo, hi)
            pipe.zrangebyscore(key, lo, hi, start=offset, num=-1 if limit is None else limit)
            exists, total, tids = pipe.execute()
        if not exists:
            return None
        items = self._sighting_records([t.decode() for t in tids])
        return Page(items, int(total), offset, limit, _next_offset(offset, limit, int(total)))

    def identity_timeline(self, global_id: str, offset: int = 0,
                          limit: int | None = None) -> Page[SightingRecord] | None:
        """An identity's tracklets ordered by start (stream seconds), then tracklet id, with camera,
        span, join score and whether a thumbnail is stored; None when the identity is unknown (merge
        pointers are not followed: see :meth:`resolve`).

        Raises:
            ValueError: Bad ``offset``/``limit``.
        """
        _check_page(offset, limit)
        key = self._k("identity", global_id, "tracklets")
        stop = -1 if limit is None else offset + limit - 1
        with self.r.pipeline(transaction=False) as pipe:
            pipe.exists(self._k("identity", global_id))
            pipe.zcard(key)
            pipe.zrange(key, offset, stop)
            exists, total, tids = pipe.execute()
        if not exists:
            return None
        items = self._sighting_records([t.decode() for t in tids])
        return Page(items, int(total), offset, limit, _next_offset(offset, limit, int(total)))

    def links_page(self, offset: int = 0, limit: int | None = 100, *, camera: str | None = None,
                   cross_camera: bool = False) -> Page[Link]:
        """A page of links: in storage order, or by start time with ``camera``.

        ``cross_camera`` keeps links whose identity spans two or more cameras; it scans the index in
        order until the page and one more match are found (``total`` None unless the scan ended).

        Raises:
            ValueError: Bad ``offset``/``limit``.
        """
        _check_page(offset, limit)
        key = self._k("camera", camera, "sightings") if camera is not None else self._k("tracklets")
        n = int(self.r.zcard(key))
        if not cross_camera:
            lo, hi = _rank_window(n, offset, limit, False)
            tids = [] if lo > hi else [t.decode() for t in self.r.zrange(key, lo, hi)]
            return Page(self.links_of(tids), n, offset, limit, _next_offset(offset, limit, n))
        spans: dict[str, int] = {}

        def kept() -> Iterator[list[Link]]:
            for tids in self._rank_chunks(key, n, False):
                links = self.links_of(tids)
                unknown = sorted({lk.global_id for lk in links} - spans.keys())
                with self.r.pipeline(transaction=False) as pipe:
                    for gid in unknown:
                        pipe.hget(self._k("identity", gid), "cameras")
                    spans.update({g: len(json.loads(c)) if c else 0 for g, c in zip(unknown, pipe.execute())})
                yield [lk for lk in links if spans.get(lk.global_id, 0) >= 2]

        picked, count, complete = _scan_page(kept(), offset, limit)
        nxt = offset + limit if limit is not None and not complete else _next_offset(offset, limit, count)
        return Page(picked, count if complete else None, offset, limit, nxt)

    def embedding_batches(self, batch_size: int = 1000) -> Iterable[list[tuple[str, str, np.ndarray]]]:
        """Every linked tracklet's ``(tracklet_id, global_id, embedding)``, ``batch_size`` per pipelined
        read, in storage order; embeddings are decoded by :func:`decode_embedding` (``float32 [D]``).

        Raises:
            ValueError: ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        key = self._k("tracklets")
        for tids in self._rank_chunks(key, int(self.r.zcard(key)), False, batch_size):
            with self.r.pipeline(transaction=False) as pipe:
                for tid in tids:
                    pipe.hmget(self._k("tracklet", tid), "global_id", "embedding", "embedding_dtype")
                rows = pipe.execute()
            yield [(tid, gid.decode(), decode_embedding(raw, code)) for tid, (gid, raw, code) in zip(tids, rows)
                   if gid is not None and raw]

    def _identity_zones(self, members: dict[str, list[str]]) -> dict[str, str]:
        """The zone of each identity of ``members`` (global id → its tracklet ids), read from its
        tracklets (``zone`` field; records written before zones existed are in ``default``); an identity
        whose tracklets disagree is reported as ``"a+b"``."""
        with self.r.pipeline(transaction=False) as pipe:
            for tids in members.values():
                for tid in tids:
                    pipe.hget(self._k("tracklet", tid), "zone")
            raw = iter(pipe.execute())
        out = {}
        for gid, tids in members.items():
            zs = sorted({(z.decode() if z else DEFAULT_ZONE) for z in (next(raw) for _ in tids)})
            out[gid] = "+".join(zs) if zs else DEFAULT_ZONE
        return out

    def constraints(self) -> list[OperatorConstraint]:
        """The operators' must-link and cannot-link decisions (``{ns}:constraints``), oldest first."""
        return [OperatorConstraint.from_json(json.loads(raw)) for raw in self.r.lrange(self._k("constraints"), 0, -1)]

    def operator_merge(self, into: str, sources: Iterable[str], operator: str, note: str = "",
                       wall_s: float | None = None) -> OperatorChange:
        """Move every tracklet of the identities ``sources`` into identity ``into`` (an operator's merge).

        Written by :meth:`apply_reassociation` in one transaction: the moves, the rebuilt identities,
        ``{ns}:merged:{source}`` → ``into`` and one audit record per source (``kind: merge``,
        ``reason: operator``, ``operator``, ``note``, ``operation``). Then one must-link constraint per
        source (``a``: the tracklets of ``into``, ``b``: the source's) is appended to ``{ns}:constraints``.

        Args:
            into: The surviving global id.
            sources: Global ids to merge into it (at least one, distinct, none equal to ``into``).
            operator: Who decided (non-empty).
            note: Free-text reason.
            wall_s: Unix seconds of the decision (now when None).

        Raises:
            IdentityNotFoundError: ``into`` or a source is unknown.
            IdentityRetiredError: ``into`` or a source was merged away (its ``into`` names the survivor).
            ValueError: No source, a repeated source, ``into`` among them, an empty ``operator``, or
                identities of different zones.
        """
        srcs = list(sources)
        operator = _operator_name(operator)
        if not srcs:
            raise ValueError("give at least one identity to merge")
        if len(set(srcs)) != len(srcs):
            raise ValueError(f"identities to merge repeat: {srcs}")
        if into in srcs:
            raise ValueError(f"cannot merge identity {into} into itself")
        self._require_current([into, *srcs])
        members = self.identity_members([into, *srcs])
        zones = self._identity_zones(members)
        if len(set(zones.values())) > 1:
            raise ValueError("identities of different zones cannot be merged (identities are zone-local): "
                             + ", ".join(f"{g} in {z}" for g, z in zones.items()))
        now = time.time() if wall_s is None else float(wall_s)
        operation = f"op-{time.time_ns():x}-{into}"
        moves = {tid: (src, into) for src in srcs for tid in members[src]}
        audit = [{"kind": "merge", "from": src, "into": into, "tracklets": members[src], "wall_s": now,
                  "reason": "operator", "operator": operator, "note": note, "operation": operation} for src in srcs]
        self.apply_reassociation(Reassignment(moves, {src: into for src in srcs}, audit,
                                              {"operator_wall_s": now, "operator_moved": len(moves)}))
        ids = self._audit_ids(operation, len(audit))
        made = [OperatorConstraint("must", list(members[into]), list(members[src]), ids[i], now, operator)
                for i, src in enumerate(srcs)]
        self._append_constraints(made)
        return OperatorChange("merge", into, None, sorted(moves), [i for i in ids if i is not None], made)

    def operator_split(self, global_id: str, tracklets: Iterable[str], operator: str, note: str = "",
                       wall_s: float | None = None) -> OperatorChange:
        """Move ``tracklets`` of identity ``global_id`` to a new identity (an operator's split).

        The new id comes from :meth:`next_global_id`; the move, both rebuilt identities and one audit
        record (``kind: split``, ``into: [new id]``, ``reason: operator``, ``operator``, ``note``) are
        written by :meth:`apply_reassociation`; then a cannot-link constraint (``a``: the tracklets split
        off, ``b``: those left) is appended to ``{ns}:constraints``.

        Raises:
            IdentityNotFoundError: ``global_id`` is unknown.
            IdentityRetiredError: ``global_id`` was merged away.
            ValueError: No tracklet, a repeated one, one that is not a member of ``global_id``, all of
                its members (nothing would remain), or an empty ``operator``.
        """
        tids = list(tracklets)
        operator = _operator_name(operator)
        if not tids:
            raise ValueError("give at least one tracklet to split off")
        if len(set(tids)) != len(tids):
            raise ValueError(f"tracklets to split off repeat: {tids}")
        self._require_current([global_id])
        members = self.identity_members([global_id])[global_id]
        strangers = sorted(set(tids) - set(members))
        if strangers:
            raise ValueError(f"tracklets {strangers} are not members of identity {global_id}")
        rest = [t for t in members if t not in set(tids)]
        if not rest:
            raise ValueError(f"splitting off all {len(members)} tracklets of {global_id} would leave it empty; "
                             f"split off a part of them")
        new = self.next_global_id()
        now = time.time() if wall_s is None else float(wall_s)
        operation = f"op-{time.time_ns():x}-{global_id}"
        moved = sorted(tids)
        audit = [{"kind": "split", "from": global_id, "into": [new], "tracklets": moved, "wall_s": now,
                  "reason": "operator", "operator": operator, "note": note, "operation": operation}]
        self.apply_reassociation(Reassignment({t: (global_id, new) for t in moved}, {}, audit,
                                              {"operator_wall_s": now, "operator_moved": len(moved)}))
        (audit_id,) = self._audit_ids(operation, 1)
        made = [OperatorConstraint("cannot", moved, rest, audit_id, now, operator)]
        self._append_constraints(made)
        return OperatorChange("split", global_id, new, moved, [] if audit_id is None else [audit_id], made)

    # helpers of the operator queries
    def _rank_chunks(self, key: str, n: int, descending: bool, size: int = 0) -> Iterable[list[str]]:
        """Members of the first ``n`` ranks of zset ``key``, ``size`` (OPERATOR_CHUNK) per read."""
        size = size or OPERATOR_CHUNK
        if descending:
            for hi in range(n - 1, -1, -size):
                yield [m.decode() for m in reversed(self.r.zrange(key, max(hi - size + 1, 0), hi))]
        else:
            for lo in range(0, n, size):
                yield [m.decode() for m in self.r.zrange(key, lo, min(lo + size, n) - 1)]

    def _identity_rows(self, gids: list[str]) -> dict[str, tuple[float, float, float, list[str]]]:
        """``gid`` → (index score, first_seen_s, last_seen_s, cameras) of the identities that exist."""
        out: dict[str, tuple[float, float, float, list[str]]] = {}
        for start in range(0, len(gids), OPERATOR_CHUNK):
            chunk = gids[start:start + OPERATOR_CHUNK]
            with self.r.pipeline(transaction=False) as pipe:
                for gid in chunk:
                    pipe.zscore(self._k("identities"), gid)
                    pipe.hmget(self._k("identity", gid), "first_seen_s", "last_seen_s", "cameras")
                rows = pipe.execute()
            for i, gid in enumerate(chunk):
                score, (first, last, cams) = rows[2 * i], rows[2 * i + 1]
                if score is not None and first is not None and cams is not None:
                    out[gid] = (float(score), float(first), float(last), json.loads(cams))
        return out

    def identities_by_id(self, gids: list[str]) -> list[Identity]:
        """The identities ``gids`` in that order (unknown ones skipped; merges are not followed), one
        pipelined read."""
        with self.r.pipeline(transaction=False) as pipe:
            for gid in gids:
                pipe.hmget(self._k("identity", gid), "first_seen_s", "last_seen_s", "cameras")
                pipe.zrange(self._k("identity", gid, "tracklets"), 0, -1)
            rows = pipe.execute() if gids else []
        out = []
        for i, gid in enumerate(gids):
            (first, last, cams), tids = rows[2 * i], rows[2 * i + 1]
            if first is not None and cams is not None:
                out.append(Identity(gid, json.loads(cams), [t.decode() for t in tids], float(first), float(last)))
        return out

    def global_ids_of(self, tids: list[str]) -> set[str]:
        """Current global ids of the linked tracklets among ``tids``."""
        out: set[str] = set()
        for start in range(0, len(tids), OPERATOR_CHUNK):
            with self.r.pipeline(transaction=False) as pipe:
                for tid in tids[start:start + OPERATOR_CHUNK]:
                    pipe.hget(self._k("tracklet", tid), "global_id")
                out.update(g.decode() for g in pipe.execute() if g is not None)
        return out

    def _sighting_records(self, tids: list[str]) -> list[SightingRecord]:
        """Sighting records of the linked tracklets among ``tids``, in that order."""
        fields = ("camera", "track_id", "global_id", "score", "start_s", "end_s")
        with self.r.pipeline(transaction=False) as pipe:
            for tid in tids:
                pipe.hmget(self._k("tracklet", tid), *fields)
                pipe.exists(self._k("thumb", tid))
            rows = pipe.execute() if tids else []
        out = []
        for i, tid in enumerate(tids):
            (cam, track, gid, score, start, end), thumb = rows[2 * i], rows[2 * i + 1]
            if cam is None or gid is None:
                continue
            out.append(SightingRecord(tid, cam.decode(), int(track), gid.decode(), float(score) if score else None,
                                      float(start), float(end), bool(thumb)))
        return out

    def links_of(self, tids: list[str]) -> list[Link]:
        """Links of the linked tracklets among ``tids``, in that order (embeddings are not read; one
        pipelined read)."""
        fields = ("global_id", "camera", "track_id", "score", "start_s", "end_s", "frames", "boxes",
                  "closed_wall_s", "linked_wall_s")
        with self.r.pipeline(transaction=False) as pipe:
            for tid in tids:
                pipe.hmget(self._k("tracklet", tid), *fields)
            rows = pipe.execute() if tids else []
        return [self._link_from_hash(tid, {f.encode(): v for f, v in zip(fields, row)})
                for tid, row in zip(tids, rows) if row[0] is not None]

    def thumbnails(self, tids: list[str]) -> dict[str, bytes]:
        """Tracklet id → JPEG thumbnail of those of ``tids`` that have one (one pipelined read)."""
        with self.r.pipeline(transaction=False) as pipe:
            for tid in tids:
                pipe.get(self._k("thumb", tid))
            rows = pipe.execute() if tids else []
        return {tid: data for tid, data in zip(tids, rows) if data}

    def _require_current(self, gids: list[str]) -> None:
        """Raise unless every id in ``gids`` is a current identity."""
        with self.r.pipeline(transaction=False) as pipe:
            for gid in gids:
                pipe.exists(self._k("identity", gid))
                pipe.get(self._k("merged", gid))
            rows = pipe.execute()
        for i, gid in enumerate(gids):
            if not rows[2 * i]:
                if rows[2 * i + 1] is not None:
                    raise IdentityRetiredError(gid, self.resolve(gid))
                raise IdentityNotFoundError(f"identity {gid!r} is unknown")

    def identity_members(self, gids: list[str]) -> dict[str, list[str]]:
        """Member tracklet ids of each identity of ``gids`` (empty for an unknown one), by start."""
        with self.r.pipeline(transaction=False) as pipe:
            for gid in gids:
                pipe.zrange(self._k("identity", gid, "tracklets"), 0, -1)
            return {gid: [t.decode() for t in tids] for gid, tids in zip(gids, pipe.execute())}

    def _audit_ids(self, operation: str, n: int) -> list[str | None]:
        """Stream ids of the ``n`` newest audit records of ``operation``, oldest first (None where a
        record is not among the newest 1000, e.g. trimmed meanwhile)."""
        found = [eid.decode() for eid, fields in self.r.xrevrange(self._k("audit"), count=1000)
                 if json.loads(fields[b"record"]).get("operation") == operation]
        found.reverse()
        return (found + [None] * n)[:n]

    def _append_constraints(self, made: list[OperatorConstraint]) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            for c in made:
                pipe.rpush(self._k("constraints"), json.dumps(c.to_json()))
            pipe.execute()


# -------------------------------------------------------------------------------------------------
# records and errors of the operator queries
OPERATOR_CHUNK = 1000  # commands per pipelined read of the operator queries
OPERATOR_CANDIDATES = 50_000  # most tracklets a filter reads to count its matches exactly; beyond, it scans

T = TypeVar("T")


_EMBEDDING_CODES = {"float16": "f2", "float32": "f4"}


def encode_embedding(embedding: np.ndarray, code: str = "f2") -> bytes:
    """An embedding's stored bytes: little-endian float16 (``code`` ``f2``) or float32 (``f4``)."""
    return np.asarray(embedding, "<" + code).tobytes()


def decode_embedding(raw: bytes, code: bytes | str | None = None) -> np.ndarray:
    """A stored embedding's bytes as ``float32 [D]``. ``code`` is the tracklet hash's
    ``embedding_dtype`` (``f2`` or ``f4``); None (stores written before it existed) is float32.

    Raises:
        ValueError: An unknown code, or a length that is no whole number of values.
    """
    c = code.decode() if isinstance(code, bytes) else (code or "f4")
    if c not in ("f2", "f4"):
        raise ValueError(f"unknown stored embedding dtype {c!r}")
    if len(raw) % int(c[1]):
        raise ValueError(f"stored embedding of {len(raw)} bytes is not a whole number of {c} values")
    v = np.frombuffer(raw, "<" + c)
    return v if c == "f4" else v.astype(np.float32)


def _check_page(offset: int, limit: int | None) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")


def _scan_page(chunks: Iterable[list[Any]], offset: int, limit: int | None) -> tuple[list[Any], int, bool]:
    """Page ``[offset, offset + limit)`` of the items ``chunks`` yields, reading chunks only until the
    page and one more item are found: ``(page, items counted, whether every chunk was read)``."""
    picked: list[Any] = []
    count = 0
    for items in chunks:
        for item in items:
            if count >= offset and (limit is None or len(picked) < limit):
                picked.append(item)
            count += 1
            if limit is not None and count > offset + limit:
                return picked, count, False
    return picked, count, True


def _next_offset(offset: int, limit: int | None, total: int) -> int | None:
    return offset + limit if limit is not None and offset + limit < total else None


def _rank_window(n: int, offset: int, limit: int | None, descending: bool) -> tuple[int, int]:
    """Inclusive rank range ``(lo, hi)`` of a page over ``n`` ordered members (``lo > hi``: empty)."""
    count = n - offset if limit is None else min(limit, n - offset)
    if count <= 0:
        return 0, -1
    if descending:
        return n - offset - count, n - offset - 1
    return offset, offset + count - 1


def _operator_name(operator: str) -> str:
    name = (operator or "").strip()
    if not name:
        raise ValueError("operator must name who decided (non-empty)")
    return name


class IdentityNotFoundError(LookupError):
    """A global id that names no identity (nor one merged away)."""


class IdentityRetiredError(LookupError):
    """A global id merged away into another identity.

    Attributes:
        global_id: The id asked for.
        into: The current identity it was (transitively) merged into.
    """

    def __init__(self, global_id: str, into: str) -> None:
        super().__init__(f"identity {global_id!r} was merged into {into!r}; use {into!r}")
        self.global_id = global_id
        self.into = into


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    """One page of an ordered query.

    Attributes:
        items: The rows of this page.
        total: Rows matching the query, or None when counting them would need a full scan.
        offset: Rows skipped before this page.
        limit: Page size asked for (None: everything).
        next_offset: ``offset`` of the next page, or None on the last one.
    """

    items: list[T]
    total: int | None
    offset: int
    limit: int | None
    next_offset: int | None


@dataclasses.dataclass(frozen=True)
class SightingRecord:
    """One tracklet as the operator queries show it (times: stream seconds).

    ``score`` is the cosine of the join, None for the tracklet that founded its identity;
    ``has_thumbnail`` says whether ``{ns}:thumb:{tracklet_id}`` holds a JPEG crop.
    """

    tracklet_id: str
    camera: str
    track_id: int
    global_id: str
    score: float | None
    start_s: float
    end_s: float
    has_thumbnail: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class OperatorConstraint:
    """An operator's decision the matcher must honour, one JSON object in ``{ns}:constraints``.

    Attributes:
        kind: ``"must"`` (the tracklets of ``a`` and ``b`` are one person) or ``"cannot"`` (no tracklet
            of ``a`` is the person of any tracklet of ``b``).
        a: Tracklet ids.
        b: Tracklet ids.
        audit_id: Stream id of the audit record of the decision (``{ns}:audit``), None if not found.
        wall_s: Unix seconds of the decision.
        operator: Who decided.
    """

    kind: str
    a: list[str]
    b: list[str]
    audit_id: str | None
    wall_s: float
    operator: str

    def __post_init__(self) -> None:
        if self.kind not in ("must", "cannot"):
            raise ValueError(f"constraint kind must be 'must' or 'cannot', got {self.kind!r}")
        if not self.a or not self.b:
            raise ValueError("a constraint needs tracklets on both sides (a, b)")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "a": list(self.a), "b": list(self.b), "audit_id": self.audit_id,
                "wall_s": self.wall_s, "operator": self.operator}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> OperatorConstraint:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: A field is missing or invalid.
        """
        try:
            return cls(str(obj["kind"]), [str(t) for t in obj["a"]], [str(t) for t in obj["b"]],
                       obj.get("audit_id"), float(obj["wall_s"]), str(obj.get("operator", "")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed constraint {obj!r}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class OperatorChange:
    """What an operator merge or split did.

    Attributes:
        kind: ``"merge"`` or ``"split"``.
        global_id: The surviving identity of a merge; the identity split.
        new_global_id: The identity a split created (None for a merge).
        moved: Tracklet ids that changed identity.
        audit_ids: Stream ids of the audit records written.
        constraints: The constraints appended to ``{ns}:constraints``.
    """

    kind: str
    global_id: str
    new_global_id: str | None
    moved: list[str]
    audit_ids: list[str]
    constraints: list[OperatorConstraint]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "global_id": self.global_id, "new_global_id": self.new_global_id,
                "moved": list(self.moved), "audit_ids": list(self.audit_ids),
                "constraints": [c.to_json() for c in self.constraints]}
