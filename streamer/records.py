"""The records that travel between stages, and the errors that send one to the DLQ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


@dataclass(slots=True)
class InputRecord:
    """A record as fetched from Kafka, untouched, so a DLQ copy can be byte-identical."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    fetched_at: float  # time.monotonic() when fetched
    generation: int = 0  # assignment generation of its partition (see offsets.py)
    fetched_ns: int = 0  # wall clock (ns) when fetched, for span start times

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(slots=True)
class Job:
    """One decoded record on its way through tokenize → batch → infer → publish."""

    record: InputRecord
    text: str
    record_id: Any = None
    traceparent: str | None = None
    tracestate: str | None = None
    input_ids: list[int] | None = None
    truncated: bool = False
    bound: Any = None  # the registry.Loaded model version that serves it
    tokenize_ns: tuple[int, int] = (0, 0)  # wall-clock span of its tokenize call

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids) if self.input_ids is not None else 0


class RecordError(Exception):
    """A record that cannot be processed. ``stage`` says where; the class name says what."""

    stage = "decode"

    def __init__(self, message: str, stage: str | None = None) -> None:
        super().__init__(message)
        if stage is not None:
            self.stage = stage

    @property
    def error_class(self) -> str:
        return type(self).__name__

    @property
    def message(self) -> str:
        return str(self)


class InvalidUtf8(RecordError):
    pass


class InvalidJson(RecordError):
    pass


class NotAnObject(RecordError):
    pass


class MissingText(RecordError):
    pass


class TextNotAString(RecordError):
    pass


class EmptyText(RecordError):
    pass


class RecordTooLarge(RecordError):
    pass


class TextTooLong(RecordError):
    stage = "tokenize"


class TokenizationFailed(RecordError):
    stage = "tokenize"


class InferenceFailed(RecordError):
    stage = "inference"


class ResultTooLarge(RecordError):
    stage = "publish"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What every result names, so two results are comparable only when these match."""

    name: str
    version: str
    fingerprint: str
    task: str
    device: str = "cpu"
    dtype: str = "float32"

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "fingerprint": self.fingerprint}
