"""``streamer soak`` / ``make soak``: does memory stay flat while a large backlog drains?

The backlog (``--records`` small JSON records, one million by default) is produced to the
embedded broker *first*; only then does ``streamer run`` start, as a child process with
``runtime.processes`` 1, so it meets the whole backlog at once — the case backpressure
(``batching.max_in_flight``) is there for. While it drains, a sampler takes one sample every
``--interval-s``: the child's RSS (its process tree, psutil), the group's lag and the results
acknowledged so far. When the lag reaches 0 the child gets SIGTERM and must exit 0.

Definitions (what the JSON's ``summary`` reports):

* **lag** — sum over the input partitions of log-end offset minus the group's committed
  offset. The log end is the larger of the broker's ListOffsets answer and the end the
  producer's acks gave: nothing else writes the topic during a soak, and the embedded broker
  (tansu) answers ListOffsets(latest) with the last *batch's* base offset + 1, not the log end.
* **warm-up** — over once ``--warmup-fraction`` of the records are committed. The **RSS
  reference** is the median RSS of the samples from then on (the median, so one spike does not
  move the band it is judged by); RSS is **within the band** when every one of those samples is
  within ±10 % of it.
* **lag falls steadily** — over the drain (from the last sample before anything was committed
  to the first with lag 0): lag never rises from one sample to the next, *and* the
  least-squares slope of lag over time is negative in each quarter of the drain (a stall as long
  as a quarter, or a quarter that gains lag, fails it). With fewer than two samples a quarter it
  is not judged (shorten ``--interval-s``).

The RSS drift after warm-up (least-squares MB/min) is reported beside the band but judged by
nobody: a leak shows as a ramp, allocator arenas as steps that come and go.

Writes ``--out`` (JSON) and a PNG beside it (RSS with the band shaded after warm-up; lag), and
prints a summary. Exit code 1 when a criterion fails. A benchmark: no test asserts its figures.
The embedded broker keeps every record in memory, inputs and results (about 7 KB a record with
float results): a million takes about 7 GB of *its* memory, which is not what is measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import psutil
import yaml

from streamer import eventloop
from streamer.kafka.broker import EmbeddedBroker, create_topics, free_port

if TYPE_CHECKING:  # rich is imported where it is used: `streamer run` builds this parser too
    from rich.console import Console
    from rich.progress import Progress

TOPIC = "soak"
GROUP = "soak"
BAND_PCT = 10.0
QUARTERS = 4
TEXT_POOL = 10_000  # distinct sentences, cycled: generating a million costs more than producing
PRODUCE_BATCH_BYTES = 256 * 1024  # one record batch per request: ~1,500 small records
PRODUCE_IN_FLIGHT = 16  # record batches awaiting their ack
STARTUP_TIMEOUT_S = 180.0  # child start to its first commit (model load, warm-up, group join)
STALL_TIMEOUT_S = 120.0  # no commit progress for this long while lag > 0: give up
STOP_TIMEOUT_S = 90.0  # SIGTERM to exit (runtime.shutdown_grace_s is 25 s)
SCRAPE_TIMEOUT_S = 0.5


class SoakError(RuntimeError):
    """The soak could not finish; the message says why and where to look."""


# -- samples and the two verdicts (pure) -----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float  # since ``streamer run`` started
    rss_mb: float  # the child's process tree
    lag: int
    committed: int  # sum of committed offsets: records done
    outputs: int | None  # results + dead letters acknowledged (the child's /metrics)


@dataclass(frozen=True, slots=True)
class RssBand:
    """RSS after warm-up against its median (see the module docstring)."""

    band_pct: float
    warmup_end_s: float | None  # first sample with warmup_fraction of the records committed
    reference_mb: float | None  # median RSS from warmup_end_s on
    min_mb: float | None
    max_mb: float | None
    min_pct: float | None  # of the reference
    max_pct: float | None
    samples: int  # after warm-up
    within: bool | None  # None: no sample after warm-up
    # least-squares drift after warm-up: a leak shows as a ramp; allocator steps come and go
    slope_mb_per_min: float | None = None


def rss_band(
    samples: Sequence[Sample], records: int, warmup_fraction: float, band_pct: float = BAND_PCT
) -> RssBand:
    """The RSS reference and how far the samples after warm-up stray from it."""
    threshold = warmup_fraction * records
    after = [s for s in samples if s.committed >= threshold]
    if not after:
        return RssBand(band_pct, None, None, None, None, None, None, 0, None)
    rss = [s.rss_mb for s in after]
    times = [s.t_s for s in after]
    slope = 60 * _slope(times, rss) if len(set(times)) > 1 else None
    ref = statistics.median(rss)
    lo, hi = min(rss), max(rss)
    within = ref * (1 - band_pct / 100) <= lo and hi <= ref * (1 + band_pct / 100)
    return RssBand(
        band_pct=band_pct,
        warmup_end_s=after[0].t_s,
        reference_mb=ref,
        min_mb=lo,
        max_mb=hi,
        min_pct=100 * lo / ref,
        max_pct=100 * hi / ref,
        samples=len(after),
        within=within,
        slope_mb_per_min=slope,
    )


@dataclass(frozen=True, slots=True)
class LagTrend:
    """How the lag fell during the drain (see the module docstring for "steadily")."""

    drain_start_s: float | None  # last sample before the first commit
    drain_end_s: float | None  # first sample with lag 0 (None: never reached)
    drained: bool
    monotone: bool  # lag never rose between consecutive samples of the drain
    quarter_rates: list[float] = field(default_factory=list)  # -slope, records/s, per quarter
    longest_stall_s: float = 0.0  # longest run of samples with an unchanged lag > 0
    steady: bool | None = None  # None: too few samples to judge
    note: str = ""


def _slope(ts: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``ts`` (at least two distinct times)."""
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var


