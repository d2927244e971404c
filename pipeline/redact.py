"""One redaction function for every line reidstream logs, prints or returns.

:func:`redact` hides

* the password of any URL with credentials (``redis://user:pw@host`` → ``redis://user:***@host``), and
* every secret registered with :func:`register_secret` — the config's passwords and tokens, registered by
  :func:`register_config_secrets` when a command loads its config.

Logging goes through :class:`RedactingFormatter` (installed by :func:`pipeline.runner.setup_logging`),
so tracebacks and third-party log lines are covered too; the CLI passes its ``error:`` and status lines
through :func:`redact`.

Example:
    >>> redact("Redis at redis://app:hunter2@10.0.0.5:6379/0 is down")
    'Redis at redis://app:***@10.0.0.5:6379/0 is down'
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "***"
_MIN_SECRET_LEN = 4  # shorter values would mask ordinary words

_URL_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):(?P<password>[^@/\s]+)@")
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: Any) -> None:
    """Mask ``value`` (a ``str`` or pydantic ``SecretStr``) wherever it appears from now on.

    Values shorter than 4 characters are ignored (they would mask ordinary text); ``None`` is a no-op.
    """
    if value is None:
        return
    text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    if len(text) < _MIN_SECRET_LEN:
        return
    with _lock:
        _secrets.add(text)
        decoded = unquote(text)
        if decoded != text:
            _secrets.add(decoded)


def url_password(url: str) -> str | None:
    """The password part of ``url`` (percent-decoded), or None."""
    try:
        pw = urlsplit(url).password
    except ValueError:
        return None
    return unquote(pw) if pw else None


def register_config_secrets(cfg: Any) -> None:
    """Register every secret of a :class:`~pipeline.config.Config`: Redis and SASL passwords, the API
    token, and a password embedded in ``store.url``."""
    register_secret(cfg.store.password)
    register_secret(url_password(cfg.store.url))
    register_secret(cfg.bus.sasl_password)
    register_secret(cfg.api.token)


def redact(text: Any) -> str:
    """``text`` (any object, via ``str``) with URL passwords and registered secrets replaced by ``***``."""
    out = _URL_CREDENTIALS.sub(lambda m: f"{m['head']}:{MASK}@", str(text))
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in out:
            out = out.replace(secret, MASK)
    return out


class RedactingFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose whole output (message, arguments, traceback) is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
