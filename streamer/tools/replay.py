"""``streamer replay-dlq``: put dead letters back on their input topic once the cause is fixed.

A dead letter is the input record unchanged (key, value, headers) plus ``streamer.error.*`` and
``streamer.source.*`` headers saying why and where from (``stream/codec.py``). Replaying one
means: strip exactly those headers, keep everything else, and produce it to the topic it came
from (``streamer.source.topic``) or to ``--to``. The running service then reads it like any new
record: it is a *new* record at a new offset, not the old one, so ordering against records
produced since is not restored.

What moves is chosen by error class and stage, and optionally by source topic, partition and
offset range. Records whose value was dropped (``streamer.error.value_dropped``: even the DLQ
would have refused it) cannot be replayed; they are listed in the summary instead.

Exactly-once across runs without transactions: the run reads each DLQ partition only up to its
end offset at start (what a replay puts back and fails again lands after it, so a run ends), and
it commits its position in its own consumer group (``<kafka.group_id>.replay-dlq`` by default)
only after everything it produced up to there was acknowledged by all in-sync replicas. A second
run starts where the first stopped, so nothing is re-injected twice — unless a run dies between
acknowledgement and commit (at-least-once, like the service). Records a filter passes over are
committed past as well: the group remembers what it has *read*; look again at other classes with
another ``--group`` (or ``--from-beginning``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamer import eventloop
from streamer.config import ConfigError, KafkaConfig, load_config

log = logging.getLogger(__name__)

CLASS = "streamer.error.class"
STAGE = "streamer.error.stage"
SOURCE_TOPIC = "streamer.source.topic"
SOURCE_PARTITION = "streamer.source.partition"
SOURCE_OFFSET = "streamer.source.offset"
VALUE_DROPPED = "streamer.error.value_dropped"
# What the DLQ adds. Other headers under streamer.* (the routing header, streamer.model by
# default) belong to the input and are kept.
ADDED_PREFIXES = ("streamer.error.", "streamer.source.")

Headers = list[tuple[str, bytes]]


def strip_headers(headers: Any) -> Headers:
    """The input's own headers: the dead letter's, less those the DLQ added."""
    return [(k, v) for k, v in (headers or ()) if not k.startswith(ADDED_PREFIXES)]


def _text(headers: dict[str, bytes], name: str) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("utf-8", "replace")


def _int(headers: dict[str, bytes], name: str) -> int | None:
    text = _text(headers, name)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def parse_offsets(text: str) -> tuple[int | None, int | None]:
    """``A-B`` (inclusive), ``A-``, ``-B`` or ``A`` → (first, last); None where open."""
    first, sep, last = text.strip().partition("-")
    try:
        lo = int(first) if first.strip() else None
        hi = int(last) if last.strip() else None
        if not sep:
            hi = lo
    except ValueError:
        raise ValueError(f"offset range '{text}': use A-B, A-, -B or A (integers)") from None
    if lo is None and hi is None:
        raise ValueError(f"offset range '{text}' is empty: use A-B, A-, -B or A")
    if lo is not None and hi is not None and hi < lo:
        raise ValueError(f"offset range '{text}' ends before it starts")
    return lo, hi


@dataclass(frozen=True)
class ReplayFilter:
    """Which dead letters to replay; an empty field matches anything."""

    error_classes: frozenset[str] = frozenset()
    stages: frozenset[str] = frozenset()
    source_topic: str | None = None
    source_partition: int | None = None
    first_offset: int | None = None  # source offsets, inclusive
    last_offset: int | None = None

    def matches(self, headers: dict[str, bytes]) -> bool:
        if self.error_classes and _text(headers, CLASS) not in self.error_classes:
            return False
        if self.stages and _text(headers, STAGE) not in self.stages:
            return False
        if self.source_topic is not None and _text(headers, SOURCE_TOPIC) != self.source_topic:
            return False
        if (
            self.source_partition is not None
            and _int(headers, SOURCE_PARTITION) != self.source_partition
        ):
            return False
        if self.first_offset is not None or self.last_offset is not None:
            offset = _int(headers, SOURCE_OFFSET)
            if offset is None:
                return False
            if self.first_offset is not None and offset < self.first_offset:
                return False
            if self.last_offset is not None and offset > self.last_offset:
                return False
        return True


@dataclass(frozen=True)
class Unreplayable:
    """A dead letter that matched but cannot be put back, and why."""

    dlq_partition: int
    dlq_offset: int
    error_class: str
    source: str  # topic[partition]@offset, as far as the headers say
    reason: str


@dataclass
class ReplaySummary:
    dry_run: bool
    read: int = 0  # dead letters looked at
    moved: Counter[tuple[str, str]] = field(default_factory=Counter)  # (class, stage) → n
    to_topics: Counter[str] = field(default_factory=Counter)
    passed_over: int = 0  # not matching the filter
    unreplayable: list[Unreplayable] = field(default_factory=list)

    @property
    def moved_total(self) -> int:
        return sum(self.moved.values())


@dataclass(frozen=True)
class Decision:
    """What to do with one dead letter: produce (``topic`` set), pass over, or report."""

    topic: str | None = None
    headers: Headers = field(default_factory=list)
    unreplayable: str | None = None  # the reason, when it matched but cannot move


def decide(record: Any, flt: ReplayFilter, to_topic: str | None, dlq_topic: str) -> Decision:
    """The decision for one DLQ record (an aiokafka ConsumerRecord or anything like it)."""
    headers = dict(record.headers or ())
    if not flt.matches(headers):
        return Decision()
    if headers.get(VALUE_DROPPED) == b"true":
        return Decision(unreplayable="value dropped when dead-lettered (over max_request_size)")
    topic = to_topic or _text(headers, SOURCE_TOPIC)
    if not topic:
        return Decision(unreplayable=f"no {SOURCE_TOPIC} header: name a topic with --to")
    if topic == dlq_topic:
        return Decision(unreplayable="its source is the DLQ topic itself: name one with --to")
    return Decision(topic=topic, headers=strip_headers(record.headers))


@dataclass(frozen=True)
class ReplayOptions:
    kafka: KafkaConfig
    dlq_topic: str
    group: str
    filter: ReplayFilter = ReplayFilter()
    to_topic: str | None = None
    dry_run: bool = False
    from_beginning: bool = False
    idle_timeout_s: float = 60.0  # no progress this long while records remain: an error


Progress = Callable[[int, int], None]  # (dead letters read, total to read)


async def replay_dlq(opts: ReplayOptions, progress: Progress | None = None) -> ReplaySummary:
    """Read the DLQ up to its end offsets at start (or the high watermark of the first fetch,
    where that is larger: the embedded broker's ListOffsets answers low after batched appends),
    produce what matches, commit as it goes."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from streamer.kafka.client import client_kwargs, producer_kwargs

    if opts.to_topic == opts.dlq_topic:
        raise ConfigError(f"--to {opts.to_topic} is the DLQ topic itself: that would loop")
    summary = ReplaySummary(dry_run=opts.dry_run)
    consumer = AIOKafkaConsumer(
        **client_kwargs(opts.kafka),
        group_id=opts.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=opts.kafka.fetch_max_wait_ms,
        **opts.kafka.consumer,
    )
    producer = None if opts.dry_run else AIOKafkaProducer(**producer_kwargs(opts.kafka))
    await consumer.start()
    try:
        if producer is not None:
            await producer.start()
        parts = consumer.partitions_for_topic(opts.dlq_topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(opts.dlq_topic)
        if not parts:
            raise ConfigError(f"DLQ topic {opts.dlq_topic} does not exist (check --dlq-topic)")
        tps = [TopicPartition(opts.dlq_topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)  # the snapshot this run stops at
        if opts.from_beginning:
            await consumer.seek_to_beginning(*tps)
        starts = {tp: await consumer.position(tp) for tp in tps}
        total = sum(max(0, ends[tp] - starts[tp]) for tp in tps)
        pending = {tp for tp in tps if starts[tp] < ends[tp]}
        for tp in set(tps) - pending:
            consumer.pause(tp)
        positions = dict(starts)
        done = 0
        if progress:
            progress(done, total)
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        checked: set[TopicPartition] = set()
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=500, max_records=500)
            for tp in pending - checked:  # the high watermark the first fetch brought back
                high = consumer.highwater(tp)
                if high is not None:
                    checked.add(tp)
                    if high > ends[tp]:  # ListOffsets answered low (some brokers, after
                        total += high - ends[tp]  # batched appends): the fetch's word counts
                        ends[tp] = high
            acks = []
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break  # appended after this run started
                    summary.read += 1
                    d = decide(record, opts.filter, opts.to_topic, opts.dlq_topic)
                    headers = dict(record.headers or ())
                    klass, stage = _text(headers, CLASS) or "?", _text(headers, STAGE) or "?"
                    if d.unreplayable is not None:
                        summary.unreplayable.append(_unreplayable(record, headers, d))
                    elif d.topic is None:
                        summary.passed_over += 1
                    else:
                        summary.moved[(klass, stage)] += 1
                        summary.to_topics[d.topic] += 1
                        if producer is not None:
                            acks.append(
                                await producer.send(
                                    d.topic, value=record.value, key=record.key, headers=d.headers
                                )
                            )
            if acks:
                await asyncio.gather(*acks)  # every produced record acknowledged (acks=all)
            commit = {}
            for tp in list(pending):
                # the position, not the last record: it also steps over transaction markers
                positions[tp] = commit[tp] = min(await consumer.position(tp), ends[tp])
                if positions[tp] >= ends[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)
            read_now = sum(max(0, positions[tp] - starts[tp]) for tp in tps)
            if read_now > done:
                done, last_progress = read_now, loop.time()
                if progress:
                    progress(done, total)
                if not opts.dry_run:
                    await consumer.commit(commit)  # after the acks above: nothing is skipped
            elif loop.time() - last_progress > opts.idle_timeout_s:
                raise TimeoutError(
                    f"no progress on {opts.dlq_topic} for {opts.idle_timeout_s:.0f}s with "
                    f"{total - done} dead letters left to read; is the broker reachable?"
                )
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()
    return summary


def _unreplayable(record: Any, headers: dict[str, bytes], d: Decision) -> Unreplayable:
    source = (
        f"{_text(headers, SOURCE_TOPIC) or '?'}[{_text(headers, SOURCE_PARTITION) or '?'}]"
        f"@{_text(headers, SOURCE_OFFSET) or '?'}"
    )
    return Unreplayable(
        record.partition,
        record.offset,
        _text(headers, CLASS) or "?",
        source,
        d.unreplayable or "",
    )


# -- the command ----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="the service's YAML (its kafka section)")
    p.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    p.add_argument("--dlq-topic", help="the DLQ to read (default: kafka.dlq_topic)")
    p.add_argument(
        "--to",
        metavar="TOPIC",
        help="produce here instead of each record's streamer.source.topic",
    )
    p.add_argument(
        "--error-class",
        action="append",
        default=[],
        metavar="CLASS",
        help="only this streamer.error.class (repeatable or comma-separated), e.g. InvalidJson",
    )
    p.add_argument(
        "--stage",
        action="append",
        default=[],
        metavar="STAGE",
        help="only this streamer.error.stage (repeatable or comma-separated): decode, tokenize, "
        "inference, encode, publish",
    )
    p.add_argument("--source-topic", help="only dead letters from this input topic")
    p.add_argument("--source-partition", type=int, help="only from this input partition")
    p.add_argument(
        "--source-offsets", metavar="A-B", help="only these input offsets (inclusive; A-, -B, A)"
    )
    p.add_argument("--dry-run", action="store_true", help="report what would move; move nothing")
    p.add_argument(
        "--group",
        help="consumer group that keeps this replay's progress (default: "
        "<kafka.group_id>.replay-dlq)",
    )
    p.add_argument(
        "--from-beginning",
        action="store_true",
        help="ignore the group's progress and read the DLQ from its start (records an earlier "
        "run moved are moved again)",
    )


def _names(values: list[str]) -> frozenset[str]:
    return frozenset(n.strip() for v in values for n in v.split(",") if n.strip())


def kafka_settings(config: Path | None, bootstrap: str | None = None) -> KafkaConfig:
    """The ``kafka`` section of the service's config (environment overrides applied); the
    other sections are not needed here, so a model path that does not exist on this machine
    does not stop a replay."""
    section: dict[str, Any] = {}
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"config file {config} does not exist")
        try:
            data = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config} is not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {config} must hold a mapping at the top level")
        section = dict(data.get("kafka") or {})
    if bootstrap:
        section["bootstrap_servers"] = bootstrap
    return load_config(None, kafka=section).kafka


