"""Kafka plumbing: topic creation, producers, consumers and the dead-letter topic.

Built on kafka-python (with ``crc32c`` for fast checksums). Works against Apache Kafka and against the
Tansu broker that ``reidstream up`` starts. Topics are created explicitly (Tansu auto-creates with 4
partitions and ignores per-topic settings). Consumers never auto-commit: the stage runner commits
offsets after a batch's results are stored and published.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.config import BusConfig, LimitsConfig

if TYPE_CHECKING:
    from kafka import KafkaConsumer, KafkaProducer

log = logging.getLogger(__name__)


DEAD_LETTER_ENVELOPE_SCHEMA = "reidstream.dead_letter_envelope.v1"


class BusError(RuntimeError):
    """The Kafka broker cannot be reached or refused an operation."""


class DeliveryError(BusError):
    """Messages were not acknowledged by the broker after every retry."""


def _servers(cfg: BusConfig) -> list[str]:
    return [s.strip() for s in cfg.bootstrap_servers.split(",") if s.strip()]


def open_client(cls: type, *topics: str, **configs: Any) -> Any:
    """``cls(*topics, **configs)``, a kafka-python ``KafkaConsumer``, ``KafkaProducer`` or ``KafkaAdminClient``,
    that leaves nothing running when its constructor fails.

    kafka-python 3 starts a client's network thread before the first bootstrap and leaves it running
    when the bootstrap fails (the constructor raises ``KafkaTimeoutError`` after
    ``bootstrap_timeout_ms``): the thread keeps retrying the broker, logging each failure, until that
    deadline, and then stays alive, one idle thread and its sockets per failed attempt. So the network
    client the constructor makes (through the documented ``kafka_client`` option) is recorded here and
    closed when the constructor raises. With kafka-python 2, which starts no thread, the close only
    releases the client's sockets.

    Args:
        cls: The kafka-python client class.
        *topics: Topics a consumer subscribes to at once (none for the other classes).
        **configs: The client's options; a ``kafka_client`` given here is still the one used.

    Returns:
        The constructed client; its caller closes it.

    Raises:
        Whatever the constructor raises (``kafka.errors.KafkaError`` for a broker that is unreachable
        or does not answer), after the cleanup.
    """
    factory = configs.pop("kafka_client", None) or cls.DEFAULT_CONFIG["kafka_client"]
    made: list[Any] = []

    def build(*args: Any, **kwargs: Any) -> Any:
        client = factory(*args, **kwargs)
        made.append(client)
        return client

    try:
        return cls(*topics, kafka_client=build, **configs)
    except BaseException:
        for client in made:
            try:
                client.close()
            except Exception as exc:  # the constructor's error is the one to report
                log.debug("closing a half-built Kafka client failed: %s", exc)
        raise


def check_broker(cfg: BusConfig) -> None:
    """Fail fast when no broker answers at ``cfg.bootstrap_servers``.

    Raises:
        BusError: Not reachable within ``cfg.connect_timeout_s``.
    """
    from pipeline.services import kafka_ready

    deadline = time.monotonic() + cfg.connect_timeout_s
    while True:
        if kafka_ready(cfg.bootstrap_servers, timeout_s=min(2.0, cfg.connect_timeout_s), **cfg.client_options()):
            return
        if time.monotonic() >= deadline:
            raise BusError(
                f"Kafka broker at {cfg.bootstrap_servers} is not reachable "
                f"(start local services with `reidstream up`, or set bus.bootstrap_servers)"
            )
        time.sleep(0.5)


def ensure_topics(cfg: BusConfig, topics: list[str] | None = None) -> None:
    """Create the pipeline's topics (``cfg.topics``, or ``topics``) when missing.

    Raises:
        BusError: The broker is unreachable or rejected the creation.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    names = topics or [cfg.topics.tracklets, cfg.topics.embeddings, cfg.topics.dead_letter]
    check_broker(cfg)
    try:
        admin = open_client(KafkaAdminClient, bootstrap_servers=_servers(cfg),
                            request_timeout_ms=int(cfg.connect_timeout_s * 1000), **cfg.client_options())
    except KafkaError as exc:
        raise BusError(f"Kafka admin connection to {cfg.bootstrap_servers} failed: {exc}") from None
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, num_partitions=cfg.partitions, replication_factor=1)])
                log.info("created topic %s (%d partitions)", name, cfg.partitions)
            except TopicAlreadyExistsError:
                pass
    except KafkaError as exc:
        raise BusError(f"creating topics {names} on {cfg.bootstrap_servers} failed: {exc}") from None
    finally:
        admin.close()


