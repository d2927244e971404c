"""The identity store under a connection lost around the link script (found by the fault test)."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from pipeline.store import Link


def _link(tid: str, wall_s: float = 1.7e9) -> Link:
    return Link(tid, "left", 1, "G000001", None, 0.0, 1.0, [0], [[0, 0, 1, 1]], 1.7e9, wall_s)


def test_connection_lost_before_the_link_script_is_an_outage_not_a_replay(store, monkeypatch):
    real = store._record_link

    def drops(*args, **kwargs):
        raise redis.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(store, "_record_link", drops)
    vec = np.ones(4, np.float32) / 2
    with pytest.raises(redis.ConnectionError):
        store.record_link(_link("T1"), vec, ["left"], 0.0, 1.0, None)
    monkeypatch.setattr(store, "_record_link", real)
    assert not store.has_tracklet("T1") and store.identity("G000001") is None  # nothing half-written
    assert store.record_link(_link("T1"), vec, ["left"], 0.0, 1.0, None) is True  # the retry links it
    assert store.record_link(_link("T1", 1.8e9), vec, ["left"], 0.0, 1.0, None) is False  # a replay does not
    assert store.identity("G000001").n_tracklets == 1


def test_a_resent_script_whose_reply_was_lost_counts_as_written_once(store, monkeypatch):
    """redis-py re-sends a command after a lost reply: the second run finds this call's own link."""
    real = store._record_link
    results = []

    def resend(*args, **kwargs):
        results.append(real(*args, **kwargs))  # ran, but the reply "was lost"
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "_record_link", resend)
    assert store.record_link(_link("T1"), np.ones(4, np.float32) / 2, thumbnail=None) is True
    assert results == [1]
    h = store.r.hgetall(f"{store.ns}:identity:G000001")
    assert int(h[b"n_tracklets"]) == 1 and store.r.zcard(f"{store.ns}:identity:G000001:tracklets") == 1
