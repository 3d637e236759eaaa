"""Wiring and lifecycle: serve probes, load the model, join the group, run, drain.

Order matters: the health server starts first (so a slow model load is visible as "not
ready"), the model is loaded and warmed up *before* the consumer joins the group (a cold
instance never holds partitions), and on stop the consumer leaves only after in-flight work is
published and committed; spans are flushed last, while the producer still runs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

from streamer.config import StreamerConfig
from streamer.health import HealthServer, Route
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
        extra_routes: list[Route] | None = None,
    ) -> None:
        self.cfg = cfg
        self.telemetry = telemetry or Telemetry(cfg.tracing)
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
        self.health = HealthServer(
            cfg.http,
            liveness=self._liveness,
            readiness=self._readiness,
            metrics=self.telemetry.metrics.render,
            extra_routes=extra_routes,
        )
        state = self.telemetry.metrics.state
        state.lag = self.pipeline.partition_lag
        state.in_flight = lambda: self.pipeline.tracker.in_flight
        state.paused_partitions = self._paused_partitions
        state.assigned_partitions = lambda: len(self.pipeline.tracker.partitions())
        self._stop = asyncio.Event()
        self.ready = False
        self.stopping = False

    # -- probes -------------------------------------------------------------------------------
    def _liveness(self) -> tuple[bool, str]:
        failure = self.pipeline.failure
        if failure is not None:
            return False, f"pipeline failed: {failure}"
        if self.worker.model is not None and not self.worker.thread_alive():
            return False, "the inference thread is gone"
        stuck = self.worker.stuck_for()
        if stuck > self.cfg.http.stuck_after_s:
            return False, (
                f"one batch has run for {stuck:.0f}s (http.stuck_after_s="
                f"{self.cfg.http.stuck_after_s:.0f}): the inference thread looks wedged"
            )
        return True, "ok"

    def _readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "draining for shutdown"
        if self.worker.model is None:
            return False, "loading and warming up the model"
        if not self.pipeline.joined.is_set():
            return False, "joining the consumer group"
        return True, "ready"

    def _paused_partitions(self) -> int:
        consumer = self.pipeline.consumer
        try:
            return len(consumer.client.paused())
        except AssertionError:  # not started yet
            return 0

    # -- lifecycle ----------------------------------------------------------------------------
    def _fatal(self, exc: BaseException) -> None:
        self.pipeline.fail(RuntimeError(f"publishing failed: {type(exc).__name__}: {exc}"), exc)

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        await self.health.start()
        log.info("%s", self.telemetry.tracing.describe())
        t = time.perf_counter()
        await self.worker.start()
        model = await self.worker.load()
        self.telemetry.model_loaded(model.info, model.timings.phases)
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
        self.telemetry.metrics.state.cuda = model.info.device == "cuda"
        self.telemetry.tracing.attach_kafka(self.publisher.send_raw, asyncio.get_running_loop())
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
        self.stopping = True
        drained = await self.pipeline.drain_and_stop(grace)
        await self.telemetry.tracing.shutdown()
        await self.publisher.stop()
        await self.worker.stop()
        await self.health.stop()
        if self.pipeline.failure is not None:
            log.error("stopped after a failure: %s", self.pipeline.failure)
            return 1
        log.info("stopped%s", "" if drained else " (not fully drained)")
        return 0

    async def close(self) -> None:
        """Release everything after a failed ``start()``."""
        await self.telemetry.tracing.shutdown()
        await self.publisher.stop()
        await self.worker.stop()
        await self.health.stop()


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
