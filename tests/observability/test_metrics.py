"""/metrics scraped over HTTP and parsed with prometheus-client's own parser.

Besides the values, the names: README.md's metrics table and what a running service exports are
compared both ways (names and label names), so the table cannot drift from ``/metrics``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
import torch
from observability.readme_metrics import (
    CUDA_ONLY,
    SUPERVISOR_ONLY,
    exported,
    exposition_types,
    readme_table,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from support import RunningService, base_config, json_records, produce, proxied_broker, two_cores

from streamer.config import load_config
from streamer.kafka.broker import create_topics, free_port
from streamer.observability.metrics import Metrics
from streamer.observability.telemetry import Telemetry
from streamer.supervisor import Supervisor

pytestmark = pytest.mark.integration


async def scrape_text(port: int) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return await resp.text()


def families_of(text: str) -> dict[str, list]:
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


async def scrape(port: int) -> dict[str, list]:
    return families_of(await scrape_text(port))


def value(families: dict, sample_name: str, **labels: str) -> float:
    base = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    for fam_name in (sample_name, base):
        for s in families.get(fam_name, []):
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{sample_name} {labels}")


def test_readme_table_reader_sees_the_rows() -> None:
    rows = readme_table()
    assert rows["streamer_consumer_lag"].labels == {"topic", "partition"}
    assert rows["streamer_records_published_total"].labels == {"topic", "model", "version"}
    assert CUDA_ONLY in rows["streamer_gpu_memory_reserved_bytes"].meaning
    assert SUPERVISOR_ONLY in rows["streamer_workers_running"].meaning
    assert rows["streamer_worker_restarts_total"].type == "counter"
    assert rows["streamer_workers_running"].type == "gauge"
    assert rows["streamer_end_to_end_latency_seconds"].type == "histogram"


async def test_metrics_match_the_stream_and_lag_drains(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 2})
    good, bad = 200, 3
    await produce(broker, topic, json_records(good) + [b"nope"] * bad)
    port = free_port()
    cfg = load_config(None, **base_config(broker, tiny_model, topic, http={"port": port}))
    telemetry = Telemetry(cfg.tracing)
    before_first_commit = telemetry.metrics.last_commit._value.get()
    async with RunningService(cfg, telemetry=telemetry) as svc:
        await svc.wait_done(good + bad)
        lag: list = []
        for _ in range(100):  # commits trail acks by at most commit_interval_ms
            fam = await scrape(port)
            lag = [s.value for s in fam["streamer_consumer_lag"]]
            if len(lag) == 2 and all(v == 0 for v in lag):
                break
            await asyncio.sleep(0.1)
        assert lag == [0, 0]
    assert value(fam, "streamer_records_consumed_total", topic=topic) == good + bad
    assert (
        value(fam, "streamer_records_published_total", topic=topic, model="tiny", version="1")
        == good
    )
    assert (
        value(fam, "streamer_records_dead_lettered_total", topic=topic, reason="InvalidJson") == bad
    )
    for hist in (
        "streamer_batch_size_records",
        "streamer_batch_tokens",
        "streamer_batch_padding_ratio",
        "streamer_inference_duration_seconds",
    ):
        assert value(fam, f"{hist}_count", model="tiny", version="1") > 0, hist
    for hist in ("streamer_batch_wait_seconds", "streamer_tokenize_duration_seconds"):
        assert value(fam, f"{hist}_count") > 0, hist
    assert value(fam, "streamer_batch_size_records_sum") == good
    assert value(fam, "streamer_end_to_end_latency_seconds_count") == good + bad
    assert value(fam, "streamer_in_flight_records") == 0
    assert value(fam, "streamer_held_records") == 0
    assert value(fam, "streamer_oldest_uncommitted_age_seconds") == 0
    assert value(fam, "streamer_paused_partitions") == 0
    assert value(fam, "streamer_assigned_partitions") == 2
    assert value(fam, "streamer_rebalances_total") >= 1
    assert value(fam, "streamer_last_commit_timestamp_seconds") > before_first_commit
    assert value(fam, "streamer_commit_failures_total") == 0
    assert value(fam, "streamer_broker_connected", client="consumer") == 1
    assert value(fam, "streamer_broker_connected", client="producer") == 1
    assert value(fam, "streamer_breaker_tripped") == 0
    # the standard process collector, on the service's own registry
    assert value(fam, "process_resident_memory_bytes") > 10_000_000
    assert value(fam, "process_cpu_seconds_total") > 0
    assert value(fam, "process_start_time_seconds") > 0
    for phase in ("framework", "tokenizer", "weights", "warmup"):
        assert (
            value(fam, "streamer_model_load_seconds", model="tiny", version="1", phase=phase) >= 0
        )
    assert value(fam, "streamer_model_memory_bytes", model="tiny", version="1") > 10_000
    info = fam["streamer_model_info"][0].labels
    assert info["model"] == "tiny" and info["version"] == "1"
    assert info["fingerprint"].startswith("sha256:")
    build = fam["streamer_build_info"][0].labels
    assert build["torch"].startswith("2.") and build["version"]


async def test_readme_metrics_table_matches_what_a_service_exports(
    broker: str, topic: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real service processes records (one of them a dead letter) and is scraped; the
    ``streamer_*`` names and their label names must be exactly the README table's."""
    await create_topics(broker, {topic: 1})
    await produce(broker, topic, [*json_records(20), b"not json"])
    port = free_port()
    cfg = load_config(None, **base_config(broker, tiny_model, topic, http={"port": port}))
    async with RunningService(cfg) as svc:
        await svc.wait_done(21)
        text = await scrape_text(port)
    live = exported(text)
    types = exposition_types(text)
    table = readme_table()
    assert live["streamer_records_dead_lettered_total"] == {"topic", "reason"}

    # Families a healthy run leaves without samples (send failures, ...): their declared labels.
    declared = {
        f"{m._name}_total" if m._type == "counter" else m._name: frozenset(m._labelnames)
        for m in vars(svc.service.telemetry.metrics).values()
        if isinstance(m, MetricWrapperBase)
    }
    for name, labels in live.items():
        if labels is None and name in declared:
            live[name] = declared[name]
    assert live["streamer_send_failures_total"] == {"topic", "kind"}

    # Rows a CPU process without a supervisor cannot show, each from where it comes from.
    conditional = {n for n, row in table.items() if CUDA_ONLY in row.meaning}
    state_cuda = Metrics()
    state_cuda.state.cuda = True
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 1024)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: 2048)
    cuda = exported(state_cuda.render().decode())
    assert conditional and conditional <= set(cuda), conditional - set(cuda)
    for name in conditional:
        assert cuda[name] == table[name].labels, name
        assert name not in live, f"{name} is exported on a CPU-only service"

    supervised = {n for n, row in table.items() if SUPERVISOR_ONLY in row.meaning}
    sup_cfg = load_config(
        None,
        **base_config(
            broker, tiny_model, topic, runtime={"processes": 2, "cpu_affinity": two_cores()}
        ),
    )
    supervisor = Supervisor(sup_cfg)
    async with aiohttp.ClientSession() as session:
        supervisor._session = session  # workers not started: they just do not answer
        from_supervisor = exported((await supervisor._metrics()).decode())
    assert supervised and supervised <= set(from_supervisor), supervised - set(from_supervisor)
    for name in supervised:
        assert from_supervisor[name] in (None, table[name].labels), name

    ours = {n: labels for n, labels in live.items() if n.startswith("streamer_")}
    documented = {n for n in table if n.startswith("streamer_")} - conditional - supervised
    assert not set(ours) - documented, f"exported but not in README: {set(ours) - documented}"
    assert not documented - set(ours), f"in README but not exported: {documented - set(ours)}"
    for name in documented:
        assert ours[name] is not None, f"{name}: no sample to read its labels from"
        documented_labels = sorted(table[name].labels)
        assert ours[name] == table[name].labels, (name, sorted(ours[name]), documented_labels)
        assert types[name] == table[name].type, (name, types[name], table[name].type)
    standard = {n for n in table if not n.startswith("streamer_")}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= standard
    assert not standard - set(live), f"README lists {standard - set(live)}, not exported"


