"""The demo job: every stage of the pipeline as separate processes over the configured cameras.

:func:`run_demo` starts the local services when the configured ones are not reachable, launches one
``reidstream camera`` process per camera plus ``reidstream reid`` and ``reidstream matcher``, waits
until every tracklet the cameras published has a link in Redis and the matcher has re-associated
them all (so the identities are final), stops the stages and writes
``links.json``, ``identities.json`` and ``report.html`` (plus ``logs/``) into the output directory.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import services
from pipeline.bus import ensure_topics
from pipeline.cli_common import EXIT_SOURCE_INCOMPLETE
from pipeline.config import Config
from pipeline.store import IdentityStore

log = logging.getLogger(__name__)


class DemoError(RuntimeError):
    """A demo process failed or the demo timed out."""


def ensure_services(cfg: Config) -> None:
    """Start local Tansu/Redis when the configured endpoints do not answer.

    Raises:
        ServiceError: They could not be started.
    """
    st = services.status(cfg.bus.bootstrap_servers, cfg.store.url, cfg.bus.client_options(),
                         services.redis_options(cfg.store))
    if all(st.values()):
        return
    s = cfg.services
    password = cfg.store.password.get_secret_value() if cfg.store.password else None
    state = services.up(s.data_dir, s.kafka_port, s.redis_port, s.kafka_storage, redis_password=password,
                        redis_username=cfg.store.username, s3_port=s.s3_port, s3_endpoint=s.s3_endpoint)
    log.info("local services: kafka %s, redis %s", state["kafka"].address, state["redis"].address)


ADAPTED_DIR = "adapted"
"""``services.data_dir/adapted/<namespace>/``: where ``reidstream adapt`` output is picked up by the demo."""


def adapted_model(cfg: Config) -> tuple[dict[str, str], str] | None:
    """The adapted network the demo serves, if ``reidstream adapt --output DATA_DIR/adapted/<namespace>``
    wrote one: ``(REIDSTREAM__* overrides for the stage processes, description)``; None otherwise."""
    path = Path(cfg.services.data_dir) / ADAPTED_DIR / cfg.store.namespace / "overrides.json"
    if not path.is_file():
        return None
    try:
        overrides = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    model = overrides.get("REIDSTREAM__REID__MODEL__TYPE", "?")
    return overrides, f"adapted {model} ({overrides.get('REIDSTREAM__REID__MODEL__CHECKPOINT')})"


def _spawn(args: list[str], log_path: Path, threads: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "REIDSTREAM_TORCH_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    fh = open(log_path, "ab")  # noqa: SIM115 - closed when the process is reaped
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)
    proc._log_handle = fh  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc._log_handle.close()  # type: ignore[attr-defined]


def _last_error(log_path: Path) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[-1]


def run_demo(cfg: Config, config_path: Path, output: Path, fresh: bool = False, timeout_s: float = 1800.0,
             console: Any = None, stop_services: bool = False) -> dict[str, Any]:
    """Run the pipeline end to end and write the demo outputs.

    Args:
        cfg: The loaded config (its cameras are run).
        config_path: The config file, passed to the child processes.
        output: Output directory (created).
        fresh: Delete the identities stored by earlier runs in this namespace first.
        timeout_s: Overall deadline, seconds.
        console: A rich console for progress (None: no progress display).
        stop_services: Stop the local services at the end.

    The re-id stage serves the adapted network of :func:`adapted_model` when there is one, else the
    config's (zero-shot) model.

    Returns:
        ``{"links": [...], "identities": [...], "cross_camera": int, "cameras": {name: summary},
        "model": description of the re-id model used}``.

    Raises:
        DemoError: A process failed (its last log line is quoted) or the deadline passed.
        ServiceError, BusError, StoreError: Infrastructure problems.
    """
    if not cfg.cameras:
        raise DemoError(f"{config_path}: no cameras configured")
    output.mkdir(parents=True, exist_ok=True)
    logs = output / "logs"
    logs.mkdir(exist_ok=True)
    ensure_services(cfg)
    ensure_topics(cfg.bus)
    store = IdentityStore.from_config(cfg.store)
    store.check()
    if fresh:
        log.info("fresh run: deleted %d keys of namespace %s", store.reset(), cfg.store.namespace)

    adapted = adapted_model(cfg)
    model_env, model = adapted if adapted else ({}, f"zero-shot {cfg.reid.model.type}/{cfg.reid.model.backbone}")
    log.info("re-id model: %s", model)
    cfg_arg = ["--config", str(config_path)]
    procs: dict[str, subprocess.Popen] = {}
    summaries: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        ready = {name: logs / f"{name}.ready" for name in ("matcher", "reid")}
        for path in ready.values():
            path.unlink(missing_ok=True)
        procs["matcher"] = _spawn(["matcher", *cfg_arg, "--ready-file", str(ready["matcher"])], logs / "matcher.log",
                                  1, model_env)
        procs["reid"] = _spawn(["reid", *cfg_arg, "--ready-file", str(ready["reid"])], logs / "reid.log", 1, model_env)
        _wait_ready(procs, ready, logs, min(READY_TIMEOUT_S, max(deadline - time.monotonic(), 1.0)))
        for cam in cfg.cameras:
            procs[cam.name] = _spawn(["camera", *cfg_arg, "--camera", cam.name, "--summary",
                                      str(logs / f"{cam.name}.summary.json")], logs / f"{cam.name}.log", 1)
        progress = _Progress(console, [c.name for c in cfg.cameras])
        published: list[str] = []
        while True:
            if time.monotonic() > deadline:
                raise DemoError(f"demo did not finish in {timeout_s:.0f} s; logs in {logs}")
            for name, proc in procs.items():
                code = proc.poll()
                if code is not None and (name in ("reid", "matcher") or code not in (0, EXIT_SOURCE_INCOMPLETE)):
                    raise DemoError(f"{name} process exited with code {code}: {_last_error(logs / f'{name}.log')}")
            for cam in cfg.cameras:
                path = logs / f"{cam.name}.summary.json"
                if cam.name not in summaries and procs[cam.name].poll() in (0, EXIT_SOURCE_INCOMPLETE) and path.exists():
                    summaries[cam.name] = json.loads(path.read_text())
                    if summaries[cam.name].get("source_incomplete"):
                        log.warning("camera %s: its source is truncated or corrupt (%d frames read)", cam.name,
                                    summaries[cam.name]["frames"])
                    published.extend(summaries[cam.name]["tracklet_ids"])
            linked = store.count_links(published)
            progress.update(summaries, len(published), linked, _tail_frames(logs, cfg))
            if len(summaries) == len(cfg.cameras) and linked >= len(published) and _reassociated(cfg, store):
                break
            time.sleep(0.5)
        progress.close()
    finally:
        for proc in procs.values():
            _stop(proc)
    try:
        return _write_outputs(cfg, store, output, published, summaries, model)
    finally:
        store.close()
        if stop_services:
            services.down(cfg.services.data_dir)


def _write_outputs(cfg: Config, store: IdentityStore, output: Path, published: list[str],
                   summaries: dict[str, dict[str, Any]], model: str) -> dict[str, Any]:
    """Write links.json, identities.json and report.html of the published tracklets; returns the
    result of :func:`run_demo`."""
    from pipeline.report import write_report

    wanted = set(published)
    links = [lk.to_json() for lk in store.links() if lk.tracklet_id in wanted]
    order = {tid: i for i, tid in enumerate(published)}
    links.sort(key=lambda r: (r["camera"], r["start_s"], order[r["tracklet_id"]]))
    gids = {lk["global_id"] for lk in links}
    identities = [i.to_json() for i in store.identities() if i.global_id in gids]
    thumbs = {tid: data for tid in wanted if (data := store.thumbnail(tid)) is not None}
    (output / "links.json").write_text(json.dumps(links, indent=2))
    (output / "identities.json").write_text(json.dumps(identities, indent=2))
    write_report(output / "report.html", identities, links, thumbs)
    cross = sum(1 for i in identities if len(i["cameras"]) >= 2)
    return {"links": links, "identities": identities, "cross_camera": cross, "cameras": summaries, "model": model}


READY_TIMEOUT_S = 120.0
"""How long the demo waits for the re-id stage and the matcher to consume before starting the cameras."""


def _wait_ready(procs: dict[str, subprocess.Popen], ready: dict[str, Path], logs: Path, timeout_s: float) -> None:
    """Start the cameras only once the consuming stages have their partitions: a tracklet published
    earlier would wait for the model to load and the group to form (seconds of link latency).

    Raises:
        DemoError: A stage exited, or did not get ready within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in ready.values()):
        for name in ready:
            code = procs[name].poll()
            if code is not None:
                raise DemoError(f"{name} process exited with code {code}: {_last_error(logs / f'{name}.log')}")
        if time.monotonic() > deadline:
            late = [n for n, p in ready.items() if not p.exists()]
            raise DemoError(f"{', '.join(late)} not consuming after {timeout_s:.0f} s; logs in {logs}")
        time.sleep(0.2)


