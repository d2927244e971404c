"""The identity index's device copy (``kind: gpu``): brute force on a torch device, checked here on
the CPU device (the CUDA path is the same code with float16; it is not exercised without a GPU)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from stages.matcher.association import Rules
from stages.matcher.gallery import Gallery, Member
from stages.matcher.index import DeviceCopy, DeviceUnavailable, IdentityIndex, IndexSettings, check_device

torch = pytest.importorskip("torch")


def _vectors(n: int, k: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _gpu(**kw) -> IndexSettings:
    return IndexSettings(kind="gpu", device="cpu", **{"exact_below": 1, **kw})


def test_the_copy_is_built_at_exact_below_and_searched_as_brute_force():
    idx, exact = IdentityIndex(16, _gpu(exact_below=300)), IdentityIndex(16, IndexSettings(kind="exact"))
    x, q = _vectors(1000, 16), _vectors(20, 16, seed=1)
    idx.upsert(np.arange(299), x[:299])
    assert idx.mode == "exact" and not idx.built
    idx.upsert([299], x[299:300])
    assert idx.mode == "gpu" and len(idx._device) == 300
    idx.upsert(np.arange(300, 1000), x[300:])  # more than flush_every changes: written at once
    assert len(idx._device) == 1000 and not idx._pending_rows
    idx.upsert([5], q[:1])  # pending: its device row is out of date, and skipped
    exact.upsert(np.arange(1000), x)
    exact.upsert([5], q[:1])
    got, want = idx.search(q, 10), exact.search(q, 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)  # scored exactly on the CPU copy
    assert idx._pending_rows == [5] and got[1][0, 0] == 5


@pytest.mark.parametrize("flush_every", [1, 7, 10_000])
def test_updates_are_searched_before_and_after_they_are_written_to_the_device(flush_every):
    """Random upserts and removals: each search equals an exact index holding the same vectors,
    whether a change still sits in the pending buffer or was written into the device copy; rows freed
    by removals are taken by new keys once written, and a removed key never comes back."""
    rng = np.random.default_rng(3)
    idx, exact = IdentityIndex(16, _gpu(flush_every=flush_every)), IdentityIndex(16, IndexSettings(kind="exact"))
    x = _vectors(1500, 16)
    for i in (idx, exact):
        i.upsert(np.arange(1500), x)
    removed: set[int] = set()
    pending_seen = 0
    for step in range(150):
        keys = rng.choice(1600, int(rng.integers(1, 5)), replace=False)
        if rng.random() < 0.3:
            assert idx.remove(keys) == exact.remove(keys)
            removed |= set(keys.tolist())
        else:
            v = _vectors(len(keys), 16, seed=100 + step)
            idx.upsert(keys, v)
            exact.upsert(keys, v)
            removed -= set(keys.tolist())
        pending_seen += bool(idx._pending_rows)
        q = _vectors(3, 16, seed=1000 + step)
        got, want = idx.search(q, 10), exact.search(q, 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        everything = idx.search(q[:1], 1700)[1][0]
        assert not removed & set(everything.tolist()) and (everything >= 0).sum() == len(idx)
    assert len(idx) == len(exact)
    # flushed at every change, now and then, or never (the 1,500 first rows were written at once)
    assert {1: pending_seen == 0, 7: 0 < pending_seen < 150, 10_000: pending_seen > 100}[flush_every]
    idx.flush()
    assert not idx._pending_rows and len(idx._device) <= idx.rows_used  # freed rows were reused, not appended


def test_the_copy_stays_still_inside_deferred_and_catches_up_on_exit():
    """Inside ``deferred()`` no flush writes the device copy (a search may run on another thread);
    searches stay exact meanwhile, and on exit the due flush happens."""
    idx, exact = IdentityIndex(16, _gpu(flush_every=5)), IdentityIndex(16, IndexSettings(kind="exact"))
    x = _vectors(400, 16)
    for i in (idx, exact):
        i.upsert(np.arange(400), x)
    copy = idx._device
    before = copy._m.clone()
    with idx.deferred():
        v = _vectors(300, 16, seed=9)
        for i in range(300):  # 60 flushes' worth of changes, and more rows than the copy holds
            idx.upsert([400 + i], v[i:i + 1])
            exact.upsert([400 + i], v[i:i + 1])
            idx.upsert([i], v[i:i + 1] * 0.5)
            exact.upsert([i], v[i:i + 1] * 0.5)
        assert idx._device is copy and len(copy) == 400 and torch.equal(copy._m, before)
        q = _vectors(4, 16, seed=10)
        np.testing.assert_array_equal(idx.search(q, 10)[1], exact.search(q, 10)[1])
    assert not idx._pending_rows and len(idx._device) == 700
    np.testing.assert_array_equal(idx.search(q, 10)[1], exact.search(q, 10)[1])


@pytest.mark.parametrize("k", [3, 40, 150])
def test_the_chunks_top_k_is_the_whole_top_k(monkeypatch, k):
    """Rows scored in chunks (of 64 here, 2^18 in use), each chunk's best kept, then the best of those:
    the same rows as one top-k over all of them, also for k beyond a chunk and with dead rows."""
    monkeypatch.setattr(DeviceCopy, "chunk", 64)
    x, q = _vectors(500, 8), _vectors(6, 8, seed=2)
    copy = DeviceCopy(8, "cpu")
    live = np.ones(500, bool)
    live[::3] = False
    copy.write(np.arange(500), x, live)
    rows = copy.search(q, k)
    sims = q @ x.T
    sims[:, ~live] = -np.inf
    want = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.sort(rows, axis=1), np.sort(want, axis=1))
    assert not np.isin(rows, np.flatnonzero(~live)).any()


def test_float16_rounding_keeps_the_exact_top_10_within_the_fetched_rows():
    """The matrix in float16, as on a CUDA device (here with the CPU's float16 arithmetic): on a
    gallery of 20,000 256-d prototypes clustered around 200 people, so that near scores crowd each
    query's top, every query's exact top 10 is among the 128 rows the device fetches; the index
    then scores those exactly, so its top 10 is the exact one."""
    rng = np.random.default_rng(3)
    n, k = 20_000, 256
    centres = rng.standard_normal((200, k)).astype(np.float32)
    x = centres[rng.integers(0, 200, n)] + 0.35 * rng.standard_normal((n, k)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, 64)] + 0.2 * rng.standard_normal((64, k)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    copy = DeviceCopy(k, "cpu", half=True)
    assert copy.dtype == torch.float16
    copy.write(np.arange(n), x, np.ones(n, bool))
    rows = copy.search(q, 128)
    top = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert all(np.isin(top[i], rows[i]).all() for i in range(len(q)))
    assert DeviceCopy(k, "cpu").dtype == torch.float32  # the default off CUDA


def test_fewer_live_rows_than_asked_are_padded():
    copy = DeviceCopy(4, "cpu")
    assert copy.search(_vectors(2, 4), 5).shape == (2, 0)  # nothing written yet
    copy.write(np.array([0, 1, 2]), _vectors(3, 4), np.array([True, False, True]))
    rows = copy.search(_vectors(2, 4, seed=1), 5)
    assert rows.shape == (2, 3) and (np.sort(rows, axis=1) == [-1, 0, 2]).all()


def test_a_gallery_on_the_device_keeps_no_hot_tier():
    g = Gallery(settings=_gpu(hot_s=3600.0))
    with g.bulk(16):
        g.replace({f"G{i:03d}": [Member(f"t{i}", "a", float(i), i + 1.0, 5, v, i)]
                   for i, v in enumerate(_vectors(200, 16))})
    assert g.index.mode == "gpu" and g.hot is None and g.search_hot(_vectors(1, 16), 5) is None
    found = g.best(_vectors(200, 16)[17], "b", 300.0, 302.0, 0.3, Rules(transit_weight=0.0), None)
    assert found[0] == "G017"


def test_check_device_names_the_field_and_the_fix():
    assert check_device("cpu") == "cpu"
    with pytest.raises(DeviceUnavailable, match="matcher.index.device 'nonsense' is no torch device"):
        check_device("nonsense")
    with pytest.raises(DeviceUnavailable, match="only cuda and cpu"):
        check_device("meta")
    if torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(DeviceUnavailable, match="set matcher.index.kind to auto"):
            check_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_matcher_without_its_device_stops_at_setup_with_one_clear_error(caplog):
    """Not at its first record, half way into a batch: the device is checked before the restore."""
    from pipeline.cli_common import expected_errors
    from stages.matcher.matcher import CrossCameraMatcher

    class Store:
        zone = "default"
        checked = 0

        def check(self) -> None:
            self.checked += 1

        def matcher_state(self) -> dict:  # pragma: no cover - not reached
            raise AssertionError("restored before the device was checked")

    store = Store()
    m = CrossCameraMatcher(store=store, index=IndexSettings(kind="gpu"))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO), pytest.raises(DeviceUnavailable) as err:
        m.setup()
    assert store.checked == 1 and "matcher.index.device 'cuda'" in str(err.value)
    assert isinstance(err.value, expected_errors())  # the CLI prints it as one error line, no traceback


def test_the_config_takes_kind_gpu_and_its_device():
    from pipeline.config import ConfigError, parse_config
    from stages.matcher.matcher import CrossCameraMatcher

    cfg = parse_config("matcher:\n  index:\n    kind: gpu\n    device: cuda:1\n", "x.yaml", environ={})
    settings = CrossCameraMatcher.from_config(cfg, store=object()).gallery.settings  # type: ignore[arg-type]
    assert (settings.kind, settings.device) == ("gpu", "cuda:1")
    with pytest.raises(ConfigError, match="matcher.index.kind"):
        parse_config("matcher:\n  index:\n    kind: faiss-gpu\n", "x.yaml", environ={})
    with pytest.raises(ConfigError, match="matcher.index.device"):
        parse_config("matcher:\n  index:\n    device: ''\n", "x.yaml", environ={})
