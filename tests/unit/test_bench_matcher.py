"""bench/matcher.py runs and prints one JSON row per configuration with the fields the issue names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_matcher_bench_prints_a_row_per_configuration():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "matcher.py"), "--sizes", "1500", "3000", "--dims", "64",
                          "--queries", "40"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert [(r["gallery"], r["dim"], r["index"]) for r in rows] == [
        (1500, 64, "brute"), (1500, 64, "ivf"), (3000, 64, "brute"), (3000, 64, "ivf")]
    for r in rows:
        assert {"p50_ms", "p99_ms", "embeddings_per_s", "recall_at_10", "same_decision"} <= set(r)
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["embeddings_per_s"] > 0
        assert 0.0 <= r["recall_at_10"] <= 1.0 and 0.0 <= r["same_decision"] <= 1.0
    for r in rows[1::2]:  # the index rows: measured against brute force, not copied from it
        assert r["recall_at_10"] > 0.5 and isinstance(r["memory_bytes_per_identity"], int)  # RSS: coarse when small
