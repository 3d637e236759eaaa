"""/healthz and /readyz: ready only once warm and joined; not alive when inference is wedged."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import aiohttp
import pytest
from support import RunningService, base_config, json_records, produce

from streamer.config import load_config
from streamer.kafka.broker import create_topics, free_port
from streamer.models.hf import HFTextModel

pytestmark = pytest.mark.integration


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status, await resp.text()


class GatedModel(HFTextModel):
    """Loading waits for a gate (a slow cold start); forward can be wedged on demand."""

    load_gate = threading.Event()
    wedge = threading.Event()
    unwedge = threading.Event()

    def load(self) -> None:
        assert self.load_gate.wait(30)
        super().load()

    def forward(self, batch: list[list[int]]):
        if self.wedge.is_set():
            self.unwedge.wait(30)
        return super().forward(batch)


async def test_readyz_waits_for_warmup_and_healthz_catches_a_wedged_model(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 1})
    port = free_port()
    cfg = load_config(
        None, **base_config(broker, tiny_model, topic, http={"port": port, "stuck_after_s": 1})
    )
    GatedModel.load_gate.clear()
    svc = RunningService(cfg, model_factory=GatedModel)
    starting = asyncio.ensure_future(svc.__aenter__())
    try:
        for _ in range(50):
            try:
                status, text = await get(port, "/readyz")
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        assert (status, text.strip()) == (503, "loading and warming up the model")
        assert (await get(port, "/healthz"))[0] == 200  # loading is not dead
        assert not svc.service.pipeline.consumer._consumer  # not in the group while cold

        GatedModel.load_gate.set()
        await asyncio.wait_for(starting, 30)
        for _ in range(100):
            status, text = await get(port, "/readyz")
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert (status, text.strip()) == (200, "ready")

        GatedModel.wedge.set()
        await produce(broker, topic, json_records(2))
        for _ in range(100):
            status, text = await get(port, "/healthz")
            if status == 503:
                break
            await asyncio.sleep(0.1)
        assert status == 503
        assert "looks wedged" in text
        GatedModel.wedge.clear()
        GatedModel.unwedge.set()
        await svc.wait_done(2)
        assert (await get(port, "/healthz"))[0] == 200
    finally:
        GatedModel.load_gate.set()
        GatedModel.unwedge.set()
        if not starting.done():
            await starting
        await svc.stop()


async def test_http_port_zero_turns_the_server_off(
    broker: str, topic: str, tiny_model: Path
) -> None:
    cfg = load_config(None, **base_config(broker, tiny_model, topic, http={"port": 0}))
    svc = RunningService(cfg)
    assert not svc.service.health.enabled
