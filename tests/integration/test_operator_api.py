"""The operator API through an HTTP client against a real Redis: paging and filters, camera sightings,
timelines and crops, search by example, operator merge/split with audit and constraints, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from stages.matcher.association import ScoringSpace
from stages.query import create_app
from tests.conftest import ROOT
from tests.operator_seed import crop_jpeg, near, seed_store, unit

CAMS = ("left", "right", "lobby")


def _big_plan(n: int = 30) -> dict[str, list[tuple[str, str, float, float]]]:
    """``n`` identities; pairs share their first sighting (ties broken by global id); one tracklet of
    identity 13 is the only one on camera ``roof``."""
    plan = {}
    for i in range(n):
        base = (i // 2) * 5.0
        rows = []
        for j in range(1 + i % 3):
            start = base + j * 1.5
            rows.append((f"t{i:02d}-{j}", CAMS[(i + j) % 3], start, start + 1.0 + i % 4))
        if i == 13:
            rows.append(("t13-roof", "roof", base + 4.0, base + 4.5))
        plan[f"p{i:02d}"] = rows
    return plan


def _vectors(plan) -> dict[str, np.ndarray]:
    out = {}
    for k, rows in enumerate(plan.values()):
        base = unit(1000 + k)
        for j, (tid, *_rest) in enumerate(rows):
            out[tid] = near(base, 10 * k + j)
    return out


@pytest.fixture
def big(store):
    plan = _big_plan()
    gids = seed_store(store, plan, _vectors(plan))
    ref = []
    for name, rows in plan.items():
        ref.append({"global_id": gids[name], "first": min(r[2] for r in rows), "last": max(r[3] for r in rows),
                    "cameras": sorted({r[1] for r in rows}), "tracklets": sorted(r[0] for r in rows)})
    ref.sort(key=lambda r: (r["first"], r["global_id"]))
    return store, ref


def _all_pages(client, params: dict, limit: int) -> tuple[list[dict], list[dict]]:
    """Every item of ``GET /identities`` paged by ``next_offset``, and each page's envelope."""
    items, pages, offset = [], [], 0
    for _ in range(100):
        body = client.get("/identities", params={**params, "offset": offset, "limit": limit}).json()
        pages.append(body)
        items.extend(body["items"])
        if body["next_offset"] is None:
            return items, pages
        assert body["next_offset"] == offset + limit
        offset = body["next_offset"]
    raise AssertionError("paging did not end")


def test_identity_pages_cover_every_identity_once_in_order(big):
    store, ref = big
    client = TestClient(create_app(store))
    items, pages = _all_pages(client, {}, 7)
    assert [i["global_id"] for i in items] == [r["global_id"] for r in ref]  # each once, by (first seen, id)
    assert len(pages) == 5 and all(p["total"] == 30 for p in pages) and pages[-1]["next_offset"] is None
    assert [len(p["items"]) for p in pages] == [7, 7, 7, 7, 2]
    first = items[0]
    assert sorted(first["tracklets"]) == ref[0]["tracklets"] and first["cameras"] == ref[0]["cameras"]
    newest, _ = _all_pages(client, {"newest_first": True}, 8)
    assert [i["global_id"] for i in newest] == [r["global_id"] for r in reversed(ref)]
    beyond = client.get("/identities", params={"offset": 30}).json()
    assert beyond["items"] == [] and beyond["total"] == 30 and beyond["next_offset"] is None


FILTERS = [
    {"camera": "roof"}, {"camera": "left"}, {"since": 60.0}, {"until": 20.0}, {"since": 10.0, "until": 40.0},
    {"min_cameras": 2}, {"min_cameras": 3, "camera": "lobby"}, {"since": 0.0},
    {"min_cameras": 2, "newest_first": True}, {"camera": "right", "since": 30.0, "until": 50.0, "min_cameras": 2},
]


@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_identity_filters_agree_with_a_full_scan(big, params):
    store, ref = big
    expected = [r["global_id"] for r in ref
                if ("camera" not in params or params["camera"] in r["cameras"])
                and ("since" not in params or r["last"] >= params["since"])
                and ("until" not in params or r["first"] <= params["until"])
                and len(r["cameras"]) >= params.get("min_cameras", 1)]
    if params.get("newest_first"):
        expected.reverse()
    assert expected, "a filter that matches nothing tests little"
    items, pages = _all_pages(TestClient(create_app(store)), params, 4)
    assert [i["global_id"] for i in items] == expected
    assert pages[-1]["total"] == len(expected)  # the last page always knows the count
    assert all(p["total"] in (None, len(expected)) for p in pages)


