"""The pipeline: fetch → decode → route → tokenize → batch → infer → encode → publish → commit.

A record's path, one direction, batch-native all the way: what the event loop handles is a
fetched *chunk* (one partition's records from one fetch), a *block* of tokenized rows, a batch,
an outgoing record batch per partition — never a record. Per record work happens on the stage
threads (:mod:`~streamer.stream.prepare`, the model, :mod:`~streamer.stream.encode`) or in numpy.

    fetch (loop)      getmany → record batches, unparsed → chunks tracked by the checkpoint
    prepare (thread)  read the records out, decode, route, tokenize a whole fetch → Rows blocks
                      + dead-letter batches
    batch (loop)      Batcher: size, token budget, time, length grouping (numpy)
    infer (thread)    the model, bisecting failures → one output matrix
    encode (thread)   results → one aiokafka record batch per output partition
    publish (loop)    send_batch; one delivery future per record batch
    commit (loop)     per chunk counts → committable offsets → commit

Each stage is one owned task; stages are linked by small bounded queues so preparing and
encoding overlap inference. Any task that fails fails the pipeline (no vanishing errors).

Invariants (the reason for most of the code below):

* every fetched chunk is tracked before work starts and is done only when the broker acked
  every one of its results or DLQ records; commits never pass an outstanding record;
* a bad record goes to the DLQ and the stream goes on;
* at most ``batching.max_in_flight`` records are held (plus at most one record batch: a fetch
  takes the broker's batches whole): past that, partitions are paused;
* on revoke, waiting work of the revoked partitions is dropped (not committed), running work
  finishes, then their offsets are committed — before the partitions are released;
* on stop, fetching stops, fetches still queued for the prepare stage are given up (whole,
  uncommitted), everything prepared drains, the producer is flushed, offsets are committed —
  every step bounded by the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import numpy as np

from streamer.config import StreamerConfig
from streamer.kafka.checkpoint import OffsetTracker
from streamer.kafka.consumer import Consumer
from streamer.kafka.publisher import OutBatch, Partitions, Publisher
from streamer.models.registry import ModelRegistry
from streamer.models.worker import InferenceWorker, Inferred
from streamer.observability.metrics import PartitionLag
from streamer.observability.telemetry import Telemetry
from streamer.serving.requests import ApiRequest, answer_requests, started
from streamer.stream.acks import AckReports
from streamer.stream.batcher import Batcher, BatcherClosed, Rows
from streamer.stream.breaker import Breaker
from streamer.stream.encode import Encoder
from streamer.stream.outputs import Destinations, Outputs
from streamer.stream.prepare import Preparer
from streamer.stream.records import Chunk, ResultTooLarge, TopicPartition
from streamer.stream.spans import batch_span, send_span

log = logging.getLogger(__name__)

_DONE = object()  # end-of-stream marker on the stage queues


class PipelineFailed(RuntimeError):
    """A stage failed in a way that must stop the service (offsets stay uncommitted)."""


class BreakerTripped(PipelineFailed):
    """Most records failed for one non-input reason (see :mod:`streamer.stream.breaker`)."""


class Pipeline:
    def __init__(
        self,
        cfg: StreamerConfig,
        *,
        worker: InferenceWorker,
        registry: ModelRegistry,
        telemetry: Telemetry,
    ) -> None:
        self.cfg = cfg
        self.worker = worker
        self.registry = registry
        self.telemetry = telemetry
        self.tracing = telemetry.tracing
        self.tracker = OffsetTracker()
        self.consumer = Consumer(
            cfg.kafka, on_revoked=self._on_revoked, on_assigned=self._on_assigned
        )
        self.publisher = Publisher(
            cfg.kafka,
            on_acked=self._acked,
            on_rejected=self._rejected,
            on_fatal=self._fatal,
            events=telemetry,
        )
        b = cfg.batching
        self.batcher = Batcher(
            max_batch_size=b.max_batch_size,
            max_batch_tokens=b.max_batch_tokens,
            max_wait_ms=b.max_wait_ms,
            upstream_idle=self._upstream_idle,
            ordered=b.order == "partition",
        )
        self.breaker = Breaker(
            cfg.breaker.window_records, cfg.breaker.failure_ratio, cfg.breaker.enabled
        )
        telemetry.watch(consumer=self.consumer, publisher=self.publisher, breaker=self.breaker)
        self._prepare = Preparer(cfg, registry, self.tracing)
        self._encode = Encoder(cfg, self.tracing)
        self._prepare_q: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
        self._encode_q: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
        self._preparing = 0
        # acknowledgements' metrics: reported per 100 ms, on the encode thread
        self._acks = AckReports(telemetry, worker.on_encode_thread)
        telemetry.buffered(self._acks.flush)
        self._revoking: set[TopicPartition] = set()
        self._revocations = 0  # bumped by every revoke: rows prepared before one are checked
        self._dests: dict[bool, tuple[int, Destinations]] = {}  # by results: (updates seen, ...)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restore_budget: asyncio.TimerHandle | None = None
        self.joined = asyncio.Event()  # first assignment received

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Join the group (the models must already be loaded and warm) and start the stages.
        The publisher must be started (``publisher.start()``) before."""
        assert self.registry.ready, "load the models before joining the group"
        # HTTP queries' batches take backlog rows along only where that is free: on a GPU a
        # batch's time hardly grows with its rows; on a CPU the query would wait for them
        self.batcher.priority_fill = any(x.info.device == "cuda" for x in self.registry.loaded())
        self._loop = asyncio.get_running_loop()
        await self.consumer.start()
        for name, coro in (
            ("fetch", self._fetch_loop()),
            ("prepare", self._prepare_loop()),
            ("infer", self._infer_loop()),
            ("encode", self._encode_loop()),
            ("commit", self._commit_loop()),
        ):
            self._own(name, coro)

    def _own(self, name: str, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"streamer-{name}")
        task.add_done_callback(lambda t, n=name: self._task_done(n, t))
        self._tasks[name] = task

    def _task_done(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.fail(PipelineFailed(f"stage '{name}' failed: {type(exc).__name__}: {exc}"), exc)

    def fail(self, exc: BaseException, cause: BaseException | None = None) -> None:
        if self._failure is None:
            if cause is not None:
                exc.__cause__ = cause
            self._failure = exc
            log.error("%s", exc, exc_info=cause or exc)
        self._failed.set()

    def _fatal(self, exc: BaseException) -> None:
        self.fail(RuntimeError(f"publishing failed: {type(exc).__name__}: {exc}"), exc)

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def partition_lag(self) -> list[PartitionLag]:
        """Fetch high watermark minus committed offset, per assigned partition."""
        out = []
        for tp in self.tracker.partitions():
            high = self.consumer.highwater(tp)
            committed = self.tracker.committed(tp)
            if high is not None and committed is not None:
                out.append(PartitionLag(tp.topic, tp.partition, max(0, high - committed)))
        return out

    async def wait_failed(self) -> BaseException:
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    async def drain_and_stop(self, grace_s: float) -> bool:
        """Stop fetching, finish everything in flight, flush, commit. True if fully drained.

        Every step is bounded by what is left of ``grace_s``: a broker that does not answer
        costs the records since the last commit (processed again after a restart), never a
        shutdown that outlives the pod's termination grace period.
        """
        deadline = time.monotonic() + grace_s

        def left(floor: float = 0.0) -> float:
            return max(floor, deadline - time.monotonic())

        fetch = self._tasks.get("fetch")
        if fetch is not None:
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fetch
        self._abandon_queued()
        drained = False
        if self._failure is None:
            await self._prepare_q.put(_DONE)  # the queue was just emptied: never blocks
            stages = [self._tasks[n] for n in ("prepare", "infer", "encode") if n in self._tasks]
            try:
                await asyncio.wait_for(
                    asyncio.gather(*stages, self.tracker.wait_below(1)), timeout=left()
                )
                drained = True
            except TimeoutError:
                log.warning(
                    "shutdown grace period ran out with %d records in flight; they stay "
                    "uncommitted and will be processed again",
                    self.tracker.in_flight,
                )
            except Exception:  # a stage failed while draining: its error is in _failure
                pass
        for name in ("prepare", "infer", "encode", "commit"):
            task = self._tasks.get(name)
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._bounded(self.publisher.flush(), left(0.1), "flushing the producer")
        await self._bounded(self._commit(), left(0.1), "the final commit")
        await self._bounded(self.consumer.stop(), left(1.0), "leaving the group")
        self._acks.flush()
        return drained

    def _abandon_queued(self) -> None:
        """Fetches still queued for the prepare stage are given up at once — whole chunks, none
        of their records started, left uncommitted behind everything older, so the next owner
        (or this one after a restart) processes them once — instead of holding the drain while
        they are decoded and tokenized. What was already prepared drains and commits."""
        while True:
            try:
                item = self._prepare_q.get_nowait()
            except asyncio.QueueEmpty:
                return
            if item is _DONE:
                continue
            for chunk in item:
                self.tracker.abandon(chunk, chunk.remaining)

    async def _bounded(self, step: Awaitable[Any], timeout_s: float, what: str) -> None:
        try:
            await asyncio.wait_for(step, timeout=timeout_s)
        except TimeoutError:
            log.warning("%s did not finish within the shutdown grace period; going on", what)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are cancelled: not the step's own error
            # aiokafka's consumer.stop() can surface the cancellation of its own fetch tasks
            log.warning("%s was cancelled inside the client during shutdown; going on", what)
        except Exception as exc:
            log.warning("%s failed during shutdown: %s: %s", what, type(exc).__name__, exc)

    # -- fetch (the main loop) ------------------------------------------------------------------
    def _upstream_idle(self) -> bool:
        return self._prepare_q.empty() and self._preparing == 0

    async def _fetch_loop(self) -> None:
        kcfg, bcfg = self.cfg.kafka, self.cfg.batching
        keepalive_s = kcfg.max_poll_interval_ms / 3000
        tracker, consumer = self.tracker, self.consumer
        while True:
            # held, not just in flight: finished records waiting behind an unfinished one (a
            # stuck send) count too, so a stuck record cannot grow the tracker without bound
            room = bcfg.max_in_flight - tracker.held
            if room <= 0:
                if not consumer.paused:
                    consumer.pause_all()
                    log.debug("paused: %d records held", tracker.held)
                try:
                    await asyncio.wait_for(
                        tracker.wait_held_below(max(1, bcfg.max_in_flight // 2)), keepalive_s
                    )
                except TimeoutError:
                    room = 0  # keep the poll interval alive below
                else:
                    continue
            elif consumer.paused:
                consumer.resume_all()
            fetched = await consumer.fetch(
                max_records=max(1, min(room, kcfg.fetch_max_records)), timeout_ms=100
            )
            if not fetched:
                continue
            now, now_ns = time.monotonic(), time.time_ns()
            chunks = [tracker.track(tp, raw, now, now_ns) for tp, raw in fetched.items()]
            topics: dict[str, int] = {}
            for c in chunks:
                topics[c.tp.topic] = topics.get(c.tp.topic, 0) + c.count
            self.telemetry.fetched(topics, now)
            try:
                await self._prepare_q.put(chunks)
            except asyncio.CancelledError:
                # the drain cancelled us while the queue was full: these were tracked but will
                # never be prepared, so give them up now (uncommitted) or the drain would wait
                # for them until the grace period ran out
                for chunk in chunks:
                    self.tracker.abandon(chunk, chunk.remaining)
                raise

    async def _destinations(self, results: bool) -> Destinations:
        """Where this stage call's outputs go: the producer's metadata, looked up again only
        after it changed (twice per batch otherwise, ~0.5 µs of loop time per record)."""
        pub = self.publisher
        cached = self._dests.get(results)
        if cached is not None and cached[0] == pub.metadata_updates:
            return cached[1]
        kcfg = self.cfg.kafka
        seen = pub.metadata_updates  # before the lookups: an update while they wait is missed
        dest = Destinations(
            await pub.partitions(kcfg.output_topic) if results else None,
            await pub.partitions(kcfg.dlq_topic),
            kcfg.max_request_size,
            pub.builder_factory(),
            pub.prebuild,
        )
        self._dests[results] = (seen, dest)  # ... by this one, and looked up again next time
        return dest

    # -- decode, route, tokenize ----------------------------------------------------------------
    async def _prepare_loop(self) -> None:
        while True:
            chunks = await self._prepare_q.get()
            if chunks is _DONE:
                self.batcher.close()
                return
            self._preparing += 1
            try:
                await self._prepare_chunks(chunks)
            finally:
                self._preparing -= 1
            self.batcher.poke()

    async def _prepare_chunks(self, chunks: list[Any]) -> None:
        dest = await self._destinations(results=False)
        revocations = self._revocations
        self.registry.hold()  # routing happens off the loop: no version is released meanwhile
        try:
            prepared = await self.worker.run_prepare(self._prepare, chunks, dest)
            for rows in prepared.rows:
                self.registry.acquire(rows.bound, len(rows))
        finally:
            self.registry.unhold()
        self.telemetry.tokenized(prepared.tokenize_s)
        for chunk, n in prepared.recounted.items():  # compacted batches: fewer than counted
            if self.tracker.recount(chunk, n):
                self._commit_wanted.set()
        for chunk, n in prepared.skipped.items():  # tombstones skipped: done, nothing to send
            if self.tracker.done(chunk, n):
                self._commit_wanted.set()
        for out in prepared.dead:
            await self._send(out, None)
        for rows in prepared.rows:
            if revocations != self._revocations or self._revoking:
                rows = self._without_revoked(rows)
            self.batcher.put(rows)

    def _without_revoked(self, rows: Rows) -> Rows:
        """Rows of partitions being (or already) revoked are abandoned: the next owner has them.
        HTTP requests' rows (no partition) always stay."""
        chunks = rows.chunks.tolist()
        stale = {
            c
            for c in set(chunks)
            if isinstance(c, Chunk) and (c.tp in self._revoking or not self.tracker.current(c))
        }
        if not stale:
            return rows
        mask = np.fromiter((c in stale for c in chunks), bool, len(chunks))
        self._abandon(rows.take(mask))
        return rows.take(~mask)

    def _abandon(self, rows: Rows) -> None:
        if not len(rows):
            return
        for chunk, n in Counter(rows.chunks.tolist()).items():
            self.tracker.abandon(chunk, n)
        self.registry.release(rows.bound, len(rows))

    # -- infer --------------------------------------------------------------------------------
    async def _infer_loop(self) -> None:
        while True:
            try:
                batch = await self.batcher.next_batch()
            except BatcherClosed:
                await self._encode_q.put(_DONE)
                return
            if self._revoking:
                batch = self._without_revoked(batch)
                if not len(batch):
                    continue
            await self._infer(batch)

    async def _infer(self, batch: Rows) -> None:
        loaded = batch.bound
        info = loaded.info
        tokens = batch.tokens
        padded = len(batch) * int(batch.lengths.max())
        now = time.monotonic()
        if isinstance(batch.chunks[0], ApiRequest):  # HTTP requests' rows lead their batch
            for wait in started(batch, now):
                self.telemetry.api_queue_wait(wait)
        spans: list[Any] = []
        inf_span = None
        if self.tracing.enabled:
            span = batch_span(self.tracing, self.cfg.kafka.group_id, batch, tokens, padded, info)
            inf_span = self.tracing.start_span(
                "inference",
                parent=span,
                attributes={
                    "streamer.device": info.device,
                    "streamer.dtype": info.dtype,
                    "messaging.batch.message_count": len(batch),
                },
            )
            spans = [self.tracing.start_span("publish", parent=span), span]
        t0 = time.perf_counter()
        try:
            inferred = await self._run_model(loaded.model, batch)
        except BaseException:
            self.registry.release(loaded, len(batch))
            raise
        seconds = time.perf_counter() - t0
        # the padding the forwards really did (less than rows × longest where a CPU model ran
        # rows of like length together); when every row failed, the batch as formed
        padded = inferred.padded_tokens or padded
        # the batch's metrics are observed on the encode thread (prometheus_client locks):
        # a few µs per batch of the loop's time each, which on a GPU host is its ceiling
        report = (seconds, tokens, padded, now)
        if inf_span is not None:
            inf_span.set_attribute("streamer.batch.padded_tokens", padded)
            if inferred.failures:
                n = len(inferred.failures)
                self.tracing.fail(inf_span, "InferenceFailed", f"{n} record(s) failed")
            inf_span.end()
        await self._encode_q.put((batch, inferred, spans, report))

    async def _run_model(self, model: Any, batch: Rows) -> Inferred:
        """The model on the batch's rows; tombstones (rows of no tokens, see
        :class:`~streamer.stream.batcher.Rows`) skip it and get an empty output row."""
        tomb = batch.lengths == 0
        if not tomb.any():
            return await self.worker.infer(model, batch.ids.tolist())
        live = np.flatnonzero(~tomb)
        if not len(live):
            return Inferred(None, {})
        inferred = await self.worker.infer(model, batch.ids[live].tolist())
        outputs = None
        if inferred.outputs is not None:
            outputs = np.zeros((len(batch), *inferred.outputs.shape[1:]), inferred.outputs.dtype)
            outputs[live] = inferred.outputs
        failures = {int(live[k]): err for k, err in inferred.failures.items()}
        return Inferred(outputs, failures, inferred.padded_tokens)

    # -- encode + publish -----------------------------------------------------------------------
    async def _encode_loop(self) -> None:
        while True:
            item = await self._encode_q.get()
            if item is _DONE:
                return
            batch, inferred, spans, report = item
            try:
                dest = await self._destinations(results=True)
                outs = await self.worker.run_encode(
                    self._encode_batch, batch, inferred, dest, spans, report
                )
            finally:  # the model (its labels) is not needed past here
                self.registry.release(batch.bound, len(batch))
            if not outs:  # HTTP requests only: their answers went back, nothing to publish
                for span in spans:
                    span.end()
            parent = spans[0] if spans else None  # the batch's publish span
            for out in outs:
                out.version = batch.bound.info.version  # the metrics' `version` label
                await self._send(out, parent)

    def _encode_batch(
        self,
        batch: Rows,
        inferred: Inferred,
        dest: Destinations,
        spans: list[Any],
        report: tuple[float, int, int, float],
    ) -> list[OutBatch]:
        """On the encode thread: the batch's metrics; HTTP requests' rows get their answers
        (:mod:`streamer.serving.requests`); the stream's rows become record batches."""
        seconds, tokens, padded, formed_at = report
        info = batch.bound.info
        self.telemetry.inferred(seconds, info)
        self.telemetry.batch(len(batch), tokens, padded, info, formed_at - batch.fetched_at)
        if self.cfg.http.api:  # a look at each row's chunk, on this thread: µs per batch
            batch, inferred = answer_requests(batch, inferred)
            if not len(batch):
                return []
        return self._encode(batch, inferred, dest, spans)

    async def _send(self, out: OutBatch, parent: Any) -> None:
        if self.tracing.enabled:  # a PRODUCER span per record batch, ended on its ack
            out.spans.append(send_span(self.tracing, out, parent))
        await self.publisher.send(out)

    def _acked(self, out: OutBatch) -> None:
        """A record batch is acknowledged: its records are done (committable) and reported."""
        done = self.tracker.done
        moved = False
        for chunk, n in out.counts.items():
            moved |= done(chunk, n)
        if out.dead_letters:
            assert out.errors is not None
            self.breaker.failed(out.errors)
            if self.breaker.tripped is not None:
                self.fail(BreakerTripped(self.breaker.tripped))
        else:
            self.breaker.ok(len(out))
        for span in out.spans:
            span.end()
        if moved:
            self._commit_wanted.set()
        out.acked_at = time.monotonic()
        self._acks.add(out)  # its metrics, reported with others' (see streamer.stream.acks)
        self.telemetry.acked(len(out))

    def _rejected(self, out: OutBatch, exc: BaseException) -> None:
        """The broker refused a single record as too large: a result goes to the DLQ; a dead
        letter goes again without its value; a value-less dead letter refused is fatal."""
        chunk, i = out.chunks[0], out.rows[0]
        known = self._dests.get(True)  # the results' destinations last looked up
        dlq = known[1].dlq if known else Partitions(out.topic, [out.partition], [])
        fallback = Outputs(Destinations(None, dlq, self.cfg.kafka.max_request_size))
        if not out.dead_letters:
            value = out.values[0] or b""
            fallback.dead_letter(
                chunk,
                i,
                ResultTooLarge(
                    f"result of {len(value)} bytes was rejected by the broker "
                    f"({type(exc).__name__}); raise the output topic's max.message.bytes "
                    "and kafka.max_request_size"
                ),
            )
        elif out.values[0] is not None:
            # Even the DLQ refuses it (its limits are below the input's): keep the reason and
            # headers, drop the value, so the record is accounted for and the stream goes on.
            log.error("DLQ rejected %s (%s); sending it without its value", chunk.where(i), exc)
            assert out.errors is not None
            fallback.dead_letter(chunk, i, out.errors[0], drop_value=True)
        elif out.keys[0] is not None or any(
            not k.startswith("streamer.") for k, _ in out.headers[0]
        ):
            # Its key or headers are what is too large: the reason and the source alone.
            log.error("DLQ rejected %s (%s); sending only its reason", chunk.where(i), exc)
            assert out.errors is not None
            fallback.dead_letter(chunk, i, out.errors[0], strip=True)
        else:
            self.fail(PipelineFailed(f"the DLQ rejected even an empty record: {exc}"), exc)
            return
        for again in fallback.batches():
            again.spans = out.spans
            self.publisher.send_soon(again)

    # -- commit -------------------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        interval = self.cfg.kafka.commit_interval_ms / 1000
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            await self._commit()
            if interval:
                await asyncio.sleep(interval)  # rate limit: at most one commit per interval

    async def _commit(self) -> None:
        async with self._commit_lock:  # an older snapshot never lands after a newer one
            offsets = self.tracker.committable()
            if offsets and await self.telemetry.commit(self.consumer.commit(offsets)):
                self.tracker.mark_committed(offsets)

    # -- memory ---------------------------------------------------------------------------------
    def on_oom(self, padded_tokens: int) -> None:
        """Called on the inference thread when a batch ran out of (CUDA) memory."""
        assert self._loop is not None, "start() first"
        self._loop.call_soon_threadsafe(self._lower_budget, padded_tokens)

    def _lower_budget(self, padded_tokens: int) -> None:
        b, cfg = self.batcher, self.cfg.batching
        lowered = max(2, min(b.max_batch_tokens, padded_tokens) // 2)
        if lowered < b.max_batch_tokens:
            b.max_batch_tokens = lowered
            log.warning(
                "out of memory on a batch of %d padded tokens: token budget lowered to %d for "
                "%.0fs (batching.max_batch_tokens=%d)",
                padded_tokens,
                lowered,
                cfg.oom_cooldown_s,
                cfg.max_batch_tokens,
            )
        self.telemetry.out_of_memory(b.max_batch_tokens)
        if self._restore_budget is not None:
            self._restore_budget.cancel()
        assert self._loop is not None
        self._restore_budget = self._loop.call_later(cfg.oom_cooldown_s, self._raise_budget)

    def _raise_budget(self) -> None:
        self._restore_budget = None
        self.batcher.max_batch_tokens = self.cfg.batching.max_batch_tokens
        self.telemetry.out_of_memory(None, self.batcher.max_batch_tokens)
        log.info("token budget back to %d", self.batcher.max_batch_tokens)

    # -- rebalance ------------------------------------------------------------------------------
    async def _on_assigned(self, tps: list[TopicPartition]) -> None:
        self.telemetry.rebalanced()
        self.tracker.assign(tps)
        try:  # seed lag accounting with what the group has committed so far
            self.tracker.mark_committed(await self.consumer.committed_offsets(tps))
        except Exception as exc:  # only metrics depend on it
            log.warning("could not read committed offsets for lag: %s", exc)
        self.consumer.paused = False  # a new assignment starts unpaused
        log.info("assigned %s", ", ".join(map(str, tps)) or "nothing")
        self.joined.set()

    async def _on_revoked(self, tps: list[TopicPartition]) -> None:
        if not tps:
            return
        self._revoking.update(tps)
        self._revocations += 1
        dropped = 0
        try:
            revoked = set(tps)
            for rows in self.batcher.remove_if(lambda c: c.tp in revoked):
                self._abandon(rows)  # never started: left for the next owner, not committed
            timeout = self.cfg.runtime.shutdown_grace_s
            try:
                await asyncio.wait_for(self.tracker.wait_below(1, tps), timeout)
            except TimeoutError:
                log.warning(
                    "revoke: %d records of %s still running after %.0fs; left uncommitted",
                    self.tracker.outstanding(tps),
                    ", ".join(map(str, tps)),
                    timeout,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.publisher.flush(), timeout)
            await self._commit()
        finally:
            dropped = self.tracker.forget(tps)  # even when the commit raised
            self._revoking.difference_update(tps)
        log.info(
            "revoked %s (%d unfinished records left to the next owner)",
            ", ".join(map(str, tps)),
            dropped,
        )
