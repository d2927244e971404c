"""What the matcher knows without labels, and the clustering that uses it.

Everything here is pure numpy/scipy on arrays of one *window* of tracklets, so the online matcher,
the periodic re-association, ``reidstream calibrate`` and ``reidstream adapt`` share one definition.

* **Cannot-links** (:func:`cannot_link`): two tracklets overlapping in time on one camera are two
  people; one person is not in view of two cameras at once beyond ``max_overlap_s`` (the slack covers a
  person crossing the shared border of adjacent views); with a camera topology, a hand-off faster than
  the pair's ``min_transit_s`` is impossible. With same-camera re-entry off, any two tracklets of one
  camera are kept apart.
* **Scoring space** (:class:`ScoringSpace`): embeddings are centred on the site's mean embedding
  (untrained ImageNet features are non-negative, so raw cosines of any two people crowd into
  0.6–0.95) and, once the window holds at least ``2 · max_dim`` tracklets, projected onto its top
  ``max_dim`` principal directions (cheaper scores on large windows; a smaller window is only centred,
  since projecting onto the span of few tracklets would squash a newcomer onto them). Scores are
  cosines in that space, in [-1, 1].
* **Constrained average linkage** (:func:`average_linkage`): agglomerative clustering in which two
  clusters merge, most similar pair first, while the mean pairwise score between them is at least the
  threshold and no cannot-link joins them (Davidson & Ravi, "Agglomerative hierarchical clustering with
  constraints", SDM 2005, for the constrained form).
* **Transit times** (:class:`TransitModel`): from confident cross-camera links, a smoothed histogram of
  hand-off gaps per camera pair, used as a soft spatio-temporal score next to appearance (after Wang et
  al., "Spatial-Temporal Person Re-identification", AAAI 2019).

Conventions: ``N`` tracklets in a window; times are stream seconds; embeddings ``float32 [N, D]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "Edge",
    "Rules",
    "WindowAssociation",
    "associate",
    "ScoringSpace",
    "TransitModel",
    "average_linkage",
    "cannot_link",
    "cannot_link_between",
    "cannot_link_coded",
    "topology_codes",
    "cross_camera_mask",
    "cut_tree",
    "score_vectors",
    "linkage_tree",
    "overlap_s",
]


@dataclasses.dataclass(frozen=True)
class Edge:
    """A connected camera pair of the site topology (either direction).

    Attributes:
        a: Camera id.
        b: Camera id.
        min_transit_s: Fewest seconds from leaving one view to entering the other; negative when the
            views overlap by that much.
        max_transit_s: Most seconds of a direct hand-off (a longer gap is not impossible: the person
            may have gone elsewhere and come back; it only earns no spatio-temporal support).
    """

    a: str
    b: str
    min_transit_s: float
    max_transit_s: float

    def __post_init__(self) -> None:
        if self.a == self.b:
            raise ValueError(f"topology edge joins camera {self.a!r} to itself")
        if self.max_transit_s < self.min_transit_s:
            raise ValueError(f"topology edge {self.a}-{self.b}: max_transit_s ({self.max_transit_s}) < "
                             f"min_transit_s ({self.min_transit_s})")


def _overlap_between(s_a, e_a, s_b, e_b) -> np.ndarray:
    return np.maximum(0.0, np.minimum(e_a[:, None], e_b[None, :]) - np.maximum(s_a[:, None], s_b[None, :]))


def _gap_between(s_a, e_a, s_b, e_b) -> np.ndarray:
    """Hand-off gap of every pair: start of the later tracklet minus end of the earlier one (negative
    when they overlap), ``float64 [M, N]``."""
    later_a = s_a[:, None] >= s_b[None, :]
    return np.where(later_a, s_a[:, None] - e_b[None, :], s_b[None, :] - e_a[:, None])


def overlap_s(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Pairwise time overlap, seconds (0 when disjoint).

    Args:
        starts: ``float64 [N]`` first sighting of each tracklet.
        ends: ``float64 [N]`` last sighting.

    Returns:
        ``float64 [N, N]``, symmetric.
    """
    s = np.asarray(starts, np.float64)
    e = np.asarray(ends, np.float64)
    return _overlap_between(s, e, s, e)


