"""The loaded models, routing, and version changes while running.

A record is *bound* to one loaded model version when it is routed (before tokenization, since
a tokenizer belongs to its weights) and keeps it until its batch has run. A swap loads and
warms the new version beside the old one on the loader thread; once ready, records routed from
then on bind to it, records already bound finish on the old one, and the old one is released
when the last of them has run. A version that fails to load leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from streamer.config import ModelConfig, RoutingConfig
from streamer.models.hf import TextModel
from streamer.models.worker import InferenceWorker
from streamer.stream.codec import header
from streamer.stream.records import Headers, ModelInfo, RecordError

log = logging.getLogger(__name__)

ModelFactory = Callable[[ModelConfig], TextModel]


class UnknownModel(RecordError):
    stage = "route"


class SwapFailed(RuntimeError):
    """A new version could not be loaded or warmed up; the old one keeps serving."""


@dataclass(eq=False)
class Loaded:
    """One loaded model version and the records bound to it."""

    cfg: ModelConfig
    info: ModelInfo
    model: TextModel | None
    in_flight: int = 0
    retired: bool = False

    @property
    def ref(self) -> str:
        return f"{self.info.name}@{self.info.version}"


class ModelRegistry:
    def __init__(
        self,
        worker: InferenceWorker,
        factory: ModelFactory,
        routing: RoutingConfig,
        *,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._worker = worker
        self._factory = factory
        self._routing = routing
        self._on_change = on_change or (lambda: None)
        self._active: dict[str, Loaded] = {}
        self._versions: dict[str, dict[str, Loaded]] = {}
        self._default: str | None = routing.default
        self._swap_lock = asyncio.Lock()
        self._holds = 0  # routing calls in progress off the loop

    # -- loading ------------------------------------------------------------------------------
    async def load_all(self, cfgs: list[ModelConfig]) -> list[Loaded]:
        """Load every configured model before the consumer joins (a start-up failure is fatal)."""
        loaded = []
        for cfg in cfgs:
            loaded.append(await self._load(cfg))
            self._activate(loaded[-1])
        if self._default is None and cfgs:
            self._default = cfgs[0].name
        return loaded

    async def _load(self, cfg: ModelConfig) -> Loaded:
        model = await self._worker.load(lambda: self._factory(cfg))
        return Loaded(cfg, model.info, model)

    def _activate(self, new: Loaded) -> Loaded | None:
        name = new.info.name
        old = self._active.get(name)
        self._active[name] = new
        self._versions.setdefault(name, {})[new.info.version] = new
        self._on_change()
        if old is not None and old is not new:
            old.retired = True
            self._maybe_release(old)
        return old

    async def swap(self, cfg: ModelConfig) -> Loaded:
        """Load ``cfg`` beside the serving version, then switch new records to it."""
        async with self._swap_lock:
            current = self._active.get(cfg.name)
            if current is not None and current.cfg == cfg and not current.retired:
                return current
            log.info("loading %s beside %s", cfg.ref, current.ref if current else "nothing")
            try:
                new = await self._load(cfg)
            except Exception as exc:
                log.error(
                    "new version %s failed to load (%s: %s); %s keeps serving",
                    cfg.ref,
                    type(exc).__name__,
                    exc,
                    current.ref if current else "nothing",
                )
                raise SwapFailed(f"{cfg.ref} failed to load: {type(exc).__name__}: {exc}") from exc
            old = self._activate(new)
            log.info(
                "%s now serves new records%s",
                new.ref,
                f"; {old.ref} finishes {old.in_flight} in flight" if old else "",
            )
            return new

    def _maybe_release(self, loaded: Loaded) -> None:
        if (
            loaded.retired
            and loaded.in_flight <= 0
            and not self._holds
            and loaded.model is not None
        ):
            versions = self._versions.get(loaded.info.name, {})
            if versions.get(loaded.info.version) is loaded:
                del versions[loaded.info.version]
            loaded.model = None
            self._worker.free_memory(loaded.info.device == "cuda")  # off the event loop
            log.info("released %s", loaded.ref)
            self._on_change()

    # -- routing ------------------------------------------------------------------------------
    def route(self, topic: str, headers: Headers) -> Loaded:
        """The loaded version a record asks for (header), else its topic's, else the default.

        Raises :class:`UnknownModel` for a name or version that is not loaded. Runs on the
        prepare thread: it only reads; :meth:`hold` keeps what it returns loaded meanwhile.
        """
        wanted = header(headers, self._routing.header) if headers else None
        if wanted is not None:
            text = wanted.decode("utf-8", "replace").strip()
            name, _, version = text.partition("@")
            if version:
                loaded = self._versions.get(name, {}).get(version)
                if loaded is None or loaded.model is None:
                    raise UnknownModel(
                        f"header {self._routing.header}={text!r}: version {version!r} of "
                        f"{name!r} is not loaded (loaded: {', '.join(self.refs()) or 'none'})"
                    )
                return loaded
            loaded = self._active.get(name)
            if loaded is None:
                raise UnknownModel(
                    f"header {self._routing.header}={text!r}: no model named {name!r} "
                    f"(loaded: {', '.join(self.refs()) or 'none'})"
                )
            return loaded
        name = self._routing.by_topic.get(topic, self._default)
        loaded = self._active.get(name or "")
        if loaded is None:
            raise UnknownModel(f"no model for topic {topic!r} and no default model")
        return loaded

    def resolve(self, wanted: str | None) -> Loaded:
        """The loaded version ``wanted`` names (``name`` or ``name@version``; None or empty:
        the default model), for callers that name a model themselves (the HTTP API).

        Raises :class:`UnknownModel`, listing what is loaded.
        """
        name, _, version = (wanted or "").strip().partition("@")
        name = name or self._default or ""
        loaded = self._versions.get(name, {}).get(version) if version else self._active.get(name)
        if loaded is None or loaded.model is None:
            what = (
                f"version {version!r} of {name!r} is not loaded"
                if version
                else (f"no model named {name!r}")
            )
            raise UnknownModel(f"{what} (loaded: {', '.join(self.refs()) or 'none'})")
        return loaded

    def hold(self) -> None:
        """No version is released until :meth:`unhold` (while records are routed off the loop)."""
        self._holds += 1

    def unhold(self) -> None:
        self._holds -= 1
        if self._holds == 0:
            for loaded in self.loaded():
                self._maybe_release(loaded)

    def acquire(self, loaded: Loaded, n: int = 1) -> None:
        loaded.in_flight += n

    def release(self, loaded: Loaded, n: int = 1) -> None:
        loaded.in_flight -= n
        self._maybe_release(loaded)

    # -- reporting ----------------------------------------------------------------------------
    def refs(self) -> list[str]:
        return [
            f"{name}@{v}"
            for name, versions in self._versions.items()
            for v, loaded in versions.items()
            if loaded.model is not None
        ]

    def loaded(self) -> list[Loaded]:
        return [
            loaded
            for versions in self._versions.values()
            for loaded in versions.values()
            if loaded.model is not None
        ]

    def active(self) -> list[Loaded]:
        return list(self._active.values())

    @property
    def ready(self) -> bool:
        return bool(self._active)
