"""A loopback TCP proxy in front of the broker that injects network faults (``streamer chaos``).

Clients see only the proxy (the broker advertises the proxy's port). Faults, each reversible:

* ``reset()``: close every live connection at once (a broker restart, a NAT timeout);
* ``stall()``: keep accepting and keep connections open, but forward nothing in either
  direction (a partition that does not refuse: requests time out instead of failing fast);
* ``slow(latency_s)``: delay every chunk by ``latency_s`` each way (a congested link);
* ``heal()``: back to forwarding at once.

It counts what it did, so a run can report the faults it injected.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class FaultCounts:
    resets: int = 0
    stalls: int = 0
    slow_periods: int = 0
    connections: int = 0
    cut_connections: int = field(default=0)


class FaultProxy:
    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.listen_port, self.target_port = host, listen_port, target_port
        self.counts = FaultCounts()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()  # cleared while stalled
        self._flowing.set()
        self._latency_s = 0.0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.listen_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.reset(count=False)
        self._flowing.set()

    # -- faults -----------------------------------------------------------------------------------
    def reset(self, count: bool = True) -> None:
        if count:
            self.counts.resets += 1
            self.counts.cut_connections += len(self._writers)
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def stall(self) -> None:
        self.counts.stalls += 1
        self._flowing.clear()

    def slow(self, latency_s: float) -> None:
        self.counts.slow_periods += 1
        self._latency_s = latency_s

    def heal(self) -> None:
        self._latency_s = 0.0
        self._flowing.set()

    # -- forwarding -------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        self.counts.connections += 1
        self._writers.update({writer, up_writer})
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:  # the loop is closing: connections just end
            pass
        finally:
            self._writers.difference_update({writer, up_writer})

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                if self._latency_s:
                    await asyncio.sleep(self._latency_s)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()
