"""Prometheus metrics (``/metrics``), one registry per service instance.

Names follow Prometheus conventions: ``streamer_`` prefix, base units, ``_total`` counters.
State that is cheap to read at scrape time (lag, in-flight, paused partitions, broker
connections, GPU memory) is collected then, not pushed on every record. A model is labelled the
same way on every metric: ``model`` (its name) and ``version``. The process itself is described
by prometheus_client's standard collectors (``process_*``, ``python_info``, ``python_gc_*``) on
the same registry. Every name is listed in README.md's metrics table; a test scrapes a running
service and compares the two both ways.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from streamer import __version__

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)

# How every metric about a model labels it (the loaded model's name and version).
MODEL_LABELS = ["model", "version"]


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    lag: int


class StateSource:
    """What the scrape-time collector reads; the pipeline fills in the callables."""

    def __init__(self) -> None:
        self.lag: Callable[[], Iterable[PartitionLag]] = lambda: ()
        self.in_flight: Callable[[], int] = lambda: 0
        self.held: Callable[[], int] = lambda: 0
        self.oldest_uncommitted_age_s: Callable[[], float] = lambda: 0.0
        self.paused_partitions: Callable[[], int] = lambda: 0
        self.assigned_partitions: Callable[[], int] = lambda: 0
        # (client, connected) for the consumer and the producer
        self.broker_connected: Callable[[], Iterable[tuple[str, bool]]] = tuple
        self.breaker_tripped: Callable[[], bool] = lambda: False
        # (name, version, fingerprint, task, device, dtype, memory bytes) per loaded model
        self.models: Callable[[], Iterable[tuple[str, str, str, str, str, str, int]]] = tuple
        self.cuda: bool = False


class _StateCollector(Collector):
    def __init__(self, state: StateSource) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        s = self._state
        lag = GaugeMetricFamily(
            "streamer_consumer_lag",
            "Records not yet committed: fetch high watermark minus committed offset",
            labels=["topic", "partition"],
        )
        for item in s.lag():
            lag.add_metric([item.topic, str(item.partition)], item.lag)
        yield lag
        yield GaugeMetricFamily(
            "streamer_in_flight_records",
            "Records fetched whose output is not yet acknowledged",
            value=s.in_flight(),
        )
        yield GaugeMetricFamily(
            "streamer_held_records",
            "Records not yet behind the commit point: in flight, plus finished ones waiting "
            "behind an unfinished record of their partition (bounded by max_in_flight)",
            value=s.held(),
        )
        yield GaugeMetricFamily(
            "streamer_oldest_uncommitted_age_seconds",
            "Age of the oldest fetched record not yet behind the commit point (0 when none): "
            "grows while one record's send is stuck",
            value=s.oldest_uncommitted_age_s(),
        )
        yield GaugeMetricFamily(
            "streamer_paused_partitions",
            "Partitions paused for backpressure",
            value=s.paused_partitions(),
        )
        yield GaugeMetricFamily(
            "streamer_assigned_partitions",
            "Partitions assigned to this instance",
            value=s.assigned_partitions(),
        )
        connected = GaugeMetricFamily(
            "streamer_broker_connected",
            "1 while the Kafka client (consumer, producer) holds at least one open TCP "
            "connection to a broker, 0 when all are closed (brokers unreachable)",
            labels=["client"],
        )
        for client, up in s.broker_connected():
            connected.add_metric([client], 1 if up else 0)
        yield connected
        yield GaugeMetricFamily(
            "streamer_breaker_tripped",
            "1 once the breaker tripped (the service is stopping and exits non-zero)",
            value=1 if s.breaker_tripped() else 0,
        )
        info = GaugeMetricFamily(
            "streamer_model_info",
            "Loaded model versions (several while a new version takes over)",
            labels=[*MODEL_LABELS, "fingerprint", "task", "device", "dtype"],
        )
        memory = GaugeMetricFamily(
            "streamer_model_memory_bytes",
            "Parameter and buffer bytes of each loaded model version",
            labels=MODEL_LABELS,
        )
        for *labels, mem in s.models():
            info.add_metric(labels, 1)
            memory.add_metric(labels[:2], mem)
        yield info
        yield memory
        if s.cuda:
            yield from _cuda_memory()


def _cuda_memory() -> Iterable[Metric]:
    import torch

    yield GaugeMetricFamily(
        "streamer_gpu_memory_allocated_bytes",
        "CUDA memory held by tensors",
        value=torch.cuda.memory_allocated(),
    )
    yield GaugeMetricFamily(
        "streamer_gpu_memory_reserved_bytes",
        "CUDA memory reserved by the caching allocator",
        value=torch.cuda.memory_reserved(),
    )


class Metrics:
    """Every metric the service exports. Labels stay low-cardinality (topic, model, version,
    reason, phase, client)."""

    def __init__(self, state: StateSource | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.state = state or StateSource()
        r = self.registry
        # process_* (RSS, CPU, start time, fds), python_info, python_gc_*: the standard ones.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.consumed = Counter(
            "streamer_records_consumed", "Records fetched from Kafka", ["topic"], registry=r
        )
        self.published = Counter(
            "streamer_records_published",
            "Results acknowledged by the broker, by input topic and model",
            ["topic", *MODEL_LABELS],
            registry=r,
        )
        self.dead_lettered = Counter(
            "streamer_records_dead_lettered",
            "Records sent to the DLQ and acknowledged, by input topic and reason",
            ["topic", "reason"],
            registry=r,
        )
        self.send_retries = Counter(
            "streamer_send_retries",
            "Sends (a record batch, or the topic's metadata) retried after a retriable "
            "error, by output topic",
            ["topic"],
            registry=r,
        )
        self.send_failures = Counter(
            "streamer_send_failures",
            "Records the broker did not take, by output topic and kind: rejected (too large: "
            "dead-lettered instead) or fatal (retries gave up: the service stops)",
            ["topic", "kind"],
            registry=r,
        )
        self.commit_failures = Counter(
            "streamer_commit_failures",
            "Offset commits that failed (refused after a rebalance, or a broker error)",
            registry=r,
        )
        self.last_commit = Gauge(
            "streamer_last_commit_timestamp_seconds",
            "Unix time of the last successful offset commit (the start time until the first)",
            registry=r,
        )
        self.last_commit.set(time.time())
        self.batch_size = Histogram(
            "streamer_batch_size_records",
            "Records per batch",
            MODEL_LABELS,
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "streamer_batch_tokens",
            "Padded tokens (rows x longest row) per batch",
            MODEL_LABELS,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Histogram(
            "streamer_batch_padding_ratio",
            "Share of a batch's padded tokens that are padding",
            MODEL_LABELS,
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.batch_wait = Histogram(
            "streamer_batch_wait_seconds",
            "Time from fetch until the record's batch started",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.tokenize = Histogram(
            "streamer_tokenize_duration_seconds",
            "Tokenizing one fetched chunk",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "streamer_inference_duration_seconds",
            "Model forward + postprocess for one batch",
            MODEL_LABELS,
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "streamer_end_to_end_latency_seconds",
            "From the input record's timestamp to the broker's ack of its output",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.oom = Counter(
            "streamer_out_of_memory",
            "Batches that ran out of device memory (split and retried)",
            registry=r,
        )
        self.token_budget = Gauge(
            "streamer_batch_token_budget",
            "The batcher's current padded-token budget (lowered for a while after an OOM)",
            registry=r,
        )
        self.rebalances = Counter(
            "streamer_rebalances", "Partition assignments received", registry=r
        )
        # The HTTP API (http.api): its texts share the stream's batches, ahead of the backlog.
        self.api_requests = Counter(
            "streamer_api_requests",
            "HTTP API requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.api_latency = Histogram(
            "streamer_api_request_duration_seconds",
            "HTTP API requests, received to answered, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.api_queue_wait = Histogram(
            "streamer_api_queue_wait_seconds",
            "HTTP API requests, from their tokenized texts joining the batcher to the start of "
            "their first batch (the priority lane's wait)",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.model_load = Gauge(
            "streamer_model_load_seconds",
            "Cold start by phase (fingerprint, framework, tokenizer, weights, device, warmup)",
            [*MODEL_LABELS, "phase"],
            registry=r,
        )
        self.build_info = Gauge(
            "streamer_build_info",
            "Versions of streamer and its runtime",
            _BUILD_LABELS,
            registry=r,
        )
        self.build_info.labels(*_build_values()).set(1)
        r.register(_StateCollector(self.state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


_BUILD_LABELS = ["version", "python", "torch", "transformers", "aiokafka"]


def _build_values() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "none"

    return [__version__, platform.python_version(), v("torch"), v("transformers"), v("aiokafka")]