async def test_alerting_metrics_follow_a_broker_outage(tiny_model: Path) -> None:
    """The broker goes away mid-stream: the clients' connection gauges drop to 0 while the
    service still runs, sends are retried and counted, and the batches given up on count as
    fatal send failures."""
    async with proxied_broker() as (bootstrap, proxy):
        topic = "outage"
        await create_topics(bootstrap, {topic: 1})
        await produce(bootstrap, topic, json_records(400))
        cfg = load_config(
            None,
            **base_config(
                bootstrap,
                tiny_model,
                topic,
                kafka={
                    "request_timeout_ms": 4000,
                    "session_timeout_ms": 3000,
                    "delivery_timeout_ms": 3000,
                    "retry_backoff_ms": 50,
                    "max_retry_backoff_ms": 200,
                },
                runtime={"shutdown_grace_s": 5},
            ),
        )
        telemetry = Telemetry(cfg.tracing)
        metrics = telemetry.metrics

        def now() -> dict[str, list]:
            return families_of(metrics.render().decode())

        svc = RunningService(cfg, telemetry=telemetry)
        async with svc:
            await svc.wait_done(50)
            fam = now()
            assert value(fam, "streamer_broker_connected", client="consumer") == 1
            assert value(fam, "streamer_broker_connected", client="producer") == 1
            await proxy.cut()  # and never back, with most of the 400 records still to send
            seen_down = False
            while not svc.service.stopping:
                fam = now()
                if (
                    value(fam, "streamer_broker_connected", client="consumer") == 0
                    and value(fam, "streamer_broker_connected", client="producer") == 0
                ):
                    seen_down = True
                    break
                await asyncio.sleep(0.02)
            assert seen_down, "the connection gauges did not drop while the service ran"
            await asyncio.wait_for(svc.service.pipeline.wait_failed(), 60)
        assert svc.exit_code == 1
        fam = now()
        assert value(fam, "streamer_send_retries_total", topic=f"{topic}.out") >= 1
        assert value(fam, "streamer_send_failures_total", topic=f"{topic}.out", kind="fatal") >= 1
        assert value(fam, "streamer_breaker_tripped") == 0
