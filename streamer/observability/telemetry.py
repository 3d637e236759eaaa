"""Telemetry hooks the stages call, once per batch, never once per record.

The counts live in one place, the Prometheus counters of :class:`~streamer.observability.metrics.
Metrics`; what the demo, the benchmark and the tests need beyond them is kept here: a bounded
sample of fetch→ack latencies (for percentiles finer than histogram buckets), the time of the
first fetch and the last acknowledgement, and the event loop's CPU time between them. Waiting for
"N outputs acknowledged" is :meth:`Telemetry.wait_outputs` (event wake-ups, no polling).

A model is always reported as a :class:`~streamer.stream.records.ModelInfo` and labelled
``model`` (name) and ``version`` on every metric. What an operator alerts on beyond the stream's
counts comes in here too: send retries and failures (from the publisher, :meth:`send_retried`,
:meth:`send_failed`), commits (:meth:`commit`: failures and the time of the last success) and,
read at scrape time from the objects given to :meth:`watch`, whether the Kafka clients hold a
broker connection and whether the breaker tripped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import numpy as np
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram

from streamer.config import TracingConfig
from streamer.observability.metrics import Metrics
from streamer.observability.tracing import Tracing
from streamer.stream.records import ModelInfo


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    data = sorted(values)
    if not data:
        return float("nan")
    return data[min(len(data) - 1, max(0, round(q / 100 * (len(data) - 1))))]


def counter_total(counter: PromCounter) -> float:
    """The sum of a (labelled) counter over all its label values."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def observe_many(hist: Histogram, values: np.ndarray) -> None:
    """``hist.observe(v)`` for every value, in one call per bucket instead of one per value.

    prometheus_client has no batch observe; this does what ``observe`` does (non-cumulative
    bucket counts, then the sum) with numpy, so per-record latencies cost no Python call each.
    """
    if len(values) == 0:
        return
    bounds = np.asarray(hist._upper_bounds)  # includes +Inf
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts):
        hist._buckets[i].inc(int(counts[i]))
    hist._sum.inc(float(values.sum()))


class LatencySample:
    """A bounded ring of latencies in seconds, filled a batch at a time."""

    def __init__(self, size: int = 200_000) -> None:
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0

    def add(self, values: np.ndarray) -> None:
        size = len(self._buf)
        values = values[-size:]
        start = self._n % size
        end = start + len(values)
        if end <= size:
            self._buf[start:end] = values
        else:
            cut = size - start
            self._buf[start:] = values[:cut]
            self._buf[: end - size] = values[cut:]
        self._n += len(values)

    def values(self) -> np.ndarray:
        return self._buf[: min(self._n, len(self._buf))]

    def percentile(self, q: float) -> float | None:
        v = self.values()
        return float(np.percentile(v, q, method="nearest")) if len(v) else None


