"""The chaos suite's short form: kills, a rebalance storm and network faults under a steady
produce rate, against the real broker with `streamer run` members as separate processes. Every
input record is checked by (partition, offset): none lost, duplicates within their bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from streamer.tools.chaos import SCENARIOS, ChaosPlan, run_scenarios
from streamer.tools.faultproxy import FaultProxy

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_short_chaos_loses_nothing(tmp_path: Path) -> None:
    outcomes = asyncio.run(run_scenarios(ChaosPlan.short(), list(SCENARIOS), tmp_path))
    assert [o.scenario for o in outcomes] == list(SCENARIOS)
    for o in outcomes:
        assert o.produced > 0, o
        assert o.lost == 0, (o.scenario, o.lost_sample, o.notes)
        # at least every acknowledged input (a send the producer gave up on may still land)
        assert o.unique >= o.produced
        assert o.duplicates <= o.duplicate_bound, o
        assert o.clean_exit, (o.scenario, o.notes)
        assert sum(o.faults.values()) > 0, o
    kills, storm, net = outcomes
    assert sum(kills.faults.values()) == ChaosPlan.short().kills
    assert storm.members_holding_partitions == 3 and storm.rebalances and storm.rebalances > 0
    assert net.faults == {"resets": 1, "stalls": 1, "slow periods": 1}


async def test_fault_proxy_resets_stalls_and_heals() -> None:
    from streamer.kafka.broker import free_port

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    proxy = FaultProxy(free_port(), target)
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.listen_port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.read(4), 5) == b"ping"
        proxy.stall()
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(4), 0.3)
        proxy.heal()
        assert await asyncio.wait_for(reader.read(4), 5) == b"held"
        proxy.reset()
        assert await asyncio.wait_for(reader.read(4), 5) == b""  # closed by the proxy
        assert (proxy.counts.resets, proxy.counts.stalls, proxy.counts.connections) == (1, 1, 1)
    finally:
        await proxy.close()
        server.close()
