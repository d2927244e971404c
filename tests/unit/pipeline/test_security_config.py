"""Security options reach the clients: SASL/TLS for kafka-python, credentials/TLS for redis-py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.config import BusConfig, parse_config
from pipeline.store import IdentityStore
from tests.conftest import ROOT


def test_sasl_needs_credentials_and_reaches_client_options():
    with pytest.raises(ValidationError, match="needs sasl_username and sasl_password"):
        BusConfig(security_protocol="SASL_SSL")
    cfg = BusConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u",
                    sasl_password="pw-secret", ssl_cafile="/ca.pem")
    assert cfg.client_options() == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                    "sasl_plain_username": "u", "sasl_plain_password": "pw-secret",
                                    "ssl_cafile": "/ca.pem"}
    assert "pw-secret" not in repr(cfg)
    assert BusConfig().client_options() == {"security_protocol": "PLAINTEXT"}


def test_store_credentials_and_tls_reach_redis_py():
    import redis

    store = IdentityStore("redis://h:1/0", "ns", username="app", password="pw-secret", tls=True,
                          tls_ca_file="/ca.pem", retention_days=1.5)
    kwargs = store.r.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["ssl_ca_certs"]) == ("app", "pw-secret", "/ca.pem")
    assert store.r.connection_pool.connection_class is redis.SSLConnection
    assert store.retention_s == 129_600 and "pw-secret" not in store.url
    plain = IdentityStore("redis://:url-secret@h:1/0", "ns")
    assert plain.url == "redis://:***@h:1/0" and plain.r.connection_pool.connection_kwargs["password"] == "url-secret"


def test_deploy_sasl_overrides_parse():
    text = (ROOT / "deploy" / "kafka-sasl" / "reidstream-sasl.yaml").read_text()
    cfg = parse_config(text, "reidstream-sasl.yaml",
                       environ={"REIDSTREAM__BUS__SASL_PASSWORD": "x" * 12, "REIDSTREAM__STORE__PASSWORD": "y" * 12})
    assert cfg.bus.security_protocol == "SASL_PLAINTEXT" and cfg.store.username == "reidstream"
    assert cfg.reid.blur_faces and cfg.store.retention_days == 30


def test_camera_crops_must_fit_the_message_limits():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="max_crops"):
        parse_config("bus: {limits: {max_crops: 4}}\ncameras: [{name: a, source: x.avi}]\n", environ={})
    parse_config("bus: {limits: {max_crops: 8}}\ncameras: [{name: a, source: x.avi}]\n", environ={})
