"""The matcher's active identities in memory, and the online decision over them.

An identity of the gallery holds, in the site's scoring space (:class:`~stages.matcher.association.
ScoringSpace`):

* its **prototypes**: per camera, the ``prototypes_per_camera`` longest-observed member tracklets
  (ties: the earlier arrival), each with camera, time span, and its projected embedding ``y``
  (``float32 [K]``, *not* normalised, so that a change of scoring space can be applied to it, see
  :meth:`Gallery.reexpress`);
* its **members**' camera and time span (the cannot-link evidence);
* its **mean prototype** ``m = mean_j y_j / |y_j|``, kept in an :class:`~stages.matcher.index.
  IdentityIndex`.

The score of a tracklet ``x`` (unit vector ``z``) against an identity is the mean over prototypes of
``z·z_j`` plus the hand-off bonus of each prototype — exactly ``z·m + mean_j bonus_j``. The index
finds the identities of highest ``z·m``; :meth:`Gallery.best` then applies the association rules
exactly to them (cannot-links, gallery TTL, hand-off bonus) and widens the search until no identity
left out could beat the best one found: since a bonus adds at most ``transit_weight``, an identity
outside the ``k`` retrieved scores at most ``k-th z·m + transit_weight``. With exact search (a
gallery below :attr:`IndexSettings.exact_below`) the decision is therefore the same as scoring every
identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.store import Prototype
from stages.matcher.association import Rules, TransitModel, topology_codes
from stages.matcher.index import IdentityIndex, IndexSettings


Member = Prototype
"""A member tracklet as the gallery takes it (:class:`pipeline.store.Prototype`)."""

_NO_CODES = np.zeros(0, np.int64)
_NO_SCORES = np.zeros(0, np.float32)
_NO_SUPPORT = (np.zeros((0, 3), np.int64), np.zeros((0, 2)), np.zeros(0), np.zeros(0))  # no hand-off bonus


def _kernels():
    """:mod:`stages.matcher.kernels`, imported on first use (numba compiles or loads them then)."""
    from stages.matcher import kernels

    return kernels


@dataclasses.dataclass(frozen=True, slots=True)
class Candidates:
    """A tracklet's candidates, searched beforehand (the online path searches a sub-batch at once).

    Every score is an exact ``z·m`` (``float32``) at the time it was computed; identities changed since
    are the caller's to name (``also`` of :meth:`Gallery.best`).

    Attributes:
        scores: The index's best identities' scores, ``float32 [k]``, best first (``-inf`` padding),
            as :meth:`Gallery.search` gives them.
        codes: Their identity codes, ``int64 [k]`` (``-1`` padding).
        hot_scores: The hot tier's best (:meth:`Gallery.search_hot`), ``float32 [h]``; None: none searched.
        hot_codes: Their codes, ``int64 [h]`` (``-1`` padding).
        known_codes: Identities changed after that search, ``int64 [n]``, each once ...
        known_scores: ... with their ``z·m`` re-scored exactly since, ``float32 [n]``.
    """

    scores: np.ndarray
    codes: np.ndarray
    hot_scores: np.ndarray | None = None
    hot_codes: np.ndarray | None = None
    known_codes: np.ndarray | None = None
    known_scores: np.ndarray | None = None


class _Arena:
    """Rows of ``(camera code, start_s, end_s)`` (stream seconds) per identity code, all in one
    ``float64 [rows, 3]`` array, for the compiled decision steps (:mod:`stages.matcher.kernels`):
    identity ``c``'s rows are ``mem[head[c]:head[c] + count[c]]``, in a block of ``cap[c]`` rows;
    rows past ``used`` are free. A block that outgrows itself moves to the end with twice the room;
    once the array is full, the live blocks are packed into a new one twice their size (blocks of
    dropped or moved identities are freed then)."""

    def __init__(self, codes: int = 1024) -> None:
        self.mem = np.zeros((1024, 3))
        self.used = 0
        self.head = np.zeros(codes, np.int64)
        self.count = np.zeros(codes, np.int64)
        self.cap = np.zeros(codes, np.int64)

    def grow(self, codes: int) -> None:
        """Room for identity codes below ``codes``."""
        more = codes - len(self.head)
        if more > 0:
            self.head, self.count, self.cap = (np.concatenate([a, np.zeros(more, np.int64)])
                                               for a in (self.head, self.count, self.cap))

    def rows(self, code: int) -> np.ndarray:
        """Identity ``code``'s rows, a view ``float64 [n, 3]``."""
        h = int(self.head[code])
        return self.mem[h:h + int(self.count[code])]

    def _room(self, rows: int, alive: np.ndarray) -> None:
        if self.used + rows <= len(self.mem):
            return
        live = int(self.count[alive].sum())
        mem = np.zeros((max(1024, 2 * (live + rows)), 3))
        self.used = _kernels().pack(self.mem, self.head, self.count, self.cap, alive, mem)
        self.mem = mem

    def set(self, codes: np.ndarray, sizes: np.ndarray, rows: np.ndarray, alive: np.ndarray) -> None:
        """Identities ``codes`` (``int64 [n]``, distinct, alive) get exactly ``rows`` (``float64
        [sizes.sum(), 3]``, ``sizes[i]`` of them for ``codes[i]``, identity after identity)."""
        k = _kernels()
        self._room(int(sizes.sum()), alive)
        self.used = k.place(self.head, self.count, self.cap, codes, sizes, self.used)
        k.scatter(self.mem, self.head, codes, sizes, rows)

    def add(self, code: int, camera: int, start_s: float, end_s: float, alive: np.ndarray) -> None:
        """One more row for identity ``code`` (alive)."""
        k = _kernels()
        used = k.append(self.mem, self.head, self.count, self.cap, code, camera, start_s, end_s, self.used)
        if used < 0:  # no room to move its block: make some (this may move every block), and retry
            self._room(2 * int(self.count[code]) + 2, alive)
            used = k.append(self.mem, self.head, self.count, self.cap, code, camera, start_s, end_s, self.used)
        self.used = used

    def clear(self, code: int) -> None:
        self.count[code] = 0  # its block is freed when the array is next packed


