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
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from streamer.config import ConfigError, ModelConfig, StreamerConfig, load_config
from streamer.kafka.tls import check_tls
from streamer.memory import freeze_gc, tune_malloc
from streamer.models.backends import create_model
from streamer.models.registry import ModelFactory, ModelRegistry, SwapFailed
from streamer.models.worker import InferenceWorker
from streamer.observability.http import HealthServer, Route
from streamer.observability.telemetry import Telemetry
from streamer.serving.api import InferenceApi
from streamer.stream.pipeline import Pipeline

log = logging.getLogger(__name__)


class Service:
    """One streamer instance: ``start()``, then ``run()`` until ``request_stop()``."""

    def __init__(
        self,
        cfg: StreamerConfig,
        *,
        model_factory: ModelFactory | None = None,
        telemetry: Telemetry | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.telemetry = telemetry or Telemetry(cfg.tracing)
        if model_factory is None:
            cfg.require_model_path()
            threads = cfg.runtime.torch_threads
            model_factory = lambda m: create_model(m, threads=threads)  # noqa: E731
        self.worker = InferenceWorker(
            cfg.runtime,
            warmup_batch_size=cfg.batching.max_batch_size,
            warmup_batch_tokens=cfg.batching.max_batch_tokens,
        )
        self.registry = ModelRegistry(self.worker, model_factory, cfg.routing)
        self.pipeline = Pipeline(
            cfg, worker=self.worker, registry=self.registry, telemetry=self.telemetry
        )
        self.publisher = self.pipeline.publisher
        self.worker.on_oom = self.pipeline.on_oom
        self.telemetry.metrics.token_budget.set(cfg.batching.max_batch_tokens)
        routes: list[Route] = []
        if cfg.http.admin:
            routes = [
                ("GET", "/admin/models", self._admin_list),
                ("POST", "/admin/models", self._admin_swap),
                ("POST", "/admin/reload", self._admin_reload),
            ]
        self.api: InferenceApi | None = None
        if cfg.http.api:  # the same models over HTTP, in the stream's batches, first
            self.api = InferenceApi(
                cfg,
                registry=self.registry,
                batcher=self.pipeline.batcher,
                telemetry=self.telemetry,
                unavailable=self._api_unavailable,
            )
            routes = [*routes, *self.api.routes()]
        self.health = HealthServer(
            cfg.http,
            liveness=self._liveness,
            readiness=self._readiness,
            metrics=self.telemetry.render,
            extra_routes=routes,
        )
        state = self.telemetry.metrics.state
        state.lag = self.pipeline.partition_lag
        state.in_flight = lambda: self.pipeline.tracker.in_flight
        state.held = lambda: self.pipeline.tracker.held
        state.oldest_uncommitted_age_s = self._oldest_uncommitted_age_s
        state.paused_partitions = self._paused_partitions
        state.assigned_partitions = lambda: len(self.pipeline.tracker.partitions())
        state.models = lambda: [
            (
                i.name,
                i.version,
                i.fingerprint,
                i.task,
                i.device,
                i.dtype,
                getattr(loaded.model, "memory_bytes", 0),
            )
            for loaded in self.registry.loaded()
            for i in (loaded.info,)
        ]
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.ready = False
        self.stopping = False

    # -- probes -------------------------------------------------------------------------------
    def _liveness(self) -> tuple[bool, str]:
        failure = self.pipeline.failure
        if failure is not None:
            return False, f"pipeline failed: {failure}"
        if self.registry.ready and not self.worker.thread_alive():
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
        if not self.registry.ready:
            return False, "loading and warming up the model"
        if not self.pipeline.joined.is_set():
            return False, "joining the consumer group"
        return True, "ready"

    def _api_unavailable(self) -> str | None:
        """Why the HTTP API cannot answer now (None: it can); the consumer need not have
        joined, since requests run on the loaded models, not on partitions."""
        if self.stopping:
            return "draining for shutdown"
        if self.pipeline.failure is not None:
            return "the pipeline failed; the service is stopping"
        if not self.ready:
            return "loading and warming up the model"
        return None

    def _oldest_uncommitted_age_s(self) -> float:
        oldest = self.pipeline.tracker.oldest_fetched_at()
        return 0.0 if oldest is None else max(0.0, time.monotonic() - oldest)

    def _paused_partitions(self) -> int:
        consumer = self.pipeline.consumer
        try:
            return len(consumer.client.paused())
        except AssertionError:  # not started yet
            return 0

    # -- lifecycle ----------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        tune_malloc(self.cfg.runtime.malloc_tuning)
        await self.health.start()
        log.info("%s", self.telemetry.tracing.describe())
        t = time.perf_counter()
        await self.worker.start()
        loaded = await self.registry.load_all(self.cfg.model_list())
        for item in loaded:
            model = item.model
            assert model is not None
            self.telemetry.model_loaded(item.info, model.timings.phases)
            phases = ", ".join(f"{k} {v:.2f}s" for k, v in model.timings.phases.items())
            log.info(
                "model %s (%s) ready on %s/%s: %s",
                item.ref,
                item.info.fingerprint[:19],
                item.info.device,
                item.info.dtype,
                phases,
            )
        log.info("%d model(s) loaded and warm in %.2fs", len(loaded), time.perf_counter() - t)
        frozen = await asyncio.get_running_loop().run_in_executor(None, freeze_gc)
        log.debug("gc: %d objects frozen out of the collector's generations", frozen)
        await check_tls(self.cfg.kafka)  # certificate problems fail here, named, not retried
        await self.publisher.start()
        self.telemetry.metrics.state.cuda = any(x.info.device == "cuda" for x in loaded)
        self.telemetry.tracing.attach_kafka(self.publisher.send_raw, asyncio.get_running_loop())
        await self.pipeline.start()
        self.ready = True
        log.info(
            "consuming %s as group '%s' from %s",
            ", ".join(self.cfg.kafka.input_topics),
            self.cfg.kafka.group_id,
            self.cfg.kafka.bootstrap_servers,
        )

    # -- changing models while running -------------------------------------------------------
    async def swap_model(self, cfg: ModelConfig) -> str:
        """Load ``cfg`` beside the serving version; new records use it once it is warm."""
        loaded = await self.registry.swap(cfg)
        assert loaded.model is not None
        self.telemetry.model_loaded(loaded.info, loaded.model.timings.phases)
        return loaded.ref

    async def reload(self) -> list[str]:
        """Re-read the config file (SIGHUP) and swap every model whose entry changed."""
        if self.config_path is None:
            raise ConfigError("no config file to re-read (started without --config)")
        new = load_config(self.config_path)
        changed = []
        for cfg in new.model_list():
            current = {x.info.name: x for x in self.registry.active()}.get(cfg.name)
            if current is None or current.cfg != cfg:
                changed.append(await self.swap_model(cfg))
        other = {k for k in StreamerConfig.model_fields if k not in ("model", "models")}
        if any(getattr(new, k) != getattr(self.cfg, k) for k in other):
            log.warning("reload: only models change while running; restart for other settings")
        return changed

    def request_reload(self) -> None:
        """SIGHUP: re-read the config file in the background; failures leave all as it was."""

        async def reload() -> None:
            try:
                changed = await self.reload()
                log.info("reload: %s", ", ".join(changed) or "no model changed")
            except (ConfigError, SwapFailed) as exc:
                log.error("reload failed, serving as before: %s", exc)

        task = asyncio.ensure_future(reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _admin_list(self, _: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "name": x.info.name,
                    "version": x.info.version,
                    "fingerprint": x.info.fingerprint,
                    "active": not x.retired,
                    "in_flight": x.in_flight,
                }
                for x in self.registry.loaded()
            ]
        )

    async def _admin_swap(self, request: web.Request) -> web.Response:
        """POST a model entry (as in the config file) to load it beside the current one."""
        try:
            body = await request.json()
            current = {x.info.name: x.cfg for x in self.registry.active()}.get(body.get("name"))
            base = current.model_dump() if current is not None else {}
            cfg = ModelConfig(**{**base, **body})
        except (ValueError, ValidationError, AttributeError) as exc:
            return web.json_response({"error": f"bad model entry: {exc}"}, status=400)
        try:
            ref = await self.swap_model(cfg)
        except SwapFailed as exc:
            return web.json_response({"error": str(exc)}, status=422)
        return web.json_response({"serving": ref})

    async def _admin_reload(self, _: web.Request) -> web.Response:
        try:
            return web.json_response({"swapped": await self.reload()})
        except (ConfigError, SwapFailed) as exc:
            return web.json_response({"error": str(exc)}, status=422)

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
        if self.api is not None:  # requests still waiting get 503 (none once drained)
            self.api.close()
        await self.telemetry.tracing.shutdown()
        await self.publisher.stop(timeout_s=5.0)
        await self.worker.stop()
        await self.health.stop()
        if self.pipeline.failure is not None:
            log.error("stopped after a failure: %s", self.pipeline.failure)
            return 1
        log.info("stopped%s", "" if drained else " (not fully drained)")
        return 0

    async def close(self) -> None:
        """Release everything after a failed ``start()``."""
        if self.api is not None:
            self.api.close()
        await self.telemetry.tracing.shutdown()
        await self.publisher.stop()
        await self.worker.stop()
        await self.health.stop()


async def serve(cfg: StreamerConfig, config_path: Path | None = None) -> int:
    """``streamer run``: the service in the foreground until SIGTERM/SIGINT; SIGHUP reloads."""
    service = Service(cfg, config_path=config_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    loop.add_signal_handler(signal.SIGHUP, service.request_reload)
    # start() may retry an unreachable (or refusing) broker for ever: SIGTERM must end that too.
    starting = asyncio.ensure_future(service.start())
    stop = asyncio.ensure_future(service._stop.wait())
    try:
        await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.wait({starting})
            log.info("stopped during start-up (nothing consumed yet)")
            await service.close()
            return 0
        starting.result()
    except BaseException:
        await service.close()
        raise
    finally:
        stop.cancel()
    return await service.run()