def test_filters_read_only_their_candidates(big, monkeypatch):
    store, ref = big
    requested: list[int] = []
    rows = store._identity_rows
    monkeypatch.setattr(store, "_identity_rows", lambda gids: requested.append(len(gids)) or rows(gids))
    client = TestClient(create_app(store))
    assert client.get("/identities", params={"limit": 5}).json()["total"] == 30
    assert requested == []  # a plain page is answered from the index and the page's rows
    roof = client.get("/identities", params={"camera": "roof"}).json()
    assert [i["global_id"] for i in roof["items"]] == [r["global_id"] for r in ref if "roof" in r["cameras"]]
    assert requested == [1]  # the one identity seen on the camera, not all 30
    scan = client.get("/identities", params={"min_cameras": 2, "limit": 3}).json()
    assert scan["total"] is None and scan["next_offset"] == 3 and len(scan["items"]) == 3  # stopped scan


def test_a_popular_camera_is_scanned_instead_of_read_whole(big, monkeypatch):
    import pipeline.store

    store, ref = big
    monkeypatch.setattr(pipeline.store, "OPERATOR_CANDIDATES", 3)  # 'left' has more sightings than that
    client = TestClient(create_app(store))
    first = client.get("/identities", params={"camera": "left", "limit": 4}).json()
    assert first["total"] is None and first["next_offset"] == 4
    items, pages = _all_pages(client, {"camera": "left"}, 4)
    assert [i["global_id"] for i in items] == [r["global_id"] for r in ref if "left" in r["cameras"]]
    assert pages[-1]["total"] == len(items)
    assert client.get("/identities", params={"camera": "roof"}).json()["total"] == 1  # small: still exact


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"offset": -1}, {"min_cameras": 0},
                                    {"since": 10, "until": 5}, {"since": "noon"}])
def test_identity_query_validation(store, params):
    resp = TestClient(create_app(store)).get("/identities", params=params)
    assert resp.status_code == 422, resp.text
    if "until" in params:
        assert "after" in resp.json()["detail"]


def test_camera_sightings_in_a_time_range(big):
    store, _ = big
    client = TestClient(create_app(store))
    everything = client.get("/cameras/left/sightings", params={"limit": 1000}).json()
    starts = [s["start_s"] for s in everything["items"]]
    assert everything["camera"] == "left" and everything["total"] == len(starts) > 10 and starts == sorted(starts)
    want = [s["tracklet_id"] for s in everything["items"] if 20.0 <= s["start_s"] <= 45.0]
    got, offset = [], 0
    while offset is not None:
        page = client.get("/cameras/left/sightings", params={"since": 20, "until": 45, "limit": 2,
                                                              "offset": offset}).json()
        assert page["total"] == len(want)
        got += [s["tracklet_id"] for s in page["items"]]
        offset = page["next_offset"]
    assert got == want and want
    one = everything["items"][0]
    assert one["camera"] == "left" and one["global_id"].startswith("G") and one["thumbnail_url"] is None
    assert client.get("/cameras/nowhere/sightings").status_code == 404
    assert client.get("/cameras/left/sightings", params={"since": 5, "until": 1}).status_code == 422


def _small(store):
    """X: 3 tracklets (left, right, left), Y: 2 (lobby, right), Z: 1 (left); X's right tracklet has no crop."""
    plan = {"X": [("x1", "left", 0.0, 2.0), ("x2", "right", 3.0, 5.0), ("x3", "left", 8.0, 9.0)],
            "Y": [("y1", "lobby", 1.0, 4.0), ("y2", "right", 6.0, 7.0)],
            "Z": [("z1", "left", 20.0, 21.0)]}
    vectors = {}
    for seed, rows in enumerate(plan.values()):
        for j, (tid, *_rest) in enumerate(rows):
            vectors[tid] = near(unit(100 * (seed + 1)), 7 * seed + j, 0.3)
    thumbs = {tid: crop_jpeg((0, 0, 200), i) for i, tid in enumerate(vectors) if tid != "x2"}
    return seed_store(store, plan, vectors, thumbs), vectors


