"""Label-free calibration of the association threshold from a site's own tracklets.

The threshold decides when the constrained average linkage (:func:`stages.matcher.association.average_linkage`)
stops merging. It is estimated, never tuned against labels, from what the footage itself proves:

1. **Known negatives**: the cannot-link pairs (two tracklets at the same time on one camera, or on two
   cameras beyond the border slack) are different people.
2. **Unconstrained merges**: the window is clustered *without* the cannot-links at every threshold
   ``t`` of a grid; ``v(t)``, the share of cannot-link pairs that end up in one cluster, estimates how
   often the clustering joins two different people when nothing protects them: the situation of a
   cross-camera candidate pair. (Hiding only part of the constraints underestimates it: people who walk
   together are still kept apart by their companions' constraints.) Pairs of one camera that overlap in
   time only slightly can be one person tracked twice; that small contamination of the negatives makes
   the estimate conservative.
3. **Linked pairs**: clustered with every constraint, ``L(t)`` cross-camera pairs share a cluster.
   Of the ``M`` cross-camera candidate pairs (not cannot-linked), about ``v(t) · M`` of those are false
   (nearly all candidates are negatives), so ``TP(t) ≈ L(t) − v(t) · M``.
4. With ``P ≈ max_t TP(t)`` (the true pairs the method can reach), the estimated pairwise F1 is
   ``2 TP(t) / (L(t) + P)``; the threshold is the grid point that maximises it (the highest one on ties).

Assumption: the people seen together (the cannot-link pairs) look as different from each other as any
two people do. Groups that always walk together break it a little; a scene with few co-occurrences
gives few negatives (calibration refuses fewer than ``min_negatives``).

:func:`write_calibration` stores the result as JSON with a diagnostic plot (score histograms of the
known negatives and the candidates, the estimated curves and the chosen threshold).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from stages.matcher.association import cut_tree, linkage_tree

log = logging.getLogger(__name__)

__all__ = ["Calibration", "CalibrationError", "calibrate", "read_calibration", "write_calibration"]

FORMAT = "reidstream.calibration.v1"


class CalibrationError(ValueError):
    """Too little evidence to calibrate, or an unreadable calibration file."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A calibrated threshold and the evidence behind it.

    Attributes:
        threshold: Least mean score (cosine in the scoring space) of a merge.
        grid: ``[G]`` thresholds tried.
        linked_pairs: ``L(t)`` cross-camera pairs in one cluster, ``[G]``.
        violation_rate: ``v(t)`` share of cannot-link pairs merged by the unconstrained clustering, ``[G]``.
        est_precision: ``[G]``; est_recall: ``[G]``; est_f1: ``[G]`` (see the module docstring).
        negatives: Pairwise scores of the cannot-link pairs (for the plot).
        candidates: Pairwise scores of the cross-camera candidate pairs.
        tracklets: Tracklets used; cameras: how many cameras.
        source: Free text: what it was fitted on.
    """

    threshold: float
    grid: tuple[float, ...]
    linked_pairs: tuple[float, ...]
    violation_rate: tuple[float, ...]
    est_precision: tuple[float, ...]
    est_recall: tuple[float, ...]
    est_f1: tuple[float, ...]
    negatives: tuple[float, ...]
    candidates: tuple[float, ...]
    tracklets: int
    cameras: int
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON form (``format`` = ``reidstream.calibration.v1``)."""
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def summary(self) -> dict[str, Any]:
        """The headline numbers (no arrays)."""
        i = int(np.argmin(np.abs(np.asarray(self.grid) - self.threshold)))
        return {"threshold": self.threshold, "tracklets": self.tracklets, "cameras": self.cameras,
                "known_negative_pairs": len(self.negatives), "candidate_pairs": len(self.candidates),
                "est_precision": self.est_precision[i], "est_recall": self.est_recall[i], "est_f1": self.est_f1[i]}


