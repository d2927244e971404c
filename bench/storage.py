"""Redis storage benchmark: bytes per tracklet and per identity (JSON Lines on stdout).

It starts a throwaway ``redis-server`` on a free loopback port (no AOF, no RDB: the dataset only), and
for each ``N`` in ``--n`` writes ``N`` links through the real :meth:`pipeline.store.IdentityStore.record_link`:
about ``--per-identity`` tracklets per identity spread over ``--cameras`` cameras, a ``--dim``
embedding, ``--crops`` frame indices and ``[x1, y1, x2, y2]`` float boxes (as the tracker gives them,
full ``float`` precision in the JSON), and one JPEG thumbnail per tracklet: a ``256x128`` crop (the
default ``tracklets.crop_height/crop_width``) at JPEG quality 90 of a real person, cut from
``samples/vtest.avi`` at a ground-truth box of ``tests/data/vtest_gt.csv`` (the demo's stored
thumbnails measure 4.8-9.1 KB, median 6.2 KB), else a smooth synthetic image. Then it reads:

* ``MEMORY USAGE key SAMPLES 0`` (exact: every element counted, allocator size classes included) of
  every key, summed per kind: ``tracklet`` (the link hash with the embedding), ``thumb``,
  ``identity`` (hash), ``identity_tracklets`` (the identity's zset), and the shared indexes
  ``{ns}:tracklets``, ``{ns}:tracklets:end``, ``{ns}:identities`` and ``{ns}:camera:*:sightings``,
  divided by their members to give a per-member cost;
* ``used_memory`` from ``INFO memory`` before and after (the whole delta, keyspace dictionaries and
  allocator overhead included).

``bytes_per_tracklet`` = tracklet hash + thumbnail + one member of ``{ns}:tracklets``,
``{ns}:tracklets:end`` and the camera's sightings; ``bytes_per_identity`` = identity hash + its
tracklets zset + one member of ``{ns}:identities``. ``embedding_bytes`` is the raw vector
(``dim x itemsize``), so the figures can be recomputed for another storage dtype.

``--embedding-dtype`` sets ``store.embedding_dtype`` (float16 by default, as the store's default).
Should the stored field not have the expected ``itemsize x dim`` bytes, it is rewritten before
measuring and the row says ``"float16_rewritten": true``.

Each configuration prints one ``"bench": "storage"`` row, and one ``"bench": "storage_projection"`` row
scaling it linearly to ``--project`` tracklets (default 10^6) in GiB.

Usage: ``python bench/storage.py [--n 1000 10000] [--dim 2560] [--embedding-dtype float32|float16]
[--crops 16] [--cameras 3] [--per-identity 3]``
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import services  # noqa: E402
from pipeline.store import IdentityStore, Link  # noqa: E402

SAMPLE_VIDEO = ROOT / "samples" / "vtest.avi"
GROUND_TRUTH = ROOT / "tests" / "data" / "vtest_gt.csv"
GiB = 1024 ** 3


def thumbnails(count: int, height: int, width: int, quality: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEG crops of ``height x width`` at ``quality``, cut and resized like the tracklet cutter
    does: real people (ground-truth boxes of ``tests/data/vtest_gt.csv``) from the sample video, or
    smooth synthetic images when the video or the ground truth is missing."""
    import csv

    import cv2

    rng = np.random.default_rng(seed)
    boxes: dict[int, list[tuple[float, ...]]] = defaultdict(list)
    if SAMPLE_VIDEO.is_file() and GROUND_TRUTH.is_file():
        with open(GROUND_TRUTH, newline="") as fh:
            for row in csv.DictReader(fh):
                boxes[int(row["frame"])].append(tuple(float(row[k]) for k in ("x1", "y1", "x2", "y2")))
    picks = sorted(boxes)[::max(1, len(boxes) // count)] if boxes else []
    crops = []
    if picks:
        cap = cv2.VideoCapture(str(SAMPLE_VIDEO))
        for index in picks:
            if len(crops) >= count:
                break
            cap.set(cv2.CAP_PROP_POS_FRAMES, index)
            ok, frame = cap.read()
            if not ok:
                continue
            for x1, y1, x2, y2 in boxes[index][:2]:
                x1, y1, x2, y2 = max(int(x1), 0), max(int(y1), 0), int(round(x2)), int(round(y2))
                if x2 - x1 >= 2 and y2 - y1 >= 16:
                    crops.append(cv2.resize(frame[y1:y2, x1:x2], (width, height), interpolation=cv2.INTER_LINEAR))
        cap.release()
    while len(crops) < count:
        yy, xx = np.mgrid[0:height, 0:width]
        base = rng.uniform(0, 255, 3)
        crop = np.stack([(base[c] + 40 * np.sin(yy / (7 + c) + xx / 11)) for c in range(3)], -1)
        crops.append(np.clip(crop + rng.normal(0, 6, crop.shape), 0, 255).astype(np.uint8))
    return [cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes() for crop in crops[:count]]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A ``redis-server`` on a free loopback port without persistence; returns the process and URL."""
    port = services.free_port()
    log = open(workdir / "redis.log", "ab")
    proc = subprocess.Popen([str(services.redis_binary()), "--bind", "127.0.0.1", "--port", str(port),
                             "--dir", str(workdir), "--appendonly", "no", "--save", "", "--daemonize", "no"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while not services.redis_ready(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"error: redis-server did not start (see {workdir / 'redis.log'})")
        time.sleep(0.05)
    return proc, url


def write_links(store: IdentityStore, n: int, dim: int, dtype: str, crops: int, cameras: int, per_identity: float,
                thumbs: list[bytes], seed: int = 0) -> tuple[int, float]:
    """Write ``n`` links; returns (identities, seconds)."""
    rng = np.random.default_rng(seed)
    cams = [f"cam{c}" for c in range(cameras)]
    sessions = {cam: f"{int(rng.integers(0, 2 ** 32)):08x}" for cam in cams}
    n_ids = max(1, round(n / per_identity))
    owner = np.sort(rng.integers(0, n_ids, n))  # identity of each tracklet, ~per_identity each
    gids = {}
    summary: dict[str, dict] = {}
    t0 = time.perf_counter()
    for i in range(n):
        cam = cams[int(rng.integers(0, cameras))]
        start = float(np.round(i * 0.7 + rng.uniform(0, 5), 1))
        length = int(rng.integers(crops * 2, crops * 6))
        frames = sorted(int(f) for f in np.linspace(0, length, crops).round() + int(start * 10))
        x, y = rng.uniform(0, 700), rng.uniform(0, 480)
        boxes = []
        for _ in range(crops):  # float32 tracker boxes, written as Python floats (repr of float64)
            x, y = x + float(rng.normal(0, 3)), y + float(rng.normal(0, 2))
            boxes.append([float(np.float32(v)) for v in (x, y, x + rng.uniform(40, 55), y + rng.uniform(85, 100))])
        owner_i = int(owner[i])
        founder = owner_i not in gids
        if founder:
            gids[owner_i] = store.next_global_id()
        gid = gids[owner_i]
        s = summary.setdefault(gid, {"cameras": set(), "first": start, "last": start})
        s["cameras"].add(cam)
        end = start + length / 10
        s["first"], s["last"] = min(s["first"], start), max(s["last"], end)
        vec = rng.normal(size=dim).astype(np.float32)
        vec /= np.linalg.norm(vec)
        link = Link(tracklet_id=f"{cam}-{sessions[cam]}-{i}-{frames[0]}", camera=cam, track_id=i, global_id=gid,
                    score=None if founder else float(rng.uniform(0.2, 0.9)),
                    start_s=start, end_s=end, frames=frames, boxes=boxes, closed_wall_s=time.time(),
                    linked_wall_s=time.time())
        store.record_link(link, vec.astype(dtype), s["cameras"], s["first"], s["last"], thumbs[i % len(thumbs)],
                          quality=length)
    return len(gids), time.perf_counter() - t0


def memory_usage(r, keys: list[bytes]) -> list[int]:
    with r.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
        return [int(v or 0) for v in pipe.execute()]


def measure(store: IdentityStore) -> dict:
    """Sum of ``MEMORY USAGE`` per key kind and members of each, plus encodings and field sizes."""
    r, ns = store.r, store.ns
    kinds: dict[str, list[bytes]] = defaultdict(list)
    for key in r.scan_iter(match=f"{ns}:*", count=1000):
        parts = key.decode().split(":")[1:]
        if parts[0] == "tracklet":
            kinds["tracklet"].append(key)
        elif parts[0] == "thumb":
            kinds["thumb"].append(key)
        elif parts[0] == "identity" and len(parts) == 2:
            kinds["identity"].append(key)
        elif parts[0] == "identity" and parts[-1] == "tracklets":
            kinds["identity_tracklets"].append(key)
        elif parts == ["tracklets"]:
            kinds["tracklets_index"].append(key)
        elif parts == ["tracklets", "end"]:
            kinds["tracklets_end_index"].append(key)
        elif parts == ["identities"]:
            kinds["identities_index"].append(key)
        elif parts[0] == "camera" and parts[-1] == "sightings":
            kinds["camera_sightings"].append(key)
        else:
            kinds["other"].append(key)
    out = {}
    for kind, keys in sorted(kinds.items()):
        sizes = memory_usage(r, keys)
        with r.pipeline(transaction=False) as pipe:
            for key in keys[:1]:
                pipe.object("encoding", key)
            encoding = pipe.execute()[0]
        members = None
        if kind.endswith("_index") or kind in ("camera_sightings", "identity_tracklets"):
            with r.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zcard(key)
                members = int(sum(pipe.execute()))
        out[kind] = {"keys": len(keys), "bytes": int(sum(sizes)), "members": members,
                     "encoding": encoding.decode() if isinstance(encoding, bytes) else encoding}
    # what the tracklet hash holds, field by field (raw value lengths, mean over a sample)
    sample = kinds["tracklet"][:200]
    fields: dict[str, list[int]] = defaultdict(list)
    with r.pipeline(transaction=False) as pipe:
        for key in sample:
            pipe.hgetall(key)
        for h in pipe.execute():
            for f, v in h.items():
                fields[f.decode()].append(len(v))
    out["tracklet_fields_mean_bytes"] = {f: round(float(np.mean(v)), 1) for f, v in sorted(fields.items())}
    return out


def rewrite_embeddings(store: IdentityStore, dtype: str) -> None:
    """Replace each stored ``embedding`` field by its ``dtype`` bytes (measures a storage the store lacks)."""
    keys = list(store.r.scan_iter(match=f"{store.ns}:tracklet:*", count=1000))
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        with store.r.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.hget(key, "embedding")
            raws = pipe.execute()
        with store.r.pipeline(transaction=False) as pipe:
            for key, raw in zip(chunk, raws):
                pipe.hset(key, "embedding", np.frombuffer(raw, "<f4").astype(np.dtype(dtype).newbyteorder("<")).tobytes())
            pipe.execute()


def used_memory(r) -> int:
    return int(r.info("memory")["used_memory"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000], help="Tracklets per configuration.")
    ap.add_argument("--dim", type=int, default=2560, help="Embedding dimension (part_pool default: 5120; STA: 1024).")
    ap.add_argument("--embedding-dtype", choices=("float32", "float16"), default="float16",
                    help="store.embedding_dtype (default float16, as the store's default).")
    ap.add_argument("--crops", type=int, default=16, help="Frames and boxes per tracklet (demo: 8).")
    ap.add_argument("--cameras", type=int, default=3)
    ap.add_argument("--per-identity", type=float, default=3.0, help="Tracklets per identity, on average.")
    ap.add_argument("--thumb-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    ap.add_argument("--thumb-quality", type=int, default=90)
    ap.add_argument("--project", type=int, default=1_000_000, help="Tracklets of the projection row.")
    args = ap.parse_args()

    thumbs = thumbnails(64, *args.thumb_size, args.thumb_quality)
    itemsize = np.dtype(args.embedding_dtype).itemsize
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        proc, url = start_redis(Path(tmp))
        try:
            for n in args.n:
                store = IdentityStore(url, namespace="bench", embedding_dtype=args.embedding_dtype)
                store.r.flushall(asynchronous=False)
                before = used_memory(store.r)
                ids, seconds = write_links(store, n, args.dim, args.embedding_dtype, args.crops, args.cameras,
                                           args.per_identity, thumbs)
                stored = len(store.r.hget(next(store.r.scan_iter(match="bench:tracklet:*")), "embedding"))
                rewritten = stored != args.dim * itemsize
                if rewritten:
                    rewrite_embeddings(store, args.embedding_dtype)
                after = used_memory(store.r)
                m = measure(store)

                def per_member(kind: str) -> float:
                    k = m.get(kind)
                    return k["bytes"] / k["members"] if k and k["members"] else 0.0

                def per_key(kind: str) -> float:
                    k = m.get(kind)
                    return k["bytes"] / k["keys"] if k and k["keys"] else 0.0

                breakdown = {
                    "tracklet_hash": round(per_key("tracklet")), "thumbnail": round(per_key("thumb")),
                    "tracklets_index_member": round(per_member("tracklets_index")),
                    "tracklets_end_index_member": round(per_member("tracklets_end_index")),
                    "camera_sightings_member": round(per_member("camera_sightings")),
                    "identity_hash": round(per_key("identity")),
                    "identity_tracklets_zset": round(per_key("identity_tracklets")),
                    "identities_index_member": round(per_member("identities_index")),
                }
                bpt = (per_key("tracklet") + per_key("thumb") + per_member("tracklets_index")
                       + per_member("tracklets_end_index") + per_member("camera_sightings"))
                bpi = per_key("identity") + per_key("identity_tracklets") + per_member("identities_index")
                sum_keys = sum(v["bytes"] for k, v in m.items() if isinstance(v, dict) and "bytes" in v)
                row = {"bench": "storage", "tracklets": n, "identities": ids, "cameras": args.cameras, "dim": args.dim,
                       "embedding_dtype": args.embedding_dtype, "float16_rewritten": rewritten,
                       "embedding_bytes": args.dim * itemsize, "crops": args.crops,
                       "thumbnail_jpeg_bytes_mean": round(float(np.mean([len(t) for t in thumbs]))),
                       "bytes_per_tracklet": round(bpt), "bytes_per_tracklet_without_thumbnail":
                           round(bpt - per_key("thumb")),
                       "bytes_per_identity": round(bpi), "breakdown": breakdown,
                       "tracklet_fields_mean_bytes": m["tracklet_fields_mean_bytes"],
                       "encodings": {k: v["encoding"] for k, v in m.items() if isinstance(v, dict) and "encoding" in v},
                       "memory_usage_sum_bytes": sum_keys, "used_memory_bytes": after - before,
                       "used_memory_per_tracklet": round((after - before) / n),
                       "write_links_per_s": round(n / seconds), "machine": platform.machine()}
                print(json.dumps(row), flush=True)
                scale = args.project / n
                print(json.dumps({
                    "bench": "storage_projection", "from_tracklets": n, "tracklets": args.project,
                    "identities": round(ids * scale), "dim": args.dim, "embedding_dtype": args.embedding_dtype,
                    "gib": round((bpt * args.project + bpi * ids * scale) / GiB, 2),
                    "gib_without_thumbnails": round(((bpt - per_key("thumb")) * args.project + bpi * ids * scale) / GiB, 2),
                    "gib_used_memory": round((after - before) * scale / GiB, 2),
                    "gib_embeddings_raw": round(args.dim * itemsize * args.project / GiB, 2)}), flush=True)
                store.close()
        finally:
            services.terminate(proc.pid)


if __name__ == "__main__":
    main()
