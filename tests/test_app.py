"""The service as a separate process: SIGTERM drains and commits; SIGKILL loses nothing."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import orjson
import pytest
import yaml
from support import base_config, committed, json_records, produce, read_topic, service_process

from streamer.kafka.broker import create_topics

pytestmark = pytest.mark.integration

N = 20_000  # enough that the tiny model is still busy when the signal lands


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "streamer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def sources(msgs: list) -> list[tuple[int, int]]:
    out = []
    for m in msgs:
        src = orjson.loads(m.value)["source"]
        out.append((src["partition"], src["offset"]))
    return out


async def wait_for_output(broker: str, topic: str, at_least: int, proc: subprocess.Popen) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise AssertionError(f"service exited early with {proc.returncode}")
        msgs = await read_topic(broker, topic, expect=at_least, timeout_s=0.5)
        if len(msgs) >= at_least:
            return
    raise AssertionError(f"fewer than {at_least} results on {topic}")


async def wait_exit(proc: subprocess.Popen, timeout_s: float) -> int:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, proc.wait), timeout_s)


async def test_sigterm_drains_commits_and_restart_does_not_reprocess(
    broker: str, topic: str, tiny_model: Path, tmp_path: Path
) -> None:
    await create_topics(broker, {topic: 3})
    await produce(broker, topic, json_records(N))
    cfg = base_config(broker, tiny_model, topic, http={"port": 0})
    path = write_config(tmp_path, cfg)
    out_topic = f"{topic}.out"

    proc = service_process(path)
    try:
        await wait_for_output(broker, out_topic, 1000, proc)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 40) == 0
    finally:
        proc.kill()
    log = path.with_suffix(".log").read_text()
    assert "stopped" in log

    first = sources(await read_topic(broker, out_topic, expect=N, timeout_s=3, settle_s=0.5))
    assert len(first) < N, "the signal landed after everything was done; raise N"
    offsets = await committed(broker, f"g-{topic}", topic)
    # Drained exactly: every published result is committed, and every committed record published.
    for p, c in offsets.items():
        published = sorted(o for q, o in first if q == p)
        assert published == list(range(c or 0)), f"partition {p}: committed {c}"

    proc = service_process(path)
    try:
        for _ in range(120):
            msgs = await read_topic(broker, out_topic, expect=N, timeout_s=1)
            if len(msgs) >= N:
                break
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 40) == 0
    finally:
        proc.kill()
    everything = sources(await read_topic(broker, out_topic, expect=N, settle_s=1.0))
    assert len(everything) == N  # no record processed twice
    assert len(set(everything)) == N  # and none missing


async def test_sigkill_mid_stream_then_restart_loses_nothing(
    broker: str, topic: str, tiny_model: Path, tmp_path: Path
) -> None:
    await create_topics(broker, {topic: 2})
    await produce(broker, topic, json_records(N))
    path = write_config(tmp_path, base_config(broker, tiny_model, topic, http={"port": 0}))
    out_topic = f"{topic}.out"

    proc = service_process(path)
    try:
        await wait_for_output(broker, out_topic, 1000, proc)
        proc.kill()  # SIGKILL: no drain, no commit of in-flight work
        proc.wait(10)
    finally:
        proc.kill()
    before = sources(await read_topic(broker, out_topic, expect=N, timeout_s=2, settle_s=0.3))
    assert len(set(before)) < N

    proc = service_process(path)
    try:
        seen: set[tuple[int, int]] = set()
        for _ in range(120):
            seen = set(sources(await read_topic(broker, out_topic, expect=N * 2, timeout_s=1)))
            if len(seen) >= N:
                break
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 40) == 0
    finally:
        proc.kill()
    assert len(seen) == N  # every record has a result (some twice: at-least-once)
    offsets = await committed(broker, f"g-{topic}", topic)
    assert sum(c or 0 for c in offsets.values()) == N


async def test_sighup_reloads_the_config_and_swaps_the_model(
    broker: str, topic: str, tiny_model: Path, tmp_path: Path
) -> None:
    from support import build_tiny_model

    v2 = build_tiny_model(tmp_path / "v2", seed=3)
    await create_topics(broker, {topic: 1})
    cfg = base_config(broker, tiny_model, topic)
    path = write_config(tmp_path, cfg)
    out_topic = f"{topic}.out"
    proc = service_process(path)
    try:
        await produce(broker, topic, json_records(5))
        await wait_for_output(broker, out_topic, 5, proc)
        cfg["model"].update(version="2", path=str(v2))
        path.write_text(yaml.safe_dump(cfg))
        proc.send_signal(signal.SIGHUP)
        log = path.with_suffix(".log")
        for _ in range(100):
            if "reload: tiny@2" in log.read_text():
                break
            await asyncio.sleep(0.1)
        assert "reload: tiny@2" in log.read_text()
        await produce(broker, topic, json_records(5, start=5))
        await wait_for_output(broker, out_topic, 10, proc)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 40) == 0
    finally:
        proc.kill()
    msgs = await read_topic(broker, out_topic, expect=10)
    versions = [
        orjson.loads(m.value)["model"]["version"]
        for m in sorted(msgs, key=lambda m: orjson.loads(m.value)["source"]["offset"])
    ]
    assert versions == ["1"] * 5 + ["2"] * 5


async def test_sigterm_while_still_importing_exits_cleanly(
    broker: str, topic: str, tiny_model: Path, tmp_path: Path
) -> None:
    """A rollout or a restart storm can signal a pod that is still importing torch: it must
    stop with exit 0 and a line saying so, not die by the signal's default action (143)."""
    path = write_config(tmp_path, base_config(broker, tiny_model, topic))
    proc = service_process(path)
    try:
        await asyncio.sleep(1.5)  # importing torch, loading the model: seconds more here
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 40) == 0
    finally:
        proc.kill()
    assert "stopped during start-up" in path.with_suffix(".log").read_text()