def lag_trend(samples: Sequence[Sample], quarters: int = QUARTERS) -> LagTrend:
    """Monotonicity, per-quarter drain rates and the longest stall over the drain window."""
    if not samples:
        return LagTrend(None, None, False, True, note="no samples")
    start = 0
    for i, s in enumerate(samples):
        if s.committed == 0:
            start = i
        else:
            break
    end = next((i for i, s in enumerate(samples) if s.lag == 0 and i >= start), None)
    drained = end is not None
    window = samples[start : (end if end is not None else len(samples) - 1) + 1]
    monotone = all(b.lag <= a.lag for a, b in itertools.pairwise(window))
    stall, longest = 0.0, 0.0
    for a, b in itertools.pairwise(window):
        stall = stall + (b.t_s - a.t_s) if b.lag == a.lag and b.lag > 0 else 0.0
        longest = max(longest, stall)
    common = {
        "drain_start_s": window[0].t_s,
        "drain_end_s": window[-1].t_s if drained else None,
        "drained": drained,
        "monotone": monotone,
        "longest_stall_s": longest,
    }
    if len(window) < 2 * quarters:
        note = (
            f"{len(window)} samples in the drain, {2 * quarters} needed to judge its "
            "quarters: lower --interval-s or raise --records"
        )
        return LagTrend(**common, note=note)
    size, extra = divmod(len(window), quarters)
    rates, lo = [], 0
    for q in range(quarters):
        hi = lo + size + (1 if q < extra else 0)
        part = window[lo:hi]
        rates.append(-_slope([s.t_s for s in part], [s.lag for s in part]))
        lo = hi
    steady = monotone and all(r > 0 for r in rates)
    note = ""
    if not monotone:
        note = "lag rose between samples (offsets committed backwards, or a rewind)"
    elif not steady:
        note = "lag did not fall in every quarter of the drain (a stall)"
    return LagTrend(**common, quarter_rates=rates, steady=steady, note=note)


