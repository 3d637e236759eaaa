"""The event loop's selector: a non-waiting poll right after another is answered without a
system call; a waiting poll always polls; I/O is still seen while callbacks keep it busy."""

from __future__ import annotations

import asyncio
import selectors
import socket
import time

from streamer import eventloop
from streamer.eventloop import ThrottledSelector


def test_a_non_waiting_poll_soon_after_the_last_is_skipped_and_a_waiting_one_never() -> None:
    a, b = socket.socketpair()
    sel = ThrottledSelector(min_poll_interval_s=0.2)
    try:
        sel.register(a, selectors.EVENT_READ)
        b.send(b"x")  # a is readable from now on
        assert len(sel.select(0)) == 1  # the first poll goes to the kernel
        assert sel.select(0) == [] and sel.skipped == 1  # too soon after it: skipped
        assert len(sel.select(1.0)) == 1 and sel.skipped == 1  # one that may wait: polled
        time.sleep(0.25)
        assert len(sel.select(0)) == 1 and sel.skipped == 1  # past the interval: polled
    finally:
        sel.close()
        a.close()
        b.close()


def test_run_uses_the_selector_and_io_is_seen_while_callbacks_keep_the_loop_busy() -> None:
    """A task that never waits (``sleep(0)`` rounds) keeps callbacks ready, so every poll is a
    non-waiting one: the reader still runs, the busy task does not starve it."""
    cap = 1_000_000

    async def main() -> tuple[type, bool, int]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        got = asyncio.Event()
        loop.add_reader(a, lambda: (a.recv(10), got.set()))
        rounds = 0

        async def busy() -> None:
            nonlocal rounds
            while not got.is_set() and rounds < cap:
                rounds += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(busy())
        await asyncio.sleep(0)
        b.send(b"ping")
        await task
        loop.remove_reader(a)
        a.close()
        b.close()
        selector = loop._selector  # type: ignore[attr-defined]
        return type(selector), got.is_set(), rounds

    kind, seen, rounds = eventloop.run(main())
    assert kind is ThrottledSelector
    assert seen and rounds < cap
