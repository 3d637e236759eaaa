"""Results → record batches, for a whole inference batch at once, on the encode thread.

The model's output matrix becomes one JSON value per record (the ``result`` parts in one pass
over the matrix, see :func:`~streamer.stream.codec.result_fragments`), keyed and partitioned
like its input, appended to one aiokafka record batch per output partition. Rows the model
failed on become dead letters in the same call. The loop gets back finished batches to send.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamer.config import StreamerConfig
from streamer.kafka.publisher import OutBatch
from streamer.models.worker import Inferred
from streamer.observability.tracing import Tracing
from streamer.stream.batcher import Rows
from streamer.stream.codec import (
    context_headers,
    model_fragment,
    result_fragments,
    result_headers,
    result_value,
)
from streamer.stream.outputs import Destinations, Outputs
from streamer.stream.records import EncodeFailed
from streamer.stream.spans import record_span


class Encoder:
    """The encode stage's thread-side work."""

    def __init__(self, cfg: StreamerConfig, tracing: Tracing) -> None:
        self._encoding = cfg.output.embedding_encoding
        self._tracing = tracing
        self._group_id = cfg.kafka.group_id

    def __call__(
        self, batch: Rows, inferred: Inferred, dest: Destinations, spans: list[Any]
    ) -> list[OutBatch]:
        loaded = batch.bound
        info = loaded.info
        out = Outputs(dest, model=info.name)
        out.spans.extend(spans)
        failures = inferred.failures
        frags: list[Any] = []
        whole = False  # the fragments came from one pass over the whole batch
        if inferred.outputs is not None:
            frags, whole = self._fragments(inferred.outputs, loaded)
        model_json = model_fragment(info)
        tracing = self._tracing.enabled
        chunks, index = batch.chunks.tolist(), batch.index.tolist()
        record_ids, traces = batch.record_ids.tolist(), batch.trace.tolist()
        tombs = set(np.flatnonzero(batch.lengths == 0).tolist())
        keys = [c.messages[i].key for c, i in zip(chunks, index, strict=True)]
        out.expect(keys)
        if whole and not (tombs or failures or tracing):
            try:  # the usual batch: every record a result, built and grouped in bulk
                values = [
                    result_value(
                        rid, frag, model_json, c.tp.topic, c.tp.partition, c.messages[i].offset
                    )
                    for rid, frag, c, i in zip(record_ids, frags, chunks, index, strict=True)
                ]
            except Exception:  # the loop below finds the record and dead-letters it alone
                values = None
            if values is not None:
                headers = [result_headers(t) if t is not None else [] for t in traces]
                out.results(chunks, index, keys, values, headers)
                return out.batches()
        for j, chunk in enumerate(chunks):
            i = index[j]
            if j in tombs:  # a delete passes through, in its place in the partition's order
                out.result(chunk, i, None, result_headers(traces[j]) if traces[j] else [])
                continue
            if j in failures:
                err = failures[j]
                out.dead_letter(chunk, i, err)
                if tracing and (
                    span := record_span(self._tracing, self._group_id, chunk, i, traces[j])
                ):
                    self._tracing.fail(span, err.error_class, err.message)
                    out.spans.append(span)
                continue
            try:
                frag = frags[j]
                if isinstance(frag, EncodeFailed):
                    raise frag
                m = chunk.messages[i]
                tp = chunk.tp
                value = result_value(
                    record_ids[j], frag, model_json, tp.topic, tp.partition, m.offset
                )
                if tracing:
                    headers = self._traced(out, chunk, i, traces[j])
                else:
                    headers = result_headers(traces[j]) if traces[j] is not None else []
            except Exception as exc:  # this record to the DLQ; the stream goes on
                err = exc if isinstance(exc, EncodeFailed) else _encode_failed(exc)
                out.dead_letter(chunk, i, err)
                continue
            out.result(chunk, i, value, headers)
        return out.batches()

    def _fragments(self, outputs: Any, loaded: Any) -> tuple[list[Any], bool]:
        """The batch's result fragments in one pass (and True); if that raises, row by row, so
        only the rows that fail become :class:`EncodeFailed` (and dead letters) instead of the
        batch (and False)."""

        def fragments(rows: Any) -> list[Any]:
            return result_fragments(
                rows,
                loaded.info.task,
                _labels(loaded.model),
                encoding=self._encoding,
                return_all_scores=loaded.cfg.return_all_scores,
            )

        try:
            return fragments(outputs), True
        except Exception:
            out: list[Any] = []
            for j in range(len(outputs)):
                try:
                    out.append(fragments(outputs[j : j + 1])[0])
                except Exception as exc:
                    out.append(_encode_failed(exc))
            return out, False

    def _traced(self, out: Outputs, chunk: Any, i: int, context: Any) -> list:
        span = record_span(self._tracing, self._group_id, chunk, i, context)
        if span is None:
            return result_headers(context)
        out.spans.append(span)  # ended with the batch's acknowledgement
        return context_headers(*self._tracing.inject(span))


def _encode_failed(exc: BaseException) -> EncodeFailed:
    return EncodeFailed(f"building the result failed: {type(exc).__name__}: {exc}")


def _labels(model: Any) -> dict[int, str]:
    """A classifier's id → label names (``labels``; HFTextModel keeps them as ``_labels``)."""
    return getattr(model, "labels", None) or getattr(model, "_labels", None) or {}
