"""``streamer bench --only api``: the HTTP API's requests/s and latency, and what it costs the
stream.

Three runs of the reference variant on the bench texts, each a service with ``http.api: true``:

* **idle** — the stream has nothing to do; single-input ``/v1/embeddings`` requests at
  concurrency 1 and 32: requests/s and p50/p99 latency, measured by the client;
* **stream alone** — the ``--records`` texts as a backlog (produced before the service starts),
  drained: the stream's records/s (first fetch to last ack), the figure the API is compared with;
* **stream + queries** — the same backlog on a fresh service, with single queries arriving at
  random (Poisson, 2/s: not in step with the batches, as a closed loop would be), from a client
  that is already waiting when the service starts: the
  queries' p50/p99 while the backlog drains (queries started between the first fetch and the
  last ack) and the stream's records/s, beside the bound the priority lane promises
  (``max_wait_ms`` + two batch times, p99 of the backlog's batches).

The load comes from a separate process (its own interpreter and event loop), so the client's
work does not take the service's loop or GIL.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import numpy as np
import orjson

from streamer.kafka.broker import create_topics, free_port

MODEL = "bench"
WARMUP_REQUESTS = 20  # before measuring an idle service (connections, the API thread)
SERVER_WAIT_S = 300.0  # model load and warm-up included
QUERY_RATE_PER_S = 2.0  # single queries while the backlog drains: Poisson arrivals


# -- the client process ------------------------------------------------------------------------
def _client_main(
    url: str,
    texts: list[str],
    concurrency: int,
    count: int,
    rate_per_s: float,
    ready: Any,  # multiprocessing Event: set once warm
    go: Any,  # multiprocessing Event: start measuring
    stop: Any,  # multiprocessing Event: stop early
    out: Any,  # multiprocessing Queue: the result
) -> None:
    out.put(asyncio.run(_drive(url, texts, concurrency, count, rate_per_s, ready, go, stop)))


async def _drive(
    url: str,
    texts: list[str],
    concurrency: int,
    count: int,
    rate_per_s: float,
    ready: Any,
    go: Any,
    stop: Any,
) -> dict[str, Any]:
    """Warm up (waiting for the server to answer 200), then ``count`` requests from
    ``concurrency`` workers (or, with ``rate_per_s``, at random times at that rate); each
    one's start (monotonic, comparable across processes on Linux) and latency."""
    import aiohttp

    bodies = [orjson.dumps({"model": MODEL, "input": t}) for t in texts]
    headers = {"Content-Type": "application/json"}
    starts: list[float] = []
    latencies: list[float] = []
    failed: dict[int, int] = {}
    # open loop: as many connections as queries in flight (a shared one would queue them here)
    connector = aiohttp.TCPConnector(limit=0 if rate_per_s else concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(i: int) -> int:
            async with http.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                await r.read()
                return r.status

        # Under a backlog a request takes up to two batches: there, the first 200 is enough
        # (the model was warmed when loaded), or warming up would eat the measured window.
        want = 1 if rate_per_s else WARMUP_REQUESTS
        warm, deadline = 0, time.monotonic() + SERVER_WAIT_S
        while warm < want:  # the server (it may still be loading), then warm
            try:
                warm += await one(warm) == 200
            except aiohttp.ClientConnectionError:
                pass
            if not warm:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not answer 200 within {SERVER_WAIT_S:.0f} s")
                await asyncio.sleep(0.1)
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        next_i = 0
        t0 = time.perf_counter()

        async def timed(i: int) -> None:
            s = time.perf_counter()
            starts.append(time.monotonic())
            status = await one(i)
            latencies.append(time.perf_counter() - s)
            if status != 200:
                failed[status] = failed.get(status, 0) + 1

        async def worker() -> None:  # closed loop: the next request once this one is answered
            nonlocal next_i
            while next_i < count and not stop.is_set():
                next_i += 1
                await timed(next_i - 1)

        async def arrivals() -> None:  # open loop: queries at random times, answered or not
            gaps = np.random.default_rng(0).exponential(1 / rate_per_s, count)
            tasks = []
            for i in range(count):
                if stop.is_set():
                    break
                tasks.append(asyncio.ensure_future(timed(i)))
                await asyncio.sleep(float(gaps[i]))
            await asyncio.gather(*tasks)

        if rate_per_s:
            await arrivals()
        else:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - t0
    return {"starts": starts, "latencies": latencies, "wall_s": wall_s, "failed": failed}


class Client:
    """A load generator in its own process: it warms up, then measures once ``go`` is set."""

    def __init__(
        self, url: str, texts: list[str], concurrency: int, count: int, rate_per_s: float = 0.0
    ) -> None:
        ctx = mp.get_context("spawn")
        self.ready, self.go, self.stop = ctx.Event(), ctx.Event(), ctx.Event()
        self._out = ctx.Queue()
        args = (
            url,
            texts,
            concurrency,
            count,
            rate_per_s,
            self.ready,
            self.go,
            self.stop,
            self._out,
        )
        self._proc = ctx.Process(target=_client_main, args=args, daemon=True)

    def spawn(self) -> None:
        self._proc.start()

    async def warm(self) -> None:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self.ready.wait, SERVER_WAIT_S + 60):
            self._proc.kill()
            raise RuntimeError("the API load generator did not warm up")

    async def result(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self._out.get, True, 3600)
        finally:
            await loop.run_in_executor(None, self._proc.join, 10)

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()