def cross_camera_mask(cameras: Sequence[str]) -> np.ndarray:
    """``bool [N, N]``: True where the two tracklets come from different cameras."""
    cams = np.asarray(cameras)
    return cams[:, None] != cams[None, :]


def cannot_link_between(cams_a: Sequence[str], starts_a: np.ndarray, ends_a: np.ndarray, cams_b: Sequence[str],
                        starts_b: np.ndarray, ends_b: np.ndarray, max_overlap_s: float, reentry: bool = True,
                        topology: Sequence[Edge] = ()) -> np.ndarray:
    """Pairs (one tracklet of set A, one of set B) that cannot be one person, from camera and time.

    Args:
        cams_a: ``[M]`` camera ids; starts_a, ends_a: ``float64 [M]`` stream seconds.
        cams_b: ``[N]`` camera ids; starts_b, ends_b: ``float64 [N]`` stream seconds.
        max_overlap_s: Seconds two tracklets of different cameras may overlap and still be one person.
        reentry: Whether one camera may see a person twice (at disjoint times).
        topology: Connected camera pairs; for these the pair's ``min_transit_s`` replaces the overlap
            rule (a gap below it is impossible).

    Returns:
        ``bool [M, N]``.
    """
    ca, cb = _codes(cams_a, cams_b)
    names = sorted(set(map(str, cams_a)) | set(map(str, cams_b)))
    return cannot_link_coded(ca, starts_a, ends_a, cb, starts_b, ends_b, max_overlap_s, reentry,
                             topology_codes(topology, names))


def topology_codes(topology: Sequence[Edge], names: Sequence[str]) -> list[tuple[int, int, float]]:
    """The topology's edges between cameras of ``names``, both directions, as ``(code_a, code_b,
    min_transit_s)`` with a camera's code its position in ``names`` (for :func:`cannot_link_coded`)."""
    code = {c: i for i, c in enumerate(names)}
    return [(code[x], code[y], e.min_transit_s) for e in topology for x, y in ((e.a, e.b), (e.b, e.a))
            if x in code and y in code]


