"""Prometheus metrics (``/metrics``), one registry per service instance.

Names follow Prometheus conventions: ``streamer_`` prefix, base units, ``_total`` counters.
State that is cheap to read at scrape time (lag, in-flight, paused partitions, process and GPU
memory) is collected then, not pushed on every record.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streamer import __version__

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


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
        # (name, version, fingerprint, task, device, dtype, memory bytes) per loaded model
        self.models: Callable[[], Iterable[tuple[str, str, str, str, str, str, int]]] = tuple
        self.cuda: bool = False


class _StateCollector(Collector):
    def __init__(self, state: StateSource) -> None:
        self._state = state
        self._proc = psutil.Process()

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
        info = GaugeMetricFamily(
            "streamer_model_info",
            "Loaded model versions (several while a new version takes over)",
            labels=["name", "version", "fingerprint", "task", "device", "dtype"],
        )
        memory = GaugeMetricFamily(
            "streamer_model_memory_bytes",
            "Parameter and buffer bytes of each loaded model version",
            labels=["name", "version"],
        )
        for *labels, mem in s.models():
            info.add_metric(labels, 1)
            memory.add_metric(labels[:2], mem)
        yield info
        yield memory
        with self._proc.oneshot():
            mem = self._proc.memory_info()
            cpu = self._proc.cpu_times()
        yield GaugeMetricFamily(
            "streamer_process_resident_memory_bytes", "Resident set size", value=mem.rss
        )
        yield CounterMetricFamily(
            "streamer_process_cpu_seconds",
            "CPU time of this process (user + system)",
            value=cpu.user + cpu.system,
        )
        if s.cuda:
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
    """Every metric the service exports. Labels stay low-cardinality (topic, reason, phase)."""

    def __init__(self, state: StateSource | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.state = state or StateSource()
        r = self.registry
        self.consumed = Counter(
            "streamer_records_consumed", "Records fetched from Kafka", ["topic"], registry=r
        )
        self.published = Counter(
            "streamer_records_published",
            "Results acknowledged by the broker, by input topic and model",
            ["topic", "model"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "streamer_records_dead_lettered",
            "Records sent to the DLQ and acknowledged, by input topic and reason",
            ["topic", "reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "streamer_batch_size_records",
            "Records per batch",
            ["model"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "streamer_batch_tokens",
            "Padded tokens (rows x longest row) per batch",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Histogram(
            "streamer_batch_padding_ratio",
            "Share of a batch's padded tokens that are padding",
            ["model"],
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
            ["model"],
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
        self.model_load = Gauge(
            "streamer_model_load_seconds",
            "Cold start by phase (fingerprint, framework, tokenizer, weights, device, warmup)",
            ["model", "phase"],
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
