"""Kafka plumbing: topic creation, producers, consumers and the dead-letter topic.

Built on kafka-python (with ``crc32c`` for fast checksums). Works against Apache Kafka and against the
Tansu broker that ``reidstream up`` starts. Topics are created explicitly (Tansu auto-creates with 4
partitions and ignores per-topic settings). Consumers never auto-commit: the stage runner commits
offsets after a batch's results are stored and published.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from pipeline.config import BusConfig

if TYPE_CHECKING:
    from kafka import KafkaConsumer, KafkaProducer

log = logging.getLogger(__name__)


class BusError(RuntimeError):
    """The Kafka broker cannot be reached or refused an operation."""


def _servers(cfg: BusConfig) -> list[str]:
    return [s.strip() for s in cfg.bootstrap_servers.split(",") if s.strip()]


def check_broker(cfg: BusConfig) -> None:
    """Fail fast when no broker answers at ``cfg.bootstrap_servers``.

    Raises:
        BusError: Not reachable within ``cfg.connect_timeout_s``.
    """
    from pipeline.services import kafka_ready

    deadline = time.monotonic() + cfg.connect_timeout_s
    while True:
        if kafka_ready(cfg.bootstrap_servers, timeout_s=min(2.0, cfg.connect_timeout_s)):
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
        admin = KafkaAdminClient(bootstrap_servers=_servers(cfg), request_timeout_ms=int(cfg.connect_timeout_s * 1000))
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


def make_producer(cfg: BusConfig, client_id: str) -> KafkaProducer:
    """An idempotence-friendly producer: acks=all, retries, small linger, large requests allowed.

    Raises:
        BusError: The broker is unreachable.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        return KafkaProducer(
            bootstrap_servers=_servers(cfg),
            client_id=client_id,
            acks="all",
            retries=10,
            linger_ms=5,
            max_request_size=cfg.max_request_mb * 1024 * 1024,
        )
    except KafkaError as exc:
        raise BusError(f"Kafka producer for {cfg.bootstrap_servers} failed: {exc}") from None


def make_consumer(cfg: BusConfig, topic: str, group_id: str, client_id: str, max_poll_records: int = 64) -> KafkaConsumer:
    """A group consumer of ``topic`` with manual commits, starting at the earliest uncommitted offset.

    Raises:
        BusError: The broker is unreachable.
    """
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    fetch_max = cfg.max_request_mb * 1024 * 1024
    try:
        return KafkaConsumer(
            topic,
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
        )
    except KafkaError as exc:
        raise BusError(f"Kafka consumer for {cfg.bootstrap_servers} failed: {exc}") from None


def dead_letter(producer: KafkaProducer, topic: str, stage: str, message: Any, reason: str) -> None:
    """Send an unprocessable message to the dead-letter topic with headers saying why and from where.

    The original value and key are kept byte for byte; headers carry ``stage``, ``reason``,
    ``source_topic``, ``source_partition`` and ``source_offset``.
    """
    from pipeline import metrics

    headers = [
        ("stage", stage.encode()),
        ("reason", reason[:1000].encode("utf-8", "replace")),
        ("source_topic", str(message.topic).encode()),
        ("source_partition", str(message.partition).encode()),
        ("source_offset", str(message.offset).encode()),
    ]
    producer.send(topic, value=message.value, key=message.key, headers=headers)
    metrics.DEAD_LETTERS.labels(stage=stage, reason=reason.split(":", 1)[0][:60]).inc()
    log.warning("dead-lettered %s[%d]@%d from stage %s: %s", message.topic, message.partition, message.offset,
                stage, reason)


def describe_dead_letter(message: Any) -> dict[str, Any]:
    """The headers and a value preview of a dead-letter message, as a JSON-friendly dict."""
    headers = {k: v.decode("utf-8", "replace") for k, v in (message.headers or [])}
    preview = message.value[:200].decode("utf-8", "replace") if message.value else ""
    return {"offset": message.offset, **headers, "value_preview": json.dumps(preview)[1:-1]}