def cannot_link_coded(ca: np.ndarray, starts_a: np.ndarray, ends_a: np.ndarray, cb: np.ndarray,
                      starts_b: np.ndarray, ends_b: np.ndarray, max_overlap_s: float, reentry: bool,
                      edges: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """:func:`cannot_link_between` on integer camera codes (``int [M]``, ``int [N]``, one code book)
    with the topology as :func:`topology_codes` gives it; ``bool [M, N]``."""
    ca, cb = np.asarray(ca), np.asarray(cb)
    sa, ea = np.asarray(starts_a, np.float64), np.asarray(ends_a, np.float64)
    sb, eb = np.asarray(starts_b, np.float64), np.asarray(ends_b, np.float64)
    out = np.empty((len(ca), len(cb)), bool)
    for r0 in range(0, len(ca), _BLOCK):  # row blocks bound the temporaries to _BLOCK x N
        r1 = min(r0 + _BLOCK, len(ca))
        same = ca[r0:r1, None] == cb[None, :]
        ov = _overlap_between(sa[r0:r1], ea[r0:r1], sb, eb)
        block = np.where(same, (ov > 0) | (not reentry), ov > max_overlap_s)
        if edges:
            gap = _gap_between(sa[r0:r1], ea[r0:r1], sb, eb)
            for x, y, min_s in edges:
                pair = (ca[r0:r1] == x)[:, None] & (cb == y)[None, :]
                if pair.any():
                    block = np.where(pair, gap < min_s, block)
        out[r0:r1] = block
    return out


_BLOCK = 2048


def _codes(*camera_lists: Sequence[str]) -> list[np.ndarray]:
    """Integer codes of camera ids (one shared code book), one ``int32`` array per list."""
    names = sorted({str(c) for cams in camera_lists for c in cams})
    code = {c: i for i, c in enumerate(names)}
    return [np.fromiter((code[str(c)] for c in cams), np.int32, len(cams)) for cams in camera_lists]


def cannot_link(cameras: Sequence[str], starts: np.ndarray, ends: np.ndarray, max_overlap_s: float,
                reentry: bool = True, topology: Sequence[Edge] = ()) -> np.ndarray:
    """Pairs of one window that cannot be one person (see :func:`cannot_link_between`).

    Returns:
        ``bool [N, N]``, symmetric, False on the diagonal.
    """
    out = cannot_link_between(cameras, starts, ends, cameras, starts, ends, max_overlap_s, reentry, topology)
    np.fill_diagonal(out, False)
    return out


@dataclasses.dataclass(frozen=True)
class ScoringSpace:
    """Centring and projection fitted on a site's own embeddings (no labels).

    Attributes:
        mean: ``float32 [D]`` mean of the unit-normalised embeddings.
        components: ``float32 [D, K]`` orthonormal principal directions (K <= max_dim), or None for
            "centre only" (no projection).
    """

    mean: np.ndarray
    components: np.ndarray | None = None

    @classmethod
    def fit(cls, embeddings: np.ndarray, max_dim: int | None = 256) -> ScoringSpace:
        """Fit on ``float32 [N, D]`` embeddings (each row is unit-normalised first, so no single
        embedding moves the mean by more than ``2 / N``).

        Args:
            embeddings: The window's embeddings, ``N >= 1``.
            max_dim: Most principal directions kept; None keeps no projection (centre only).

        Raises:
            ValueError: Empty or non-2-D input, or ``max_dim < 1``.
        """
        x = _unit_rows(embeddings)
        if x.shape[0] == 0:
            raise ValueError("cannot fit a scoring space on no embeddings")
        mean = x.mean(axis=0)
        if max_dim is not None and max_dim < 1:
            raise ValueError(f"max_dim must be >= 1, got {max_dim}")
        if max_dim is None or x.shape[0] < 2 * max_dim or x.shape[1] <= max_dim:
            # too few samples to estimate max_dim directions (a new person would be projected onto the
            # span of the few seen so far), or nothing to reduce: centre only
            return cls(mean.astype(np.float32), None)
        xc = (x - mean).astype(np.float32)
        k = min(max_dim, max(xc.shape[0] - 1, 1), xc.shape[1])
        vt, sv = _randomized_top(xc, k)
        keep = sv[:k] > sv[0] * 1e-6 if sv.size and sv[0] > 0 else np.zeros(0, bool)
        comps = vt[:k][keep].T.astype(np.float32)
        if comps.shape[1] == 0:
            comps = None
        return cls(mean.astype(np.float32), comps)

    @property
    def dim(self) -> int:
        """Dimension of the scoring space."""
        return self.mean.shape[0] if self.components is None else self.components.shape[1]

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        """Map ``float32 [N, D]`` (or ``[D]``) embeddings to unit rows of the scoring space, ``float32
        [N, K]`` (or ``[K]``); a row that centres to zero stays zero.

        Raises:
            ValueError: The embedding dimension differs from the fitted one.
        """
        one = np.ndim(embeddings) == 1
        z = _unit_rows(np.atleast_2d(self.project(embeddings)))
        return z[0] if one else z

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Like :meth:`transform` without the final normalisation: ``(x / |x| - mean) @ components``,
        ``float32 [N, K]`` (or ``[K]``), the form a change of space can be applied to (see
        :meth:`change_from`).

        Raises:
            ValueError: The embedding dimension differs from the fitted one.
        """
        one = np.ndim(embeddings) == 1
        x = _unit_rows(np.atleast_2d(embeddings))
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"embedding dimension {x.shape[1]} differs from the scoring space's "
                             f"{self.mean.shape[0]} (was the re-id model changed? recalibrate or use a new namespace)")
        z = x - self.mean
        if self.components is not None:
            z = z @ self.components
        return z[0] if one else z

    def aligned_to(self, old: ScoringSpace | None) -> tuple[ScoringSpace, np.ndarray | None]:
        """This space with its principal directions rotated onto ``old``'s (orthogonal Procrustes:
        ``R = U Vᵀ`` of ``components.T @ old.components = U S Vᵀ``), and ``R`` (``float32 [K, K]``;
        None when there is nothing to align). Cosines are unchanged by the rotation, so the association
        is too; what changes is that vectors kept from ``old`` need (almost) no re-expression."""
        if old is None or old.components is None or self.components is None or \
                old.components.shape != self.components.shape:
            return self, None
        u, _, vt = np.linalg.svd(self.components.T.astype(np.float64) @ old.components.astype(np.float64))
        r = (u @ vt).astype(np.float32)
        return ScoringSpace(self.mean, (self.components @ r).astype(np.float32)), r

    def change_from(self, old: ScoringSpace | None) -> tuple[np.ndarray | None, np.ndarray]:
        """The affine map ``y_new = y_old @ a + c`` taking :meth:`project` outputs of ``old`` (None:
        raw unit embeddings) to this space: exact when ``old`` does not project, otherwise exact for
        the part of the embedding inside ``old``'s principal subspace (the rest was not kept).

        Returns:
            ``(a float32 [K_old, K_new] or None for the identity, c float32 [K_new])``.
        """
        d = self.mean.shape[0]
        if (old is None or old.components is None) and self.components is None:
            mu_old = np.zeros(d, np.float32) if old is None else old.mean
            return None, (mu_old - self.mean).astype(np.float32)
        c_old = np.eye(d, dtype=np.float32) if old is None or old.components is None else old.components
        mu_old = np.zeros(d, np.float32) if old is None else old.mean
        c_new = np.eye(d, dtype=np.float32) if self.components is None else self.components
        return (c_old.T @ c_new).astype(np.float32), ((mu_old - self.mean) @ c_new).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to store (``mean``, and ``components`` when projecting)."""
        out = {"mean": self.mean}
        if self.components is not None:
            out["components"] = self.components
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ScoringSpace:
        """Inverse of :meth:`to_arrays`."""
        comps = arrays.get("components")
        return cls(np.asarray(arrays["mean"], np.float32), None if comps is None else np.asarray(comps, np.float32))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected float32 [N, D] embeddings, got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 1e-12)


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the columns of ``y`` ``[N, m]`` by Cholesky QR (two passes for accuracy),
    much cheaper than Householder QR for tall matrices."""
    for _ in range(2):
        gram = y.T @ y
        gram[np.diag_indices_from(gram)] += 1e-6 * max(float(np.trace(gram)) / len(gram), 1e-12)
        r = np.linalg.cholesky(gram.astype(np.float64)).T.astype(y.dtype)
        y = np.linalg.solve(r.T, y.T).T
    return y


def _randomized_top(x: np.ndarray, k: int, oversample: int = 16, iters: int = 2,
                    max_rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` right singular vectors of ``x`` by randomized subspace iteration (Halko et al., 2011)
    on at most ``max_rows`` evenly spaced rows, with a fixed seed so the result depends on the data
    alone. Returns ``(vt [k', D], s [k'])``."""
    if x.shape[0] > max_rows:
        x = x[np.linspace(0, x.shape[0] - 1, max_rows).astype(np.int64)]
    rng = np.random.default_rng(0)
    q = _orthonormal(x @ rng.standard_normal((x.shape[1], k + oversample)).astype(np.float32))
    for _ in range(iters):
        q = _orthonormal(x @ (x.T @ q))
    _, s, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    return vt, s


