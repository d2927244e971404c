"""Compiled steps of the online decision (:meth:`stages.matcher.gallery.Gallery.best`), over the
gallery's array state instead of its Python objects.

A decision merges a tracklet's candidates from up to four sources, orders them, and applies the
cannot-link rules and the gallery TTL to the best of them until no other can win. On Python objects
and small numpy arrays each of those steps costs a few microseconds of interpreter overhead, dozens
of them per decision (about a third of a record's CPU at 10⁶ identities). The functions here do the
same work in one compiled call each (numba, ``nogil``: a search thread runs meanwhile).

The rules are those of :func:`stages.matcher.association.cannot_link_coded` (the array form every
other path uses), one tracklet against one identity's members; ``tests/unit/matcher/test_kernels.py``
checks them against it on random members, topology and re-entry, and the decision against the
gallery's brute-force path.

State they read (all owned by :class:`~stages.matcher.gallery.Gallery`):

* ``alive``: ``bool [codes]``, whether an identity code is in the gallery;
* ``last``: ``float64 [codes]``, each identity's last sighting's end, stream seconds;
* the member arena: ``mem`` ``float64 [rows, 3]`` (camera code, start_s, end_s; stream seconds),
  with ``head`` and ``count`` (``int64 [codes]``): identity ``c``'s members are
  ``mem[head[c]:head[c] + count[c]]``.

With ``NUMBA_DISABLE_JIT=1`` (numba's own switch) they run as the plain Python they are written in.
"""

from __future__ import annotations

import logging

import numpy as np
from numba import njit as _njit

log = logging.getLogger(__name__)


def njit(*, cache: bool, nogil: bool):
    """numba's ``njit``, cached on disk where numba finds a writable cache directory (next to this
    file, else ``NUMBA_CACHE_DIR`` or the user's cache); compiled anew in each process where none is."""
    def wrap(fn):
        try:
            return _njit(cache=cache, nogil=nogil)(fn)
        except RuntimeError as exc:  # numba: "cannot cache function ...: no locator available"
            log.warning("matcher kernels: %s; compiling %s in every process (set NUMBA_CACHE_DIR)", exc,
                        fn.__name__)
            return _njit(nogil=nogil)(fn)
    return wrap


