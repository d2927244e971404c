"""``bench/storage.py`` runs at a tiny N against its own throwaway Redis and reports sane byte counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import services
from tests.conftest import ROOT


def _bench(*args: str) -> list[dict]:
    try:
        services.redis_binary()
    except services.ServiceError as exc:
        pytest.skip(f"no redis-server: {exc}")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "storage.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_storage_bench_reports_bytes_per_tracklet_and_identity():
    rows = _bench("--n", "50", "--dim", "2560", "--embedding-dtype", "float32")
    storage = [r for r in rows if r["bench"] == "storage"]
    projection = [r for r in rows if r["bench"] == "storage_projection"]
    assert len(storage) == 1 and len(projection) == 1
    row = storage[0]
    assert row["tracklets"] == 50 and 0 < row["identities"] < 50 and row["dim"] == 2560
    assert row["embedding_bytes"] == 2560 * 4 and not row["float16_rewritten"]
    assert all(v > 0 for v in row["breakdown"].values()), row["breakdown"]
    assert row["bytes_per_identity"] > 0 and row["used_memory_bytes"] > 0
    # the tracklet holds its embedding, so it cannot cost less than the raw vector
    assert row["breakdown"]["tracklet_hash"] > row["embedding_bytes"]
    assert row["bytes_per_tracklet"] > row["embedding_bytes"] + row["thumbnail_jpeg_bytes_mean"]
    assert row["tracklet_fields_mean_bytes"]["embedding"] == row["embedding_bytes"]
    # the per-key sums account for what Redis allocated (used_memory also holds keyspace overhead)
    assert 0.5 < row["memory_usage_sum_bytes"] / row["used_memory_bytes"] <= 1.05
    assert projection[0]["tracklets"] == 1_000_000 and projection[0]["gib"] > projection[0]["gib_embeddings_raw"] > 0


def test_storage_bench_float16_halves_the_embedding():
    f32 = next(r for r in _bench("--n", "30", "--dim", "2560", "--embedding-dtype", "float32") if r["bench"] == "storage")
    f16 = next(r for r in _bench("--n", "30", "--dim", "2560", "--embedding-dtype", "float16")
               if r["bench"] == "storage")
    assert f16["embedding_bytes"] == 2560 * 2
    assert f16["tracklet_fields_mean_bytes"]["embedding"] == 2560 * 2 and not f16["float16_rewritten"]
    saved = f32["breakdown"]["tracklet_hash"] - f16["breakdown"]["tracklet_hash"]
    assert saved >= 2560 * 2, (f32["breakdown"], f16["breakdown"])
