"""/metrics scraped over HTTP and parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import RunningService, base_config, json_records, produce

from streamer.config import load_config
from streamer.kafka.broker import create_topics, free_port

pytestmark = pytest.mark.integration


async def scrape(port: int) -> dict[str, list]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    families: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = fam.samples
    return families


def value(families: dict, sample_name: str, **labels: str) -> float:
    base = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    for fam_name in (sample_name, base):
        for s in families.get(fam_name, []):
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{sample_name} {labels}")


async def test_metrics_match_the_stream_and_lag_drains(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 2})
    good, bad = 200, 3
    await produce(broker, topic, json_records(good) + [b"nope"] * bad)
    port = free_port()
    cfg = load_config(None, **base_config(broker, tiny_model, topic, http={"port": port}))
    async with RunningService(cfg) as svc:
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
    assert value(fam, "streamer_records_published_total", topic=topic, model="tiny") == good
    assert (
        value(fam, "streamer_records_dead_lettered_total", topic=topic, reason="InvalidJson") == bad
    )
    for hist in (
        "streamer_batch_size_records",
        "streamer_batch_tokens",
        "streamer_batch_padding_ratio",
        "streamer_batch_wait_seconds",
        "streamer_tokenize_duration_seconds",
        "streamer_inference_duration_seconds",
    ):
        assert value(fam, f"{hist}_count") > 0, hist
    assert value(fam, "streamer_batch_size_records_sum") == good
    assert value(fam, "streamer_end_to_end_latency_seconds_count") == good + bad
    assert value(fam, "streamer_in_flight_records") == 0
    assert value(fam, "streamer_paused_partitions") == 0
    assert value(fam, "streamer_assigned_partitions") == 2
    assert value(fam, "streamer_rebalances_total") >= 1
    assert value(fam, "streamer_process_resident_memory_bytes") > 10_000_000
    assert value(fam, "streamer_process_cpu_seconds_total") > 0
    for phase in ("framework", "tokenizer", "weights", "warmup"):
        assert value(fam, "streamer_model_load_seconds", model="tiny@1", phase=phase) >= 0
    assert value(fam, "streamer_model_memory_bytes", name="tiny", version="1") > 10_000
    info = fam["streamer_model_info"][0].labels
    assert info["name"] == "tiny" and info["fingerprint"].startswith("sha256:")
    build = fam["streamer_build_info"][0].labels
    assert build["torch"].startswith("2.") and build["version"]
