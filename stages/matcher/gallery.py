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
from stages.matcher.association import Rules, TransitModel, cannot_link_any, cannot_link_coded, topology_codes
from stages.matcher.index import IdentityIndex, IndexSettings


Member = Prototype
"""A member tracklet as the gallery takes it (:class:`pipeline.store.Prototype`)."""

_CHUNK = 8  # candidates scored at a time, best first, until no other can win
_SCALAR_MEMBERS = 64  # up to this many members to check, the cannot-link rules run on Python floats


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


class _Identity:
    __slots__ = ("gid", "code", "members", "protos", "last_end")

    def __init__(self, gid: str, code: int) -> None:
        self.gid = gid
        self.code = code
        self.members: np.ndarray = np.zeros((0, 3))  # camera code, start_s, end_s
        self.protos: list[Member] = []
        self.last_end = -np.inf


def _distinct(codes: np.ndarray) -> np.ndarray:
    """The distinct values of a small ``int64`` array, sorted (cheaper than ``np.unique`` on ~100)."""
    if len(codes) < 2:
        return codes
    codes = np.sort(codes)
    return codes[np.concatenate(([True], codes[1:] != codes[:-1]))]


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
        # per identity code, for scoring candidates without a Python loop over them
        self._alive = np.zeros(1024, bool)
        self._last = np.full(1024, -np.inf)
        self._flag = np.zeros(1024, bool)  # scratch, all False between calls (see _flagged)
        self._edges: tuple[tuple, int, list[tuple[int, int, float]], float, dict[int, dict[int, float]]] | None = None

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
        return ident.members.copy() if ident else np.zeros((0, 3))

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
                self._alive = np.concatenate([self._alive, np.zeros(len(self._alive), bool)])
                self._last = np.concatenate([self._last, np.full(len(self._last), -np.inf)])
                self._flag = np.zeros(len(self._alive), bool)
            self._alive[ident.code] = True
        return ident

    def _ensure_index(self, dim: int) -> None:
        if self.index is None or self.index.dim != dim:
            self.index = IdentityIndex(dim, self.settings)
            self.hot = IdentityIndex(dim, IndexSettings(kind="exact")) if self.settings.hot_s is not None else None

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
        ident.members = np.vstack([ident.members, [self._cam(member.camera), member.start_s, member.end_s]])
        ident.last_end = max(ident.last_end, member.end_s)
        self._last[ident.code] = ident.last_end
        before = [p.tracklet_id for p in ident.protos]
        ident.protos = self._select([*ident.protos, member])
        if [p.tracklet_id for p in ident.protos] != before:
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
        codes: list[_Identity] = []
        vecs: np.ndarray | None = None  # the mean prototypes, written in place (10^6 on a restart)
        for gid, members in groups.items():
            if not members:
                self.drop([gid])
                continue
            self._ensure_index(len(members[0].y))
            if vecs is None:
                vecs = np.empty((len(groups), self.index.dim), np.float32)
            ident = self._ident(gid)
            rows = [[self._cam(m.camera), m.start_s, m.end_s] for m in members]
            ident.members = np.asarray(rows, np.float64)
            ident.last_end = float(max(r[2] for r in rows))
            extra = (extra_members or {}).get(gid)
            if extra is not None and len(extra):
                ident.members = np.vstack([ident.members, extra])
                ident.last_end = max(ident.last_end, float(extra[:, 2].max()))
            self._last[ident.code] = ident.last_end
            ident.protos = self._select(members)
            self._mean(ident, out=vecs[len(codes)])
            codes.append(ident)
        if codes:
            self._upsert(codes, vecs[:len(codes)])

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
        c = _distinct(np.asarray(list(codes), np.int64))
        c = c[(c >= 0) & (c < len(self._alive))]
        c = c[self._alive[c]]
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
        w = rules.transit_weight if rules.transit_weight > 0 else 0.0
        k = self.settings.candidates
        if prefetched is None:
            prefetched = self.candidates(z[None, :], k, threshold - w)[0]
        also_codes = np.asarray(list(also), np.int64)
        scores, codes = prefetched.scores, prefetched.codes
        known = None if prefetched.known_codes is None or not len(prefetched.known_codes) else \
            (np.asarray(prefetched.known_codes, np.int64), np.asarray(prefetched.known_scores))
        # whose searched score may be out of date (or read half written by a search on another thread,
        # see IdentityIndex.deferred): changed since the search
        stale = also_codes if known is None else np.concatenate([also_codes, known[0]])
        hot_codes = prefetched.hot_codes
        done = np.zeros(0, np.int64)  # codes scored so far, and their scores
        vals = np.zeros(0)
        best_code, best = None, -np.inf
        first = True
        while True:
            found = codes >= 0
            if first:
                # three sources, each identity once: the searched score where it still holds, the
                # re-scored one of an identity changed after the search, an exact score for the rest
                keep = found & self._alive[np.maximum(codes, 0)]
                if len(stale):
                    keep &= ~self._flagged(np.maximum(codes, 0), stale)
                cand, base = codes[keep], scores[keep].astype(np.float64)
                if known is not None:
                    ok = self._alive[known[0]]
                    if len(also_codes):
                        ok &= ~self._flagged(known[0], also_codes)
                    cand = np.concatenate([cand, known[0][ok]])
                    base = np.concatenate([base, known[1][ok].astype(np.float64)])
                if hot_codes is not None and len(hot_codes):  # the hot tier's, but those found above or changed
                    ok = hot_codes >= 0
                    hc = np.maximum(hot_codes, 0)
                    ok &= self._alive[hc] & ~self._flagged(hc, np.concatenate([cand, stale]))
                    cand = np.concatenate([cand, hot_codes[ok]])
                    base = np.concatenate([base, prefetched.hot_scores[ok].astype(np.float64)])
                exact = _distinct(also_codes[also_codes >= 0])
                exact = exact[self._alive[exact]]
                if len(exact):
                    cand = np.concatenate([cand, exact])
                    base = np.concatenate([base, self.index.scores(exact, z).astype(np.float64)])
                first = False
            else:
                # a search on this thread, now: its scores are exact and current
                keep = found & self._alive[np.maximum(codes, 0)]
                if len(done):
                    keep &= ~self._flagged(np.maximum(codes, 0), done)
                cand, base = codes[keep], scores[keep].astype(np.float64)
            # best first; an identity whose z·m plus the largest bonus stays under the threshold, or under
            # the best score found so far, cannot be chosen, so it is not scored
            able = base + w >= threshold
            cand, base = cand[able], base[able]
            order = np.argsort(-base, kind="stable")
            cand, base = cand[order], base[order]
            for i in range(0, len(cand), _CHUNK):
                if best > base[i] + w:
                    break
                got = self._score(cand[i:i + _CHUNK], base[i:i + _CHUNK], camera, start_s, end_s, rules, transit,
                                  ttl_s)
                done = np.concatenate([done, cand[i:i + _CHUNK]])
                vals = np.concatenate([vals, got])
                top = vals.max()
                best_code, best = int(done[vals == top].min()), float(top)  # ties: the older identity
            exhausted = int(found.sum()) < len(codes) or len(codes) >= len(self.index)
            # an identity left out scores at most the lowest retrieved score of an identity that has not
            # changed since the search; changed ones are all scored
            steady = scores[found & ~self._flagged(np.maximum(codes, 0), stale)] if len(stale) else scores[found]
            bound = float(steady.min()) + w if len(steady) else (np.inf if found.any() else -np.inf)
            if exhausted or best >= bound or (bound < threshold and best < threshold):
                break
            k = len(codes) * 4
            scores, codes = (a[0] for a in self.search(z[None, :], k))
        if best_code is None or not np.isfinite(best) or best < threshold:
            return None, None
        return self._by_code[best_code].gid, best

    def _flagged(self, codes: np.ndarray, among: np.ndarray) -> np.ndarray:
        """``bool [len(codes)]``: which of ``codes`` are in ``among`` (identity codes; a scratch flag
        per code, O(len) instead of ``np.isin``'s sort or hash)."""
        self._flag[among] = True
        out = self._flag[codes]
        self._flag[among] = False
        return out

    def _camera_edges(self, rules: Rules) -> tuple[list[tuple[int, int, float]], float, dict[int, dict[int, float]]]:
        """The topology in this gallery's camera codes, the longest minimum transit among them
        (seconds, at least 0: how long before a tracklet a member can still cannot-link it), and per
        camera code the minimum transits to its neighbours (``{a: {b: min_transit_s}}``, for
        :func:`cannot_link_any`); cached while cameras and topology stay."""
        if self._edges is None or self._edges[0] is not rules.topology or self._edges[1] != len(self.cam_names):
            edges = topology_codes(rules.topology, self.cam_names)
            leaving: dict[int, dict[int, float]] = {}
            for a, b, min_s in edges:  # in order: a pair listed twice keeps its last, as cannot_link_coded does
                leaving.setdefault(a, {})[b] = min_s
            self._edges = (rules.topology, len(self.cam_names), edges, max([0.0, *(m for _, _, m in edges)]), leaving)
        return self._edges[2], self._edges[3], self._edges[4]

    def _score(self, codes: np.ndarray, base: np.ndarray, camera: str, start_s: float, end_s: float, rules: Rules,
               transit: TransitModel, ttl_s: float | None) -> np.ndarray:
        """Exact scores (``float64 [len(codes)]``, ``-inf`` where a rule blocks) of identities ``codes``
        whose ``z·m`` is ``base``."""
        if not len(codes):
            return np.zeros(0)
        here = self._cam(camera)  # first: a camera new to the gallery changes the coded topology
        edges, reach_s, leaving = self._camera_edges(rules)
        # Identities whose members all ended more than the longest minimum transit before this
        # tracklet starts cannot be blocked by them (no overlap, and every gap exceeds every
        # topology minimum), so only the others' members are checked. Without re-entry any member
        # on this camera blocks, whenever it was.
        near = self._last[codes] >= start_s - reach_s if rules.reentry else np.ones(len(codes), bool)
        blocked = np.zeros(len(codes), bool)
        which = np.flatnonzero(near)
        mems = [self._by_code[c].members for c in codes[which].tolist()]
        if sum(len(m) for m in mems) <= _SCALAR_MEMBERS:  # a few: one Python loop, no numpy call per rule
            transit_from = leaving.get(here, {})
            for j, m in zip(which.tolist(), mems):
                blocked[j] = cannot_link_any(here, start_s, end_s, m.tolist(), rules.max_overlap_s, rules.reentry,
                                             transit_from)
        else:
            owner = np.repeat(np.arange(len(mems)), [len(m) for m in mems])
            mem = np.concatenate(mems)
            cannot = cannot_link_coded(np.array([here]), np.array([start_s]), np.array([end_s]),
                                       mem[:, 0].astype(np.int64), mem[:, 1], mem[:, 2], rules.max_overlap_s,
                                       rules.reentry, edges)[0]
            blocked[which] = np.bincount(owner, weights=cannot, minlength=len(mems)) > 0
        if ttl_s is not None:
            blocked |= start_s - self._last[codes] > ttl_s
        if rules.transit_weight > 0:
            idents = [self._by_code[c] for c in codes.tolist()]
            protos = [(j, p) for j, i in enumerate(idents) for p in i.protos if p.camera != camera]
            bonus = np.zeros(len(idents))
            if protos:
                by_cam: dict[str, list[tuple[int, Member]]] = {}
                for j, p in protos:
                    by_cam.setdefault(p.camera, []).append((j, p))
                for other, items in by_cam.items():
                    js = np.array([j for j, _ in items])
                    ps = np.array([p.start_s for _, p in items])
                    pe = np.array([p.end_s for _, p in items])
                    gap = np.where(start_s >= ps, start_s - pe, ps - end_s)
                    np.add.at(bonus, js, rules.transit_weight * transit.support(camera, other, gap))
                base = base + bonus / np.array([len(i.protos) for i in idents])
        return np.where(blocked, -np.inf, base)


__all__ = ["Candidates", "Gallery", "Member"]
