"""The benches that need a Redis (``bench/search.py``, ``bench/matcher.py --redis``) run at a small N
against their own throwaway one and print their JSON rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import services
from pipeline.config import MatcherConfig
from stages.matcher.matcher import search_threads
from tests.conftest import ROOT


def _bench(script: str, *args: str) -> list[dict]:
    """Run ``bench/{script}`` (skipped without a redis-server) and return its JSON rows."""
    try:
        services.redis_binary()
    except services.ServiceError as exc:
        pytest.skip(f"no redis-server: {exc}")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_search_bench_compares_the_index_with_brute_force():
    rows = _bench("search.py", "--sizes", "2000", "--queries", "12", "--brute-queries", "4", "--new", "20",
                  "--dim", "32")
    assert len(rows) == 1
    r = rows[0]
    assert (r["bench"], r["tracklets"], r["dim"], r["index"]) == ("search", 2000, 32, "exact")
    assert 400 <= r["identities"] <= 600 and r["brute_p50_ms"] > 0 and r["index_build_s"] >= 0
    assert 0 < r["index_p50_ms"] <= r["index_p99_ms"] and r["refresh_ms_per_link"] >= 0
    assert r["recall_at_10"] == 1.0 and r["same_top1"] == 1.0  # exact index: brute force's ranking


def test_matcher_bench_times_process_writing_to_redis():
    rows = _bench("matcher.py", "--sizes", "1500", "--dims", "32", "--queries", "300", "--redis")
    assert [r["bench"] for r in rows] == ["matcher", "matcher", "matcher_redis"]
    r = rows[-1]
    cfg = MatcherConfig()  # the bench runs the configured batch path by default
    assert "error" not in r and (r["gallery"], r["dim"]) == (1500, 32)
    assert (r["batch"], r["search_batch"], r["search_threads"]) == (cfg.max_batch, cfg.index.batch,
                                                                    search_threads(cfg.index.search_threads))
    assert r["embeddings_per_s"] > 0


def test_matcher_bench_instances_write_every_link_to_one_redis():
    # two matcher processes, one core each, as two zones writing to one Redis: every record linked once
    rows = _bench("matcher.py", "--sizes", "1500", "--dims", "64", "--queries", "60", "--instances", "2",
                  "--only-instances", "--rounds", "2", "--redis")
    assert [(r["bench"], r["instances"], r["redis"]) for r in rows] == [("matcher_instances", 2, True)]
    assert rows[0]["records"] == 2 * 2 * 60 and rows[0]["links_in_redis"] == rows[0]["records"]
    assert rows[0]["embeddings_per_s"] > 0
