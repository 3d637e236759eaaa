"""Decode → route → tokenize, for a whole fetch at once, on the prepare thread.

In: the fetch's chunks, their records still in the broker's record batches (read out here, see
:meth:`~streamer.stream.records.Chunk.unpack`). Out: one :class:`~streamer.stream.batcher.Rows`
block per model version (token ids and what the result needs later, column-wise) and the dead
letters of records that could not be decoded, routed or tokenized, already grouped into record
batches. The event loop gets back a handful of objects whatever the fetch size."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamer.config import StreamerConfig
from streamer.kafka.publisher import OutBatch
from streamer.models.hf import Encoded
from streamer.models.registry import ModelRegistry
from streamer.models.worker import InferenceWorker
from streamer.observability.tracing import Tracing
from streamer.stream.batcher import Rows
from streamer.stream.codec import Decoder, trace_headers
from streamer.stream.outputs import Destinations, Outputs
from streamer.stream.records import Chunk, RecordError, TextTooLong
from streamer.stream.spans import record_span


@dataclass(slots=True)
class Prepared:
    rows: list[Rows]  # one block per model version
    dead: list[OutBatch]
    tokenize_s: float
    skipped: dict[Chunk, int] = field(default_factory=dict)  # tombstones with on_tombstone=skip
    # chunks that held fewer records than their offsets said (compaction): the real count
    recounted: dict[Chunk, int] = field(default_factory=dict)


_TOMBSTONE = Encoded([], False)  # a null value passed on: a row of no tokens (see Rows)


class _Group:
    """Records bound to one model version, gathered before tokenizing them in one call."""

    __slots__ = ("bound", "chunks", "index", "record_ids", "texts", "trace")

    def __init__(self, bound: Any) -> None:
        self.bound = bound
        self.chunks: list[Chunk] = []
        self.index: list[int] = []
        self.texts: list[str | None] = []  # None: a tombstone
        self.record_ids: list[Any] = []
        self.trace: list[Any] = []


class Preparer:
    """The prepare stage's thread-side work (stateless between calls but for its config)."""

    def __init__(self, cfg: StreamerConfig, registry: ModelRegistry, tracing: Tracing) -> None:
        self._decoder = Decoder(cfg.input)
        self._registry = registry
        self._tracing = tracing
        self._group_id = cfg.kafka.group_id
        self._dlq_too_long = cfg.input.on_too_long == "dlq"
        self._on_tombstone = cfg.input.on_tombstone

    def __call__(self, chunks: list[Chunk], dest: Destinations) -> Prepared:
        decode, route = self._decoder.decode, self._registry.route
        groups: dict[int, _Group] = {}
        dead = Outputs(dest)
        skipped: dict[Chunk, int] = {}
        recounted: dict[Chunk, int] = {}
        tombstones = self._on_tombstone
        for chunk in chunks:
            if (n := chunk.unpack()) != chunk.count:
                recounted[chunk] = n
            topic = chunk.tp.topic
            for i, m in enumerate(chunk.messages):
                headers = m.headers
                if m.value is None and tombstones != "dlq":
                    if tombstones == "skip":
                        skipped[chunk] = skipped.get(chunk, 0) + 1
                        continue
                    text, record_id = None, None  # pass: a row of no tokens, kept in order
                    try:
                        bound = route(topic, headers)
                    except RecordError as err:
                        self._dead_letter(dead, chunk, i, err, headers)
                        continue
                else:
                    try:
                        text, record_id = decode(m.value)
                        bound = route(topic, headers)
                    except RecordError as err:
                        self._dead_letter(dead, chunk, i, err, headers)
                        continue
                g = groups.get(id(bound))
                if g is None:
                    g = groups[id(bound)] = _Group(bound)
                g.chunks.append(chunk)
                g.index.append(i)
                g.texts.append(text)
                g.record_ids.append(record_id)
                g.trace.append(trace_headers(headers) if headers else None)
        rows, tokenize_s = [], 0.0
        for g in groups.values():
            t0, t0_ns = time.perf_counter(), time.time_ns()
            texts = [t for t in g.texts if t is not None]
            encs = InferenceWorker.tokenize(g.bound.model, texts) if texts else []
            if len(texts) < len(g.texts):  # tombstones: no tokens, their place kept
                it = iter(encs)
                encs = [_TOMBSTONE if t is None else next(it) for t in g.texts]
            tokenize_s += time.perf_counter() - t0
            rows.append(self._rows(g, encs, (t0_ns, time.time_ns()), dead))
        return Prepared([r for r in rows if len(r)], dead.batches(), tokenize_s, skipped, recounted)

    def _rows(self, g: _Group, encs: list[Any], span_ns: tuple[int, int], dead: Outputs) -> Rows:
        keep = np.ones(len(encs), bool)
        for j, enc in enumerate(encs):
            if isinstance(enc, Encoded) and not (enc.truncated and self._dlq_too_long):
                continue
            keep[j] = False
            err = enc if isinstance(enc, RecordError) else self._too_long(g)
            self._dead_letter(dead, g.chunks[j], g.index[j], err, None)
        n = len(encs)
        ids = np.fromiter((e.ids if isinstance(e, Encoded) else [] for e in encs), object, n)
        rows = Rows(
            g.bound,
            np.fromiter(g.chunks, object, n),
            np.fromiter(g.index, np.int64, n),
            ids,
            np.fromiter(map(len, ids), np.int64, n),
            np.fromiter(g.record_ids, object, n),
            np.fromiter(g.trace, object, n),
            np.zeros(n),
            np.tile(np.array(span_ns, np.int64), (n, 1)),
            np.fromiter((c.fetched_at for c in g.chunks), np.float64, n),
        )
        return rows if keep.all() else rows.take(keep)

    def _too_long(self, g: _Group) -> RecordError:
        return TextTooLong(
            f"text is longer than model.max_length={g.bound.model.max_length} tokens of "
            f"{g.bound.ref} (input.on_too_long=dlq)"
        )

    def _dead_letter(
        self, dead: Outputs, chunk: Chunk, i: int, err: RecordError, headers: Any
    ) -> None:
        dead.dead_letter(chunk, i, err)
        if self._tracing.enabled:
            if headers is None:
                headers = chunk.messages[i].headers
            span = record_span(
                self._tracing, self._group_id, chunk, i, trace_headers(headers or ())
            )
            if span is not None:
                self._tracing.fail(span, err.error_class, err.message)
                span.set_attribute("streamer.error.stage", err.stage)
                dead.spans.append(span)