@njit(cache=True, nogil=True)
def distinct_alive(codes: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """The distinct non-negative codes of ``codes`` (``int64 [n]``) that are alive, ascending:
    ``int64 [m]``."""
    c = np.sort(codes[codes >= 0])
    out = np.empty(len(c), np.int64)
    m = 0
    for i in range(len(c)):
        if (i == 0 or c[i] != c[i - 1]) and c[i] < len(alive) and alive[c[i]]:
            out[m] = c[i]
            m += 1
    return out[:m]


@njit(cache=True, nogil=True)
def _mark(flag: np.ndarray, codes: np.ndarray, value: bool) -> None:
    for c in codes:
        if c >= 0:
            flag[c] = value


@njit(cache=True, nogil=True)
def _take(codes: np.ndarray, scores: np.ndarray, alive: np.ndarray, flag: np.ndarray, cand: np.ndarray,
          base: np.ndarray, m: int) -> int:
    """Append to ``cand``/``base`` (filled up to ``m``) the alive, unflagged ``codes`` (``-1``:
    padding) with their ``scores``; returns the new fill."""
    for i in range(len(codes)):
        c = codes[i]
        if c >= 0 and alive[c] and not flag[c]:
            cand[m] = c
            base[m] = scores[i]
            m += 1
    return m


@njit(cache=True, nogil=True)
def gather(codes: np.ndarray, scores: np.ndarray, stale: np.ndarray, known_codes: np.ndarray,
           known_scores: np.ndarray, also: np.ndarray, hot_codes: np.ndarray, hot_scores: np.ndarray,
           exact_codes: np.ndarray, exact_scores: np.ndarray, alive: np.ndarray, flag: np.ndarray,
           first: bool, bonus: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """A decision's candidates, each identity once, best first: ``(codes int64 [n], z·m float64 [n])``,
    only those with ``z·m + bonus >= threshold`` (``bonus``: the largest hand-off bonus), ties in
    source order.

    On the first pass the sources are, in order: the index's ``codes``/``scores`` (``int64``/``float32
    [k]``, ``-1`` padding) but those in ``stale`` (changed since the search); ``known_codes`` with
    their re-scored ``known_scores`` but those in ``also``; the hot tier's ``hot_codes``/``hot_scores``
    but those already taken or stale; ``exact_codes`` (the alive, distinct ``also``) with their exact
    ``exact_scores``. Later passes (a wider search on this thread, all exact) take ``codes`` but those
    in ``stale`` (the identities already scored). Dead codes are dropped everywhere.

    ``flag`` (``bool [codes]``, all False) is scratch, all False again on return.
    """
    n = len(codes) + (len(known_codes) + len(hot_codes) + len(exact_codes) if first else 0)
    cand = np.empty(n, np.int64)
    base = np.empty(n, np.float64)
    _mark(flag, stale, True)
    m = _take(codes, scores, alive, flag, cand, base, 0)
    _mark(flag, stale, False)
    if first:
        _mark(flag, also, True)
        m = _take(known_codes, known_scores, alive, flag, cand, base, m)
        _mark(flag, also, False)
        if len(hot_codes):
            taken = cand[:m].copy()
            _mark(flag, taken, True)
            _mark(flag, stale, True)
            m = _take(hot_codes, hot_scores, alive, flag, cand, base, m)
            _mark(flag, taken, False)
            _mark(flag, stale, False)
        for i in range(len(exact_codes)):
            cand[m] = exact_codes[i]
            base[m] = exact_scores[i]
            m += 1
    keep = base[:m] + bonus >= threshold
    cand, base = cand[:m][keep], base[:m][keep]
    order = np.argsort(-base, kind="mergesort")
    return cand[order], base[order]


@njit(cache=True, nogil=True)
def blocked(codes: np.ndarray, camera: int, start_s: float, end_s: float, max_overlap_s: float, reentry: bool,
            min_transit: np.ndarray, reach_s: float, ttl_s: float, last: np.ndarray, mem: np.ndarray,
            head: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Whether a rule keeps a tracklet (camera code ``camera``, ``[start_s, end_s]`` stream seconds)
    from each identity of ``codes`` (``int64 [n]``): ``bool [n]``.

    A member blocks (:func:`~stages.matcher.association.cannot_link_coded`) when a topology edge from
    ``camera`` to its camera (``min_transit[cam]``, seconds, NaN where there is none) says the gap is
    shorter than that pair's minimum transit; otherwise, on the same camera, when they overlap at all
    or re-entry is off; on another camera, when they overlap by more than ``max_overlap_s``.
    With re-entry, an identity last seen before ``start_s - reach_s`` (``reach_s``: the longest
    minimum transit, at least 0) has no member that can block, so it is not read. The gallery TTL
    (``ttl_s`` seconds, NaN: none) blocks an identity last seen longer before ``start_s``.
    """
    out = np.zeros(len(codes), np.bool_)
    for j in range(len(codes)):
        out[j] = _blocks(codes[j], camera, start_s, end_s, max_overlap_s, reentry, min_transit, reach_s, ttl_s, last,
                         mem, head, count)
    return out


@njit(cache=True, nogil=True)
def _blocks(c: int, camera: int, start_s: float, end_s: float, max_overlap_s: float, reentry: bool,
            min_transit: np.ndarray, reach_s: float, ttl_s: float, last: np.ndarray, mem: np.ndarray,
            head: np.ndarray, count: np.ndarray) -> bool:
    """:func:`blocked` for one identity code ``c``."""
    if ttl_s == ttl_s and start_s - last[c] > ttl_s:
        return True
    if reentry and last[c] < start_s - reach_s:
        return False
    for r in range(head[c], head[c] + count[c]):
        cam, s, e = mem[r, 0], mem[r, 1], mem[r, 2]
        ov = min(end_s, e) - max(start_s, s)
        if ov < 0.0:
            ov = 0.0
        k = int(cam)
        min_s = min_transit[k] if k < len(min_transit) else np.nan
        if min_s == min_s:
            hit = (start_s - e if start_s >= s else s - end_s) < min_s
        elif k == camera:
            hit = ov > 0.0 or not reentry
        else:
            hit = ov > max_overlap_s
        if hit:
            return True
    return False


@njit(cache=True, nogil=True)
def _interp(x: float, xs: np.ndarray, ys: np.ndarray, o: int, n: int) -> float:
    """``np.interp(x, xs[o:o+n], ys[o:o+n])`` for ``x`` within ``[xs[o], xs[o+n-1]]``, computed as
    numpy computes it (the same binary search, exact-hit shortcut and slope formula)."""
    if x >= xs[o + n - 1]:
        return ys[o + n - 1]
    lo, hi = 0, n - 1
    while hi - lo > 1:  # the last j with xs[j] <= x
        mid = (lo + hi) // 2
        if xs[o + mid] <= x:
            lo = mid
        else:
            hi = mid
    a, b = o + lo, o + lo + 1
    if x == xs[a]:
        return ys[a]
    slope = (ys[b] - ys[a]) / (xs[b] - xs[a])
    r = slope * (x - xs[a]) + ys[a]
    if r != r:
        r = slope * (x - xs[b]) + ys[b]
        if r != r and ys[a] == ys[b]:
            r = ys[a]
    return r


@njit(cache=True, nogil=True)
def bonus(code: int, camera: int, start_s: float, end_s: float, weight: float, kind: np.ndarray, box: np.ndarray,
          xs: np.ndarray, ys: np.ndarray, pmem: np.ndarray, phead: np.ndarray, pcount: np.ndarray) -> float:
    """The hand-off bonus of identity ``code`` for a tracklet of camera code ``camera`` over
    ``[start_s, end_s]``: the mean over its prototypes (``pmem`` rows as the member arena's) of
    ``weight * support``, where a prototype on the tracklet's camera supports 0 and one on camera
    ``c`` supports :meth:`~stages.matcher.association.TransitModel.support` at their gap (the time
    between the earlier one's end and the later one's start, seconds).

    The support from ``camera`` to each camera code ``c``: ``kind[c, 0]`` 0 (none: 0), 1 (a topology
    edge: 1 inside ``[box[c, 0], box[c, 1]]`` seconds, else 0) or 2 (a learned curve: ``np.interp``
    over ``xs``/``ys[kind[c, 1]:kind[c, 1] + kind[c, 2]]`` inside its grid, else 0).
    """
    n = pcount[code]
    if n == 0:
        return 0.0
    total = 0.0
    other = False
    for r in range(phead[code], phead[code] + n):
        c = int(pmem[r, 0])
        if c == camera:
            continue
        other = True
        s, e = pmem[r, 1], pmem[r, 2]
        gap = start_s - e if start_s >= s else s - end_s
        k = kind[c, 0] if c < len(kind) else 0
        if k == 1:
            if box[c, 0] <= gap <= box[c, 1]:
                total += weight
        elif k == 2:
            o, m = kind[c, 1], kind[c, 2]
            if xs[o] <= gap <= xs[o + m - 1]:
                total += weight * _interp(gap, xs, ys, o, m)
    return total / n if other else 0.0


@njit(cache=True, nogil=True)
def choose(cand: np.ndarray, base: np.ndarray, best_code: int, best: float, camera: int, start_s: float,
           end_s: float, max_overlap_s: float, reentry: bool, min_transit: np.ndarray, reach_s: float,
           ttl_s: float, last: np.ndarray, mem: np.ndarray, head: np.ndarray, count: np.ndarray, weight: float,
           kind: np.ndarray, box: np.ndarray, xs: np.ndarray, ys: np.ndarray, pmem: np.ndarray, phead: np.ndarray,
           pcount: np.ndarray) -> tuple[int, float, int]:
    """The best identity among candidates ordered best first (:func:`gather`): a candidate scores its
    ``z·m`` plus its hand-off :func:`bonus` (at most ``weight``), unless :func:`blocked`. Starts from
    ``best_code`` (-1: none) scoring ``best`` (-inf) and stops at the first candidate whose ``z·m +
    weight`` is below the best so far (no later one can win). Ties go to the lower code (the older
    identity).

    Returns:
        ``(best_code, best, scored)``: ``scored`` is how many of ``cand``, from the first, were read.
    """
    for i in range(len(cand)):
        if best > base[i] + weight:
            return best_code, best, i
        if _blocks(cand[i], camera, start_s, end_s, max_overlap_s, reentry, min_transit, reach_s, ttl_s, last, mem,
                   head, count):
            continue
        score = base[i]
        if weight > 0.0:
            score = base[i] + bonus(cand[i], camera, start_s, end_s, weight, kind, box, xs, ys, pmem, phead, pcount)
        if score > best or (score == best and cand[i] < best_code):
            best_code, best = cand[i], score
    return best_code, best, len(cand)


@njit(cache=True, nogil=True)
def place(head: np.ndarray, count: np.ndarray, cap: np.ndarray, codes: np.ndarray, sizes: np.ndarray,
          used: int) -> int:
    """Arena blocks for identities ``codes`` (``int64 [n]``, distinct) to hold ``sizes`` members each:
    an identity whose block is too small gets a new one at the arena's end (``used`` rows are taken so
    far); ``count`` is set to ``sizes``. Returns the rows taken afterwards (the caller grows ``mem``
    to hold them first: at most ``used + sizes.sum()``)."""
    for i in range(len(codes)):
        c = codes[i]
        if sizes[i] > cap[c]:
            head[c] = used
            cap[c] = sizes[i]
            used += sizes[i]
        count[c] = sizes[i]
    return used


@njit(cache=True, nogil=True)
def append(mem: np.ndarray, head: np.ndarray, count: np.ndarray, cap: np.ndarray, code: int, camera: int,
           start_s: float, end_s: float, used: int) -> int:
    """Add one member (camera code, span) to identity ``code``; a full block moves to the arena's end
    with twice the room (at least 2). Returns the rows taken afterwards, or -1 (nothing changed) when
    ``mem`` has no room for the move: the caller grows it and calls again."""
    n = count[code]
    if n == cap[code]:
        room = max(2 * n, 2)
        if used + room > len(mem):
            return -1
        h = head[code]
        for j in range(n):
            mem[used + j, 0] = mem[h + j, 0]
            mem[used + j, 1] = mem[h + j, 1]
            mem[used + j, 2] = mem[h + j, 2]
        head[code] = used
        cap[code] = room
        used += room
    r = head[code] + n
    mem[r, 0] = camera
    mem[r, 1] = start_s
    mem[r, 2] = end_s
    count[code] = n + 1
    return used


@njit(cache=True, nogil=True)
def steady_floor(codes: np.ndarray, scores: np.ndarray, stale: np.ndarray, flag: np.ndarray) -> tuple[int, float]:
    """Over a search's ``codes``/``scores`` (``-1`` padding): how many were found, and the lowest score
    of a found identity not in ``stale`` (an identity left out of the search scores at most that);
    ``inf`` when every found one is stale, ``-inf`` when none was found. ``flag`` as in :func:`gather`."""
    _mark(flag, stale, True)
    found = 0
    floor = np.inf
    for i in range(len(codes)):
        c = codes[i]
        if c >= 0:
            found += 1
            if not flag[c] and scores[i] < floor:
                floor = scores[i]
    _mark(flag, stale, False)
    return found, (floor if found else -np.inf)


@njit(cache=True, nogil=True)
def scatter(mem: np.ndarray, head: np.ndarray, codes: np.ndarray, sizes: np.ndarray, rows: np.ndarray) -> None:
    """Write ``rows`` (``float64 [sum(sizes), 3]``, identity after identity) into the blocks of
    ``codes`` (:func:`place`)."""
    r = 0
    for i in range(len(codes)):
        h = head[codes[i]]
        for j in range(sizes[i]):
            mem[h + j, 0] = rows[r, 0]
            mem[h + j, 1] = rows[r, 1]
            mem[h + j, 2] = rows[r, 2]
            r += 1


@njit(cache=True, nogil=True)
def pack(mem: np.ndarray, head: np.ndarray, count: np.ndarray, cap: np.ndarray, alive: np.ndarray,
         out: np.ndarray) -> int:
    """Copy the alive identities' members into ``out`` (``float64 [>= rows alive, 3]``) without gaps
    and point ``head``/``cap`` there (a block as large as its members); dead codes get empty blocks.
    Returns the rows taken in ``out``."""
    used = 0
    for c in range(len(alive)):
        if not alive[c]:
            head[c] = 0
            count[c] = 0
            cap[c] = 0
            continue
        n = count[c]
        for j in range(n):
            out[used + j, 0] = mem[head[c] + j, 0]
            out[used + j, 1] = mem[head[c] + j, 1]
            out[used + j, 2] = mem[head[c] + j, 2]
        head[c] = used
        cap[c] = n
        used += n
    return used


def warm() -> float:
    """Compile (or load from numba's on-disk cache) every function here on the types the gallery
    passes, so that a matcher's first decision does not wait for it (about 4 s to compile, 0.4 s to
    load). Returns the seconds it took."""
    import time

    t = time.perf_counter()
    codes, none = np.zeros(1, np.int64), np.zeros(0, np.int64)
    f32, f32_0 = np.ones(1, np.float32), np.zeros(0, np.float32)
    alive, flag, last = np.ones(1, np.bool_), np.zeros(1, np.bool_), np.zeros(1)
    mem, head, count, cap = np.zeros((4, 3)), np.zeros(1, np.int64), np.ones(1, np.int64), np.ones(1, np.int64)
    table = np.full(1, np.nan)
    distinct_alive(codes, alive)
    cand, base = gather(codes, f32, none, none, f32_0, none, none, f32_0, none, f32_0, alive, flag, True, 0.0, 0.5)
    kind, box, grid = np.zeros((1, 3), np.int64), np.zeros((1, 2)), np.zeros(0)
    for weight in (0.0, 0.05):
        choose(cand, base, -1, -np.inf, 0, 1.0, 2.0, 0.5, True, table, 0.0, np.nan, last, mem, head, count, weight,
               kind, box, grid, grid, mem, head, count)
    blocked(codes, 0, 1.0, 2.0, 0.5, True, table, 0.0, np.nan, last, mem, head, count)
    steady_floor(codes, f32, none, flag)
    used = append(mem, head, count, cap, 0, 0, 1.0, 2.0, 1)
    used = place(head, count, cap, codes, np.ones(1, np.int64), used)
    scatter(mem, head, codes, np.ones(1, np.int64), np.zeros((1, 3)))
    pack(mem, head, count, cap, alive, np.zeros((4, 3)))
    return time.perf_counter() - t


__all__ = ["append", "blocked", "bonus", "choose", "distinct_alive", "gather", "pack", "place", "scatter", "steady_floor", "warm"]
