"""A stage's own thread: calls run in order, results come back to the loop in one hop.

``loop.run_in_executor`` on a ``ThreadPoolExecutor`` goes through a ``concurrent.futures``
future (its lock and condition), a done-callback that schedules ``_chain_future._set_state``
on the loop, which copies the state into the asyncio future, whose own callbacks then wake the
task. The pipeline makes three such hand-offs per batch (prepare, infer, encode); on the event
loop of a busy 2-core host they cost ~120 µs each. :class:`StageThread` puts the call on a
``SimpleQueue`` and resolves the asyncio future itself with one ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")

_Item = tuple[
    asyncio.AbstractEventLoop | None, asyncio.Future[Any] | None, Callable[..., Any], tuple
]


class StageThread:
    """One named thread running submitted calls one at a time, in the order submitted.

    ``initializer`` runs first on the thread (thread settings: torch threads, CPU affinity).
    A call whose awaiting future was cancelled before it started is skipped. :meth:`shutdown`
    cancels what has not started and waits for the running call.
    """

    def __init__(self, name: str, initializer: Callable[[], None] | None = None) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._initializer = initializer
        self._closed = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def run(self, fn: Callable[..., R], *args: Any) -> asyncio.Future[R]:
        """On the loop: ``fn(*args)`` on the thread, its result (or exception) as a future."""
        if self._closed:
            raise RuntimeError(f"{self.thread.name} is shut down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.put((loop, fut, fn, args))
        return fut

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` on the thread, not awaited: a failure is logged."""
        if self._closed:
            raise RuntimeError(f"{self.thread.name} is shut down")
        self._queue.put((None, None, fn, args))

    def shutdown(self, wait: bool = True) -> None:
        """Cancel the calls not started, let the running one finish (``wait``: join it)."""
        self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[0] is not None and item[1] is not None:
                try:
                    item[0].call_soon_threadsafe(item[1].cancel)
                except RuntimeError:  # its loop is closed: nobody is waiting any more
                    pass
        self._queue.put(None)
        if wait and self.thread is not threading.current_thread():
            self.thread.join()

    def _run(self) -> None:
        if self._initializer is not None:
            try:
                self._initializer()
            except Exception:
                log.exception("%s: initializer failed", threading.current_thread().name)
        get = self._queue.get
        while (item := get()) is not None:
            loop, fut, fn, args = item
            if fut is not None and fut.cancelled():
                continue
            try:
                result, failed = fn(*args), False
            except BaseException as exc:  # handed to the awaiting task, as an executor does
                result, failed = exc, True
            if fut is None or loop is None:
                if failed:
                    log.error("work left to %s failed: %r", threading.current_thread().name, result)
                continue
            try:
                loop.call_soon_threadsafe(_resolve, fut, result, failed)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            del item, result, fn, args  # not held while waiting for the next call


def _resolve(fut: asyncio.Future[Any], result: Any, failed: bool) -> None:
    if fut.done():  # cancelled while it ran
        return
    if failed:
        fut.set_exception(result)
    else:
        fut.set_result(result)
