"""Telemetry: batch histogram observes, the latency ring, waiting for acknowledged outputs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from streamer.observability.metrics import LATENCY_BUCKETS
from streamer.observability.telemetry import LatencySample, Telemetry, observe_many, percentile
from streamer.stream.records import ModelInfo


def samples(hist: Histogram) -> dict[tuple[str, tuple], float]:
    """A histogram's samples by (name, labels), without the creation timestamps."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in hist.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def pair(labels: tuple[str, ...] = ()) -> tuple[Histogram, Histogram]:
    def make() -> Histogram:
        return Histogram(
            "h_seconds", "test", list(labels), buckets=LATENCY_BUCKETS, registry=CollectorRegistry()
        )

    return make(), make()


EDGES = np.array([0.005, 0.01, 0.1, 1.0, 300.0])  # exactly on bucket bounds: counted in them


@pytest.mark.parametrize(
    "values",
    [
        EDGES,
        np.array([0.0, -1.0, 0.0049, 0.0051, 299.9, 300.1, 1e9]),  # below, between, past +Inf
        np.arange(0, 2000, dtype=np.float64) / 512,  # exact binary fractions: exact sums
        np.array([0.25]),
    ],
)
def test_observe_many_is_observe_per_value(values: np.ndarray) -> None:
    one_by_one, batched = pair()
    for v in values:
        one_by_one.observe(float(v))
    observe_many(batched, values)
    assert samples(batched) == samples(one_by_one)


def test_observe_many_random_values_and_labelled_children() -> None:
    rng = np.random.default_rng(3)
    one_by_one, batched = pair(("model",))
    for model in ("a", "b"):
        values = rng.exponential(0.5, size=1000)
        for v in values:
            one_by_one.labels(model).observe(float(v))
        observe_many(batched.labels(model), values[:400])
        observe_many(batched.labels(model), values[400:])
    got, want = samples(batched), samples(one_by_one)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key[0].endswith("_sum"):  # numpy sums in another order than one by one
            assert got[key] == pytest.approx(value, rel=1e-12)
        else:
            assert got[key] == value, key


def test_observe_many_of_nothing_changes_nothing() -> None:
    one_by_one, batched = pair()
    observe_many(batched, np.array([]))
    assert samples(batched) == samples(one_by_one)


def test_latency_sample_ring_wraps() -> None:
    ring = LatencySample(size=5)
    assert len(ring.values()) == 0 and ring.percentile(50) is None
    ring.add(np.array([1.0, 2.0, 3.0]))
    assert sorted(ring.values()) == [1.0, 2.0, 3.0]
    ring.add(np.array([4.0, 5.0, 6.0, 7.0]))  # wraps: the oldest two are overwritten
    assert sorted(ring.values()) == [3.0, 4.0, 5.0, 6.0, 7.0]
    ring.add(np.array([8.0, 9.0, 10.0, 11.0, 12.0]))  # exactly the ring size, from mid-ring
    assert sorted(ring.values()) == [8.0, 9.0, 10.0, 11.0, 12.0]
    ring.add(np.arange(20.0, 32.0))  # more than the ring: only the newest are kept
    assert sorted(ring.values()) == [27.0, 28.0, 29.0, 30.0, 31.0]
    ring.add(np.array([]))
    assert sorted(ring.values()) == [27.0, 28.0, 29.0, 30.0, 31.0]
    assert ring.percentile(0) == 27.0 and ring.percentile(100) == 31.0
    assert ring.percentile(50) == 29.0


def test_latency_sample_matches_the_newest_values_over_many_adds() -> None:
    rng = np.random.default_rng(0)
    ring, everything = LatencySample(size=64), []
    for _ in range(50):
        values = rng.random(int(rng.integers(0, 40)))
        ring.add(values)
        everything.extend(values.tolist())
        assert sorted(ring.values()) == sorted(everything[-64:])


def test_percentile_is_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def ack(t: Telemetry, results: int = 0, dead: int = 0) -> None:
    """Outputs acknowledged and reported at once (no stage holding the report back)."""
    n = results + dead
    t.ack_metrics(
        {("in", "m", "1"): results} if results else {},
        {("in", "InvalidJson"): dead} if dead else {},
        np.full(n, 0.5),
        np.full(n, 1.0),
    )
    t.acked(n)