def _figures(run: dict[str, Any], window: tuple[float, float] | None = None) -> dict[str, Any]:
    """requests/s and p50/p99 of a client's run (only requests started in ``window``)."""
    if run["failed"]:
        raise RuntimeError(f"API requests failed: {run['failed']} (status: count)")
    lat = np.asarray(run["latencies"], dtype=np.float64) * 1000
    if window is not None:
        starts = np.asarray(run["starts"], dtype=np.float64)
        lat = lat[(starts >= window[0]) & (starts <= window[1])]
    n = len(lat)
    return {
        "requests": n,
        "requests_per_s": n / run["wall_s"] if run["wall_s"] > 0 else 0.0,
        "latency_p50_ms": float(np.percentile(lat, 50, method="nearest")) if n else float("nan"),
        "latency_p99_ms": float(np.percentile(lat, 99, method="nearest")) if n else float("nan"),
    }


# -- the service ---------------------------------------------------------------------------
async def _api_service(bootstrap: str, cfg_over: dict, topic: str, run: str, port: int) -> Any:
    """A started service with the API on loopback ``port``, reading ``topic``."""
    from streamer.app import Service
    from streamer.config import load_config
    from streamer.tools.bench import _kafka_over

    await create_topics(bootstrap, {topic: 4, f"{run}.out": 4, f"{run}.dlq": 1})
    cfg = load_config(
        None,
        **{
            **cfg_over,
            "kafka": {
                **_kafka_over(bootstrap),
                "group_id": f"bench-{run}",
                "input_topics": [topic],
                "output_topic": f"{run}.out",
                "dlq_topic": f"{run}.dlq",
            },
            "http": {"host": "127.0.0.1", "port": port, "api": True},
        },
    )
    service = Service(cfg)
    try:
        await service.start()
    except BaseException:
        await service.close()
        raise
    return service


async def _stop(service: Any, runner: asyncio.Future[int]) -> None:
    service.request_stop()
    await asyncio.wait({runner})
    if runner.result() != 0:
        raise RuntimeError(f"streamer exited with {runner.result()}; see the log above")


async def _idle(bootstrap: str, cfg_over: dict, texts: list[str], run: str) -> dict[str, Any]:
    """Concurrency 1 and 32 against a service whose topic stays empty."""
    port = free_port()
    service = await _api_service(bootstrap, cfg_over, f"{run}-in", run, port)
    runner = asyncio.ensure_future(service.run())
    out = {}
    try:
        for concurrency, count in ((1, min(len(texts), 300)), (32, len(texts))):
            client = Client(f"http://127.0.0.1:{port}/v1/embeddings", texts, concurrency, count)
            client.spawn()
            try:
                await client.warm()
                client.go.set()
                out[f"c{concurrency}"] = _figures(await client.result())
            finally:
                client.kill()
    finally:
        await _stop(service, runner)
    return out


