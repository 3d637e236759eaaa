"""``streamer bench`` / ``make bench``: the same records and model, every way we can run them.

One run, one set of records, one table. Sections (``--only`` picks some):

1. **offline** — the model alone, per backend and precision: tokenize everything, sort by
   length, run batches back to back (the ceiling for that backend on this machine). On CUDA
   each variant passes over the data twice in one process (``--offline-passes``): the first
   pass meets every shape cold (CUDA graph capture, kernel selection), the second is warm. Its
   outputs are compared with float32 torch's: the ``agreement`` column (mean / worst-row cosine
   for embeddings);
2. **streamer** — end to end through the embedded broker, per backend and precision with float
   output, from the first fetch to the broker's ack of the last result;
3. **encodings** — the same with float32 torch, per output encoding;
4. **low-load** — float32 torch at a steady 10 records/s: does a record wait for a batch that
   will not fill?
5. **per-record** — a hand-written consumer that tokenizes and runs the model once per record,
   then produces its result (what most teams start with);
6. **passthrough** — a bare aiokafka loop that moves the same records without a model
   (``getmany``, parse, a result of streamer's size and shape, ``send_batch``, acks, commit):
   what Kafka and JSON alone cost in Python on this machine;
7. **no-model** — streamer end to end with :class:`~streamer.tools.nullmodel.NullModel`: the
   ceiling of our own code, to set beside the passthrough; then again with base64-f16 results.

**compression** runs the no-model path once per ``kafka.compression_type`` (distinct result
rows, :mod:`streamer.tools.compressbench`): records/s and bytes per record on the output topic.

**api** measures the HTTP API (:mod:`streamer.tools.apibench`): requests/s and latency at
concurrency 1 and 32 with the stream idle, and single queries while the stream drains a
backlog, beside the stream's records/s with and without them.

Every streamer row (and the passthrough) reports ``loop µs/rec``: event-loop thread CPU per
record between the first fetch and the last ack — the budget that caps records/s, since the
loop is one thread.

Variants are named ``BACKEND-PRECISION`` (``torch-fp32``, ``torch-int8``, ``torch-bf16``,
``onnxruntime-fp32``, ``onnxruntime-int8``, ``openvino-fp32``, ``openvino-bf16``; on CUDA
``torch-fp16``, ``torch-bf16``, and with ``--cuda-graphs both`` ``torch-fp16-eager`` and so on).
Those whose runtime is not installed, or whose precision the device lacks, are listed as
skipped. Prints the table and writes JSON and Markdown (after every section, so a run that is
cut short leaves what it measured). Figures are for reading side by side, not for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from streamer import eventloop
from streamer.config import KafkaConfig, ModelConfig, load_config
from streamer.kafka.broker import EmbeddedBroker, create_topics
from streamer.observability.logs import setup_logging
from streamer.observability.telemetry import Telemetry, percentile
from streamer.tools.devtools import (
    bundled_model_path,
    produce_texts,
    run_until_outputs,
    sample_texts,
    until_outputs,
)
from streamer.tools.nullmodel import NULL_DIM, NULL_FINGERPRINT, NullModel, null_vector


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str
    quantize: str = "none"
    dtype: str = "float32"
    cuda_graphs: bool | None = None  # None: not passed (CPU, or before the key existed)

    def model_keys(self) -> dict[str, Any]:
        keys: dict[str, Any] = {
            "backend": self.backend,
            "quantize": self.quantize,
            "dtype": self.dtype,
        }
        if self.cuda_graphs is not None:
            keys["cuda_graphs"] = self.cuda_graphs
        return keys


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
SECTIONS = (
    "offline",
    "streamer",
    "encodings",
    "low-load",
    "per-record",
    "passthrough",
    "no-model",
    "processes",
    "order",
    "compression",
    "api",
)
MODEL_SECTIONS = frozenset((*SECTIONS[:5], "processes", "order", "api"))
# Inputs produced once per run and read by several rows, each with its own group:
INPUT_TOPIC = "bench-input"  # the streamer variants' and encodings' (--records)
RAW_TOPIC = "bench-raw"  # the passthrough's and the no-model row's (--no-model-records)
NULL_MODEL = {
    "name": "null",
    "version": "null",
    "max_length": 128,
    "device": "cpu",
    "backend": "null",
}


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
    model_cfg: ModelConfig, texts: list[str], batch_size: int, threads: int, passes: int = 1
) -> tuple[dict[str, Any], np.ndarray]:
    """The model alone, length-sorted batches, ``passes`` times over ``texts`` in one process.

    Returns the figures (top level: the last pass; ``passes``: each one, the first with cold
    shapes) and the last pass's outputs in input order.
    """
    import torch

    from streamer.models.backends import create_model

    torch.set_num_threads(threads)
    model = create_model(model_cfg, threads=threads)
    t = time.perf_counter()
    model.load()
    model.warmup(batch_size, batch_size * model.max_length)
    load_s = time.perf_counter() - t
    runs: list[dict[str, float]] = []
    out = np.zeros((0, 0), dtype=np.float32)
    for _ in range(max(1, passes)):
        figures, out = _offline_pass(model, texts, batch_size)
        runs.append(figures)
    result = {
        "records": len(texts),
        **runs[-1],
        "passes": runs,
        "load_s": load_s,
        "device": model.info.device,
        "precision": model.info.dtype,
    }
    del model
    gc.collect()
    return result, out


def _offline_pass(model: Any, texts: list[str], batch_size: int) -> tuple[dict, np.ndarray]:
    """One pass: tokenize everything, then length-sorted batches back to back."""
    sync = None
    if model.info.device == "cuda":
        import torch

        sync = torch.cuda.synchronize
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
        if sync is not None:
            sync()
        batch_times.append(time.perf_counter() - bt)
        for i, row in zip(idx, np.asarray(raw, dtype=np.float32), strict=True):
            outputs[i] = row
    total = time.perf_counter() - t
    figures = {
        "records_per_s": len(texts) / total,
        "seconds": total,
        "batch_p50_ms": percentile(batch_times, 50) * 1000,
        "batch_p99_ms": percentile(batch_times, 99) * 1000,
    }
    return figures, np.stack(outputs)


def agreement(got: np.ndarray, ref: np.ndarray, task: str) -> dict[str, float]:
    if task == "text-classification":
        return {"top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


# -- end to end -----------------------------------------------------------------------------------
def _kafka_over(bootstrap: str) -> dict[str, Any]:
    """Kafka settings every end-to-end run here shares."""
    return {
        "bootstrap_servers": bootstrap,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "request_timeout_ms": 10000,
        # the embedded broker holds a fetch for the whole wait even when data is there
        # (Apache Kafka answers at fetch.min.bytes): keep it short
        "fetch_max_wait_ms": 20,
    }


async def _start_service(
    bootstrap: str,
    cfg_over: dict,
    topic: str,
    run: str,
    model_factory: Callable[[ModelConfig], Any] | None = None,
) -> Any:
    """A started in-process service reading ``topic``, writing ``{run}.out`` (group
    ``bench-{run}``), on the embedded broker."""
    from streamer.app import Service

    await create_topics(bootstrap, {f"{run}.out": 4, f"{run}.dlq": 1})
    cfg = load_config(
        None,
        **{
            **cfg_over,
            "kafka": {
                **_kafka_over(bootstrap),
                **cfg_over.get("kafka", {}),
                "group_id": f"bench-{run}",
                "input_topics": [topic],
                "output_topic": f"{run}.out",
                "dlq_topic": f"{run}.dlq",
            },
            "http": {"port": 0},
        },
    )
    service = Service(cfg, model_factory=model_factory)
    try:
        await service.start()
    except BaseException:
        await service.close()  # its threads and probes, or the process would not exit
        raise
    return service


def _ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else seconds * 1000


def service_figures(telemetry: Telemetry, model: str) -> dict[str, Any]:
    """A streamer row from a service's telemetry after its run."""
    published, dead = telemetry.outputs()
    rows, padding = telemetry.batch_means(model)
    return {
        "records": published,
        "dead_letters": dead,
        "records_per_s": telemetry.throughput(),
        "latency_p50_ms": _ms(telemetry.latencies.percentile(50)),
        "latency_p99_ms": _ms(telemetry.latencies.percentile(99)),
        "loop_us_per_record": telemetry.loop_cpu_per_record_s() * 1e6,
        "mean_batch_rows": rows,
        "padding_ratio": padding,
    }