def linkage_tree(scores: np.ndarray, cannot: np.ndarray) -> np.ndarray | None:
    """The constrained average-linkage tree of a window (cut it with :func:`cut_tree`).

    scipy's average linkage runs on distances ``1 - score`` in which every cannot-link pair costs
    ``N²``: a cluster pair holding one then averages at least 4, above any real distance (at most 2),
    and since average linkage never lowers a merge height, cutting the tree at ``1 - threshold``
    gives exactly the constrained greedy clustering of :func:`average_linkage`.

    Args:
        scores: ``float [N, N]`` symmetric pairwise scores (cosines), in [-1, 1].
        cannot: ``bool [N, N]`` symmetric cannot-links.

    Returns:
        The scipy linkage matrix ``float64 [N - 1, 4]``, or None when ``N < 2``.

    Raises:
        ValueError: Shapes disagree.
    """
    from scipy.cluster.hierarchy import linkage

    from scipy.spatial.distance import squareform

    s = np.asarray(scores)
    n = s.shape[0]
    if s.shape != (n, n) or np.shape(cannot) != (n, n):
        raise ValueError(f"scores {s.shape} and cannot {np.shape(cannot)} must both be [N, N]")
    if n < 2:
        return None
    dist = np.subtract(1.0, s, dtype=np.float32)
    np.clip(dist, 0.0, 2.0, out=dist)
    dist[np.asarray(cannot, bool)] = float(max(n * n, 16))  # exact in float32 up to N = 4096², plenty
    np.fill_diagonal(dist, 0.0)
    return linkage(squareform(dist, checks=False), method="average")


