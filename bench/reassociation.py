"""Matcher association benchmark: prints one JSON object per configuration (JSON Lines on stdout).

A synthetic site: ``--people`` people per 1,000 tracklets walk past ``--cameras`` cameras (random
times, every visit a 6 s tracklet); each person has a random unit prototype in ``D`` dimensions and
each tracklet is that prototype plus Gaussian noise (``--noise``), plus a shared non-negative offset
like untrained ImageNet features have. For each window size ``N`` it times, on this machine's CPUs:

* ``reassociate_s``: one re-association of the whole window (:func:`stages.matcher.association.associate`:
  scoring space fitted on the window, cannot-links, constrained average linkage, learned hand-off
  gaps and a second linkage), without (``calibrated: false``) and with label-free recalibration;
* ``decide_p50_ms`` / ``decide_p95_ms``: the online decision for one new tracklet against the window
  (:meth:`stages.matcher.matcher.CrossCameraMatcher.decide`, pure, no Redis), over ``--decisions`` draws;
* ``pairwise_f1``: cross-camera pairwise F1 of the re-association against the synthetic truth (a
  sanity check that the timed work is the real work, not a tuned figure).

Usage: ``python bench/reassociation.py [--sizes 1000 10000] [--dim 5120] [--cameras 4]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.matcher.association import Rules, associate  # noqa: E402


def synthetic(n: int, dim: int, cameras: int, per_thousand: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    people = max(1, n * per_thousand // 1000)
    protos = rng.normal(size=(people, dim)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    offset = np.abs(rng.normal(size=dim)).astype(np.float32)
    offset *= 2.0 / np.linalg.norm(offset)
    pid = np.sort(rng.integers(0, people, n))
    visit = np.zeros(n)
    for p in np.unique(pid):  # a person's visits follow each other, 40-100 s apart
        idx = np.flatnonzero(pid == p)
        visit[idx] = np.cumsum(rng.uniform(40, 100, len(idx)))
    t0 = rng.uniform(0, n * 3.0, people)
    cams = [f"cam{c}" for c in rng.integers(0, cameras, n)]
    starts = t0[pid] + visit
    emb = protos[pid] + noise * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim) * 4 + offset
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return cams, starts, starts + 6.0, emb.astype(np.float32), pid


def _cross_pairs(groups: np.ndarray, cams: np.ndarray) -> int:
    """Cross-camera pairs inside the groups of ``groups`` (counted per group, O(N))."""
    total = 0
    for g in np.unique(groups):
        _, counts = np.unique(cams[groups == g], return_counts=True)
        total += (counts.sum() ** 2 - (counts ** 2).sum()) // 2
    return int(total)


def pairwise_f1(labels: np.ndarray, pid: np.ndarray, cams: list[str]) -> float:
    """Cross-camera pairwise F1 of ``labels`` against ``pid``."""
    c = np.asarray(cams)
    both = labels.astype(np.int64) * (int(pid.max()) + 1) + pid
    tp = _cross_pairs(both, c)
    return float(2 * tp / max(_cross_pairs(labels, c) + _cross_pairs(pid, c), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--dim", type=int, default=5120, help="Embedding dimension (part pooling of MobileNetV2: 5120).")
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--people", type=int, default=150, help="People per 1,000 tracklets.")
    ap.add_argument("--noise", type=float, default=0.6)
    ap.add_argument("--decisions", type=int, default=200)
    ap.add_argument("--threshold", type=float, default=0.15)
    args = ap.parse_args()
    from stages.matcher.matcher import CrossCameraMatcher, _Window
    from pipeline.store import WindowEntry

    rules = Rules(max_overlap_s=0.5)
    for n in args.sizes:
        cams, starts, ends, emb, pid = synthetic(n, args.dim, args.cameras, args.people, args.noise)
        for calibrate in (False, True):
            t = time.perf_counter()
            res = associate(cams, starts, ends, emb, rules, args.threshold, 30 if calibrate else None)
            seconds = time.perf_counter() - t
            row = {"bench": "reassociation", "tracklets": n, "dim": args.dim, "cameras": args.cameras,
                   "calibrated": calibrate, "threshold": round(res.threshold, 3), "reassociate_s": round(seconds, 3),
                   "scoring_dim": res.z.shape[1], "identities": int(res.labels.max() + 1),
                   "pairwise_f1": round(pairwise_f1(res.labels, pid, cams), 3), "cpus": os.cpu_count(),
                   "machine": platform.machine()}
            print(json.dumps(row), flush=True)
        m = CrossCameraMatcher(store=None, threshold=res.threshold, rules=rules)  # decide() needs no store
        m.space, m.window = res.space, _Window()
        ys = res.space.project(emb) if res.space is not None else res.z
        for i in range(n):
            m.window.add(WindowEntry(str(i), cams[i], float(starts[i]), float(ends[i]), 10, f"G{res.labels[i]:06d}",
                                     emb[i]), ys[i], i)
        m.gallery.replace(m.window.groups())
        rng = np.random.default_rng(1)
        times = []
        for _ in range(args.decisions):
            j = int(rng.integers(n))
            x = emb[j] + 0.01 * rng.normal(size=args.dim).astype(np.float32)
            t = time.perf_counter()
            m.decide(cams[(j + 1) % n], float(ends.max() + 5), float(ends.max() + 11), x / np.linalg.norm(x))
            times.append((time.perf_counter() - t) * 1e3)
        print(json.dumps({"bench": "decide", "tracklets": n, "dim": args.dim,
                          "decide_p50_ms": round(float(np.percentile(times, 50)), 3),
                          "decide_p95_ms": round(float(np.percentile(times, 95)), 3)}), flush=True)


if __name__ == "__main__":
    main()
