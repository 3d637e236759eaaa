"""``streamer bench`` / ``make bench``: the same records and model, every way we can run them.

One run, one set of records, one table:

1. **offline** — the model alone, per backend and precision: tokenize everything, sort by
   length, run batches back to back (the ceiling for that backend on this machine). Its
   outputs are compared with float32 torch's: the ``agreement`` column (mean / worst-row cosine
   for embeddings);
2. **streamer** — end to end through the embedded broker, per backend and precision with float
   output, then each output encoding with float32 torch: from the first fetch to the broker's
   ack of the last result;
3. **per-record** — a hand-written consumer that tokenizes and runs the model once per record,
   then produces its result (what most teams start with).

Variants are named ``BACKEND-PRECISION`` (``torch-fp32``, ``torch-int8``, ``torch-bf16``,
``onnxruntime-fp32``, ``onnxruntime-int8``, ``openvino-fp32``, ``openvino-bf16``; on CUDA
``torch-fp16``, ``torch-bf16``). Those whose runtime is not installed, or whose precision the
device lacks, are listed as skipped. Prints the table and writes JSON and Markdown. Figures are
for reading side by side, not for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from streamer.kafka.broker import EmbeddedBroker, create_topics
from streamer.config import ModelConfig, load_config
from streamer.tools.devtools import bundled_model_path, produce_texts, sample_texts
from streamer.observability.logs import setup_logging
from streamer.observability.telemetry import percentile


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str
    quantize: str = "none"
    dtype: str = "float32"

    def model_keys(self) -> dict[str, str]:
        return {"backend": self.backend, "quantize": self.quantize, "dtype": self.dtype}


VARIANTS = {
    v.name: v
    for v in (
        Variant("torch-fp32", "torch"),
        Variant("torch-fp16", "torch", dtype="float16"),
        Variant("torch-bf16", "torch", dtype="bfloat16"),
        Variant("torch-int8", "torch", quantize="int8"),
        Variant("onnxruntime-fp32", "onnxruntime"),
        Variant("onnxruntime-int8", "onnxruntime", quantize="int8"),
        Variant("openvino-fp32", "openvino"),
        Variant("openvino-bf16", "openvino", dtype="bfloat16"),
    )
}
CPU_DEFAULT = (
    "torch-fp32",
    "torch-bf16",
    "torch-int8",
    "onnxruntime-fp32",
    "onnxruntime-int8",
    "openvino-fp32",
    "openvino-bf16",
)
CUDA_DEFAULT = ("torch-fp32", "torch-fp16", "torch-bf16")
ENCODINGS = ("float", "base64-f16", "base64-f32")


def cpu_has_bf16() -> bool:
    """bf16 on the CPU is only fast with AVX512-BF16 or AMX; elsewhere it is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def unavailable(v: Variant, device: str) -> str | None:
    """Why ``v`` cannot run here (None: it can)."""
    if v.backend != "torch" and importlib.util.find_spec(v.backend) is None:
        return f"{v.backend} is not installed (pip install 'streamer[{_extra(v.backend)}]')"
    if device == "cuda":
        if v.quantize == "int8" or v.backend == "openvino":
            return "CPU only"
        if v.backend == "onnxruntime":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)"
        if v.dtype == "bfloat16":
            import torch

            if not torch.cuda.is_bf16_supported():
                return "this GPU has no bfloat16"
        return None
    if v.dtype == "float16":
        return "float16 is for CUDA"
    if v.dtype == "bfloat16" and not cpu_has_bf16():
        return "this CPU has no AVX512-BF16/AMX (bf16 would be emulated)"
    return None


def _extra(backend: str) -> str:
    return "onnx" if backend == "onnxruntime" else backend