# -- the run ---------------------------------------------------------------------------------
@dataclass(slots=True)
class SoakPlan:
    records: int = 1_000_000
    out: Path = Path("bench/soak.json")
    interval_s: float = 1.0
    model: str = "null"  # null | minilm | a model directory
    partitions: int = 8
    warmup_fraction: float = 0.1

    @property
    def png(self) -> Path:
        return self.out.with_suffix(".png")

    def check(self) -> None:
        if self.records < 1:
            raise SoakError("--records must be at least 1")
        if self.interval_s <= 0:
            raise SoakError("--interval-s must be positive, e.g. 1.0")
        if self.partitions < 1:
            raise SoakError("--partitions must be at least 1")
        if not 0 <= self.warmup_fraction < 1:
            raise SoakError("--warmup-fraction must be in [0, 1), e.g. 0.1")
        if self.model not in ("null", "minilm") and not Path(self.model).is_dir():
            raise SoakError(
                f"--model {self.model!r}: not 'null', 'minilm' or a model directory that exists"
            )

    def model_config(self) -> dict[str, Any]:
        from streamer.tools.bench import NULL_MODEL

        if self.model == "null":
            return dict(NULL_MODEL)
        if self.model == "minilm":
            from streamer.tools.devtools import bundled_model_path

            path = bundled_model_path()
        else:
            path = Path(self.model).resolve()
        return {"name": "soak", "version": "1", "path": str(path), "max_length": 128}


@dataclass(slots=True)
class Produced:
    records: int
    seconds: float
    ends: dict[int, int]  # partition -> log end from the acks

    @property
    def records_per_s(self) -> float:
        return self.records / max(self.seconds, 1e-9)


def _progress(console: Console) -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


async def produce_backlog(
    bootstrap: str, topic: str, records: int, partitions: int, console: Console
) -> Produced:
    """``records`` ``{"id", "text"}`` records, round-robin over the partitions, one record
    batch per request and ``PRODUCE_IN_FLIGHT`` of them awaiting acks (``send()`` per record
    costs several times more CPU than the broker needs to take them)."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from streamer.tools.devtools import sample_texts

    texts = sample_texts(min(records, TEXT_POOL), seed=11)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=0,
        max_batch_size=PRODUCE_BATCH_BYTES,
        max_request_size=2 * PRODUCE_BATCH_BYTES,
    )
    await producer.start()
    slots = asyncio.Semaphore(PRODUCE_IN_FLIGHT)
    ends: dict[int, int] = {}
    sent: list[asyncio.Future[Any]] = []  # every one, so a failure is never lost
    started = time.monotonic()

    def acked(fut: asyncio.Future[Any], partition: int, n: int) -> None:
        slots.release()
        if not fut.cancelled() and fut.exception() is None:
            ends[partition] = max(ends.get(partition, 0), fut.result().offset + n)

    try:
        with _progress(console) as bar:
            task = bar.add_task(f"producing the backlog to {topic}", total=records)
            batch, partition = producer.create_batch(), 0

            async def send() -> None:
                nonlocal batch, partition
                n = batch.record_count()
                await slots.acquire()
                fut = await producer.send_batch(batch, topic, partition=partition)
                fut.add_done_callback(lambda f, p=partition, n=n: acked(f, p, n))
                sent.append(fut)
                bar.advance(task, n)
                batch, partition = producer.create_batch(), (partition + 1) % partitions

            for i in range(records):
                key, value = str(i).encode(), orjson.dumps({"id": i, "text": texts[i % TEXT_POOL]})
                if batch.append(timestamp=None, key=key, value=value) is None:
                    await send()
                    batch.append(timestamp=None, key=key, value=value)
            if batch.record_count():
                await send()
            await asyncio.gather(*sent)  # raises the first failed send
    except KafkaError as exc:
        raise SoakError(f"producing the backlog to {bootstrap} failed: {exc!r}") from exc
    finally:
        await producer.stop()
    return Produced(records, time.monotonic() - started, ends)


def child_config(plan: SoakPlan, bootstrap: str, http_port: int) -> dict[str, Any]:
    """The child's YAML: the bench's Kafka timings, one process, metrics on loopback."""
    from streamer.tools.bench import _kafka_over

    return {
        "kafka": {
            **_kafka_over(bootstrap),
            "group_id": GROUP,
            "input_topics": [TOPIC],
            "output_topic": f"{TOPIC}.out",
            "dlq_topic": f"{TOPIC}.dlq",
        },
        "model": plan.model_config(),
        "runtime": {"processes": 1},
        "http": {"port": http_port, "host": "127.0.0.1"},
    }


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its descendants, MB (processes that just ended count as 0)."""
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total / 2**20


