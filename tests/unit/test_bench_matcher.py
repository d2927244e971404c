"""bench/matcher.py runs and prints one JSON row per configuration with the fields the issue names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_matcher_bench_prints_a_row_per_configuration():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "matcher.py"), "--sizes", "1500", "3000", "--dims", "64",
                          "--queries", "40", "--passes", "3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    hot = "ivf+hot3600s/4096"  # the matcher's default hot tier
    assert [(r["gallery"], r["dim"], r["index"]) for r in rows] == [
        (1500, 64, "brute"), (1500, 64, hot), (3000, 64, "brute"), (3000, 64, hot)]
    for r in rows:
        assert {"p50_ms", "p99_ms", "embeddings_per_s", "recall_at_10", "same_decision"} <= set(r)
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["embeddings_per_s"] > 0
        assert 0.0 <= r["recall_at_10"] <= 1.0 and 0.0 <= r["same_decision"] <= 1.0
    for r in rows[::2]:  # brute force: one throughput pass, the reference
        assert r["embeddings_per_s_passes"] == [r["embeddings_per_s"]]
    for r in rows[1::2]:  # the index rows: the median of --passes passes
        passes = r["embeddings_per_s_passes"]
        assert len(passes) == 3 and all(v > 0 for v in passes)
        assert r["embeddings_per_s"] == sorted(passes)[1]
    for r in rows[1::2]:  # the index rows: measured against brute force, not copied from it
        assert r["recall_at_10"] > 0.5 and isinstance(r["memory_bytes_per_identity"], int)  # RSS: coarse when small
        assert (r["hot_s"], r["hot_max"]) == (3600.0, 4096)


def test_matcher_bench_runs_several_instances_side_by_side():
    # two matcher processes, one core each, each with its own gallery: one row of their combined rate
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "matcher.py"), "--sizes", "1500", "--dims", "64",
                          "--queries", "60", "--instances", "2", "--only-instances", "--rounds", "2", "--hot-s", "0"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert [(r["bench"], r["gallery"], r["instances"]) for r in rows] == [("matcher_instances", 1500, 2)]
    row = rows[0]
    assert row["redis"] is False and "links_in_redis" not in row
    assert row["hot_s"] is None  # --hot-s 0: the IVF alone
    assert row["records"] == 2 * 2 * 60  # every instance decided every query of every round
    assert len(row["per_instance_per_s"]) == 2 and all(v > 0 for v in row["per_instance_per_s"])
    # the combined rate is all records over the whole span: at most the sum of the instances' own rates
    assert 0 < row["embeddings_per_s"] <= sum(row["per_instance_per_s"]) * 1.0001


def test_matcher_bench_splits_recent_returns_from_older_ones():
    # one cell probed of about a hundred: the IVF misses most true matches, the hot tier (the last
    # hour, exact) finds every recent one
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "matcher.py"), "--sizes", "3000", "--dims", "64",
                          "--queries", "80", "--recent", "0.5", "--nprobe", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    ivf = rows[1]
    assert (ivf["recent"], ivf["recent_s"]) == (0.5, 600.0)
    assert ivf["same_decision_recent"] == 1.0
    assert ivf["same_decision_older"] < 0.9
    assert "same_decision_recent" not in rows[0]  # brute force: nothing to split


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_matcher", ROOT / "bench" / "matcher.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_each_pass_over_the_queries_is_a_new_sighting():
    # A second pass with the first pass's spans is blocked from its people by the cannot-link rule
    # (same camera, overlapping in time), so it would time the widening search instead of a return.
    bench = _bench_module()
    args = bench.parser().parse_args(["--queries", "40"])
    args.hot_s = None  # no hot tier (what --hot-s 0 means)
    settings = bench.IndexSettings(kind="exact", batch=args.search_batch, search_threads=0)
    members, expected = {}, {}
    for shifted in (True, False):
        m, data = bench.build(1500, 64, args, settings)
        ids = [int(i) for i in data["truth"]]
        for r in range(2):
            shift = bench._round_shift_s(data, r if shifted else 0)
            done, _ = bench._throughput(m, data, args, 10 ** 7 * (r + 1), shift)
            assert done == 40
        members[shifted] = [len(m.gallery.members(f"G{i:07d}")) for i in ids]
        expected[shifted] = [1 + 2 * ids.count(i) for i in ids]  # the gallery's member and one copy a pass
    assert members[True] == expected[True]  # both passes joined their people
    assert sum(a < b for a, b in zip(members[False], expected[False])) > 30  # unshifted: mostly blocked


def test_later_passes_are_returns_of_other_identities():
    # --passes: each pass after the first times other people's returns, and each joins its people
    bench = _bench_module()
    args = bench.parser().parse_args(["--queries", "40", "--passes", "3"])
    args.hot_s = None
    settings = bench.IndexSettings(kind="exact", batch=args.search_batch, search_threads=0)
    m, data = bench.build(1500, 64, args, settings)
    assert len(data["passes"]) == 3
    assert data["passes"][0][1] is data["truth"]  # the first pass: the latency queries
    later = [int(i) for _, ids in data["passes"][1:] for i in ids]
    assert len(set(later)) == 80  # drawn without replacement while the gallery has enough identities
    assert len(set(later) - {int(i) for i in data["truth"]}) > 70  # other identities than the first pass's
    for r in range(3):
        done, _ = bench._throughput(m, data, args, 10 ** 7 * (r + 1), bench._round_shift_s(data, r), part=r)
        assert done == 40
    every = [int(i) for _, ids in data["passes"] for i in ids]
    assert [len(m.gallery.members(f"G{i:07d}")) for i in set(every)] == [1 + every.count(i) for i in set(every)]
    # and the first pass is what it was without --passes: the same gallery and queries
    m1, data1 = bench.build(1500, 64, bench.parser().parse_args(["--queries", "40"]), settings)
    assert (data1["truth"] == data["truth"]).all() and np.array_equal(data1["queries"], data["queries"])
    for g in ("G0000000", "G0000777", "G0001499"):
        assert np.array_equal(m1.gallery.prototypes(g)[0].y, m.gallery.prototypes(g)[0].y)


def test_matcher_bench_measures_the_device_copy():
    """``--index gpu`` on the CPU device: the index row is the device copy's, measured against brute
    force (its top 10 and decisions are brute force's, up to ties), and two instances run it too."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "matcher.py"), "--sizes", "1500", "--dims", "64",
                          "--queries", "60", "--index", "gpu", "--device", "cpu", "--instances", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert [(r["bench"], r["index"]) for r in rows] == [
        ("matcher_instances", "gpu:cpu"), ("matcher", "brute"), ("matcher", "gpu:cpu")]
    inst, _, gpu = rows
    assert inst["records"] == 2 * 60 and inst["hot_s"] is None
    assert gpu["recall_at_10"] >= 0.99 and gpu["same_decision"] >= 0.98
    assert gpu["hot_s"] is None and gpu["nprobe"] is None and gpu["embeddings_per_s"] > 0


def test_matcher_bench_says_when_the_device_is_missing():
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has a CUDA device")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "matcher.py"), "--sizes", "1500", "--dims", "64",
                          "--index", "gpu"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode != 0 and not run.stdout.strip()
    assert "matcher.index.device 'cuda'" in run.stderr and "Traceback" not in run.stderr