# -- offline --------------------------------------------------------------------------------------
def offline(
    model_cfg: ModelConfig, texts: list[str], batch_size: int, threads: int
) -> tuple[dict[str, Any], np.ndarray]:
    """The model alone, length-sorted batches; returns the figures and the outputs in order."""
    import torch

    from streamer.models.backends import create_model

    torch.set_num_threads(threads)
    model = create_model(model_cfg, threads=threads)
    t = time.perf_counter()
    model.load()
    model.warmup(batch_size, batch_size * model.max_length)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    encs = model.tokenize(texts)
    order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
    outputs: list[Any] = [None] * len(texts)
    batch_times = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        bt = time.perf_counter()
        raw = model.forward([encs[i].ids for i in idx])
        model.postprocess(raw, len(idx))
        if model.info.device == "cuda":
            torch.cuda.synchronize()
        batch_times.append(time.perf_counter() - bt)
        for i, row in zip(idx, np.asarray(raw, dtype=np.float32), strict=True):
            outputs[i] = row
    total = time.perf_counter() - t
    figures = {
        "records": len(texts),
        "records_per_s": len(texts) / total,
        "batch_p50_ms": percentile(batch_times, 50) * 1000,
        "batch_p99_ms": percentile(batch_times, 99) * 1000,
        "load_s": load_s,
        "device": model.info.device,
        "precision": model.info.dtype,
    }
    del model
    gc.collect()
    return figures, np.stack(outputs)


def agreement(got: np.ndarray, ref: np.ndarray, task: str) -> dict[str, float]:
    if task == "text-classification":
        return {"top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


# -- end to end -----------------------------------------------------------------------------------
async def _start_service(bootstrap: str, cfg_over: dict, topic: str) -> Any:
    """A started in-process service reading ``topic`` on the embedded broker."""
    from streamer.app import Service
    from streamer.models.backends import create_model

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
                # the embedded broker holds a fetch for the whole wait even when data is
                # there (Apache Kafka answers at fetch.min.bytes): keep it short
                "fetch_max_wait_ms": 20,
            },
            "http": {"port": 0},
        },
    )
    service = Service(cfg, model_factory=create_model)
    await service.start()
    return service


async def end_to_end(bootstrap: str, cfg_over: dict, texts: list[str], topic: str) -> dict:
    await create_topics(bootstrap, {topic: 4, f"{topic}.out": 4, f"{topic}.dlq": 1})
    await produce_texts(bootstrap, topic, texts)
    service = await _start_service(bootstrap, cfg_over, topic)
    done = asyncio.Event()
    stats = service.telemetry.stats

    def on_done(*_: object) -> None:
        if stats.published + stats.dead_lettered >= len(texts):
            done.set()

    service.telemetry.subscribe_done(on_done)
    runner = asyncio.ensure_future(service.run())
    waiter = asyncio.ensure_future(done.wait())
    await asyncio.wait({runner, waiter}, timeout=3600, return_when=asyncio.FIRST_COMPLETED)
    service.request_stop()
    waiter.cancel()
    code = await runner
    if code != 0 or not done.is_set():
        raise RuntimeError(f"streamer stopped early (exit {code}); see the log above")
    lat = list(stats.latencies)
    return {
        "records": stats.published,
        "records_per_s": stats.throughput(),
        "latency_p50_ms": percentile(lat, 50) * 1000,
        "latency_p99_ms": percentile(lat, 99) * 1000,
        "mean_batch_rows": stats.batch_rows / max(1, stats.batches),
        "padding_ratio": 1 - stats.batch_tokens / max(1, stats.padded_tokens),
    }


