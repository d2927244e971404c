"""Matcher at city scale: online decisions over large galleries, brute force vs the IVF index.

Prints JSON Lines on stdout, one row per configuration::

    {"bench": "matcher", "gallery": N, "dim": D, "index": "brute"|"ivf+hot…"|"gpu:<device>", "p50_ms", "p99_ms",
     "embeddings_per_s", "recall_at_10", "same_decision", ...}

and with ``--rebuild`` one ``"bench": "rebuild"`` row per gallery size: the time a restarted (or
newly assigned) matcher needs to load the stored prototypes from a real Redis and build its gallery
and index. With ``--instances K`` one ``"bench": "matcher_instances"`` row per configuration: ``K``
matcher processes side by side, each pinned to its own core with ``search_threads`` 0 and its own
gallery of ``N`` identities (as zones spread a site over several matchers), and their combined
``embeddings_per_s`` (``--only-instances``: only these rows; with ``--redis``, each runs ``process()``
writing every link to one shared Redis).

What is measured (pure matcher, no Redis, as in the issue's figures):

* ``p50_ms`` / ``p99_ms``: one :meth:`CrossCameraMatcher.decide` (projection into the scoring space,
  index search, the association rules on the candidates);
* ``embeddings_per_s``: the batch path of :meth:`CrossCameraMatcher.process` without Redis writes
  (with ``--passes P``, the index rows' median over ``P`` passes of ``--queries`` records, each pass
  the returns of other identities, a later sighting than the pass before, each pass's rate in
  ``embeddings_per_s_passes``; a pass of 3,000 records lasts about half a second at 10⁶, and
  passes differ by ±10 %; brute force runs one pass) —
  polled batches of ``--batch`` (1024, ``matcher.max_batch``), one index search per sub-batch of
  ``--search-batch`` (256, ``matcher.index.batch``) shared by ``--search-threads`` threads (one per
  core but one, ``matcher.index.search_threads``), the next sub-batch searched while one is decided; each record
  decided (identities changed since its search are scored exactly) and added to the gallery
  (prototypes, mean, index update);
* ``recall_at_10``: share of the exact top-10 identities (by mean-prototype score) the index returns
  in its top 10; ``same_decision``: share of tracklets the index path sends to the same identity as
  brute force; ``memory_bytes_per_identity``: resident memory the process grew by while loading the
  gallery (identities, prototypes, index), per identity.

The loaded gallery is frozen out of Python's cyclic garbage collector (``gc.freeze()``), as
:meth:`CrossCameraMatcher.setup` does with a restored one.

The index rows use the matcher's hot tier (``index.hot_s`` 3600 s, at most ``index.hot_max`` 4,096
identities; the gallery spans a day, so at 10⁶ about 42,000 identities are within the hour and
the cap applies); ``--hot-s 0`` measures the IVF alone, the worst case for recall. ``--index gpu``
measures the device copy of ``index.kind`` ``gpu`` instead (brute force on ``--device``, float16 on
CUDA, the best ``--fetch`` re-scored exactly on the CPU, no hot tier); ``--device cpu`` runs that path
without a GPU, for small galleries only.

Synthetic data: ``N`` identities with one prototype each, spread over ``--cameras`` cameras and a
day of stream time; embeddings are drawn with a power-law eigen-spectrum ``λ_i ∝ i^-α`` (``--alpha``,
default 1.0: the centred embeddings of the vtest tracklets decay with α = 0.93 (STA) to 1.15 (part
pooling) over their first 60 directions). The scoring space (centre + PCA to 256) is fitted on a
sample of 10,000. A query is a new tracklet of a random gallery identity (cosine ≈ 0.8 to it in the
embedding space) on another camera, after the gallery's last sighting. With ``--recent F`` a share
``F`` of the queries are returns of identities last seen within ``--recent-s`` (600 s) of the
gallery's end, the hot tier's case (most people come back soon), and the index row splits
``same_decision`` into ``same_decision_recent`` and ``same_decision_older``.

Usage::

    python bench/matcher.py                        # N = 1e3..1e6, D = 256 and 2560
    python bench/matcher.py --sizes 1000 100000 --dims 256 --rebuild
    python bench/matcher.py --sizes 1000000 --dims 256 --instances 2 --only-instances
    python bench/matcher.py --sizes 1000000 --dims 256 --queries 3000 --passes 5   # median of 5 passes
    python bench/matcher.py --sizes 1000000 --dims 256 --hot-s 0   # no hot tier
    python bench/matcher.py --sizes 1000000 --dims 256 --recent 0.5   # half the queries recent returns
    python bench/matcher.py --sizes 1000000 --dims 256 2560 --index gpu   # brute force on a CUDA device
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import MatcherConfig  # noqa: E402
from stages.matcher.association import Rules, ScoringSpace  # noqa: E402
from stages.matcher.gallery import Member  # noqa: E402
from stages.matcher.index import IndexSettings  # noqa: E402
from stages.matcher.matcher import CrossCameraMatcher, collector_paused, search_threads  # noqa: E402

DAY_S = 86400.0


def _spectrum(dim: int, alpha: float) -> np.ndarray:
    return (np.arange(1, dim + 1, dtype=np.float64) ** (-alpha / 2)).astype(np.float32)


def _draw(rng: np.random.Generator, n: int, sd: np.ndarray) -> np.ndarray:
    x = rng.standard_normal((n, len(sd)), dtype=np.float32) * sd
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(n: int, dim: int, args: argparse.Namespace, settings: IndexSettings) -> tuple[CrossCameraMatcher, dict]:
    """A matcher whose gallery holds ``n`` synthetic identities (no store: :meth:`decide` needs none)."""
    gc.unfreeze()  # the previous configuration's gallery (frozen below) is garbage now
    gc.collect()
    rng = np.random.default_rng(args.seed)
    sd = _spectrum(dim, args.alpha)
    sample = _draw(rng, min(n, 10000), sd)
    space = ScoringSpace.fit(sample, 256 if dim > 256 else None) if n >= 512 else ScoringSpace.fit(sample, None)
    rules = Rules(transit_weight=0.0)
    m = CrossCameraMatcher(store=None, threshold=args.threshold, rules=rules, index=settings)  # type: ignore[arg-type]
    m.space = space
    cams = [f"cam{i}" for i in range(args.cameras)]
    rss0 = _rss_bytes()
    t = time.perf_counter()
    truth = {"id": rng.integers(0, n, args.queries)}
    # --recent: a share of the queries are returns of identities last seen within --recent-s of the
    # gallery's end (their sightings are moved there; a generator of its own, so that without
    # --recent the gallery is the same as ever)
    pick = np.random.default_rng(args.seed + 1)
    recent_ids = {int(i) for i in truth["id"][pick.random(args.queries) < args.recent]}
    truth["recent"] = np.isin(truth["id"], list(recent_ids))  # an identity queried twice is recent for both
    # --passes P: the throughput passes after the first return other identities (as far as the gallery
    # has them), drawn by a generator of their own so that the gallery and the first pass stay as ever
    extra = np.random.default_rng(args.seed + 2)
    more = args.queries * (args.passes - 1)
    later_ids = extra.choice(n, more, replace=more > n) if more else np.zeros(0, np.int64)
    every_id = np.concatenate([truth["id"], later_ids])  # every pass's identities, the first pass's first
    every_x = np.zeros((len(every_id), dim), np.float32)  # their gallery embeddings, filled while drawn
    wanted: dict[int, list[int]] = {}  # identity -> the queries of it
    for j, i in enumerate(every_id.tolist()):
        wanted.setdefault(i, []).append(j)
    chunk = 50000
    loading = m.gallery.bulk(space.dim)
    loading.__enter__()
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        x = _draw(rng, k, sd)
        y = space.project(x)
        starts = rng.uniform(0, DAY_S, k)
        for i in recent_ids.intersection(range(s, s + k)):
            starts[i - s] = DAY_S - pick.uniform(8.0, args.recent_s)
        groups = {}
        for i in range(k):
            gid = f"G{s + i:07d}"
            groups[gid] = [Member(f"t{s + i}", cams[(s + i) % len(cams)], float(starts[i]), float(starts[i]) + 8.0, 10,
                                  y[i], s + i)]
            for j in wanted.get(s + i, ()):
                every_x[j] = x[i]
        m.gallery.replace(groups)
    loading.__exit__(None, None, None)  # one IVF training over the whole gallery
    gc.freeze()  # as CrossCameraMatcher.setup() does with a restored gallery: no full collection walks it
    m._dim = dim
    m._newest_end = DAY_S + 8
    build_s = time.perf_counter() - t
    grown = _rss_bytes() - rss0  # the gallery and its index (the query arrays are small)
    # queries: a new tracklet of a gallery identity, cosine about 0.8 to it
    noise = _draw(rng, args.queries, sd)
    q = 0.8 * every_x[:args.queries] + 0.6 * noise
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    passes = [(q, truth["id"])]
    for r in range(1, args.passes):
        part = slice(r * args.queries, (r + 1) * args.queries)
        qr = 0.8 * every_x[part] + 0.6 * _draw(extra, args.queries, sd)
        passes.append((qr / np.linalg.norm(qr, axis=1, keepdims=True), every_id[part]))
    return m, {"queries": q, "truth": truth["id"], "recent": truth["recent"], "build_s": build_s, "cams": cams,
               "gallery_bytes": grown, "passes": passes}


def _rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


@dataclasses.dataclass(frozen=True)
class _Query:
    """What the matcher reads of an embedding record."""

    tracklet_id: str
    camera: str
    start_s: float
    end_s: float
    vector: np.ndarray


def _records(q: np.ndarray, cams: list[str], ids: np.ndarray, offset: int, shift_s: float = 0.0) -> list[_Query]:
    return [_Query(f"q{offset + i}", cams[(int(ids[i]) + 1) % len(cams)], DAY_S + 100.0 + shift_s + i,
                   DAY_S + 108.0 + shift_s + i, v.astype(np.float32)) for i, v in enumerate(q)]


def _round_shift_s(data: dict, r: int) -> float:
    """Seconds by which pass ``r`` over the queries comes after the first. Each pass must be a new
    sighting of its people: a copy with the same camera and span as one already linked is blocked by
    the cannot-link rule (same camera, overlapping in time), which would send every decision of a
    second pass down the widening search, a path a deployment seldom takes."""
    return r * (len(data["queries"]) + 10.0)


def _throughput(m: CrossCameraMatcher, data: dict, args: argparse.Namespace, offset: int,
                shift_s: float = 0.0, part: int = 0) -> tuple[int, float]:
    """The batch path of ``process()`` without Redis over copies of the queries of pass ``part``
    (``data["passes"]``; 0: the queries the latencies are measured on) with tracklet ids from
    ``offset`` and spans ``shift_s`` later; the gallery grows by them: ``(records decided, seconds)``."""
    (q, ids), cams = data["passes"][part], data["cams"]
    t = time.perf_counter()
    done = 0
    with m.online():  # as process() does: numpy's BLAS on one thread while faiss searches
        for s in range(0, len(q), args.batch):
            batch = _records(q[s:s + args.batch], cams, ids[s:s + args.batch], offset + s, shift_s)
            ys = m._project_batch([r.vector for r in batch])  # as process() does
            with contextlib.closing(m._candidate_batches(ys)) as parts:  # as process() does
                for rows, pre, touched in parts:
                    for i, p in zip(rows, pre):
                        r, y = batch[i], ys[i]
                        d = m._decide(r.camera, r.start_s, r.end_s, y, p, touched)
                        gid = d.global_id or f"N{r.tracklet_id}"
                        m._arrival += 1
                        m.gallery.add(gid, Member(r.tracklet_id, r.camera, r.start_s, r.end_s, 10, y, m._arrival))
                        touched.append(m.gallery.code(gid))
                        done += 1
    return done, time.perf_counter() - t


def measure(m: CrossCameraMatcher, data: dict, args: argparse.Namespace, exact: bool) -> dict:
    idx = m.gallery.index
    saved = idx.suspend() if exact else None
    try:
        q, cams, ids = data["queries"], data["cams"], data["truth"]
        recs = _records(q, cams, ids, 0)
        times, decisions = [], []
        for r in recs:
            t = time.perf_counter()
            d = m.decide(r.camera, r.start_s, r.end_s, r.vector)
            times.append((time.perf_counter() - t) * 1e3)
            decisions.append(d.global_id)
        z = np.stack([m._transform(r.vector) for r in recs])
        # in chunks: brute force over 10^6 identities holds a [queries, N] float32 score matrix
        found = np.concatenate([m.gallery.search(z[s:s + 256], 10)[1] for s in range(0, len(z), 256)])
        exact_top = np.concatenate([m.gallery.index.exact_search(z[s:s + 256], 10)[1]
                                    for s in range(0, len(z), 256)])
        # throughput: the batch path without Redis, one pass over each slice of queries (the first: copies
        # of the queries above; each pass a later sighting; the gallery grows by them), the median rate
        rates = []
        for r in range(1 if exact else len(data["passes"])):  # brute force: one pass, the reference
            done, seconds = _throughput(m, data, args, 10 ** 7 * (r + 1), _round_shift_s(data, r), part=r)
            rates.append(done / seconds)
        return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
                "embeddings_per_s": round(float(np.median(rates)), 1),
                "embeddings_per_s_passes": [round(v, 1) for v in rates],
                "decisions": decisions, "top10": found, "exact10": exact_top}
    finally:
        if exact:
            idx.resume(saved)


@contextlib.contextmanager
def _throwaway_redis():
    """A ``redis-server`` on a Unix socket in a temporary directory, without persistence: its URL."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "redis.sock")
        proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no",
                                 "--dir", tmp], stdout=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            yield f"unix://{sock}"
        finally:
            proc.terminate()
            proc.wait(10)


