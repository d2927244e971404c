"""The broker probe (:func:`pipeline.services.kafka_ready`) gives up at its deadline against a peer
that accepts connections but never answers, instead of waiting for ever (kafka-python 3 waits for a
metadata answer without a deadline), and neither it nor a client whose constructor fails
(:func:`pipeline.bus.open_client`) leaves a network thread behind that keeps retrying the broker
(kafka-python 3 starts one before its first bootstrap and does not stop it when the bootstrap fails)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.bus import open_client
from pipeline.services import kafka_ready


@contextlib.contextmanager
def silent_broker() -> Iterator[str]:
    """A loopback peer that accepts connections, reads nothing and answers nothing: its address."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        server.close()


def kafka_threads() -> set[threading.Thread]:
    """Live threads of kafka-python's network layer (kafka-python 3 names them ``kafka-io-<client id>``)."""
    return {t for t in threading.enumerate() if t.name.startswith("kafka-io")}


def wait_gone(threads: set[threading.Thread], within_s: float) -> set[threading.Thread]:
    """Those of ``threads`` still alive after up to ``within_s`` seconds."""
    end = time.monotonic() + within_s
    while time.monotonic() < end and any(t.is_alive() for t in threads):
        time.sleep(0.1)
    return {t for t in threads if t.is_alive()}


def test_a_silent_broker_is_not_ready_within_the_deadline():
    before = kafka_threads()
    with silent_broker() as address:
        start = time.monotonic()
        assert kafka_ready(address, timeout_s=1.0) is False
        assert time.monotonic() - start < 15
        # the probe's client gives up with the probe and stops its network thread
        assert not wait_gone(kafka_threads() - before, 5.0)


@pytest.mark.parametrize("kind", ["consumer", "admin"])
def test_a_client_whose_bootstrap_fails_leaves_no_network_thread(kind):
    from kafka import KafkaConsumer
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    cls = {"consumer": KafkaConsumer, "admin": KafkaAdminClient}[kind]
    if "bootstrap_timeout_ms" not in cls.DEFAULT_CONFIG:
        pytest.skip("kafka-python 2 has no bootstrap deadline (and starts no network thread)")
    made: list[object] = []

    def recording(*args, **kwargs):  # a caller's own `kafka_client` is still the one used
        client = cls.DEFAULT_CONFIG["kafka_client"](*args, **kwargs)
        made.append(client)
        return client

    before = kafka_threads()
    with silent_broker() as address:
        with pytest.raises(KafkaError):
            open_client(cls, bootstrap_servers=[address], bootstrap_timeout_ms=1000, kafka_client=recording)
        assert len(made) == 1
        assert not wait_gone(kafka_threads() - before, 5.0)