async def steady_latency(
    bootstrap: str, cfg_over: dict, texts: list[str], topic: str, rate: float, seconds: float
) -> dict:
    """Latency at a low steady rate: does a record wait for a batch that will not fill?

    Records are produced one at a time at ``rate``/s; latency is from the record's timestamp
    (set by the producer) to the broker's ack of its result. The bound to compare with is
    ``max_wait_ms`` plus one batch time (p99 of the batches run in this window).
    """
    from aiokafka import AIOKafkaProducer

    await create_topics(bootstrap, {topic: 4, f"{topic}.out": 4, f"{topic}.dlq": 1})
    service = await _start_service(bootstrap, cfg_over, topic)
    cfg = service.cfg
    await service.pipeline.joined.wait()
    latencies: list[float] = []
    batch_s: list[float] = []
    n = int(rate * seconds)
    all_done = asyncio.Event()

    def on_done(rec: Any, _err: object, _lat: float) -> None:
        latencies.append(time.time() - rec.timestamp_ms / 1000)
        if len(latencies) >= n:
            all_done.set()

    service.telemetry.subscribe_done(on_done)
    inferred = service.telemetry.inferred

    def timed(seconds: float, model: str) -> None:
        batch_s.append(seconds)
        inferred(seconds, model)

    service.telemetry.inferred = timed  # type: ignore[method-assign]
    runner = asyncio.ensure_future(service.run())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(n):  # a paced load generator: one record every 1/rate s
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            await producer.send(topic, orjson.dumps({"id": i, "text": texts[i % len(texts)]}))
        await producer.flush()
        await asyncio.wait_for(all_done.wait(), 30)
    finally:
        await producer.stop()
        service.request_stop()
        await runner
    wait_ms = cfg.batching.max_wait_ms
    p99_batch = percentile(batch_s, 99) * 1000
    return {
        "rate_per_s": rate,
        "records": len(latencies),
        "latency_p50_ms": percentile(latencies, 50) * 1000,
        "latency_p99_ms": percentile(latencies, 99) * 1000,
        "mean_batch_rows": n / max(1, len(batch_s)),
        "batch_p99_ms": p99_batch,
        "bound_ms": wait_ms + p99_batch,
    }


async def per_record(
    bootstrap: str, model_path: Path, texts: list[str], topic: str, threads: int, device: str
) -> dict:
    """The naive consumer: one tokenizer call and one forward per record."""
    import torch
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    await create_topics(bootstrap, {topic: 1, f"{topic}.out": 1})
    await produce_texts(bootstrap, topic, texts)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval().to(device)
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
                        hidden = model(**enc.to(device)).last_hidden_state
                    emb = torch.nn.functional.normalize(hidden.mean(1), dim=1)[0].cpu().numpy()
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
        "latency_p50_ms": percentile(latencies, 50) * 1000,
        "latency_p99_ms": percentile(latencies, 99) * 1000,
    }


# -- the run --------------------------------------------------------------------------------------
def _variants(args: argparse.Namespace) -> list[Variant]:
    names = (
        [n.strip() for n in args.backends.split(",") if n.strip()]
        if getattr(args, "backends", None)
        else list(CUDA_DEFAULT if args.device == "cuda" else CPU_DEFAULT)
    )
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if "torch-fp32" not in names:
        names.insert(0, "torch-fp32")  # the reference for agreement and speed-ups
    return [VARIANTS[n] for n in names]


