"""Acknowledged record batches' metrics: counted on the loop at once, reported off it together.

What an acknowledgement must do at once (commit accounting, progress, waiters) the pipeline
does on the event loop. Its metrics (published / dead-lettered counters by label, the fetch→ack
and end-to-end latency of every record) are reported for all the batches acknowledged within
``period_s`` in one go, and on a stage thread: one report per produce response was ~10 % of the
loop's time, and even one report per 100 ms (label counters, numpy over a few thousand
latencies, a dozen histogram buckets under prometheus_client's locks) ~1 µs of loop CPU per
record (``streamer bench --only no-model``). Latencies still run to each batch's own ack.

Nothing is lost or late where it is read: :meth:`AckReports.flush` (a ``/metrics`` scrape,
``Telemetry.outputs()``, a waiter woken, the drain) reports everything acknowledged so far on
the caller, after a report running on the thread has finished.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from streamer.kafka.publisher import OutBatch
from streamer.observability.telemetry import Telemetry

log = logging.getLogger(__name__)

ACK_REPORT_S = 0.1


class AckReports:
    """Acknowledged :class:`OutBatch` es, held and reported per period (see the module).

    ``submit(fn)`` runs ``fn()`` on a stage thread, later (fire and forget); it may raise
    ``RuntimeError`` once the thread is gone, when the next :meth:`flush` reports instead.
    """

    def __init__(
        self,
        telemetry: Telemetry,
        submit: Callable[[Callable[[], None]], None],
        period_s: float = ACK_REPORT_S,
    ) -> None:
        self._telemetry = telemetry
        self._submit = submit
        self._period_s = period_s
        self._held: list[OutBatch] = []  # this period's, on the loop
        self._queued: collections.deque[list[OutBatch]] = collections.deque()  # handed off
        self._reporting = threading.Lock()  # one report at a time, the thread's or a flush
        self._timer: asyncio.TimerHandle | None = None

    def add(self, out: OutBatch) -> None:
        """On the loop: ``out`` was acknowledged (``out.acked_at`` set)."""
        self._held.append(out)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._period_s, self._hand_off)

    def flush(self) -> None:
        """Report everything acknowledged so far, now (on the loop: it may wait for the
        thread's report in progress, ~1 ms)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue()
        self._report_queued()

    def _hand_off(self) -> None:
        self._timer = None
        self._queue()
        try:
            self._submit(self._report_queued)
        except RuntimeError:  # the stage thread is shut down: the drain's flush reports them
            pass

    def _queue(self) -> None:
        if self._held:
            self._queued.append(self._held)  # a deque's append and popleft are thread-safe
            self._held = []
        self._telemetry.loop_cpu_mark()  # on the loop: what the bench's loop CPU figure reads

    def _report_queued(self) -> None:
        with self._reporting:
            while self._queued:
                try:
                    report(self._telemetry, self._queued.popleft())
                except Exception:  # metrics only: logged, the stream goes on
                    log.exception("reporting acknowledged batches' metrics failed")


def report(telemetry: Telemetry, outs: list[OutBatch]) -> None:
    """The metrics of ``outs`` in one telemetry call: counters by label, and the latencies
    of every record to its own batch's acknowledgement."""
    if not outs:
        return
    published: Counter[tuple[str, str, str]] = Counter()
    dead: Counter[tuple[str, str]] = Counter()
    fetched, stamps, sizes, acked_at = [], [], [], []
    for out in outs:
        if out.dead_letters:
            dead.update(out.labels)
        else:
            published.update(out.result_labels())
        assert out.fetched_at is not None and out.timestamps_ms is not None  # finish() set
        fetched.append(out.fetched_at)
        stamps.append(out.timestamps_ms)
        sizes.append(len(out.fetched_at))
        acked_at.append(out.acked_at)
    acked = np.repeat(np.array(acked_at), sizes)
    fetch_latencies = acked - np.concatenate(fetched)
    ts = np.concatenate(stamps)
    wall = acked + (time.time() - time.monotonic())  # the acks on the wall clock
    live = ts > 0
    telemetry.ack_metrics(
        published, dead, fetch_latencies, np.maximum(0.0, wall[live] - ts[live] / 1000)
    )
