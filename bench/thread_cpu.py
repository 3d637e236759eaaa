"""CPU time per record of each of streamer's threads, no model (which thread is the limit?).

Runs the "streamer, no model" row of ``streamer bench`` (its settings: NullModel, the
embedded broker, 256-row batches) and reads every thread's CPU time from ``/proc/self/task``
while it runs. The event loop (``MainThread``) is what ``streamer bench`` reports as "loop
µs/rec"; the stage threads (prepare, infer, encode) and the socket writers run beside it. On a
host with cores to spare the busiest thread caps records/s at about 1e6 / its µs per record;
with float JSON results that is the encode thread (orjson writing 384 floats per record holds
the GIL).

    .venv/bin/python bench/thread_cpu.py [--records 30000] [--encoding float|base64-f16]

A short warm-up run first keeps one-off start-up work (importing torch on the inference
thread) out of the figures. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import threading
import time

from streamer import eventloop
from streamer.kafka.broker import EmbeddedBroker
from streamer.tools import bench
from streamer.tools.devtools import sample_texts
from streamer.tools.nullmodel import NullModel

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(tid: int) -> float | None:
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # the thread has ended
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _role(name: str) -> str:
    if name.startswith("streamer-send"):
        return "streamer-send (socket writers)"
    return name.rsplit("_", 1)[0] if name.startswith("streamer-") else name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=30_000)
    ap.add_argument("--encoding", default="float", help="output.embedding_encoding")
    args = ap.parse_args()

    seen: dict[int, list] = {}  # tid -> [name, first cpu, last cpu]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for t in threading.enumerate():
                cpu = _cpu_s(t.native_id) if t.native_id is not None else None
                if cpu is not None and t is not threading.current_thread():
                    seen.setdefault(t.native_id, [t.name, cpu, cpu])[2] = cpu
            stop.wait(0.05)

    # the bench's own no-model settings (batches, threads, the NullModel)
    plan = bench.make_plan(
        argparse.Namespace(records=args.records, naive_records=0, only="no-model", out=None)
    )
    over = plan.service_over(bench.NULL_MODEL, output={"embedding_encoding": args.encoding})
    broker = EmbeddedBroker()
    broker.start()
    try:
        texts = plan.raw_texts
        asyncio.run(bench._produce(broker.bootstrap, "in", texts))
        warm = sample_texts(2_000, seed=12)
        asyncio.run(bench._produce(broker.bootstrap, "warm", warm))
        eventloop.run(
            bench.end_to_end(
                broker.bootstrap,
                over,
                warm,
                "warm",
                run="warm",
                produce=False,
                model_factory=NullModel.from_config,
            )
        )
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        result = eventloop.run(
            bench.end_to_end(
                broker.bootstrap,
                over,
                texts,
                "in",
                run="threads",
                produce=False,
                model_factory=NullModel.from_config,
            )
        )
        wall = time.monotonic() - t0
        stop.set()
        sampler.join()
    finally:
        broker.stop()
    per_role: collections.Counter[str] = collections.Counter()
    for name, first, last in seen.values():
        per_role[_role(name)] += last - first
    n = len(texts)  # the bench's count: at least 20,000
    print(
        f"{n} records, {args.encoding}: {result['records_per_s']:,.0f} records/s end to end, "
        f"loop {result['loop_us_per_record']:.1f} µs/record (the bench's figure), "
        f"{wall:.1f} s including start and stop"
    )
    print(f"{'thread':34s} {'CPU µs/record':>14s}")
    for role, cpu in per_role.most_common():
        if cpu > 0:
            print(f"{role:34s} {cpu * 1e6 / n:14.1f}")


if __name__ == "__main__":
    main()