class _Identity:
    __slots__ = ("gid", "code", "protos", "last_end")  # members' and prototypes' spans: the gallery's arenas

    def __init__(self, gid: str, code: int) -> None:
        self.gid = gid
        self.code = code
        self.protos: list[Member] = []
        self.last_end = -np.inf


def _mean_of_units(ys: Sequence[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """``mean_j y_j / |y_j|`` of prototype vectors (``float32 [K]`` each, a zero one counts as zero):
    ``float32 [K]``, written into ``out`` (``float32 [K]``) when given (a bulk load fills one array
    and allocates nothing per identity). The one definition of a mean prototype, whichever path
    computes it."""
    if len(ys) == 1:
        y = np.asarray(ys[0], np.float32)
        n = math.sqrt(float(np.dot(y, y)))
        if n > 1e-12:
            return np.divide(y, np.float32(n), out=out)
        if out is None:
            return np.zeros_like(y)
        out[:] = 0
        return out
    y = np.asarray(np.stack(ys), np.float32)
    n = np.sqrt(np.einsum("ij,ij->i", y, y))
    inv = np.divide(np.float32(1.0), n, out=np.zeros_like(n), where=n > 1e-12)
    # one weighted sum: 16 µs for 8 prototypes, 29 µs one by one
    return np.divide(np.matmul(inv, y, out=out), np.float32(len(ys)), out=out)


class Gallery:
    """Active identities with their prototypes, members and an index over their mean prototypes.

    Args:
        prototypes_per_camera: Prototypes kept per identity and camera.
        settings: Index settings (exact below a size, faiss IVF above).
    """

    def __init__(self, prototypes_per_camera: int = 8, settings: IndexSettings | None = None) -> None:
        if prototypes_per_camera < 1:
            raise ValueError(f"prototypes_per_camera must be >= 1, got {prototypes_per_camera}")
        self.per_camera = prototypes_per_camera
        self.settings = settings or IndexSettings()
        self.index: IdentityIndex | None = None
        self.hot: IdentityIndex | None = None  # exact, the recently seen identities (see IndexSettings.hot_s)
        self.newest_end = -np.inf
        self._by_gid: dict[str, _Identity] = {}
        self._by_code: list[_Identity | None] = []  # by identity code (codes are dense, never reused)
        self._next_code = 0
        self._cams: dict[str, int] = {}
        self.cam_names: list[str] = []
        # per identity code, for scoring candidates without a Python loop over them (stages.matcher.kernels)
        self._alive = np.zeros(1024, bool)
        self._last = np.full(1024, -np.inf)
        self._flag = np.zeros(1024, bool)  # scratch, all False between calls
        self._members = _Arena()  # every member's camera and span (the cannot-link evidence)
        self._spans = _Arena()  # the prototypes' camera and span, in ident.protos' order (hand-off bonus)
        self._edges: tuple | None = None
        self._support: tuple | None = None  # the transit model in the kernels' form (_support_from)

    def __len__(self) -> int:
        return len(self._by_gid)

    def __contains__(self, gid: str) -> bool:
        return gid in self._by_gid

    @property
    def dim(self) -> int | None:
        return None if self.index is None else self.index.dim

    def gids(self) -> list[str]:
        return list(self._by_gid)

    def prototypes(self, gid: str) -> list[Member]:
        """The prototypes of ``gid`` (empty when unknown)."""
        ident = self._by_gid.get(gid)
        return list(ident.protos) if ident else []

    def members(self, gid: str) -> np.ndarray:
        """``float64 [n, 3]``: camera code (see :attr:`cam_names`), start_s, end_s of each member."""
        ident = self._by_gid.get(gid)
        return self._members.rows(ident.code).copy() if ident else np.zeros((0, 3))

    def last_seen(self, gid: str) -> float:
        ident = self._by_gid.get(gid)
        return ident.last_end if ident else -np.inf

    def _cam(self, name: str) -> int:
        code = self._cams.get(name)
        if code is None:
            code = self._cams[name] = len(self.cam_names)
            self.cam_names.append(name)
        return code

    def _ident(self, gid: str) -> _Identity:
        ident = self._by_gid.get(gid)
        if ident is None:
            ident = _Identity(gid, self._next_code)
            self._next_code += 1
            self._by_gid[gid] = ident
            self._by_code.append(ident)
            if ident.code >= len(self._alive):
                n = len(self._alive)
                self._alive = np.concatenate([self._alive, np.zeros(n, bool)])
                self._last = np.concatenate([self._last, np.full(n, -np.inf)])
                self._flag = np.zeros(2 * n, bool)
                self._members.grow(2 * n)
                self._spans.grow(2 * n)
            self._alive[ident.code] = True
        return ident

    def _set_spans(self, idents: list[_Identity]) -> None:
        """The prototypes' spans of ``idents`` into their arena (after their ``protos`` changed)."""
        rows = [(self._cams[p.camera], p.start_s, p.end_s) for i in idents for p in i.protos]
        self._spans.set(np.array([i.code for i in idents], np.int64), np.array([len(i.protos) for i in idents], np.int64),
                        np.array(rows, np.float64).reshape(-1, 3), self._alive)

    def _ensure_index(self, dim: int) -> None:
        if self.index is None or self.index.dim != dim:
            self.index = IdentityIndex(dim, self.settings)
            # the hot tier makes up for what the IVF misses; a device copy (kind gpu) misses nothing
            hot = self.settings.hot_s is not None and self.settings.kind != "gpu"
            self.hot = IdentityIndex(dim, IndexSettings(kind="exact")) if hot else None

    def _upsert(self, idents: list[_Identity], vecs: np.ndarray) -> None:
        """Index ``idents``' mean prototypes (and keep the hot tier to the recently seen ones)."""
        self.index.upsert([i.code for i in idents], vecs)
        if self.hot is None:
            return
        self.newest_end = max([self.newest_end, *(i.last_end for i in idents)])
        horizon = self.newest_end - self.settings.hot_s
        recent = [j for j, i in enumerate(idents) if i.last_end >= horizon]
        old = [i.code for i in idents if i.last_end < horizon]
        if recent:
            self.hot.upsert([idents[j].code for j in recent], vecs[recent])
            self._trim_hot()
        if old:
            self.hot.remove(old)

    def _trim_hot(self) -> None:
        """Keep the hot tier to the ``hot_max`` most recently seen identities: once it holds more,
        the least recently seen go, down to 7/8 of ``hot_max`` (so one pass per ``hot_max / 8``
        arrivals)."""
        cap = self.settings.hot_max
        if len(self.hot) <= cap:
            return
        keys = self.hot.keys()
        keep = cap - cap // 8
        self.hot.remove(keys[np.argpartition(-self._last[keys], keep - 1)[keep:]] if keep else keys)
        if self.hot.rows_used > cap + cap // 4:  # rows freed by a bulk load: a search scans every row, so pack them
            packed = IdentityIndex(self.hot.dim, self.hot.settings)
            kept = self.hot.keys()
            packed.upsert(kept, self.hot.vectors(kept))
            self.hot = packed  # a search running on another thread keeps the one it read

    def cool(self) -> int:
        """Move identities no longer recent out of the hot tier; returns how many."""
        if self.hot is None or not len(self.hot):
            return 0
        keys = self.hot.keys()
        return self.hot.remove(keys[self._last[keys] < self.newest_end - self.settings.hot_s])

    def _mean(self, ident: _Identity, out: np.ndarray | None = None) -> np.ndarray:
        return _mean_of_units([p.y for p in ident.protos], out)

    def _select(self, members: list[Member]) -> list[Member]:
        """Per camera, the ``per_camera`` of highest quality (earlier arrival first on ties)."""
        if len(members) == 1:  # most identities of a restored gallery
            return list(members)
        by_cam: dict[str, list[Member]] = {}
        for m in members:
            by_cam.setdefault(m.camera, []).append(m)
        out = []
        for cam in sorted(by_cam):
            out.extend(sorted(by_cam[cam], key=lambda m: (-m.quality, m.arrival))[:self.per_camera])
        return out

    # ---------------------------------------------------------------------------------------------
    def add(self, gid: str, member: Member) -> bool:
        """Add a member tracklet to ``gid`` (created when new); its prototypes and mean follow.
        Returns whether its prototypes changed."""
        self._ensure_index(len(member.y))
        ident = self._ident(gid)
        self._members.add(ident.code, self._cam(member.camera), member.start_s, member.end_s, self._alive)
        ident.last_end = max(ident.last_end, member.end_s)
        self._last[ident.code] = ident.last_end
        before = [p.tracklet_id for p in ident.protos]
        ident.protos = self._select([*ident.protos, member])
        if [p.tracklet_id for p in ident.protos] != before:
            self._set_spans([ident])
            self._upsert([ident], self._mean(ident)[None, :])
            return True
        if self.hot is not None and ident.code not in self.hot:
            self.newest_end = max(self.newest_end, ident.last_end)
            if ident.last_end >= self.newest_end - self.settings.hot_s:
                self.hot.upsert([ident.code], self._mean(ident)[None, :])
                self._trim_hot()
        return False

    def replace(self, groups: dict[str, list[Member]], extra_members: dict[str, np.ndarray] | None = None) -> None:
        """Rebuild identities from their members (a re-association or a reload): each ``gid`` of
        ``groups`` gets exactly those members (an empty list removes it). ``extra_members`` adds
        cannot-link evidence (``[n, 3]`` rows as :meth:`members` gives, camera codes of this gallery)
        that carries no prototype.

        Raises:
            ValueError: The groups' prototypes are of more than one dimension (nothing is changed).
        """
        dims = {len(members[0].y) for members in groups.values() if members}
        if len(dims) > 1:
            raise ValueError(f"identities of one replace() have prototypes of {sorted(dims)} dimensions")
        idents: list[_Identity] = []
        sizes: list[int] = []
        rows: list[list[float]] = []  # every identity's members, one after the other
        vecs: np.ndarray | None = None  # the mean prototypes, written in place (10^6 on a restart)
        for gid, members in groups.items():
            if not members:
                self.drop([gid])
                continue
            self._ensure_index(len(members[0].y))
            if vecs is None:
                vecs = np.empty((len(groups), self.index.dim), np.float32)
            ident = self._ident(gid)
            mine = [[self._cam(m.camera), m.start_s, m.end_s] for m in members]
            ident.last_end = float(max(r[2] for r in mine))
            extra = (extra_members or {}).get(gid)
            if extra is not None and len(extra):
                mine.extend(np.asarray(extra, np.float64).tolist())
                ident.last_end = max(ident.last_end, float(extra[:, 2].max()))
            rows.extend(mine)
            sizes.append(len(mine))
            self._last[ident.code] = ident.last_end
            ident.protos = self._select(members)
            self._mean(ident, out=vecs[len(idents)])
            idents.append(ident)
        if idents:
            self._members.set(np.array([i.code for i in idents], np.int64), np.array(sizes, np.int64),
                              np.array(rows, np.float64).reshape(-1, 3), self._alive)
            self._set_spans(idents)
            self._upsert(idents, vecs[:len(idents)])

    def bulk(self, dim: int) -> contextlib.AbstractContextManager:
        """Context for loading many identities (:meth:`IdentityIndex.bulk`) of dimension ``dim``."""
        self._ensure_index(dim)
        return self.index.bulk()

    def drop(self, gids: Iterable[str]) -> list[str]:
        """Remove identities (merged away, purged, archived); returns those that were present."""
        gone = []
        for gid in gids:
            ident = self._by_gid.pop(gid, None)
            if ident is not None:
                self._by_code[ident.code] = None
                self._alive[ident.code] = False
                self._members.clear(ident.code)
                self._spans.clear(ident.code)
                gone.append(gid)
                if self.index is not None:
                    self.index.remove([ident.code])
                if self.hot is not None:
                    self.hot.remove([ident.code])
        return gone

    def evict(self, before_end_s: float) -> list[str]:
        """Archive (drop from memory) identities last seen before ``before_end_s`` (stream seconds);
        returns their ids. They stay in Redis."""
        return self.drop([g for g, i in self._by_gid.items() if i.last_end < before_end_s])

    def reexpress(self, a: np.ndarray | None, c: np.ndarray, skip: set[str] = frozenset()) -> int:
        """Map every prototype (except those of identities in ``skip``) into a new scoring space:
        ``y ← y @ a + c`` (``a`` ``float32 [K_old, K_new]``, None for the identity; ``c`` ``float32
        [K_new]``), and refresh the means; returns the identities changed."""
        idents = [i for g, i in self._by_gid.items() if g not in skip]
        if not idents:
            return 0
        dim = len(c)
        if self.index is None or self.index.dim != dim:
            kept = [i for g, i in self._by_gid.items() if g in skip]
            self.index = None
            self._ensure_index(dim)
            if kept:
                self._upsert(kept, np.stack([self._mean(i) for i in kept]))
        vecs = []
        for ident in idents:
            ys = np.stack([p.y for p in ident.protos]).astype(np.float32)
            ys = (ys if a is None else ys @ a) + c
            ident.protos = [dataclasses.replace(p, y=y) for p, y in zip(ident.protos, ys)]
            vecs.append(_mean_of_units(ys))
        for start in range(0, len(idents), 65536):
            self._upsert(idents[start:start + 65536], np.stack(vecs[start:start + 65536]))
        return len(idents)

    # ---------------------------------------------------------------------------------------------
    def search(self, z: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Index candidates for unit query vectors ``float32 [B, K]``: ``(scores [B, k], codes [B, k])``."""
        k = k or self.settings.candidates
        if self.index is None:
            b = np.atleast_2d(z).shape[0]
            return np.full((b, k), -np.inf, np.float32), np.full((b, k), -1, np.int64)
        return self.index.search(z, k)

    def search_hot(self, z: np.ndarray, k: int | None = None,
                   floor: float = -np.inf) -> tuple[np.ndarray, np.ndarray] | None:
        """The hot tier's best identities for unit queries ``float32 [B, K]``, exact: ``(scores [B, h],
        codes [B, h])`` with ``h = min(k, hot identities)``, only those of ``z·m >= floor`` (the rest
        ``-inf`` / ``-1``); None while it is not searched (the index is exact, or no identity is hot).
        One matrix product for the whole batch."""
        if self.hot is None or self.index is None or not self.index.approximate or not len(self.hot):
            return None
        return self.hot.search_above(z, min(k or self.settings.candidates, len(self.hot)), floor)

    def candidates(self, z: np.ndarray, k: int | None = None, floor: float = -np.inf) -> list[Candidates]:
        """:meth:`search` and :meth:`search_hot` (down to ``floor``: a hot identity scoring less
        cannot be chosen) of unit queries ``float32 [B, K]``: one :class:`Candidates` per query."""
        scores, codes = self.search(z, k)
        hot = self.search_hot(z, k, floor)
        if hot is None:
            return [Candidates(s, c) for s, c in zip(scores, codes)]
        return [Candidates(s, c, hs, hc) for s, c, hs, hc in zip(scores, codes, hot[0], hot[1])]

    def rescore(self, z: np.ndarray, codes: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Exact ``z·m`` of unit queries ``float32 [B, K]`` against the present identities among
        ``codes``: ``(codes int64 [n], scores float32 [B, n])``, each code once."""
        c = _kernels().distinct_alive(np.asarray(list(codes), np.int64), self._alive)
        if self.index is None or not len(c):
            return c[:0], np.zeros((len(z), 0), np.float32)
        return c, self.index.scores_many(c, z)

    def code(self, gid: str) -> int | None:
        ident = self._by_gid.get(gid)
        return None if ident is None else ident.code

    def best(self, z: np.ndarray, camera: str, start_s: float, end_s: float, threshold: float, rules: Rules,
             transit: TransitModel, ttl_s: float | None = None,
             prefetched: Candidates | None = None,
             also: Sequence[int] = ()) -> tuple[str | None, float | None]:
        """The identity a tracklet joins under the association rules, or ``(None, None)`` to found one.

        Args:
            z: The tracklet's unit scoring-space vector, ``float32 [K]``.
            camera: Its camera; start_s, end_s: its span, stream seconds.
            threshold: Score needed to join.
            rules: Cannot-link and hand-off rules.
            transit: Hand-off gap statistics.
            ttl_s: Identities unseen for longer (before ``start_s``) are no candidates.
            prefetched: Candidates found beforehand (a batch search, :meth:`candidates`); None: searched now.
            also: Identity codes to score now whatever the index says (identities changed since
                ``prefetched`` was searched, or since its ``known_scores`` were scored).

        Returns:
            ``(global_id, score)``.
        """
        if not self._by_gid or self.index is None or len(z) != self.index.dim:
            return None, None
        kern = _kernels()
        w = rules.transit_weight if rules.transit_weight > 0 else 0.0
        if prefetched is None:
            prefetched = self.candidates(z[None, :], self.settings.candidates, threshold - w)[0]
        also_codes = np.asarray(also, np.int64)
        scores = np.asarray(prefetched.scores, np.float32)
        codes = np.asarray(prefetched.codes, np.int64)
        known_codes, known_scores = _NO_CODES, _NO_SCORES
        if prefetched.known_codes is not None and len(prefetched.known_codes):
            known_codes = np.asarray(prefetched.known_codes, np.int64)
            known_scores = np.asarray(prefetched.known_scores, np.float32)
        # whose searched score may be out of date (or read half written by a search on another thread,
        # see IdentityIndex.deferred): changed since the search
        stale = np.concatenate([also_codes, known_codes]) if len(known_codes) else also_codes
        hot_codes, hot_scores = _NO_CODES, _NO_SCORES
        if prefetched.hot_codes is not None and len(prefetched.hot_codes):
            hot_codes = np.asarray(prefetched.hot_codes, np.int64)
            hot_scores = np.asarray(prefetched.hot_scores, np.float32)
        exact = kern.distinct_alive(also_codes, self._alive)  # scored now: changed since the search
        exact_scores = np.asarray(self.index.scores(exact, z), np.float32) if len(exact) else _NO_SCORES
        here = self._cam(camera)  # first: a camera new to the gallery changes the coded topology
        min_transit, reach_s = self._transit_from(rules, here)
        ttl = math.nan if ttl_s is None else float(ttl_s)
        support = self._support_from(transit, here) if w > 0 else _NO_SUPPORT
        members, spans = self._members, self._spans
        done = _NO_CODES  # codes scored so far
        best_code, best = -1, -math.inf
        first = True
        while True:
            # first pass, three sources, each identity once: the searched score where it still holds,
            # the re-scored one of an identity changed after the search, an exact score for the rest;
            # later passes: a search on this thread, now, whose scores are exact and current. Best
            # first, and only those whose z·m plus the largest bonus reaches the threshold.
            cand, base = kern.gather(codes, scores, stale if first else done, known_codes, known_scores, also_codes,
                                     hot_codes, hot_scores, exact, exact_scores, self._alive, self._flag, first,
                                     w, float(threshold))
            first = False
            # scored one by one, compiled, until no bonus can lift the next one above the best
            best_code, best, n = kern.choose(cand, base, best_code, best, here, float(start_s), float(end_s),
                                             float(rules.max_overlap_s), bool(rules.reentry), min_transit, reach_s,
                                             ttl, self._last, members.mem, members.head, members.count, w, *support,
                                             spans.mem, spans.head, spans.count)
            done = np.concatenate([done, cand[:n]])
            found, floor = kern.steady_floor(codes, scores, stale, self._flag)
            exhausted = found < len(codes) or len(codes) >= len(self.index)
            # an identity left out scores at most the lowest retrieved score of an identity that has not
            # changed since the search; changed ones are all scored
            bound = floor + w
            if exhausted or best >= bound or (bound < threshold and best < threshold):
                break
            scores, codes = (a[0] for a in self.search(z[None, :], len(codes) * 4))
            scores, codes = np.asarray(scores, np.float32), np.asarray(codes, np.int64)
        if best_code < 0 or not math.isfinite(best) or best < threshold:
            return None, None
        return self._by_code[best_code].gid, float(best)

    def _transit_from(self, rules: Rules, here: int) -> tuple[np.ndarray, float]:
        """The topology as the kernels read it for a tracklet of camera code ``here``: per camera code
        the minimum transit of the edge from ``here`` to it (``float64 [cameras]``, seconds, NaN where
        there is none; a pair listed twice keeps its last, as ``cannot_link_coded`` does), and the
        longest minimum transit of any edge (seconds, at least 0: how long before a tracklet a member
        can still cannot-link it). Cached while cameras and topology stay."""
        if self._edges is None or self._edges[0] is not rules.topology or self._edges[1] != len(self.cam_names):
            edges = topology_codes(rules.topology, self.cam_names)
            self._edges = (rules.topology, len(self.cam_names), edges, max([0.0, *(m for _, _, m in edges)]), {})
        _, n, edges, reach_s, tables = self._edges
        table = tables.get(here)
        if table is None:
            table = tables[here] = np.full(n, np.nan)
            for a, b, min_s in edges:
                if a == here:
                    table[b] = min_s
        return table, reach_s

    def _support_from(self, transit: TransitModel, here: int) -> tuple:
        """:meth:`TransitModel.support` from camera code ``here`` to every camera of the gallery,
        in the form :func:`stages.matcher.kernels.bonus` reads: ``(kind int64 [cameras, 3], box float64
        [cameras, 2], xs float64 [n], ys float64 [n])``. Cached while the model and cameras stay."""
        if self._support is None or self._support[0] is not transit or self._support[1] != len(self.cam_names):
            self._support = (transit, len(self.cam_names), {})
        tables = self._support[2]
        if here not in tables:
            n, camera = len(self.cam_names), self.cam_names[here]
            kind, box = np.zeros((n, 3), np.int64), np.zeros((n, 2))
            xs, ys = [], []
            offset = 0
            for c, other in enumerate(self.cam_names):
                if c == here:
                    continue
                how = transit.pair(camera, other)
                if how is None:
                    continue
                if how[0] == "edge":
                    kind[c, 0], box[c] = 1, how[1:]
                else:
                    kind[c] = (2, offset, len(how[1]))
                    xs.append(how[1])
                    ys.append(how[2])
                    offset += len(how[1])
            tables[here] = (kind, box, np.concatenate(xs) if xs else np.zeros(0), np.concatenate(ys) if ys else np.zeros(0))
        return tables[here]


__all__ = ["Candidates", "Gallery", "Member"]
