"""The model threads: one dedicated thread owns the model; two more prepare and encode.

The *prepare* thread decodes, routes and tokenizes whole fetched chunks; the *encode* thread
serialises whole batches of results into record batches; so the event loop only moves batches.

The inference thread sets torch's thread counts and (optionally) its CPU affinity once, when it
starts, then loads the model and warms it up, all before the consumer joins the group. The event
loop only awaits futures from these threads, so heartbeats keep flowing while a batch runs.

A batch that fails is split in halves until the failing record(s) are found: only those become
:class:`~streamer.stream.records.InferenceFailed`; the rest still get results (one output array
per batch, failed rows left zero and named in ``failures``). Running out of (CUDA)
memory is handled the same way, after the allocator's cache is emptied, and reported through
``on_oom`` so the batch budget can shrink; only a single record that still does not fit fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from streamer.config import RuntimeConfig
from streamer.memory import refreeze_gc
from streamer.models.hf import TextModel
from streamer.models.shapes import length_groups
from streamer.models.stage_thread import StageThread
from streamer.stream.records import InferenceFailed, RecordError, TokenizationFailed

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(slots=True)
class Inferred:
    """A batch's model output: one row per input row; ``failures`` maps row → why it has none."""

    outputs: np.ndarray | None  # None when every row failed
    failures: dict[int, RecordError]
    # tokens the successful forwards were padded to (Σ rows × longest row of each forward):
    # below the batch's rows × longest row where the CPU ran it in groups of like length
    padded_tokens: int = 0


# A CPU forward's fixed cost in tokens' worth: MiniLM on 2 cores, 1×16 tokens 23.8 ms against
# ~0.26 ms per token in larger batches (streamer/models/shapes.py:length_groups)
SPLIT_OVERHEAD_TOKENS = 64


def _forward(model: TextModel, batch: list[list[int]]) -> tuple[np.ndarray, int]:
    """``model.forward`` on the batch, float32, a row per row, and the tokens it was padded to.
    A model that asks for it (``splits_by_length``: exact shapes on a CPU) runs rows of similar
    length together, in a few forwards, rather than padding every row to the longest."""
    lengths = np.fromiter(map(len, batch), np.int64, len(batch))
    groups = None
    if len(batch) > 1 and getattr(model, "splits_by_length", False):
        groups = length_groups(lengths, SPLIT_OVERHEAD_TOKENS)
    if groups is None:
        out = np.asarray(model.forward(batch), dtype=np.float32)
        return out, len(batch) * int(lengths.max())
    result: np.ndarray | None = None
    padded = 0
    for idx in groups:
        part = np.asarray(model.forward([batch[i] for i in idx]), dtype=np.float32)
        if result is None:
            result = np.empty((len(batch), *part.shape[1:]), dtype=np.float32)
        result[idx] = part
        padded += len(idx) * int(lengths[idx].max())
    assert result is not None
    return result, padded


