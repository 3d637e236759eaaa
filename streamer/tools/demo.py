"""``streamer demo`` / ``make demo``: the whole path on embedded defaults, then a summary."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamer import eventloop
from streamer.config import load_config
from streamer.kafka.broker import EmbeddedBroker, create_topics, free_port
from streamer.observability.logs import setup_logging
from streamer.tools.devtools import (
    StoppedEarly,
    bundled_model_path,
    produce_texts,
    run_until_outputs,
    sample_texts,
)

MODEL_NAME = "all-MiniLM-L6-v2"


def run_demo(records: int, model_path: Path | None, batch_size: int) -> int:
    setup_logging("WARNING")
    console = Console()
    path = model_path or bundled_model_path()
    with console.status("starting the embedded Kafka broker…"):
        broker = EmbeddedBroker()
        broker.start()
    try:
        return eventloop.run(_demo(console, broker.bootstrap, records, path, batch_size))
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
        model={"name": MODEL_NAME, "version": "1", "path": str(path), "max_length": 128},
        batching={"max_batch_size": batch_size},
        http={"port": free_port(), "host": "127.0.0.1"},
    )
    service = Service(cfg)
    with console.status(f"loading {MODEL_NAME} and warming up…"):
        t = time.perf_counter()
        await service.start()
        load_s = time.perf_counter() - t
    console.print(f"[bold]model[/] loaded and warm in {load_s:.2f}s; consumer joined")
    console.print(f"[bold]probes[/] http://127.0.0.1:{cfg.http.port}/metrics  /healthz  /readyz")

    progress = Progress(
        TextColumn("[bold]inferring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
    )
    telemetry = service.telemetry

    def advance(k: int) -> None:
        progress.update(task, advance=k, rate=f"{telemetry.throughput():6.0f} rec/s")

    with progress:
        task = progress.add_task("infer", total=n, rate="")
        telemetry.subscribe(advance)
        try:
            code = await run_until_outputs(service, n)
        except StoppedEarly as exc:
            console.print(f"[red]the pipeline failed: {exc}; see the log above[/]")
            return exc.exit_code or 1
    if code != 0:
        console.print(f"[red]the pipeline exited with {code}; see the log above[/]")
        return code

    sample = await _first_result(bootstrap, "texts.embeddings")
    published, dead = telemetry.outputs()
    table = Table(title="streamer demo", show_header=False)
    table.add_row("records", f"{published} results, {dead} dead letters")
    table.add_row("throughput", f"{telemetry.throughput():.1f} records/s")
    p50, p99 = telemetry.latencies.percentile(50), telemetry.latencies.percentile(99)
    if p50 is not None and p99 is not None:
        table.add_row(
            "latency fetch→ack",
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
            "(the whole backlog was queued at once)",
        )
    rows, padding = telemetry.batch_means(MODEL_NAME)
    if rows:
        table.add_row("batches", f"mean {rows:.1f} rows, padding {padding:.0%}")
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
