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

    Fetched, it holds the broker's record batches unparsed (``raw``) and knows its offsets
    ``[first, end)`` and record ``count``; the prepare thread reads the records out
    (:meth:`unpack`) before anything looks at ``messages``. ``messages`` are the records as the
    broker sent them (``offset``, ``key``, ``value``, ``headers``, ``timestamp``), so a DLQ copy
    is byte-identical. The checkpoint counts a chunk's outputs down in ``remaining``; the
    partition's commit moves to ``end`` once it reaches zero.
    """

    tp: TopicPartition
    generation: int  # assignment generation of its partition (see kafka/checkpoint.py)
    messages: list[Any]
    fetched_at: float  # time.monotonic() when fetched
    fetched_ns: int = 0  # wall clock (ns) when fetched, for span start times
    remaining: int = 0  # outputs not yet acknowledged
    abandoned: bool = False  # some records were left to the next owner: never committable
    raw: list[Any] | None = None  # RawBatch-es (kafka/consumer.py) until unpacked
    first: int = -1  # first offset
    end: int = -1  # the offset after the chunk: what a commit past it names
    count: int = 0  # records

    def __post_init__(self) -> None:
        if self.raw is not None:
            self.first, self.end = self.raw[0].first, self.raw[-1].end
            self.count = sum(b.count for b in self.raw)
        elif self.messages and self.end < 0:
            self.first, self.end = self.messages[0].offset, self.messages[-1].offset + 1
            self.count = len(self.messages)

    def unpack(self) -> int:
        """Read the records out of the raw batches (on the prepare thread: this is the
        per-record part of a fetch). Returns how many there were, which differs from
        ``count`` only where compaction removed records from inside a batch."""
        if self.raw is not None:
            raw, self.raw = self.raw, None
            if len(raw) == 1:
                self.messages = raw[0].records()
            else:
                self.messages = [r for b in raw for r in b.records()]
        return len(self.messages)

    @property
    def last(self) -> int:
        return self.end - 1

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
