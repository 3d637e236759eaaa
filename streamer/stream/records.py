"""What travels between stages (per fetched chunk, never per record), and the errors that send
one record to the DLQ."""

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


@dataclass(slots=True, eq=False)
class Chunk:
    """One partition's records from one fetch: the unit that travels from fetch to commit.

    ``messages`` are aiokafka's records untouched (``offset``, ``key``, ``value``, ``headers``,
    ``timestamp``), so a DLQ copy is byte-identical. The checkpoint counts a chunk's outputs
    down in ``remaining``; the partition's commit moves past the chunk once it reaches zero.
    """

    tp: TopicPartition
    generation: int  # assignment generation of its partition (see kafka/checkpoint.py)
    messages: list[Any]
    fetched_at: float  # time.monotonic() when fetched
    fetched_ns: int = 0  # wall clock (ns) when fetched, for span start times
    remaining: int = 0  # outputs not yet acknowledged
    abandoned: bool = False  # some records were left to the next owner: never committable

    @property
    def first(self) -> int:
        return self.messages[0].offset

    @property
    def last(self) -> int:
        return self.messages[-1].offset

    def where(self, i: int) -> str:
        return f"{self.tp}@{self.messages[i].offset}"


class RecordError(Exception):
    """A record that cannot be processed. ``stage`` says where; the class name says what."""

    stage = "decode"
    # Not the input's fault (a broken tokenizer, a sticky device error, a bug in encoding):
    # when most records fail this way at once, the breaker stops the service instead.
    systemic = False

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
    systemic = True


class InferenceFailed(RecordError):
    stage = "inference"
    systemic = True


class EncodeFailed(RecordError):
    """Building the result (or its headers) raised: that record goes to the DLQ, not the
    process down (and every replica after it, on the same record)."""

    stage = "encode"
    systemic = True


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
