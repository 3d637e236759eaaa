"""The HTTP inference API (``http.api: true``): the stream's models, answered in its batches.

Routes, on the service's HTTP server (``http.port``):

* ``POST /v1/embeddings`` — the OpenAI embeddings API (``input``, ``model``,
  ``encoding_format`` ``float`` or ``base64``: little-endian float32 bytes, ``dimensions``);
  ``GET /v1/models`` lists the loaded versions;
* ``POST /embed`` and ``POST /predict`` — text-embeddings-inference's (``inputs``,
  ``normalize``, ``truncate``, ``raw_scores``);
* ``POST /`` and ``POST /models/{model}`` — what huggingface_hub's ``InferenceClient`` posts to
  for a URL model: ``/embed``'s answer for an embedding model, ``[[{label, score}, …]]`` per
  input for a classifier.

Why here and not a second server: a text asked over HTTP is tokenized by the same tokenizer,
batched with the stream's records on the same bound model version, and gets the same vector the
stream publishes for it; every answer names that version (``model`` in the body where the API has
room, and ``X-Streamer-Model``, ``-Version``, ``-Fingerprint`` headers). Its rows are *priority*
rows in the stream's batcher (see :mod:`streamer.stream.batcher`): a query waits at most for the
batch that is running, never for the backlog.

Per request, the event loop only checks the token, the limits and reads the body; parsing,
validation, routing and tokenizing run on the API's own thread (under ``registry.hold()``, the
version acquired on the loop after, as the prepare stage does for records), and the response
body is rendered on the encode thread (:mod:`streamer.serving.requests`).

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "code", "param"}}``, with
the status a client expects: 400 malformed, 401 token, 404 unknown model, 413 too large, 429
full (``Retry-After``), 503 not ready or stopping, 500 the model failed on an input.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from opentelemetry.trace import Span, SpanKind

from streamer.config import StreamerConfig
from streamer.models.registry import Loaded, ModelRegistry, UnknownModel
from streamer.models.worker import InferenceWorker
from streamer.observability.http import Route, bearer_refusal
from streamer.observability.telemetry import Telemetry
from streamer.serving.requests import Answer, ApiError, ApiRequest, Render, describe
from streamer.stream.batcher import Batcher, BatcherClosed, Rows
from streamer.stream.records import RecordError

log = logging.getLogger(__name__)

EMBEDDING = "feature-extraction"
CLASSIFICATION = "text-classification"
RETRY_AFTER_S = 1
_REFUSAL_LOG_EVERY_S = 10.0


@dataclass(slots=True)
class Ask:
    """A validated request: its texts and how to answer them."""

    texts: list[str]
    truncate: bool | None  # None: input.on_too_long decides
    too_long_status: int  # 400 (OpenAI) or 413 (TEI)
    render: Callable[[Loaded, int], Render]  # (bound version, prompt tokens) -> renderer


Parse = Callable[[dict[str, Any], Loaded], Ask]


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # the metrics' `endpoint` label
    route: str  # the route as registered (span name, http.route)
    parse: Parse
    model_key: str = "model"  # the body key naming the model


@dataclass(slots=True)
class Prepared:
    """What the API thread hands back to the loop: the bound version and its rows."""

    bound: Loaded
    rows: Rows


class InferenceApi:
    """The API's handlers; :meth:`routes` go to the HealthServer, :meth:`close` on stop."""

    def __init__(
        self,
        cfg: StreamerConfig,
        *,
        registry: ModelRegistry,
        batcher: Batcher,
        telemetry: Telemetry,
        unavailable: Callable[[], str | None],
    ) -> None:
        self.cfg = cfg
        self.http = cfg.http
        self.registry = registry
        self.batcher = batcher
        self.telemetry = telemetry
        self._unavailable = unavailable  # why the service cannot answer now, or None
        self._refuse_too_long = cfg.input.on_too_long == "dlq"
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight = 0
        self._waiting: set[ApiRequest] = set()
        self._closed = False
        self._refusals = 0
        self._refusal_logged_at = 0.0

    @property
    def in_flight(self) -> int:
        """Requests being served now (what ``http.api_max_concurrent`` bounds)."""
        return self._in_flight

    def routes(self) -> list[Route]:
        embeddings = Endpoint("openai", "/v1/embeddings", _parse_openai)
        embed = Endpoint("embed", "/embed", _parse_embed)
        predict = Endpoint("predict", "/predict", _parse_predict)
        root = Endpoint("root", "/", _parse_root)
        named = Endpoint("root", "/models/{model}", _parse_root)
        return [
            ("POST", e.route, self._handler(e)) for e in (embeddings, embed, predict, root, named)
        ] + [("GET", "/v1/models", self._models)]

    def close(self) -> None:
        """No more requests; the ones still waiting get 503 (the pipeline has stopped)."""
        self._closed = True
        for request in list(self._waiting):
            if not request.future.done():
                request.future.set_result(
                    Answer(None, ApiError(503, "the service stopped", type_="server_error"))
                )
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- a request --------------------------------------------------------------------------
    def _handler(self, endpoint: Endpoint) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, endpoint)

        return handle

    async def _serve(self, request: web.Request, endpoint: Endpoint) -> web.Response:
        t0 = time.monotonic()
        status = 500
        span = self._server_span(request, endpoint)
        headers: dict[str, str] = {}
        try:
            try:
                self._authorize(request)
                self._available()
                if self._in_flight >= self.http.api_max_concurrent:
                    raise ApiError(
                        429,
                        f"{self._in_flight} requests in flight, the most this instance takes "
                        f"(http.api_max_concurrent={self.http.api_max_concurrent}); retry after "
                        f"{RETRY_AFTER_S}s",
                        type_="rate_limit_exceeded",
                        code="too_many_requests",
                        headers={"Retry-After": str(RETRY_AFTER_S)},
                    )
                self._in_flight += 1
                try:
                    body = await self._answer(request, endpoint, span, headers)
                finally:
                    self._in_flight -= 1
                resp = web.Response(body=body, content_type="application/json", headers=headers)
            except ApiError as err:
                resp = error_response(err, headers)
            status = resp.status
            return resp
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        finally:
            self.telemetry.api_request(endpoint.name, status, time.monotonic() - t0)
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    self.telemetry.tracing.fail(span, str(status), "request failed")
                span.end()

    async def _answer(
        self, request: web.Request, endpoint: Endpoint, span: Span | None, headers: dict[str, str]
    ) -> bytes:
        raw = await read_body(request, self.http.api_max_body_bytes)
        self._available()  # the service may have begun to stop while the body came in
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer] = loop.create_future()
        received = ApiRequest(
            0,
            _unset,
            loop,
            future,
            fetched_at=time.monotonic(),
            fetched_ns=time.time_ns(),
        )
        trace = self._trace(request, span)
        model = request.match_info.get("model")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamer-api")
        self.registry.hold()  # routed off the loop: no version is released meanwhile
        try:
            prepared = await loop.run_in_executor(
                self._pool, self._prepare, raw, endpoint, model, received, trace, headers
            )
            self.registry.acquire(prepared.bound, len(prepared.rows))
        finally:
            self.registry.unhold()
        if span is not None:
            info = prepared.bound.info
            span.set_attribute("streamer.model.name", info.name)
            span.set_attribute("streamer.model.version", info.version)
            span.set_attribute("streamer.model.fingerprint", info.fingerprint)
        try:
            received.queued_at = time.monotonic()
            self.batcher.put(prepared.rows, priority=True)
        except BatcherClosed:
            self.registry.release(prepared.bound, len(prepared.rows))
            raise ApiError(503, "the service is stopping", type_="server_error") from None
        self._waiting.add(received)
        try:
            answer = await future
        finally:
            self._waiting.discard(received)
        if answer.error is not None:
            raise answer.error
        assert answer.body is not None
        return answer.body

    def _prepare(
        self,
        raw: bytes,
        endpoint: Endpoint,
        model: str | None,
        request: ApiRequest,
        trace: tuple[bytes, bytes | None] | None,
        headers: dict[str, str],
    ) -> Prepared:
        """On the API thread: parse, validate, route, tokenize; the request's rows."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(doc, dict):
            raise ApiError(400, f"the body must be a JSON object, not {describe(doc)}")
        wanted = model if model is not None else doc.get(endpoint.model_key)
        if wanted is not None and not isinstance(wanted, str):
            raise ApiError(
                400, f"'model' must be a string (a name or name@version), not {describe(wanted)}"
            )
        try:
            bound = self.registry.resolve(wanted)
        except UnknownModel as exc:
            raise ApiError(404, str(exc), code="model_not_found", param="model") from None
        info = bound.info
        headers.update(
            {
                "X-Streamer-Model": info.name,
                "X-Streamer-Model-Version": info.version,
                "X-Streamer-Model-Fingerprint": info.fingerprint,
            }
        )
        ask = endpoint.parse(doc, bound)
        n = len(ask.texts)
        if n > self.http.api_max_inputs:
            raise ApiError(
                413,
                f"{n} inputs in one request; at most http.api_max_inputs="
                f"{self.http.api_max_inputs}: split it",
                code="too_many_inputs",
            )
        model_obj = bound.model
        assert model_obj is not None  # held: not released while routed
        t0_ns = time.time_ns()
        encs = InferenceWorker.tokenize(model_obj, ask.texts)
        t1_ns = time.time_ns()
        refuse = ask.truncate is False or (ask.truncate is None and self._refuse_too_long)
        for i, enc in enumerate(encs):
            if isinstance(enc, RecordError):
                raise ApiError(400, f"input {i} cannot be tokenized: {enc.message}")
            if enc.truncated and refuse:
                raise ApiError(
                    ask.too_long_status,
                    f"input {i} is longer than model.max_length={model_obj.max_length} tokens "
                    f"of {bound.ref}: shorten it"
                    + (", or send truncate: true" if ask.too_long_status == 413 else "")
                    + (" (input.on_too_long=dlq)" if ask.truncate is None else ""),
                    code="context_length_exceeded",
                )
        ids = np.empty(n, dtype=object)
        ids[:] = [e.ids for e in encs]
        lengths = np.fromiter(map(len, ids), np.int64, n)
        request.n = request.remaining = n
        request.render = ask.render(bound, int(lengths.sum()))
        chunks = np.full(n, request, dtype=object)
        traces = np.empty(n, dtype=object)
        traces.fill(trace)
        rows = Rows(
            bound,
            chunks,
            np.arange(n, dtype=np.int64),
            ids,
            lengths,
            np.full(n, None, dtype=object),
            traces,
            np.zeros(n),
            np.tile(np.array((t0_ns, t1_ns), np.int64), (n, 1)),
            np.full(n, request.fetched_at),
        )
        return Prepared(bound, rows)

    # -- checks -----------------------------------------------------------------------------
    def _authorize(self, request: web.Request) -> None:
        try:
            expected = self.http.api_token_value()
        except OSError as exc:  # the mounted file went away: fail closed, say where
            log.error("API request refused: cannot read http.api_token_file (%s)", exc.strerror)
            raise ApiError(
                503, "the API token cannot be read; see the service log", type_="server_error"
            ) from None
        if expected is None:
            return
        refusal = bearer_refusal(request.headers.get("Authorization", ""), expected)
        if refusal is None:
            return
        self._log_refusal(request, refusal)
        raise ApiError(
            401,
            "unauthorized: send Authorization: Bearer <http.api_token>",
            type_="invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="streamer-api"'},
        )

    def _log_refusal(self, request: web.Request, refusal: str) -> None:
        """A warning per refusal, at most one per 10 s (a misconfigured client retries fast)."""
        self._refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged_at < _REFUSAL_LOG_EVERY_S:
            return
        log.warning(
            "API request %s %s from %s refused: %s (%d refusal(s) since the last warning)",
            request.method,
            request.path,
            request.remote or "unknown peer",
            refusal,
            self._refusals,
        )
        self._refusals = 0
        self._refusal_logged_at = now

    def _available(self) -> None:
        why = "the service is stopping" if self._closed else self._unavailable()
        if why is not None:
            raise ApiError(
                503,
                f"not serving now: {why}",
                type_="server_error",
                code="unavailable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    # -- tracing ----------------------------------------------------------------------------
    def _server_span(self, request: web.Request, endpoint: Endpoint) -> Span | None:
        tracing = self.telemetry.tracing
        if not tracing.enabled:
            return None
        parent = tracing.extract(
            request.headers.get("traceparent"), request.headers.get("tracestate")
        )
        return tracing.start_span(
            f"{request.method} {endpoint.route}",
            kind=SpanKind.SERVER,
            parent=parent,
            attributes={
                "http.request.method": request.method,
                "http.route": endpoint.route,
                "url.path": request.path,
                "url.scheme": "http",
            },
        )

    def _trace(self, request: web.Request, span: Span | None) -> tuple[bytes, bytes | None] | None:
        """What the batch span links to: the SERVER span's context (or, tracing off, the
        caller's ``traceparent``), as the ``(traceparent, tracestate)`` bytes records carry."""
        if span is not None:
            parent, state = self.telemetry.tracing.inject(span)
        else:
            parent, state = request.headers.get("traceparent"), request.headers.get("tracestate")
        if not parent:
            return None
        return parent.encode("latin-1"), state.encode("latin-1") if state else None

    # -- GET /v1/models ---------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        t0 = time.monotonic()
        try:
            self._authorize(request)
        except ApiError as err:
            self.telemetry.api_request("models", err.status, time.monotonic() - t0)
            return error_response(err, {})
        data = [
            {
                "id": x.ref,
                "object": "model",
                "created": 0,
                "owned_by": "streamer",
                "task": x.info.task,
                "fingerprint": x.info.fingerprint,
                "active": not x.retired,
            }
            for x in self.registry.loaded()
        ]
        self.telemetry.api_request("models", 200, time.monotonic() - t0)
        return web.json_response({"object": "list", "data": data})