def options_from_args(args: argparse.Namespace) -> ReplayOptions:
    kafka = kafka_settings(args.config, args.bootstrap_servers)
    first = last = None
    if args.source_offsets:
        try:
            first, last = parse_offsets(args.source_offsets)
        except ValueError as exc:
            raise ConfigError(f"--source-offsets: {exc}") from None
    return ReplayOptions(
        kafka=kafka,
        dlq_topic=args.dlq_topic or kafka.dlq_topic,
        group=args.group or f"{kafka.group_id}.replay-dlq",
        filter=ReplayFilter(
            error_classes=_names(args.error_class),
            stages=_names(args.stage),
            source_topic=args.source_topic,
            source_partition=args.source_partition,
            first_offset=first,
            last_offset=last,
        ),
        to_topic=args.to,
        dry_run=args.dry_run,
        from_beginning=args.from_beginning,
    )


def run_replay(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    opts = options_from_args(args)
    err = Console(stderr=True)
    bar = Progress(
        TextColumn(f"reading {opts.dlq_topic}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        transient=False,
    )
    task = bar.add_task("replay", total=None)

    def advance(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        summary = eventloop.run(replay_dlq(opts, advance))
    print_summary(Console(), summary, opts)
    return 0


def print_summary(console: Any, s: ReplaySummary, opts: ReplayOptions) -> None:
    from rich.table import Table

    verb = "would move" if s.dry_run else "moved"
    table = Table(title=f"replay-dlq {opts.dlq_topic} (group {opts.group})")
    for col in ("error class", "stage", verb):
        table.add_column(col, justify="right" if col == verb else "left")
    for (klass, stage), n in sorted(s.moved.items()):
        table.add_row(klass, stage, str(n))
    console.print(table)
    where = ", ".join(f"{t}: {n}" for t, n in sorted(s.to_topics.items())) or "nowhere"
    console.print(
        f"{s.read} dead letters read; {s.moved_total} {verb} ({where}); {s.passed_over} did not "
        f"match the filter; {len(s.unreplayable)} matched but cannot be replayed"
    )
    for u in s.unreplayable[:50]:
        console.print(
            f"  cannot replay {opts.dlq_topic}[{u.dlq_partition}]@{u.dlq_offset} "
            f"({u.error_class}, from {u.source}): {u.reason}"
        )
    if len(s.unreplayable) > 50:
        console.print(f"  … and {len(s.unreplayable) - 50} more")
    if s.dry_run:
        console.print("dry run: nothing was produced and no progress was committed")
