"""``streamer bench --only processes``: the same records through ``runtime.processes`` = 1, 2, …

Each run is a real ``streamer run`` (a separate process tree, as in a pod), so the figure is
read from outside: records/s between the first and the last result's timestamps on the output
topic (the time each worker built them), and the time from start to the first result (model
load, warm-up, joining the group). Whether more processes help is what this row measures: on a
GPU host the loop's CPU per record (the "loop µs/rec" column) times the target rate says when
one process cannot feed the device.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from streamer.kafka.broker import create_topics, free_port

CONSUME_TIMEOUT_MS = 200


def _write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


async def multi_process(
    bootstrap: str,
    cfg_over: dict[str, Any],
    kafka_over: dict[str, Any],
    topic: str,
    n: int,
    processes: int,
    workdir: Path,
    *,
    name: str = "run",
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """``n`` records of ``topic`` (already there) through ``streamer run`` with ``processes``
    workers; records/s from the output records' timestamps. ``name`` keeps runs' output
    topics and groups apart."""
    from aiokafka import AIOKafkaConsumer

    run = f"bench-proc-{name}-{processes}"
    out_topic = f"{run}.out"
    await create_topics(bootstrap, {out_topic: 4, f"{run}.dlq": 1})
    cfg = {
        **cfg_over,
        "kafka": {
            **kafka_over,
            "group_id": f"bench-{run}",
            "input_topics": [topic],
            "output_topic": out_topic,
            "dlq_topic": f"{run}.dlq",
        },
        "runtime": {**cfg_over.get("runtime", {}), "processes": processes, "torch_threads": None},
        "http": {"port": free_port(), "host": "127.0.0.1"},
    }
    path = _write_config(workdir / f"{run}.yaml", cfg)
    log_path = path.with_suffix(".log")
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "run", "--config", str(path), stdout=log, stderr=log
        )
    consumer = AIOKafkaConsumer(
        out_topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen, first_ts, last_ts, first_at = 0, None, None, None
    try:
        deadline = started + timeout_s
        while seen < n:
            if proc.returncode is not None:
                raise RuntimeError(
                    f"streamer with {processes} processes exited with {proc.returncode}; "
                    f"see {log_path}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{seen} of {n} results within {timeout_s:.0f}s; see {log_path}")
            fetched = await consumer.getmany(timeout_ms=CONSUME_TIMEOUT_MS)
            for msgs in fetched.values():
                if first_at is None:
                    first_at = time.monotonic()
                stamps = [m.timestamp for m in msgs]
                seen += len(msgs)
                lo, hi = min(stamps), max(stamps)
                first_ts = lo if first_ts is None else min(first_ts, lo)
                last_ts = hi if last_ts is None else max(last_ts, hi)
    finally:
        await consumer.stop()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 90)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert first_ts is not None and last_ts is not None and first_at is not None
    span_s = max(1e-3, (last_ts - first_ts) / 1000)
    return {
        "processes": processes,
        "records": seen,
        "records_per_s": seen / span_s,
        "first_result_s": first_at - started,
        "exit_code": proc.returncode,
    }
