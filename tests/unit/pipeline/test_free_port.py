"""free_port() hands out ports that stay free until a server binds them."""

from __future__ import annotations

import socket

from pipeline import services


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    lo, _ = services._ephemeral_range()
    ports = [services.free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # never the same twice, even before any is bound
    if lo - 10000 >= 1000:  # outgoing connections cannot take them meanwhile
        assert all(10000 <= p < lo for p in ports)
    for p in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", p))


def test_a_taken_port_is_not_handed_out(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(services, "_ephemeral_range", lambda: (10000 + 1000, 60999))
        monkeypatch.setattr(services.random.Random, "choice", lambda self, pool: taken)
        port = services.free_port()  # every pick is the taken port: falls back to the kernel's choice
        assert port != taken
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
