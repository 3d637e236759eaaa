"""``streamer replay-dlq``: the decisions on their own, then the whole round trip on the real
broker — bad records through a running service into the DLQ, a filtered replay back into the
input topic, and the service (fixed) processing them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from support import RunningService, base_config, produce, read_topic

from streamer.cli import main
from streamer.config import ConfigError, load_config
from streamer.kafka.broker import create_topics
from streamer.tools.replay import (
    ReplayFilter,
    ReplayOptions,
    decide,
    parse_offsets,
    replay_dlq,
    strip_headers,
)


@dataclass
class Rec:
    headers: list[tuple[str, bytes]]
    key: bytes | None = b"k"
    value: bytes | None = b"v"
    partition: int = 0
    offset: int = 0


def _dead(
    klass: str = "InvalidJson", stage: str = "decode", offset: int = 7, value_dropped: bool = False
) -> Rec:
    own = [("origin", b"app"), ("streamer.model", b"tiny"), ("bin", b"\x00\xff")]
    added = [
        ("streamer.error.class", klass.encode()),
        ("streamer.error.message", b"boom"),
        ("streamer.error.stage", stage.encode()),
        ("streamer.source.topic", b"texts"),
        ("streamer.source.partition", b"2"),
        ("streamer.source.offset", str(offset).encode()),
        *([("streamer.error.value_dropped", b"true")] if value_dropped else []),
    ]
    return Rec(own + added)


# -- decisions -----------------------------------------------------------------------------------
def test_strip_keeps_the_inputs_own_headers_in_order() -> None:
    rec = _dead(value_dropped=True)
    # the routing header is the input's (streamer.model): only what the DLQ added goes
    assert strip_headers(rec.headers) == [
        ("origin", b"app"),
        ("streamer.model", b"tiny"),
        ("bin", b"\x00\xff"),
    ]
    assert strip_headers(None) == []


def test_filter_by_class_stage_and_source() -> None:
    headers = dict(_dead("TextTooLong", "tokenize", offset=10).headers)
    assert ReplayFilter().matches(headers)
    assert ReplayFilter(error_classes=frozenset({"TextTooLong", "X"})).matches(headers)
    assert not ReplayFilter(error_classes=frozenset({"InvalidJson"})).matches(headers)
    assert ReplayFilter(stages=frozenset({"tokenize"})).matches(headers)
    assert not ReplayFilter(stages=frozenset({"decode"})).matches(headers)
    assert ReplayFilter(source_topic="texts", source_partition=2).matches(headers)
    assert not ReplayFilter(source_topic="other").matches(headers)
    assert not ReplayFilter(source_partition=1).matches(headers)
    assert ReplayFilter(first_offset=10, last_offset=10).matches(headers)
    assert ReplayFilter(first_offset=5).matches(headers)
    assert not ReplayFilter(first_offset=11).matches(headers)
    assert not ReplayFilter(last_offset=9).matches(headers)
    assert not ReplayFilter(first_offset=0).matches({})  # no source offset: not in a range


def test_parse_offsets() -> None:
    assert parse_offsets("3-9") == (3, 9)
    assert parse_offsets("3-") == (3, None)
    assert parse_offsets("-9") == (None, 9)
    assert parse_offsets("4") == (4, 4)
    for bad in ("a-b", "-", "9-3"):
        with pytest.raises(ValueError, match="offset range"):
            parse_offsets(bad)


def test_decide_target_and_what_cannot_move() -> None:
    rec = _dead()
    d = decide(rec, ReplayFilter(), None, "texts.dlq")
    assert d.topic == "texts" and d.unreplayable is None
    assert [k for k, _ in d.headers] == ["origin", "streamer.model", "bin"]
    assert decide(rec, ReplayFilter(), "fixed", "texts.dlq").topic == "fixed"
    assert decide(rec, ReplayFilter(stages=frozenset({"x"})), None, "texts.dlq").topic is None

    dropped = decide(_dead(value_dropped=True), ReplayFilter(), None, "texts.dlq")
    assert dropped.topic is None and "value dropped" in (dropped.unreplayable or "")
    orphan = Rec([("streamer.error.class", b"InvalidJson")])
    assert "--to" in (decide(orphan, ReplayFilter(), None, "texts.dlq").unreplayable or "")
    assert "DLQ topic itself" in (decide(rec, ReplayFilter(), None, "texts").unreplayable or "")


async def test_to_the_dlq_itself_is_refused() -> None:
    opts = ReplayOptions(load_config(None).kafka, "texts.dlq", "g", to_topic="texts.dlq")
    with pytest.raises(ConfigError, match="loop"):
        await replay_dlq(opts)


# -- the round trip on the broker ----------------------------------------------------------------
def _big(i: int) -> bytes:
    return orjson.dumps({"id": i, "text": " ".join(["customer order arrived"] * 12)})


@pytest.mark.integration
@pytest.mark.usefixtures("root_logging")
def test_replay_round_trip(broker: str, topic: str, tiny_model: Path, tmp_path: Path) -> None:
    """RecordTooLarge and InvalidJson dead letters; replay only RecordTooLarge; the service,
    with the limit raised (the fix), turns exactly those into results."""
    good = [orjson.dumps({"id": i, "text": "hello world"}) for i in range(4)]
    big = [_big(i) for i in range(10, 14)]
    garbage = [b"{not json", b"\xff\xfe"]
    huge = orjson.dumps({"id": 99, "text": "pipeline " * 300})  # over max_request_size too
    values = good + big + garbage + [huge]
    keys = [f"key-{i}".encode() for i in range(len(values))]
    headers = [
        [("origin", b"app"), ("seq", str(i).encode()), ("bin", b"\x00\x01")]
        for i in range(len(values))
    ]
    over = base_config(broker, tiny_model, topic)
    over["input"] = {"max_record_bytes": 200}
    over["kafka"]["max_request_size"] = 2048  # the huge record's dead letter loses its value
    dlq = f"{topic}.dlq"

    async def first_run() -> None:
        await create_topics(broker, {topic: 2, f"{topic}.out": 2, dlq: 1})
        await produce(broker, topic, values, keys=keys, headers=headers)
        async with RunningService(load_config(None, **over)) as svc:
            await svc.wait_done(len(values), timeout_s=90)
            assert svc.service.telemetry.outputs() == (len(good), len(values) - len(good))

    asyncio.run(first_run())
    config = tmp_path / "streamer.yaml"
    config.write_text(yaml.safe_dump({"kafka": over["kafka"]}))
    before = asyncio.run(read_topic(broker, topic, expect=len(values)))
    assert len(before) == len(values)

    # a dry run moves nothing and commits nothing
    cli = ["replay-dlq", "--config", str(config), "--error-class", "RecordTooLarge"]
    assert main([*cli, "--dry-run"]) == 0
    assert len(asyncio.run(read_topic(broker, topic, expect=len(values) + 1, timeout_s=3))) == len(
        values
    )

    # the real run, through the command
    assert main(cli) == 0
    after = asyncio.run(read_topic(broker, topic, expect=len(values) + len(big)))
    offsets = {(m.partition, m.offset) for m in before}
    replayed = [m for m in after if (m.partition, m.offset) not in offsets]
    assert sorted(m.value for m in replayed) == sorted(big)
    by_value = {v: (k, h) for v, k, h in zip(values, keys, headers, strict=True)}
    for m in replayed:
        key, original = by_value[m.value]
        assert m.key == key
        assert list(m.headers) == original  # the input's headers, nothing of streamer.*
        assert not any(k.startswith("streamer.") for k, _ in m.headers)

    # a second run finds nothing new: its group committed past what it read
    again = _replay(over["kafka"], dlq)
    assert again.read == 0 and again.moved_total == 0

    # the same read again from the start: what it would move, and the dropped value reported
    seen = _replay(over["kafka"], dlq, from_beginning=True, dry_run=True)
    assert seen.moved == {("RecordTooLarge", "decode"): len(big)}
    assert seen.passed_over == len(garbage)
    (dropped,) = seen.unreplayable
    assert dropped.error_class == "RecordTooLarge" and "value dropped" in dropped.reason
    assert dropped.source == f"{topic}[{_partition_of(before, huge)}]@{_offset_of(before, huge)}"

    # the fix: the limit raised; the same group resumes and turns the replayed ones into results
    fixed = {**over, "input": {"max_record_bytes": 1_000_000}}

    async def second_run() -> list[Any]:
        async with RunningService(load_config(None, **fixed)) as svc:
            await svc.wait_done(len(big), timeout_s=90)
            assert svc.service.telemetry.outputs() == (len(big), 0)
        return await read_topic(broker, f"{topic}.out", expect=len(good) + len(big))

    results = [orjson.loads(m.value) for m in asyncio.run(second_run())]
    assert sorted(r["id"] for r in results) == [*range(4), *range(10, 14)]


def _replay(kafka: dict[str, Any], dlq: str, **kw: Any) -> Any:
    opts = ReplayOptions(
        load_config(None, kafka=kafka).kafka,
        dlq,
        f"{kafka['group_id']}.replay-dlq",
        ReplayFilter(error_classes=frozenset({"RecordTooLarge"})),
        **kw,
    )
    return asyncio.run(replay_dlq(opts))


def _partition_of(records: list[Any], value: bytes) -> int:
    return next(m.partition for m in records if m.value == value)


def _offset_of(records: list[Any], value: bytes) -> int:
    return next(m.offset for m in records if m.value == value)