def _embedding_records(data: dict, prefix: str, shift_s: float = 0.0) -> list:
    """The queries as the embedding records ``process()`` reads (tracklet ids ``{prefix}{i}``, spans
    ``shift_s`` later)."""
    from pipeline.messages import EmbeddingRecord, TrackletMeta

    recs = []
    for i, v in enumerate(data["queries"]):
        cam = data["cams"][(int(data["truth"][i]) + 1) % len(data["cams"])]
        start = DAY_S + 1000.0 + shift_s + i
        meta = TrackletMeta(tracklet_id=f"{prefix}{i}", camera=cam, track_id=i, frames=[0, 80],
                            timestamps_s=[start, start + 8.0], boxes=[[0, 0, 40, 90], [1, 0, 41, 90]],
                            start_s=start, end_s=start + 8.0, observed_frames=10, closed_wall_s=time.time(),
                            close_reason="lost")
        recs.append(EmbeddingRecord.from_tracklet(meta, v.astype(np.float32), "bench", b"\xff\xd8", 0.0))
    return recs


def _processed(m: CrossCameraMatcher, recs: list, batch: int) -> tuple[int, float]:
    """``process()`` over ``recs`` in polled batches of ``batch``: ``(records, seconds)``."""
    t = time.perf_counter()
    for s in range(0, len(recs), batch):
        m.process(recs[s:s + batch])
    return len(recs), time.perf_counter() - t


