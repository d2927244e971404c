"""Search by example at scale: brute force over every stored embedding vs the API's index.

Prints JSON Lines, one row per size::

    {"bench": "search", "tracklets": N, "identities": I, "dim": D, "brute_p50_ms", "index_build_s",
     "index_p50_ms", "index_p99_ms", "refresh_ms_per_link", "recall_at_10", "same_top1", "index": "exact"|"ivf"}

What is measured, against a throwaway ``redis-server`` (no persistence) filled through
``record_links`` as the matcher writes (pipelined, float16 embeddings as stored). Synthetic site: about
``--per-identity`` tracklets per identity; each identity has a centre drawn with the power-law
eigen-spectrum of ``bench/matcher.py`` (``λ_i ∝ i^-1``), each tracklet's embedding is
``0.8·centre + 0.6·noise`` (cosine ≈ 0.8 to it); a query is a stored tracklet, left out of the
scores (as ``POST /search {"tracklet_id"}`` does):

* ``brute_p50_ms``: :func:`stages.matcher.search.rank_identities` (what ``reidstream query search``
  runs): every stored embedding read from Redis and scored, per query;
* ``index_build_s``: the first search of a :class:`~stages.matcher.search.SearchIndex` (what
  ``reidstream api`` keeps): every embedding read once and indexed;
* ``index_p50_ms`` / ``index_p99_ms``: later searches (the index refreshed from Redis' change feeds,
  the best ``max(4k, 64)`` identities re-scored exactly from their members);
* ``refresh_ms_per_link``: the next search after ``--new`` further links, less a plain search, per link;
* ``recall_at_10`` / ``same_top1``: agreement of the index's top 10 / top 1 with brute force.

Usage::

    python bench/search.py                       # 10^4 and 10^5 tracklets, 256-d
    python bench/search.py --sizes 1000000 --queries 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # after the repo: bench/pipeline.py is no package

from pipeline.store import IdentityStore  # noqa: E402
from stages.matcher.search import SearchIndex, rank_identities  # noqa: E402
from pipeline.store import Link  # noqa: E402
from storage import start_redis  # noqa: E402


def write_site(store: IdentityStore, n: int, args: argparse.Namespace, seed: int, first: int = 0) -> int:
    """Link ``n`` tracklets (ids ``t{first}``…) of about ``n / per_identity`` identities; returns those."""
    rng = np.random.default_rng(seed)
    sd = (np.arange(1, args.dim + 1, dtype=np.float64) ** -0.5).astype(np.float32)
    n_ids = max(1, round(n / args.per_identity))
    centres = rng.standard_normal((n_ids, args.dim), dtype=np.float32) * sd
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gids = store.reserve_global_ids(n_ids)
    owner = rng.integers(0, n_ids, n)
    for s in range(0, n, 10000):
        k = min(10000, n - s)
        noise = rng.standard_normal((k, args.dim), dtype=np.float32) * sd
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        x = 0.8 * centres[owner[s:s + k]] + 0.6 * noise
        links = []
        for j in range(k):
            i = first + s + j
            start = float(i)
            links.append((Link(f"t{i}", f"cam{i % args.cameras}", i, gids[owner[s + j]], 0.9, start, start + 2.0,
                               [0, 20], [[0.0, 0.0, 40.0, 90.0]] * 2, 1.7e9, 1.7e9 + 1), x[j], None, 1))
        for c in range(0, k, 1000):  # pipelined, as the matcher writes a sub-batch's links
            store.record_links(links[c:c + 1000])
    return n_ids


def row(n: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_redis(Path(tmp))
        try:
            store = IdentityStore(url, "bench")
            identities = write_site(store, n, args, args.seed)
            rng = np.random.default_rng(args.seed + 1)
            tids = [t.decode() for t in store.r.zrange("bench:tracklets", 0, -1)]
            picks = [tids[int(i)] for i in rng.integers(0, len(tids), args.queries)]
            brute, want = [], []
            for tid in picks[:args.brute_queries]:
                t = time.perf_counter()
                want.append(rank_identities(store, store.embedding(tid), 10, exclude=[tid]))
                brute.append(time.perf_counter() - t)
            index = SearchIndex(store)
            t = time.perf_counter()
            index.refresh()
            build_s = time.perf_counter() - t
            times, got = [], []
            for tid in picks:
                t = time.perf_counter()
                got.append(index.rank(store.embedding(tid), 10, exclude=[tid]))
                times.append(time.perf_counter() - t)
            pairs = list(zip(got, want))
            recall = np.mean([len({h.global_id for h in a} & {h.global_id for h in b}) / max(len(b), 1)
                              for a, b in pairs])
            top1 = np.mean([bool(a) and bool(b) and a[0].global_id == b[0].global_id for a, b in pairs])
            write_site(store, args.new, args, args.seed + 7, first=n)
            t = time.perf_counter()
            index.rank(store.embedding(picks[0]), 10, exclude=[picks[0]])
            refresh = (time.perf_counter() - t - float(np.median(times))) / args.new
            store.close()
        finally:
            proc.terminate()
            proc.wait(10)
    return {"bench": "search", "tracklets": n, "identities": identities, "dim": args.dim,
            "index": "ivf" if index.index is not None and index.index.approximate else "exact",
            "brute_p50_ms": round(float(np.median(brute)) * 1e3, 1), "index_build_s": round(build_s, 2),
            "index_p50_ms": round(float(np.percentile(times, 50)) * 1e3, 2),
            "index_p99_ms": round(float(np.percentile(times, 99)) * 1e3, 2),
            "refresh_ms_per_link": round(max(refresh, 0.0) * 1e3, 3), "recall_at_10": round(float(recall), 3),
            "same_top1": round(float(top1), 3), "cpus": os.cpu_count(), "machine": platform.machine()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000], help="Stored tracklets.")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--per-identity", type=float, default=4.0, help="Tracklets per identity (mean).")
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--queries", type=int, default=100, help="Index searches (stored tracklets, left out).")
    p.add_argument("--brute-queries", type=int, default=10, help="Of those, also searched by brute force.")
    p.add_argument("--new", type=int, default=200, help="Links written between two index searches.")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not 1 <= args.brute_queries <= args.queries:
        raise SystemExit("error: --brute-queries must be in 1..--queries")
    for n in args.sizes:
        print(json.dumps(row(n, args)), flush=True)


if __name__ == "__main__":
    main()
