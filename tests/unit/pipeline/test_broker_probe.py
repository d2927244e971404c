"""The broker probe (:func:`pipeline.services.kafka_ready`) gives up at its deadline against a peer
that accepts connections but never answers, instead of waiting for ever (kafka-python 3 waits for a
metadata answer without a deadline)."""

from __future__ import annotations

import socket
import threading
import time

from pipeline.services import kafka_ready


def test_a_silent_broker_is_not_ready_within_the_deadline():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accept, read nothing, answer nothing
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        start = time.monotonic()
        assert kafka_ready(f"127.0.0.1:{server.getsockname()[1]}", timeout_s=1.0) is False
        assert time.monotonic() - start < 15
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        server.close()