def redis_row(m: CrossCameraMatcher, data: dict, n: int, dim: int, args: argparse.Namespace) -> dict:
    """Throughput of :meth:`CrossCameraMatcher.process` itself, writing every link to a real Redis
    (a throwaway one on a Unix socket): the queries as embedding records, in polled batches."""
    import redis

    from pipeline.store import IdentityStore

    try:
        with _throwaway_redis() as url:
            m.store = IdentityStore(url, "bench")
            m.reassociation = None
            recs = _embedding_records(data, "r")
            warm = min(args.batch, len(recs) // 4)
            m.process(recs[:warm])  # connections, scripts, the search threads
            done, seconds = _processed(m, recs[warm:], args.batch)
            per_s = done / seconds
            m.store.close()
    except (OSError, redis.RedisError) as exc:
        return {"bench": "matcher_redis", "gallery": n, "dim": dim, "error": str(exc)}
    return {"bench": "matcher_redis", "gallery": n, "dim": dim, "batch": args.batch, "search_batch": args.search_batch,
            "search_threads": search_threads(args.search_threads), "embeddings_per_s": round(per_s, 1)}


def rebuild_row(m: CrossCameraMatcher, n: int, dim: int, args: argparse.Namespace) -> dict:
    """Store the gallery's prototypes in a throwaway Redis and time a fresh matcher's restore."""
    import redis

    from pipeline.store import IdentityStore

    with _throwaway_redis() as url:
        try:
            store = IdentityStore(url, "bench")
            gids = m.gallery.gids()
            for s in range(0, len(gids), 10000):
                part = gids[s:s + 10000]
                store.save_prototypes({g: m.gallery.prototypes(g) for g in part}, 0)
                store.r.zadd("bench:identities", {g: 0.0 for g in part})
            used = int(store.r.info("memory")["used_memory"])
            fresh = CrossCameraMatcher(store, rules=Rules(transit_weight=0.0), index=IndexSettings())  # kind auto
            fresh.space = m.space
            t = time.perf_counter()
            with collector_paused():  # as CrossCameraMatcher.setup() restores
                loaded = store.load_prototypes()
                t_load = time.perf_counter() - t
                with fresh.gallery.bulk(m.gallery.dim):
                    fresh.gallery.replace({g: protos for g, (_, protos) in loaded.items()})
            seconds = time.perf_counter() - t
            store.close()
            return {"bench": "rebuild", "gallery": n, "dim": dim, "identities_loaded": len(fresh.gallery),
                    "load_s": round(t_load, 2), "rebuild_s": round(seconds, 2),
                    "index": "ivf" if fresh.gallery.index.approximate else "exact",
                    "redis_bytes_per_identity": round(used / max(n, 1), 1)}
        except (OSError, redis.RedisError) as exc:
            return {"bench": "rebuild", "gallery": n, "dim": dim, "error": str(exc)}


def _instance(i: int, core: int | None, n: int, dim: int, args: argparse.Namespace, settings: IndexSettings,
              redis_url: str | None, ready, go, out) -> None:
    """One matcher process of :func:`instances_row`: its own core (when pinned) and gallery; with
    ``redis_url``, ``process()`` writing every link there (namespace ``bench{i}``, as one zone)."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    m, data = build(n, dim, argparse.Namespace(**{**vars(args), "seed": args.seed + i}), settings)
    rounds = []
    if redis_url is not None:
        from pipeline.store import IdentityStore

        m.store = IdentityStore(redis_url, f"bench{i}")
        m.reassociation = None
        rounds = [_embedding_records(data, f"i{i}r{r}-", _round_shift_s(data, r)) for r in range(args.rounds)]
        warm = _embedding_records(data, f"i{i}warm-", _round_shift_s(data, args.rounds))  # after every pass
        m.process(warm[:min(args.batch, len(data["queries"]) // 4)])
    ready.put(i)
    go.wait()
    start = time.time()
    done = 0
    for r in range(args.rounds):
        shift = _round_shift_s(data, r)
        d, _ = _processed(m, rounds[r], args.batch) if rounds else _throughput(m, data, args, 10 ** 7 * (r + 1), shift)
        done += d
    end = time.time()
    written = len(m.store.linked_among(rec.tracklet_id for recs in rounds for rec in recs)) if rounds else None
    out.put({"instance": i, "start": start, "end": end, "done": done, "written": written})


def instances_row(n: int, dim: int, args: argparse.Namespace) -> dict:
    """``--instances K`` matcher processes side by side, as zones spread a site over several matchers:
    each on its own core (round robin over the cores this process may use), with its own gallery of
    ``n`` identities and ``search_threads`` 0 (one core: it searches each sub-batch itself). They build
    their galleries, start together, and each runs the batch path over its queries ``--rounds`` times;
    the row's ``embeddings_per_s`` is all their records over the span from the first start to the
    last end. Separate processes share no interpreter lock, which the threads of one matcher do.
    With ``--redis``, each instance runs ``process()`` and writes every link to one shared throwaway
    Redis (one namespace per instance, as zones), which runs beside them on the same cores."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    settings = _settings(args, threads=1, search_threads=0)
    with _throwaway_redis() if args.redis else contextlib.nullcontext() as url:
        return _run_instances(ctx, cores, n, dim, args, settings, url)


def _run_instances(ctx, cores: list[int], n: int, dim: int, args: argparse.Namespace, settings: IndexSettings,
                   redis_url: str | None) -> dict:
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved})  # each instance is one core: no thread pool of its own
    try:
        procs = [ctx.Process(target=_instance, args=(i, cores[i % len(cores)] if cores else None, n, dim,
                                                     args, settings, redis_url, ready, go, out))
                 for i in range(args.instances)]
        for proc in procs:
            proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def collect(q) -> list:  # one message per instance, or an error as soon as one died without it
        import queue

        got: list = []
        while len(got) < len(procs):
            try:
                got.append(q.get(timeout=5))
            except queue.Empty:
                dead = [i for i, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
                if dead:
                    for proc in procs:
                        proc.terminate()
                    raise SystemExit(f"matcher instance(s) {dead} failed (exit codes "
                                     f"{[procs[i].exitcode for i in dead]}); see their stderr above")
        return got

    collect(ready)
    go.set()
    rows = sorted(collect(out), key=lambda r: r["instance"])
    for proc in procs:
        proc.join()
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    done = sum(r["done"] for r in rows)
    gpu = settings.kind == "gpu"
    return {"bench": "matcher_instances", "gallery": n, "dim": dim, "index": f"gpu:{settings.device}" if gpu else "ivf",
            "instances": args.instances, "gallery_per_instance": n, "search_threads": 0, "redis": redis_url is not None,
            "hot_s": None if gpu else settings.hot_s, "hot_max": None if gpu else settings.hot_max,
            "cpus": len(cores) or os.cpu_count(),
            "embeddings_per_s": round(done / span, 1),
            "per_instance_per_s": [round(r["done"] / (r["end"] - r["start"]), 1) for r in rows],
            "records": done, "seconds": round(span, 2),
            **({"links_in_redis": sum(r["written"] for r in rows)} if redis_url is not None else {})}


def parser() -> argparse.ArgumentParser:
    """The bench's command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    p.add_argument("--dims", type=int, nargs="+", default=[256, 2560])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--passes", type=int, default=1,
                   help="Throughput passes of --queries records each (the first over the latency queries, the "
                   "others over other identities' returns); embeddings_per_s is their median.")
    p.add_argument("--cameras", type=int, default=16)
    p.add_argument("--alpha", type=float, default=1.0, help="Eigen-spectrum decay of the synthetic embeddings.")
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--index", choices=["ivf", "gpu"], default="ivf",
                   help="The index rows' search: the IVF with its hot tier, or brute force on --device (index.kind gpu).")
    p.add_argument("--device", default=IndexSettings().device, help="The torch device of --index gpu (cpu: no GPU).")
    p.add_argument("--nprobe", type=int, default=IndexSettings().nprobe)
    p.add_argument("--candidates", type=int, default=IndexSettings().candidates)
    p.add_argument("--fetch", type=int, default=IndexSettings().fetch, help="IVF codes re-ranked per query (index.fetch).")
    p.add_argument("--code-dim", type=int, default=IndexSettings().code_dim, help="Dimensions the IVF codes keep.")
    p.add_argument("--batch", type=int, default=MatcherConfig().max_batch,
                   help="Records per polled batch (matcher.max_batch).")
    p.add_argument("--search-batch", type=int, default=IndexSettings().batch,
                   help="Records per index search (matcher.index.batch); --search-batch equal to --batch: no "
                   "background search.")
    p.add_argument("--hot-s", type=float, default=IndexSettings().hot_s,
                   help="Also search exactly the identities seen within this many seconds (index.hot_s, default "
                   "as the matcher's; the gallery spans a day). 0: the IVF alone, the worst case for recall.")
    p.add_argument("--hot-max", type=int, default=IndexSettings().hot_max,
                   help="At most this many hot identities, the most recently seen (index.hot_max).")
    p.add_argument("--recent", type=float, default=0.0,
                   help="Share of the queries that are returns of identities last seen within --recent-s of the "
                   "gallery's end (the rest: of random identities over the day); the index row then also gives "
                   "same_decision_recent and same_decision_older.")
    p.add_argument("--recent-s", type=float, default=600.0,
                   help="How recently a --recent query's identity was last seen, at most (seconds; drawn uniformly).")
    p.add_argument("--threads", type=int, default=None, help="faiss threads of single searches (default: all cores).")
    p.add_argument("--search-threads", type=int, default=IndexSettings().search_threads,
                   help="Threads that search a sub-batch on the batch path (matcher.index.search_threads; "
                   "default: one per core but the one the decisions run on).")
    p.add_argument("--rebuild", action="store_true", help="Also time a restore of the gallery from Redis.")
    p.add_argument("--redis", action="store_true",
                   help="Also time process() writing every link to a real Redis (one \"matcher_redis\" row).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instances", type=int, default=0,
                   help="Also run this many matcher processes side by side, one core and one gallery of N "
                   "identities each (zones), and print their combined throughput (a \"matcher_instances\" row); "
                   "with --only-instances, nothing else.")
    p.add_argument("--only-instances", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="Passes over the queries per instance (--instances).")
    return p


def _settings(args: argparse.Namespace, threads: int | None, search_threads: int | None) -> IndexSettings:
    """The index rows' settings: the IVF (``--index ivf``) or the device copy (``--index gpu``, built
    from the first identity on, as the IVF is with ``kind`` ``ivf``)."""
    if args.index == "gpu":
        return IndexSettings(kind="gpu", device=args.device, exact_below=1, candidates=args.candidates,
                             fetch=args.fetch, threads=threads, batch=args.search_batch, search_threads=search_threads)
    return IndexSettings(kind="ivf", nprobe=args.nprobe, candidates=args.candidates, fetch=args.fetch,
                         code_dim=args.code_dim, threads=threads, hot_s=args.hot_s, hot_max=args.hot_max,
                         batch=args.search_batch, search_threads=search_threads)


def main() -> None:
    args = parser().parse_args()
    args.hot_s = args.hot_s or None  # 0: no hot tier
    if args.passes < 1:
        raise SystemExit(f"bench/matcher.py: --passes must be at least 1, not {args.passes}")
    if args.index == "gpu":
        from stages.matcher.index import DeviceUnavailable, check_device

        try:
            args.device = check_device(args.device)
        except DeviceUnavailable as exc:
            raise SystemExit(f"bench/matcher.py: {exc}") from None
    for dim in args.dims:
        for n in args.sizes:
            if args.instances:
                print(json.dumps(instances_row(n, dim, args)), flush=True)
            if args.only_instances:
                continue
            settings = _settings(args, threads=args.threads, search_threads=args.search_threads)
            m, data = build(n, dim, args, settings)
            brute = measure(m, data, args, exact=True)
            del m, data
            m2, data2 = build(n, dim, args, settings)  # a fresh gallery: the throughput run added to the first
            ivf = measure(m2, data2, args, exact=False)
            recall = float(np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / 10
                                    for a, b in zip(ivf["top10"], ivf["exact10"])]))
            agree = np.array([a == b for a, b in zip(brute["decisions"], ivf["decisions"])])
            same = float(agree.mean())
            recent = data2["recent"]
            split = {} if not args.recent else {
                "recent": args.recent, "recent_s": args.recent_s,
                "same_decision_recent": round(float(agree[recent].mean()), 4) if recent.any() else None,
                "same_decision_older": round(float(agree[~recent].mean()), 4) if (~recent).any() else None}
            common = {"bench": "matcher", "gallery": n, "dim": dim, "scoring_dim": m2.gallery.dim,
                      "cpus": os.cpu_count(), "machine": platform.machine()}
            gpu = args.index == "gpu"
            label = f"gpu:{args.device}" if gpu else "ivf" if args.hot_s is None else f"ivf+hot{args.hot_s:g}s/{args.hot_max}"
            for name, row, extra in (("brute", brute, {"recall_at_10": 1.0, "same_decision": 1.0}),
                                     (label, ivf, {"recall_at_10": round(recall, 4), "same_decision": round(same, 4),
                                                   "hot_s": None if gpu else args.hot_s,
                                                   "hot_max": None if gpu else args.hot_max,
                                                   "nprobe": None if gpu else args.nprobe, "fetch": args.fetch,
                                                   "code_dim": None if gpu else args.code_dim, "batch": args.batch,
                                                   "search_batch": args.search_batch,
                                                   "search_threads": search_threads(args.search_threads),
                                                   "build_s": round(data2["build_s"], 1),
                                                   "memory_bytes_per_identity": round(data2["gallery_bytes"] / n),
                                                   **split})):
                print(json.dumps({**common, "index": name, "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"],
                                  "embeddings_per_s": row["embeddings_per_s"],
                                  "embeddings_per_s_passes": row["embeddings_per_s_passes"], **extra}), flush=True)
            if args.rebuild:
                print(json.dumps(rebuild_row(m2, n, dim, args)), flush=True)
            if args.redis:
                print(json.dumps(redis_row(m2, data2, n, dim, args)), flush=True)
            del m2


if __name__ == "__main__":
    main()