def outputs_from_metrics(text: str) -> int:
    """Results + dead letters acknowledged, summed over labels, from a /metrics page."""
    total = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("streamer_records_published_total", "streamer_records_dead_lettered_total"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


class Sampler:
    """One :class:`Sample` per call: RSS (psutil), lag (the group's committed offsets against
    the log end) and outputs (the child's /metrics; None when it does not answer yet)."""

    def __init__(
        self, bootstrap: str, pid: int, ends: dict[int, int], http_port: int, started: float
    ) -> None:
        self.bootstrap, self.pid, self.http_port = bootstrap, pid, http_port
        self.acked_ends = ends
        self.ends = dict(ends)
        self.broker_ends: dict[int, int] = {}
        self.started = started  # the child's start: t_s counts from it

    async def __aenter__(self) -> Sampler:
        import aiohttp
        from aiokafka import AIOKafkaConsumer, TopicPartition

        # a group member in name only: it never subscribes, so it never joins the group
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=GROUP, enable_auto_commit=False
        )
        await self.consumer.start()
        self.tps = [TopicPartition(TOPIC, p) for p in sorted(self.acked_ends)]
        listed = await self.consumer.end_offsets(self.tps)
        self.broker_ends = {tp.partition: off for tp, off in listed.items()}
        self.ends = {p: max(e, self.broker_ends.get(p, 0)) for p, e in self.acked_ends.items()}
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()
        await self.consumer.stop()

    async def _outputs(self) -> int | None:
        import aiohttp

        try:
            url = f"http://127.0.0.1:{self.http_port}/metrics"
            async with self.http.get(url) as resp:
                return outputs_from_metrics(await resp.text()) if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None  # not listening yet, or gone

    async def take(self) -> Sample:
        t = time.monotonic() - self.started
        rss = tree_rss_mb(self.pid)
        committed = 0
        for tp in self.tps:
            off = await self.consumer.committed(tp)
            committed += min(off or 0, self.ends[tp.partition])
        lag = sum(self.ends.values()) - committed
        return Sample(round(t, 3), round(rss, 2), lag, committed, await self._outputs())


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def drain(
    bootstrap: str, plan: SoakPlan, produced: Produced, workdir: Path, console: Console
) -> dict[str, Any]:
    """Start ``streamer run``, sample until lag 0, SIGTERM it; samples and its exit."""
    port = free_port()
    cfg_path = workdir / "soak.yaml"
    cfg_path.write_text(yaml.safe_dump(child_config(plan, bootstrap, port)))
    log_path = workdir / "soak.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "run", "--config", str(cfg_path),
            stdout=log, stderr=log,
        )  # fmt: skip
    samples: list[Sample] = []
    exited = asyncio.ensure_future(proc.wait())
    try:
        async with Sampler(bootstrap, proc.pid, produced.ends, port, started) as sampler:
            sampling = asyncio.ensure_future(_sample(sampler, plan, samples, console, log_path))
            done, _ = await asyncio.wait({sampling, exited}, return_when=asyncio.FIRST_COMPLETED)
            if sampling not in done:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
                raise SoakError(
                    f"streamer run exited with {proc.returncode} before the backlog drained "
                    f"({samples[-1].lag if samples else '?'} records left); its log:\n"
                    f"{_tail(log_path)}"
                )
            sampling.result()
        stop_started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), STOP_TIMEOUT_S)
        except TimeoutError:
            raise SoakError(
                f"streamer run did not exit within {STOP_TIMEOUT_S:.0f}s of SIGTERM; its log:\n"
                f"{_tail(log_path)}"
            ) from None
        stop_s = time.monotonic() - stop_started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise SoakError(
            f"streamer run exited with {proc.returncode} after SIGTERM (expected 0); its log:\n"
            f"{_tail(log_path)}"
        )
    return {
        "samples": samples,
        "exit_code": proc.returncode,
        "stop_s": stop_s,
        "broker_end_offsets": sampler.broker_ends,
        "acked_end_offsets": produced.ends,
        "config": child_config(plan, bootstrap, port),
    }


