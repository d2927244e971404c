"""Session fixtures: a real Tansu broker and a real Redis on free loopback ports, and helpers.

Both are started once per test session from the same code ``reidstream up`` uses
(:mod:`pipeline.services`) and stopped at the end. Tests isolate themselves by topic names, consumer
groups and Redis namespaces (``unique`` fixture), never by restarting the servers.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_VIDEO = ROOT / "samples" / "vtest.avi"

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_CONFIG_DIR", str(ROOT / ".reidstream" / "ultralytics"))


def _session_service(name: str, tmp_path_factory):
    """Start the local service ``name`` (``kafka`` or ``redis``) on a free port; yield it, then stop it."""
    from pipeline import services

    binary, start = {"kafka": (services.tansu_binary, services.start_kafka),
                     "redis": (services.redis_binary, services.start_redis)}[name]
    try:
        binary()
    except services.ServiceError as exc:
        pytest.skip(f"no {name} server: {exc}")
    info = start(services.free_port(), tmp_path_factory.mktemp(name))
    yield info
    services.terminate(info.pid)


@pytest.fixture(scope="session")
def kafka_server(tmp_path_factory):
    """``host:port`` of a Tansu broker started for this session."""
    for info in _session_service("kafka", tmp_path_factory):
        yield info.address


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """``redis://`` URL of a Redis server started for this session."""
    for info in _session_service("redis", tmp_path_factory):
        yield info.address


@pytest.fixture
def unique() -> str:
    """A short unique token for topic names, groups and namespaces."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def bus_config(kafka_server, unique):
    """A :class:`BusConfig` on the session broker with this test's own topics (session timeouts short)."""
    from pipeline.config import BusConfig, TopicsConfig

    return BusConfig(bootstrap_servers=kafka_server, partitions=2, session_timeout_ms=6000,
                     heartbeat_interval_ms=1000,
                     topics=TopicsConfig(tracklets=f"tracklets-{unique}", embeddings=f"embeddings-{unique}",
                                         dead_letter=f"dead-{unique}"))


@pytest.fixture
def store(redis_server, unique):
    """An :class:`IdentityStore` on the session Redis in a namespace of its own (deleted afterwards)."""
    from pipeline.store import IdentityStore

    s = IdentityStore(redis_server, namespace=f"test-{unique}")
    yield s
    s.reset()
    s.close()


@pytest.fixture(scope="session")
def sample_video() -> Path:
    if not SAMPLE_VIDEO.is_file():
        pytest.skip(f"sample video missing: {SAMPLE_VIDEO}")
    return SAMPLE_VIDEO


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path = ROOT):
    """Run ``python -m pipeline.cli ARGS`` in a subprocess; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
