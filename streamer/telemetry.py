"""Telemetry hooks the pipeline calls at each stage.

:class:`Stats` keeps in-process counters and a bounded latency sample that the demo and the
benchmark read; :class:`~streamer.metrics.Metrics` is the Prometheus side and
:class:`~streamer.tracing.Tracing` the OpenTelemetry side. Stages call one object and never
know who listens; progress bars subscribe with :meth:`Telemetry.subscribe_done`.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from streamer.config import TracingConfig
from streamer.metrics import Metrics
from streamer.records import InputRecord, ModelInfo, RecordError
from streamer.tracing import Tracing


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    data = sorted(values)
    if not data:
        return float("nan")
    return data[min(len(data) - 1, max(0, round(q / 100 * (len(data) - 1))))]


@dataclass
class Stats:
    consumed: int = 0
    published: int = 0
    dead_lettered: int = 0
    batches: int = 0
    batch_rows: int = 0
    batch_tokens: int = 0
    padded_tokens: int = 0
    dlq_reasons: Counter[str] = field(default_factory=Counter)
    # seconds from fetch to the broker's ack of the result (bounded sample)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    first_fetch_at: float | None = None
    last_ack_at: float | None = None

    def percentile(self, q: float) -> float | None:
        return percentile(self.latencies, q) if self.latencies else None

    def throughput(self) -> float:
        if self.first_fetch_at is None or self.last_ack_at is None:
            return 0.0
        span = self.last_ack_at - self.first_fetch_at
        done = self.published + self.dead_lettered
        return done / span if span > 0 else 0.0


class Telemetry:
    """The one object stages report to. Subclass-free: observers register callbacks."""

    def __init__(self, tracing: TracingConfig | None = None) -> None:
        self.stats = Stats()
        self.metrics = Metrics()
        self.tracing = Tracing(tracing or TracingConfig())
        self._on_done: list[Callable[[InputRecord, RecordError | None, float], None]] = []

    def subscribe_done(self, fn: Callable[[InputRecord, RecordError | None, float], None]) -> None:
        """``fn(record, error_or_None, latency_s)`` for every acknowledged output."""
        self._on_done.append(fn)

    def model_loaded(self, info: ModelInfo, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.metrics.model_load.labels(f"{info.name}@{info.version}", phase).set(seconds)

    def consumed(self, records: list[InputRecord]) -> None:
        if records and self.stats.first_fetch_at is None:
            self.stats.first_fetch_at = records[0].fetched_at
        self.stats.consumed += len(records)
        counts = Counter(r.topic for r in records)
        for topic, n in counts.items():
            self.metrics.consumed.labels(topic).inc(n)

    def tokenized(self, seconds: float) -> None:
        self.metrics.tokenize.observe(seconds)

    def batch(self, records: list[InputRecord], tokens: int, padded: int, model: str) -> None:
        s, m = self.stats, self.metrics
        rows = len(records)
        s.batches += 1
        s.batch_rows += rows
        s.batch_tokens += tokens
        s.padded_tokens += padded
        m.batch_size.labels(model).observe(rows)
        m.batch_tokens.labels(model).observe(padded)
        m.padding_ratio.labels(model).observe(1 - tokens / padded if padded else 0.0)
        now = time.monotonic()
        for r in records:
            m.batch_wait.observe(now - r.fetched_at)

    def inferred(self, seconds: float, model: str) -> None:
        self.metrics.inference.labels(model).observe(seconds)

    def out_of_memory(self, budget: int | None, restored: int | None = None) -> None:
        """An OOM lowered the token budget to ``budget`` (or it was ``restored``)."""
        if budget is not None:
            self.metrics.oom.inc()
        self.metrics.token_budget.set(budget if budget is not None else restored or 0)

    def rebalanced(self) -> None:
        self.metrics.rebalances.inc()

    def published(self, record: InputRecord, model: str) -> None:
        self.metrics.published.labels(record.topic, model).inc()
        self._done(record, None)

    def dead_lettered(self, record: InputRecord, error: RecordError) -> None:
        self.stats.dlq_reasons[error.error_class] += 1
        self.metrics.dead_lettered.labels(record.topic, error.error_class).inc()
        self._done(record, error)

    def _done(self, record: InputRecord, error: RecordError | None) -> None:
        now = time.monotonic()
        s = self.stats
        if error is None:
            s.published += 1
        else:
            s.dead_lettered += 1
        if record.timestamp_ms > 0:
            self.metrics.end_to_end.observe(max(0.0, time.time() - record.timestamp_ms / 1000))
        latency = now - record.fetched_at
        s.latencies.append(latency)
        s.last_ack_at = now
        for fn in self._on_done:
            fn(record, error, latency)