def run_bench(args: argparse.Namespace) -> int:
    setup_logging("WARNING")
    console = Console(width=None if sys.stdout.isatty() else 150)
    device = getattr(args, "device", "cpu")
    quick = getattr(args, "quick", False)
    records = 400 if quick else args.records
    naive_records = 60 if quick else args.naive_records
    path = args.model_path or bundled_model_path()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    texts = sample_texts(records, seed=11)
    batch = 256 if device == "cuda" else 64
    batching = {
        "max_batch_size": batch,
        "max_wait_ms": 20,
        "max_batch_tokens": batch * 128,
    }
    base_model = {
        "name": "bench",
        "version": "1",
        "path": str(path),
        "max_length": 128,
        "device": device,
    }
    variants = _variants(args)
    skipped = {v.name: why for v in variants if (why := unavailable(v, device))}
    runnable = [v for v in variants if v.name not in skipped]
    results: dict[str, Any] = {
        "machine": {
            "device": device,
            "cpu_threads": threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
            **_gpu_name(device),
        },
        "model": str(path),
        "records": records,
        "offline": {},
        "streamer": {},
        "encodings": {},
        "skipped": skipped,
    }
    broker = EmbeddedBroker()
    broker.start()
    try:
        ref = None
        for v in runnable:
            with console.status(f"offline {v.name}: the model alone, length-sorted batches…"):
                mcfg = ModelConfig(**{**base_model, **v.model_keys()})
                figures, out = offline(mcfg, texts, batch, threads)
            if ref is None:
                ref = out
            figures["agreement"] = agreement(out, ref, mcfg.task)
            results["offline"][v.name] = figures
        for v in runnable:
            with console.status(f"streamer {v.name}: end to end through the embedded broker…"):
                results["streamer"][v.name] = asyncio.run(
                    end_to_end(
                        broker.bootstrap,
                        {
                            "model": {**base_model, **v.model_keys()},
                            "batching": batching,
                            "runtime": {"torch_threads": threads},
                        },
                        texts,
                        f"bench-e2e-{v.name}",
                    )
                )
        for enc in ENCODINGS[1:]:
            with console.status(f"streamer torch-fp32, output {enc}…"):
                results["encodings"][enc] = asyncio.run(
                    end_to_end(
                        broker.bootstrap,
                        {
                            "model": base_model,
                            "batching": batching,
                            "runtime": {"torch_threads": threads},
                            "output": {"embedding_encoding": enc},
                        },
                        texts,
                        f"bench-enc-{enc}",
                    )
                )
        results["encodings"]["float"] = results["streamer"]["torch-fp32"]
        rate, seconds = 10.0, (8.0 if quick else 20.0)
        with console.status(f"streamer torch-fp32 at a steady {rate:.0f} records/s…"):
            results["low_load"] = asyncio.run(
                steady_latency(
                    broker.bootstrap,
                    {
                        "model": base_model,
                        "batching": batching,
                        "runtime": {"torch_threads": threads},
                    },
                    texts,
                    "bench-steady",
                    rate,
                    seconds,
                )
            )
        with console.status(f"per-record consumer on {naive_records} records…"):
            results["per_record"] = asyncio.run(
                per_record(
                    broker.bootstrap,
                    path,
                    texts[:naive_records],
                    "bench-naive",
                    threads,
                    device,
                )
            )
    finally:
        broker.stop()

    results["ratios"] = _ratios(results)
    _print(console, results, records, threads, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    md = args.out.with_suffix(".md")
    md.write_text(_markdown(results))
    console.print(f"wrote {args.out} and {md}")
    return 0


def _gpu_name(device: str) -> dict[str, str]:
    if device != "cuda":
        return {}
    import torch

    return {"gpu": torch.cuda.get_device_name(0)}


def _ratios(r: dict[str, Any]) -> dict[str, Any]:
    off, e2e = r["offline"], r["streamer"]
    fp32 = e2e["torch-fp32"]["records_per_s"]
    out: dict[str, Any] = {
        "streamer_vs_offline": {
            n: e2e[n]["records_per_s"] / off[n]["records_per_s"] for n in e2e if n in off
        },
        "streamer_vs_fp32_streamer": {n: e2e[n]["records_per_s"] / fp32 for n in e2e},
        "streamer_vs_per_record": fp32 / r["per_record"]["records_per_s"],
    }
    return out


def _agree_text(a: dict[str, float]) -> str:
    if "cosine_mean" in a:
        return f"{a['cosine_mean']:.4f} / {a['cosine_min']:.4f}"
    return f"top-1 {a['top1_agreement']:.1%}"


COLUMNS = ("run", "records/s", "p50 ms", "p99 ms", "vs offline", "vs fp32", "agreement", "notes")


def _rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per result, in COLUMNS order."""
    rows = []
    ratios = r["ratios"]
    fp32_off = r["offline"]["torch-fp32"]["records_per_s"]
    for name, o in r["offline"].items():
        rows.append(
            (
                f"offline {name}",
                f"{o['records_per_s']:.1f}",
                f"{o['batch_p50_ms']:.0f}",
                f"{o['batch_p99_ms']:.0f}",
                "",
                f"{o['records_per_s'] / fp32_off:.2f}×",
                _agree_text(o["agreement"]),
                "per batch, length-sorted",
            )
        )
    for name, e in r["streamer"].items():
        rows.append(
            (
                f"streamer {name}",
                f"{e['records_per_s']:.1f}",
                f"{e['latency_p50_ms']:.0f}",
                f"{e['latency_p99_ms']:.0f}",
                f"{ratios['streamer_vs_offline'][name]:.2f}×",
                f"{ratios['streamer_vs_fp32_streamer'][name]:.2f}×",
                _agree_text(r["offline"][name]["agreement"]),
                f"{e['mean_batch_rows']:.0f} rows/batch, {e['padding_ratio']:.0%} padding",
            )
        )
    fp32 = r["streamer"]["torch-fp32"]["records_per_s"]
    for enc, e in r["encodings"].items():
        if enc == "float":
            continue
        rows.append(
            (
                f"streamer torch-fp32 {enc}",
                f"{e['records_per_s']:.1f}",
                f"{e['latency_p50_ms']:.0f}",
                f"{e['latency_p99_ms']:.0f}",
                "",
                f"{e['records_per_s'] / fp32:.2f}×",
                "",
                "output encoding (the rest: float)",
            )
        )
    n = r["per_record"]
    rows.append(
        (
            "per-record consumer",
            f"{n['records_per_s']:.1f}",
            f"{n['latency_p50_ms']:.0f}",
            f"{n['latency_p99_ms']:.0f}",
            "",
            f"{n['records_per_s'] / fp32:.2f}×",
            "",
            f"torch-fp32, {n['records']} records, one forward each",
        )
    )
    for name, why in r["skipped"].items():
        rows.append((f"skipped {name}", "", "", "", "", "", "", why))
    return rows


def _print(console: Console, r: dict[str, Any], records: int, threads: int, device: str) -> None:
    where = r["machine"].get("gpu", f"{threads} CPU threads")
    table = Table(title=f"streamer bench — {records} records, MiniLM, {device} ({where})")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("run", "notes") else "right")
    for row in _rows(r):
        table.add_row(*row)
    console.print(table)
    console.print(
        "p50/p99: per batch offline; fetch→ack per record end to end (the whole backlog is "
        "queued at once, so they include waiting). vs fp32: records/s over torch-fp32's on "
        "the same path (the per-record consumer: over streamer torch-fp32). agreement: "
        "cosine to torch-fp32's embeddings, mean / worst row."
    )
    ratios = r["ratios"]
    fp32_ratio = ratios["streamer_vs_offline"]["torch-fp32"]
    console.print(f"target: streamer torch-fp32 / offline torch-fp32 = {fp32_ratio:.2f} (≥ 0.95)")
    low = r.get("low_load")
    if low:
        console.print(
            f"target: at a steady {low['rate_per_s']:.0f} records/s, p99 latency "
            f"{low['latency_p99_ms']:.0f} ms (p50 {low['latency_p50_ms']:.0f} ms, "
            f"{low['mean_batch_rows']:.1f} rows/batch) ≤ max_wait_ms + one batch "
            f"(p99 {low['batch_p99_ms']:.0f} ms) = {low['bound_ms']:.0f} ms"
        )
    fast = _fastest_agreeing(r)
    if fast is not None:
        name, speed = fast
        console.print(
            f"target: fastest variant within the agreement bounds end to end, {name}, = "
            f"{speed:.2f}× torch-fp32 end to end (≥ 1.4)"
        )


def _fastest_agreeing(r: dict[str, Any]) -> tuple[str, float] | None:
    """The fastest end-to-end variant (other than fp32 torch) within the agreement bounds."""
    best = None
    for name, speed in r["ratios"]["streamer_vs_fp32_streamer"].items():
        if name == "torch-fp32":
            continue
        a = r["offline"][name]["agreement"]
        bound = 0.99 if "int8" in name else 0.999
        ok = a.get("cosine_min", 1.0) >= bound and a.get("top1_agreement", 1.0) >= 0.99
        if ok and (best is None or speed > best[1]):
            best = (name, speed)
    return best


def _markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    head = (
        f"# streamer bench\n\n{r['records']} records, {m['device']} "
        f"({m.get('gpu', str(m['cpu_threads']) + ' CPU threads')}), {m['platform']}\n\n"
    )
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(r)]
    low = r.get("low_load")
    if low:
        lines.append(
            f"\nSteady {low['rate_per_s']:.0f} records/s (torch-fp32): p50 "
            f"{low['latency_p50_ms']:.0f} ms, p99 {low['latency_p99_ms']:.0f} ms, produce to "
            f"ack; bound max_wait_ms + p99 batch = {low['bound_ms']:.0f} ms."
        )
    return head + "\n".join(lines) + "\n"
