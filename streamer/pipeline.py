"""The pipeline: fetch → decode → tokenize → batch → infer → publish → commit.

Each stage is one owned task; stages are linked by small bounded queues so tokenization and
serialisation overlap inference. Any task that fails fails the pipeline (no vanishing errors).

Invariants (the reason for most of the code below):

* every fetched record is tracked before work starts and is done only when the broker acked
  its result or its DLQ copy; commits never pass an outstanding record;
* a bad record goes to the DLQ and the stream goes on;
* at most ``batching.max_in_flight`` records are held: past that, partitions are paused;
* on revoke, waiting work of the revoked partitions is dropped (not committed), running work
  finishes, then their offsets are committed — before the partitions are released;
* on stop, fetching stops, everything in flight drains, the producer is flushed, offsets are
  committed — all within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind

from streamer.batcher import Batcher, BatcherClosed
from streamer.codec import (
    TRACEPARENT,
    TRACESTATE,
    Decoder,
    dlq_headers,
    encode_result,
    header,
    result_headers,
)
from streamer.config import StreamerConfig
from streamer.consumer import Consumer
from streamer.inference import InferenceWorker, Outcome
from streamer.metrics import PartitionLag
from streamer.model import Encoded
from streamer.offsets import OffsetTracker
from streamer.publisher import Outgoing, Publisher
from streamer.records import (
    InputRecord,
    Job,
    RecordError,
    ResultTooLarge,
    TextTooLong,
    TopicPartition,
)
from streamer.registry import ModelRegistry
from streamer.telemetry import Telemetry
from streamer.tracecontext import child_traceparent

log = logging.getLogger(__name__)

_DONE = object()  # end-of-stream marker on the stage queues


class PipelineFailed(RuntimeError):
    """A stage failed in a way that must stop the service (offsets stay uncommitted)."""


@dataclass(slots=True)
class _Inferred:
    jobs: list[Job]
    outcomes: list[Outcome]
    span: Span | None = None


class _Countdown:
    """Ends a batch's spans once every one of its records is acknowledged."""

    __slots__ = ("left", "spans")

    def __init__(self, n: int, spans: list[Span]) -> None:
        self.left, self.spans = n, spans

    def tick(self) -> None:
        self.left -= 1
        if self.left == 0:
            for span in self.spans:
                span.end()


