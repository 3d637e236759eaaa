"""HTTP requests as rows of the stream's batches, and their answers.

An HTTP request's texts become a :class:`~streamer.stream.batcher.Rows` block whose ``chunks``
column holds the :class:`ApiRequest` itself (never a Kafka chunk) and whose ``index`` column is
each text's position in the request. The block joins the stream's batcher as *priority* rows
(see :mod:`streamer.stream.batcher`), runs in the stream's batches on the same bound model
version, and is taken out again on the encode thread (:func:`answer_requests`): its output rows
are copied into the request, which renders its response body there, off the event loop, and
hands it to the waiting handler with ``call_soon_threadsafe``. The checkpoint, the publisher and
the revocation logic never see these rows.

A request may span several batches (more texts than ``max_batch_size``); it is answered when
its last row has run. All its rows are bound to one model version, so one request is answered
by exactly one version, also during a hot swap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamer.models.worker import Inferred
from streamer.stream.batcher import Rows
from streamer.stream.records import RecordError

Render = Callable[[np.ndarray], bytes]  # the model's output rows, in input order -> body


class ApiError(Exception):
    """A request refused with ``status``; ``message`` says what to change."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param  # the request field at fault (OpenAI's error.param)
        self.headers = headers or {}


@dataclass(slots=True)
class Answer:
    """What a request's handler gets back: the response body, or why there is none."""

    body: bytes | None
    error: ApiError | None = None


@dataclass(eq=False, slots=True)
class ApiRequest:
    """One HTTP request's texts in the batcher: the object in their rows' ``chunks`` column.

    ``outputs``, ``failures`` and ``remaining`` are only touched on the encode thread (one
    thread: no lock); ``future`` only on the event loop.
    """

    n: int  # texts in the request
    render: Render  # builds the response body from the output rows (on the encode thread)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Answer]
    fetched_at: float  # monotonic, when the request was received
    fetched_ns: int  # wall clock, when the request was received (span start times)
    queued_at: float = 0.0  # monotonic, when its rows joined the batcher
    started: bool = False  # its first batch started (queue wait observed)
    remaining: int = 0
    outputs: np.ndarray | None = None
    failures: dict[int, RecordError] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.remaining = self.n

    def receive(
        self, index: np.ndarray, outputs: np.ndarray | None, failures: dict[int, RecordError]
    ) -> None:
        """Rows ``index`` of this request ran (encode thread); answer once all of them have."""
        if outputs is not None:
            if self.outputs is None:
                self.outputs = np.zeros((self.n, *outputs.shape[1:]), outputs.dtype)
            self.outputs[index] = outputs
        self.failures.update(failures)
        self.remaining -= len(index)
        if self.remaining > 0:
            return
        self.loop.call_soon_threadsafe(self._answer, self._build())

    def _build(self) -> Answer:
        if self.failures:
            i, err = min(self.failures.items())
            return Answer(
                None,
                ApiError(
                    500,
                    f"the model failed on input {i} ({len(self.failures)} of {self.n} failed): "
                    f"{err.message}",
                    type_="server_error",
                    code=err.error_class,
                ),
            )
        assert self.outputs is not None
        try:
            return Answer(self.render(self.outputs))
        except ApiError as err:
            return Answer(None, err)
        except Exception as exc:  # a bug in rendering: this request fails, not the stream
            return Answer(
                None,
                ApiError(
                    500,
                    f"building the response failed: {type(exc).__name__}: {exc}",
                    type_="server_error",
                ),
            )

    def _answer(self, answer: Answer) -> None:
        if not self.future.done():  # the client may have gone, or the service stopped
            self.future.set_result(answer)


def started(batch: Rows, now: float) -> list[float]:
    """The queue waits of the requests in ``batch`` whose first batch this is (on the loop,
    once per request: their rows come first in a batch, see the batcher)."""
    waits: list[float] = []
    seen: set[int] = set()
    for c in batch.chunks.tolist():
        if not isinstance(c, ApiRequest):
            break
        if id(c) in seen:
            continue
        seen.add(id(c))
        if not c.started:
            c.started = True
            waits.append(now - c.queued_at)
    return waits


def answer_requests(batch: Rows, inferred: Inferred) -> tuple[Rows, Inferred]:
    """On the encode thread: hand the request rows' outputs to their requests; the stream's
    rows (and their outputs and failures, renumbered) are returned for encoding."""
    chunks = batch.chunks.tolist()
    is_request = np.fromiter((isinstance(c, ApiRequest) for c in chunks), bool, len(chunks))
    mine = np.flatnonzero(is_request)
    if not len(mine):
        return batch, inferred
    by_request: dict[ApiRequest, list[int]] = {}
    for j in mine.tolist():
        by_request.setdefault(chunks[j], []).append(j)
    outputs, failures = inferred.outputs, inferred.failures
    for request, rows in by_request.items():
        sel = np.asarray(rows)
        index = batch.index[sel]
        failed = {int(batch.index[j]): failures[j] for j in rows if j in failures}
        request.receive(index, None if outputs is None else outputs[sel], failed)
    keep = np.flatnonzero(~is_request)
    renumbered = {
        int(np.searchsorted(keep, j)): err for j, err in failures.items() if not is_request[j]
    }
    rest = None if outputs is None or not len(keep) else outputs[keep]
    return batch.take(keep), Inferred(rest, renumbered)


def describe(value: Any) -> str:
    """A JSON value's type as an API user names it."""
    return {
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)
