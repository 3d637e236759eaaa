"""runtime.processes: the supervisor's plan and metrics (unit), and N workers as one pod against
the real broker (integration: separate processes, a worker SIGKILLed and restarted)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import (
    base_config,
    committed,
    json_records,
    produce,
    read_topic,
    service_process,
    two_cores,
)

from streamer.config import ConfigError, load_config
from streamer.kafka.broker import create_topics, free_port
from streamer.supervisor import merge_metrics, plan_workers, split_cores


def test_split_cores_gives_contiguous_shares_larger_first() -> None:
    assert split_cores([3, 0, 1, 2, 4, 5, 6], 4) == [[0, 1], [2, 3], [4, 5], [6]]
    assert split_cores([0, 1], 2) == [[0], [1]]
    with pytest.raises(ValueError):
        split_cores([0], 2)


def test_plan_gives_each_worker_its_cores_threads_and_port() -> None:
    cfg = load_config(
        None, runtime={"processes": 2, "cpu_affinity": two_cores(), "torch_threads": 4}
    )
    plans = plan_workers(cfg, ports=[9001, 9002])
    assert [(p.index, p.port, p.cores, p.torch_threads) for p in plans] == [
        (0, 9001, two_cores()[:1], 1),
        (1, 9002, two_cores()[1:], 1),
    ]


def test_a_worker_reads_its_overrides_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = load_config(None, runtime={"processes": 2, "cpu_affinity": two_cores()})
    plan = plan_workers(cfg, ports=[9001, 9002])[1]
    for key, value in plan.env().items():
        monkeypatch.setenv(key, value)
    worker = load_config(None, runtime={"processes": 2, "cpu_affinity": two_cores()})
    assert worker.runtime.processes == 1
    assert worker.runtime.cpu_affinity == two_cores()[1:] and worker.runtime.torch_threads == 1
    assert (worker.http.host, worker.http.port) == ("127.0.0.1", 9002)


def test_more_processes_than_cores_or_admin_fail_at_start() -> None:
    with pytest.raises(ConfigError, match=r"runtime\.processes"):
        load_config(None, runtime={"processes": 64, "cpu_affinity": [0]})
    with pytest.raises(ConfigError, match=r"http\.admin: not served with runtime\.processes"):
        load_config(
            None,
            runtime={"processes": 2, "cpu_affinity": two_cores()},
            http={"admin": True, "admin_token": "t0ken"},  # guarded, still refused
        )


def test_merge_metrics_labels_every_sample_with_its_worker() -> None:
    one = (
        "# HELP streamer_records_total Records\n# TYPE streamer_records_total counter\n"
        'streamer_records_total{topic="a"} 3.0\n'
        "# HELP streamer_batch_seconds Batch\n# TYPE streamer_batch_seconds histogram\n"
        'streamer_batch_seconds_bucket{le="1.0"} 2.0\n'
        'streamer_batch_seconds_bucket{le="+Inf"} 2.0\n'
        "streamer_batch_seconds_count 2.0\nstreamer_batch_seconds_sum 0.5\n"
    )
    two = one.replace("3.0", "4.0")
    text = merge_metrics({0: one, 1: two}).decode()
    assert text.count("# TYPE streamer_records_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    records = {s.labels["worker"]: s.value for s in families["streamer_records"].samples}
    assert records == {"0": 3.0, "1": 4.0}
    buckets = [s for s in families["streamer_batch_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["worker"] for s in buckets} == {"0", "1"} and len(buckets) == 4


# -- integration ------------------------------------------------------------------------------
N = 3000


def sources(msgs: list) -> set[tuple[int, int]]:
    return {
        (orjson.loads(m.value)["source"]["partition"], orjson.loads(m.value)["source"]["offset"])
        for m in msgs
    }


async def get(port: int, path: str) -> tuple[int, str]:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.get(f"http://127.0.0.1:{port}{path}") as resp:
                return resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, repr(exc)


async def until(
    check: Callable[[], Awaitable[bool]], what: str, proc: subprocess.Popen, timeout_s: float = 90.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if proc.poll() is not None:
            raise AssertionError(f"the supervisor exited with {proc.returncode} before {what}")
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
        await asyncio.sleep(0.3)


@pytest.mark.integration
async def test_two_workers_share_the_group_and_a_killed_one_is_restarted(
    broker: str, topic: str, tiny_model: Path, tmp_path: Path
) -> None:
    await create_topics(broker, {topic: 4})
    await produce(broker, topic, json_records(N // 2))
    port = free_port()
    cfg = base_config(
        broker,
        tiny_model,
        topic,
        http={"port": port, "host": "127.0.0.1"},
        runtime={"processes": 2, "cpu_affinity": two_cores(), "shutdown_grace_s": 15},
    )
    path = tmp_path / "streamer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = service_process(path)
    out = f"{topic}.out"
    try:

        async def ready() -> bool:
            return (await get(port, "/readyz"))[0] == 200

        await until(ready, "every worker ready", proc)
        status, text = await get(port, "/metrics")
        assert status == 200 and 'worker="0"' in text and 'worker="1"' in text
        assert "streamer_workers_running 2.0" in text

        async def first_half() -> bool:
            return len(sources(await read_topic(broker, out, expect=N // 2, timeout_s=1))) >= N // 2

        await until(first_half, "the first records' results", proc)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        workers[0].kill()  # SIGKILL one member: the other takes over, the parent restarts it
        await produce(broker, topic, json_records(N // 2, start=N // 2))

        async def restarted() -> bool:
            status, text = await get(port, "/metrics")
            return (
                status == 200
                and "streamer_worker_restarts_total" in text
                and any(
                    s.value == 1.0
                    for f in text_string_to_metric_families(text)
                    if f.name == "streamer_worker_restarts"
                    for s in f.samples
                )
            )

        await until(restarted, "the killed worker restarted", proc)

        async def everything() -> bool:
            return len(sources(await read_topic(broker, out, expect=2 * N, timeout_s=1))) >= N

        await until(everything, "a result for every record", proc)
        await until(ready, "every worker ready again", proc)
        proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        code = await asyncio.wait_for(loop.run_in_executor(None, proc.wait), 60)
    finally:
        for child in psutil.Process(proc.pid).children() if proc.poll() is None else []:
            child.kill()
        proc.kill()
    assert code == 0, (tmp_path / "streamer.log").read_text()[-3000:]
    text = (tmp_path / "streamer.log").read_text()
    assert "[worker 0]" in text and "[worker 1]" in text and "restarting it" in text
    assert len(sources(await read_topic(broker, out, expect=2 * N, timeout_s=2))) == N
    offsets = await committed(broker, f"g-{topic}", topic)
    assert sum(c or 0 for c in offsets.values()) == N  # SIGTERM drained and committed everything
