"""The identity store under a connection lost mid-transaction (found by the fault test)."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from pipeline.store import Link


def _link(tid: str) -> Link:
    return Link(tid, "left", 1, "G000001", None, 0.0, 1.0, [0], [[0, 0, 1, 1]], 1.7e9, 1.7e9)


class DropsOnExecute:
    """Wraps a redis-py pipeline; EXEC fails the way redis-py reports a connection lost while watching."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __enter__(self):
        self.pipe.__enter__()
        return self

    def __exit__(self, *exc):
        return self.pipe.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def execute(self):
        self.pipe.reset()
        raise redis.WatchError("A ConnectionError occurred while watching one or more keys")


def test_connection_lost_during_link_transaction_is_an_outage_not_a_replay(store, monkeypatch):
    real = store.r.pipeline
    monkeypatch.setattr(store.r, "pipeline", lambda *a, **k: DropsOnExecute(real(*a, **k)))
    vec = np.ones(4, np.float32) / 2
    with pytest.raises(redis.ConnectionError, match="interrupted"):
        store.record_link(_link("T1"), vec, ["left"], 0.0, 1.0, None)
    monkeypatch.setattr(store.r, "pipeline", real)
    assert not store.has_tracklet("T1")
    assert store.record_link(_link("T1"), vec, ["left"], 0.0, 1.0, None) is True  # the retry links it
    assert store.record_link(_link("T1"), vec, ["left"], 0.0, 1.0, None) is False  # a replay does not
