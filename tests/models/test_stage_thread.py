"""A stage's thread: calls in order on one named thread, results and errors back to the loop,
cancelled calls skipped, shutdown cancelling what has not started."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from streamer.models.stage_thread import StageThread


async def test_calls_run_in_order_on_the_thread_and_results_and_errors_come_back() -> None:
    names: list[str] = []
    stage = StageThread("stage-x", initializer=lambda: names.append("init"))
    seen: list[int] = []

    def call(i: int) -> int:
        names.append(threading.current_thread().name)
        seen.append(i)
        return i * 10

    def boom() -> None:
        raise ValueError("bad row")

    try:
        futs = [stage.run(call, i) for i in range(50)]
        failed = stage.run(boom)
        assert await asyncio.gather(*futs) == [i * 10 for i in range(50)]
        with pytest.raises(ValueError, match="bad row"):
            await failed
        assert seen == list(range(50))  # in the order submitted
        assert names[0] == "init" and set(names[1:]) == {"stage-x"}
    finally:
        stage.shutdown()
    assert not stage.thread.is_alive()


async def test_a_call_cancelled_before_it_starts_is_skipped() -> None:
    stage = StageThread("stage-y")
    gate, ran = threading.Event(), []
    try:
        first = stage.run(gate.wait, 5)
        second = stage.run(ran.append, "second")
        second.cancel()
        third = stage.run(ran.append, "third")
        gate.set()
        assert await first is True
        await third
        assert ran == ["third"]
    finally:
        stage.shutdown()


async def test_shutdown_cancels_what_has_not_started_and_waits_for_the_running_call() -> None:
    stage = StageThread("stage-z")
    started, release, finished = threading.Event(), threading.Event(), []

    def running() -> str:
        started.set()
        release.wait(5)
        finished.append(True)
        return "done"

    first = stage.run(running)
    pending = stage.run(lambda: "never")
    assert started.wait(5)
    threading.Timer(0.1, release.set).start()
    stage.shutdown(wait=True)  # returns once the running call is over
    assert finished == [True]
    await asyncio.sleep(0)  # the loop runs the cancellation and the result handed back
    assert pending.cancelled() and await first == "done"
    with pytest.raises(RuntimeError, match="shut down"):
        stage.run(lambda: None)
    with pytest.raises(RuntimeError, match="shut down"):
        stage.submit(lambda: None)


async def test_a_failing_call_nobody_awaits_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    stage = StageThread("stage-w")

    def boom() -> None:
        raise RuntimeError("metrics broke")

    with caplog.at_level(logging.ERROR):
        stage.submit(boom)
        await stage.run(lambda: None)  # behind it: the failure was handled by then
    stage.shutdown()
    assert any("metrics broke" in r.getMessage() for r in caplog.records)