def cut_tree(tree: np.ndarray | None, n: int, threshold: float) -> np.ndarray:
    """Clusters of a :func:`linkage_tree` whose merges all have a mean score >= ``threshold``:
    ``int64 [n]`` labels ``0..C-1`` numbered by each cluster's first member."""
    from scipy.cluster.hierarchy import fcluster

    if tree is None:
        return np.zeros(n, np.int64)
    return _relabel_by_first(fcluster(tree, t=1.0 - threshold, criterion="distance"))


def average_linkage(scores: np.ndarray, cannot: np.ndarray, threshold: float) -> np.ndarray:
    """Constrained average-linkage clustering.

    Repeatedly merges the two clusters of highest mean pairwise score, while that mean is at least
    ``threshold`` and no cannot-link pair joins them (see :func:`linkage_tree` for how).

    Args:
        scores: ``float [N, N]`` symmetric pairwise scores (cosines), in [-1, 1].
        cannot: ``bool [N, N]`` symmetric cannot-links.
        threshold: Least mean score of a merge.

    Returns:
        ``int64 [N]`` cluster labels ``0..C-1``, numbered by each cluster's first member, so equal
        inputs in equal order always give equal labels.

    Raises:
        ValueError: Shapes disagree.
    """
    return cut_tree(linkage_tree(scores, cannot), np.shape(scores)[0], threshold)


