"""The stage runner: consume → decode → process → publish → commit, plus process start-up.

A consuming stage (re-id, matcher) is a class with ``setup()``, ``process(records) -> list[Output]``
and ``close()``; it never touches Kafka. :class:`StageRunner` owns the loop:

1. poll up to ``max_batch`` messages (waiting at most ``max_wait_ms``);
2. decode each into the stage's record type — a message that fails goes to the dead-letter topic;
3. call ``stage.process`` on the batch; if it raises, retry the messages one by one so that only the
   poison ones are dead-lettered; :class:`TransientError` (a store or broker outage) is instead
   retried with backoff, forever, without committing;
4. publish the outputs and wait until the broker acknowledged each (failed sends are retried; an
   output too large for the limits is dead-lettered as a truncated envelope);
5. commit the consumed offsets — only now, so a crash replays the batch (stages are idempotent).

Rebalances: :func:`run_consuming_stage` subscribes with a rebalance listener. Its callbacks run inside
``poll``, i.e. between batches, when every record polled so far has been processed. On revocation the
runner commits any processed offsets whose commit had failed, then calls the stage's optional
``on_revoke(partitions)``; on assignment, the stage's optional ``on_assign(partitions)`` (e.g. the
matcher drops, or rebuilds from Redis, the state of the partitions' zones). ``partitions`` are
kafka-python ``TopicPartition`` s. A stage without these methods is unaffected.

A poll that fails because the broker is unreachable (restarting) is retried with backoff; nothing was
consumed, so nothing is lost.

Every process starts through :func:`setup_process`: logging tagged with the camera id, SIGTERM/SIGINT
handlers that set a stop event (the current batch finishes and is committed), and a process title.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pipeline import metrics
from pipeline.bus import CheckedSender, DeliveryError, dead_letter
from pipeline.config import LimitsConfig
from pipeline.messages import MessageError, decode
from pipeline.redact import RedactingFormatter

log = logging.getLogger(__name__)


class TransientError(RuntimeError):
    """An infrastructure failure (store or broker unavailable): retry later, do not dead-letter."""


@dataclasses.dataclass(frozen=True)
class Output:
    """A message a stage wants published: ``value`` bytes to ``topic`` keyed by ``key``."""

    topic: str
    key: str
    value: bytes


class Stage(Protocol):
    """What :class:`StageRunner` drives (optionally also ``idle()``, ``on_assign(partitions)`` and
    ``on_revoke(partitions)``; see the module docstring)."""

    def setup(self) -> None: ...

    def process(self, records: list[Any]) -> list[Output]: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class RunnerStats:
    """Counts since the runner started."""

    consumed: int = 0
    processed: int = 0
    dead_lettered: int = 0
    published: int = 0
    last_message_monotonic: float = dataclasses.field(default_factory=time.monotonic)


class StageRunner:
    """Drive a consuming stage against Kafka; see the module docstring for the loop.

    Args:
        stage: The stage (already constructed; ``setup`` is called by :meth:`run`).
        name: Stage name for logs, metrics and dead-letter headers (``reid``, ``matcher``).
        consumer: A kafka-python consumer subscribed to the input topic, auto-commit off.
        producer: A kafka-python producer for outputs and dead letters.
        record_type: The record class the stage accepts (messages of another schema are poison).
        dead_letter_topic: Where poison messages go.
        max_batch: Messages per poll at most.
        max_wait_ms: Poll timeout, ms.
        stop: Event that ends the loop after the current batch.
        limits: Message bounds enforced at decode and publish (defaults of :class:`LimitsConfig`).
        send_retries: Re-sends of an output or dead letter whose send failed, per attempt round.
        delivery_timeout_s: Seconds to wait for the broker's acknowledgements of one batch.
        on_ready: Called once, when the consumer first has partitions assigned (the stage takes input).
    """

    def __init__(self, stage: Stage, name: str, consumer: Any, producer: Any, record_type: type,
                 dead_letter_topic: str, max_batch: int, max_wait_ms: int, stop: threading.Event,
                 limits: LimitsConfig | None = None, send_retries: int = 3, delivery_timeout_s: float = 60.0,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.limits = limits or LimitsConfig()
        self.send_retries = send_retries
        self.delivery_timeout_s = delivery_timeout_s
        self.stage = stage
        self.name = name
        self.consumer = consumer
        self.producer = producer
        self.record_type = record_type
        self.dead_letter_topic = dead_letter_topic
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.stop = stop
        self.on_ready = on_ready
        self.stats = RunnerStats()
        self._uncommitted: dict[Any, Any] = {}  # processed offsets whose commit failed, per partition

    def partitions_revoked(self, partitions: Sequence[Any]) -> None:
        """Rebalance callback (inside ``poll``): commit what was processed on ``partitions`` but not
        committed yet, then tell the stage (``on_revoke``). Failures are logged, never raised: the
        uncommitted messages are replayed by the partitions' next owner (stages are idempotent)."""
        from kafka.errors import KafkaError

        parts = list(partitions)
        log.info("%s: partitions revoked: %s", self.name, _describe(parts))
        pending = {tp: om for tp, om in self._uncommitted.items() if tp in set(parts)}
        if pending:
            try:
                self.consumer.commit(pending)
                for tp in pending:
                    self._uncommitted.pop(tp, None)
            except KafkaError as exc:
                log.warning("%s: commit on revocation failed (%s: %s); the next owner replays those messages",
                            self.name, type(exc).__name__, exc)
        for tp in parts:
            self._uncommitted.pop(tp, None)
        self._notify("on_revoke", parts)

    def partitions_assigned(self, partitions: Sequence[Any]) -> None:
        """Rebalance callback (inside ``poll``): tell the stage (``on_assign``)."""
        parts = list(partitions)
        log.info("%s: partitions assigned: %s", self.name, _describe(parts))
        self._notify("on_assign", parts)

    def _notify(self, hook: str, partitions: list[Any]) -> None:
        method = getattr(self.stage, hook, None)
        if method is None:
            return
        try:
            method(partitions)
        except Exception:  # noqa: BLE001 - kafka-python would swallow it; say so loudly instead
            log.exception("%s: stage %s failed", self.name, hook)

    def run(self, idle_exit_s: float | None = None) -> RunnerStats:
        """Loop until ``stop`` is set (or, once partitions are assigned, no message came for
        ``idle_exit_s`` seconds).

        Returns:
            The counts.
        """
        from kafka.errors import KafkaError

        self.stage.setup()
        outage_delay = 0.5
        try:
            while not self.stop.is_set():
                try:
                    polled = self.consumer.poll(timeout_ms=self.max_wait_ms, max_records=self.max_batch)
                except KafkaError as exc:  # the broker is restarting: nothing was consumed, wait and rejoin
                    log.warning("%s: poll failed (%s: %s); retrying in %.1f s", self.name, type(exc).__name__, exc,
                                outage_delay)
                    self.stop.wait(outage_delay)
                    outage_delay = min(outage_delay * 2, 10.0)
                    continue
                outage_delay = 0.5
                messages = [m for batch in polled.values() for m in batch]
                if self.on_ready is not None and self.consumer.assignment():
                    log.info("%s: ready, consuming %d partition(s)", self.name, len(self.consumer.assignment()))
                    self.on_ready()
                    self.on_ready = None
                if not messages:
                    self._update_lag()
                    self._idle()
                    if not self.consumer.assignment():  # still joining the group: not idle yet
                        self.stats.last_message_monotonic = time.monotonic()
                    elif idle_exit_s is not None and time.monotonic() - self.stats.last_message_monotonic > idle_exit_s:
                        break
                    continue
                self.stats.last_message_monotonic = time.monotonic()
                self._handle(messages)
                self._commit(polled)
                self._update_lag()
        finally:
            self.stage.close()
        return self.stats

    # ----------------------------------------------------------------------------------------------
    def _idle(self) -> None:
        """Give a stage with an ``idle()`` method (the matcher's re-association) the quiet moment; a
        transient failure there is logged and tried again at the next quiet moment."""
        idle = getattr(self.stage, "idle", None)
        if idle is None:
            return
        try:
            idle()
        except TransientError as exc:
            log.error("%s: idle work failed, retrying later: %s", self.name, exc)

    def _handle(self, messages: Sequence[Any]) -> None:
        self.stats.consumed += len(messages)
        good: list[tuple[Any, Any]] = []
        for msg in messages:
            try:
                good.append((msg, decode(msg.value, self.record_type, self.limits)))
            except MessageError as exc:
                metrics.REJECTED.labels(stage=self.name, kind=exc.kind).inc()
                self._dead_letter(msg, f"decode: {exc}")
        if not good:
            return
        outputs = self._process_with_retry([r for _, r in good], good)
        self._publish(outputs)
        self.stats.published += len(outputs)

    def _publish(self, outputs: list[Output]) -> None:
        """Send ``outputs`` and wait until the broker acknowledged every one.

        A send that fails after the client's and :class:`CheckedSender`'s retries is retried with
        backoff until it succeeds (nothing is committed meanwhile); an output larger than the limits is
        dead-lettered as a truncated envelope instead of blocking the stage.

        Raises:
            DeliveryError: ``stop`` was set while outputs were still unacknowledged.
        """
        from kafka.errors import MessageSizeTooLargeError

        pending = list(outputs)
        delay = 0.5
        while pending:
            too_large: dict[str, BaseException] = {}

            def note(ident: str, exc: BaseException) -> None:
                if isinstance(exc, MessageSizeTooLargeError):
                    too_large[ident] = exc

            sender = CheckedSender(self.producer, self.send_retries, self.delivery_timeout_s,
                                   self.limits.max_message_bytes, on_failure=note, context=self.name)
            for i, out in enumerate(pending):
                sender.send(out.topic, out.key.encode("utf-8"), out.value, ident=str(i))
            _, failed = sender.finish()
            retry = []
            for ident in failed:
                out = pending[int(ident)]
                if ident in too_large:
                    metrics.REJECTED.labels(stage=self.name, kind="output_oversized").inc()
                    self._dead_letter(_OutputAsMessage(out), f"publish: output too large: {too_large[ident]}")
                else:
                    retry.append(out)
            pending = retry
            if pending:
                if self.stop.is_set():
                    raise DeliveryError(f"{self.name}: {len(pending)} output(s) unacknowledged at shutdown; "
                                        f"the batch is not committed and will be replayed")
                log.error("%s: %d output(s) not acknowledged, retrying in %.1f s", self.name, len(pending), delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def _process_with_retry(self, records: list[Any], pairs: list[tuple[Any, Any]]) -> list[Output]:
        delay = 0.5
        while True:
            try:
                try:
                    out = self.stage.process(records)
                    self.stats.processed += len(records)
                    return out
                except TransientError:
                    raise
                except Exception as exc:  # noqa: BLE001 - isolate the poison message(s)
                    if len(records) == 1:
                        self._dead_letter(pairs[0][0], f"process: {type(exc).__name__}: {exc}")
                        return []
                    log.warning("%s: batch of %d failed (%s); retrying one by one", self.name, len(records), exc)
                    outputs: list[Output] = []
                    for msg, rec in pairs:
                        outputs.extend(self._process_with_retry([rec], [(msg, rec)]))
                    return outputs
            except TransientError as exc:
                if self.stop.is_set():
                    raise
                log.error("%s: transient failure, retrying in %.1f s: %s", self.name, delay, exc)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def _dead_letter(self, msg: Any, reason: str) -> None:
        """Dead-letter ``msg``, retrying with backoff while the broker does not acknowledge.

        Raises:
            DeliveryError: ``stop`` was set before the dead letter was acknowledged.
        """
        delay = 0.5
        while True:
            try:
                dead_letter(self.producer, self.dead_letter_topic, self.name, msg, reason, self.limits,
                            timeout_s=self.delivery_timeout_s)
                break
            except DeliveryError as exc:
                if self.stop.is_set():
                    raise
                log.error("%s: %s; retrying in %.1f s", self.name, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
        self.stats.dead_lettered += 1

    def _commit(self, polled: dict[Any, list[Any]]) -> None:
        from kafka.errors import CommitFailedError, KafkaError
        from kafka.structs import OffsetAndMetadata

        offsets = {tp: OffsetAndMetadata(batch[-1].offset + 1, "", -1) for tp, batch in polled.items() if batch}
        if offsets:
            self._uncommitted.update(offsets)
            try:
                self.consumer.commit(offsets)
                for tp in offsets:
                    self._uncommitted.pop(tp, None)
            except (CommitFailedError, KafkaError) as exc:  # a rebalance or broker restart: replayed later
                log.warning("%s: commit failed (%s: %s); the batch will be replayed (stages are idempotent)",
                            self.name, type(exc).__name__, exc)

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                pos = self.consumer.position(tp, timeout_ms=100)
            except Exception:  # noqa: BLE001 - lag is best effort
                continue
            if pos is not None:
                metrics.CONSUMER_LAG.labels(stage=self.name, topic=tp.topic, partition=str(tp.partition)).set(
                    max(high - pos, 0)
                )


def _describe(partitions: Sequence[Any]) -> str:
    """``topic[0,2]`` for log lines."""
    by_topic: dict[str, list[int]] = {}
    for tp in partitions:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return ", ".join(f"{t}{sorted(p)}" for t, p in sorted(by_topic.items())) or "none"


def rebalance_listener(runner_ref: Callable[[], StageRunner | None]) -> Any:
    """A ``kafka.ConsumerRebalanceListener`` forwarding to the :class:`StageRunner` that
    ``runner_ref()`` returns (None: not built yet, the event is only logged)."""
    from kafka import ConsumerRebalanceListener

    class _Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            runner = runner_ref()
            if runner is not None:
                runner.partitions_revoked(revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            runner = runner_ref()
            if runner is not None:
                runner.partitions_assigned(assigned)

    return _Listener()


@dataclasses.dataclass(frozen=True)
class _OutputAsMessage:
    """An :class:`Output` shaped like a consumed message, to dead-letter it (it has no offset)."""

    out: Output

    @property
    def topic(self) -> str:
        return self.out.topic

    partition = -1
    offset = -1
    headers: tuple = ()

    @property
    def key(self) -> bytes:
        return self.out.key.encode("utf-8")

    @property
    def value(self) -> bytes:
        return self.out.value


def run_consuming_stage(bus_cfg: Any, stage: Stage, name: str, topic: str, group_id: str, record_type: type,
                        max_batch: int, max_wait_ms: int, stop: threading.Event,
                        idle_exit_s: float | None = None, limits: LimitsConfig | None = None,
                        on_ready: Callable[[], None] | None = None) -> RunnerStats:
    """Create the topics, a group consumer of ``topic`` and a producer, and drive ``stage`` with them.

    Args:
        bus_cfg: The :class:`~pipeline.config.BusConfig`.
        stage: The stage to drive.
        name: Stage name (logs, metrics, client id, dead-letter headers).
        topic: Input topic.
        group_id: Consumer group.
        record_type: Record class of the input messages.
        max_batch: Messages per poll at most.
        max_wait_ms: Poll timeout, ms.
        stop: Event that ends the loop after the current batch.
        idle_exit_s: Exit after this long without messages (None: run until stopped).
        limits: Message bounds; None uses ``bus_cfg.limits``.
        on_ready: Called once the consumer has its partitions (see :class:`StageRunner`).

    Returns:
        The runner's counts.

    Raises:
        BusError: The broker is unreachable.
    """
    from pipeline.bus import ensure_topics, make_consumer, make_producer

    ensure_topics(bus_cfg)
    built: list[StageRunner] = []
    consumer = make_consumer(bus_cfg, topic, group_id, name, max_poll_records=max_batch,
                             listener=rebalance_listener(lambda: built[0] if built else None))
    try:
        producer = make_producer(bus_cfg, name)
    except BaseException:
        consumer.close()  # its group membership and network thread end with the failed start
        raise
    try:
        runner = StageRunner(stage, name, consumer, producer, record_type, bus_cfg.topics.dead_letter, max_batch,
                             max_wait_ms, stop, limits=limits or bus_cfg.limits, send_retries=bus_cfg.send_retries,
                             delivery_timeout_s=bus_cfg.delivery_timeout_s, on_ready=on_ready)
        built.append(runner)
        return runner.run(idle_exit_s=idle_exit_s)
    finally:
        try:
            producer.flush(timeout=bus_cfg.delivery_timeout_s)
        finally:
            consumer.close()
            producer.close(timeout=5)


# --------------------------------------------------------------------------------------------------
# process start-up
class _CameraFilter(logging.Filter):
    def __init__(self, camera: str) -> None:
        super().__init__()
        self.camera = camera

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "camera"):
            record.camera = self.camera
        return True


def setup_logging(role: str, camera: str | None = None, level: str | int | None = None) -> None:
    """Configure root logging for a reidstream process: ``time level role[camera] logger: message``.

    Args:
        role: Process role (``camera``, ``reid``, ``matcher``, ``demo``...).
        camera: Camera id stamped on every line (``-`` when none).
        level: Log level; default from ``REIDSTREAM_LOG_LEVEL`` or INFO.
    """
    level = level or os.environ.get("REIDSTREAM_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_CameraFilter(camera or "-"))
    handler.setFormatter(RedactingFormatter(f"%(asctime)s %(levelname)s {role}[%(camera)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    debug = logging.getLevelName(level) == logging.DEBUG if isinstance(level, str) else level <= logging.DEBUG
    for noisy in ("ultralytics", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python's own warnings and errors (rejected produce requests, lost connections) are kept at
    # WARNING; repeats of one line within a minute are folded so a broker outage does not flood the log.
    logging.getLogger("kafka").setLevel(logging.DEBUG if debug else logging.WARNING)
    handler.addFilter(RepeatFilter(prefix="kafka"))


class RepeatFilter(logging.Filter):
    """Drop a log line whose (logger, level, format string) was emitted less than ``window_s`` ago;
    the next one that passes says how many were folded. Only loggers named ``prefix…`` are folded."""

    def __init__(self, window_s: float = 60.0, prefix: str = "") -> None:
        super().__init__()
        self.window_s = window_s
        self.prefix = prefix
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        last, folded = self._last.get(key, (-1e18, 0))
        if now - last < self.window_s:
            self._last[key] = (last, folded + 1)
            return False
        self._last[key] = (now, 0)
        if folded:
            record.msg = f"{record.msg} (and {folded} similar line(s) in the last {self.window_s:.0f} s)"
        return True


def install_stop_handlers(stop: threading.Event, on_stop: Callable[[], None] | None = None) -> None:
    """Set ``stop`` on SIGTERM/SIGINT (a second signal exits at once)."""

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise SystemExit(128 + signum)
        log.info("received %s, stopping after the current batch", signal.Signals(signum).name)
        stop.set()
        if on_stop:
            on_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def setup_process(role: str, camera: str | None = None) -> threading.Event:
    """Start-up shared by every long-running command: logging, process title, stop handlers.

    Returns:
        The stop event that SIGTERM/SIGINT set.
    """
    setup_logging(role, camera)
    try:
        import setproctitle  # optional

        setproctitle.setproctitle(f"reidstream {role}" + (f" {camera}" if camera else ""))
    except ImportError:
        pass
    stop = threading.Event()
    install_stop_handlers(stop)
    return stop

