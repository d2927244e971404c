"""In-memory stand-ins for kafka-python's consumer records, consumer and producer (unit tests only)."""

from __future__ import annotations

import dataclasses
from typing import Any

from kafka.errors import MessageSizeTooLargeError
from kafka.structs import TopicPartition


@dataclasses.dataclass
class Record:
    """A kafka-python ``ConsumerRecord`` look-alike."""

    value: bytes | None
    key: bytes | None = b"cam"
    topic: str = "in"
    partition: int = 0
    offset: int = 0
    headers: list = dataclasses.field(default_factory=list)


class Future:
    def __init__(self, exc: BaseException | None = None) -> None:
        self.is_done = True
        self.exception = exc

    def get(self, timeout: float | None = None) -> Any:
        if self.exception is not None:
            raise self.exception
        return "ok"


class Producer:
    """Keeps what was sent per topic; refuses values over ``max_bytes`` as kafka-python does."""

    def __init__(self, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.sent: dict[str, list[tuple[bytes | None, bytes | None, list]]] = {}

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: list | None = None):
        if value is not None and len(value) + len(key or b"") > self.max_bytes:
            raise MessageSizeTooLargeError(f"{len(value)} bytes > {self.max_bytes}")
        self.sent.setdefault(topic, []).append((key, value, headers or []))
        return Future()

    def flush(self, timeout: float | None = None) -> None:
        pass


class Consumer:
    """Serves ``values`` once, in polls of ``max_records``, then nothing; records commits."""

    def __init__(self, values: list[bytes | None], topic: str = "in") -> None:
        self.tp = TopicPartition(topic, 0)
        self.records = [Record(v, topic=topic, offset=i) for i, v in enumerate(values)]
        self.pos = 0
        self.committed: int | None = None

    def poll(self, timeout_ms: int = 0, max_records: int = 64) -> dict:
        batch = self.records[self.pos:self.pos + max_records]
        self.pos += len(batch)
        return {self.tp: batch} if batch else {}

    def assignment(self) -> set:
        return {self.tp}

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.records)

    def position(self, tp: TopicPartition, timeout_ms: int = 0) -> int:
        return self.pos

    def commit(self, offsets: dict) -> None:
        self.committed = offsets[self.tp].offset
