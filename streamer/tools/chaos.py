"""``streamer chaos``: the delivery guarantees under repeated and combined faults, with figures.

Every scenario runs the service as separate ``streamer run`` processes against the embedded
broker behind a :class:`~streamer.tools.faultproxy.FaultProxy`, under a steady produce rate; it
ends by draining (the group's committed offsets reach the end of every input partition) and
then checks every input record by its (partition, offset) against the output and DLQ topics:
**lost** must be 0; **duplicates** (at-least-once: records processed again after a crash) are
counted and set beside their bound, what can be in flight when a member dies
(``batching.max_in_flight``) per kill.

Scenarios:

* ``kill-loop``: two members; one is SIGKILLed at random moments and restarted — while running,
  during start-up and group join, and during its own drain (SIGTERM, then SIGKILL before it
  finishes) — while the other takes its partitions (every kill is a rebalance).
* ``rebalance-storm``: three members on six partitions; members stopped (SIGTERM and SIGKILL
  mixed) and started every few seconds. Afterwards every member holds partitions again, lag
  returns to zero, and ``streamer_rebalances_total`` counts the story.
* ``network``: one member; the proxy resets every connection, stalls (accepts, forwards
  nothing, longer than ``request_timeout_ms``) and slows the link, repeatedly. The member must
  recover by itself; if it exits, it is restarted (as Kubernetes would) and that is reported.

The output side refusing (a missing topic, records too large, authorization) and poison
records are covered by the test suite (``tests/stream/test_faults.py``, the publisher tests).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson
import yaml

from streamer.kafka.broker import EmbeddedBroker, create_topics, free_port
from streamer.tools.faultproxy import FaultProxy

SCENARIOS = ("kill-loop", "rebalance-storm", "network")
NULL_MODEL = {"name": "null", "version": "null", "backend": "null", "max_length": 64}
MAX_IN_FLIGHT = 256


@dataclass(frozen=True)
class ChaosPlan:
    """How hard each scenario pushes. ``short()`` is the form inside ``make test``."""

    kills: int = 50
    storm_s: float = 120.0
    network_rounds: int = 5
    rate_per_s: float = 300.0
    seed: int = 7
    model: dict[str, Any] = field(default_factory=lambda: dict(NULL_MODEL))

    @classmethod
    def short(cls, **kw: Any) -> ChaosPlan:
        return cls(**{"kills": 3, "storm_s": 12.0, "network_rounds": 1, "rate_per_s": 150.0, **kw})


@dataclass
class Outcome:
    """One scenario's figures."""

    scenario: str
    produced: int = 0
    outputs: int = 0
    unique: int = 0
    lost: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    unexpected_exits: int = 0
    duplicate_bound: int = 0
    rebalances: int | None = None
    members_holding_partitions: int | None = None
    drain_s: float = 0.0
    seconds: float = 0.0
    clean_exit: bool = True
    notes: list[str] = field(default_factory=list)
    lost_sample: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.produced > 0
            and self.duplicates <= self.duplicate_bound
            and self.clean_exit
        )


