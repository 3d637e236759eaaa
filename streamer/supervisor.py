"""``runtime.processes: N``: N worker processes in one pod, each its own consumer-group member.

Why: one Python process has one event loop and one GIL. When the loop's CPU per record times
the target rate passes one core (``streamer bench`` reports the first figure), a faster loop is
not enough, and a second process is: Kafka's consumer groups already split partitions between
members, on the same device or not. Each worker is an ordinary ``streamer run`` with the same
config; this parent runs no model and no Kafka client. It

* starts the workers with per-worker overrides through the environment (``processes=1``, a
  health port of its own on 127.0.0.1, its share of the usable cores and as many torch threads);
* restarts a worker that dies (backoff doubling from 1 s); a crash loop (more than
  ``CRASH_LIMIT`` exits within ``CRASH_WINDOW_S``) stops every worker and exits 1, so
  Kubernetes restarts the pod and shows why;
* forwards SIGTERM/SIGINT (each worker drains and commits within its grace) and SIGHUP (each
  re-reads the config file), killing a worker still running after the grace;
* serves the pod's ``/healthz`` and ``/readyz`` (200 only when every worker's is) and
  ``/metrics`` (every worker's, each sample labelled ``worker="i"``, plus restarts).

Records are never handed between processes, so the delivery guarantees are each worker's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from streamer.config import ENV_PREFIX, StreamerConfig, usable_cores
from streamer.kafka.broker import free_port
from streamer.observability.http import HealthServer

log = logging.getLogger(__name__)

CRASH_LIMIT = 5  # exits of one worker within CRASH_WINDOW_S that stop the pod
CRASH_WINDOW_S = 120.0
BACKOFF_MAX_S = 30.0
PROBE_TIMEOUT_S = 2.0


@dataclass
class WorkerPlan:
    """What one worker gets: its index, its health port, its cores and torch threads."""

    index: int
    port: int
    cores: list[int]
    torch_threads: int
    group_instance_id: str | None = None  # kafka.group_instance_id, suffixed: one per member

    def env(self) -> dict[str, str]:
        """Overrides for the worker's config (the environment wins over the file)."""
        env = {
            f"{ENV_PREFIX}RUNTIME__PROCESSES": "1",
            f"{ENV_PREFIX}RUNTIME__CPU_AFFINITY": "[" + ",".join(map(str, self.cores)) + "]",
            f"{ENV_PREFIX}RUNTIME__TORCH_THREADS": str(self.torch_threads),
            f"{ENV_PREFIX}HTTP__HOST": "127.0.0.1",
            f"{ENV_PREFIX}HTTP__PORT": str(self.port),
        }
        if self.group_instance_id is not None:
            # two members with one static id would fence each other off
            env[f"{ENV_PREFIX}KAFKA__GROUP_INSTANCE_ID"] = self.group_instance_id
        return env


def plan_workers(cfg: StreamerConfig, ports: Iterable[int] | None = None) -> list[WorkerPlan]:
    """Split the usable cores (``runtime.cpu_affinity`` or the process's) into ``processes``
    contiguous shares, the first ones one core larger when they do not divide evenly; torch
    threads are the share, or ``runtime.torch_threads`` when that is smaller."""
    n = cfg.runtime.processes
    ports = list(ports) if ports is not None else [free_port() for _ in range(n)]
    shares = split_cores(cfg.runtime.cpu_affinity or usable_cores(), n)
    static = cfg.kafka.group_instance_id
    return [
        WorkerPlan(
            i,
            ports[i],
            share,
            min(len(share), cfg.runtime.torch_threads or len(share)),
            None if static is None else f"{static}-{i}",
        )
        for i, share in enumerate(shares)
    ]


def split_cores(cores: Iterable[int], n: int) -> list[list[int]]:
    """``n`` contiguous shares of ``cores``, the first ones a core larger when uneven."""
    ordered = sorted(cores)
    if not 1 <= n <= len(ordered):
        raise ValueError(f"cannot split {len(ordered)} cores into {n} shares")
    base, extra = divmod(len(ordered), n)
    shares, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        shares.append(ordered[start : start + size])
        start += size
    return shares


def merge_metrics(texts: dict[int, str], extra: Iterable[Metric] = ()) -> bytes:
    """Workers' Prometheus expositions as one, each sample labelled with its ``worker``."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
            merged.samples.extend(
                s._replace(labels={**s.labels, "worker": str(index)}) for s in fam.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), *extra]))
    return generate_latest(registry)


class _Fixed:
    """A collector that yields metric families already built."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


@dataclass
class _Worker:
    plan: WorkerPlan
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    exits: list[float] = field(default_factory=list)  # monotonic times of unexpected exits


