"""Acknowledgements' metrics held back and reported off the loop: one telemetry call for many
acknowledged record batches, each batch's latencies measured to its own acknowledgement; a
flush reports everything so far, after a report running on the thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from streamer.kafka.publisher import OutBatch
from streamer.observability.telemetry import Telemetry
from streamer.stream import acks
from streamer.stream.acks import AckReports


def acked(n: int, *, dead: bool, fetched_at: float, acked_at: float, ts_ms: float) -> OutBatch:
    out = OutBatch("out", 0, dead, [None] * n, [b""] * n, [[]] * n, [], list(range(n)))
    out.model, out.version = "m", "1"
    out.labels = {("in", "InvalidJson" if dead else "m"): n}
    out.fetched_at = np.full(n, fetched_at)
    out.timestamps_ms = np.full(n, ts_ms)
    out.acked_at = acked_at
    return out


def test_one_report_for_many_batches_each_measured_to_its_own_ack() -> None:
    t = Telemetry()
    now = time.monotonic()
    wall_ms = time.time() * 1000
    outs = [
        acked(2, dead=False, fetched_at=now - 3.0, acked_at=now - 2.5, ts_ms=wall_ms - 4000),
        acked(1, dead=True, fetched_at=now - 2.0, acked_at=now - 1.0, ts_ms=0),  # no timestamp
    ]
    acks.report(t, outs)
    assert t.metrics.published.labels("in", "m", "1")._value.get() == 2
    assert t.metrics.dead_lettered.labels("in", "InvalidJson")._value.get() == 1
    assert np.allclose(sorted(t.latencies.values()), [0.5, 0.5, 1.0])  # not to the report
    e2e = {s.name: s.value for m in t.metrics.end_to_end.collect() for s in m.samples}
    assert e2e["streamer_end_to_end_latency_seconds_count"] == 2  # the timestamped ones
    assert abs(e2e["streamer_end_to_end_latency_seconds_sum"] - 2 * 1.5) < 0.05
    acks.report(t, [])  # nothing: nothing reported
    assert t.metrics.published.labels("in", "m", "1")._value.get() == 2


def published(t: Telemetry) -> float:
    return t.metrics.published.labels("in", "m", "1")._value.get()


async def test_a_period_of_acks_is_reported_once_on_the_stage_thread() -> None:
    t = Telemetry()
    now = time.monotonic()
    reported_on: list[str] = []
    real = acks.report

    def spy(telemetry: Telemetry, outs: list[OutBatch]) -> None:
        reported_on.append(threading.current_thread().name)
        real(telemetry, outs)

    acks.report = spy  # type: ignore[assignment]
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="stage") as pool:
            submitted: list[Callable[[], None]] = []

            def submit(fn: Callable[[], None]) -> None:
                submitted.append(fn)
                pool.submit(fn)

            reports = AckReports(t, submit, period_s=0.05)
            for _ in range(5):
                reports.add(acked(3, dead=False, fetched_at=now, acked_at=now, ts_ms=0))
            assert published(t) == 0  # held: nothing reported per ack
            await asyncio.sleep(0.2)
        assert len(submitted) == 1 and reported_on == ["stage_0"]  # one report, off the loop
        assert published(t) == 15
    finally:
        acks.report = real  # type: ignore[assignment]


async def test_a_flush_reports_everything_so_far_after_the_threads_report() -> None:
    """A report is running on the thread while the loop flushes: the flush waits for it and
    reports what came since, so a reader sees every acknowledgement."""
    t = Telemetry()
    now = time.monotonic()
    inside, release = threading.Event(), threading.Event()
    real = acks.report

    def slow(telemetry: Telemetry, outs: list[OutBatch]) -> None:
        if threading.current_thread().name.startswith("stage"):
            inside.set()
            release.wait(5)
        real(telemetry, outs)

    acks.report = slow  # type: ignore[assignment]
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="stage") as pool:
            reports = AckReports(t, pool.submit, period_s=0.01)
            reports.add(acked(2, dead=False, fetched_at=now, acked_at=now, ts_ms=0))
            await asyncio.sleep(0.05)
            assert inside.wait(5)  # the thread is reporting the first two
            reports.add(acked(5, dead=False, fetched_at=now, acked_at=now, ts_ms=0))
            threading.Timer(0.1, release.set).start()
            reports.flush()  # waits for the thread's report, then reports the five
            assert published(t) == 7
    finally:
        acks.report = real  # type: ignore[assignment]


async def test_acks_after_the_stage_thread_stopped_are_reported_by_the_flush() -> None:
    t = Telemetry()
    now = time.monotonic()

    def gone(fn: Callable[[], None]) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    reports = AckReports(t, gone, period_s=0.01)
    reports.add(acked(4, dead=True, fetched_at=now, acked_at=now, ts_ms=0))
    await asyncio.sleep(0.05)  # the hand-off found no thread: kept
    assert t.metrics.dead_lettered.labels("in", "InvalidJson")._value.get() == 0
    reports.flush()
    assert t.metrics.dead_lettered.labels("in", "InvalidJson")._value.get() == 4
