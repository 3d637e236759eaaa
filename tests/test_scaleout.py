"""Scale-out, shown not assumed: 1, then 3 replicas as separate processes in one group.

Partitions are shared, a replica leaving and another joining loses nothing, and a replica
beyond the partition count idles (ready, no partitions) without crashing or rejoining in a loop.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import base_config, json_records, produce, read_topic, service_process

from streamer.kafka.broker import create_topics, free_port

pytestmark = pytest.mark.integration


class Replica:
    def __init__(self, tmp_path: Path, name: str, cfg: dict) -> None:
        self.port = free_port()
        cfg = {**cfg, "http": {"port": self.port, "host": "127.0.0.1"}}
        self.path = tmp_path / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Replica:
        self.proc = service_process(self.path)
        return self

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.port}{path}") as resp:
                return resp.status, await resp.text()

    async def wait_ready(self, timeout_s: float = 60) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                if (await self.get("/readyz"))[0] == 200:
                    return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"replica on {self.port} never got ready:\n{self.log()}")

    async def metric(self, name: str) -> float:
        _, text = await self.get("/metrics")
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name
        )

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), 40)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        p = self.path.with_suffix(".log")
        return p.read_text()[-3000:] if p.exists() else ""


def sources(msgs: list) -> set[tuple[int, int]]:
    out = set()
    for m in msgs:
        src = orjson.loads(m.value)["source"]
        out.add((src["partition"], src["offset"]))
    return out


async def test_one_then_three_replicas_share_partitions_and_lose_nothing(
    broker: str, topic: str, tiny_model: Path, tmp_path: Path
) -> None:
    partitions = 2
    await create_topics(broker, {topic: partitions})
    cfg = base_config(broker, tiny_model, topic)
    replicas = [Replica(tmp_path, f"r{i}", cfg) for i in range(4)]
    try:
        # one replica takes every partition
        first = replicas[0].start()
        await first.wait_ready()
        await produce(broker, topic, json_records(2000))
        for _ in range(100):
            if await first.metric("streamer_records_published_total") >= 2000:
                break
            await asyncio.sleep(0.2)
        assert await first.metric("streamer_assigned_partitions") == partitions

        # three replicas for two partitions: one idles
        for r in replicas[1:3]:
            r.start()
        for r in replicas[:3]:
            await r.wait_ready()
        await produce(broker, topic, json_records(20_000, start=2000))
        assigned: list[float] = []
        for _ in range(120):  # until the group has settled (joins take seconds each)
            assigned = [await r.metric("streamer_assigned_partitions") for r in replicas[:3]]
            if sorted(assigned) == [0, 1, 1]:
                break
            await asyncio.sleep(0.5)
        assert sorted(assigned) == [0, 1, 1], assigned
        await asyncio.sleep(2)  # and stays settled
        assert [await r.metric("streamer_assigned_partitions") for r in replicas[:3]] == assigned
        idle = replicas[assigned.index(0)]
        rebalances = await idle.metric("streamer_rebalances_total")
        await asyncio.sleep(5)
        assert idle.proc.poll() is None  # idles without crashing ...
        assert await idle.metric("streamer_rebalances_total") == rebalances  # ... or looping
        assert (await idle.get("/readyz"))[0] == 200

        # a working replica leaves mid-stream and another joins: nothing is lost
        busy = next(r for r, a in zip(replicas[:3], assigned, strict=True) if a == 1)
        assert await busy.stop() == 0
        replicas[3].start()
        total = 22_000
        seen: set = set()
        for _ in range(60):
            seen = sources(await read_topic(broker, f"{topic}.out", expect=total * 2, timeout_s=1))
            if len(seen) >= total:
                break
        assert len(seen) == total
        for r in replicas:
            if r is not busy and r.proc is not None:
                assert await r.stop() == 0, r.log()
    finally:
        for r in replicas:
            r.kill()
