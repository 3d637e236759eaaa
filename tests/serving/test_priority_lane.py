"""The priority lane without a broker: the batcher's priority rows and the encode thread's
hand-over of request rows (deterministic: an injected clock, waits of an hour)."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import orjson
from support import Msg

from streamer.models.worker import Inferred
from streamer.serving.requests import Answer, ApiRequest, answer_requests, started
from streamer.stream.batcher import Batcher, BatcherClosed, Rows, fill
from streamer.stream.records import Chunk, InferenceFailed, TopicPartition

HOUR_MS = 3_600_000.0
_offsets = itertools.count()


class Model:
    """Stands in for a loaded model version: rows are grouped by its identity."""


A, B = Model(), Model()


def block(lengths: list[int], bound: object = A, source: object | None = None) -> Rows:
    """Rows of these token counts from one Kafka chunk (or from ``source``, e.g. a request)."""
    n = len(lengths)
    if source is None:
        source = Chunk(TopicPartition("in", 0), 1, [Msg(next(_offsets)) for _ in range(n)], 0.0)
    ids = np.empty(n, dtype=object)
    ids[:] = [[7] * length for length in lengths]
    return Rows(
        bound,
        np.full(n, source, dtype=object),
        np.arange(n, dtype=np.int64),
        ids,
        np.array(lengths, dtype=np.int64),
        np.array([f"r{next(_offsets)}" for _ in range(n)], dtype=object),
        np.full(n, None, dtype=object),
        np.zeros(n),
        np.zeros((n, 2), np.int64),
        np.zeros(n),
    )


def request(n: int, loop: asyncio.AbstractEventLoop, render=None) -> ApiRequest:
    req = ApiRequest(
        n,
        render or (lambda out: orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)),
        loop,
        loop.create_future(),
        fetched_at=0.0,
        fetched_ns=0,
    )
    return req


def make(**kw) -> Batcher:
    args: dict = dict(max_batch_size=4, max_batch_tokens=10_000, max_wait_ms=HOUR_MS)
    args.update(kw)
    return Batcher(**args)


def is_request(batch: Rows) -> list[bool]:
    return [isinstance(c, ApiRequest) for c in batch.chunks.tolist()]


async def test_priority_rows_go_first_filled_with_the_oldest_stream_rows() -> None:
    loop = asyncio.get_running_loop()
    b = make(ordered=True, priority_fill=True)  # as on a GPU
    stream = block([3, 3, 3, 3, 3, 3, 3, 3, 3, 3])  # two and a half batches waiting
    b.put(stream)
    req = request(1, loop)
    b.put(block([5], source=req), priority=True)
    assert b.pending_priority == 1 and len(b) == 11
    first = await b.next_batch()
    assert is_request(first) == [True, False, False, False]  # the query, then 3 stream rows
    assert first.record_ids.tolist()[1:] == stream.record_ids.tolist()[:3]  # oldest, in order
    rest = []
    b.close()  # the rest flushes without waiting
    while len(b):
        rest += (await b.next_batch()).record_ids.tolist()
    assert rest == stream.record_ids.tolist()[3:]  # the stream's order is kept


async def test_without_fill_a_query_runs_alone_ahead_of_the_backlog() -> None:
    """As on a CPU: the query's batch holds the query only; the stream's order is kept."""
    loop = asyncio.get_running_loop()
    b = make(ordered=True, priority_fill=False)
    stream = block([3] * 6)
    b.put(stream)
    b.put(block([5, 5], source=request(2, loop)), priority=True)
    assert is_request(await b.next_batch()) == [True, True]
    b.close()
    rest = []
    while len(b):
        rest += (await b.next_batch()).record_ids.tolist()
    assert rest == stream.record_ids.tolist()


async def test_priority_rows_are_released_at_once() -> None:
    """No size reached, upstream busy, an hour to wait: a query still goes now."""
    loop = asyncio.get_running_loop()
    b = make(upstream_idle=lambda: False)
    b.put(block([2]))
    b.put(block([2], source=request(1, loop)), priority=True)
    batch = await asyncio.wait_for(b.next_batch(), 5)
    assert is_request(batch) == [True, False]  # filled (the default)


async def test_the_fill_respects_the_token_budget_and_never_mixes_versions() -> None:
    loop = asyncio.get_running_loop()
    b = make(max_batch_size=8, max_batch_tokens=40)
    b.put(block([4, 4, 4], bound=B))  # another version: never in the query's batch
    b.put(block([10, 10, 10, 10]))
    b.put(block([6, 6], source=request(2, loop)), priority=True)
    batch = await b.next_batch()
    assert batch.bound is A
    assert is_request(batch) == [True, True, False, False]  # 4 rows x 10 wide = 40 tokens
    assert len(batch) * int(batch.lengths.max()) <= 40
    assert fill(np.array([6, 6]), np.array([10, 10, 10, 10]), b) == 2


async def test_the_longest_waiting_request_goes_first_and_large_ones_span_batches() -> None:
    loop = asyncio.get_running_loop()
    clock = iter(itertools.count(100.0))
    b = make(clock=lambda: next(clock))
    big, small = request(6, loop), request(1, loop)
    b.put(block([2] * 6, bound=B, source=big), priority=True)
    b.put(block([2], source=small), priority=True)
    batches = [await b.next_batch() for _ in range(3)]
    assert [len(x) for x in batches] == [4, 2, 1]
    assert [x.bound for x in batches] == [B, B, A]


async def test_revocation_and_close_leave_priority_rows_alone() -> None:
    loop = asyncio.get_running_loop()
    b = make()
    stream = block([2, 2])
    b.put(stream)
    b.put(block([2], source=request(1, loop)), priority=True)
    gone = b.remove_if(lambda c: c.tp.partition == 0)  # asked about Kafka chunks only
    assert [len(x) for x in gone] == [2]
    b.close()
    assert is_request(await b.next_batch()) == [True]
    try:
        await b.next_batch()
        raise AssertionError("closed and empty: must raise")
    except BatcherClosed:
        pass


async def test_request_rows_are_answered_and_the_rest_renumbered() -> None:
    loop = asyncio.get_running_loop()
    req = request(3, loop)
    first = block([2, 2], source=req)  # the request's rows 0 and 1 ...
    first.index[:] = [2, 0]
    mixed = Rows.concat([first, block([3, 3, 3])])
    outputs = np.arange(10, dtype=np.float32).reshape(5, 2)
    failed = InferenceFailed("bad row")
    rest, inferred = answer_requests(mixed, Inferred(outputs, {3: failed}))
    assert len(rest) == 3 and not any(is_request(rest))
    assert inferred.outputs.tolist() == outputs[2:].tolist()
    assert inferred.failures == {1: failed}  # stream row 3 of the batch is row 1 of the rest
    assert req.remaining == 1 and not req.future.done()
    last = block([2], source=req)
    last.index[:] = [1]
    rest, _ = answer_requests(last, Inferred(np.array([[7.0, 7.0]], np.float32), {}))
    assert not len(rest)
    answer: Answer = await asyncio.wait_for(req.future, 5)  # set from "the encode thread"
    assert orjson.loads(answer.body) == [[2.0, 3.0], [7.0, 7.0], [0.0, 1.0]]  # input order


async def test_a_failed_row_fails_its_request_with_the_reason() -> None:
    loop = asyncio.get_running_loop()
    req = request(2, loop)
    rows = block([2, 2], source=req)
    answer_requests(rows, Inferred(np.zeros((2, 2), np.float32), {1: InferenceFailed("boom")}))
    answer = await asyncio.wait_for(req.future, 5)
    assert answer.body is None and answer.error is not None
    assert answer.error.status == 500 and "input 1" in answer.error.message
    assert "boom" in answer.error.message


async def test_queue_wait_is_reported_once_per_request() -> None:
    loop = asyncio.get_running_loop()
    req = request(6, loop)
    req.queued_at = 10.0
    rows = Rows.concat([block([2, 2], source=req), block([2])])
    assert started(rows, 12.5) == [2.5]
    assert started(rows, 13.0) == []  # its second batch: already counted
