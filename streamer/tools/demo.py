"""``streamer demo`` / ``make demo``: the whole path on embedded defaults, then a summary."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamer.kafka.broker import EmbeddedBroker, create_topics, free_port
from streamer.config import load_config
from streamer.tools.devtools import bundled_model_path, produce_texts, sample_texts
from streamer.observability.logs import setup_logging


def run_demo(records: int, model_path: Path | None, batch_size: int) -> int:
    setup_logging("WARNING")
    console = Console()
    path = model_path or bundled_model_path()
    with console.status("starting the embedded Kafka broker…"):
        broker = EmbeddedBroker()
        broker.start()
    try:
        return asyncio.run(_demo(console, broker.bootstrap, records, path, batch_size))
    finally:
        broker.stop()


async def _demo(console: Console, bootstrap: str, n: int, path: Path, batch_size: int) -> int:
    from streamer.app import Service

    topics = {"texts": 4, "texts.embeddings": 4, "texts.dlq": 1}
    await create_topics(bootstrap, topics)
    console.print(f"[bold]broker[/] {bootstrap}  topics: {', '.join(topics)}")
    texts = sample_texts(n)
    t = time.perf_counter()
    await produce_texts(bootstrap, "texts", texts)
    console.print(f"[bold]produced[/] {n} sentences in {time.perf_counter() - t:.2f}s")

    cfg = load_config(
        None,
        # A short session: the embedded broker holds a first join for about half of it.
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": "streamer-demo",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "request_timeout_ms": 10000,
            "fetch_max_wait_ms": 20,
        },
        model={"name": "all-MiniLM-L6-v2", "version": "1", "path": str(path), "max_length": 128},
        batching={"max_batch_size": batch_size},
        http={"port": free_port(), "host": "127.0.0.1"},
    )
    service = Service(cfg)
    with console.status("loading all-MiniLM-L6-v2 and warming up…"):
        t = time.perf_counter()
        await service.start()
        load_s = time.perf_counter() - t
    console.print(f"[bold]model[/] loaded and warm in {load_s:.2f}s; consumer joined")
    console.print(f"[bold]probes[/] http://127.0.0.1:{cfg.http.port}/metrics  /healthz  /readyz")

    done = asyncio.Event()
    progress = Progress(
        TextColumn("[bold]inferring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
    )
    stats = service.telemetry.stats

    def on_done(*_: object) -> None:
        total = stats.published + stats.dead_lettered
        progress.update(task, completed=total, rate=f"{stats.throughput():6.0f} rec/s")
        if total >= n:
            done.set()

    with progress:
        task = progress.add_task("infer", total=n, rate="")
        service.telemetry.subscribe_done(on_done)
        runner = asyncio.ensure_future(service.run())
        waiter = asyncio.ensure_future(done.wait())
        await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        service.request_stop()
        waiter.cancel()
        code = await runner
    if code != 0:
        console.print("[red]the pipeline failed; see the log above[/]")
        return code

    sample = await _first_result(bootstrap, "texts.embeddings")
    table = Table(title="streamer demo", show_header=False)
    table.add_row("records", f"{stats.published} results, {stats.dead_lettered} dead letters")
    table.add_row("throughput", f"{stats.throughput():.1f} records/s")
    p50, p99 = stats.percentile(50), stats.percentile(99)
    table.add_row(
        "latency fetch→ack",
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (the whole backlog was queued at once)",
    )
    if stats.batches:
        table.add_row(
            "batches",
            f"{stats.batches}, mean {stats.batch_rows / stats.batches:.1f} rows, "
            f"padding {1 - stats.batch_tokens / max(1, stats.padded_tokens):.0%}",
        )
    if sample is not None:
        emb = sample["result"]["embedding"]
        table.add_row("sample id", str(sample["id"]))
        table.add_row(
            "sample model",
            f"{sample['model']['name']}@{sample['model']['version']} "
            f"{sample['model']['fingerprint'][:23]}…",
        )
        table.add_row("sample source", str(sample["source"]))
        table.add_row(
            "sample embedding", f"{len(emb)} floats: [{', '.join(f'{x:.4f}' for x in emb[:5])}, …]"
        )
    console.print(table)
    return 0


async def _first_result(bootstrap: str, topic: str) -> dict | None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=5000, max_records=1)
        for msgs in batch.values():
            for m in msgs:
                return orjson.loads(m.value)
    finally:
        await consumer.stop()
    logging.getLogger(__name__).warning("no result found on %s", topic)
    return None