# -- the pieces -------------------------------------------------------------------------------
class Member:
    """One ``streamer run`` process of the group, restartable, with its own metrics port."""

    everyone: ClassVar[list[Member]] = []  # killed when a run ends, however it ends

    def __init__(self, config: Path, index: int, logs: Path) -> None:
        Member.everyone.append(self)
        self.config, self.index, self.logs = config, index, logs
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        env = {
            **os.environ,
            "STREAMER_HTTP__PORT": str(self.port),
            "STREAMER_HTTP__HOST": "127.0.0.1",
        }
        log = (self.logs / f"member-{self.index}.log").open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamer", "run", "--config", str(self.config),
                stdout=log, stderr=log, env=env,
            )  # fmt: skip
        finally:
            log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    async def wait(self, timeout_s: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.proc.wait()
            return None

    async def metric(self, name: str) -> float | None:
        """A metric's value from the member's /metrics (summed over labels), None if down."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), 2
            )
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            body = (await asyncio.wait_for(reader.read(-1), 5)).decode(errors="replace")
        except (OSError, TimeoutError):
            return None
        finally:
            writer.close()
        total, seen = 0.0, False
        for line in body.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
                seen = True
        return total if seen else None


class SteadyProducer:
    """Produces ``{"id", "text"}`` at a steady rate; remembers every acknowledged record."""

    def __init__(self, bootstrap: str, topic: str, rate_per_s: float) -> None:
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate_per_s
        self.acked: set[tuple[int, int]] = set()
        self.failed_sends = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", request_timeout_ms=5000, linger_ms=5
        )
        await producer.start()
        pending: set[asyncio.Future[Any]] = set()
        tick_s, i = 0.05, 0
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while not self._stop.is_set():
                for _ in range(max(1, round(self.rate * tick_s))):
                    value = orjson.dumps(
                        {"id": i, "text": f"chaos record {i} of the steady stream"}
                    )
                    i += 1
                    try:
                        fut = await producer.send(self.topic, value=value, key=str(i).encode())
                    except Exception:
                        self.failed_sends += 1
                        continue
                    pending.add(fut)
                    fut.add_done_callback(self._acked(pending))
                next_at += tick_s
                try:
                    await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - loop.time()))
                except TimeoutError:
                    pass
            if pending:
                await asyncio.wait(pending, timeout=30)
        finally:
            await producer.stop()

    def _acked(self, pending: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
        def done(fut: asyncio.Future[Any]) -> None:
            pending.discard(fut)
            if fut.cancelled() or fut.exception() is not None:
                self.failed_sends += 1  # not acknowledged: not counted as produced
                return
            meta = fut.result()
            self.acked.add((meta.partition, meta.offset))

        return done


async def _committed_and_ends(
    bootstrap: str, group: str, topic: str, acked: set[tuple[int, int]]
) -> tuple[int, int]:
    """(sum of committed offsets, sum of end offsets) over the topic's partitions. The end is
    also at least one past every acknowledged record: a broker's ListOffsets answer may lag."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or set())
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        last: dict[int, int] = {}
        for p, o in acked:
            last[p] = max(last.get(p, -1), o)
        committed = end = 0
        for tp in tps:
            committed += (await consumer.committed(tp)) or 0
            end += max(ends[tp], last.get(tp.partition, -1) + 1)
        return committed, end
    finally:
        await consumer.stop()


async def _read_all(bootstrap: str, topic: str, idle_s: float = 2.0) -> list[Any]:
    """Every record of ``topic``: read from the beginning until nothing more arrives for
    ``idle_s`` (called once its writers are done)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            fetched = await consumer.getmany(timeout_ms=300)
            for msgs in fetched.values():
                out.extend(msgs)
            if fetched:
                quiet_since = time.monotonic()
        return out
    finally:
        await consumer.stop()


def _source(record: Any, dead: bool) -> tuple[int, int]:
    if dead:
        headers = dict(record.headers)
        return int(headers["streamer.source.partition"]), int(headers["streamer.source.offset"])
    src = orjson.loads(record.value)["source"]
    return int(src["partition"]), int(src["offset"])


async def drain_and_verify(
    bootstrap: str, topics: dict[str, str], group: str, produced: set[tuple[int, int]],
    outcome: Outcome, timeout_s: float = 180.0,
) -> None:  # fmt: skip
    """Wait until the group committed everything, then account for every input record."""
    t0 = time.monotonic()
    while True:
        committed, end = await _committed_and_ends(bootstrap, group, topics["in"], produced)
        if end and committed >= end:
            break
        if time.monotonic() - t0 > timeout_s:
            outcome.notes.append(f"not drained within {timeout_s:.0f}s: {committed}/{end}")
            break
        await asyncio.sleep(0.5)  # a harness watching another process: nothing to wait on
    outcome.drain_s = time.monotonic() - t0
    results = [_source(m, False) for m in await _read_all(bootstrap, topics["out"])]
    dead = [_source(m, True) for m in await _read_all(bootstrap, topics["dlq"])]
    seen = results + dead
    outcome.produced = len(produced)
    outcome.outputs = len(seen)
    outcome.unique = len(set(seen))
    outcome.duplicates = len(seen) - len(set(seen))
    outcome.dead_letters = len(dead)
    lost = sorted(produced - set(seen))
    outcome.lost = len(lost)
    outcome.lost_sample = lost[:20]


# -- scenarios --------------------------------------------------------------------------------
@dataclass
class _Stage:
    bootstrap: str
    proxy: FaultProxy
    workdir: Path
    plan: ChaosPlan
    rng: random.Random


def _config(stage: _Stage, name: str, partitions: int) -> tuple[Path, dict[str, str], str]:
    topics = {"in": f"{name}.in", "out": f"{name}.out", "dlq": f"{name}.dlq"}
    group = f"chaos-{name}"
    cfg = {
        "kafka": {
            "bootstrap_servers": stage.bootstrap,
            "group_id": group,
            "input_topics": [topics["in"]],
            "output_topic": topics["out"],
            "dlq_topic": topics["dlq"],
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "request_timeout_ms": 8000,
            "fetch_max_wait_ms": 50,
            "commit_interval_ms": 100,
            "retry_backoff_ms": 100,
            "max_retry_backoff_ms": 2000,
        },
        "model": stage.plan.model,
        "batching": {"max_batch_size": 32, "max_wait_ms": 10, "max_in_flight": MAX_IN_FLIGHT},
        "runtime": {"torch_threads": 1, "shutdown_grace_s": 10},
        "log": {"level": "WARNING"},
    }
    path = stage.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, topics, group


async def _prepare(stage: _Stage, name: str, partitions: int) -> tuple[Path, dict[str, str], str]:
    path, topics, group = _config(stage, name, partitions)
    await create_topics(stage.bootstrap, {topics["in"]: partitions, topics["out"]: partitions})
    await create_topics(stage.bootstrap, {topics["dlq"]: 1})
    return path, topics, group


async def _finish(
    stage: _Stage, outcome: Outcome, members: list[Member], producer: SteadyProducer,
    topics: dict[str, str], group: str,
) -> None:  # fmt: skip
    """Stop producing; let a live member drain the rest; account; stop members cleanly."""
    await producer.stop()
    if not any(m.alive for m in members):
        await members[0].start()
    await drain_and_verify(stage.bootstrap, topics, group, producer.acked, outcome)
    for m in members:
        m.signal(signal.SIGTERM)
    for m in members:
        if m.alive:
            code = await m.wait(30)
            if code != 0:
                outcome.clean_exit = False
                outcome.notes.append(f"member {m.index} exited {code} on SIGTERM after the run")


async def kill_loop(stage: _Stage) -> Outcome:
    outcome = Outcome("kill-loop")
    path, topics, group = await _prepare(stage, "kill-loop", 4)
    victim, steady = Member(path, 0, stage.workdir), Member(path, 1, stage.workdir)
    producer = SteadyProducer(stage.bootstrap, topics["in"], stage.plan.rate_per_s)
    producer.start()
    await steady.start()
    modes: dict[str, int] = {"kill while running": 0, "kill in start-up": 0, "kill in drain": 0}
    rng = stage.rng
    for _ in range(stage.plan.kills):
        await victim.start()
        mode = rng.choice(list(modes))
        modes[mode] += 1
        if mode == "kill in start-up":
            await asyncio.sleep(rng.uniform(0.3, 4.0))  # loading, warming, joining
        elif mode == "kill while running":
            await asyncio.sleep(rng.uniform(4.0, 8.0))  # start-up and join take ~4 s here
        else:
            await asyncio.sleep(rng.uniform(4.0, 7.0))
            victim.signal(signal.SIGTERM)
            await asyncio.sleep(rng.uniform(0.05, 0.6))
        if not victim.alive:
            outcome.unexpected_exits += 1
            outcome.notes.append(f"victim had exited with {victim.proc and victim.proc.returncode}")
        victim.signal(signal.SIGKILL)
        await victim.wait(10)
        if not steady.alive:
            outcome.unexpected_exits += 1
            await steady.start()
    outcome.faults = {k: v for k, v in modes.items() if v}
    outcome.duplicate_bound = stage.plan.kills * MAX_IN_FLIGHT
    await victim.start()
    await _finish(stage, outcome, [victim, steady], producer, topics, group)
    return outcome


async def rebalance_storm(stage: _Stage) -> Outcome:
    outcome = Outcome("rebalance-storm")
    path, topics, group = await _prepare(stage, "rebalance-storm", 6)
    members = [Member(path, i, stage.workdir) for i in range(3)]
    producer = SteadyProducer(stage.bootstrap, topics["in"], stage.plan.rate_per_s)
    producer.start()
    for m in members:
        await m.start()
    rebalances: dict[tuple[int, int], float] = {}  # (member, start) -> last counter seen

    async def scrape(m: Member) -> None:
        value = await m.metric("streamer_rebalances_total")
        if value is not None:
            rebalances[(m.index, m.starts)] = value

    rng, kills, terms = stage.rng, 0, 0
    t_end = time.monotonic() + stage.plan.storm_s
    while time.monotonic() < t_end:
        await asyncio.sleep(rng.uniform(2.0, 5.0))
        m = rng.choice(members)
        await scrape(m)
        if rng.random() < 0.5:
            m.signal(signal.SIGTERM)
            terms += 1
            code = await m.wait(30)
            if code not in (0, None):
                outcome.notes.append(f"member {m.index} exited {code} on SIGTERM")
                outcome.clean_exit = False
        else:
            m.signal(signal.SIGKILL)
            kills += 1
            await m.wait(10)
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        await m.start()
    outcome.faults = {"SIGTERM": terms, "SIGKILL": kills}
    outcome.duplicate_bound = (kills + terms) * MAX_IN_FLIGHT
    await producer.stop()
    await drain_and_verify(stage.bootstrap, topics, group, producer.acked, outcome)
    holding = 0
    for m in members:
        await scrape(m)
        assigned = await m.metric("streamer_assigned_partitions")
        holding += int(bool(assigned))
    outcome.members_holding_partitions = holding
    outcome.rebalances = int(sum(rebalances.values()))
    if holding < len(members):
        outcome.notes.append(f"only {holding} of {len(members)} members hold partitions")
    for m in members:
        m.signal(signal.SIGTERM)
    for m in members:
        if await m.wait(30) != 0:
            outcome.clean_exit = False
    return outcome


async def network(stage: _Stage) -> Outcome:
    outcome = Outcome("network")
    path, topics, group = await _prepare(stage, "network", 4)
    member = Member(path, 0, stage.workdir)
    producer = SteadyProducer(stage.bootstrap, topics["in"], stage.plan.rate_per_s)
    producer.start()
    await member.start()
    proxy = stage.proxy

    async def hold(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            if not member.alive:  # Kubernetes would restart it: so do we, and say so
                outcome.unexpected_exits += 1
                outcome.notes.append(f"member exited {member.proc and member.proc.returncode}")
                await member.start()

    await hold(8.0)  # joined and flowing
    for _ in range(stage.plan.network_rounds):
        proxy.reset()
        await hold(4.0)
        proxy.stall()  # longer than request_timeout_ms (8 s)
        await hold(10.0)
        proxy.heal()
        await hold(4.0)
        proxy.slow(0.2)
        await hold(5.0)
        proxy.heal()
        await hold(4.0)
    c = proxy.counts
    outcome.faults = {"resets": c.resets, "stalls": c.stalls, "slow periods": c.slow_periods}
    outcome.duplicate_bound = (c.resets + c.stalls + outcome.unexpected_exits) * MAX_IN_FLIGHT
    await _finish(stage, outcome, [member], producer, topics, group)
    return outcome


RUNNERS: dict[str, Callable[[_Stage], Awaitable[Outcome]]] = {
    "kill-loop": kill_loop,
    "rebalance-storm": rebalance_storm,
    "network": network,
}


async def run_scenarios(
    plan: ChaosPlan, scenarios: list[str], workdir: Path,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:  # fmt: skip
    """The scenarios, in order, on one broker behind one fault proxy."""
    proxy_port = free_port()
    broker = EmbeddedBroker(advertised_port=proxy_port)
    broker.start()
    proxy = FaultProxy(proxy_port, broker.port)
    await proxy.start()
    stage = _Stage(f"127.0.0.1:{proxy_port}", proxy, workdir, plan, random.Random(plan.seed))
    outcomes = []
    try:
        for name in scenarios:
            t0 = time.monotonic()
            outcome = await RUNNERS[name](stage)
            outcome.seconds = time.monotonic() - t0
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)
            proxy.heal()
    finally:
        for member in Member.everyone:  # a scenario that failed must not leave members behind
            member.signal(signal.SIGKILL)
            if member.proc is not None:
                await member.proc.wait()
        Member.everyone.clear()
        await proxy.close()
        broker.stop()
    return outcomes


# -- the command ------------------------------------------------------------------------------
def run_chaos(args: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    from streamer.observability.logs import setup_logging

    setup_logging("WARNING")
    console = Console()
    scenarios = [s.strip() for s in (args.scenarios or ",".join(SCENARIOS)).split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        console.print(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
        return 2
    plan = ChaosPlan.short(seed=args.seed) if args.short else ChaosPlan(seed=args.seed)
    if args.model_path:
        plan = ChaosPlan(**{**asdict(plan), "model": {"name": "m", "path": str(args.model_path)}})
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = os.environ.get("STREAMER_CHAOS_KEEP")  # a folder to keep members' configs and logs
    with tempfile.TemporaryDirectory(prefix="streamer-chaos-") as tmp:
        if keep:
            tmp = keep
            Path(keep).mkdir(parents=True, exist_ok=True)
        with console.status(
            f"chaos: {', '.join(scenarios)} ({'short' if args.short else 'long'})…"
        ):
            outcomes = asyncio.run(
                run_scenarios(
                    plan,
                    scenarios,
                    Path(tmp),
                    on_done=lambda o: console.print(
                        f"{o.scenario}: lost {o.lost}, duplicates {o.duplicates}, {o.seconds:.0f}s"
                    ),
                )
            )
    table = Table(title="streamer chaos — every input record accounted for by (partition, offset)")
    for col in ("scenario", "faults", "produced", "lost", "dupes", "dupe bound", "DLQ",
                "exits", "rebalances", "drain s", "s", "ok"):  # fmt: skip
        table.add_column(col)
    for o in outcomes:
        table.add_row(
            o.scenario,
            ", ".join(f"{k} {v}" for k, v in o.faults.items()),
            str(o.produced),
            str(o.lost),
            str(o.duplicates),
            str(o.duplicate_bound),
            str(o.dead_letters),
            str(o.unexpected_exits),
            "" if o.rebalances is None else str(o.rebalances),
            f"{o.drain_s:.1f}",
            f"{o.seconds:.0f}",
            "yes" if o.ok else "NO: " + "; ".join(o.notes),
        )
    console.print(table)
    doc = {
        "plan": asdict(plan),
        "scenarios": [{**asdict(o), "ok": o.ok} for o in outcomes],
    }
    out.write_text(json.dumps(doc, indent=2))
    console.print(f"wrote {out}")
    return 0 if all(o.ok for o in outcomes) else 1