async def end_to_end(
    bootstrap: str,
    cfg_over: dict,
    texts: list[str],
    topic: str,
    *,
    run: str | None = None,
    model_factory: Callable[[ModelConfig], Any] | None = None,
    produce: bool = True,
) -> dict:
    """``texts`` through a service, from the first fetch to the broker's ack of the last result.

    ``produce=False``: ``topic`` holds them already (the same input for several runs; each run
    reads it with its own group and writes its own output topic).
    """
    if produce:
        await create_topics(bootstrap, {topic: 4})
        await produce_texts(bootstrap, topic, texts)
    service = await _start_service(bootstrap, cfg_over, topic, run or topic, model_factory)
    code = await run_until_outputs(service, len(texts), timeout_s=3600)
    if code != 0:
        raise RuntimeError(f"streamer exited with {code} after its outputs; see the log above")
    return service_figures(service.telemetry, cfg_over["model"]["name"])


async def steady_latency(
    bootstrap: str, cfg_over: dict, texts: list[str], topic: str, rate: float, seconds: float
) -> dict:
    """Latency at a low steady rate: does a record wait for a batch that will not fill?

    Records are produced one at a time at ``rate``/s; latency is from the record's timestamp
    (set by the producer) to the broker's ack of its result, as the pipeline reports it per
    acknowledged batch. The bound to compare with is ``max_wait_ms`` plus one batch time (p99
    of the batches run in this window).
    """
    from aiokafka import AIOKafkaProducer

    await create_topics(bootstrap, {topic: 4})
    service = await _start_service(bootstrap, cfg_over, topic, topic)
    cfg = service.cfg
    telemetry: Telemetry = service.telemetry
    latencies: list[np.ndarray] = []
    batch_s: list[float] = []
    n = int(rate * seconds)
    inferred, ack_metrics = telemetry.inferred, telemetry.ack_metrics

    # Both hooks run once per batch (or per report of several) on the event loop: wrapping them
    # costs nothing per record.
    def timed(seconds: float, model: Any) -> None:  # a ModelInfo
        batch_s.append(seconds)
        inferred(seconds, model)

    def acked(
        published: dict, dead_lettered: dict, fetch_latencies: np.ndarray, end_to_end: np.ndarray
    ) -> None:
        latencies.append(np.array(end_to_end, dtype=np.float64))
        ack_metrics(published, dead_lettered, fetch_latencies, end_to_end)

    telemetry.inferred = timed  # type: ignore[method-assign]
    telemetry.ack_metrics = acked  # type: ignore[method-assign]
    runner = asyncio.ensure_future(service.run())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    try:
        # records produced before the group is joined would wait for it: start after
        joined = asyncio.ensure_future(service.pipeline.joined.wait())
        await asyncio.wait({joined, runner}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if not joined.done():
            joined.cancel()
            raise RuntimeError("the service stopped or did not join its group within 60 s")
        await producer.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(n):  # a paced load generator: one record every 1/rate s
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            await producer.send(topic, orjson.dumps({"id": i, "text": texts[i % len(texts)]}))
        await producer.flush()
        await until_outputs(telemetry, runner, n, timeout_s=30)
    finally:
        await producer.stop()
        service.request_stop()
        await asyncio.wait({runner})
    lat = np.concatenate(latencies) if latencies else np.zeros(0)
    p99_batch = percentile(batch_s, 99) * 1000
    wait_ms = cfg.batching.max_wait_ms
    return {
        "rate_per_s": rate,
        "records": len(lat),
        "latency_p50_ms": percentile(lat, 50) * 1000,
        "latency_p99_ms": percentile(lat, 99) * 1000,
        "mean_batch_rows": telemetry.batch_means(cfg_over["model"]["name"])[0],
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
    safe = {"local_files_only": True, "trust_remote_code": False}  # like the service loads
    tok = AutoTokenizer.from_pretrained(model_path, **safe)
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True, **safe)
    model = model.eval().to(device)
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


async def passthrough(
    bootstrap: str,
    topic: str,
    n: int,
    *,
    out_topic: str | None = None,
    group: str | None = None,
    dim: int = NULL_DIM,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """A bare aiokafka loop moving ``n`` records of ``topic``: Kafka and JSON, no model.

    Per ``getmany``: parse each value with orjson, build a result of the same size and shape as
    streamer's float JSON (``{"id", "result": {"embedding": 384 floats of a numpy row}, "model",
    "source"}``, serialised per record), ``create_batch``/``send_batch`` per partition, wait
    for the acks, commit. One round at a time, as a straightforward consumer would. Client
    settings are streamer's defaults (fetch size, producer batch size, acks=all, linger).

    Returns records/s and the fetch→ack latencies from the first fetch to the last ack, and
    ``loop_us_per_record``: event-loop thread CPU (``time.thread_time``) over the same span
    per record, the figure to set beside streamer's.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition as KafkaTP

    if n <= 0:
        raise ValueError("passthrough needs at least one record")
    defaults = KafkaConfig()
    kafka = _kafka_over(bootstrap)
    out_topic = out_topic or f"{topic}.passthrough"
    out_partitions = 4
    await create_topics(bootstrap, {out_topic: out_partitions})
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group or f"passthrough-{topic}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        session_timeout_ms=kafka["session_timeout_ms"],
        heartbeat_interval_ms=kafka["heartbeat_interval_ms"],
        request_timeout_ms=kafka["request_timeout_ms"],
        fetch_max_wait_ms=kafka["fetch_max_wait_ms"],
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=defaults.linger_ms,
        max_request_size=defaults.max_request_size,
        max_batch_size=min(defaults.batch_size, defaults.max_request_size),
        request_timeout_ms=kafka["request_timeout_ms"],
    )
    row = null_vector(dim)
    model = {"name": "passthrough", "version": "null", "fingerprint": NULL_FINGERPRINT}
    opt = orjson.OPT_SERIALIZE_NUMPY
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    done = 0
    first_at = last_at = 0.0
    cpu_first = cpu_last = 0.0
    latencies: list[np.ndarray] = []
    await consumer.start()
    try:
        await producer.start()
        while done < n:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"passthrough moved {done} of {n} records in {timeout_s}s")
            batches = await consumer.getmany(
                timeout_ms=int(min(left, 1.0) * 1000), max_records=defaults.fetch_max_records
            )
            if not batches:
                continue
            fetched_at = time.monotonic()
            if not done:
                first_at, cpu_first = fetched_at, time.thread_time()
            acks, offsets, k = [], {}, 0
            for tp, msgs in batches.items():
                partition = tp.partition % out_partitions
                builder = producer.create_batch()
                for m in msgs:
                    rec = orjson.loads(m.value)
                    value = orjson.dumps(
                        {
                            "id": rec.get("id"),
                            "result": {"embedding": row},
                            "model": model,
                            "source": {
                                "topic": tp.topic,
                                "partition": tp.partition,
                                "offset": m.offset,
                            },
                        },
                        option=opt,
                    )
                    if builder.append(key=m.key, value=value, timestamp=None) is None:
                        acks.append(
                            await producer.send_batch(builder, out_topic, partition=partition)
                        )
                        builder = producer.create_batch()
                        builder.append(key=m.key, value=value, timestamp=None)
                acks.append(await producer.send_batch(builder, out_topic, partition=partition))
                offsets[KafkaTP(tp.topic, tp.partition)] = msgs[-1].offset + 1
                k += len(msgs)
            await asyncio.gather(*acks)
            last_at, cpu_last = time.monotonic(), time.thread_time()
            latencies.append(np.full(k, last_at - fetched_at))
            done += k
            await consumer.commit(offsets)
    finally:
        await producer.stop()
        await consumer.stop()
    span = last_at - first_at
    lat = np.concatenate(latencies)
    return {
        "records": done,
        "records_per_s": done / span if span > 0 else 0.0,
        "latency_p50_ms": percentile(lat, 50) * 1000,
        "latency_p99_ms": percentile(lat, 99) * 1000,
        "loop_us_per_record": (cpu_last - cpu_first) / done * 1e6,
    }


# -- the run --------------------------------------------------------------------------------------
def _variants(args: argparse.Namespace, device: str) -> list[Variant]:
    names = (
        [n.strip() for n in args.backends.split(",") if n.strip()]
        if getattr(args, "backends", None)
        else list(CUDA_DEFAULT if device == "cuda" else CPU_DEFAULT)
    )
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if "torch-fp32" not in names:
        names.insert(0, "torch-fp32")  # the reference for agreement and speed-ups
    variants = [VARIANTS[n] for n in names]
    if device != "cuda":
        return variants
    # model.cuda_graphs exists for torch on CUDA only: pass it there and nowhere else
    mode = getattr(args, "cuda_graphs", None) or "on"
    out = []
    for v in variants:
        if v.backend != "torch":
            out.append(v)
            continue
        out.append(dataclasses.replace(v, cuda_graphs=mode != "off"))
        if mode == "both":
            out.append(dataclasses.replace(v, name=f"{v.name}-eager", cuda_graphs=False))
    return out


def _sections(only: str | None) -> list[str]:
    if not only:
        return list(SECTIONS)
    wanted = {s.strip().replace("_", "-") for s in only.split(",") if s.strip()}
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in wanted]


@dataclass
class Plan:
    """What one ``streamer bench`` run does, from its options."""

    sections: list[str]
    device: str
    threads: int
    records: int
    naive_records: int
    no_model_records: int
    passes: int
    steady_seconds: float
    path: Path | None
    variants: list[Variant]
    skipped: dict[str, str]
    out: Path = Path("bench/results.json")  # and .md beside it
    cuda_graphs: str | None = None  # on | off | both, on CUDA
    processes: list[int] = field(default_factory=lambda: [1, 2])  # the processes section's
    produced: set[str] = field(default_factory=set)  # input topics holding their records
    failures: list[str] = field(default_factory=list)  # rows of this run that failed

    @property
    def batch(self) -> int:
        """Rows per batch, offline and end to end alike. 256 on the CPU too: its forwards run
        a batch's rows in groups of like length (models/shapes.py:length_groups), so a larger
        arrival-order batch pads little and spreads each batch's fixed costs (the loop's, a
        forward's) over more rows — MiniLM fp32 end to end 0.68–0.94× offline at 64, 0.95× at
        256 on 2 cores."""
        return 256

    @property
    def batching(self) -> dict[str, int]:
        return {
            "max_batch_size": self.batch,
            "max_wait_ms": 20,
            "max_batch_tokens": self.batch * 128,
        }

    @property
    def runnable(self) -> list[Variant]:
        return [v for v in self.variants if v.name not in self.skipped]

    @cached_property
    def texts(self) -> list[str]:
        return sample_texts(self.records, seed=11)

    @cached_property
    def raw_texts(self) -> list[str]:
        return sample_texts(self.no_model_records, seed=11)

    def model(self, v: Variant) -> dict[str, Any]:
        base = {
            "name": "bench",
            "version": "1",
            "path": str(self.path),
            "max_length": 128,
            "device": self.device,
        }
        return {**base, **v.model_keys()}

    def service_over(self, model: dict[str, Any], **sections: Any) -> dict[str, Any]:
        return {
            "model": model,
            "batching": self.batching,
            "runtime": {"torch_threads": self.threads},
            **sections,
        }

    @property
    def reference(self) -> Variant:
        return next(v for v in self.variants if v.name == "torch-fp32")


def make_plan(args: argparse.Namespace) -> Plan:
    device = getattr(args, "device", "cpu")
    quick = getattr(args, "quick", False)
    sections = _sections(getattr(args, "only", None))
    records = 400 if quick else args.records
    no_model = getattr(args, "no_model_records", None) or (
        records if quick else max(records, 20_000)
    )
    needs_model = bool(MODEL_SECTIONS & set(sections))
    variants = _variants(args, device)
    return Plan(
        sections=sections,
        device=device,
        threads=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2,
        records=records,
        naive_records=60 if quick else args.naive_records,
        no_model_records=no_model,
        passes=getattr(args, "offline_passes", None) or (2 if device == "cuda" else 1),
        steady_seconds=8.0 if quick else 20.0,
        path=(args.model_path or bundled_model_path()) if needs_model else None,
        variants=variants,
        skipped={v.name: why for v in variants if (why := unavailable(v, device))}
        if needs_model
        else {},
        out=args.out,
        cuda_graphs=(getattr(args, "cuda_graphs", None) or "on") if device == "cuda" else None,
        processes=_process_counts(getattr(args, "processes", None) or "1,2"),
    )


def _process_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"--processes: comma-separated counts such as 1,2,4, not {text!r}")
    return counts


def run_bench(args: argparse.Namespace) -> int:
    setup_logging("WARNING")
    console = Console(width=None if sys.stdout.isatty() else 150)
    plan = make_plan(args)
    out: Path = args.out
    results = _fresh_results(plan)
    if getattr(args, "append", False) and out.is_file():
        results = _merge(json.loads(out.read_text()), results)
    runners = {
        "offline": _run_offline,
        "streamer": _run_streamer,
        "encodings": _run_encodings,
        "low-load": _run_low_load,
        "per-record": _run_per_record,
        "passthrough": _run_passthrough,
        "no-model": _run_no_model,
        "processes": _run_processes,
        "compression": _run_compression,
        "order": _run_order,
        "api": _run_api,
    }
    # SIGTERM (`timeout` around a section) unwinds like Ctrl-C: the broker is stopped and the
    # rows written so far stay
    previous = signal.signal(signal.SIGTERM, _interrupt)
    broker = EmbeddedBroker()
    broker.start()
    try:
        save_results(results, out)
        for section in plan.sections:
            runners[section](console, plan, broker.bootstrap, results)
    finally:
        broker.stop()
        signal.signal(signal.SIGTERM, previous)
    print_results(console, results)
    console.print(f"wrote {out} and {out.with_suffix('.md')}")
    return 1 if plan.failures else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _attempt(console: Console, plan: Plan, results: dict[str, Any], label: str) -> Iterator[None]:
    """One row: a failure is recorded in the table and the run goes on to the next; the files
    are rewritten after every row, so a run cut short keeps what it measured."""
    try:
        yield
    except Exception as exc:
        console.print(f"[red]{escape(label)} failed: {escape(repr(exc))}[/]")
        results["failed"][label] = f"{type(exc).__name__}: {exc}"[:300]
        plan.failures.append(label)
    else:
        results["failed"].pop(label, None)
    save_results(results, plan.out)


def _run_offline(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    ref = None
    for v in plan.runnable:
        with _attempt(console, plan, results, f"offline {v.name}"):
            passes = f", {plan.passes} passes" if plan.passes > 1 else ""
            with console.status(f"offline {v.name}: the model alone, length-sorted{passes}…"):
                mcfg = ModelConfig(**plan.model(v))
                figures, out = offline(mcfg, plan.texts, plan.batch, plan.threads, plan.passes)
            if ref is None:  # torch-fp32 comes first
                ref = out
            figures["agreement"] = agreement(out, ref, mcfg.task)
            results["offline"][v.name] = figures


def _run_streamer(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    for v in plan.runnable:
        with _attempt(console, plan, results, f"streamer {v.name}"):
            topic = _input(console, plan, bootstrap, INPUT_TOPIC, plan.texts)
            with console.status(f"streamer {v.name}: end to end through the embedded broker…"):
                results["streamer"][v.name] = eventloop.run(
                    end_to_end(
                        bootstrap,
                        plan.service_over(plan.model(v)),
                        plan.texts,
                        topic,
                        run=f"bench-e2e-{v.name}",
                        produce=False,
                    )
                )


def _run_encodings(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    for enc in ENCODINGS[1:]:
        with _attempt(console, plan, results, f"streamer torch-fp32 {enc}"):
            topic = _input(console, plan, bootstrap, INPUT_TOPIC, plan.texts)
            over = plan.service_over(plan.model(plan.reference), output={"embedding_encoding": enc})
            with console.status(f"streamer torch-fp32, output {enc}…"):
                results["encodings"][enc] = eventloop.run(
                    end_to_end(
                        bootstrap, over, plan.texts, topic, run=f"bench-enc-{enc}", produce=False
                    )
                )


def _run_low_load(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    rate = 10.0
    with (
        _attempt(console, plan, results, "low-load"),
        console.status(f"streamer torch-fp32 at a steady {rate:.0f} records/s…"),
    ):
        results["low_load"] = eventloop.run(
            steady_latency(
                bootstrap,
                plan.service_over(plan.model(plan.reference)),
                plan.texts,
                "bench-steady",
                rate,
                plan.steady_seconds,
            )
        )


def _run_per_record(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    assert plan.path is not None
    with (
        _attempt(console, plan, results, "per-record"),
        console.status(f"per-record consumer on {plan.naive_records} records…"),
    ):
        results["per_record"] = asyncio.run(
            per_record(
                bootstrap,
                plan.path,
                plan.texts[: plan.naive_records],
                "bench-naive",
                plan.threads,
                plan.device,
            )
        )


async def _produce(bootstrap: str, topic: str, texts: list[str]) -> None:
    await create_topics(bootstrap, {topic: 4})
    await produce_texts(bootstrap, topic, texts)


def _input(console: Console, plan: Plan, bootstrap: str, topic: str, texts: list[str]) -> str:
    """``topic`` holding ``texts``, produced on first use: rows that read the same records
    (each with its own group) do not pay for producing them again."""
    if topic not in plan.produced:
        with console.status(f"producing {len(texts)} records to {topic}…"):
            asyncio.run(_produce(bootstrap, topic, texts))
        plan.produced.add(topic)
    return topic


def _run_passthrough(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    with _attempt(console, plan, results, "kafka passthrough"):
        topic = _input(console, plan, bootstrap, RAW_TOPIC, plan.raw_texts)
        with console.status(f"kafka passthrough on {plan.no_model_records} records…"):
            results["passthrough"] = asyncio.run(
                passthrough(bootstrap, topic, plan.no_model_records)
            )


def _run_no_model(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    """The zero-cost model with float JSON results (MiniLM's size), then with base64-f16 ones
    (a fifth of the bytes: the ceiling for the GPU base64-f16 target)."""
    topic = _input(console, plan, bootstrap, RAW_TOPIC, plan.raw_texts)
    for key, label, encoding in (
        ("no_model", "streamer no-model", "float"),
        ("no_model_b64", "streamer no-model base64-f16", "base64-f16"),
    ):
        with (
            _attempt(console, plan, results, label),
            console.status(f"{label} on {plan.no_model_records} records…"),
        ):
            results[key] = eventloop.run(
                end_to_end(
                    bootstrap,
                    plan.service_over(NULL_MODEL, output={"embedding_encoding": encoding}),
                    plan.raw_texts,
                    topic,
                    run=f"bench-{key.replace('_', '-')}",
                    model_factory=NullModel.from_config,
                    produce=False,
                )
            )


def _run_order(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    """torch-fp32 end to end with ``batching.order: none`` (length grouping across the waiting
    records), beside the streamer section's rows, which keep input order per partition."""
    with _attempt(console, plan, results, "streamer torch-fp32 order=none"):
        topic = _input(console, plan, bootstrap, INPUT_TOPIC, plan.texts)
        over = plan.service_over(plan.model(plan.reference))
        over["batching"] = {**over["batching"], "order": "none"}
        with console.status("streamer torch-fp32, batching.order none…"):
            results["order"]["none"] = eventloop.run(
                end_to_end(
                    bootstrap, over, plan.texts, topic, run="bench-order-none", produce=False
                )
            )


def _run_api(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    """The HTTP API with the reference variant, idle and under a backlog (apibench)."""
    from streamer.tools.apibench import api_bench

    with (
        _attempt(console, plan, results, "api"),
        console.status("HTTP API: idle at concurrency 1 and 32, then queries under a backlog…"),
    ):
        results["api"] = eventloop.run(
            api_bench(bootstrap, plan.service_over(plan.model(plan.reference)), plan.texts)
        )


def _run_compression(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    from streamer.tools.compressbench import available_codecs, compression_row

    for codec in available_codecs():
        with _attempt(console, plan, results, f"compression {codec}"):
            topic = _input(console, plan, bootstrap, RAW_TOPIC, plan.raw_texts)
            with console.status(f"streamer no-model, kafka.compression_type={codec}…"):
                results["compression"][codec] = eventloop.run(
                    compression_row(
                        bootstrap, plan.service_over(NULL_MODEL), plan.raw_texts, topic, codec
                    )
                )


def _run_processes(console: Console, plan: Plan, bootstrap: str, results: dict[str, Any]) -> None:
    """``streamer run`` with each ``--processes`` count: the reference variant on the
    ``--records`` input and the zero-cost model on the ``--no-model-records`` one."""
    from streamer.tools.procbench import multi_process

    runs = [
        ("torch-fp32", plan.model(plan.reference), INPUT_TOPIC, plan.texts),
        ("no-model", NULL_MODEL, RAW_TOPIC, plan.raw_texts),
    ]
    for name, model, topic_name, texts in runs:
        for n in plan.processes:
            label = f"streamer {name} x{n} processes"
            with _attempt(console, plan, results, label):
                topic = _input(console, plan, bootstrap, topic_name, texts)
                with console.status(f"streamer run, runtime.processes={n}, {name}…"):
                    row = eventloop.run(
                        multi_process(
                            bootstrap,
                            plan.service_over(model),
                            _kafka_over(bootstrap),
                            topic,
                            len(texts),
                            n,
                            plan.out.parent / "processes",
                            name=name,
                        )
                    )
                results["processes"][f"{name} x{n}"] = {"model": name, **row}


# -- results --------------------------------------------------------------------------------------
_MERGED = (
    "offline",
    "streamer",
    "encodings",
    "processes",
    "order",
    "compression",
    "skipped",
    "failed",
)  # rows by name


def _fresh_results(plan: Plan) -> dict[str, Any]:
    ran = set(plan.sections)
    results: dict[str, Any] = {
        "machine": {
            "device": plan.device,
            "cpu_threads": plan.threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
            **_gpu_name(plan.device),
        },
        "sections": plan.sections,
        "offline": {},
        "streamer": {},
        "encodings": {},
        "processes": {},
        "order": {},
        "compression": {},
        "skipped": plan.skipped,
        "failed": {},
    }
    if ran & MODEL_SECTIONS:
        results["model"] = str(plan.path)
        results["records"] = plan.records
    if "offline" in ran:
        results["offline_passes"] = plan.passes
    if ran & {"passthrough", "no-model", "compression"}:
        results["no_model_records"] = plan.no_model_records
    if plan.cuda_graphs is not None and ran & MODEL_SECTIONS:
        results["cuda_graphs"] = plan.cuda_graphs
    return results


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``old``: rows by name in the per-variant sections, the rest replaced."""
    merged = {**old, **{k: v for k, v in new.items() if k not in _MERGED}}
    ran = {*old.get("sections", []), *new["sections"]}
    merged["sections"] = [s for s in SECTIONS if s in ran]
    for key in _MERGED:  # a row that succeeds now clears its old failure (see _attempt)
        merged[key] = {**old.get(key, {}), **new[key]}
    return merged


def save_results(results: dict[str, Any], out: Path) -> None:
    """JSON and Markdown of everything measured so far (ratios recomputed)."""
    results["ratios"] = _ratios(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(_markdown(results))


def _gpu_name(device: str) -> dict[str, str]:
    if device != "cuda":
        return {}
    import torch

    return {"gpu": torch.cuda.get_device_name(0)}


def _rate(row: dict[str, Any] | None) -> float | None:
    rate = row.get("records_per_s") if row else None
    return rate if rate else None


def _ratios(r: dict[str, Any]) -> dict[str, Any]:
    off, e2e = r.get("offline", {}), r.get("streamer", {})
    fp32 = _rate(e2e.get("torch-fp32"))
    out: dict[str, Any] = {
        "streamer_vs_offline": {
            n: e2e[n]["records_per_s"] / rate
            for n in e2e
            if (rate := _rate(off.get(n))) is not None
        },
        "streamer_vs_fp32_streamer": (
            {n: e2e[n]["records_per_s"] / fp32 for n in e2e} if fp32 else {}
        ),
    }
    naive = _rate(r.get("per_record"))
    if fp32 and naive:
        out["streamer_vs_per_record"] = fp32 / naive
    no_model, passthru = r.get("no_model"), _rate(r.get("passthrough"))
    if no_model and passthru:
        out["no_model_vs_passthrough"] = no_model["records_per_s"] / passthru
    return out


def _agree_text(a: dict[str, float] | None) -> str:
    if not a:
        return ""
    if "cosine_mean" in a:
        return f"{a['cosine_mean']:.4f} / {a['cosine_min']:.4f}"
    return f"top-1 {a['top1_agreement']:.1%}"


def _num(x: float | None, fmt: str = ".0f", suffix: str = "") -> str:
    """``x`` formatted, or blank when there is no figure."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:{fmt}}{suffix}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else ""


COLUMNS = (
    "run",
    "records/s",
    "p50 ms",
    "p99 ms",
    "loop µs/rec",
    "vs offline",
    "vs fp32",
    "agreement",
    "notes",
)


def _row(name: str, rate: str = "", *rest: str, notes: str = "") -> tuple[str, ...]:
    """A table row in COLUMNS order: the columns after ``rate`` given in order, blank past
    them, ``notes`` last."""
    cells = (name, rate, *rest)
    return (*cells, *[""] * (len(COLUMNS) - 1 - len(cells)), notes)


def _streamer_row(
    name: str, e: dict[str, Any], vs_off: str, vs_fp32: str, agree: str, notes: str
) -> tuple[str, ...]:
    return (
        name,
        _num(e["records_per_s"], ".1f"),
        _num(e.get("latency_p50_ms")),
        _num(e.get("latency_p99_ms")),
        _num(e.get("loop_us_per_record"), ".1f"),
        vs_off,
        vs_fp32,
        agree,
        notes,
    )


def _rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per result, in COLUMNS order; sections that did not run have none."""
    rows: list[tuple[str, ...]] = []
    off = r.get("offline", {})
    ratios = r.get("ratios") or _ratios(r)
    fp32_off = off.get("torch-fp32")
    for name, o in off.items():
        passes = o.get("passes") or [o]
        for i, p in enumerate(passes):
            label = "" if len(passes) == 1 else (" cold" if i == 0 else " warm")
            ref = None
            if fp32_off:
                ref_passes = fp32_off.get("passes") or [fp32_off]
                ref = _rate(ref_passes[min(i, len(ref_passes) - 1)])
            note = "per batch, length-sorted"
            if len(passes) > 1:
                note += ", first pass (cold shapes)" if i == 0 else f", pass {i + 1} (warm)"
            rows.append(
                _row(
                    f"offline {name}{label}",
                    _num(p["records_per_s"], ".1f"),
                    _num(p["batch_p50_ms"]),
                    _num(p["batch_p99_ms"]),
                    "",
                    "",
                    _ratio(p["records_per_s"], ref),
                    _agree_text(o.get("agreement")),
                    notes=note,
                )
            )
    e2e = r.get("streamer", {})
    fp32 = _rate(e2e.get("torch-fp32"))
    for name, e in e2e.items():
        vs_off = ratios["streamer_vs_offline"].get(name)
        rows.append(
            _streamer_row(
                f"streamer {name}",
                e,
                f"{vs_off:.2f}×" if vs_off else "",
                _ratio(e["records_per_s"], fp32),
                _agree_text(off.get(name, {}).get("agreement")),
                f"{e['mean_batch_rows']:.0f} rows/batch, {e['padding_ratio']:.0%} padding",
            )
        )
    for enc, e in r.get("encodings", {}).items():
        if enc == "float":
            continue
        rows.append(
            _streamer_row(
                f"streamer torch-fp32 {enc}",
                e,
                "",
                _ratio(e["records_per_s"], fp32),
                "",
                "output encoding (the rest: float)",
            )
        )
    nm = r.get("no_model")
    if nm:
        vs = ratios.get("no_model_vs_passthrough")
        rows.append(
            _streamer_row(
                "streamer no-model",
                nm,
                "",
                "",
                "",
                f"NullModel: the pipeline alone, {nm['records']} records, "
                f"{nm['mean_batch_rows']:.0f} rows/batch"
                + (f"; {vs:.2f}× the passthrough" if vs else ""),
            )
        )
    b64 = r.get("no_model_b64")
    if b64:
        rows.append(
            _streamer_row(
                "streamer no-model base64-f16",
                b64,
                "",
                "",
                "",
                f"NullModel, output.embedding_encoding base64-f16 (~1 KB results), "
                f"{b64['records']} records, {b64['mean_batch_rows']:.0f} rows/batch",
            )
        )
    pt = r.get("passthrough")
    if pt:
        rows.append(
            _streamer_row(
                "kafka passthrough",
                pt,
                "",
                "",
                "",
                f"bare aiokafka + orjson, same records and result size, {pt['records']} records",
            )
        )
    unordered = r.get("order", {}).get("none")
    if unordered:
        rows.append(
            _streamer_row(
                "streamer torch-fp32 order=none",
                unordered,
                "",
                _ratio(unordered["records_per_s"], fp32),
                "",
                f"batching.order none (length grouping, no per-key order; the streamer rows keep "
                f"it): {unordered['mean_batch_rows']:.0f} rows/batch, "
                f"{unordered['padding_ratio']:.0%} padding",
            )
        )
    comp = r.get("compression", {})
    plain = (comp.get("none") or {}).get("bytes_per_record")
    for codec, e in comp.items():
        rows.append(
            _streamer_row(
                f"streamer no-model {codec}",
                e,
                "",
                "",
                "",
                f"kafka.compression_type={codec}: {e['bytes_per_record']:.0f} bytes/record on "
                "the output topic as stored"
                + (f" ({e['bytes_per_record'] / plain:.2f}× none)" if plain else "")
                + f", {e['records']} distinct rows",
            )
        )
    procs = r.get("processes", {})
    for e in procs.values():
        one = _rate(procs.get(f"{e['model']} x1"))
        rows.append(
            _row(
                f"streamer {e['model']} ×{e['processes']} proc",
                _num(e["records_per_s"], ".1f"),
                "",
                "",
                "",
                "",
                _ratio(e["records_per_s"], fp32) if e["model"] == "torch-fp32" else "",
                notes=f"runtime.processes={e['processes']}, `streamer run` measured from outside: "
                f"{_ratio(e['records_per_s'], one) or 'n/a'} one process, {e['records']} "
                f"records, first result after {e['first_result_s']:.1f}s",
            )
        )
    n = r.get("per_record")
    if n:
        rows.append(
            _row(
                "per-record consumer",
                _num(n["records_per_s"], ".1f"),
                _num(n["latency_p50_ms"]),
                _num(n["latency_p99_ms"]),
                "",
                "",
                _ratio(n["records_per_s"], fp32),
                notes=f"torch-fp32, {n['records']} records, one forward each",
            )
        )
    from streamer.tools.apibench import api_rows

    rows += api_rows(r)
    for name, why in r.get("skipped", {}).items():
        rows.append(_row(f"skipped {name}", notes=why))
    for label, why in r.get("failed", {}).items():
        rows.append(_row(f"FAILED {label}", notes=why))
    return rows


def _targets(r: dict[str, Any]) -> list[str]:
    """The target lines for what this run measured."""
    lines = []
    ratios = r.get("ratios") or _ratios(r)
    fp32_ratio = ratios["streamer_vs_offline"].get("torch-fp32")
    if fp32_ratio is not None:
        lines.append(
            f"streamer torch-fp32 / offline torch-fp32 = {fp32_ratio:.2f} (≥ 0.95; offline: "
            "its last pass)"
        )
    low = r.get("low_load")
    if low:
        lines.append(
            f"at a steady {low['rate_per_s']:.0f} records/s, p99 latency "
            f"{low['latency_p99_ms']:.0f} ms (p50 {low['latency_p50_ms']:.0f} ms, "
            f"{low['mean_batch_rows']:.1f} rows/batch) ≤ max_wait_ms + one batch "
            f"(p99 {low['batch_p99_ms']:.0f} ms) = {low['bound_ms']:.0f} ms"
        )
    fast = _fastest_agreeing(r)
    if fast is not None:
        name, speed = fast
        lines.append(
            f"fastest variant within the agreement bounds end to end, {name}, = "
            f"{speed:.2f}× torch-fp32 end to end (≥ 1.4)"
        )
    vs = ratios.get("no_model_vs_passthrough")
    if vs is not None:
        lines.append(f"streamer no-model / kafka passthrough = {vs:.2f} (≥ 0.5)")
    fp32_loop = r.get("streamer", {}).get("torch-fp32", {}).get("loop_us_per_record")
    nm_loop = (r.get("no_model") or {}).get("loop_us_per_record")
    if fp32_loop is not None or nm_loop is not None:
        lines.append(
            "event-loop CPU per record (torch-fp32 float JSON / no-model) = "
            f"{_num(fp32_loop, '.1f') or 'n/a'} / {_num(nm_loop, '.1f') or 'n/a'} µs (≤ 15)"
        )
    from streamer.tools.apibench import api_targets

    return lines + api_targets(r)


def _title(r: dict[str, Any]) -> str:
    m = r["machine"]
    where = m.get("gpu", f"{m['cpu_threads']} CPU threads")
    counts = []
    if "records" in r:
        counts.append(f"{r['records']} records, MiniLM")
    if "no_model_records" in r:
        counts.append(f"{r['no_model_records']} records without a model")
    return f"streamer bench — {'; '.join(counts)}, {m['device']} ({where})"


LEGEND = (
    "p50/p99: per batch offline; fetch→ack per record end to end (the whole backlog is queued "
    "at once, so they include waiting). loop µs/rec: event-loop thread CPU per record, first "
    "fetch to last ack. vs offline: over the same variant's offline records/s (its last, warm "
    "pass). vs fp32: records/s over torch-fp32's on the same path (the per-record consumer: "
    "over streamer torch-fp32). agreement: cosine to torch-fp32's embeddings, mean / worst row."
)


def print_results(console: Console, r: dict[str, Any]) -> None:
    table = Table(title=_title(r))
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("run", "notes") else "right")
    for row in _rows(r):
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    console.print(LEGEND)
    for line in _targets(r):
        console.print(f"target: {line}")


def _fastest_agreeing(r: dict[str, Any]) -> tuple[str, float] | None:
    """The fastest end-to-end variant (other than fp32 torch) within the agreement bounds."""
    best = None
    ratios = r.get("ratios") or _ratios(r)
    for name, speed in ratios["streamer_vs_fp32_streamer"].items():
        a = r.get("offline", {}).get(name, {}).get("agreement")
        if name == "torch-fp32" or not a:
            continue
        bound = 0.99 if "int8" in name else 0.999
        ok = a.get("cosine_min", 1.0) >= bound and a.get("top1_agreement", 1.0) >= 0.99
        if ok and (best is None or speed > best[1]):
            best = (name, speed)
    return best


def _markdown(r: dict[str, Any]) -> str:
    head = f"# {_title(r)}\n\n{r['machine']['platform']}, Python {r['machine']['python']}\n\n"
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in _rows(r)]
    lines += ["", LEGEND, ""]
    lines += [f"- target: {line}" for line in _targets(r)]
    return head + "\n".join(lines) + "\n"