def test_timeline_and_crops_per_camera(store):
    gids, _ = _small(store)
    client = TestClient(create_app(store))
    tl = client.get(f"/identities/{gids['X']}/timeline").json()
    assert [s["tracklet_id"] for s in tl["sightings"]] == ["x1", "x2", "x3"]  # by start, across cameras
    assert [s["camera"] for s in tl["sightings"]] == ["left", "right", "left"]
    assert tl["total"] == 3 and tl["cameras"] == ["left", "right"] and tl["merged_from"] is None
    assert tl["sightings"][0]["score"] is None and tl["sightings"][1]["score"] == pytest.approx(0.9)
    assert tl["sightings"][1]["thumbnail_url"] is None
    url = tl["sightings"][0]["thumbnail_url"]
    assert url == "/tracklets/x1/thumbnail" and client.get(url).content.startswith(b"\xff\xd8")
    paged = client.get(f"/identities/{gids['X']}/timeline", params={"offset": 1, "limit": 1}).json()
    assert [s["tracklet_id"] for s in paged["sightings"]] == ["x2"] and paged["next_offset"] == 2
    crops = client.get(f"/identities/{gids['X']}/crops").json()
    assert {c: [x["tracklet_id"] for x in v] for c, v in crops["cameras"].items()} == {"left": ["x1", "x3"]}
    assert client.get(f"/identities/{gids['Y']}/crops", params={"camera": "lobby"}).json()["cameras"] == {
        "lobby": [{"tracklet_id": "y1", "start_s": 1.0, "end_s": 4.0, "score": None,
                   "thumbnail_url": "/tracklets/y1/thumbnail"}]}
    for path in ("/identities/G999999/timeline", "/identities/G999999/crops"):
        assert client.get(path).status_code == 404


def _mean_cosine(q, members, space=None):
    if space is not None:
        return float(np.mean(space.transform(np.stack(members)) @ space.transform(q)))
    unit_rows = np.stack(members) / np.linalg.norm(np.stack(members), axis=1, keepdims=True)
    return float(np.mean(unit_rows @ (q / np.linalg.norm(q))))


def test_search_by_tracklet_id(store):
    gids, vec = _small(store)
    vec = {t: store.stored_embedding(v) for t, v in vec.items()}  # as Redis holds them (float16)
    client = TestClient(create_app(store))
    resp = client.post("/search", json={"tracklet_id": "x1", "k": 10})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["space"] == "cosine" and body["query"] == {"tracklet_id": "x1", "crops": 0}
    top = body["results"][0]
    assert top["global_id"] == gids["X"] and top["compared"] == 2 and top["n_tracklets"] == 3  # x1 left out
    assert top["score"] == pytest.approx(_mean_cosine(vec["x1"], [vec["x2"], vec["x3"]]), abs=1e-5)
    assert top["best_tracklet"] in ("x2", "x3") and top["cameras"] == ["left", "right"]
    assert [r["global_id"] for r in body["results"]][1:] and len(body["results"]) == 3
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert len(client.post("/search", data={"tracklet_id": "y1", "k": "1"}).json()["results"]) == 1  # form
    # with a saved scoring space (as the matcher saves it) scores are computed in it
    space = ScoringSpace.fit(np.stack(list(vec.values())), max_dim=2)
    assert space.components is not None
    store.save_matcher_state({"mean": space.mean.astype("<f4").tobytes(),
                              "components": space.components.astype("<f4").tobytes(),
                              "dim": space.components.shape[1]})
    spaced = client.post("/search", json={"tracklet_id": "x1"}).json()
    assert spaced["space"] == "scoring space"
    got = {r["global_id"]: r["score"] for r in spaced["results"]}
    assert got[gids["Y"]] == pytest.approx(_mean_cosine(vec["x1"], [vec["y1"], vec["y2"]], space), abs=1e-5)
    assert got[gids["Y"]] != pytest.approx(_mean_cosine(vec["x1"], [vec["y1"], vec["y2"]]), abs=1e-3)


