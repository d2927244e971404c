"""One redaction function: URL passwords and registered secrets never reach a log line."""

from __future__ import annotations

import logging

from pipeline.config import parse_config
from pipeline.redact import RedactingFormatter, redact, register_config_secrets, register_secret


def test_url_passwords_are_masked_user_kept():
    assert redact("redis://app:hunter2@10.0.0.5:6379/0") == "redis://app:***@10.0.0.5:6379/0"
    assert redact("rediss://:p%40ss@h/1 and kafka://u:v@b:9092") == "rediss://:***@h/1 and kafka://u:***@b:9092"
    assert redact("http://example.org/a:b@c") == "http://example.org/a:b@c"  # no credentials in the authority


def test_registered_secrets_are_masked_anywhere():
    register_secret("tok-3f9a-unique")
    assert redact("Authorization: Bearer tok-3f9a-unique!") == "Authorization: Bearer ***!"
    register_secret("abc")  # too short to mask safely: ignored
    assert redact("abc") == "abc"


def test_config_secrets_are_registered():
    cfg = parse_config("store: {url: 'redis://u:url-pw-77@h:1/0', password: store-pw-88}\n"
                       "api: {token: api-token-99}\n"
                       "bus: {security_protocol: SASL_PLAINTEXT, sasl_username: u, sasl_password: sasl-pw-66}\n",
                       environ={})
    register_config_secrets(cfg)
    text = redact("url-pw-77 store-pw-88 api-token-99 sasl-pw-66")
    assert text == "*** *** *** ***"
    assert "store-pw-88" not in repr(cfg) and "store-pw-88" not in str(cfg.model_dump())


def test_formatter_redacts_arguments_and_tracebacks():
    register_secret("trace-secret-42")
    fmt = RedactingFormatter("%(message)s")
    try:
        raise RuntimeError("boom with trace-secret-42")
    except RuntimeError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "url %s", ("redis://a:trace-secret-42@h",),
                                sys.exc_info())
    out = fmt.format(rec)
    assert "trace-secret-42" not in out and "redis://a:***@h" in out and "RuntimeError" in out