class Pipeline:
    def __init__(
        self,
        cfg: StreamerConfig,
        *,
        worker: InferenceWorker,
        registry: ModelRegistry,
        publisher: Publisher,
        telemetry: Telemetry,
    ) -> None:
        self.cfg = cfg
        self.worker = worker
        self.registry = registry
        self.publisher = publisher
        self.telemetry = telemetry
        self.tracing = telemetry.tracing
        self.tracker = OffsetTracker()
        self.decoder = Decoder(cfg.input)
        self.consumer = Consumer(
            cfg.kafka, on_revoked=self._on_revoked, on_assigned=self._on_assigned
        )
        b = cfg.batching
        self.batcher: Batcher[Job] = Batcher(
            max_batch_size=b.max_batch_size,
            max_batch_tokens=b.max_batch_tokens,
            max_wait_ms=b.max_wait_ms,
            length_of=lambda job: job.n_tokens,
            upstream_idle=self._upstream_idle,
            group_of=lambda job: job.bound,  # never mix models (or versions) in a batch
        )
        self._tokenize_q: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
        self._publish_q: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
        self._tokenizing = 0
        self._revoking: set[TopicPartition] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restore_budget: asyncio.TimerHandle | None = None
        self.joined = asyncio.Event()  # first assignment received

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Join the group (the models must already be loaded and warm) and start the stages."""
        assert self.registry.ready, "load the models before joining the group"
        self._loop = asyncio.get_running_loop()
        await self.consumer.start()
        for name, coro in (
            ("fetch", self._fetch_loop()),
            ("tokenize", self._tokenize_loop()),
            ("infer", self._infer_loop()),
            ("publish", self._publish_loop()),
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
        """Stop fetching, finish everything in flight, flush, commit. True if fully drained."""
        deadline = time.monotonic() + grace_s
        fetch = self._tasks.get("fetch")
        if fetch is not None:
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fetch
        drained = False
        if self._failure is None:
            await self._tokenize_q.put(_DONE)
            stages = [self._tasks[n] for n in ("tokenize", "infer", "publish") if n in self._tasks]
            try:
                await asyncio.wait_for(
                    asyncio.gather(*stages, self.tracker.wait_below(1)),
                    timeout=max(0.0, deadline - time.monotonic()),
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
        for name in ("tokenize", "infer", "publish", "commit"):
            task = self._tasks.get(name)
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        try:
            await asyncio.wait_for(
                self.publisher.flush(), timeout=max(0.1, deadline - time.monotonic())
            )
        except TimeoutError:
            log.warning("producer flush did not finish within the grace period")
        await self._commit()
        await self.consumer.stop()
        return drained

    # -- fetch + decode (the main loop) ---------------------------------------------------------
    def _upstream_idle(self) -> bool:
        return self._tokenize_q.empty() and self._tokenizing == 0

    async def _fetch_loop(self) -> None:
        kcfg, bcfg = self.cfg.kafka, self.cfg.batching
        keepalive_s = kcfg.max_poll_interval_ms / 3000
        while True:
            room = bcfg.max_in_flight - self.tracker.in_flight
            if room <= 0:
                if not self.consumer.paused:
                    self.consumer.pause_all()
                    log.debug("paused: %d records in flight", self.tracker.in_flight)
                try:
                    await asyncio.wait_for(
                        self.tracker.wait_below(max(1, bcfg.max_in_flight // 2)), keepalive_s
                    )
                except TimeoutError:
                    room = 0  # keep the poll interval alive below
                else:
                    continue
            elif self.consumer.paused:
                self.consumer.resume_all()
            records = await self.consumer.fetch(
                max_records=max(1, min(room, kcfg.fetch_max_records)), timeout_ms=100
            )
            if records:
                jobs = self._accept(records)
                if jobs:
                    await self._tokenize_q.put(jobs)

    def _accept(self, records: list[InputRecord]) -> list[Job]:
        """Track and decode one fetched chunk; bad records go to the DLQ right away."""
        self.telemetry.consumed(records)
        jobs: list[Job] = []
        for rec in records:
            rec.generation = self.tracker.track(rec.tp, rec.offset)
            try:
                job = self.decoder.decode(rec)
                job.bound = self.registry.route(rec)
            except RecordError as err:
                self._dead_letter(rec, err)
                continue
            self.registry.acquire(job.bound)
            jobs.append(job)
        return jobs

    # -- tokenize -----------------------------------------------------------------------------
    async def _tokenize_loop(self) -> None:
        on_too_long = self.cfg.input.on_too_long
        while True:
            chunk = await self._tokenize_q.get()
            if chunk is _DONE:
                self.batcher.close()
                return
            self._tokenizing += 1
            try:
                for group in _by_model(chunk):
                    await self._tokenize(group, on_too_long)
            finally:
                self._tokenizing -= 1
            self.batcher.poke()

    async def _tokenize(self, chunk: list[Job], on_too_long: str) -> None:
        loaded = chunk[0].bound
        t0, t0_ns = time.perf_counter(), time.time_ns()
        encs = await self.worker.tokenize(loaded.model, [j.text for j in chunk])
        self.telemetry.tokenized(time.perf_counter() - t0)
        span_ns = (t0_ns, time.time_ns())
        ready: list[Job] = []
        for job, enc in zip(chunk, encs, strict=True):
            if isinstance(enc, RecordError):
                self._release(job)
                self._dead_letter(job.record, enc)
                continue
            assert isinstance(enc, Encoded)
            if enc.truncated and on_too_long == "dlq":
                self._release(job)
                self._dead_letter(
                    job.record,
                    TextTooLong(
                        f"text is longer than model.max_length={loaded.model.max_length} "
                        f"tokens of {loaded.ref} (input.on_too_long=dlq)"
                    ),
                )
                continue
            job.input_ids, job.truncated, job.tokenize_ns = enc.ids, enc.truncated, span_ns
            if self._is_revoking(job.record):
                self._abandon(job)  # its partition is being handed over
                continue
            ready.append(job)
        self.batcher.put_many(ready)

    def _release(self, job: Job) -> None:
        """The job no longer needs its model (ran, or will not run here)."""
        if job.bound is not None:
            self.registry.release(job.bound)

    def _abandon(self, job: Job) -> None:
        self._release(job)
        rec = job.record
        self.tracker.abandon(rec.tp, rec.offset, rec.generation)

    def _is_revoking(self, rec: InputRecord) -> bool:
        if rec.tp in self._revoking:
            return True
        return self.tracker.generation(rec.tp) != rec.generation

    # -- infer --------------------------------------------------------------------------------
    async def _infer_loop(self) -> None:
        while True:
            try:
                batch = await self.batcher.next_batch()
            except BatcherClosed:
                await self._publish_q.put(_DONE)
                return
            kept = []
            for job in batch:
                if self._is_revoking(job.record):
                    self._abandon(job)
                else:
                    kept.append(job)
            batch = kept
            if not batch:
                continue
            loaded = batch[0].bound
            info = loaded.info
            ids = [j.input_ids or [] for j in batch]
            tokens = sum(len(x) for x in ids)
            padded = len(ids) * max(len(x) for x in ids)
            self.telemetry.batch([j.record for j in batch], tokens, padded, info.name)
            span = self._batch_span(batch, tokens, padded) if self.tracing.enabled else None
            inf_span = None
            if span is not None:
                inf_span = self.tracing.start_span(
                    "inference",
                    parent=span,
                    attributes={
                        "streamer.device": info.device,
                        "streamer.dtype": info.dtype,
                        "messaging.batch.message_count": len(batch),
                    },
                )
            t0 = time.perf_counter()
            try:
                outcomes = await self.worker.infer(loaded.model, ids)
            finally:
                for job in batch:
                    self._release(job)
            self.telemetry.inferred(time.perf_counter() - t0, info.name)
            if inf_span is not None:
                failed = sum(isinstance(o, RecordError) for o in outcomes)
                if failed:
                    self.tracing.fail(inf_span, "InferenceFailed", f"{failed} record(s) failed")
                inf_span.end()
            await self._publish_q.put(_Inferred(batch, outcomes, span))

    def _batch_span(self, batch: list[Job], tokens: int, padded: int) -> Span:
        """``process {topic}``: CONSUMER, linked to each record's producer context."""
        topics = sorted({j.record.topic for j in batch})
        links = []
        for job in batch:
            ctx = self.tracing.extract(job.traceparent, job.tracestate)
            if ctx is not None:
                links.append(Link(trace.get_current_span(ctx).get_span_context()))
        info = batch[0].bound.info
        attrs = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": topics[0] if len(topics) == 1 else ",".join(topics),
            "messaging.consumer.group.name": self.cfg.kafka.group_id,
            "messaging.batch.message_count": len(batch),
            "streamer.model.name": info.name,
            "streamer.model.version": info.version,
            "streamer.model.fingerprint": info.fingerprint,
            "streamer.batch.tokens": tokens,
            "streamer.batch.padded_tokens": padded,
        }
        name = f"process {topics[0]}" if len(topics) == 1 else "process"
        start = min(j.record.fetched_ns for j in batch) or None
        span = self.tracing.start_span(
            name, kind=SpanKind.CONSUMER, links=links, attributes=attrs, start_ns=start
        )
        t_start = min(j.tokenize_ns[0] for j in batch)
        t_end = max(j.tokenize_ns[1] for j in batch)
        if t_start:
            tok = self.tracing.start_span("tokenize", parent=span, start_ns=t_start)
            tok.end(end_time=t_end)
        return span

    # -- publish ------------------------------------------------------------------------------
    async def _publish_loop(self) -> None:
        while True:
            item = await self._publish_q.get()
            if item is _DONE:
                return
            countdown = None
            if item.span is not None:
                pub_span = self.tracing.start_span("publish", parent=item.span)
                countdown = _Countdown(len(item.jobs), [pub_span, item.span])
            values = await self.worker.run_cpu(
                _encode_all, item.jobs, item.outcomes, self.cfg.output.embedding_encoding
            )
            results: list[Outgoing] = []
            for job, value in zip(item.jobs, values, strict=True):
                if isinstance(value, RecordError):
                    self._dead_letter(job.record, value, countdown)
                else:
                    results.append(self._result_message(job, value, countdown))
            # one record batch per partition; each record's delivery still reported on its own
            await self.publisher.send_many(results)

    def _record_span(self, rec: InputRecord, tp: str | None, ts: str | None) -> Span | None:
        """The per-record span: a child of the record's own (producer) context."""
        if not self.tracing.sample_record():
            return None
        attrs: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": rec.topic,
            "messaging.consumer.group.name": self.cfg.kafka.group_id,
            "messaging.destination.partition.id": str(rec.partition),
            "messaging.kafka.offset": rec.offset,
        }
        if rec.key is not None:
            attrs["messaging.kafka.message.key"] = rec.key.decode("utf-8", "replace")
        return self.tracing.start_span(
            f"process {rec.topic}",
            kind=SpanKind.CONSUMER,
            parent=self.tracing.extract(tp, ts),
            attributes=attrs,
            start_ns=rec.fetched_ns or None,
        )

    def _result_message(self, job: Job, value: bytes, countdown: _Countdown | None) -> Outgoing:
        rec = job.record
        span = self._record_span(rec, job.traceparent, job.tracestate)
        if span is not None:
            traceparent, tracestate = self.tracing.inject(span)
        else:
            traceparent, tracestate = child_traceparent(job.traceparent), job.tracestate
        headers = result_headers(traceparent, tracestate)
        delivered = self._acked(
            rec, span, countdown, lambda: self.telemetry.published(rec, job.bound.info.name)
        )

        def rejected(exc: BaseException) -> None:
            if span is not None:
                span.end()
            self._dead_letter(
                rec,
                ResultTooLarge(
                    f"result of {len(value)} bytes was rejected by the broker "
                    f"({type(exc).__name__}); raise the output topic's max.message.bytes "
                    "and kafka.max_request_size"
                ),
                countdown,
            )

        return Outgoing(self.cfg.kafka.output_topic, rec.key, value, headers, delivered, rejected)

    def _acked(
        self,
        rec: InputRecord,
        span: Span | None,
        countdown: _Countdown | None,
        report: Callable[[], None],
    ) -> Callable[[], None]:
        """The delivery callback: the record is done (committable), reported, spans ended."""

        def delivered() -> None:
            if self.tracker.done(rec.tp, rec.offset, rec.generation):
                report()
                self._commit_wanted.set()
            if span is not None:
                span.end()
            if countdown is not None:
                countdown.tick()

        return delivered

    def _dead_letter(
        self, rec: InputRecord, err: RecordError, countdown: _Countdown | None = None
    ) -> None:
        span = None
        if self.tracing.enabled:
            tp, ts = header(rec.headers, TRACEPARENT), header(rec.headers, TRACESTATE)
            span = self._record_span(
                rec,
                tp.decode("ascii", "replace") if tp else None,
                ts.decode("ascii", "replace") if ts else None,
            )
            if span is not None:
                self.tracing.fail(span, err.error_class, err.message)
                span.set_attribute("streamer.error.stage", err.stage)
        with trace.use_span(span, end_on_exit=False) if span else contextlib.nullcontext():
            log.info(
                "dead-lettering %s: %s (%s, stage %s)",
                rec.where(),
                err.message,
                err.error_class,
                err.stage,
            )

        delivered = self._acked(
            rec, span, countdown, lambda: self.telemetry.dead_lettered(rec, err)
        )

        def rejected(exc: BaseException) -> None:
            # Even the DLQ refuses it (its limits are below the input's): keep the reason and
            # headers, drop the value, so the record is accounted for and the stream goes on.
            log.error("DLQ rejected %s (%s); sending it without its value", rec.where(), exc)
            headers = [*dlq_headers(rec, err), ("streamer.error.value_dropped", b"true")]
            self.publisher.send_soon(
                Outgoing(
                    self.cfg.kafka.dlq_topic,
                    rec.key,
                    None,
                    headers,
                    delivered,
                    self._reject_fatal,
                )
            )

        self.publisher.send_soon(
            Outgoing(
                self.cfg.kafka.dlq_topic,
                rec.key,
                rec.value,
                dlq_headers(rec, err),
                delivered,
                rejected,
            )
        )

    def _reject_fatal(self, exc: BaseException) -> None:
        self.fail(PipelineFailed(f"the DLQ rejected even an empty record: {exc}"), exc)

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
        offsets = self.tracker.committable()
        if offsets and await self.consumer.commit(offsets):
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
        try:
            revoked = set(tps)
            waiting = self.batcher.remove_if(lambda j: j.record.tp in revoked)
            for job in waiting:  # never started: left for the next owner, not committed
                self._abandon(job)
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
            dropped = self.tracker.forget(tps)
            log.info(
                "revoked %s (%d unfinished records left to the next owner)",
                ", ".join(map(str, tps)),
                dropped,
            )
        finally:
            self._revoking.difference_update(tps)


def _by_model(jobs: list[Job]) -> list[list[Job]]:
    groups: dict[int, list[Job]] = {}
    for job in jobs:
        groups.setdefault(id(job.bound), []).append(job)
    return list(groups.values())


def _encode_all(jobs: list[Job], outcomes: list[Outcome], encoding: str) -> list[Any]:
    """Serialise a batch's results (runs on the CPU worker thread, off the event loop)."""
    out: list[Any] = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        if isinstance(outcome, RecordError):
            out.append(outcome)
        else:
            out.append(encode_result(job, outcome, job.bound.info, encoding))  # type: ignore[arg-type]
    return out
