"""The pipeline's held-back acknowledgement report: one telemetry call for many acknowledged
record batches, each batch's latencies measured to its own acknowledgement."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from streamer.kafka.publisher import OutBatch
from streamer.observability.telemetry import Telemetry
from streamer.stream.pipeline import Pipeline


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
    stage = SimpleNamespace(_ack_report=None, _acks=outs, telemetry=t)
    Pipeline._report_acks(stage)  # type: ignore[arg-type]
    assert stage._acks == []
    assert t.metrics.published.labels("in", "m", "1")._value.get() == 2
    assert t.metrics.dead_lettered.labels("in", "InvalidJson")._value.get() == 1
    assert np.allclose(sorted(t.latencies.values()), [0.5, 0.5, 1.0])  # not to the report
    e2e = {s.name: s.value for m in t.metrics.end_to_end.collect() for s in m.samples}
    assert e2e["streamer_end_to_end_latency_seconds_count"] == 2  # the timestamped ones
    assert abs(e2e["streamer_end_to_end_latency_seconds_sum"] - 2 * 1.5) < 0.05
    Pipeline._report_acks(stage)  # type: ignore[arg-type]  # nothing held: nothing reported
    assert t.metrics.published.labels("in", "m", "1")._value.get() == 2
