"""The HTTP server for probes and scrapes: ``/healthz``, ``/readyz``, ``/metrics``.

It runs on the event loop on purpose: a ``/healthz`` answer proves the loop is responsive;
the liveness check adds that the inference thread is alive and no batch is stuck past
``http.stuck_after_s``. ``/readyz`` is 200 only once the model is loaded and warm and the
consumer has joined its group (and not while draining for shutdown).

Routes under ``/admin/`` load model directories, so each request must carry
``Authorization: Bearer <http.admin_token>``; the token is compared in constant time and never
logged.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from streamer.config import HttpConfig

log = logging.getLogger(__name__)

# A check answers (ok, reason); the supervisor's ask its workers, so they may be coroutines.
Check = Callable[[], tuple[bool, str] | Awaitable[tuple[bool, str]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler]
ADMIN_PREFIX = "/admin/"


def _bearer(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def bearer_refusal(authorization: str, expected: str | None) -> str | None:
    """Why an ``Authorization`` header does not carry ``expected`` (None: it does); the
    tokens are compared in constant time, and the answer never contains either."""
    given = _bearer(authorization)
    if given is None:
        return "no bearer token"
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        return "wrong bearer token"
    return None


class HealthServer:
    def __init__(
        self,
        cfg: HttpConfig,
        *,
        liveness: Check,
        readiness: Check,
        metrics: Callable[[], bytes | Awaitable[bytes]],
        extra_routes: list[Route] | None = None,
    ) -> None:
        self.cfg = cfg
        self._liveness, self._readiness, self._metrics = liveness, readiness, metrics
        self._extra = extra_routes or []
        self._runner: web.AppRunner | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.port != 0

    async def start(self) -> None:
        if not self.enabled:
            return
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._serve_metrics)
        for method, path, handler in self._extra:
            if path.startswith(ADMIN_PREFIX):
                if self.cfg.admin_token is None and self.cfg.admin_token_file is None:
                    raise RuntimeError(
                        f"{path} needs a bearer token: set http.admin_token "
                        "(STREAMER_HTTP__ADMIN_TOKEN) or http.admin_token_file"
                    )
                handler = self._guarded(handler)
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise RuntimeError(
                f"cannot listen on {self.cfg.host}:{self.cfg.port} for /healthz, /readyz and "
                f"/metrics ({exc}); set http.port to a free port, or 0 to turn the server off"
            ) from exc
        log.info("health and metrics on http://%s:%d", self.cfg.host, self.cfg.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _guarded(self, handler: Handler) -> Handler:
        """``handler`` behind the bearer token: 401 (and one warning, no token in it) if wrong."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                expected = self.cfg.token()
            except OSError as exc:  # the mounted file went away: fail closed, say where
                log.error(
                    "admin request %s %s refused: cannot read http.admin_token_file (%s)",
                    request.method,
                    request.path,
                    exc.strerror,
                )
                return web.json_response(
                    {"error": "the admin token cannot be read; see the service log"}, status=503
                )
            refusal = bearer_refusal(request.headers.get("Authorization", ""), expected)
            if refusal is not None:
                log.warning(
                    "admin request %s %s from %s refused: %s",
                    request.method,
                    request.path,
                    request.remote or "unknown peer",
                    refusal,
                )
                return web.json_response(
                    {"error": "unauthorized: send Authorization: Bearer <http.admin_token>"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="streamer-admin"'},
                )
            return await handler(request)

        return guarded

    @staticmethod
    async def _answer(check: Check) -> web.Response:
        answer = check()
        ok, reason = await answer if inspect.isawaitable(answer) else answer
        return web.Response(status=200 if ok else 503, text=reason + "\n")

    async def _healthz(self, _: web.Request) -> web.Response:
        return await self._answer(self._liveness)

    async def _readyz(self, _: web.Request) -> web.Response:
        return await self._answer(self._readiness)

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        body = self._metrics()
        resp = web.Response(body=await body if inspect.isawaitable(body) else body)
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        resp.charset = "utf-8"
        return resp