def partition_count(cfg: BusConfig, topic: str) -> int:
    """How many partitions ``topic`` has (from the broker's metadata).

    Raises:
        BusError: The broker is unreachable, or it does not know ``topic``.
    """
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    try:
        consumer = open_client(KafkaConsumer, bootstrap_servers=_servers(cfg),
                               request_timeout_ms=int(cfg.connect_timeout_s * 1000) + 500, **cfg.client_options())
    except KafkaError as exc:
        raise BusError(f"Kafka connection to {cfg.bootstrap_servers} failed: {exc}") from None
    try:
        consumer.topics()  # refreshes the metadata of every topic
        parts = consumer.partitions_for_topic(topic)
    except KafkaError as exc:
        raise BusError(f"metadata of topic {topic} on {cfg.bootstrap_servers} failed: {exc}") from None
    finally:
        consumer.close()
    if not parts:
        raise BusError(f"topic {topic} does not exist on {cfg.bootstrap_servers}")
    return len(parts)


def make_producer(cfg: BusConfig, client_id: str) -> KafkaProducer:
    """A producer with acks=all, idempotence (``cfg.idempotence``), retries, a small linger and large
    requests allowed; callers check each send's future (see :class:`CheckedSender`).

    Raises:
        BusError: The broker is unreachable.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        return open_client(
            KafkaProducer,
            bootstrap_servers=_servers(cfg),
            client_id=client_id,
            acks="all",
            enable_idempotence=cfg.idempotence,
            retries=10,
            linger_ms=5,
            max_request_size=cfg.max_request_mb * 1024 * 1024,
            delivery_timeout_ms=int(cfg.delivery_timeout_s * 1000),
            request_timeout_ms=min(30_000, int(cfg.delivery_timeout_s * 1000) - 5),
            **cfg.client_options(),
        )
    except KafkaError as exc:
        raise BusError(f"Kafka producer for {cfg.bootstrap_servers} failed: {exc}") from None


def make_consumer(cfg: BusConfig, topic: str, group_id: str, client_id: str, max_poll_records: int = 64,
                  listener: Any = None) -> KafkaConsumer:
    """A group consumer of ``topic`` with manual commits, starting at the earliest uncommitted offset.

    Args:
        cfg: The bus settings.
        topic: Topic to subscribe to.
        group_id: Consumer group.
        client_id: Client id (logs on the broker).
        max_poll_records: Records one poll returns at most.
        listener: A ``kafka.ConsumerRebalanceListener`` told of partitions revoked and assigned (its
            callbacks run inside ``poll``), or None.

    Raises:
        BusError: The broker is unreachable.
    """
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    fetch_max = cfg.max_request_mb * 1024 * 1024
    try:
        consumer = open_client(
            KafkaConsumer,
            *(() if listener is not None else (topic,)),
            bootstrap_servers=_servers(cfg),
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_records=max_poll_records,
            max_partition_fetch_bytes=fetch_max,
            fetch_max_bytes=fetch_max,
            max_poll_interval_ms=600_000,
            **cfg.client_options(),
        )
    except KafkaError as exc:
        raise BusError(f"Kafka consumer for {cfg.bootstrap_servers} failed: {exc}") from None
    if listener is not None:
        consumer.subscribe([topic], listener=listener)
    return consumer


def _truncated_envelope(message: Any, stage: str, reason: str, preview_bytes: int) -> bytes:
    """A small JSON stand-in for a poison message too large to dead-letter whole."""
    value = message.value or b""
    key = message.key or b""
    return json.dumps({
        "schema": DEAD_LETTER_ENVELOPE_SCHEMA, "stage": stage, "reason": reason[:1000],
        "source_topic": str(message.topic), "source_partition": message.partition, "source_offset": message.offset,
        "original_value_bytes": len(value), "original_key_b64": base64.b64encode(key[:256]).decode(),
        "original_headers": {k: v[:256].decode("utf-8", "replace") for k, v in (message.headers or [])},
        "value_head_b64": base64.b64encode(value[:preview_bytes]).decode(),
    }).encode()


def dead_letter(producer: KafkaProducer, topic: str, stage: str, message: Any, reason: str,
                limits: LimitsConfig | None = None, timeout_s: float = 30.0) -> bool:
    """Send an unprocessable message to the dead-letter topic with headers saying why and from where,
    and wait for the broker's acknowledgement.

    The original value and key are kept byte for byte when they fit ``limits.max_message_bytes`` and the
    producer's request size; otherwise a truncated envelope (JSON: reason, source topic/partition/offset,
    original size, key and headers, the first ``limits.dead_letter_preview_bytes`` bytes base64) is sent
    instead, with header ``truncated: 1``. Headers carry ``stage``, ``reason``, ``source_topic``,
    ``source_partition`` and ``source_offset``.

    Returns:
        True when the original was sent whole, False when the truncated envelope was sent.

    Raises:
        DeliveryError: The broker did not acknowledge the dead letter (a broker outage: retry later).
    """
    from kafka.errors import KafkaError, MessageSizeTooLargeError

    from pipeline import metrics

    limits = limits or LimitsConfig()
    headers = [
        ("stage", stage.encode()),
        ("reason", reason[:1000].encode("utf-8", "replace")),
        ("source_topic", str(message.topic).encode()),
        ("source_partition", str(message.partition).encode()),
        ("source_offset", str(message.offset).encode()),
    ]
    value = message.value
    size = len(value or b"") + len(message.key or b"")
    whole = size <= limits.max_message_bytes
    envelope_headers = [*headers, ("truncated", b"1"), ("original_bytes", str(size).encode())]

    def send(v: bytes | None, k: bytes | None, h: list) -> None:
        producer.send(topic, value=v, key=k, headers=h).get(timeout=timeout_s)

    try:
        try:
            if not whole:
                raise MessageSizeTooLargeError(f"{size} bytes over limits.max_message_mb")
            send(value, message.key, headers)
        except MessageSizeTooLargeError:
            whole = False
            try:
                send(_truncated_envelope(message, stage, reason, limits.dead_letter_preview_bytes), None,
                     envelope_headers)
            except MessageSizeTooLargeError:  # a tiny producer limit: drop the preview too
                send(_truncated_envelope(message, stage, reason[:200], 0), None, envelope_headers)
    except KafkaError as exc:
        raise DeliveryError(f"dead-lettering {message.topic}[{message.partition}]@{message.offset} failed: "
                            f"{type(exc).__name__}: {exc}") from exc
    metrics.DEAD_LETTERS.labels(stage=stage, reason=reason.split(":", 1)[0][:60]).inc()
    log.warning("dead-lettered %s[%d]@%d from stage %s%s: %s", message.topic, message.partition, message.offset,
                stage, "" if whole else f" (truncated envelope, {size} bytes)", reason[:500])
    return whole


@dataclasses.dataclass
class _Pending:
    ident: str
    topic: str
    key: bytes | None
    value: bytes
    future: Any
    attempts: int = 1


class CheckedSender:
    """Send messages and check every acknowledgement: a failed send is re-sent up to ``retries`` times
    (beyond the client's own retries), then counted and logged as undelivered.

    Args:
        producer: A kafka-python producer (acks=all).
        retries: Re-sends after a failure, per message.
        timeout_s: Seconds to wait for outstanding acknowledgements in :meth:`finish`.
        max_value_bytes: Largest value sent; larger ones are refused at once (counted undelivered).
        on_failure: Called with ``(ident, exception)`` for each message given up on.
        context: Text prefixed to log lines (e.g. ``camera left``).

    Example:
        >>> sender = CheckedSender(producer, retries=3)        # doctest: +SKIP
        >>> sender.send("tracklets", b"left", value, ident="left-1-0")
        >>> acked, failed = sender.finish()
    """

    def __init__(self, producer: Any, retries: int = 3, timeout_s: float = 60.0,
                 max_value_bytes: int | None = None, on_failure: Callable[[str, BaseException], None] | None = None,
                 context: str = "") -> None:
        self.producer = producer
        self.retries = retries
        self.timeout_s = timeout_s
        self.max_value_bytes = max_value_bytes
        self.on_failure = on_failure
        self.context = context
        self.acked = 0
        self.failed: list[str] = []
        self._pending: list[_Pending] = []

    def send(self, topic: str, key: bytes | None, value: bytes, ident: str = "") -> None:
        """Queue ``value`` for ``topic``; never raises for a broker failure (see :meth:`finish`)."""
        if self.max_value_bytes is not None and len(value) > self.max_value_bytes:
            from kafka.errors import MessageSizeTooLargeError

            self._give_up(ident or topic,
                          MessageSizeTooLargeError(f"{len(value)} bytes over the limit of {self.max_value_bytes}"))
            return
        item = _Pending(ident or topic, topic, key, value, None)
        self._submit(item)
        self._pending.append(item)
        if len(self._pending) >= 256:
            self._reap(block=False)

    def _submit(self, item: _Pending) -> None:
        from kafka.errors import KafkaError

        try:
            item.future = self.producer.send(item.topic, key=item.key, value=item.value)
        except (KafkaError, ValueError) as exc:  # raised synchronously: too large, closed, no metadata
            item.future = _Failed(exc)

    def _give_up(self, ident: str, exc: BaseException) -> None:
        self.failed.append(ident)
        log.error("%snot delivered: %s (%s: %s)", f"{self.context}: " if self.context else "", ident,
                  type(exc).__name__, exc)
        if self.on_failure is not None:
            self.on_failure(ident, exc)

    def _reap(self, block: bool) -> None:
        from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

        deadline = time.monotonic() + self.timeout_s
        while self._pending:
            if block:
                try:
                    self.producer.flush(timeout=max(deadline - time.monotonic(), 0.1))
                except KafkaTimeoutError:  # unfinished futures are handled below (and at the deadline)
                    time.sleep(0.05)
            keep: list[_Pending] = []
            resend: list[_Pending] = []
            for item in self._pending:
                fut = item.future
                if not fut.is_done:
                    keep.append(item)
                elif fut.exception is None:
                    self.acked += 1
                elif item.attempts <= self.retries and not isinstance(fut.exception, MessageSizeTooLargeError):
                    log.warning("%sresending %s after %s: %s (attempt %d)", f"{self.context}: " if self.context else "",
                                item.ident, type(fut.exception).__name__, fut.exception, item.attempts + 1)
                    item.attempts += 1
                    resend.append(item)
                else:
                    self._give_up(item.ident, fut.exception)
            if resend:  # one backoff per round, growing with the attempts
                time.sleep(min(0.2 * max(i.attempts for i in resend), 2.0))
                for item in resend:
                    self._submit(item)
            self._pending = keep + resend
            if not block:
                return
            if time.monotonic() > deadline:
                for item in self._pending:
                    self._give_up(item.ident, TimeoutError(f"no acknowledgement within {self.timeout_s:.0f} s"))
                self._pending = []

    def finish(self) -> tuple[int, list[str]]:
        """Wait for every outstanding acknowledgement (re-sending failures).

        Returns:
            ``(acknowledged count, idents given up on)``.
        """
        self._reap(block=True)
        return self.acked, list(self.failed)


class _Failed:
    """A future that failed before it was queued (``producer.send`` raised)."""

    is_done = True

    def __init__(self, exc: BaseException) -> None:
        self.exception = exc


def describe_dead_letter(message: Any) -> dict[str, Any]:
    """The headers and a value preview of a dead-letter message, as a JSON-friendly dict."""
    headers = {k: v.decode("utf-8", "replace") for k, v in (message.headers or [])}
    preview = message.value[:200].decode("utf-8", "replace") if message.value else ""
    return {"offset": message.offset, **headers, "value_preview": json.dumps(preview)[1:-1]}