async def _backlog(
    bootstrap: str, cfg_over: dict, texts: list[str], run: str, *, queries: bool
) -> dict[str, Any]:
    """``texts`` as a backlog (produced before the service starts), drained; with
    ``queries``, single queries at random times from a client that is already waiting for the
    service, so they cover the whole drain."""
    from streamer.tools.devtools import produce_texts, until_outputs

    topic = f"{run}-in"
    await create_topics(bootstrap, {topic: 4})
    await produce_texts(bootstrap, topic, texts)
    port = free_port()
    client = None
    if queries:
        client = Client(
            f"http://127.0.0.1:{port}/v1/embeddings", texts, 1, 10**6, rate_per_s=QUERY_RATE_PER_S
        )
        client.go.set()  # measure as soon as warm
        client.spawn()
    try:
        service = await _api_service(bootstrap, cfg_over, topic, run, port)
        telemetry = service.telemetry
        batch_s: list[float] = []
        inferred = telemetry.inferred

        def timed(seconds: float, model: Any) -> None:  # once per batch, on the loop
            if telemetry.first_fetch_at is not None:  # the backlog's, not the warm-up's
                batch_s.append(seconds)
            inferred(seconds, model)

        telemetry.inferred = timed
        runner = asyncio.ensure_future(service.run())
        try:
            await until_outputs(telemetry, runner, len(texts), timeout_s=3600)
            run_queries = None
            if client is not None:
                client.stop.set()
                run_queries = await client.result()  # before the service stops (no 503s)
        finally:
            await _stop(service, runner)
    finally:
        if client is not None:
            client.kill()
    rows, _ = telemetry.batch_means(MODEL)
    out: dict[str, Any] = {
        "records": telemetry.outputs()[0],
        "records_per_s": telemetry.throughput(),
        "mean_batch_rows": rows,
        "batch_p99_ms": float(np.percentile(batch_s, 99, method="nearest")) * 1000,
    }
    if run_queries is not None:
        assert telemetry.first_fetch_at is not None and telemetry.last_ack_at is not None
        window = (telemetry.first_fetch_at, telemetry.last_ack_at)
        q = _figures(run_queries, window)
        out.update(
            queries=q["requests"],
            query_rate_per_s=q["requests"] / max(1e-9, window[1] - window[0]),
            query_p50_ms=q["latency_p50_ms"],
            query_p99_ms=q["latency_p99_ms"],
            bound_ms=cfg_over["batching"]["max_wait_ms"] + 2 * out["batch_p99_ms"],
        )
    return out


async def api_bench(bootstrap: str, cfg_over: dict, texts: list[str]) -> dict[str, Any]:
    """The three runs described in the module docstring; one JSON-able dict."""
    stamp = time.strftime("%H%M%S")
    idle = await _idle(bootstrap, cfg_over, texts, f"bench-api-idle-{stamp}")
    alone = await _backlog(bootstrap, cfg_over, texts, f"bench-api-alone-{stamp}", queries=False)
    both = await _backlog(bootstrap, cfg_over, texts, f"bench-api-both-{stamp}", queries=True)
    return {
        "texts": len(texts),
        "max_wait_ms": cfg_over["batching"]["max_wait_ms"],
        "idle_c1": idle["c1"],
        "idle_c32": idle["c32"],
        "stream_alone": alone,
        "with_queries": both,
    }


# -- the table ------------------------------------------------------------------------------
def api_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    """The api section's rows in bench's COLUMNS order."""
    from streamer.tools.bench import _num, _ratio, _row

    a = r.get("api") or {}
    if not a:
        return []
    rows = []
    alone = (a.get("stream_alone") or {}).get("records_per_s")
    for c in (1, 32):
        e = a.get(f"idle_c{c}")
        if not e:
            continue
        rows.append(
            _row(
                f"api c={c}, stream idle",
                _num(e["requests_per_s"], ".1f"),
                _num(e["latency_p50_ms"]),
                _num(e["latency_p99_ms"]),
                notes=f"/v1/embeddings, one text a request, {e['requests']} requests (records/s "
                f"column: requests/s); {_ratio(e['requests_per_s'], alone) or 'n/a'} the "
                "stream's records/s",
            )
        )
    s = a.get("stream_alone")
    if s:
        rows.append(
            _row(
                "api: stream alone",
                _num(s["records_per_s"], ".1f"),
                notes=f"the same texts as a backlog, no queries, {s['mean_batch_rows']:.0f} "
                "rows/batch",
            )
        )
    q = a.get("with_queries")
    if q:
        rows.append(
            _row(
                "api: stream + queries",
                _num(q["records_per_s"], ".1f"),
                _num(q["query_p50_ms"]),
                _num(q["query_p99_ms"]),
                notes=f"p50/p99: {q['queries']} single queries at "
                f"{q['query_rate_per_s']:.1f}/s while the backlog drains; stream at "
                f"{_ratio(q['records_per_s'], alone) or 'n/a'} alone; bound max_wait_ms + 2 "
                f"batches = {q['bound_ms']:.0f} ms",
            )
        )
    return rows


def api_targets(r: dict[str, Any]) -> list[str]:
    a = r.get("api") or {}
    lines = []
    q, alone, c32 = a.get("with_queries"), a.get("stream_alone"), a.get("idle_c32")
    if q:
        lines.append(
            f"api: query p99 under a draining backlog {q['query_p99_ms']:.0f} ms ≤ max_wait_ms "
            f"+ two batch times (p99 {q['batch_p99_ms']:.0f} ms) = {q['bound_ms']:.0f} ms"
        )
    if c32 and alone and alone.get("records_per_s"):
        ratio = c32["requests_per_s"] / alone["records_per_s"]
        lines.append(
            f"api: requests/s at concurrency 32, stream idle = {ratio:.2f}× the stream's "
            "records/s on the same texts (≥ 0.8)"
        )
    return lines
