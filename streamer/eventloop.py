"""The event loop streamer runs on: asyncio's, with non-waiting I/O polls at most every 1 ms.

asyncio polls its selector (epoll) before every round of ready callbacks, with a timeout of 0
whenever callbacks are already waiting: with the pipeline busy that is most rounds (~3,000
polls per 30,000 records in ``streamer bench --only no-model``). Each poll is a system call that
lets go of the GIL; with the stage threads busy, taking it back cost the loop thread ~21 µs of
CPU per poll on the 2-core development machine, ~2 µs per record in all. :class:`ThrottledSelector`
skips a non-waiting poll that comes within ``min_poll_interval_s`` of the previous poll: I/O that
became ready meanwhile is seen at most that much later, and only while the loop has callbacks to
run anyway. A poll that may wait (nothing ready) always goes to the kernel, so an idle loop
reacts at once, and timers are unaffected (asyncio runs them by the clock after the poll).
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

MIN_POLL_INTERVAL_S = 0.001


class ThrottledSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The platform's default selector, skipping non-waiting polls that come too soon."""

    def __init__(self, min_poll_interval_s: float = MIN_POLL_INTERVAL_S) -> None:
        super().__init__()
        self.min_poll_interval_s = min_poll_interval_s
        self.skipped = 0  # polls answered without a system call (for tests and curiosity)
        self._polled_at = float("-inf")

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if (
            timeout is not None
            and timeout <= 0
            and time.monotonic() - self._polled_at < self.min_poll_interval_s
        ):
            self.skipped += 1
            return []
        ready = super().select(timeout)
        self._polled_at = time.monotonic()
        return ready


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A selector event loop on a :class:`ThrottledSelector`."""
    return asyncio.SelectorEventLoop(ThrottledSelector())


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on :func:`new_event_loop` (set as the thread's loop meanwhile, as
    ``asyncio.run`` does with its own)."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            return runner.run(main)
    finally:
        asyncio.set_event_loop(None)