def _unset(outputs: np.ndarray) -> bytes:
    raise AssertionError("the request's renderer is set when it is prepared")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (chunked bodies too)."""
    too_large = ApiError(
        413,
        f"the body is larger than http.api_max_body_bytes={limit}: send fewer or shorter inputs",
        code="body_too_large",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    buf = bytearray()
    async for piece in request.content.iter_any():
        buf += piece
        if len(buf) > limit:
            raise too_large
    return bytes(buf)


def error_response(err: ApiError, headers: dict[str, str]) -> web.Response:
    body = {
        "error": {"message": err.message, "type": err.type, "code": err.code, "param": err.param}
    }
    return web.Response(
        body=orjson.dumps(body),
        status=err.status,
        content_type="application/json",
        headers={**headers, **err.headers},
    )


# -- request bodies ---------------------------------------------------------------------------
def _texts(value: Any, key: str) -> tuple[list[str], bool]:
    """(texts, whether a single string was sent) from an ``input``/``inputs`` value."""
    if isinstance(value, str):
        texts, single = [value], True
    elif isinstance(value, list) and value:
        for i, t in enumerate(value):
            if isinstance(t, str):
                continue
            if isinstance(t, int) or (isinstance(t, list) and all(isinstance(x, int) for x in t)):
                raise ApiError(
                    400, f"'{key}' holds token ids: send the texts as strings", param=key
                )
            raise ApiError(400, f"'{key}[{i}]' must be a string, not {describe(t)}", param=key)
        texts, single = value, False
    elif isinstance(value, list):
        raise ApiError(400, f"'{key}' is an empty list: send at least one text", param=key)
    elif value is None:
        raise ApiError(400, f"'{key}' is required: a string or a list of strings", param=key)
    else:
        raise ApiError(
            400, f"'{key}' must be a string or a list of strings, not {describe(value)}", param=key
        )
    for i, t in enumerate(texts):
        if not t.strip():
            where = key if single else f"{key}[{i}]"
            raise ApiError(400, f"'{where}' is empty or only whitespace", param=key)
    return texts, single


def _flag(doc: dict[str, Any], key: str) -> bool | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false, not {describe(value)}", param=key)
    return value


def _positive(doc: dict[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"'{key}' must be a positive integer, not {value!r}", param=key)
    return value


def _task(bound: Loaded, want: str, route: str, other: str) -> None:
    if bound.info.task != want:
        raise ApiError(
            400,
            f"{bound.ref} is a {bound.info.task} model: {route} serves {want} models; use {other}",
            code="wrong_task",
            param="model",
        )


def _right_only(doc: dict[str, Any]) -> None:
    direction = doc.get("truncation_direction")
    if direction is not None and str(direction).lower() != "right":
        raise ApiError(
            400, "only truncation_direction 'right' is supported", param="truncation_direction"
        )


def _check_dimensions(outputs: np.ndarray, dimensions: int | None, ref: str) -> None:
    if dimensions is not None and dimensions != outputs.shape[1]:
        raise ApiError(
            400,
            f"{ref} makes {outputs.shape[1]}-dimensional embeddings; 'dimensions' must be that "
            "or left out",
            param="dimensions",
        )


def _parse_openai(doc: dict[str, Any], bound: Loaded) -> Ask:
    texts, _ = _texts(doc.get("input"), "input")
    _task(bound, EMBEDDING, "/v1/embeddings", "/predict")
    fmt = doc.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(
            400,
            f"'encoding_format' must be 'float' or 'base64', not {fmt!r}",
            param="encoding_format",
        )
    dimensions = _positive(doc, "dimensions")

    def render(bound: Loaded, tokens: int) -> Render:
        ref = bound.ref

        def body(outputs: np.ndarray) -> bytes:
            _check_dimensions(outputs, dimensions, ref)
            if fmt == "base64":  # what the openai client asks for by default
                arr = np.ascontiguousarray(outputs, dtype="<f4")
                vectors: list[Any] = [
                    base64.b64encode(row.tobytes()).decode("ascii") for row in arr
                ]
            else:
                vectors = list(np.ascontiguousarray(outputs, dtype=np.float32))
            data = [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ]
            return orjson.dumps(
                {
                    "object": "list",
                    "data": data,
                    "model": ref,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
                option=orjson.OPT_SERIALIZE_NUMPY,
            )

        return body

    return Ask(texts, None, 400, render)


def _embed_ask(doc: dict[str, Any], bound: Loaded, texts: list[str]) -> Ask:
    normalize = _flag(doc, "normalize")
    truncate = _flag(doc, "truncate")
    _right_only(doc)
    if doc.get("prompt_name") is not None:
        raise ApiError(
            400, "'prompt_name' is not supported (no prompts configured)", param="prompt_name"
        )
    fmt = doc.get("encoding_format") or "float"
    if fmt != "float":
        raise ApiError(
            400,
            f"'encoding_format' {fmt!r}: this route answers float lists; /v1/embeddings "
            "answers base64",
            param="encoding_format",
        )
    dimensions = _positive(doc, "dimensions")
    model_normalizes = bound.cfg.normalize
    if normalize is False and model_normalizes:
        raise ApiError(
            400,
            f"{bound.ref} makes L2-normalised embeddings (model.normalize: true), the same the "
            "stream publishes; 'normalize': false cannot undo that, leave it out",
            param="normalize",
        )

    def render(bound: Loaded, tokens: int) -> Render:
        def body(outputs: np.ndarray) -> bytes:
            _check_dimensions(outputs, dimensions, bound.ref)
            out = np.ascontiguousarray(outputs, dtype=np.float32)
            if normalize and not model_normalizes:
                norms = np.linalg.norm(out, axis=1, keepdims=True)
                out = out / np.maximum(norms, 1e-12)
            return orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)

        return body

    return Ask(texts, truncate, 413, render)


def _parse_embed(doc: dict[str, Any], bound: Loaded) -> Ask:
    texts, _ = _texts(doc.get("inputs"), "inputs")
    _task(bound, EMBEDDING, "/embed", "/predict")
    return _embed_ask(doc, bound, texts)


def _predict_ask(
    doc: dict[str, Any], bound: Loaded, texts: list[str], nested: bool, top_k: int | None
) -> Ask:
    truncate = _flag(doc, "truncate")
    _right_only(doc)
    if _flag(doc, "raw_scores"):
        raise ApiError(
            400, "'raw_scores': only probabilities (softmax) are served", param="raw_scores"
        )
    labels = _labels(bound.model)

    def render(bound: Loaded, tokens: int) -> Render:
        def body(outputs: np.ndarray) -> bytes:
            order = np.argsort(-outputs, axis=1, kind="stable")
            if top_k is not None:
                order = order[:, :top_k]
            scores = np.take_along_axis(outputs, order, axis=1).tolist()
            answer = [
                [
                    {"label": labels.get(k, str(k)), "score": s}
                    for k, s in zip(row, srow, strict=True)
                ]
                for row, srow in zip(order.tolist(), scores, strict=True)
            ]
            return orjson.dumps(answer if nested else answer[0])

        return body

    return Ask(texts, truncate, 413, render)


def _parse_predict(doc: dict[str, Any], bound: Loaded) -> Ask:
    value = doc.get("inputs")
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        raise ApiError(400, "sentence pairs are not supported: send single texts", param="inputs")
    texts, single = _texts(value, "inputs")
    _task(bound, CLASSIFICATION, "/predict", "/embed or /v1/embeddings")
    return _predict_ask(doc, bound, texts, nested=not single, top_k=_positive(doc, "top_k"))


def _parse_root(doc: dict[str, Any], bound: Loaded) -> Ask:
    """What huggingface_hub's InferenceClient sends to a URL model: ``inputs`` plus options
    at the top level (feature extraction) or under ``parameters`` (classification)."""
    texts, _ = _texts(doc.get("inputs"), "inputs")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, f"'parameters' must be an object, not {describe(params)}")
    merged = {**doc, **params}
    if bound.info.task == CLASSIFICATION:
        fn = merged.get("function_to_apply")
        if fn is not None and str(fn).lower() != "softmax":
            raise ApiError(
                400,
                f"'function_to_apply' {fn!r}: only softmax probabilities are served",
                param="function_to_apply",
            )
        return _predict_ask(merged, bound, texts, nested=True, top_k=_positive(merged, "top_k"))
    return _embed_ask(merged, bound, texts)


def _labels(model: Any) -> dict[int, str]:
    """A classifier's id → label names (``labels``; HFTextModel keeps them as ``_labels``)."""
    return getattr(model, "labels", None) or getattr(model, "_labels", None) or {}