class Telemetry:
    """The one object stages report to; observers subscribe to acknowledged outputs."""

    def __init__(self, tracing: TracingConfig | None = None) -> None:
        self.metrics = Metrics()
        self.tracing = Tracing(tracing or TracingConfig())
        self.latencies = LatencySample()
        self.first_fetch_at: float | None = None  # monotonic
        self.last_ack_at: float | None = None
        self._loop_cpu_at_first_fetch = 0.0
        self._loop_cpu_at_last_ack = 0.0
        self._on_outputs: list[Callable[[int], None]] = []
        self._acked = 0  # outputs acknowledged (the counters' total, without collecting them)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._kids: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._flush: Callable[[], None] | None = None

    # -- what observers read ----------------------------------------------------------------
    def outputs(self) -> tuple[int, int]:
        """(results, dead letters) acknowledged by the broker so far (the Prometheus counts)."""
        self.flush()
        m = self.metrics
        return int(counter_total(m.published)), int(counter_total(m.dead_lettered))

    def subscribe(self, fn: Callable[[int], None]) -> None:
        """``fn(n)`` after each acknowledged batch of ``n`` outputs (progress bars)."""
        self._on_outputs.append(fn)

    async def wait_outputs(self, n: int, timeout_s: float | None = None) -> None:
        """Until ``n`` outputs (results + dead letters) are acknowledged; TimeoutError after.

        Woken once, when the count reaches ``n``, not on every acknowledged batch.
        """
        if self._acked >= n:
            return
        reached = asyncio.get_running_loop().create_future()
        waiter = (n, reached)
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(reached, timeout_s)
        except TimeoutError:
            published, dead = self.outputs()
            raise TimeoutError(f"only {published} results + {dead} dead letters of {n}") from None
        finally:
            self._waiters.remove(waiter)

    def throughput(self) -> float:
        """Outputs per second from the first fetch to the last acknowledgement."""
        if self.first_fetch_at is None or self.last_ack_at is None:
            return 0.0
        span = self.last_ack_at - self.first_fetch_at
        return sum(self.outputs()) / span if span > 0 else 0.0

    def loop_cpu_per_record_s(self) -> float:
        """Event-loop thread CPU seconds per output, first fetch to last acknowledgement."""
        done = sum(self.outputs())
        cpu = self._loop_cpu_at_last_ack - self._loop_cpu_at_first_fetch
        return cpu / done if done else float("nan")

    def batch_means(self, model: str) -> tuple[float, float]:
        """(mean rows per batch, mean padding ratio) of ``model``'s batches so far."""
        m = self.metrics

        def sum_count(hist: Histogram) -> tuple[float, float]:
            s = c = 0.0
            for metric in hist.collect():
                for sample in metric.samples:
                    if sample.labels.get("model") != model:
                        continue
                    if sample.name.endswith("_sum"):
                        s += sample.value
                    elif sample.name.endswith("_count"):
                        c += sample.value
            return s, c

        rows, batches = sum_count(m.batch_size)
        pad, _ = sum_count(m.padding_ratio)
        return (rows / batches if batches else 0.0), (pad / batches if batches else 0.0)

    # -- what stages report (once per batch: on the event loop, or batch/inferred on the encode
    # thread; prometheus_client's metrics lock, and a label child cached twice is the same one)
    def _kid(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: label values (models, topics, reasons) are
        few, and ``labels()`` validates and locks on every call."""
        key = (id(metric), labels)
        kid = self._kids.get(key)
        if kid is None:
            kid = self._kids[key] = metric.labels(*labels)
        return kid

    def model_loaded(self, info: ModelInfo, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.metrics.model_load.labels(info.name, info.version, phase).set(seconds)

    def fetched(self, topic_counts: dict[str, int], now: float) -> None:
        if self.first_fetch_at is None:
            self.first_fetch_at = now
            self._loop_cpu_at_first_fetch = time.thread_time()
        for topic, n in topic_counts.items():
            self.metrics.consumed.labels(topic).inc(n)

    def tokenized(self, seconds: float) -> None:
        self.metrics.tokenize.observe(seconds)

    def batch(
        self, rows: int, tokens: int, padded: int, model: ModelInfo, waits: np.ndarray
    ) -> None:
        m = self.metrics
        kid = self._kid
        name, version = model.name, model.version
        kid(m.batch_size, name, version).observe(rows)
        kid(m.batch_tokens, name, version).observe(padded)
        kid(m.padding_ratio, name, version).observe(1 - tokens / padded if padded else 0.0)
        observe_many(m.batch_wait, waits)

    def inferred(self, seconds: float, model: ModelInfo) -> None:
        self._kid(self.metrics.inference, model.name, model.version).observe(seconds)

    def out_of_memory(self, budget: int | None, restored: int | None = None) -> None:
        """An OOM lowered the token budget to ``budget`` (or it was ``restored``)."""
        if budget is not None:
            self.metrics.oom.inc()
        self.metrics.token_budget.set(budget if budget is not None else restored or 0)

    def rebalanced(self) -> None:
        self.metrics.rebalances.inc()

    # -- the HTTP API (once per request) --------------------------------------------------------
    def api_request(self, endpoint: str, status: int, seconds: float) -> None:
        """One HTTP API request answered with ``status`` after ``seconds``."""
        m = self.metrics
        self._kid(m.api_requests, endpoint, str(status)).inc()
        self._kid(m.api_latency, endpoint).observe(seconds)

    def api_queue_wait(self, seconds: float) -> None:
        """A request's texts waited ``seconds`` in the batcher before their first batch."""
        self.metrics.api_queue_wait.observe(seconds)

    # -- what an operator alerts on ------------------------------------------------------------
    def send_retried(self, topic: str) -> None:
        """A send to ``topic`` failed with a retriable error and is retried after a backoff."""
        self._kid(self.metrics.send_retries, topic).inc()

    def send_failed(self, topic: str, kind: str, records: int) -> None:
        """``records`` sent to ``topic`` were not taken: ``rejected`` (too large, handed back
        to be dead-lettered) or ``fatal`` (retries gave up; the service stops)."""
        self._kid(self.metrics.send_failures, topic, kind).inc(records)

    async def commit(self, commit: Awaitable[bool]) -> bool:
        """Await an offset commit (True: it landed) and record how it went."""
        try:
            ok = await commit
        except Exception:
            self.metrics.commit_failures.inc()
            raise
        if ok:
            self.metrics.last_commit.set(time.time())
        else:
            self.metrics.commit_failures.inc()
        return ok

    def watch(self, *, consumer: Any, publisher: Any, breaker: Any) -> None:
        """Read at scrape time: the clients' broker connections, the breaker's state.

        ``consumer`` / ``publisher``: :class:`~streamer.kafka.consumer.Consumer` and
        :class:`~streamer.kafka.publisher.Publisher` (before or after they start); ``breaker``:
        a :class:`~streamer.stream.breaker.Breaker`.
        """
        state = self.metrics.state

        def connected() -> list[tuple[str, bool]]:
            return [
                ("consumer", _connected(lambda: consumer.client._client)),
                ("producer", _connected(lambda: publisher.producer.client)),
            ]

        state.broker_connected = connected
        state.breaker_tripped = lambda: breaker.tripped is not None

    def acked(self, n: int) -> None:
        """``n`` outputs acknowledged just now: the count, the progress, the waiters (cheap,
        on every acknowledgement). A waiter wakes to the metrics reported up to this one."""
        self.last_ack_at = time.monotonic()
        self._acked += n
        for fn in self._on_outputs:
            fn(n)
        reached = [f for want, f in self._waiters if self._acked >= want and not f.done()]
        if reached:
            self.flush()
            for f in reached:
                f.set_result(None)

    def ack_metrics(
        self,
        published: dict[tuple[str, str, str], int],
        dead_lettered: dict[tuple[str, str], int],
        fetch_latencies: np.ndarray,
        end_to_end: np.ndarray,
    ) -> None:
        """The metrics of acknowledged outputs: counts by (topic, model, version) / (topic,
        reason), the fetch→ack and record-timestamp→ack latency of each. A stage may report
        these later than :meth:`acked`, many acknowledgements at once (see :meth:`buffered`)."""
        m = self.metrics
        for (topic, model, version), n in published.items():
            self._kid(m.published, topic, model, version).inc(n)
        for (topic, reason), n in dead_lettered.items():
            self._kid(m.dead_lettered, topic, reason).inc(n)
        observe_many(m.end_to_end, end_to_end)
        self.latencies.add(fetch_latencies)

    def loop_cpu_mark(self) -> None:
        """On the event loop, soon after acknowledgements (a system call: not one per ack):
        the loop thread's CPU time that :meth:`loop_cpu_per_record_s` runs to."""
        self._loop_cpu_at_last_ack = time.thread_time()

    def buffered(self, flush: Callable[[], None]) -> None:
        """``flush()`` reports the acknowledgements a stage holds back (its
        :meth:`ack_metrics`); called before anything reads the metrics."""
        self._flush = flush

    def flush(self) -> None:
        if self._flush is not None:
            self._flush()

    def render(self) -> bytes:
        """The metrics in Prometheus' text format (``/metrics``), held-back reports included."""
        self.flush()
        return self.metrics.render()


def _connected(client: Callable[[], Any]) -> bool:
    """Whether an aiokafka client (``AIOKafkaClient``) holds an open connection to a broker.

    aiokafka keeps one connection per (broker, purpose) and drops a closed one only when it is
    next used, so each is asked (``connected()``: its stream is open and not at EOF). A client
    not started yet (``client()`` raises) counts as not connected.
    """
    try:
        conns = client()._conns
    except (AssertionError, AttributeError):
        return False
    return any(conn.connected() for conn in list(conns.values()))
