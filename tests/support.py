"""Test support: tiny models built in the test, and Kafka helpers over real TCP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamer.tools.faultproxy import FaultProxy

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a an customer order failed arrived hello world my your our new release shipment support "
    "team invoice mobile app security update report page outage engine subscription data "
    "pipeline was is needs review looks great delayed again broke after fixed and nobody "
    "answered emails which made whole happy so we rolled back deployment poison"
).split()
POISON_WORD = "poison"


@dataclass
class Msg:
    """Stands in for an aiokafka ConsumerRecord in unit tests: what a Chunk's messages offer."""

    offset: int
    key: bytes | None = None
    value: bytes | None = b"v"
    headers: tuple = ()
    timestamp: int = 0


def build_tiny_model(
    directory: Path,
    *,
    task: str = "feature-extraction",
    seed: int = 0,
    labels: tuple[str, ...] = ("negative", "positive"),
    hidden: int = 32,
    max_positions: int = 128,
) -> Path:
    """A random-weight BERT (2 layers, hidden 32) with a word-level vocabulary made here."""
    import torch
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        PreTrainedTokenizerFast,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory.mkdir(parents=True, exist_ok=True)
    vocab_list = SPECIALS + WORDS + [*"abcdefghijklmnopqrstuvwxyz0123456789.,!?'"]
    vocab_list += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_positions,
    )
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=max_positions,
        id2label=dict(enumerate(labels)),
        label2id={v: k for k, v in enumerate(labels)},
    )
    if task == "text-classification":
        model = BertForSequenceClassification(cfg)
    else:
        model = BertModel(cfg)
    model.save_pretrained(directory)
    return directory


def two_cores() -> list[int]:
    """Two usable cores, for tests of ``runtime.processes: 2`` (one core per worker)."""
    from streamer.config import usable_cores

    cores = usable_cores()[:2]
    if len(cores) < 2:
        pytest.skip("runtime.processes: 2 needs two usable cores; this machine has one")
    return cores


def base_config(bootstrap: str, model_path: Path, topic: str, **sections: Any) -> dict[str, Any]:
    """A config dict for tests: unique topics/group per test, tiny model, quick batches."""
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"g-{topic}",
            "input_topics": [topic],
            "output_topic": f"{topic}.out",
            "dlq_topic": f"{topic}.dlq",
            # the embedded broker holds a first join for about half the session timeout
            "session_timeout_ms": 6_000,
            "heartbeat_interval_ms": 500,
            "request_timeout_ms": 10_000,
            "fetch_max_wait_ms": 20,
            "commit_interval_ms": 50,
        },
        "model": {"name": "tiny", "version": "1", "path": str(model_path), "max_length": 64},
        "batching": {"max_batch_size": 16, "max_wait_ms": 10, "max_batch_tokens": 1024},
        "runtime": {"torch_threads": 1, "shutdown_grace_s": 20},
        "http": {"port": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


async def produce(
    bootstrap: str,
    topic: str,
    values: list[bytes | None],
    *,
    keys: list[bytes | None] | None = None,
    headers: list[list[tuple[str, bytes]]] | None = None,
) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    try:
        futs = []
        for i, value in enumerate(values):
            futs.append(
                await producer.send(
                    topic,
                    value=value,
                    key=keys[i] if keys else None,
                    headers=headers[i] if headers else None,
                )
            )
        await producer.flush()
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


def json_records(n: int, start: int = 0, words: int = 6) -> list[bytes]:
    out = []
    for i in range(start, start + n):
        text = " ".join(WORDS[(i + j) % (len(WORDS) - 1)] for j in range(1 + (i * 7) % words))
        out.append(orjson.dumps({"id": i, "text": text}))
    return out


async def read_topic(
    bootstrap: str, topic: str, *, expect: int, timeout_s: float = 60.0, settle_s: float = 0.0
) -> list[Any]:
    """Read from the beginning until ``expect`` records arrived (then ``settle_s`` more)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[Any] = []
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + timeout_s
        while len(out) < expect and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                out.extend(msgs)
        settle_until = loop.time() + settle_s
        while loop.time() < settle_until:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                out.extend(msgs)
    finally:
        await consumer.stop()
    return out


async def committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offset per partition of ``topic``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in sorted(parts)}
    finally:
        await consumer.stop()


async def wait_committed(
    bootstrap: str, group: str, topic: str, total: int, timeout_s: float = 90.0
) -> dict[int, int | None]:
    """Until the group's committed offsets of ``topic`` add up to ``total`` (every record of a
    topic written from offset 0); the offsets. Counting outputs instead would stop early where a
    member redoes records (at-least-once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        offsets = await committed(bootstrap, group, topic)
        if sum(c or 0 for c in offsets.values()) >= total:
            return offsets
        if loop.time() >= deadline:
            raise TimeoutError(f"group {group} committed {offsets} of {topic}, not {total}")
        await asyncio.sleep(0.2)


def service_process(config_path: Path, *, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m streamer run --config …`` as a separate process (its own stdout/err file)."""
    log = open(config_path.with_suffix(".log"), "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "streamer", "run", "--config", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


class RunningService:
    """An in-process :class:`streamer.app.Service` for the duration of an ``async with``."""

    def __init__(self, cfg: Any, **kwargs: Any) -> None:
        from streamer.app import Service

        self.service = Service(cfg, **kwargs)
        self.exit_code: int | None = None
        self._task: asyncio.Task[int] | None = None

    async def __aenter__(self) -> RunningService:
        await self.service.start()
        self._task = asyncio.ensure_future(self.service.run())
        return self

    async def stop(self) -> int:
        if self._task is None:
            return self.exit_code or 0
        self.service.request_stop()
        self.exit_code = await asyncio.wait_for(self._task, 60)
        self._task = None
        return self.exit_code

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_done(self, n: int, timeout_s: float = 60.0) -> None:
        """Until ``n`` outputs (results + dead letters) were acknowledged by the broker.

        Raises at once if the service stopped first (it races the service's task), and
        ``TimeoutError`` after ``timeout_s``.
        """
        from streamer.tools.devtools import until_outputs

        telemetry = self.service.telemetry
        if self._task is None:
            await telemetry.wait_outputs(n, timeout_s)
        else:
            await until_outputs(telemetry, self._task, n, timeout_s)


@contextlib.asynccontextmanager
async def proxied_broker() -> AsyncIterator[tuple[str, TcpProxy]]:
    """A broker of its own behind a :class:`TcpProxy` (clients only ever see the proxy):
    yields its bootstrap address and the proxy, to cut and restore connections."""
    from streamer.kafka.broker import EmbeddedBroker, free_port

    proxy_port = free_port()
    own = EmbeddedBroker(advertised_port=proxy_port)
    own.start()
    proxy = TcpProxy(proxy_port, own.port)
    await proxy.start()
    try:
        yield own.bootstrap, proxy
    finally:
        await proxy.cut()
        own.stop()


class TcpProxy(FaultProxy):
    """A loopback TCP proxy that can cut every connection and refuse new ones (an outage):
    the chaos suite's :class:`~streamer.tools.faultproxy.FaultProxy`, with ``cut()``."""

    async def cut(self) -> None:
        """Close the listener and every live connection (``start()`` opens it again)."""
        await self.close()