class Supervisor:
    """The parent of ``runtime.processes`` workers: ``start()``, then ``run()`` to the end."""

    def __init__(self, cfg: StreamerConfig, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.workers = [_Worker(p) for p in plan_workers(cfg)]
        self._stop = asyncio.Event()
        self._stopping = False
        self.failure: str | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.health = HealthServer(
            cfg.http, liveness=self._liveness, readiness=self._readiness, metrics=self._metrics
        )

    def command(self, w: _Worker) -> list[str]:
        cmd = [sys.executable, "-m", "streamer", "run"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return [*cmd, "--worker", f"{w.plan.index}/{len(self.workers)}"]

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S))
        await self.health.start()
        for w in self.workers:
            await self._spawn(w)
        log.info(
            "supervising %d workers: %s",
            len(self.workers),
            "; ".join(
                f"worker {w.plan.index} pid {w.proc.pid if w.proc else '-'} cores "
                f"{w.plan.cores} port {w.plan.port}"
                for w in self.workers
            ),
        )

    async def _spawn(self, w: _Worker) -> None:
        w.proc = await asyncio.create_subprocess_exec(
            *self.command(w), env={**os.environ, **w.plan.env()}
        )
        task = asyncio.get_running_loop().create_task(self._watch(w, w.proc))
        self._watchers.add(task)
        task.add_done_callback(self._watch_done)

    def _watch_done(self, task: asyncio.Task[None]) -> None:
        self._watchers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(f"supervising a worker failed: {task.exception()!r}")

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            log.error("%s; stopping every worker", reason)
        self._stop.set()

    async def _watch(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._stopping:
            return
        now = time.monotonic()
        w.exits = [t for t in w.exits if now - t < CRASH_WINDOW_S] + [now]
        if len(w.exits) > CRASH_LIMIT:
            self._fail(
                f"worker {w.plan.index} exited {len(w.exits)} times within "
                f"{CRASH_WINDOW_S:.0f}s (last code {code}): see its log lines above"
            )
            return
        delay = min(BACKOFF_MAX_S, 2.0 ** (len(w.exits) - 1))
        log.error(
            "worker %d (pid %d) exited with code %s; restarting it in %.0fs",
            w.plan.index,
            proc.pid,
            code,
            delay,
        )
        try:
            await asyncio.wait_for(self._stop.wait(), delay)
            return  # stopping meanwhile: no restart
        except TimeoutError:
            pass
        w.restarts += 1
        await self._spawn(w)

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    w.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def run(self) -> int:
        """Until a stop is requested (0 when every worker stopped cleanly) or a crash loop (1)."""
        await self._stop.wait()
        self._stopping = True
        grace = self.cfg.runtime.shutdown_grace_s + 5
        log.info("stopping %d workers (grace %.0fs)", len(self.workers), grace)
        self._signal_all(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        _, pending = await asyncio.wait(waits, timeout=grace) if waits else (set(), set())
        for p in procs:
            if p.returncode is None:
                log.error("worker pid %d did not stop within %.0fs: killing it", p.pid, grace)
                p.kill()
        if pending:
            await asyncio.wait(pending)
        for task in list(self._watchers):
            task.cancel()
        await self.close()
        codes = {w.plan.index: w.proc.returncode for w in self.workers if w.proc is not None}
        bad = {i: c for i, c in codes.items() if c != 0}
        if self.failure is not None or bad:
            if bad:
                log.error("workers stopped with codes %s", bad)
            return 1
        log.info("every worker stopped cleanly")
        return 0

    async def close(self) -> None:
        await self.health.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the pod's probes and metrics -------------------------------------------------------------
    async def _ask(self, w: _Worker, path: str) -> tuple[int, str]:
        assert self._session is not None
        url = f"http://127.0.0.1:{w.plan.port}{path}"
        try:
            async with self._session.get(url) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, f"no answer ({type(exc).__name__})"

    async def _all(self, path: str) -> tuple[bool, str]:
        answers = await asyncio.gather(*(self._ask(w, path) for w in self.workers))
        ok = all(status == 200 for status, _ in answers)
        lines = [f"worker {i}: {text.strip()}" for i, (_, text) in enumerate(answers)]
        return ok, "; ".join(lines)

    async def _liveness(self) -> tuple[bool, str]:
        if self.failure is not None:
            return False, self.failure
        # A worker between a crash and its restart is the supervisor's business, not a
        # reason to restart the pod: only the workers that run are asked.
        running = [w for w in self.workers if w.proc is not None and w.proc.returncode is None]
        answers = await asyncio.gather(*(self._ask(w, "/healthz") for w in running))
        sick = [
            f"worker {w.plan.index}: {text.strip()}"
            for w, (status, text) in zip(running, answers, strict=True)
            if status not in (200, 0)  # 0: still starting (no server yet)
        ]
        return (not sick), ("; ".join(sick) or f"{len(running)} workers alive")

    async def _readiness(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "draining for shutdown"
        return await self._all("/readyz")

    async def _metrics(self) -> bytes:
        texts = {}
        for w, (status, text) in zip(
            self.workers,
            await asyncio.gather(*(self._ask(w, "/metrics") for w in self.workers)),
            strict=True,
        ):
            if status == 200:
                texts[w.plan.index] = text
        restarts = CounterMetricFamily(
            "streamer_worker_restarts",
            "Worker processes restarted after exiting",
            labels=["worker"],
        )
        running = GaugeMetricFamily(
            "streamer_workers_running", "Worker processes running (runtime.processes)"
        )
        for w in self.workers:
            restarts.add_metric([str(w.plan.index)], w.restarts)
        running.add_metric(
            [], sum(1 for w in self.workers if w.proc is not None and w.proc.returncode is None)
        )
        return merge_metrics(texts, [restarts, running])


async def supervise(cfg: StreamerConfig, config_path: Path | None = None) -> int:
    """``streamer run`` with ``runtime.processes > 1``: the workers until SIGTERM/SIGINT."""
    sup = Supervisor(cfg, config_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sup.request_stop)
    loop.add_signal_handler(signal.SIGHUP, sup.request_reload)
    try:
        await sup.start()
    except BaseException:
        sup.request_stop()
        await sup.run()
        raise
    return await sup.run()