def _free_memory(cuda: bool) -> None:
    refreeze_gc()  # the released version's objects were frozen with the rest (memory.py)
    if cuda:
        import torch

        torch.cuda.empty_cache()


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("freeing a released model's memory failed: %r", future.exception())


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class InferenceWorker:
    """Owns the model and the two worker threads. ``start()`` loads and warms up."""

    def __init__(
        self,
        runtime: RuntimeConfig,
        *,
        warmup_batch_size: int = 64,
        warmup_batch_tokens: int = 8192,
    ) -> None:
        self._runtime = runtime
        self._warmup = (warmup_batch_size, warmup_batch_tokens)
        self._infer_pool: StageThread | None = None
        self._prepare_pool: StageThread | None = None
        self._encode_pool: StageThread | None = None
        self._load_pool: ThreadPoolExecutor | None = None
        self.busy_since: float | None = None  # monotonic start of the running batch
        self._thread: threading.Thread | None = None
        # Called on the inference thread with the padded tokens (rows x longest row) of a batch
        # that ran out of CUDA memory, e.g. to lower the batcher's token budget for a while.
        self.on_oom: Callable[[int], None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def _init_infer_thread(self) -> None:
        import torch

        rt = self._runtime
        cores = rt.cpu_affinity
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(cores))  # pid 0 = this thread on Linux
        threads = rt.torch_threads or (len(cores) if cores else _usable_cores())
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(rt.torch_interop_threads)
        except RuntimeError:  # already set (a second service in one process, tests)
            pass
        self._thread = threading.current_thread()
        log.info(
            "inference thread: torch threads=%d interop=%d affinity=%s",
            torch.get_num_threads(),
            torch.get_num_interop_threads(),
            cores or "all",
        )

    async def start(self) -> None:
        """Create the threads; the inference thread applies its settings right away."""
        self._infer_pool = StageThread("streamer-infer_0", initializer=self._init_infer_thread)
        self._prepare_pool = StageThread("streamer-prepare_0")
        self._encode_pool = StageThread("streamer-encode_0")
        # Loads and warm-ups of new versions run here, beside the serving model.
        self._load_pool = ThreadPoolExecutor(
            1, thread_name_prefix="streamer-load", initializer=self._init_load_thread
        )
        await self.run_infer(lambda: None)

    def _init_load_thread(self) -> None:
        cores = self._runtime.cpu_affinity
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(cores))

    async def load(self, factory: Callable[[], TextModel]) -> TextModel:
        """Load and warm up a model on the loader thread (the serving model keeps serving)."""
        assert self._load_pool is not None, "start() first"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._load_pool, self._load, factory)

    def free_memory(self, cuda: bool) -> None:
        """A full collection (and ``torch.cuda.empty_cache()``) after a model version is dropped,
        on the loader thread: a full collection with a model's worth of objects takes long
        enough to stall the event loop. A failure is logged, never lost."""
        assert self._load_pool is not None, "start() first"
        future = self._load_pool.submit(_free_memory, cuda)
        future.add_done_callback(_log_failure)

    def _load(self, factory: Callable[[], TextModel]) -> TextModel:
        model = factory()
        load = getattr(model, "load", None)
        if load is not None:
            load()
        model.warmup(*self._warmup)
        return model

    async def stop(self) -> None:
        if self._load_pool is not None:
            self._load_pool.shutdown(wait=True, cancel_futures=True)
        for stage in (self._prepare_pool, self._encode_pool, self._infer_pool):
            if stage is not None:
                stage.shutdown(wait=True)

    # -- threads ------------------------------------------------------------------------------
    async def run_infer(self, fn: Callable[..., R], *args: Any) -> R:
        assert self._infer_pool is not None, "start() first"
        return await self._infer_pool.run(fn, *args)

    async def run_prepare(self, fn: Callable[..., R], *args: Any) -> R:
        """Decode, route and tokenize (whole fetched chunks)."""
        assert self._prepare_pool is not None, "start() first"
        return await self._prepare_pool.run(fn, *args)

    async def run_encode(self, fn: Callable[..., R], *args: Any) -> R:
        """Serialise results into record batches (whole inference batches)."""
        assert self._encode_pool is not None, "start() first"
        return await self._encode_pool.run(fn, *args)

    def on_encode_thread(self, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` on the encode thread, later; not awaited, a failure is logged.
        RuntimeError when the thread is not running."""
        if self._encode_pool is None:
            raise RuntimeError("the encode thread is not running")
        self._encode_pool.submit(fn)

    def thread_alive(self) -> bool:
        """False once the inference thread has died (or before it started)."""
        return self._thread is not None and self._thread.is_alive()

    def stuck_for(self) -> float:
        """Seconds the current batch has been running (0 when idle)."""
        started = self.busy_since
        return 0.0 if started is None else time.monotonic() - started

    # -- stages -------------------------------------------------------------------------------
    @staticmethod
    def tokenize(model: TextModel, texts: list[str]) -> list[Any]:
        """Encodings, or a TokenizationFailed per record that could not be encoded (call it on
        the prepare thread)."""
        try:
            return list(model.tokenize(texts))
        except Exception:  # isolate the bad text(s): encode one by one
            out: list[Any] = []
            for text in texts:
                try:
                    out.append(model.tokenize([text])[0])
                except Exception as exc:
                    out.append(TokenizationFailed(f"tokenizer failed: {type(exc).__name__}: {exc}"))
            return out

    async def infer(self, model: TextModel, batch: list[list[int]]) -> Inferred:
        """The batch's outputs; rows at fault are named in ``failures`` (InferenceFailed)."""
        return await self.run_infer(self._infer_sync, model, batch)

    def _infer_sync(self, model: TextModel, batch: list[list[int]]) -> Inferred:
        self.busy_since = time.monotonic()
        try:
            parts: list[tuple[int, np.ndarray]] = []
            failures: dict[int, RecordError] = {}
            done_tokens = [0]  # padded tokens of the forwards that worked (see _forward)
            self._bisect(model, batch, 0, parts, failures, done_tokens)
        finally:
            self.busy_since = None
        if not parts:
            return Inferred(None, failures, done_tokens[0])
        if len(parts) == 1 and not failures:
            return Inferred(parts[0][1], failures, done_tokens[0])
        first = parts[0][1]
        out = np.zeros((len(batch), *first.shape[1:]), dtype=first.dtype)
        for start, arr in parts:
            out[start : start + len(arr)] = arr
        return Inferred(out, failures, done_tokens[0])

    def _bisect(
        self,
        model: TextModel,
        batch: list[list[int]],
        start: int,
        parts: list[tuple[int, np.ndarray]],
        failures: dict[int, RecordError],
        done_tokens: list[int],
    ) -> None:
        try:
            out, tokens = _forward(model, batch)
            parts.append((start, out))
            done_tokens[0] += tokens
            return
        except Exception as exc:
            import torch

            # Out of memory is the batch's size, not a record's fault: the halves may fit.
            oom = isinstance(exc, torch.cuda.OutOfMemoryError) or (
                isinstance(exc, RuntimeError) and "out of memory" in str(exc)
            )
            what = f"{type(exc).__name__}: {exc}"
        # Past the except block the failed attempt's traceback, and the tensors its frames
        # held, are gone, so empty_cache() can hand that memory back.
        if oom:
            padded = len(batch) * max(len(ids) for ids in batch)
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            log.warning(
                "out of memory on a batch of %d rows, %d padded tokens%s",
                len(batch),
                padded,
                "; splitting it and retrying the halves" if len(batch) > 1 else "",
            )
            if self.on_oom is not None:
                self.on_oom(padded)
        if len(batch) == 1:
            log.warning("inference failed for one record: %s", what)
            failures[start] = InferenceFailed(f"model failed on this record: {what}")
            return
        mid = len(batch) // 2
        self._bisect(model, batch[:mid], start, parts, failures, done_tokens)
        self._bisect(model, batch[mid:], start + mid, parts, failures, done_tokens)
