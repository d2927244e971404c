"""Integration fixtures: a real Prometheus server.

``prometheus_server`` is a session-scoped factory: each call starts the Debian/upstream ``prometheus``
binary on a free loopback port with its own config and TSDB directory, scraping the given targets every
second, and returns a :class:`PrometheusServer` once ``/-/ready`` answers. Every server started is stopped
(SIGTERM, then SIGKILL after 10 s) when the session ends. Kafka and Redis fixtures live in
``tests/conftest.py``.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

_READY_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusQueryError(RuntimeError):
    """The Prometheus HTTP API answered with ``status: error`` (bad PromQL, bad parameters)."""


@dataclass
class PrometheusServer:
    """A running Prometheus started by the ``prometheus_server`` fixture.

    Attributes:
        url: Base URL, e.g. ``http://127.0.0.1:39123``.
        process: The ``prometheus`` process.
        workdir: Directory holding ``prometheus.yml``, ``data/`` and ``prometheus.log``.
    """

    url: str
    process: subprocess.Popen
    workdir: Path
    _log: Any = field(default=None, repr=False)

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``.

        Raises:
            PrometheusQueryError: The API answered ``status: error`` (the message includes its error).
            urllib.error.URLError: Prometheus is unreachable.
        """
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; returns the vector's samples (``[{"metric": {...}, "value": [t, "v"]}, ...]``).

        Raises:
            PrometheusQueryError: Invalid PromQL, or a result that is not an instant vector.
        """
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusQueryError(f"{expr!r} gave a {data['resultType']}, not a vector")
        return data["result"]

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict]], bool] | None = None,
        timeout_s: float = 30.0,
        poll_s: float = 0.25,
    ) -> list[dict]:
        """Poll ``expr`` until ``predicate(result)`` holds (default: a non-empty result with a finite value).

        Returns:
            The first result satisfying the predicate.

        Raises:
            TimeoutError: Not satisfied within ``timeout_s`` seconds (the message has the last result
                and the tail of Prometheus' log).
        """
        if predicate is None:
            predicate = lambda result: any(math.isfinite(float(s["value"][1])) for s in result)  # noqa: E731
        deadline = time.monotonic() + timeout_s
        result: list[dict] = []
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} not satisfied after {timeout_s} s: {result}\n{self.log_tail()}")
            time.sleep(poll_s)

    def log_tail(self, n: int = 20) -> str:
        """Last ``n`` lines of Prometheus' log (for failure messages)."""
        try:
            return "\n".join((self.workdir / "prometheus.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, wait up to 10 s, then SIGKILL; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=_STOP_TIMEOUT_S)
        if self._log is not None and not self._log.closed:
            self._log.close()


def _start(binary: str, workdir: Path, config: dict) -> PrometheusServer:
    """Start Prometheus with ``config`` in ``workdir`` and wait until ``/-/ready``; retries busy ports."""
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    last_error = ""
    for _attempt in range(3):
        port = free_port()
        log = open(workdir / "prometheus.log", "ab")  # noqa: SIM115 - closed by PrometheusServer.stop
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        server = PrometheusServer(url=f"http://127.0.0.1:{port}", process=process, workdir=workdir, _log=log)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        last_error = server.log_tail()
        server.stop()
    raise RuntimeError(f"prometheus did not become ready in {_READY_TIMEOUT_S} s:\n{last_error}")


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory):
    """Factory starting real Prometheus servers; all are stopped at the end of the session.

    Call it as ``prometheus_server(targets, job="reidstream", scrape_interval="1s", rule_files=())``:

    * ``targets``: ``"host:port"`` strings serving ``/metrics``;
    * ``rule_files``: paths of rule files to load (evaluated every ``scrape_interval``).

    Returns a :class:`PrometheusServer` that answers ``/-/ready``. Its first scrape of a target can take
    up to a scrape interval or more: poll with :meth:`PrometheusServer.wait_for` (e.g. ``up == 1``).

    Skips the test when no ``prometheus`` binary is on ``PATH`` (Debian: ``apt-get install prometheus``).
    """
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not on PATH (Debian: apt-get install prometheus)")
    started: list[PrometheusServer] = []

    def start(
        targets: Sequence[str],
        job: str = "reidstream",
        scrape_interval: str = "1s",
        rule_files: Sequence[str | Path] = (),
    ) -> PrometheusServer:
        workdir = tmp_path_factory.mktemp("prometheus")
        config = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": scrape_interval,
            },
            "rule_files": [str(Path(p).resolve()) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        server = _start(binary, workdir, config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