async def test_wait_outputs_wakes_on_acked() -> None:
    t = Telemetry()
    progress: list[int] = []
    t.subscribe(progress.append)
    waiter = asyncio.ensure_future(t.wait_outputs(5))
    await asyncio.sleep(0)
    ack(t, results=3)
    await asyncio.sleep(0)
    assert not waiter.done()  # 3 of 5
    ack(t, dead=2)
    await asyncio.wait_for(waiter, 5)
    assert t.outputs() == (3, 2)
    assert progress == [3, 2]
    assert sorted(t.latencies.values()) == [0.5] * 5
    await t.wait_outputs(5, timeout_s=0)  # already there: returns at once


async def test_wait_outputs_times_out_with_a_clear_message() -> None:
    t = Telemetry()
    ack(t, results=2)
    ack(t, dead=1)
    with pytest.raises(TimeoutError, match=r"only 2 results \+ 1 dead letters of 10"):
        await t.wait_outputs(10, timeout_s=0)
    with pytest.raises(TimeoutError, match=r"only 2 results \+ 1 dead letters of 10"):
        await t.wait_outputs(10, timeout_s=0.01)  # waits, nothing comes, gives up


def test_ack_metrics_count_by_label() -> None:
    t = Telemetry()
    t.ack_metrics(
        {("in", "m", "1"): 2, ("in2", "m", "2"): 1},
        {},
        np.array([0.1, 0.2, 0.3]),
        np.array([1.0, 2.0, 3.0]),
    )
    t.ack_metrics({}, {("in", "ResultTooLarge"): 1}, np.array([0.4]), np.array([4.0]))
    assert t.outputs() == (3, 1)
    assert t.metrics.published.labels("in2", "m", "2")._value.get() == 1
    assert t.metrics.dead_lettered.labels("in", "ResultTooLarge")._value.get() == 1
    e2e = samples(t.metrics.end_to_end)
    count = next(v for (name, _), v in e2e.items() if name.endswith("_count"))
    total = next(v for (name, _), v in e2e.items() if name.endswith("_sum"))
    assert (count, total) == (4, 10.0)


# -- model labels and what an operator alerts on --------------------------------------------------
def label_sets(t: Telemetry, name: str) -> list[dict[str, str]]:
    return [
        s.labels
        for metric in t.metrics.registry.collect()
        for s in metric.samples
        if s.name == name
    ]


def test_a_model_is_labelled_by_name_and_version_everywhere() -> None:
    t = Telemetry()
    v1 = ModelInfo("minilm", "1", "sha256:a", "feature-extraction")
    v2 = ModelInfo("minilm", "2", "sha256:b", "feature-extraction")
    for info in (v1, v2):
        t.model_loaded(info, {"weights": 0.5})
        t.batch(4, 30, 40, info, np.zeros(4))
        t.inferred(0.01, info)
    t.ack_metrics({("in", "minilm", "2"): 4}, {}, np.zeros(4), np.zeros(4))
    both = [{"model": "minilm", "version": "1"}, {"model": "minilm", "version": "2"}]
    assert label_sets(t, "streamer_model_load_seconds") == [
        {**labels, "phase": "weights"} for labels in both
    ]
    for name in (
        "streamer_batch_size_records_count",
        "streamer_batch_tokens_count",
        "streamer_batch_padding_ratio_count",
        "streamer_inference_duration_seconds_count",
    ):
        assert label_sets(t, name) == both, name
    assert label_sets(t, "streamer_records_published_total") == [
        {"topic": "in", "model": "minilm", "version": "2"}
    ]
    assert t.batch_means("minilm") == (4.0, 0.25)  # both versions of the name


def test_send_hooks_count_retries_and_failures_by_topic() -> None:
    t = Telemetry()
    t.send_retried("out")
    t.send_retried("out")
    t.send_retried("dlq")
    t.send_failed("out", "rejected", 1)
    t.send_failed("out", "fatal", 5)
    m = t.metrics
    assert m.send_retries.labels("out")._value.get() == 2
    assert m.send_retries.labels("dlq")._value.get() == 1
    assert m.send_failures.labels("out", "rejected")._value.get() == 1
    assert m.send_failures.labels("out", "fatal")._value.get() == 5


