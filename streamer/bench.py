"""``streamer bench`` / ``make bench``: the same records and model, three ways.

1. **offline** — the model alone: tokenize everything, sort by length, run batches back to back
   (the ceiling for this model and machine);
2. **streamer** — end to end through the embedded broker: from the first fetch to the broker's
   ack of the last result;
3. **per-record** — a hand-written consumer that tokenizes and runs the model once per record,
   then produces its result (what most teams start with).

Prints a table and writes JSON. Figures are for reading side by side, not for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from streamer.broker import EmbeddedBroker, create_topics
from streamer.config import ModelConfig, load_config
from streamer.devtools import bundled_model_path, produce_texts, sample_texts
from streamer.logs import setup_logging


def _pct(data: list[float], q: float) -> float:
    if not data:
        return float("nan")
    data = sorted(data)
    return data[min(len(data) - 1, round(q / 100 * (len(data) - 1)))]


def offline(model_cfg: ModelConfig, texts: list[str], batch_size: int, threads: int) -> dict:
    import torch

    from streamer.model import HFTextModel

    torch.set_num_threads(threads)
    model = HFTextModel(model_cfg)
    model.load()
    model.warmup(batch_size, batch_size * model.max_length)
    t = time.perf_counter()
    encs = model.tokenize(texts)
    order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
    batch_times = []
    for start in range(0, len(order), batch_size):
        rows = [encs[i].ids for i in order[start : start + batch_size]]
        bt = time.perf_counter()
        model.postprocess(model.forward(rows), len(rows))
        batch_times.append(time.perf_counter() - bt)
    total = time.perf_counter() - t
    return {
        "records": len(texts),
        "records_per_s": len(texts) / total,
        "batch_p50_ms": _pct(batch_times, 50) * 1000,
        "batch_p99_ms": _pct(batch_times, 99) * 1000,
    }


async def end_to_end(bootstrap: str, cfg_over: dict, texts: list[str], topic: str) -> dict:
    from streamer.app import Service

    await create_topics(bootstrap, {topic: 4, f"{topic}.out": 4, f"{topic}.dlq": 1})
    await produce_texts(bootstrap, topic, texts)
    cfg = load_config(
        None,
        **{
            **cfg_over,
            "kafka": {
                "bootstrap_servers": bootstrap,
                "group_id": f"bench-{topic}",
                "input_topics": [topic],
                "output_topic": f"{topic}.out",
                "dlq_topic": f"{topic}.dlq",
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
                "request_timeout_ms": 10000,
            },
            "http": {"port": 0},
        },
    )
    service = Service(cfg)
    await service.start()
    done = asyncio.Event()
    stats = service.telemetry.stats

    def on_done(*_: object) -> None:
        if stats.published + stats.dead_lettered >= len(texts):
            done.set()

    service.telemetry.subscribe_done(on_done)
    runner = asyncio.ensure_future(service.run())
    await asyncio.wait_for(done.wait(), timeout=3600)
    service.request_stop()
    await runner
    lat = list(stats.latencies)
    return {
        "records": stats.published,
        "records_per_s": stats.throughput(),
        "latency_p50_ms": _pct(lat, 50) * 1000,
        "latency_p99_ms": _pct(lat, 99) * 1000,
        "mean_batch_rows": stats.batch_rows / max(1, stats.batches),
        "padding_ratio": 1 - stats.batch_tokens / max(1, stats.padded_tokens),
    }


async def per_record(
    bootstrap: str, model_path: Path, texts: list[str], topic: str, threads: int
) -> dict:
    """The naive consumer: one tokenizer call and one forward per record."""
    import torch
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    await create_topics(bootstrap, {topic: 1, f"{topic}.out": 1})
    await produce_texts(bootstrap, topic, texts)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"naive-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    latencies, done, start = [], 0, None
    try:
        while done < len(texts):
            batch = await consumer.getmany(timeout_ms=1000)
            for msgs in batch.values():
                for m in msgs:
                    t0 = time.perf_counter()
                    start = start or t0
                    text = orjson.loads(m.value)["text"]
                    enc = tok(text, truncation=True, max_length=128, return_tensors="pt")
                    with torch.inference_mode():
                        hidden = model(**enc).last_hidden_state
                    emb = torch.nn.functional.normalize(hidden.mean(1), dim=1)[0].numpy()
                    fut = await producer.send(
                        f"{topic}.out",
                        orjson.dumps({"embedding": emb}, option=orjson.OPT_SERIALIZE_NUMPY),
                    )
                    await fut
                    await consumer.commit()
                    latencies.append(time.perf_counter() - t0)
                    done += 1
        total = time.perf_counter() - (start or time.perf_counter())
    finally:
        await consumer.stop()
        await producer.stop()
    return {
        "records": done,
        "records_per_s": done / total if total else 0.0,
        "latency_p50_ms": _pct(latencies, 50) * 1000,
        "latency_p99_ms": _pct(latencies, 99) * 1000,
    }


def run_bench(args: argparse.Namespace) -> int:
    setup_logging("WARNING")
    console = Console()
    path = args.model_path or bundled_model_path()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    texts = sample_texts(args.records, seed=11)
    model_cfg = {"name": "bench", "version": "1", "path": str(path), "max_length": 128}
    results: dict[str, Any] = {
        "machine": {
            "cpu_threads": threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "model": str(path),
        "records": args.records,
    }
    broker = EmbeddedBroker()
    broker.start()
    try:
        with console.status("offline: the model alone, length-sorted batches of 64…"):
            results["offline"] = offline(ModelConfig(**model_cfg), texts, 64, threads)
        with console.status("streamer: end to end through the embedded broker…"):
            results["streamer"] = asyncio.run(
                end_to_end(
                    broker.bootstrap,
                    {
                        "model": model_cfg,
                        "batching": {"max_batch_size": 64, "max_wait_ms": 20},
                        "runtime": {"torch_threads": threads},
                    },
                    texts,
                    "bench-e2e",
                )
            )
        with console.status(f"per-record consumer on {args.naive_records} records…"):
            results["per_record"] = asyncio.run(
                per_record(
                    broker.bootstrap, path, texts[: args.naive_records], "bench-naive", threads
                )
            )
    finally:
        broker.stop()

    off, e2e, naive = results["offline"], results["streamer"], results["per_record"]
    results["ratios"] = {
        "streamer_vs_offline": e2e["records_per_s"] / off["records_per_s"],
        "streamer_vs_per_record": e2e["records_per_s"] / naive["records_per_s"],
    }
    table = Table(title=f"streamer bench — {args.records} records, MiniLM fp32, {threads} threads")
    for col in ("path", "records/s", "p50 ms", "p99 ms", "notes"):
        table.add_column(col, justify="right" if col != "path" and col != "notes" else "left")
    table.add_row(
        "offline (model alone)",
        f"{off['records_per_s']:.1f}",
        f"{off['batch_p50_ms']:.0f}",
        f"{off['batch_p99_ms']:.0f}",
        "per batch of 64, length-sorted",
    )
    table.add_row(
        "streamer end to end",
        f"{e2e['records_per_s']:.1f}",
        f"{e2e['latency_p50_ms']:.0f}",
        f"{e2e['latency_p99_ms']:.0f}",
        f"fetch→ack, backlog; {e2e['mean_batch_rows']:.0f} rows/batch, "
        f"{e2e['padding_ratio']:.0%} padding",
    )
    table.add_row(
        "per-record consumer",
        f"{naive['records_per_s']:.1f}",
        f"{naive['latency_p50_ms']:.0f}",
        f"{naive['latency_p99_ms']:.0f}",
        f"{naive['records']} records, one forward each",
    )
    console.print(table)
    r = results["ratios"]
    console.print(
        f"streamer / offline = {r['streamer_vs_offline']:.2f}×   "
        f"streamer / per-record = {r['streamer_vs_per_record']:.1f}×"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {args.out}")
    return 0
