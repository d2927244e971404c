"""Search by example through the API's index (:class:`stages.matcher.search.SearchIndex`) against a real
Redis: the same ranking as brute force over every stored embedding, kept so through new links,
operator merges and splits, purges and a new scoring space, with only the changed identities re-read."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.store import Link
from stages.matcher.association import ScoringSpace
from stages.matcher.index import IndexSettings
from stages.matcher.search import SearchIndex, rank_identities
from tests.operator_seed import near, seed_store, unit

CAMS = ["left", "right", "gate"]


def _plan(n: int = 40) -> tuple[dict, dict]:
    plan, vecs = {}, {}
    for i in range(n):
        base = unit(2000 + i)
        rows = []
        for j in range(1 + i % 4):
            tid = f"s{i:02d}-{j}"
            rows.append((tid, CAMS[(i + j) % 3], 10.0 * i + 2 * j, 10.0 * i + 2 * j + 1))
            vecs[tid] = near(base, 50 * i + j, scale=0.3)
        plan[f"p{i:02d}"] = rows
    return plan, vecs


def _same(index: SearchIndex, store, queries: list[tuple[np.ndarray, list[str]]], k: int = 8) -> None:
    for q, exclude in queries:
        got = index.rank(q, k, exclude=exclude)
        want = rank_identities(store, q, k, exclude=exclude)
        assert [h.global_id for h in got] == [h.global_id for h in want]
        for a, b in zip(got, want):
            assert a.score == pytest.approx(b.score, abs=1e-5)
            assert (a.compared, a.n_tracklets, a.cameras, a.best_tracklet) == \
                (b.compared, b.n_tracklets, b.cameras, b.best_tracklet)


def _link(store, tid: str, gid: str, cam: str, start: float, vec: np.ndarray) -> None:
    assert store.record_link(Link(tid, cam, 1, gid, 0.9, start, start + 1, [0, 1], [[0, 0, 1, 2], [0, 0, 1, 2]],
                                  1.7e9, 1.7e9 + 1), vec)


@pytest.mark.parametrize("settings", [None, IndexSettings(kind="ivf", nprobe=10_000, fetch=100_000, hot_s=None)],
                         ids=["exact", "ivf"])
def test_the_index_ranks_as_brute_force_through_every_kind_of_change(store, monkeypatch, settings):
    plan, vecs = _plan()
    gids = seed_store(store, plan, vecs)
    index = SearchIndex(store, settings)
    queries = [(store.embedding("s05-0"), ["s05-0"]), (near(unit(2007), 1, 0.2), []), (unit(1), [])]
    _same(index, store, queries)
    assert len(index) == 40 and (settings is None) != index.index.approximate

    # from here on every search must be incremental
    builds = []
    build = index._build
    monkeypatch.setattr(index, "_build", lambda key: (builds.append(key), build(key)))
    _link(store, "new-a", gids["p07"], "gate", 900.0, near(unit(2007), 7, 0.2))   # joins p07
    _link(store, "new-b", store.next_global_id(), "left", 901.0, near(unit(2007), 8, 0.2))  # founds one
    _same(index, store, queries + [(store.embedding("new-b"), ["new-b"])])
    assert len(index) == 41
    store.operator_merge(gids["p07"], [gids["p11"]], "ops")
    _same(index, store, queries)
    store.operator_split(gids["p03"], ["s03-1", "s03-2"], "ops")
    _same(index, store, queries + [(store.embedding("s03-2"), [])])
    assert len(index) == 41 and not builds  # p11 merged away, p03 split in two

    # a purge and a new scoring space are seen, and rebuild the index
    store.purge_identity(gids["p05"])
    _same(index, store, queries[1:])
    assert len(builds) == 1
    assert gids["p05"] not in {index._gid[c] for c in range(len(index._gid)) if index._gid[c] in index._count}
    space = ScoringSpace.fit(np.stack([store.stored_embedding(v) for v in vecs.values()]), max_dim=6)
    store.save_matcher_state({"mean": space.mean.astype("<f4").tobytes(), "epoch": 1,
                              "components": space.components.astype("<f4").tobytes(), "dim": 6})
    _same(index, store, queries[1:])
    assert index.space is not None and len(builds) == 2


def test_the_api_searches_through_its_index_and_sees_new_links(store):
    from fastapi.testclient import TestClient

    from stages.query import create_app

    plan, vecs = _plan(12)
    gids = seed_store(store, plan, vecs)
    client = TestClient(create_app(store))
    first = client.post("/search", json={"tracklet_id": "s06-0", "k": 3}).json()["results"]
    assert first[0]["global_id"] == gids["p06"]
    # a new identity, much closer to s06-0 than p06's other members, is found at the next search
    _link(store, "twin", store.next_global_id(), "gate", 500.0, store.embedding("s06-0"))
    again = client.post("/search", json={"tracklet_id": "s06-0", "k": 3}).json()["results"]
    assert again[0]["best_tracklet"] == "twin" and again[0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_the_api_builds_its_index_when_the_server_starts(store):
    """The server's start builds the search index on a background thread (the first search would
    otherwise wait for it); the first search then uses it as built, without rebuilding."""
    from fastapi.testclient import TestClient

    from stages.query import create_app

    plan, vecs = _plan(10)
    gids = seed_store(store, plan, vecs)
    app = create_app(store)
    index = app.state.search_index
    assert len(index) == 0  # nothing is read before the server starts
    with TestClient(app) as client:  # runs the lifespan, as uvicorn does
        app.state.warming.join(30)
        assert not app.state.warming.is_alive() and len(index) == len(gids) == 10
        built = index._built_at
        hits = client.post("/search", json={"tracklet_id": "s06-0", "k": 2}).json()["results"]
        assert hits[0]["global_id"] == gids["p06"] and index._built_at == built


def test_the_periodic_rebuild_runs_in_the_background_and_is_adopted(store):
    plan, vecs = _plan(20)
    gids = seed_store(store, plan, vecs)
    index = SearchIndex(store, rebuild_s=0.05)
    queries = [(store.embedding("s06-0"), ["s06-0"]), (near(unit(2009), 3, 0.2), [])]
    _same(index, store, queries)
    first = index.index
    time.sleep(0.1)
    index.refresh()  # due: a rebuild starts, searches go on with the current index
    assert index._fresh is not None and index.index is first
    index._fresh.join(10)
    _link(store, "late", gids["p09"], "gate", 800.0, near(unit(2009), 4, 0.2))  # after the rebuild's scan
    _same(index, store, queries)
    assert index.index is not first and index._fresh is None and index._count[gids["p09"]] == 1 + 9 % 4 + 1