def calibrate(scores: np.ndarray, cannot: np.ndarray, cross: np.ndarray, grid: np.ndarray | None = None,
              min_negatives: int = 10, source: str = "", cameras: int | None = None) -> Calibration:
    """Estimate the association threshold of one window without labels (see the module docstring).

    Args:
        scores: ``float [N, N]`` pairwise scores (cosines in the scoring space).
        cannot: ``bool [N, N]`` cannot-links (:func:`stages.matcher.association.cannot_link`).
        cross: ``bool [N, N]`` True for pairs on different cameras.
        grid: Thresholds to try (default ``-0.2 … 0.8`` in steps of 0.01).
        min_negatives: Fewest cannot-link pairs needed.
        source: Description stored with the result.
        cameras: Number of cameras (stored; default: not counted).

    Returns:
        The :class:`Calibration`; it depends on the data alone.

    Raises:
        CalibrationError: Fewer than ``min_negatives`` cannot-link pairs or no candidate pair.
        ValueError: Shapes disagree.
    """
    s = np.asarray(scores)
    n = s.shape[0]
    if s.shape != (n, n) or np.shape(cannot) != (n, n) or np.shape(cross) != (n, n):
        raise ValueError("scores, cannot and cross must all be [N, N]")
    grid = np.round(np.arange(-0.2, 0.8001, 0.01), 4) if grid is None else np.asarray(grid, np.float64)
    cl = np.asarray(cannot, bool)
    cr = np.asarray(cross, bool)
    ni, nj = np.nonzero(np.triu(cl, 1))
    if ni.size < min_negatives:
        raise CalibrationError(f"only {ni.size} cannot-link pairs (need {min_negatives}): calibrate on "
                               f"more footage, with people seen at the same time")
    # cross-camera candidates = cross-camera pairs that are not cannot-linked
    m = int(np.triu(cr & ~cl, 1).sum())
    if m == 0:
        raise CalibrationError("no cross-camera candidate pair: calibration needs tracklets from >= 2 cameras")
    camera_codes = np.unique(_camera_groups(cr), return_inverse=True)[1]
    constrained = linkage_tree(s, cl)
    free = linkage_tree(s, np.zeros_like(cl))
    linked = np.zeros(len(grid))
    viol = np.zeros(len(grid))
    for g, t in enumerate(grid):
        # a constrained cluster never holds a cannot-link pair: its cross-camera pairs are candidates
        linked[g] = _cross_pairs(cut_tree(constrained, n, t), camera_codes)
        lab = cut_tree(free, n, t)
        viol[g] = np.mean(lab[ni] == lab[nj])
    tp = np.maximum(linked - viol * m, 0.0)
    reach = max(float(tp.max()), 1e-9)
    precision = np.where(linked > 0, tp / np.maximum(linked, 1e-9), 1.0)
    recall = tp / reach
    f1 = 2 * tp / np.maximum(linked + reach, 1e-9)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    threshold = float(grid[best[-1]])
    cal = Calibration(threshold, tuple(map(float, grid)), tuple(map(float, linked)), tuple(map(float, viol)),
                      tuple(map(float, precision)), tuple(map(float, recall)), tuple(map(float, f1)),
                      tuple(map(float, s[ni, nj])), tuple(map(float, _sample_scores(s, cr & ~cl))), n,
                      int(cameras or 0), source)
    log.info("calibration: threshold %.2f on %d tracklets (%d known-negative, %d candidate pairs; est. F1 %.2f)",
             threshold, n, ni.size, m, f1[best[-1]])
    return cal


def _camera_groups(cross: np.ndarray) -> np.ndarray:
    """A camera label per tracklet from the cross-camera mask: tracklet i's label is the first
    tracklet on the same camera."""
    return np.argmax(~cross, axis=1)


def _cross_pairs(labels: np.ndarray, cameras: np.ndarray) -> int:
    """Pairs in one cluster and on different cameras: per cluster, (n² − Σ n_cam²) / 2 (O(N))."""
    k = int(cameras.max()) + 1
    counts = np.bincount(labels * k + cameras, minlength=(int(labels.max()) + 1) * k).reshape(-1, k)
    sizes = counts.sum(axis=1)
    return int(((sizes ** 2).sum() - (counts ** 2).sum()) // 2)


def _sample_scores(scores: np.ndarray, mask: np.ndarray, limit: int = 200_000) -> np.ndarray:
    """Scores of the upper-triangle pairs in ``mask`` (an evenly spaced subset when more than
    ``limit``), for the histogram."""
    i, j = np.nonzero(np.triu(mask, 1))
    if i.size > limit:
        keep = np.linspace(0, i.size - 1, limit).astype(np.int64)
        i, j = i[keep], j[keep]
    return scores[i, j]


def write_calibration(cal: Calibration, path: str | Path, plot: bool = True) -> list[Path]:
    """Write ``path`` (JSON) and, with ``plot``, ``<path stem>.png`` beside it.

    Returns:
        The files written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal.as_dict(), indent=1))
    written = [path]
    if plot:
        written.append(plot_calibration(cal, path.with_suffix(".png")))
    return written


def read_calibration(path: str | Path) -> Calibration:
    """Read a calibration JSON written by :func:`write_calibration`.

    Raises:
        CalibrationError: Missing, unreadable or of another format; the message names the file.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read calibration: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CalibrationError(f"{path}: not a {FORMAT} file")
    obj.pop("format")
    try:
        return Calibration(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})
    except TypeError as exc:
        raise CalibrationError(f"{path}: {exc}") from None


def plot_calibration(cal: Calibration, path: str | Path) -> Path:
    """Diagnostic PNG: score histograms of known negatives and candidates, the estimated curves, and
    the chosen threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(-1, 1, 81)
    ax1.hist(cal.candidates, bins=bins, density=True, alpha=0.6, label=f"cross-camera candidates ({len(cal.candidates)})")
    ax1.hist(cal.negatives, bins=bins, density=True, alpha=0.6, label=f"cannot-link negatives ({len(cal.negatives)})")
    ax1.axvline(cal.threshold, color="k", ls="--", label=f"threshold {cal.threshold:.2f}")
    ax1.set_xlabel("pairwise score (cosine, scoring space)")
    ax1.set_ylabel("density")
    ax1.legend(fontsize=8)
    ax2.plot(cal.grid, cal.est_precision, label="est. precision")
    ax2.plot(cal.grid, cal.est_recall, label="est. recall")
    ax2.plot(cal.grid, cal.est_f1, label="est. F1")
    ax2.plot(cal.grid, cal.violation_rate, label="cannot-link pairs merged without constraints")
    ax2.axvline(cal.threshold, color="k", ls="--")
    ax2.set_xlabel("threshold")
    ax2.set_ylim(0, 1.05)
    ax2.legend(fontsize=8)
    fig.suptitle(f"label-free calibration: {cal.tracklets} tracklets, {cal.cameras} cameras {cal.source}".strip())
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