async def test_commit_records_the_last_success_and_counts_failures() -> None:
    t = Telemetry()
    m = t.metrics
    start = m.last_commit._value.get()
    assert start > 0  # the start time until the first commit

    async def answer(ok: bool) -> bool:
        return ok

    async def broken() -> bool:
        raise OSError("broker gone")

    assert await t.commit(answer(False)) is False
    assert m.commit_failures._value.get() == 1 and m.last_commit._value.get() == start
    with pytest.raises(OSError, match="broker gone"):
        await t.commit(broken())
    assert m.commit_failures._value.get() == 2 and m.last_commit._value.get() == start
    assert await t.commit(answer(True)) is True
    assert m.commit_failures._value.get() == 2 and m.last_commit._value.get() > start


class _Conn:
    def __init__(self, up: bool) -> None:
        self.up = up

    def connected(self) -> bool:
        return self.up


class _Client:
    def __init__(self, *ups: bool) -> None:
        self._conns = {i: _Conn(up) for i, up in enumerate(ups)}


class _NotStarted:
    @property
    def client(self) -> object:
        raise AssertionError("start() first")

    @property
    def producer(self) -> object:
        raise AssertionError("start() first")


def test_watch_reads_connections_and_the_breaker_at_scrape_time() -> None:
    from types import SimpleNamespace

    t = Telemetry()
    consumer = SimpleNamespace(client=SimpleNamespace(_client=_Client(False, True)))
    producer = SimpleNamespace(client=_Client(False))
    publisher = SimpleNamespace(producer=producer)
    breaker = SimpleNamespace(tripped=None)
    t.watch(consumer=consumer, publisher=publisher, breaker=breaker)

    def gauges() -> dict[str, float]:
        return {
            s.labels.get("client", s.name): s.value
            for metric in t.metrics.registry.collect()
            for s in metric.samples
            if s.name in ("streamer_broker_connected", "streamer_breaker_tripped")
        }

    assert gauges() == {"consumer": 1, "producer": 0, "streamer_breaker_tripped": 0}
    producer.client = _Client(True)
    breaker.tripped = "breaker tripped: ..."
    assert gauges() == {"consumer": 1, "producer": 1, "streamer_breaker_tripped": 1}
    t.watch(consumer=_NotStarted(), publisher=_NotStarted(), breaker=breaker)
    assert gauges() == {"consumer": 0, "producer": 0, "streamer_breaker_tripped": 1}


# -- acknowledgements counted at once, their metrics reported later ----------------------------
class HeldBack:
    """A stage that holds acknowledgements' metrics back until flushed (as the pipeline does)."""

    def __init__(self, t: Telemetry) -> None:
        self.t, self.held, self.flushes = t, 0, 0
        t.buffered(self.flush)

    def ack(self, n: int) -> None:
        self.held += n
        self.t.acked(n)

    def flush(self) -> None:
        self.flushes += 1
        if self.held:
            n, self.held = self.held, 0
            self.t.ack_metrics({("in", "m", "1"): n}, {}, np.full(n, 0.5), np.full(n, 1.0))


async def test_a_waiter_wakes_to_the_metrics_held_back_until_then() -> None:
    t = Telemetry()
    stage = HeldBack(t)
    waiter = asyncio.ensure_future(t.wait_outputs(5))
    await asyncio.sleep(0)
    stage.ack(3)
    assert stage.flushes == 0  # not reached: nothing reported yet
    assert t.metrics.published.labels("in", "m", "1")._value.get() == 0
    stage.ack(2)
    await asyncio.wait_for(waiter, 5)
    assert stage.flushes == 1 and stage.held == 0
    assert t.metrics.published.labels("in", "m", "1")._value.get() == 5
    assert sorted(t.latencies.values()) == [0.5] * 5


def test_a_scrape_and_a_read_of_the_counts_report_what_is_held_back() -> None:
    t = Telemetry()
    stage = HeldBack(t)
    stage.ack(4)
    assert b'streamer_records_published_total{model="m",topic="in",version="1"} 4.0' in t.render()
    assert stage.held == 0
    stage.ack(2)
    assert t.outputs() == (6, 0)