def _relabel_by_first(raw: np.ndarray) -> np.ndarray:
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class TransitModel:
    """Hand-off gap statistics per camera pair, learned from confident links or given by topology.

    ``support(a, b, gap)`` is in [0, 1]: the pair's smoothed gap density relative to its peak (a Parzen
    window of ``bandwidth_s`` over the observed gaps), or 1 inside a topology edge's
    ``[min_transit_s, max_transit_s]`` and 0 outside; 0 for pairs with too few observations.

    Attributes:
        gaps: Observed hand-off gaps (seconds) per unordered camera pair ``(min(a, b), max(a, b))``.
        bandwidth_s: Parzen window width, seconds.
        min_links: Observations a pair needs before it earns support.
        edges: Topology edges (they override learned statistics for their pair).
        max_gap_s: Longer gaps are returns, not hand-offs, and are not learned.
    """

    gaps: Mapping[tuple[str, str], tuple[float, ...]] = dataclasses.field(default_factory=dict)
    bandwidth_s: float = 2.0
    min_links: int = 3
    edges: tuple[Edge, ...] = ()
    max_gap_s: float = 300.0

    @classmethod
    def learn(cls, labels: np.ndarray, cameras: Sequence[str], starts: np.ndarray, ends: np.ndarray,
              confident: np.ndarray | None = None, **kwargs) -> TransitModel:
        """Collect the gap between consecutive sightings on different cameras within each cluster.

        Args:
            labels: ``int [N]`` cluster of each tracklet.
            cameras: ``[N]`` camera ids.
            starts: ``float64 [N]``.
            ends: ``float64 [N]``.
            confident: ``bool [N]``: only these tracklets count (e.g. joined with a high score); None
                counts all.
            **kwargs: Other fields (``bandwidth_s``, ``min_links``, ``edges``).
        """
        gaps: dict[tuple[str, str], list[float]] = {}
        keep = np.ones(len(labels), bool) if confident is None else np.asarray(confident, bool)
        for lab in np.unique(labels):
            idx = [i for i in np.flatnonzero(labels == lab) if keep[i]]
            idx.sort(key=lambda i: (starts[i], ends[i]))
            for i, j in zip(idx, idx[1:]):
                if cameras[i] != cameras[j]:
                    pair = tuple(sorted((str(cameras[i]), str(cameras[j]))))
                    gaps.setdefault(pair, []).append(float(starts[j] - ends[i]))
        return cls({k: tuple(v) for k, v in gaps.items()}, **kwargs)

    def support(self, a: str, b: str, gap: np.ndarray | float) -> np.ndarray:
        """Spatio-temporal support of hand-offs between cameras ``a`` and ``b`` after ``gap`` seconds,
        ``float64`` of ``gap``'s shape, in [0, 1]."""
        g = np.asarray(gap, np.float64)
        how = self.pair(a, b)
        if how is not None and how[0] == "edge":
            return ((g >= how[1]) & (g <= how[2])).astype(np.float64)
        out = np.zeros(g.shape)
        if how is None:
            return out
        _, xs, ys = how
        inside = (g >= xs[0]) & (g <= xs[-1])  # most pairs of a large window are far apart in time
        out[inside] = np.interp(g[inside], xs, ys)
        return out

    def pair(self, a: str, b: str) -> tuple | None:
        """How :meth:`support` between cameras ``a`` and ``b`` is computed: ``("edge", min_transit_s,
        max_transit_s)`` (the first topology edge of the pair: 1 inside, 0 outside), ``("curve", xs,
        ys)`` (learned: ``np.interp`` over the grid ``xs``, ``float64 [n]`` seconds, inside it, 0
        outside), or None (0 everywhere)."""
        for e in self.edges:
            if {e.a, e.b} == {a, b}:
                return ("edge", e.min_transit_s, e.max_transit_s)
        curve = self._curve(a, b)
        return None if curve is None else ("curve", *curve)

    def _curve(self, a: str, b: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The pair's Parzen density on a grid of ``bandwidth_s / 8`` steps (a histogram smoothed with a
        Gaussian kernel), divided by its peak; None without enough hand-offs."""
        key = tuple(sorted((a, b)))
        cache = self.__dict__.setdefault("_curves", {})
        if key not in cache:
            obs = np.asarray([g for g in self.gaps.get(key, ()) if g <= self.max_gap_s], np.float64)
            if a == b or obs.size < self.min_links:
                cache[key] = None
            else:
                step = self.bandwidth_s / 8
                xs = np.arange(obs.min() - 4 * self.bandwidth_s, obs.max() + 4 * self.bandwidth_s + step, step)
                hist = np.bincount(np.clip(np.rint((obs - xs[0]) / step).astype(np.int64), 0, len(xs) - 1),
                                   minlength=len(xs)).astype(np.float64)
                taps = np.arange(-32, 33) * step
                dens = np.convolve(hist, np.exp(-0.5 * (taps / self.bandwidth_s) ** 2), mode="same")
                cache[key] = (xs, dens / dens.max())
        return cache[key]

    def support_matrix(self, cameras: Sequence[str], starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """``float32 [N, N]`` support of every pair (0 on same-camera pairs)."""
        (codes,) = _codes(cameras)
        names = sorted({str(c) for c in cameras})
        s, e = np.asarray(starts, np.float64), np.asarray(ends, np.float64)
        out = np.zeros((len(codes), len(codes)), np.float32)
        members = [np.flatnonzero(codes == i) for i in range(len(names))]
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                ia, ib = members[i], members[j]
                if self._curve(a, names[j]) is None and not any({x.a, x.b} == {a, names[j]} for x in self.edges):
                    continue
                block = self.support(a, names[j], _gap_between(s[ia], e[ia], s[ib], e[ib])).astype(np.float32)
                out[np.ix_(ia, ib)] = block
                out[np.ix_(ib, ia)] = block.T
        return out

    def as_dict(self) -> dict:
        """JSON form: per pair ``"a|b"`` the number of gaps and their median, seconds."""
        return {f"{a}|{b}": {"links": len(v), "median_gap_s": float(np.median(v))}
                for (a, b), v in sorted(self.gaps.items())}


CALIBRATION_SAMPLE = 3000
"""Most tracklets of a window the online recalibration looks at (evenly spaced in start time)."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """The association rules of one site (the ``matcher`` config section without its plumbing).

    Attributes:
        max_overlap_s: Seconds two cameras' tracklets may overlap and still be one person.
        reentry: One camera may see a person at several disjoint times.
        topology: Connected camera pairs.
        center: Score in a scoring space fitted on the window (off: plain cosine of the embeddings).
        projection_dim: Principal directions of the scoring space (None: centre only).
        transit_learn: Learn hand-off gaps per camera pair from a first clustering.
        transit_weight: Score bonus of a hand-off at its pair's most typical gap (0: appearance only).
        transit_bandwidth_s: Smoothing of the learned gaps, seconds.
        transit_min_links: Hand-offs a pair needs before its statistics count.
    """

    max_overlap_s: float = 0.5
    reentry: bool = True
    topology: tuple[Edge, ...] = ()
    center: bool = True
    projection_dim: int | None = 256
    transit_learn: bool = True
    transit_weight: float = 0.05
    transit_bandwidth_s: float = 2.0
    transit_min_links: int = 3

    @classmethod
    def from_config(cls, m) -> Rules:
        """From a :class:`pipeline.config.MatcherConfig`."""
        return cls(m.max_overlap_s, m.reentry, tuple(Edge(e.a, e.b, e.min_transit_s, e.max_transit_s) for e in m.topology),
                   m.center, m.projection_dim, m.transit.learn, m.transit.weight, m.transit.bandwidth_s,
                   m.transit.min_links)

    def empty_transit(self) -> TransitModel:
        """A transit model with the topology and no learned gaps."""
        return TransitModel(edges=self.topology, bandwidth_s=self.transit_bandwidth_s, min_links=self.transit_min_links)


@dataclasses.dataclass(frozen=True)
class WindowAssociation:
    """The outcome of :func:`associate`.

    Attributes:
        labels: ``int64 [N]`` identity clusters, in input order.
        z: ``float32 [N, K]`` scoring-space vectors.
        space: The fitted scoring space (None with ``center`` off).
        threshold: The threshold used.
        calibrated: Whether it was calibrated on this window.
        transit: Hand-off statistics learned on it (or the topology alone).
    """

    labels: np.ndarray
    z: np.ndarray
    space: ScoringSpace | None
    threshold: float
    calibrated: bool
    transit: TransitModel


def score_vectors(embeddings: np.ndarray, rules: Rules) -> tuple[np.ndarray, ScoringSpace | None]:
    """Unit vectors of the window in its scoring space, ``float32 [N, K]``, and that space (None with
    ``rules.center`` off, when the vectors are the unit-normalised embeddings)."""
    emb = np.asarray(embeddings, np.float32)
    space = ScoringSpace.fit(emb, rules.projection_dim) if rules.center and len(emb) else None
    return (space.transform(emb) if space is not None else _unit_rows(emb)), space


def associate(cameras: Sequence[str], starts: np.ndarray, ends: np.ndarray, embeddings: np.ndarray, rules: Rules,
              threshold: float, calibrate_min_negatives: int | None = None,
              calibrate_min_tracklets: int = 3, extra_cannot: np.ndarray | None = None) -> WindowAssociation:
    """Identities of one window: scoring space, cannot-links, (optionally) label-free calibration,
    constrained average linkage, then hand-off gaps learned from that clustering and a second linkage
    with their spatio-temporal support added to the scores.

    Args:
        cameras: ``[N]`` camera ids; starts, ends: ``float64 [N]`` stream seconds.
        embeddings: ``float32 [N, D]``.
        rules: The site's rules.
        threshold: Threshold used when no calibration applies.
        calibrate_min_negatives: Recalibrate when the window holds at least this many cannot-link pairs
            and a cross-camera candidate pair; None never recalibrates.
        calibrate_min_tracklets: ... and at least this many tracklets. Windows larger than
            :data:`CALIBRATION_SAMPLE` are calibrated on an evenly spaced sample of that size.
        extra_cannot: ``bool [N, N]`` cannot-links known otherwise (an operator's split), added to the
            rules' ones.

    Returns:
        The :class:`WindowAssociation`; the result depends only on the inputs and their order.
    """
    cams = list(cameras)
    n = len(cams)
    emb = np.asarray(embeddings, np.float32)
    z, space = score_vectors(emb, rules)
    scores = z @ z.T
    cannot = cannot_link(cams, starts, ends, rules.max_overlap_s, rules.reentry, rules.topology)
    if extra_cannot is not None:
        cannot = cannot | extra_cannot
    calibrated = False
    if calibrate_min_negatives is not None and n >= max(calibrate_min_tracklets, 3):
        from stages.matcher.calibration import calibrate

        # a threshold is a single number: an evenly spaced sample of a large window estimates it as
        # well as the whole window, at a fraction of the cost of its two extra linkage trees
        sub = np.linspace(0, n - 1, min(n, CALIBRATION_SAMPLE)).astype(np.int64)
        s_cross = cross_camera_mask([cams[i] for i in sub])
        s_cannot = cannot[np.ix_(sub, sub)]
        iu = np.triu_indices(len(sub), 1)
        if int(s_cannot[iu].sum()) >= calibrate_min_negatives and (s_cross[iu] & ~s_cannot[iu]).any():
            threshold = calibrate(scores[np.ix_(sub, sub)], s_cannot, s_cross, min_negatives=calibrate_min_negatives,
                                  cameras=len(set(cams))).threshold
            calibrated = True
    labels = cut_tree(linkage_tree(scores, cannot), n, threshold)
    transit = rules.empty_transit()
    if rules.transit_weight > 0 and (rules.transit_learn or rules.topology):
        if rules.transit_learn:
            transit = TransitModel.learn(labels, cams, starts, ends, edges=rules.topology,
                                         bandwidth_s=rules.transit_bandwidth_s, min_links=rules.transit_min_links)
        bonus = transit.support_matrix(cams, starts, ends)
        if bonus.any():
            bonus *= rules.transit_weight
            bonus += scores
            labels = cut_tree(linkage_tree(bonus, cannot), n, threshold)
    return WindowAssociation(labels, z, space, float(threshold), calibrated, transit)
