"""Wiring and lifecycle: load the model, then join the group, run until told to stop, drain.

Order matters: the model is loaded and warmed up *before* the consumer joins, so a cold
instance never holds partitions; on stop the consumer leaves only after in-flight work is
published and committed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

from streamer.config import StreamerConfig
from streamer.inference import InferenceWorker
from streamer.model import HFTextModel, TextModel
from streamer.pipeline import Pipeline
from streamer.publisher import Publisher
from streamer.telemetry import Telemetry

log = logging.getLogger(__name__)


class Service:
    """One streamer instance: ``start()``, then ``run()`` until ``request_stop()``."""

    def __init__(
        self,
        cfg: StreamerConfig,
        *,
        model_factory: Callable[[], TextModel] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.cfg = cfg
        self.telemetry = telemetry or Telemetry()
        if model_factory is None:
            cfg.require_model_path()
            model_factory = lambda: HFTextModel(cfg.model)  # noqa: E731
        self.worker = InferenceWorker(
            model_factory,
            cfg.runtime,
            warmup_batch_size=cfg.batching.max_batch_size,
            warmup_batch_tokens=cfg.batching.max_batch_tokens,
        )
        self.publisher = Publisher(cfg.kafka, on_fatal=self._fatal)
        self.pipeline = Pipeline(
            cfg, worker=self.worker, publisher=self.publisher, telemetry=self.telemetry
        )
        self._stop = asyncio.Event()
        self.ready = False

    def _fatal(self, exc: BaseException) -> None:
        self.pipeline.fail(RuntimeError(f"publishing failed: {type(exc).__name__}: {exc}"), exc)

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        t = time.perf_counter()
        model = await self.worker.start()
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in model.timings.phases.items())
        log.info(
            "model %s@%s (%s) ready on %s/%s in %.2fs: %s",
            model.info.name,
            model.info.version,
            model.info.fingerprint[:19],
            model.info.device,
            model.info.dtype,
            time.perf_counter() - t,
            phases,
        )
        await self.publisher.start()
        await self.pipeline.start()
        self.ready = True
        log.info(
            "consuming %s as group '%s' from %s",
            ", ".join(self.cfg.kafka.input_topics),
            self.cfg.kafka.group_id,
            self.cfg.kafka.bootstrap_servers,
        )

    async def run(self) -> int:
        """Run until a stop is requested (exit 0) or a stage fails (exit 1)."""
        stop = asyncio.ensure_future(self._stop.wait())
        failed = asyncio.ensure_future(self.pipeline.wait_failed())
        await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        failed.cancel()
        grace = self.cfg.runtime.shutdown_grace_s
        log.info("stopping: draining in-flight work (grace %.0fs)", grace)
        self.ready = False
        drained = await self.pipeline.drain_and_stop(grace)
        await self.publisher.stop()
        await self.worker.stop()
        if self.pipeline._failure is not None:
            log.error("stopped after a failure: %s", self.pipeline._failure)
            return 1
        log.info("stopped%s", "" if drained else " (not fully drained)")
        return 0

    async def close(self) -> None:
        """Release everything after a failed ``start()``."""
        await self.publisher.stop()
        await self.worker.stop()


async def serve(cfg: StreamerConfig) -> int:
    """``streamer run``: the service in the foreground until SIGTERM/SIGINT."""
    service = Service(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    try:
        await service.start()
    except BaseException:
        await service.close()
        raise
    return await service.run()
