"""The bench's own parts: the kafka passthrough against the real broker, the zero-cost model,
the "until N outputs" race, and the table. No timing thresholds: figures only have to be sane."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from support import (
    RunningService,
    base_config,
    committed,
    json_records,
    produce,
    read_topic,
    two_cores,
)

from streamer.cli import main
from streamer.config import ModelConfig, load_config
from streamer.kafka.broker import create_topics
from streamer.observability.telemetry import Telemetry
from streamer.tools.bench import _markdown, _rows, _sections, _targets, _variants, passthrough
from streamer.tools.devtools import StoppedEarly, produce_texts, sample_texts, until_outputs
from streamer.tools.nullmodel import NULL_DIM, NULL_FINGERPRINT, NullModel


# -- the zero-cost model ----------------------------------------------------------------------
def test_null_model_conforms() -> None:
    model = NullModel.from_config(ModelConfig(name="nil", version="2", max_length=16))
    assert model.info.name == "nil" and model.info.version == "2"
    assert model.info.fingerprint == NULL_FINGERPRINT
    assert model.info.device == "cpu" and model.info.task == "feature-extraction"
    assert model.labels == {} and model.max_length == 16

    encs = model.tokenize(["three short words", "", "word " * 40])
    assert [len(e.ids) for e in encs] == [5, 2, 16]  # words + 2, truncated at max_length
    assert [e.truncated for e in encs] == [False, False, True]
    assert all(isinstance(i, int) and 0 <= i < 100 for e in encs for i in e.ids)
    encs[0].ids.append(0)  # rows are copies: a caller cannot change the next record's ids
    assert len(model.tokenize(["three short words"])[0].ids) == 5

    out = model.forward([e.ids for e in encs])
    assert out.shape == (3, NULL_DIM) and out.dtype == np.float32
    assert out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    results = model.postprocess(out, 3)
    assert len(results) == 3 and results[0]["embedding"].shape == (NULL_DIM,)
    assert model.warmup(64, 8192) >= 0.0 and "warmup" in model.timings.phases


@pytest.mark.integration
async def test_null_model_serves_end_to_end(broker: str, topic: str) -> None:
    """The whole pipeline with the NullModel; ``wait_done`` raises once the service stopped."""
    n = 40
    over = base_config(
        broker, Path("."), topic, model={"name": "null", "version": "null", "path": None}
    )
    await create_topics(broker, {topic: 2, f"{topic}.out": 2, f"{topic}.dlq": 1})
    await produce(broker, topic, json_records(n))
    async with RunningService(
        load_config(None, **over), model_factory=NullModel.from_config
    ) as svc:
        await svc.wait_done(n, timeout_s=60)
        telemetry = svc.service.telemetry
        assert telemetry.outputs() == (n, 0)
        assert telemetry.loop_cpu_per_record_s() > 0
        svc.service.request_stop()
        with pytest.raises(StoppedEarly, match="stopped"):
            await svc.wait_done(n + 1, timeout_s=60)
    values = [orjson.loads(m.value) for m in await read_topic(broker, f"{topic}.out", expect=n)]
    assert sorted(v["id"] for v in values) == list(range(n))
    assert all(len(v["result"]["embedding"]) == NULL_DIM for v in values)
    assert values[0]["model"]["fingerprint"] == NULL_FINGERPRINT


def test_null_backend_needs_no_path_and_builds_the_null_model() -> None:
    from streamer.models.backends import create_model

    cfg = load_config(None, model={"name": "nil", "backend": "null"})
    assert cfg.require_model_path() is None
    assert isinstance(create_model(cfg.model), NullModel)


@pytest.mark.integration
async def test_processes_row_runs_streamer_from_outside(
    broker: str, topic: str, tmp_path: Path
) -> None:
    """The processes section's run: ``streamer run`` (backend null, two workers) as a child,
    measured from its output topic, stopped with SIGTERM."""
    from streamer.tools.bench import NULL_MODEL, _kafka_over
    from streamer.tools.procbench import multi_process

    n = 300
    await create_topics(broker, {topic: 4})
    await produce(broker, topic, json_records(n))
    row = await multi_process(
        broker,
        {"model": NULL_MODEL, "runtime": {"cpu_affinity": two_cores()}},
        _kafka_over(broker),
        topic,
        n,
        2,
        tmp_path,
        timeout_s=120,
    )
    assert row["records"] == n and row["exit_code"] == 0 and row["records_per_s"] > 0
    assert "[worker 1]" in (tmp_path / "bench-proc-run-2.log").read_text()


# -- the kafka passthrough --------------------------------------------------------------------
@pytest.mark.integration
async def test_passthrough_moves_records_and_commits(broker: str, topic: str) -> None:
    n = 300
    await create_topics(broker, {topic: 4})
    await produce_texts(broker, topic, sample_texts(n))
    group = f"pt-{topic}"

    figures = await passthrough(broker, topic, n, group=group, timeout_s=60)

    assert figures["records"] == n
    assert figures["records_per_s"] > 0
    assert 0 < figures["loop_us_per_record"] < math.inf
    assert 0 <= figures["latency_p50_ms"] <= figures["latency_p99_ms"]
    offsets = await committed(broker, group, topic)
    assert sum(o or 0 for o in offsets.values()) == n  # every partition committed to its end
    out = await read_topic(broker, f"{topic}.passthrough", expect=n, timeout_s=30)
    assert len(out) == n
    values = [orjson.loads(m.value) for m in out]
    assert sorted(v["id"] for v in values) == list(range(n))
    first = values[0]
    assert set(first) == {"id", "result", "model", "source"}
    assert len(first["result"]["embedding"]) == NULL_DIM
    assert set(first["source"]) == {"topic", "partition", "offset"}


# -- "until N outputs are acknowledged" ---------------------------------------------------------
def _ack(telemetry: Telemetry, n: int) -> None:
    lat = np.full(n, 0.01)
    telemetry.ack_metrics({("in", "m", "1"): n}, {}, lat, lat)
    telemetry.acked(n)


async def test_until_outputs_returns_once_acknowledged() -> None:
    telemetry = Telemetry()
    seen: list[int] = []
    telemetry.subscribe(seen.append)
    forever = asyncio.Event()

    async def service() -> int:
        for _ in range(3):
            await asyncio.sleep(0)
            _ack(telemetry, 4)
        await forever.wait()
        return 0

    runner = asyncio.ensure_future(service())
    await until_outputs(telemetry, runner, 12, timeout_s=5)
    assert telemetry.outputs() == (12, 0) and seen == [4, 4, 4]
    assert not runner.done()
    forever.set()
    assert await runner == 0


async def test_until_outputs_raises_when_the_service_ends_first() -> None:
    telemetry = Telemetry()

    async def stops() -> int:
        _ack(telemetry, 2)
        return 3

    with pytest.raises(StoppedEarly, match="2 results") as info:
        await until_outputs(telemetry, asyncio.ensure_future(stops()), 10, timeout_s=5)
    assert info.value.exit_code == 3

    async def fails() -> int:
        raise OSError("broker gone")

    with pytest.raises(StoppedEarly, match="broker gone"):
        await until_outputs(telemetry, asyncio.ensure_future(fails()), 10, timeout_s=5)


async def test_until_outputs_times_out() -> None:
    telemetry = Telemetry()
    runner = asyncio.ensure_future(asyncio.Event().wait())
    with pytest.raises(TimeoutError):
        await until_outputs(telemetry, runner, 1, timeout_s=0.05)  # type: ignore[arg-type]
    runner.cancel()


# -- options ------------------------------------------------------------------------------------
def test_cuda_graphs_reach_the_model_config_on_cuda_only() -> None:
    def names(device: str, mode: str, backends: str | None = None) -> list[tuple[str, Any]]:
        args = argparse.Namespace(backends=backends, cuda_graphs=mode)
        return [(v.name, v.model_keys().get("cuda_graphs")) for v in _variants(args, device)]

    assert names("cuda", "both", "torch-fp16") == [
        ("torch-fp32", True),
        ("torch-fp32-eager", False),
        ("torch-fp16", True),
        ("torch-fp16-eager", False),
    ]
    assert names("cuda", "off", "torch-fp16") == [("torch-fp32", False), ("torch-fp16", False)]
    assert names("cuda", "on", "onnxruntime-fp32") == [
        ("torch-fp32", True),
        ("onnxruntime-fp32", None),  # the key is for torch on CUDA
    ]
    assert all(graphs is None for _, graphs in names("cpu", "both"))


def test_only_picks_sections_in_run_order() -> None:
    assert _sections("no-model,passthrough") == ["passthrough", "no-model"]
    assert _sections("low_load, offline") == ["offline", "low-load"]
    with pytest.raises(SystemExit, match="unknown section"):
        _sections("offline,gpu")


# -- the table --------------------------------------------------------------------------------
def _e2e(rate: float, loop_us: float) -> dict[str, Any]:
    return {
        "records": 1000,
        "dead_letters": 0,
        "records_per_s": rate,
        "latency_p50_ms": 50.0,
        "latency_p99_ms": 90.0,
        "loop_us_per_record": loop_us,
        "mean_batch_rows": 64.0,
        "padding_ratio": 0.2,
    }


def _offline(rates: list[float]) -> dict[str, Any]:
    passes = [
        {"records_per_s": r, "seconds": 1.0, "batch_p50_ms": 5.0, "batch_p99_ms": 9.0}
        for r in rates
    ]
    return {
        "records": 1000,
        **passes[-1],
        "passes": passes,
        "agreement": {"cosine_mean": 1.0, "cosine_min": 0.9995},
    }


def test_table_has_every_new_row_and_target() -> None:
    results = {
        "machine": {"device": "cuda", "cpu_threads": 16, "platform": "linux", "python": "3.12"},
        "records": 1000,
        "no_model_records": 20000,
        "offline": {
            "torch-fp32": _offline([800.0, 1000.0]),
            "torch-fp16-eager": _offline([1500.0, 1600.0]),
        },
        "streamer": {"torch-fp32": _e2e(960.0, 12.0), "torch-fp16-eager": _e2e(1500.0, 11.0)},
        "encodings": {"base64-f16": _e2e(990.0, 8.0)},
        "no_model": _e2e(20000.0, 10.0),
        "no_model_b64": _e2e(40000.0, 6.0),
        "passthrough": {
            "records": 20000,
            "records_per_s": 30000.0,
            "latency_p50_ms": 10.0,
            "latency_p99_ms": 20.0,
            "loop_us_per_record": 9.0,
        },
        "processes": {
            f"{m} x{n}": {
                "model": m,
                "processes": n,
                "records": 1000,
                "records_per_s": rate,
                "first_result_s": 2.0,
                "exit_code": 0,
            }
            for m, n, rate in [("torch-fp32", 1, 900.0), ("torch-fp32", 2, 1800.0)]
        },
        "order": {"none": _e2e(1200.0, 12.0)},
        "skipped": {"openvino-fp32": "CPU only"},
        "failed": {"low-load": "TimeoutError: x"},
    }
    rows = {row[0]: row for row in _rows(results)}
    assert rows["streamer torch-fp32 order=none"][6] == "1.25×"  # over the ordered fp32 row
    assert rows["streamer torch-fp32 ×2 proc"][1] == "1800.0"
    assert "2.00× one process" in rows["streamer torch-fp32 ×2 proc"][-1]
    assert rows["offline torch-fp32 cold"][1] == "800.0"
    assert rows["offline torch-fp32 warm"][1] == "1000.0"
    assert rows["offline torch-fp16-eager cold"][6] == "1.88×"  # over fp32's cold pass
    assert rows["streamer torch-fp32"][4] == "12.0"  # loop µs/rec
    assert rows["streamer torch-fp32"][5] == "0.96×"  # over the warm offline pass
    assert rows["streamer torch-fp32 base64-f16"][4] == "8.0"
    assert rows["streamer no-model"][4] == "10.0"
    assert "0.67× the passthrough" in rows["streamer no-model"][-1]
    assert rows["streamer no-model base64-f16"][1] == "40000.0"
    assert rows["streamer no-model base64-f16"][4] == "6.0"
    assert rows["kafka passthrough"][1] == "30000.0"
    assert "FAILED low-load" in rows and "skipped openvino-fp32" in rows
    targets = "\n".join(_targets(results))
    assert "streamer no-model / kafka passthrough = 0.67 (≥ 0.5)" in targets
    assert (
        "event-loop CPU per record (torch-fp32 float JSON / no-model) = 12.0 / 10.0 µs (≤ 15)"
        in targets
    )
    assert "torch-fp16-eager, = 1.56× torch-fp32" in targets
    md = _markdown(results)
    assert "| kafka passthrough |" in md and "target: streamer no-model" in md


@pytest.mark.integration
@pytest.mark.usefixtures("root_logging")
def test_bench_only_passthrough(tmp_path: Path) -> None:
    """``--only`` runs a section alone (no model needed) and writes JSON and Markdown."""
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--quick",
            "--only",
            "passthrough",
            "--no-model-records",
            "200",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["sections"] == ["passthrough"]
    assert results["passthrough"]["records"] == 200
    assert results["offline"] == {} and results["failed"] == {}
    assert "kafka passthrough" in out.with_suffix(".md").read_text()
