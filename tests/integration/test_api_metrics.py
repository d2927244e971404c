"""The HTTP query API over a real Redis, and metrics served by a running matcher process."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline.services import free_port
from stages.matcher import CrossCameraMatcher
from stages.matcher.association import Rules
from tests.conftest import ROOT
from tests.integration.test_matcher_store import emb, noisy, unit


@pytest.fixture
def filled_store(store):
    m = CrossCameraMatcher(store, threshold=0.8, rules=Rules(center=False, transit_weight=0.0))
    m.setup()
    a = unit(1)
    m.process([emb("A1", "left", 0, 2, a), emb("B1", "left", 0, 2, unit(2)), emb("A2", "right", 3, 5, noisy(a, 3))])
    return store


def test_api_answers_like_the_query_functions(filled_store):
    from fastapi.testclient import TestClient

    from stages import query
    from stages.query import create_app

    client = TestClient(create_app(filled_store))
    assert client.get("/healthz").json() == {"ok": True}
    assert client.get("/links").json() == query.links(filled_store, limit=100)
    cross = client.get("/identities", params={"min_cameras": 2}).json()["items"]
    assert len(cross) == 1 and cross[0]["cameras"] == ["left", "right"] and sorted(cross[0]["tracklets"]) == ["A1", "A2"]
    assert {r["tracklet_id"] for r in client.get("/links", params={"cross_camera": True}).json()["items"]} == {"A1", "A2"}
    assert [r["tracklet_id"] for r in client.get("/links", params={"camera": "right"}).json()["items"]] == ["A2"]
    one = client.get("/tracklets/A2").json()
    assert one["global_id"] == cross[0]["global_id"] and one["score"] > 0.8
    assert client.get("/tracklets/nope").status_code == 404
    thumb = client.get("/tracklets/A2/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_api_and_cli_follow_merges_and_show_the_audit(store):
    from fastapi.testclient import TestClient

    from pipeline.config import ReassociationConfig
    from stages.query import create_app
    from tests.conftest import run_cli

    a = unit(30)
    m = CrossCameraMatcher(store, threshold=0.9, rules=Rules(center=False, transit_weight=0.0),
                           reassociation=ReassociationConfig(calibrate=False))
    m.setup()
    m.process([emb("A1", "left", 0, 2, a)])
    m.process([emb("A2", "right", 3, 5, noisy(a, 1, 0.35))])   # below 0.9 online: founds its own identity
    gone = store.link("A2").global_id
    m.base_threshold = 0.6
    assert m.reassociate().merges == 1
    survivor = store.link("A1").global_id
    client = TestClient(create_app(store))
    merged = client.get(f"/identities/{gone}").json()
    assert merged["global_id"] == survivor and merged["merged_from"] == gone
    assert sorted(merged["tracklets"]) == ["A1", "A2"]
    assert client.get("/identities/G999999").status_code == 404
    (record,) = client.get("/audit").json()
    assert record["kind"] == "merge" and record["from"] == gone and record["into"] == survivor
    assert client.get("/audit", params={"limit": 0}).status_code == 422
    env = {"REIDSTREAM__STORE__URL": f"redis://127.0.0.1:{store.r.connection_pool.connection_kwargs['port']}/0",
           "REIDSTREAM__STORE__NAMESPACE": store.ns}
    cfg = str(ROOT / "configs" / "demo.yaml")
    shown = run_cli("query", "identity", gone, "--config", cfg, "--format", "json", env=env, timeout=60)
    assert shown.returncode == 0 and '"merged_from"' in shown.stdout, shown.stderr
    listed = run_cli("query", "audit", "--config", cfg, "--format", "json", env=env, timeout=60)
    assert listed.returncode == 0 and '"merge"' in listed.stdout, listed.stderr
    assert run_cli("query", "identity", "G999999", "--config", cfg, env=env, timeout=60).returncode == 1


def test_matcher_process_serves_metrics(kafka_server, redis_server, unique):
    port = free_port()
    env = {"REIDSTREAM__BUS__BOOTSTRAP_SERVERS": kafka_server, "REIDSTREAM__STORE__URL": redis_server,
           "REIDSTREAM__STORE__NAMESPACE": f"m-{unique}", "REIDSTREAM__METRICS__MATCHER_PORT": str(port),
           "REIDSTREAM__BUS__TOPICS__EMBEDDINGS": f"emb-{unique}", "REIDSTREAM__MATCHER__GROUP_ID": f"g-{unique}"}
    import os

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "matcher", "--config",
                             str(ROOT / "configs" / "demo.yaml")], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
                if 'reidstream_identities{stage="matcher",zone="default"}' in body:
                    break
            except OSError:
                time.sleep(0.2)
        assert 'reidstream_identities{stage="matcher",zone="default"} 0.0' in body
        assert "reidstream_stage_latency_seconds" in body
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out  # SIGTERM: clean shutdown after the current batch
