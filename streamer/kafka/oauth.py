"""SASL/OAUTHBEARER token providers for aiokafka (``kafka.security.sasl_mechanism: OAUTHBEARER``).

aiokafka asks its ``sasl_oauth_token_provider`` for a token each time it opens a connection to a
broker. Short-lived tokens are rotated by whatever mounts them (a Kubernetes projected service
account token, a sidecar that refreshes a file, a workload identity agent), so the providers
here read the file or the environment variable *at each request*, never once at start-up: a
reconnect after a rotation presents the new token. For cloud IAM signers (e.g. AWS MSK IAM)
``sasl_oauth_token_provider: "module:callable"`` names the user's own provider instead.

Start-up checks (:func:`token_provider`) turn a missing file, an unset variable or an import
that fails into a :class:`~streamer.config.ConfigError` naming the key; a token that becomes
unreadable later (mid-rotation) is a retriable connection error, logged and retried by aiokafka.
Tokens are never logged.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import KafkaConnectionError

from streamer.config import ConfigError, SecurityConfig

_KEY = "kafka.security"
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class TokenUnavailable(KafkaConnectionError):
    """No token right now (an empty or missing file, an unset variable): retried like an
    unreachable broker, with the reason in aiokafka's connection log line."""


def _checked(token: str, where: str) -> str:
    token = token.strip()
    if not token:
        raise TokenUnavailable(f"{where} is empty: it should hold the OAUTHBEARER token")
    if any(c in token for c in "\x01\r\n"):
        # \x01 separates the fields of the SASL message: a token holding one would forge them
        raise TokenUnavailable(f"{where} holds a control character: not a bearer token")
    return token


@dataclass
class FileTokenProvider(AbstractTokenProvider):
    """The token in ``path`` (surrounding whitespace stripped), read at every request."""

    path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def read(self) -> str:
        where = f"{_KEY}.sasl_oauth_token_file {self.path}"
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenUnavailable(f"{where}: cannot read it ({exc.strerror})") from None
        return _checked(text, where)

    async def token(self) -> str:
        return self.read()  # a few hundred bytes from a local (tmpfs) file: no thread needed

    def extensions(self) -> dict[str, str]:
        return dict(self.extra)


@dataclass
class EnvTokenProvider(AbstractTokenProvider):
    """The token in environment variable ``name``, read at every request."""

    name: str
    extra: dict[str, str] = field(default_factory=dict)

    def read(self) -> str:
        where = f"{_KEY}.sasl_oauth_token_env: environment variable {self.name}"
        value = os.environ.get(self.name)
        if value is None:
            raise TokenUnavailable(f"{where} is not set")
        return _checked(value, where)

    async def token(self) -> str:
        return self.read()

    def extensions(self) -> dict[str, str]:
        return dict(self.extra)


def load_provider(target: str) -> AbstractTokenProvider:
    """``module:callable`` → an AbstractTokenProvider: the attribute may be a provider instance,
    or a zero-argument callable (a provider class, a factory) that returns one."""
    key = f"{_KEY}.sasl_oauth_token_provider"
    if not _TARGET.match(target):
        raise ConfigError(f"{key}: '{target}' is not module:callable (e.g. mycorp.kafka:provider)")
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{key}: cannot import module '{module_name}' ({exc}); install it in the image or "
            "fix the name"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if isinstance(obj, AbstractTokenProvider):
        return obj
    if not callable(obj):
        raise ConfigError(
            f"{key}: {target} is neither an aiokafka AbstractTokenProvider nor a callable "
            "returning one"
        )
    try:
        provider = obj()
    except Exception as exc:
        raise ConfigError(f"{key}: calling {target}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(provider, AbstractTokenProvider):
        raise ConfigError(
            f"{key}: {target}() returned {type(provider).__name__}, not an "
            "aiokafka.abc.AbstractTokenProvider (subclass it and implement `async def token()`)"
        )
    return provider


def token_provider(sec: SecurityConfig) -> AbstractTokenProvider:
    """The provider ``sec`` configures, checked now so that start-up fails with the key to fix
    rather than every connection failing later."""
    extra = dict(sec.sasl_oauth_extensions)
    if sec.sasl_oauth_token_provider is not None:
        return load_provider(sec.sasl_oauth_token_provider)
    provider: FileTokenProvider | EnvTokenProvider
    if sec.sasl_oauth_token_file is not None:
        provider = FileTokenProvider(Path(sec.sasl_oauth_token_file), extra)
    elif sec.sasl_oauth_token_env is not None:
        provider = EnvTokenProvider(sec.sasl_oauth_token_env, extra)
    else:  # the config's validator requires one source; kept for direct callers
        raise ConfigError(
            f"{_KEY}: OAUTHBEARER needs sasl_oauth_token_file, sasl_oauth_token_env or "
            "sasl_oauth_token_provider"
        )
    try:
        provider.read()
    except TokenUnavailable as exc:
        raise ConfigError(str(exc)) from None
    return provider