@pytest.mark.parametrize("kwargs, status, needle", [
    ({"json": {"tracklet_id": "nope"}}, 404, "not linked"),
    ({"json": {"tracklet_id": "x1", "k": 0}}, 422, "k"),
    ({"json": {"tracklet_id": "x1", "k": 101}}, 422, "k"),
    ({"json": {"k": 3}}, 422, "tracklet_id"),
    ({"json": {"tracklet_id": "x1", "extra": 1}}, 422, "extra"),
    ({"data": {"k": "3"}}, 422, "give crops"),
    ({"data": {"tracklet_id": "x1", "k": "many"}}, 422, "integer"),
    ({"files": [("crops", ("a.jpg", b"not an image", "image/jpeg"))]}, 422, "neither a JPEG nor a PNG"),
    ({"files": [("crops", ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png"))]}, 422, "not a decodable"),
    ({"files": [("crops", ("a.jpg", crop_jpeg((0, 0, 200)), "image/jpeg"))], "data": {"tracklet_id": "x1"}},
     422, "not both"),
    ({"files": [("crops", ("a.jpg", crop_jpeg((0, 0, 200)), "image/jpeg"))]}, 503, "re-id model"),
    ({"content": b"tracklet_id=x1", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
])
def test_search_validation(store, kwargs, status, needle):
    _small(store)
    resp = TestClient(create_app(store)).post("/search", **kwargs)  # no re-id model configured
    assert resp.status_code == status, resp.text
    assert needle in resp.text


def test_search_by_uploaded_crops(store):
    """Crops are embedded by the configured re-id model (a tiny random MobileNetV2 temporal pooling):
    crops of the person of Y rank Y first, and its tracklet embedded from the same crops matches
    with cosine 1."""
    import torch

    from pipeline.config import ReidConfig
    from stages.reid.embedder import CropEmbedder

    cfg = ReidConfig.model_validate({"model": {"type": "temporal_pool", "pretrained": False, "seq_len": 2,
                                               "input_height": 64, "input_width": 32},
                                     "engine": {"type": "torch", "device": "cpu"}})
    colours = {"X": (0, 0, 220), "Y": (0, 200, 0), "Z": (220, 0, 0)}
    crops = {f"{n.lower()}{j}": [crop_jpeg(c, 2 * j + i, (64, 32)) for i in range(2)]
             for n, c in colours.items() for j in (1, 2)}
    torch.manual_seed(0)
    seeding = CropEmbedder.from_config(cfg)
    seeding.setup()
    vectors = {tid: seeding.embed(c) for tid, c in crops.items()}
    plan = {n: [(f"{n.lower()}{j}", "left" if j == 1 else "right", 10.0 * j, 10.0 * j + 2) for j in (1, 2)]
            for n in colours}
    gids = seed_store(store, plan, vectors)
    client = TestClient(create_app(store, reid=cfg))
    torch.manual_seed(0)  # the lazily loaded model gets the same random weights
    files = [("crops", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(crops["y2"])]
    resp = client.post("/search", files=files, data={"k": "2"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["query"] == {"tracklet_id": None, "crops": 2} and len(body["results"]) == 2
    top = body["results"][0]
    assert top["global_id"] == gids["Y"] and top["best_tracklet"] == "y2"
    assert top["best_score"] == pytest.approx(1.0, abs=1e-4)
    png = [("crops", ("p.png", _png(crops["x1"][0]), "image/png"))]
    assert client.post("/search", files=png).json()["results"][0]["global_id"] == gids["X"]


def _png(jpeg: bytes) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
    assert ok
    return buf.tobytes()


def test_operator_merge_with_audit_and_must_link(store):
    gids, _ = _small(store)
    x, y, z = gids["X"], gids["Y"], gids["Z"]
    client = TestClient(create_app(store))
    resp = client.post(f"/identities/{x}/merge", json={"from": [y, z], "reason": "same red coat", "operator": "alice"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["kind"] == "merge" and body["global_id"] == x and body["moved"] == ["y1", "y2", "z1"]
    assert sorted(body["identity"]["tracklets"]) == ["x1", "x2", "x3", "y1", "y2", "z1"]
    assert body["identity"]["cameras"] == ["left", "lobby", "right"] and body["identity"]["last_seen_s"] == 21.0
    assert store.link("y1").global_id == x and store.link("z1").global_id == x
    followed = client.get(f"/identities/{y}").json()
    assert followed["global_id"] == x and followed["merged_from"] == y
    assert [i["global_id"] for i in client.get("/identities").json()["items"]] == [x]
    records = client.get("/audit").json()
    assert [(r["kind"], r["from"], r["into"]) for r in records] == [("merge", y, x), ("merge", z, x)]
    for r in records:
        assert r["reason"] == "operator" and r["operator"] == "alice" and r["note"] == "same red coat"
    assert body["audit_ids"] == [r["id"] for r in records]
    assert records[0]["tracklets"] == ["y1", "y2"]
    constraints = client.get("/constraints").json()
    assert constraints == body["constraints"] == [c.to_json() for c in store.constraints()]
    assert [(c["kind"], c["a"], c["b"], c["audit_id"], c["operator"]) for c in constraints] == [
        ("must", ["x1", "x2", "x3"], ["y1", "y2"], records[0]["id"], "alice"),
        ("must", ["x1", "x2", "x3"], ["z1"], records[1]["id"], "alice")]
    raw = json.loads(store.r.lindex(f"{store.ns}:constraints", 0))
    assert set(raw) >= {"kind", "a", "b", "audit_id", "wall_s"} and raw["wall_s"] > 1.7e9
    again = client.post(f"/identities/{x}/merge", json={"from": [y], "operator": "alice"})
    assert again.status_code == 409 and "merged into" in again.json()["detail"]


def test_operator_split_with_audit_and_cannot_link(store):
    gids, _ = _small(store)
    x = gids["X"]
    client = TestClient(create_app(store))
    resp = client.post(f"/identities/{x}/split", json={"tracklets": ["x3"], "reason": "two people",
                                                      "operator": "bob"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    new = body["new_global_id"]
    assert body["kind"] == "split" and new not in gids.values() and new.startswith("G")
    assert body["new_identity"]["tracklets"] == ["x3"] and body["new_identity"]["first_seen_s"] == 8.0
    assert body["identity"]["tracklets"] == ["x1", "x2"] and body["identity"]["last_seen_s"] == 5.0
    assert store.link("x3").global_id == new
    (record,) = client.get("/audit").json()
    assert (record["kind"], record["from"], record["into"], record["tracklets"]) == ("split", x, [new], ["x3"])
    assert record["reason"] == "operator" and record["operator"] == "bob" and record["note"] == "two people"
    (c,) = store.constraints()
    assert (c.kind, c.a, c.b, c.audit_id, c.operator) == ("cannot", ["x3"], ["x1", "x2"], record["id"], "bob")
    assert [s["tracklet_id"] for s in client.get(f"/identities/{new}/timeline").json()["sightings"]] == ["x3"]


def test_identities_of_two_zones_are_not_merged(store):
    gids, _ = _small(store)
    for tid in ("y1", "y2"):  # Y was linked by the matcher of zone north
        store.r.hset(f"{store.ns}:tracklet:{tid}", "zone", "north")
    client = TestClient(create_app(store))
    before = (store.audit(), store.constraints(), store.link("y1").global_id)
    resp = client.post(f"/identities/{gids['X']}/merge", json={"from": [gids["Y"]], "operator": "a"})
    assert resp.status_code == 422 and "zone-local" in resp.text and "north" in resp.text
    assert (store.audit(), store.constraints(), store.link("y1").global_id) == before  # nothing written
    ok = client.post(f"/identities/{gids['X']}/merge", json={"from": [gids["Z"]], "operator": "a"})
    assert ok.status_code == 200  # both in zone default


def _sides(c) -> tuple[str, list[str], list[str]]:
    return c.kind, sorted(c.a), sorted(c.b)


def test_purges_take_their_tracklets_out_of_the_constraints(store):
    """A purged person must not live on in the operators' constraints: purging an identity or a camera
    removes its tracklets there, and a constraint left without tracklets on a side goes."""
    gids, _ = _small(store)
    x, y, z = gids["X"], gids["Y"], gids["Z"]
    client = TestClient(create_app(store))
    assert client.post(f"/identities/{x}/merge", json={"from": [y], "operator": "a"}).status_code == 200
    split = client.post(f"/identities/{x}/split", json={"tracklets": ["x3"], "operator": "a"}).json()
    assert client.post(f"/identities/{x}/merge", json={"from": [z], "operator": "a"}).status_code == 200
    first = store.constraints()
    assert [_sides(c) for c in first] == [("must", ["x1", "x2", "x3"], ["y1", "y2"]),
                                          ("cannot", ["x3"], ["x1", "x2", "y1", "y2"]),
                                          ("must", ["x1", "x2", "y1", "y2"], ["z1"])]
    assert store.purge_identity(split["new_global_id"]) == 1  # x3 alone
    assert [_sides(c) for c in store.constraints()] == [
        ("must", ["x1", "x2"], ["y1", "y2"]), ("must", ["x1", "x2", "y1", "y2"], ["z1"])]
    assert store.purge_camera("left") == 2  # x1 and z1
    after = store.constraints()
    assert [_sides(c) for c in after] == [("must", ["x2"], ["y1", "y2"])]
    assert (after[0].audit_id, after[0].wall_s, after[0].operator) == \
        (first[0].audit_id, first[0].wall_s, first[0].operator)  # the rest of the decision kept whole
    assert client.get("/constraints").json() == [c.to_json() for c in after]


@pytest.mark.parametrize("route, body, status, needle", [
    ("merge", {"from": ["@X"], "operator": "a"}, 422, "itself"),
    ("merge", {"from": ["G999999"], "operator": "a"}, 404, "unknown"),
    ("merge", {"from": [], "operator": "a"}, 422, "from"),
    ("merge", {"from": ["@Y", "@Y"], "operator": "a"}, 422, "repeat"),
    ("merge", {"from": ["@Y"]}, 422, "operator"),
    ("merge", {"from": ["@Y"], "operator": "   "}, 422, "operator"),
    ("merge", {"from": ["@Y"], "operator": "a", "force": True}, 422, "force"),
    ("split", {"tracklets": ["x1", "x2", "x3"], "operator": "a"}, 422, "empty"),
    ("split", {"tracklets": ["y1"], "operator": "a"}, 422, "not members"),
    ("split", {"tracklets": [], "operator": "a"}, 422, "tracklets"),
    ("split", {"tracklets": "x1", "operator": "a"}, 422, "tracklets"),
])
def test_merge_and_split_validation(store, route, body, status, needle):
    gids, _ = _small(store)
    body = json.loads(json.dumps(body).replace('"@X"', json.dumps(gids["X"])).replace('"@Y"', json.dumps(gids["Y"])))
    client = TestClient(create_app(store))
    before = (store.audit(), [store.link(t).global_id for t in ("x1", "y1")])
    resp = client.post(f"/identities/{gids['X']}/{route}", json=body)
    assert resp.status_code == status, resp.text
    assert needle in resp.text
    assert (store.audit(), [store.link(t).global_id for t in ("x1", "y1")]) == before  # nothing written
    assert store.constraints() == []
    assert client.post("/identities/G999999/split", json={"tracklets": ["x1"], "operator": "a"}).status_code == 404


def test_operator_routes_need_the_token(store):
    gids, _ = _small(store)
    client = TestClient(create_app(store, token="s3cret-token"))
    body = {"from": [gids["Y"]], "operator": "mallory"}
    for path, payload in ((f"/identities/{gids['X']}/merge", body),
                          (f"/identities/{gids['X']}/split", {"tracklets": ["x1"], "operator": "m"}),
                          ("/search", {"tracklet_id": "x1"})):
        assert client.post(path, json=payload).status_code == 401
        assert client.post(path, json=payload, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert store.audit() == [] and store.link("y1").global_id == gids["Y"]
    ok = client.post(f"/identities/{gids['X']}/merge", json=body, headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200


def test_openapi_documents_the_operator_routes(store):
    spec = TestClient(create_app(store)).get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in (("/identities", "get"), ("/identities/{global_id}/timeline", "get"),
                         ("/identities/{global_id}/crops", "get"), ("/identities/{global_id}/merge", "post"),
                         ("/identities/{global_id}/split", "post"), ("/cameras/{camera}/sightings", "get"),
                         ("/search", "post"), ("/constraints", "get"), ("/links", "get")):
        op = paths[path][method]
        assert op["summary"], path
        assert "$ref" in json.dumps(op["responses"]["200"]), path  # a response model
    assert paths["/identities"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] \
        .endswith("/IdentityPage")
    assert set(paths["/search"]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert "from" in spec["components"]["schemas"]["MergeRequest"]["properties"]
    assert {p["name"] for p in paths["/identities"]["get"]["parameters"]} >= {
        "offset", "limit", "camera", "since", "until", "min_cameras"}


def test_importing_the_query_modules_imports_no_heavy_library():
    code = ("import sys, stages.query, stages.query_api, stages.matcher.search, stages.reid.embedder, "
            "pipeline.cli_operator, pipeline.cli;"
            "print(sorted(m for m in ('torch', 'ultralytics', 'tensorrt', 'cv2') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
