"""/admin/* behind a bearer token: config refuses an unguarded admin, the server checks tokens.

The server tests run the real aiohttp server on a loopback port and call it with a real client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from streamer.config import ConfigError, HttpConfig, load_config
from streamer.kafka.broker import free_port
from streamer.observability.http import HealthServer

TOKEN = "s3cret-admin-token-9f2c"


async def _ping(_: web.Request) -> web.Response:
    return web.json_response({"pong": True})


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    """A HealthServer with one admin route; ``request.param``: HttpConfig keyword arguments."""
    cfg = HttpConfig(host="127.0.0.1", port=free_port(), admin=True, **request.param)
    srv = HealthServer(
        cfg,
        liveness=lambda: (True, "ok"),
        readiness=lambda: (True, "ready"),
        metrics=lambda: b"",
        extra_routes=[("GET", "/admin/ping", _ping)],
    )
    await srv.start()
    try:
        yield cfg.port
    finally:
        await srv.stop()


async def call(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}{path}", headers=headers) as resp:
            body = await resp.json()
            return resp.status, {"body": body, "www": resp.headers.get("WWW-Authenticate")}


@pytest.mark.parametrize("server", [{"admin_token": TOKEN}], indirect=True)
async def test_admin_needs_the_right_bearer_token(
    server: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, got = await call(server, "/admin/ping")
    assert status == 401
    assert got["www"] is not None and got["www"].startswith("Bearer")
    assert "Authorization: Bearer" in got["body"]["error"]  # says what to send

    wrong = "s3cret-admin-token-9f2d"  # differs in the last character only
    status, got = await call(server, "/admin/ping", {"Authorization": f"Bearer {wrong}"})
    assert status == 401 and got["www"].startswith("Bearer")
    status, _ = await call(server, "/admin/ping", {"Authorization": f"Basic {TOKEN}"})
    assert status == 401  # the token under another scheme is not a bearer token

    status, got = await call(server, "/admin/ping", {"Authorization": f"Bearer {TOKEN}"})
    assert (status, got["body"]) == (200, {"pong": True})
    status, _ = await call(server, "/admin/ping", {"Authorization": f"bearer {TOKEN}"})
    assert status == 200  # the scheme is case-insensitive (RFC 7235)

    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3  # one line per refused request
    for r in refusals:
        line = r.getMessage()
        assert r.levelno == logging.WARNING
        assert "/admin/ping" in line and "127.0.0.1" in line  # the path and the peer
    every_line = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in every_line and wrong not in every_line


async def test_admin_token_file_is_read_per_request(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")  # a trailing newline, as `kubectl create secret` leaves
    cfg = HttpConfig(host="127.0.0.1", port=free_port(), admin=True, admin_token_file=token_file)
    srv = HealthServer(
        cfg,
        liveness=lambda: (True, "ok"),
        readiness=lambda: (True, "ready"),
        metrics=lambda: b"",
        extra_routes=[("GET", "/admin/ping", _ping)],
    )
    await srv.start()
    try:
        port = cfg.port
        assert (await call(port, "/admin/ping", {"Authorization": f"Bearer {TOKEN}"}))[0] == 200
        token_file.write_text("rotated-token\n")  # a rotated Secret takes effect at once
        assert (await call(port, "/admin/ping", {"Authorization": f"Bearer {TOKEN}"}))[0] == 401
        good = {"Authorization": "Bearer rotated-token"}
        assert (await call(port, "/admin/ping", good))[0] == 200
        token_file.unlink()  # the file went away: closed, and it says so
        status, got = await call(port, "/admin/ping", good)
        assert status == 503 and "cannot be read" in got["body"]["error"]
    finally:
        await srv.stop()


async def test_probes_and_metrics_need_no_token() -> None:
    cfg = HttpConfig(host="127.0.0.1", port=free_port(), admin=True, admin_token=TOKEN)
    srv = HealthServer(
        cfg,
        liveness=lambda: (True, "ok"),
        readiness=lambda: (True, "ready"),
        metrics=lambda: b"# metrics\n",
        extra_routes=[("GET", "/admin/ping", _ping)],
    )
    await srv.start()
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/readyz", "/metrics"):
                async with http.get(f"http://127.0.0.1:{cfg.port}{path}") as resp:
                    assert resp.status == 200, path
    finally:
        await srv.stop()


async def test_admin_routes_without_a_token_are_never_served() -> None:
    srv = HealthServer(
        HttpConfig(host="127.0.0.1", port=free_port()),
        liveness=lambda: (True, "ok"),
        readiness=lambda: (True, "ready"),
        metrics=lambda: b"",
        extra_routes=[("GET", "/admin/ping", _ping)],
    )
    with pytest.raises(RuntimeError, match=r"http\.admin_token"):
        await srv.start()
    await srv.stop()


def test_config_refuses_admin_without_a_token() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, http={"admin": True})
    msg = str(info.value)
    assert "http.admin_token" in msg and "STREAMER_HTTP__ADMIN_TOKEN" in msg
    assert "http.admin_token_file" in msg


def test_config_takes_the_token_from_the_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMER_HTTP__ADMIN_TOKEN", TOKEN)
    cfg = load_config(None, http={"admin": True})
    assert cfg.http.token() == TOKEN
    assert TOKEN not in repr(cfg) and TOKEN not in str(cfg.http)
    monkeypatch.delenv("STREAMER_HTTP__ADMIN_TOKEN")

    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    cfg = load_config(None, http={"admin": True, "admin_token_file": str(token_file)})
    assert cfg.http.token() == TOKEN  # stripped, like sasl_password_file


def test_config_refuses_empty_or_missing_tokens(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="admin_token is empty"):
        load_config(None, http={"admin": True, "admin_token": "  "})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, http={"admin": True, "admin_token_file": str(tmp_path / "nope")})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(None, http={"admin": True, "admin_token_file": str(empty)})
