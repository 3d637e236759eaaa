"""The inference stage: one dedicated thread owns the model; another tokenizes and serialises.

The inference thread sets torch's thread counts and (optionally) its CPU affinity once, when it
starts, then loads the model and warms it up, all before the consumer joins the group. The event
loop only awaits futures from these threads, so heartbeats keep flowing while a batch runs.

A batch that fails is split in halves until the failing record(s) are found: only those become
:class:`~streamer.records.InferenceFailed`; the rest still get results. Running out of (CUDA)
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
from typing import Any, TypeVar

from streamer.config import RuntimeConfig
from streamer.model import TextModel
from streamer.records import InferenceFailed, RecordError, TokenizationFailed

log = logging.getLogger(__name__)

R = TypeVar("R")
Outcome = dict[str, Any] | RecordError


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
        self._infer_pool: ThreadPoolExecutor | None = None
        self._cpu_pool: ThreadPoolExecutor | None = None
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
        self._infer_pool = ThreadPoolExecutor(
            1, thread_name_prefix="streamer-infer", initializer=self._init_infer_thread
        )
        self._cpu_pool = ThreadPoolExecutor(1, thread_name_prefix="streamer-cpu")
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

    def _load(self, factory: Callable[[], TextModel]) -> TextModel:
        model = factory()
        load = getattr(model, "load", None)
        if load is not None:
            load()
        model.warmup(*self._warmup)
        return model

    async def stop(self) -> None:
        for pool in (self._load_pool, self._cpu_pool, self._infer_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    # -- threads ------------------------------------------------------------------------------
    async def run_infer(self, fn: Callable[..., R], *args: Any) -> R:
        assert self._infer_pool is not None, "start() first"
        return await asyncio.get_running_loop().run_in_executor(self._infer_pool, fn, *args)

    async def run_cpu(self, fn: Callable[..., R], *args: Any) -> R:
        assert self._cpu_pool is not None, "start() first"
        return await asyncio.get_running_loop().run_in_executor(self._cpu_pool, fn, *args)

    def thread_alive(self) -> bool:
        """False once the inference thread has died (or before it started)."""
        return self._thread is not None and self._thread.is_alive()

    def stuck_for(self) -> float:
        """Seconds the current batch has been running (0 when idle)."""
        started = self.busy_since
        return 0.0 if started is None else time.monotonic() - started

    # -- stages -------------------------------------------------------------------------------
    async def tokenize(self, model: TextModel, texts: list[str]) -> list[Any]:
        """Encodings, or a TokenizationFailed per record that could not be encoded."""
        return await self.run_cpu(self._tokenize_sync, model, texts)

    def _tokenize_sync(self, model: TextModel, texts: list[str]) -> list[Any]:
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

    async def infer(self, model: TextModel, batch: list[list[int]]) -> list[Outcome]:
        """One outcome per row: a result dict, or InferenceFailed for rows at fault."""
        return await self.run_infer(self._infer_sync, model, batch)

    def _infer_sync(self, model: TextModel, batch: list[list[int]]) -> list[Outcome]:
        self.busy_since = time.monotonic()
        try:
            return self._bisect(model, batch)
        finally:
            self.busy_since = None

    def _bisect(self, model: TextModel, batch: list[list[int]]) -> list[Outcome]:
        try:
            out = model.forward(batch)
            return list(model.postprocess(out, len(batch)))
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
            return [InferenceFailed(f"model failed on this record: {what}")]
        mid = len(batch) // 2
        return self._bisect(model, batch[:mid]) + self._bisect(model, batch[mid:])