async def _sample(
    sampler: Sampler, plan: SoakPlan, samples: list[Sample], console: Console, log_path: Path
) -> None:
    """Sample every ``plan.interval_s`` (a fixed period, not after each sample) until lag 0."""
    total = sum(sampler.ends.values())
    progress_at = sampler.started  # last time ``committed`` moved (or the start)
    with _progress(console) as bar:
        task = bar.add_task("draining", total=total)
        next_at = time.monotonic()
        while True:
            s = await sampler.take()
            samples.append(s)
            if len(samples) == 1 or s.committed != samples[-2].committed:
                progress_at = time.monotonic()
            bar.update(
                task,
                completed=s.committed,
                description=f"draining: RSS {s.rss_mb:,.0f} MB, lag {s.lag:,}",
            )
            if s.lag == 0:
                return
            idle = time.monotonic() - progress_at
            if s.committed == 0 and idle > STARTUP_TIMEOUT_S:
                raise SoakError(
                    f"nothing committed {STARTUP_TIMEOUT_S:.0f}s after streamer run started; "
                    f"its log:\n{_tail(log_path)}"
                )
            if s.committed and idle > STALL_TIMEOUT_S:
                raise SoakError(
                    f"lag stuck at {s.lag:,} for {idle:.0f}s; its log:\n{_tail(log_path)}"
                )
            next_at += plan.interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def summarize(plan: SoakPlan, produced: Produced, run: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: plan, producing, samples, the two verdicts."""
    samples: list[Sample] = run["samples"]
    band = rss_band(samples, produced.records, plan.warmup_fraction)
    trend = lag_trend(samples)
    drain_s = (
        trend.drain_end_s - trend.drain_start_s
        if trend.drain_end_s is not None and trend.drain_start_s is not None
        else None
    )
    first_commit = next((s.t_s for s in samples if s.committed), None)
    verdicts = [band.within, trend.steady]
    passed = None if None in verdicts else all(verdicts)
    if False in verdicts:
        passed = False
    return {
        "plan": {
            "records": plan.records,
            "interval_s": plan.interval_s,
            "model": plan.model,
            "partitions": plan.partitions,
            "warmup_fraction": plan.warmup_fraction,
        },
        "machine": {
            "cpu_threads": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "produce": {
            "records": produced.records,
            "seconds": produced.seconds,
            "records_per_s": produced.records_per_s,
        },
        "child": {
            "config": run["config"],
            "exit_code": run["exit_code"],
            "stop_s": run["stop_s"],
            "broker_end_offsets": run["broker_end_offsets"],
            "acked_end_offsets": run["acked_end_offsets"],
        },
        "samples": [asdict(s) for s in samples],
        "summary": {
            "records": produced.records,
            "duration_s": samples[-1].t_s,
            "first_commit_s": first_commit,
            "drain_s": drain_s,
            "records_per_s": produced.records / drain_s if drain_s else None,
            "peak_rss_mb": max(s.rss_mb for s in samples),
            "rss": asdict(band),
            "lag": asdict(trend),
            "passed": passed,
            "definitions": {
                "lag": "sum over partitions of log end minus committed offset",
                "rss_reference": "median RSS of the samples once warmup_fraction of the records "
                "were committed; within: every such sample within ±band_pct of it",
                "steady": "lag never rises between samples of the drain and its least-squares "
                "slope is negative in each quarter of the drain",
                "drain_s": "last sample with nothing committed to first sample with lag 0 "
                "(± one interval)",
            },
        },
    }


# -- outputs ---------------------------------------------------------------------------------
def write_png(result: dict[str, Any], path: Path) -> None:
    """Two panels: RSS with the ±band shaded after warm-up, and lag with its quarter fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    samples = result["samples"]
    summ = result["summary"]
    band, trend = summ["rss"], summ["lag"]
    t = [s["t_s"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    fig.suptitle(
        f"streamer soak: {summ['records']:,} records, model {result['plan']['model']}, "
        f"1 process, sample every {result['plan']['interval_s']:g} s"
    )
    ax1.plot(t, [s["rss_mb"] for s in samples], color="tab:blue", lw=1.5, label="RSS")
    if band["reference_mb"] is not None:
        ref, pct = band["reference_mb"], band["band_pct"] / 100
        t0 = band["warmup_end_s"]
        ax1.fill_between(
            [t0, t[-1]], ref * (1 - pct), ref * (1 + pct),
            color="tab:green", alpha=0.15, label=f"±{band['band_pct']:g} % of reference",
        )  # fmt: skip
        ax1.hlines(ref, t0, t[-1], colors="tab:green", linestyles="--", lw=1,
                   label=f"reference {ref:,.0f} MB (median after warm-up)")  # fmt: skip
        ax1.axvline(t0, color="grey", ls=":", lw=1)
        ax1.text(t0, 0.03, " warm-up over", transform=ax1.get_xaxis_transform(), fontsize=8,
                 color="grey")  # fmt: skip
        verdict = "within" if band["within"] else "OUTSIDE"
        ax1.set_title(
            f"RSS of the streamer run process tree: {verdict} ±{band['band_pct']:g} % after "
            f"warm-up (min {band['min_pct']:.1f} %, max {band['max_pct']:.1f} %)",
            fontsize=10,
        )
    else:
        ax1.set_title("RSS of the streamer run process tree (no sample after warm-up)", fontsize=10)
    ax1.set_ylabel("RSS (MB)")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower center", fontsize=8)

    ax2.plot(t, [s["lag"] for s in samples], color="tab:red", lw=1.5, label="lag")
    ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    rates = trend["quarter_rates"]
    if trend["steady"] is None:
        judged = "not judged (too few samples)"
    else:
        judged = "falls steadily" if trend["steady"] else "does NOT fall steadily"
    rate_text = ", ".join(f"{r:,.0f}" for r in rates)
    ax2.set_title(
        f"consumer-group lag: {judged}"
        + (f" (records/s per quarter of the drain: {rate_text})" if rates else ""),
        fontsize=10,
    )
    if summ["first_commit_s"] is not None:
        ax2.axvline(summ["first_commit_s"], color="grey", ls=":", lw=1)
        ax2.text(summ["first_commit_s"], 0.03, " first commit",
                 transform=ax2.get_xaxis_transform(), fontsize=8, color="grey")  # fmt: skip
    ax2.set_ylabel("lag (records)")
    ax2.set_xlabel("seconds since streamer run started")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def print_summary(console: Console, result: dict[str, Any], plan: SoakPlan) -> None:
    from rich.table import Table

    summ = result["summary"]
    band, trend = summ["rss"], summ["lag"]
    table = Table(title=f"streamer soak — {summ['records']:,} records, model {plan.model}")
    table.add_column("measure")
    table.add_column("value", justify="right")

    def yes(x: bool | None) -> str:
        return "not judged" if x is None else ("[green]yes[/]" if x else "[red]NO[/]")

    rows = [
        ("produce backlog", f"{result['produce']['seconds']:.1f} s "
         f"({result['produce']['records_per_s']:,.0f} records/s)"),
        ("first commit after start", _fmt(summ["first_commit_s"], ".1f", " s")),
        ("start to lag 0", _fmt(summ["duration_s"], ".1f", " s")),
        ("drain (last sample with nothing committed to lag 0)", _fmt(summ["drain_s"], ".1f", " s")),
        ("records/s (drain)", _fmt(summ["records_per_s"])),
        ("RSS reference (median after warm-up)", _fmt(band["reference_mb"], ",.0f", " MB")),
        ("RSS min / max after warm-up",
         f"{_fmt(band['min_pct'], '.1f', ' %')} / {_fmt(band['max_pct'], '.1f', ' %')}"),
        ("RSS drift after warm-up (least squares)",
         _fmt(band["slope_mb_per_min"], "+.1f", " MB/min")),
        ("peak RSS (whole run)", _fmt(summ["peak_rss_mb"], ",.0f", " MB")),
        (f"RSS within ±{band['band_pct']:g} %", yes(band["within"])),
        ("lag monotone", yes(trend["monotone"])),
        ("drain rate per quarter (records/s)",
         ", ".join(f"{r:,.0f}" for r in trend["quarter_rates"]) or "—"),
        ("longest stall", f"{trend['longest_stall_s']:.1f} s"),
        ("lag falls steadily", yes(trend["steady"])),
        ("exit after SIGTERM", f"{result['child']['exit_code']} in "
         f"{result['child']['stop_s']:.1f} s"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if trend["note"]:
        console.print(f"lag: {trend['note']}")


def save(result: dict[str, Any], plan: SoakPlan) -> None:
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    plan.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    write_png(result, plan.png)


async def soak(bootstrap: str, plan: SoakPlan, console: Console) -> dict[str, Any]:
    """Produce the backlog, drain it through ``streamer run``, measure; the JSON document."""
    await create_topics(
        bootstrap, {TOPIC: plan.partitions, f"{TOPIC}.out": plan.partitions, f"{TOPIC}.dlq": 1}
    )
    produced = await produce_backlog(bootstrap, TOPIC, plan.records, plan.partitions, console)
    console.print(
        f"backlog: {produced.records:,} records in {produced.seconds:.1f} s "
        f"({produced.records_per_s:,.0f} records/s); starting streamer run"
    )
    with tempfile.TemporaryDirectory(prefix="streamer-soak-") as tmp:
        run = await drain(bootstrap, plan, produced, Path(tmp), console)
    return summarize(plan, produced, run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--records", type=int, default=1_000_000, help="backlog size (default 1,000,000)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/soak.json"),
        help="JSON results; the PNG goes beside it (default bench/soak.json, bench/soak.png)",
    )
    p.add_argument(
        "--interval-s", type=float, default=1.0, help="sample period in seconds (default 1.0)"
    )
    p.add_argument(
        "--model",
        default="null",
        help="'null' (default): model.backend null, a zero-cost stand-in, so the pipeline's own "
        "memory is measured and a million records drain in minutes; 'minilm': the bundled "
        "all-MiniLM-L6-v2 (about 300 records/s on 2 CPU cores: use --records 50000 or so); "
        "or a model directory",
    )
    p.add_argument("--partitions", type=int, default=8, help="input topic partitions (default 8)")
    p.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.1,
        help="RSS reference = median RSS of the samples taken once this fraction of the "
        "records is committed (default 0.1)",
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_soak(args: argparse.Namespace) -> int:
    """``streamer soak``: exit 0 when both criteria hold (or could not be judged), 1 when one
    fails or the run could not finish."""
    from rich.console import Console
    from rich.markup import escape

    from streamer.observability.logs import setup_logging

    setup_logging("WARNING")
    console = Console(width=None if sys.stdout.isatty() else 120)
    plan = SoakPlan(
        records=args.records,
        out=args.out,
        interval_s=args.interval_s,
        model=args.model,
        partitions=args.partitions,
        warmup_fraction=args.warmup_fraction,
    )
    # SIGTERM unwinds like Ctrl-C: the child is killed and the broker stopped, not orphaned
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        plan.check()
        with EmbeddedBroker() as broker:
            result = eventloop.run(soak(broker.bootstrap, plan, console))
    except SoakError as exc:
        console.print(f"[red]streamer soak: {escape(str(exc))}[/]", highlight=False)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    save(result, plan)
    print_summary(console, result, plan)
    console.print(f"wrote {plan.out} and {plan.png}")
    if result["summary"]["passed"] is False:
        console.print("[red]soak failed: see the table above and the PNG[/]")
        return 1
    return 0