def _reassociated(cfg: Config, store: IdentityStore) -> bool:
    """Whether each zone's last re-association covered every link of the zone (always true with
    re-association off): only then are the identities final and independent of arrival order."""
    if not cfg.matcher.reassociation.enabled:
        return True
    zones = [store.for_zone(z) for z in sorted({"default", *(z.name for z in cfg.zones)})]
    return all(z.reassociation_status().get("links", -1) >= n for z in zones if (n := z.count_zone_links()))


def _tail_frames(logs: Path, cfg: Config) -> dict[str, int]:
    """Frames processed per camera, from the workers' progress log lines (best effort)."""
    out = {}
    for cam in cfg.cameras:
        path = logs / f"{cam.name}.log"
        try:
            text = path.read_text(errors="replace")[-4000:]
        except OSError:
            continue
        for line in reversed(text.splitlines()):
            if f"camera {cam.name}: " in line and " frames" in line:
                words = line.split(f"camera {cam.name}: ", 1)[1].split()
                if words and words[0] in ("done,",):
                    words = words[1:]
                if words and words[0].isdigit():
                    out[cam.name] = int(words[0])
                    break
    return out


class _Progress:
    """Rich progress bars: frames per camera (when the total is known) and tracklets linked."""

    def __init__(self, console: Any, cameras: list[str]) -> None:
        self.bar = None
        if console is None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, transient=False)
        self.bar.start()
        self.cams = {c: self.bar.add_task(f"camera {c} frames", total=None) for c in cameras}
        self.links = self.bar.add_task("tracklets linked", total=None)

    def update(self, summaries: dict[str, dict], published: int, linked: int, frames: dict[str, int]) -> None:
        if self.bar is None:
            return
        for cam, task in self.cams.items():
            if cam in summaries:
                n = summaries[cam]["frames"]
                self.bar.update(task, completed=n, total=n)
            elif cam in frames:
                self.bar.update(task, completed=frames[cam])
        self.bar.update(self.links, completed=linked, total=max(published, linked) or None)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
