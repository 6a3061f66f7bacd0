"""uni-api: one OpenAI-compatible endpoint in front of many LLM providers.

Owns the CLI, reading api.yaml into frozen records, authentication, the request flow (admission, failover,
attempts), the shared aiohttp session, stats and the one renderer of error envelopes. Wire formats, and the
client APIs ("faces": OpenAI chat, Anthropic Messages, OpenAI Responses, Gemini), live in adapters.py;
scheduling arithmetic in scheduler.py. The sections follow a request:

  Config        constants, errors, config records, parsing, loading; routing (which channels serve what)
  App           Gateway (one config's runtime state), create_app, start-up, config reload
  Routes        face_route (one per client API), the error renderer, then routes particular to Anthropic
                count_tokens, the OpenAI Responses store and compact, and Gemini's paths
  Auth          client keys; request bodies (size cap, Content-Encoding)
  Request flow  face_flow: admission (rate limits), moderation, failover over channels and keys (Flow)
  Shared state  the same limits, cooldowns and key benches through Redis, when `state:` is set
  Attempts      face_sender, chat_sender, native_attempt: one try of one channel, a stream committed at its
                first output and relayed in the client's format; transport (timeouts, OAuth tokens)
  Operations    stats, the request log, /metrics, /status, connection guards, --workers
  CLI           main() -> run()
"""

from __future__ import annotations

import os
import sys

# Run as a script, uni_api.py re-executes itself as an import, here, before anything else is imported: CPython
# keeps a script's whole syntax tree (about 7 MB for this file) until the script returns, which for a server is
# never. The new image has the same pid, interpreter flags and arguments; like a script's own sys.path[0], the
# folder searched is the one of the file a symlink points to. UNI_API_NO_REEXEC=1 turns it off, and it stays off
# under a debugger, coverage or a profiler (a trace or profile hook is set, or one of their modules is loaded):
# os.execv would replace the process they watch with one they do not.
if (__name__ == "__main__" and __spec__ is None and os.name == "posix" and sys.executable
        and globals().get("__file__") and os.environ.get("UNI_API_NO_REEXEC", "").lower() not in ("1", "true", "yes")
        and sys.gettrace() is None and sys.getprofile() is None
        and not any(name in sys.modules for name in ("pdb", "bdb", "pydevd", "debugpy", "coverage", "cProfile",
                                                     "profile", "pyinstrument", "yappi", "trace"))):
    _flags = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
    os.execv(sys.executable, [sys.executable, *_flags, "-c", "import os, sys; sys.path.insert(0, os.path.dirname("
             "sys.argv.pop(1))); import uni_api; sys.exit(uni_api.main())", os.path.realpath(__file__), *sys.argv[1:]])

import argparse
import asyncio
import base64
import bisect
import contextlib
import datetime
import gc
import hashlib
import hmac
import html
import importlib.util
import logging
import math
import re
import signal
import socket
import sqlite3
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, TypeVar

import aiohttp
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.scalarbool import ScalarBoolean
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import adapters
from adapters import ADAPTERS, Adapter, Face, Provider, Target, UpstreamError, UpstreamRequest
from scheduler import (
    Channel,
    KeyPool,
    ModelTable,
    RateLimit,
    Scheduler,
    Strategy,
    parse_rate_limits,
    resolve_timeout,
)

# --- Constants ---


VERSION: Final = (Path(__file__).with_name("VERSION").read_text().strip()
                  if Path(__file__).with_name("VERSION").exists() else "0.0.0")
STARTUP_FAILURE: Final = 3
DEFAULT_TIMEOUT: Final = 100.0
DEFAULT_BODY_LIMIT: Final = 32 * 1024 * 1024
DEFAULT_COOLDOWN: Final = 300.0
UPSTREAM_BODY_LIMIT: Final = 64 * 1024 * 1024
CONFIG_FETCH_LIMIT: Final = 4 * 1024 * 1024
CONFIG_FETCH_TIMEOUT: Final = 15.0
DISCOVERY_TIMEOUT: Final = 15.0
TOKEN_REFRESH_MARGIN: Final = 300.0
STRATEGY_NAMES: Final = ("fixed_priority", "round_robin", "weighted_round_robin", "lottery", "random")
KEY_STRATEGY_NAMES: Final = ("round_robin", "random", "fixed_priority")
PROXY_SCHEMES: Final = ("http", "https", "socks4", "socks5", "socks5h")
SPEEDUPS: Final = ("uvloop", "httptools", "orjson")
MODERATION_MODELS: Final = ("omni-moderation-latest", "text-moderation-latest")  # ENABLE_MODERATION's, in order
CONFIG_POLL_SECONDS: Final = 2.0  # how often a local config file's mtime and size are checked
STATE_URL_SCHEMES: Final = ("redis://", "rediss://", "unix://")  # what redis-py's from_url reads; Valkey too
DEFAULT_STATE_PREFIX: Final = "uni-api"
DEFAULT_STATE_TIMEOUT: Final = 0.25  # seconds: connect and reply; a dead Redis never holds a request longer

logger = logging.getLogger("uni_api")


# --- Errors ---


class GatewayError(Exception):
    """An error answered to the client in the OpenAI envelope."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, headers: Mapping[str, str] | None = None,
                 type_: str | None = None, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        self.status = status or self.status
        self.type = type_ or self.type
        self.code = code or self.code
        self.headers = dict(headers or {})


class InvalidRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class PayloadTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class UnsupportedEncoding(GatewayError):
    status, type, code = 415, "invalid_request_error", "unsupported_content_encoding"


class InvalidApiKey(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class ModelNotAllowed(GatewayError):
    status, type, code = 403, "permission_error", "model_not_allowed"


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RateLimited(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class AllChannelsFailed(GatewayError):
    status, type, code = 502, "upstream_error", "all_channels_failed"


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


# Statuses of Starlette's own HTTPException (unknown route, wrong method) in the same envelope.
_HTTP_ERROR_TYPES: Final[Mapping[int, str]] = MappingProxyType(
    {404: "invalid_request_error", 405: "invalid_request_error"}
)


# --- Config records ---


class ConfigError(Exception):
    """A bad api.yaml; str() is the one-line startup message."""


@dataclass(frozen=True, slots=True)
class Policy:
    """A provider's scheduling and transport settings, resolved against the global preferences."""

    keys: KeyPool
    cooldown_s: float
    timeouts: ModelTable[float] | None
    proxy: str | None


@dataclass(frozen=True, slots=True)
class Rule:
    """One entry of an api key's `model:` list."""

    kind: Literal["all", "model", "provider", "key"]
    name: str = ""  # provider name or client key for provider/key rules
    model: str = "*"  # alias, or "*" for every model of the provider or key
    weight: int = 0


@dataclass(frozen=True, slots=True)
class ApiKey:
    token: str
    rules: tuple[Rule, ...]
    role: str = "user"
    strategy: Strategy = "fixed_priority"
    retries: int | None = None  # extra attempts after the first; None: every eligible channel and key
    rate_limits: ModelTable[tuple[RateLimit, ...]] | None = None
    moderation: bool = False

    @property
    def label(self) -> str:
        """A short prefix for logs, never the whole key."""
        return self.token[:7] + "..."


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """preferences.responses_store: how many stored responses (POST /v1/responses with store) are kept, in all
    bytes and for how long; the oldest go first. In memory only: a restart forgets them."""

    max_count: int = 1000
    max_bytes: int = 64 * 1024 * 1024
    max_age: float = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class StateOptions:
    """`state:`: the Redis (or Valkey) where workers and instances share rate windows, cooldowns and benches."""

    redis_url: str
    prefix: str = DEFAULT_STATE_PREFIX
    on_error: Literal["open", "closed"] = "open"  # Redis unreachable: decide locally, or answer 503
    timeout_s: float = DEFAULT_STATE_TIMEOUT


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    providers: Mapping[str, Provider]
    policies: Mapping[str, Policy]
    api_keys: tuple[ApiKey, ...]
    timeouts: ModelTable[float] | None = None
    rate_limits: ModelTable[tuple[RateLimit, ...]] | None = None
    error_triggers: tuple[str, ...] = ()
    body_limit: int = DEFAULT_BODY_LIMIT
    default_timeout: float = DEFAULT_TIMEOUT
    request_timeout: float | None = None  # cap on one request's attempts; None: twice the first's, 0: no cap
    keys_by_digest: Mapping[bytes, ApiKey] = field(default_factory=lambda: MappingProxyType({}))
    secrets: re.Pattern[str] | None = None  # every key and credential of this config, for redacting DEBUG logs
    responses_store: StoreLimits = StoreLimits()
    placeholders: tuple[str, ...] = ()  # "file:line: key path" of each value left as api.yaml.example's
    state: StateOptions | None = None  # None: this process's memory holds all scheduling state


# --- Config parsing ---


_ENV_PATTERN: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SIZE_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
)
T = TypeVar("T")


class _Node:
    """Typed access to one YAML mapping; every error names file, line and key path."""

    def __init__(self, data: Any, path: str, source: str, line: int = 0) -> None:
        self.data, self.path, self.source, self.line = data, path, source, line
        if not isinstance(data, CommentedMap):
            raise self.error(f"expected a mapping, got {_type_name(data)}")

    def error(self, message: str, key: str | None = None) -> ConfigError:
        line = self.line
        if key is not None and isinstance(self.data, CommentedMap) and key in self.data:
            line = self.data.lc.key(key)[0]
        elif isinstance(self.data, CommentedMap) and self.data.lc.line is not None:  # None: made here, not read
            line = self.data.lc.line
        where = f"{self.path}.{key}" if key and self.path else (key or self.path or "<root>")
        return _config_error(self.source, line, where, message)

    def child_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kinds: type | tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.error(f"missing required key '{key}'")
            return default
        value = self.data[key]  # ${VAR} placeholders were expanded once, on load
        allowed = kinds if isinstance(kinds, tuple) else (kinds,)
        if str not in allowed:
            value = _typed(value)
        if isinstance(value, bool) and bool not in allowed:
            raise self.error(f"expected {_kind_names(kinds)}, got a boolean", key)
        if not isinstance(value, kinds):
            raise self.error(f"expected {_kind_names(kinds)}, got {_type_name(value)}", key)
        return value

    def mapping(self, key: str) -> _Node | None:
        value = self.get(key, dict)
        return None if value is None else _Node(value, self.child_path(key), self.source, self.data.lc.line)

    def items(self, key: str) -> list[tuple[str, Any, int]]:
        """A list's entries as (path, value, line)."""
        value = self.get(key, list, [])
        lines = [value.lc.item(i)[0] if isinstance(value, CommentedSeq) else self.line for i in range(len(value))]
        return [(f"{self.child_path(key)}[{i}]", item, lines[i]) for i, item in enumerate(value)]

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(f"unknown key '{key}'", str(key))


def _source_name(source: str) -> str:
    """How messages name the config: a URL in full, a path by its file name."""
    return source if "://" in source else Path(source).name


def _config_error(source: str, line: int, path: str, message: str) -> ConfigError:
    return ConfigError(f"{_source_name(source)}:{line + 1}: {path}: {message}")


def _type_name(value: Any) -> str:
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, str):  # _FromEnv too
        return "a string"
    return {dict: "a mapping", CommentedMap: "a mapping", list: "a list", CommentedSeq: "a list",
            int: "a number", float: "a number", bool: "a boolean"}.get(type(value), "nothing")


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "true or false", dict: "a mapping",
             list: "a list", datetime.date: "a date"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


class _FromEnv(str):
    """A string that ${VAR} expansion made. The environment holds only strings, so where the config wants a
    number or true/false, such a value is read as one: `timeout: ${TIMEOUT:-30}`."""


def _typed(value: Any) -> Any:
    """A _FromEnv string as the finite number or true/false it spells; anything else unchanged."""
    if not isinstance(value, _FromEnv):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            number = kind(text)
            return number if math.isfinite(number) else value
    return value


def _expand_env(value: Any, source: str, path: str, line: int) -> Any:
    """`${VAR}` and `${VAR:-default}` in every string value, once, in place; errors name the value's path.

    `${VAR:-d}` gives d when VAR is unset or empty, as the shell does; `${VAR}` gives "" when VAR is set but
    empty and is an error when VAR is unset. Mapping keys are left alone, except the model names of
    `upstream: alias` renames and weighted rules, which their parsers expand.
    """
    if isinstance(value, str):
        if "${" not in value:
            return value

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            if found is None or (found == "" and default is not None):
                if default is None:
                    raise _config_error(source, line, path, f"environment variable {name} is not set")
                return default
            return found

        return _FromEnv(_ENV_PATTERN.sub(substitute, value))
    if isinstance(value, CommentedMap):
        for k in list(value):
            child = f"{path}.{k}" if path else str(k)
            value[k] = _expand_env(value[k], source, child, value.lc.key(k)[0])
    elif isinstance(value, CommentedSeq):
        for i, item in enumerate(value):
            value[i] = _expand_env(item, source, f"{path}[{i}]", value.lc.item(i)[0])
    return value


_PROVIDER_KEYS: Final = ("provider", "base_url", "api", "model", "tools", "engine", "notes", "proxy",
                         "project_id", "private_key", "client_email", "region", "token_uri", "cf_account_id",
                         "aws_access_key", "aws_secret_key", "api_version", "preferences")
_PROVIDER_EXTRA: Final = ("project_id", "private_key", "client_email", "region", "token_uri", "cf_account_id",
                          "aws_access_key", "aws_secret_key", "api_version")
_PROVIDER_PREFS: Final = ("api_key_rate_limit", "api_key_cooldown_period", "api_key_schedule_algorithm",
                          "model_timeout", "cooldown_period", "proxy", "headers", "post_body_parameter_overrides",
                          "prompt_cache")
_KEY_KEYS: Final = ("api", "model", "role", "preferences")
_KEY_PREFS: Final = ("SCHEDULING_ALGORITHM", "AUTO_RETRY", "rate_limit", "ENABLE_MODERATION")
_STATE_KEYS: Final = ("redis_url", "prefix", "on_error", "timeout")
_GLOBAL_PREFS: Final = ("model_timeout", "cooldown_period", "rate_limit", "error_triggers", "proxy",
                        "max_body_size", "request_timeout", "prompt_cache", "responses_store")
PROMPT_CACHE_MODES: Final = ("off", "auto")  # auto: cache breakpoints added for Claude channels (adapters)


@dataclass(frozen=True, slots=True)
class _Globals:
    timeouts: ModelTable[float] | None
    cooldown_s: float
    rate_limits: ModelTable[tuple[RateLimit, ...]] | None
    proxy: str | None
    prompt_cache: bool


def parse_config(text: str, source: str, env_timeout: float = DEFAULT_TIMEOUT,
                 env_redis_url: str | None = None) -> Config:
    """api.yaml text to frozen records; raises ConfigError naming file, line and key path.

    `env_redis_url` ($REDIS_URL) turns shared state on when api.yaml has no `state:`, and fills its `redis_url`."""
    try:
        raw = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{_source_name(source)}:{line}: YAML syntax error: {exc.problem or exc.context}") from None
    root = _Node(_expand_env(raw, source, "", 0) if raw is not None else CommentedMap(), "", source)
    placeholders = tuple(_placeholders(root.data, source, "", 0))
    root.check_keys(("providers", "api_keys", "preferences", "state"))
    prefs = root.mapping("preferences") or _Node(CommentedMap(), "preferences", source)
    prefs.check_keys(_GLOBAL_PREFS)
    glob = _Globals(_timeouts(prefs, "model_timeout"), _seconds(prefs, "cooldown_period", DEFAULT_COOLDOWN),
                    _rate_table(prefs, "rate_limit"), _proxy(prefs, "proxy"), _prompt_cache(prefs, False))
    providers: dict[str, Provider] = {}
    policies: dict[str, Policy] = {}
    for path, item, line in root.items("providers"):
        provider, policy = _parse_provider(_Node(item, path, source, line), glob)
        if provider.name in providers:
            raise _Node(item, path, source, line).error(f"duplicate provider name '{provider.name}'", "provider")
        providers[provider.name], policies[provider.name] = provider, policy
    if not providers:
        raise root.error("missing required key 'providers' (a list with at least one provider)")
    entries = root.items("api_keys")
    tokens = {str(item.get("api")) for _, item, _ in entries if isinstance(item, dict)}
    digests: dict[bytes, ApiKey] = {}
    for path, item, line in entries:
        node = _Node(item, path, source, line)
        key = _parse_api_key(node, providers, tokens)
        if _digest(key.token) in digests:
            raise node.error("duplicate api key (an earlier api_keys entry has the same one)", "api")
        digests[_digest(key.token)] = key
    keys = tuple(digests.values())
    if not keys:
        raise root.error("missing required key 'api_keys' (a list with at least one key)")
    _check_key_references(keys, root)
    triggers = tuple(str(t) for t in prefs.get("error_triggers", list, []))
    config = Config(
        source=source,
        providers=MappingProxyType(providers),
        policies=MappingProxyType(policies),
        api_keys=keys,
        timeouts=glob.timeouts,
        rate_limits=glob.rate_limits,
        error_triggers=triggers,
        body_limit=_size(prefs, "max_body_size", DEFAULT_BODY_LIMIT),
        default_timeout=env_timeout,
        request_timeout=None if prefs.get("request_timeout", (int, float)) is None
        else _seconds(prefs, "request_timeout", 0.0),
        keys_by_digest=MappingProxyType(digests),
        secrets=_secrets_pattern(providers.values(), keys),
        responses_store=_store_limits(prefs.mapping("responses_store")),
        placeholders=placeholders,
        state=_parse_state(root, env_redis_url),
    )
    _check_moderation_rules(config, entries)
    return config


# api.yaml.example's stand-ins for keys and ids (sk-replace-me, gsk-replace-me-1, ...): the start warns of each.
PLACEHOLDER: Final = "replace-me"


def _placeholders(value: Any, source: str, path: str, line: int) -> Iterator[str]:
    """Where a value still holds an example placeholder, as "file:line: key path"."""
    if isinstance(value, str) and PLACEHOLDER in value:
        yield f"{_source_name(source)}:{line + 1}: {path}"
    elif isinstance(value, CommentedMap):
        for key in value:
            yield from _placeholders(value[key], source, f"{path}.{key}" if path else str(key), value.lc.key(key)[0])
    elif isinstance(value, CommentedSeq):
        for i, item in enumerate(value):
            yield from _placeholders(item, source, f"{path}[{i}]", value.lc.item(i)[0])


def _parse_state(root: _Node, env_redis_url: str | None) -> StateOptions | None:
    node = root.mapping("state")
    if node is None:
        return _redis_installed(root, StateOptions(env_redis_url)) if env_redis_url else None
    node.check_keys(_STATE_KEYS)
    url = node.get("redis_url", str, env_redis_url)
    if not url:
        raise node.error("missing required key 'redis_url' (or set REDIS_URL)")
    if not url.startswith(STATE_URL_SCHEMES):
        raise node.error("expected a redis://, rediss:// or unix:// URL", "redis_url")
    prefix = node.get("prefix", str, DEFAULT_STATE_PREFIX)
    if not prefix.strip():
        raise node.error("expected a non-empty string", "prefix")
    on_error = node.get("on_error", str, "open")
    if on_error not in ("open", "closed"):
        raise node.error(f"expected open or closed, got {on_error!r}", "on_error")
    timeout = _seconds(node, "timeout", DEFAULT_STATE_TIMEOUT)
    if timeout <= 0:
        raise node.error("expected a number of seconds > 0", "timeout")
    return _redis_installed(node, StateOptions(url, prefix, on_error, timeout))


def _redis_installed(node: _Node, options: StateOptions) -> StateOptions:
    if importlib.util.find_spec("redis") is None:
        raise node.error("shared state needs the package redis (pip install redis; it is in requirements.txt)")
    return options


def _parse_provider(node: _Node, glob: _Globals) -> tuple[Provider, Policy]:
    node.check_keys(_PROVIDER_KEYS)
    name = node.get("provider", str, required=True)
    engine = node.get("engine", str)
    if engine is not None and engine not in ADAPTERS:
        raise node.error(f"unknown engine '{engine}' (known: {', '.join(ADAPTERS)})", "engine")
    base_url = node.get("base_url", str)
    if base_url is None:
        default = ADAPTERS[engine].default_base_url if engine else None
        if not default:
            raise node.error("missing required key 'base_url'")
        base_url = default
    if not re.match(r"^https?://[^/\s]+", base_url):
        raise node.error("expected a URL", "base_url")
    api = node.get("api", (str, list), ())
    keys = (api,) if isinstance(api, str) else tuple(str(k) for k in api)
    prefs = node.mapping("preferences") or _Node(CommentedMap(), node.child_path("preferences"), node.source)
    prefs.check_keys(_PROVIDER_PREFS)
    extra = {k: str(node.get(k, (str, int, datetime.date))) for k in _PROVIDER_EXTRA
             if node.get(k, (str, int, datetime.date)) is not None}  # an unquoted api_version reads as a date
    provider = Provider(
        name=name,
        engine=adapters.infer_engine(base_url, "", engine),
        engine_forced=engine is not None,
        base_url=base_url,
        api_keys=keys,
        models=_parse_models(node),
        headers=_headers(prefs),
        overrides=_overrides(prefs),
        tools=node.get("tools", bool, True),
        extra=MappingProxyType(extra),
        prompt_cache=_prompt_cache(prefs, glob.prompt_cache),
    )
    for required in ADAPTERS[provider.engine].requires:  # checked here so that no request finds out
        if not extra.get(required):
            raise node.error(f"missing required key '{required}' (engine {provider.engine} needs it)", required)
    strategy = prefs.get("api_key_schedule_algorithm", str, "round_robin")
    if strategy not in KEY_STRATEGY_NAMES:
        raise prefs.error(f"expected one of {', '.join(KEY_STRATEGY_NAMES)}", "api_key_schedule_algorithm")
    pool = KeyPool(name, len(keys), strategy, _seconds(prefs, "api_key_cooldown_period", 0.0),
                   _rate_table(prefs, "api_key_rate_limit"))
    policy = Policy(pool, _seconds(prefs, "cooldown_period", glob.cooldown_s),
                    _timeouts(prefs, "model_timeout"), _proxy(prefs, "proxy") or _proxy(node, "proxy") or glob.proxy)
    return provider, policy


def _parse_models(node: _Node) -> tuple[tuple[str, str], ...]:
    """`model:` entries: `name` or `upstream-name: alias`, as (alias, upstream) pairs."""
    models: list[tuple[str, str]] = []
    for path, item, line in node.items("model"):
        if isinstance(item, str):
            models.append((item, item))
        elif isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item.values())), str):
            upstream, alias = next(iter(item.items()))
            upstream = _expand_env(upstream, node.source, path, line)  # a key; values were expanded on load
            models.append((str(alias), str(upstream)))
        else:
            raise _Node(CommentedMap(), path, node.source, line).error("expected a model name or 'upstream: alias'")
    return tuple(models)


def _headers(prefs: _Node) -> Mapping[str, str]:
    node = prefs.mapping("headers")
    if node is None:
        return MappingProxyType({})
    for name, value in node.data.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise node.error(f"expected a header value (a string), got {_type_name(value)}", name)
    return MappingProxyType({str(k): str(v) for k, v in node.data.items()})


def _overrides(prefs: _Node) -> Mapping[str, Mapping[str, Any]]:
    raw = prefs.get("post_body_parameter_overrides", dict, {})
    for model, values in raw.items():
        if not isinstance(values, dict):
            raise prefs.error(f"entry '{model}' must be a mapping of body fields", "post_body_parameter_overrides")
    return MappingProxyType({str(m): MappingProxyType(_plain(v)) for m, v in raw.items()})


def _plain(value: Any) -> Any:
    """ruamel's round-trip containers and scalars as plain dicts, lists, bools, numbers and strings, for JSON
    bodies: orjson refuses its ScalarFloat (a float subclass), and its ScalarBoolean (an int) would go out as 1."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, ScalarBoolean):
        return bool(value)
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def _prompt_cache(node: _Node, default: bool) -> bool:
    mode = node.get("prompt_cache", (str, bool))
    mode = ("auto" if mode else "off") if isinstance(mode, bool) else mode  # true/false read as auto/off
    if mode is not None and mode not in PROMPT_CACHE_MODES:
        raise node.error(f"expected one of {', '.join(PROMPT_CACHE_MODES)}", "prompt_cache")
    return default if mode is None else mode == "auto"


def _seconds(node: _Node, key: str, default: float) -> float:
    value = node.get(key, (int, float), default)
    if value < 0:
        raise node.error("expected a number of seconds >= 0", key)
    return float(value)


def _size(node: _Node, key: str, default: int) -> int:
    value = node.get(key, (int, str), default)
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise node.error("expected a size such as 32MiB or a number of bytes", key)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _store_limits(node: _Node | None) -> StoreLimits:
    if node is None:
        return StoreLimits()
    node.check_keys(("max_count", "max_bytes", "max_age"))
    default = StoreLimits()
    count = node.get("max_count", int, default.max_count)
    if count < 0:
        raise node.error("expected a number of responses >= 0", "max_count")
    return StoreLimits(count, _size(node, "max_bytes", default.max_bytes), _seconds(node, "max_age", default.max_age))


def _proxy(node: _Node, key: str) -> str | None:
    value = node.get(key, str)
    if value is None:
        return None
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in PROXY_SCHEMES:
        raise node.error(f"expected a proxy URL ({', '.join(PROXY_SCHEMES)})", key)
    if scheme.startswith("socks") and importlib.util.find_spec("aiohttp_socks") is None:
        raise node.error("socks proxies need the optional package aiohttp-socks (pip install aiohttp-socks)", key)
    return value


def _table(node: _Node, key: str, convert: Callable[[Any], T]) -> ModelTable[T] | None:
    """One value for every model, or a per-model map with `default`; `convert` raises ValueError."""
    value = node.get(key, (str, int, float, dict))
    if value is None:
        return None

    def checked(where: _Node, entry: str, raw: Any) -> T:
        raw = _typed(raw)
        try:
            if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
                raise ValueError(f"expected a value, got {_type_name(raw)}")
            return convert(raw)
        except ValueError as exc:
            raise where.error(str(exc), entry) from None

    if not isinstance(value, dict):
        return ModelTable(MappingProxyType({}), checked(node, key, value))
    sub = _Node(value, node.child_path(key), node.source, node.line)
    entries = {str(model): checked(sub, model, v) for model, v in value.items()}
    default = entries.pop("default", None)
    return ModelTable(MappingProxyType(entries), default)


def _timeouts(node: _Node, key: str) -> ModelTable[float] | None:
    def convert(value: Any) -> float:
        if not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError("expected a number of seconds > 0")
        return float(value)

    return _table(node, key, convert)


def _rate_table(node: _Node, key: str) -> ModelTable[tuple[RateLimit, ...]] | None:
    return _table(node, key, lambda value: parse_rate_limits(str(value)))


def _parse_api_key(node: _Node, providers: Mapping[str, Provider], tokens: set[str]) -> ApiKey:
    node.check_keys(_KEY_KEYS)
    token = node.get("api", str, required=True)
    prefs = node.mapping("preferences") or _Node(CommentedMap(), node.child_path("preferences"), node.source)
    prefs.check_keys(_KEY_PREFS)
    strategy = prefs.get("SCHEDULING_ALGORITHM", str, "fixed_priority")
    if strategy not in STRATEGY_NAMES:
        raise prefs.error(f"expected one of {', '.join(STRATEGY_NAMES)}", "SCHEDULING_ALGORITHM")
    retry = _typed(prefs.get("AUTO_RETRY", (bool, int, float, str), True))
    if not isinstance(retry, (bool, int)) or (not isinstance(retry, bool) and retry < 0):
        raise prefs.error("expected true, false or a number of retries >= 0", "AUTO_RETRY")
    retries = None if retry is True else (0 if retry is False else retry)
    model = node.get("model", (list, str), ["all"])
    if isinstance(model, str):
        model = [model]
        if model != ["all"]:
            raise node.error("expected a list of model rules or 'all'", "model")
    rules = tuple(_parse_rule(item, path, line, node, providers, tokens) for path, item, line in
                  (node.items("model") if isinstance(node.data.get("model"), list) else [("model", "all", 0)]))
    return ApiKey(token, rules, node.get("role", str, "user"), strategy, retries,
                  _rate_table(prefs, "rate_limit"), prefs.get("ENABLE_MODERATION", bool, False))


def _parse_rule(item: Any, path: str, line: int, key_node: _Node, providers: Mapping[str, Provider],
                tokens: set[str]) -> Rule:
    where = _Node(CommentedMap(), path, key_node.source, line)
    weight = 0
    if isinstance(item, dict) and len(item) == 1:
        item, weight = next(iter(item.items()))
        weight = _typed(weight)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise where.error("a rule's weight must be a whole number >= 0")
        item = _expand_env(item, key_node.source, path, line)  # a key; values were expanded on load
    if not isinstance(item, str) or not item:
        raise where.error("expected a model rule such as 'gpt-4o', 'provider/*' or 'provider/model: 5'")
    if item.startswith("<") and item.endswith(">"):
        return Rule("model", model=item[1:-1], weight=weight)
    if item == "all":
        return Rule("all", weight=weight)
    prefix, slash, rest = item.partition("/")
    if slash and prefix in providers:
        return Rule("provider", prefix, rest or "*", weight)
    if slash and prefix in tokens:
        return Rule("key", prefix, rest or "*", weight)
    if slash and rest == "*":
        raise where.error(f"'{prefix}' is not a provider or api key of this config")
    return Rule("model", model=item, weight=weight)


def _check_key_references(keys: Sequence[ApiKey], root: _Node) -> None:
    """Client keys used as channels must not refer back to themselves."""
    by_token = {k.token: k for k in keys}

    def visit(key: ApiKey, seen: tuple[str, ...]) -> None:
        for rule in key.rules:
            if rule.kind == "key":
                if rule.name in seen:
                    raise root.error(f"api key rules refer to each other in a loop ({rule.name[:7]}...)", "api_keys")
                visit(by_token[rule.name], (*seen, rule.name))

    for key in keys:
        visit(key, (key.token,))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def summarize(config: Config) -> str:
    lines = [f"{len(config.providers)} providers, {len(config.api_keys)} api keys"]
    for provider in config.providers.values():
        models = ", ".join(a if a == u else f"{u} as {a}" for a, u in provider.models) or "(listed at startup)"
        lines.append(f"  provider {provider.name} [{provider.engine}] {len(provider.api_keys)} key(s): {models}")
    for key in config.api_keys:
        lines.append(f"  key {key.label} role={key.role} {key.strategy}: {len(key.rules)} rule(s)")
    if config.state is not None:
        lines.append(f"  shared state: Redis at {_redis_where(config.state.redis_url)}, prefix {config.state.prefix},"
                     f" on_error {config.state.on_error}")
    return "\n".join(lines)


# --- Config loading (I/O) ---


async def fetch_text(url: str, *, limit: int = CONFIG_FETCH_LIMIT, timeout: float = CONFIG_FETCH_TIMEOUT) -> str:
    """A config from an http(s) URL, size- and time-limited."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session, \
                session.get(url) as response:
            if response.status != 200:
                raise ConfigError(f"{url}: could not fetch the config: HTTP {response.status}")
            body = bytearray()
            async for piece in response.content.iter_chunked(64 * 1024):  # read(n) may return less than n
                body += piece
                if len(body) > limit:
                    raise ConfigError(f"{url}: the config is larger than {limit} bytes")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise ConfigError(f"{url}: could not fetch the config: {exc or type(exc).__name__}") from None
    return body.decode("utf-8", "replace")


def load_config(source: str) -> Config:
    """Read a config from a path or an http(s) URL and parse it."""
    text = asyncio.run(fetch_text(source)) if _is_url(source) else read_config_file(source)
    return parse_config(text, source, _env_float("TIMEOUT", DEFAULT_TIMEOUT), os.environ.get("REDIS_URL") or None)


async def reload_config(source: str) -> Config:
    """load_config for a running loop: the file is read off the loop."""
    text = await fetch_text(source) if _is_url(source) else await asyncio.to_thread(read_config_file, source)
    return parse_config(text, source, _env_float("TIMEOUT", DEFAULT_TIMEOUT), os.environ.get("REDIS_URL") or None)


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def read_config_file(source: str) -> str:
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: cannot read the config: not UTF-8 text ({exc.reason})") from None


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


# --- Routing: which channels serve which alias for which key ---


@dataclass(frozen=True, slots=True)
class KeyRoutes:
    channels: Mapping[str, tuple[Channel, ...]]  # alias -> channels in rule order
    models_body: bytes  # the /v1/models answer, built once
    moderation_model: str | None = None  # the first of MODERATION_MODELS this key reaches


def build_routes(config: Config, discovered: Mapping[str, tuple[tuple[str, str], ...]],
                 created: int) -> tuple[Mapping[str, KeyRoutes], frozenset[str]]:
    """Resolve every key's rules into channels once; `discovered` holds model lists fetched at startup."""
    models = {name: p.models or discovered.get(name, ()) for name, p in config.providers.items()}
    by_token = {k.token: k for k in config.api_keys}
    cache: dict[str, list[Channel]] = {}

    def channels_of(key: ApiKey) -> list[Channel]:
        if key.token not in cache:
            cache[key.token] = _dedupe(c for rule in key.rules for c in _expand(rule, config, models, channels_of,
                                                                                 by_token))
        return cache[key.token]

    routes: dict[str, KeyRoutes] = {}
    for key in config.api_keys:
        table: dict[str, list[Channel]] = {}
        for channel in channels_of(key):
            table.setdefault(channel.model, []).append(channel)
        owners = {alias: chans[0].provider for alias, chans in table.items()}
        body = adapters.dumps({"object": "list", "data": [
            {"id": alias, "object": "model", "created": created, "owned_by": owner} for alias, owner in owners.items()
        ]})
        routes[key.token] = KeyRoutes(MappingProxyType({a: tuple(c) for a, c in table.items()}), body,
                                      next((m for m in MODERATION_MODELS if m in table), None))
    known = frozenset(alias for pairs in models.values() for alias, _ in pairs)
    return MappingProxyType(routes), known


def _expand(rule: Rule, config: Config, models: Mapping[str, tuple[tuple[str, str], ...]],
            channels_of: Callable[[ApiKey], list[Channel]], by_token: Mapping[str, ApiKey]) -> Iterator[Channel]:
    if rule.kind == "key":
        for channel in channels_of(by_token[rule.name]):
            if rule.model in ("*", channel.model):
                yield replace(channel, weight=rule.weight or channel.weight)
        return
    for name, pairs in models.items():
        if rule.kind == "provider" and name != rule.name:
            continue
        for alias, upstream in pairs:
            if rule.kind == "all" or rule.model in ("*", alias):
                yield _channel(config, name, alias, upstream, rule.weight)


def _channel(config: Config, provider_name: str, alias: str, upstream: str, weight: int) -> Channel:
    provider = config.providers[provider_name]
    engine = provider.engine if provider.engine_forced else adapters.infer_engine(provider.base_url, upstream)
    return Channel(provider_name, alias, upstream, engine, weight, config.policies[provider_name].cooldown_s)


def _dedupe(channels: Iterator[Channel]) -> list[Channel]:
    seen: dict[tuple[str, str, str], Channel] = {}
    for channel in channels:
        seen.setdefault((channel.provider, channel.model, channel.upstream_model), channel)
    return list(seen.values())


# --- App: the gateway's state, create_app, start-up and config reload ---


@dataclass(slots=True)
class Gateway:
    """Per-app runtime state, owned by the lifespan.

    One instance serves one config: a reload builds a new one with `replace()` (sharing the scheduler,
    sessions and stats) and swaps `app.state.gateway` in one assignment. A request takes the current one
    once, at its start, so it finishes on the config it started with. Never mutate a field in place.
    """

    config: Config
    routes: Mapping[str, KeyRoutes]
    known_models: frozenset[str]
    scheduler: Scheduler
    session: aiohttp.ClientSession
    tokens: TokenCache
    socks_sessions: Mapping[str, aiohttp.ClientSession] = field(default_factory=dict)
    recent: AttemptStats = field(default_factory=lambda: AttemptStats())
    loaded_at: float = 0.0  # time.time() when this config was loaded (the status page shows it)
    stats: Stats = field(default_factory=lambda: Stats())  # statistics and metrics; started and closed by the lifespan
    responses: ResponseStore = field(default_factory=lambda: ResponseStore())  # stored responses, kept across reloads
    shared: SharedState | None = None  # state.redis_url's client; None: scheduling state in this process only
    instance: str = ""  # which instance answered (/metrics, /v1/stats, /status): $INSTANCE_ID or hostname:pid


async def discover_models(config: Config, session: aiohttp.ClientSession,
                          tokens: TokenCache) -> dict[str, tuple[tuple[str, str], ...]]:
    """Model lists of providers without `model:`, from their models endpoint; a failure is a warning."""

    async def one(provider: Provider) -> tuple[str, tuple[tuple[str, str], ...]]:
        adapter = ADAPTERS[provider.engine]
        try:  # an adapter that cannot list models raises UpstreamError from build_models_request
            token = await tokens.get(provider) if adapter.auth == "google-oauth" else None
            target = Target(provider, "", provider.api_keys[0] if provider.api_keys else "", token, time.time())
            request = adapter.build_models_request(target)
            async with session.request(request.method, request.url, headers=dict(request.headers),
                                       timeout=aiohttp.ClientTimeout(total=DISCOVERY_TIMEOUT)) as response:
                body = await response.read()
                if response.status != 200:
                    raise adapter.parse_error(response.status, body)
                names = adapter.parse_models(adapters.loads(body))
        except (UpstreamError, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as exc:
            logger.warning("provider %s: could not list its models (%s); it serves none until a restart or reload",
                           provider.name, _redact_secrets(str(exc) or type(exc).__name__, config.secrets))
            return provider.name, ()
        return provider.name, tuple((name, name) for name in names)

    pending = [one(p) for p in config.providers.values() if not p.models]
    return dict(await asyncio.gather(*pending)) if pending else {}


def _socks_session(proxy: str) -> aiohttp.ClientSession:
    from aiohttp_socks import ProxyConnector  # optional; checked when the config was parsed

    return aiohttp.ClientSession(connector=ProxyConnector.from_url(proxy), timeout=aiohttp.ClientTimeout(total=None))


async def build_gateway(config: Config, base: Gateway, socks: dict[str, aiohttp.ClientSession]) -> Gateway:
    """A gateway for `config` sharing `base`'s runtime state (scheduler, sessions, stats), at startup and on reload.

    Model discovery, routes and the moderation check run here; a ConfigError leaves `base` serving. The
    scheduler is shared, so unchanged channels (value-equal records) keep their cooldowns and rate windows.
    """
    base.tokens.forget(n for n, p in config.providers.items() if base.config.providers.get(n, p) != p)
    routes, known = build_routes(config, await discover_models(config, base.session, base.tokens), int(time.time()))
    check_moderation(config, routes)
    for proxy in {p.proxy for p in config.policies.values() if p.proxy and p.proxy.startswith("socks")} - set(socks):
        socks[proxy] = _socks_session(proxy)  # closed with the others when the app stops
    return replace(base, config=config, routes=routes, known_models=known, loaded_at=time.time())


async def reload_gateway(app: Starlette, source: str, socks: dict[str, aiohttp.ClientSession]) -> bool:
    """Load and validate `source`, then swap `app.state.gateway` in one assignment; a bad config is one log line."""
    try:
        gateway = await build_gateway(await reload_config(source), app.state.gateway, socks)
    except ConfigError as exc:
        logger.error("config reload failed, the running config stays: %s", exc)
        return False
    if gateway.config.state != app.state.gateway.config.state:
        logger.warning("config reload: changes to state: (shared state) take effect at the next start")
    app.state.gateway = gateway
    logger.info("config reloaded from %s: %s", _source_name(source), summarize(gateway.config).split("\n")[0])
    return True


def file_signature(source: str) -> tuple[int, int] | None:
    """A local config's mtime and size (one stat, cheap to poll); None for a URL or a path that cannot be read."""
    if _is_url(source):
        return None
    try:
        stat = os.stat(source)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


async def watch_config(source: str, poll_s: float, wake: asyncio.Event, reload: Callable[[], Awaitable[bool]]) -> None:
    """Reload when `wake` is set (SIGHUP), and when a local file's signature changed (polled every `poll_s`)."""
    seen = file_signature(source)
    interval = poll_s if poll_s > 0 and not _is_url(source) else None
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), interval)
        current = file_signature(source)
        if wake.is_set() or current != seen:
            wake.clear()
            seen = current
            try:
                await reload()
            except Exception:  # a bug in one reload must not end reloading for the life of the process
                logger.exception("config reload failed unexpectedly; the running config stays")


def _on_sighup(callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` on SIGHUP and return the undo; a no-op without SIGHUP (Windows) or off the main thread."""
    sighup = getattr(signal, "SIGHUP", None)
    loop = asyncio.get_running_loop()
    if sighup is None or threading.current_thread() is not threading.main_thread():
        return lambda: None
    try:
        loop.add_signal_handler(sighup, callback)
    except (NotImplementedError, RuntimeError, ValueError):  # a loop without signal support
        return lambda: None
    return lambda: loop.remove_signal_handler(sighup)


@contextlib.asynccontextmanager
async def config_reloading(app: Starlette, source: str | None, poll_s: float,
                           socks: dict[str, aiohttp.ClientSession]) -> AsyncIterator[None]:
    """While the app runs, reload `source` on SIGHUP and when the file changes; nothing without a source."""
    if source is None:
        yield
        return
    wake = asyncio.Event()
    undo = _on_sighup(wake.set)
    task = asyncio.ensure_future(watch_config(source, poll_s, wake, lambda: reload_gateway(app, source, socks)))
    try:
        yield
    finally:
        undo()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def instance_id() -> str:
    """$INSTANCE_ID, else hostname:pid: which worker or instance answered."""
    return os.environ.get("INSTANCE_ID") or f"{socket.gethostname()}:{os.getpid()}"


async def start_shared_state(options: StateOptions | None) -> SharedState | None:
    """The Redis client for `state:`; an unreachable Redis is a warning, as on_error then decides each request."""
    if options is None:
        return None
    shared = SharedState(options)
    if await shared.start():
        logger.info("shared state: Redis at %s, prefix %s, on_error %s", _redis_where(options.redis_url),
                    options.prefix, options.on_error)
    return shared


async def _start_stats(stats: Stats) -> None:
    try:
        await stats.start()
    except StatsError as exc:  # uvicorn exits with code 3, like a bad config
        logger.error("error: %s", exc)
        raise


def release_startup_memory() -> None:
    """Return the heap that startup freed (compiling the source, the YAML tree) to the OS: glibc keeps it
    otherwise, and it would count in the idle RSS for the life of the process. A no-op off glibc."""
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def create_app(config: Config, *, scheduler: Scheduler | None = None, source: str | None = None,
               poll_seconds: float | None = None, stats_options: StatsOptions | None = None) -> Starlette:
    """The Starlette app serving `config`; runtime state is made in its lifespan.

    `stats_options` says where statistics go (the CLI reads them from the environment); without it they stay
    in memory, for /metrics only.

    With `source` (the path or URL `config` came from) the config reloads on SIGHUP and, for a file, when
    its mtime or size changes, checked every `poll_seconds` (default $CONFIG_POLL_SECONDS, else 2; 0: never).
    """
    poll_s = _env_float("CONFIG_POLL_SECONDS", CONFIG_POLL_SECONDS) if poll_seconds is None else poll_seconds

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        socks: dict[str, aiohttp.ClientSession] = {}
        stats = Stats(stats_options)
        shared = await start_shared_state(config.state)
        try:
            await _start_stats(stats)
            base = Gateway(config, MappingProxyType({}), frozenset(), scheduler or Scheduler(), session,
                           TokenCache(session), socks, stats=stats, shared=shared, instance=instance_id())
            try:
                app.state.gateway = await build_gateway(config, base, socks)
            except ConfigError as exc:  # a gap only model discovery could reveal; uvicorn exits with code 3
                logger.error("error: %s", exc)
                raise
            release_startup_memory()
            async with config_reloading(app, source, poll_s, socks):
                yield
        finally:
            await stats.close()
            if shared is not None:
                await shared.close()
            for open_session in (session, *socks.values()):
                await open_session.close()

    routes = [
        # the busiest first: Starlette tries routes in order
        Route("/v1/chat/completions", face_route(adapters.FACES["chat"]), methods=["POST"]),
        Route("/v1/messages", face_route(adapters.FACES["messages"]), methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/v1/models", v1_models, methods=["GET"]),
        Route("/v1/models/{model:path}", v1_model, methods=["GET"]),
        Route("/v1beta/models", gemini_models, methods=["GET"]),
        Route("/v1beta/models/{model:path}", gemini_model, methods=["GET"]),
        Route("/v1beta/models/{target:path}", gemini_generate, methods=["POST"]),
        Route("/v1/models/{target:path}", gemini_generate, methods=["POST"]),
        Route("/v1/responses/compact", compact_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
        Route("/v1/embeddings", json_endpoint("embeddings"), methods=["POST"]),
        Route("/v1/images/generations", json_endpoint("images", "dall-e-2"), methods=["POST"]),
        Route("/v1/moderations", json_endpoint("moderations", "omni-moderation-latest"), methods=["POST"]),
        Route("/v1/audio/speech", json_endpoint("speech"), methods=["POST"]),
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        Route("/status", status_page, methods=["GET"]),
        Route("/v1/stats", stats_summary, methods=["GET"]),
        Route("/v1/token_usage", token_usage, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers: dict[Any, Any] = {GatewayError: render_error, HTTPException: render_error,
                                ClientDisconnected: render_error, Exception: render_error}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers,
                     middleware=[Middleware(RequestLog)])


# --- Routes ---


def _gateway(request: Request) -> Gateway:
    """The gateway of the current config; a request takes it once, so a reload cannot change it midway."""
    return request.app.state.gateway  # type: ignore[no-any-return]


def face_route(face: Face) -> Callable[[Request], Awaitable[Response]]:
    """The route of one client API: auth, the body, the face's checks, then the flow; errors in the face's shape."""

    async def handle(request: Request) -> Response:
        request.state.face = face
        gw = _gateway(request)
        key = authenticate(request, gw.config)
        body = await read_json(request, gw.config.body_limit)
        model = checked(face.validate, body)
        record = _track(request, key, model)
        return await until_disconnect(request, face_flow(gw, key, model, face, body, request.headers, record))

    return handle


def json_endpoint(endpoint: adapters.Endpoint, default_model: str | None = None) -> Callable[..., Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        gw = _gateway(request)
        key = authenticate(request, gw.config)
        body = await read_json(request, gw.config.body_limit)
        model = checked(adapters.require_model, body, default_model)
        record = _track(request, key, model)
        send = endpoint_sender(gw, endpoint, body, model, record=record)
        return await until_disconnect(request, dispatch(gw, key, model, send, record))

    return handle


async def transcriptions(request: Request) -> Response:
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    form = parse_multipart(await read_body(request, gw.config.body_limit), request.headers.get("content-type", ""))
    model = checked(adapters.require_model, dict((k, v) for k, v in form if isinstance(v, str)))
    record = _track(request, key, model)
    send = endpoint_sender(gw, "transcriptions", None, model, form, record)
    return await until_disconnect(request, dispatch(gw, key, model, send, record))


async def list_models(request: Request) -> Response:
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    return _json_response(gw.routes[key.token].models_body)


async def healthz(request: Request) -> Response:
    return _json_response(b'{"status":"ok"}')


def _track(request: Request, key: ApiKey, model: str) -> RequestRecord | None:
    """The request's stats record (made by RequestLog), now naming its key and model."""
    record: RequestRecord | None = getattr(request.state, "record", None)
    if record is not None:
        record.key, record.model = key, model
    return record


# --- Errors rendered in one place ---
# Routes whose clients expect another API's error shape even before their handler ran (unknown method, ...).
_FACE_BY_PATH: Final[Mapping[str, Face]] = MappingProxyType(
    {"/v1/messages": adapters.FACES["messages"], "/v1/messages/count_tokens": adapters.FACES["messages"]})


def _is_gemini_route(request: Request) -> bool:
    """Gemini's routes, whose paths carry the model: anything under /v1beta, a colon verb after the model under /v1,
    and /v1/models for a Gemini client (its key in x-goog-api-key or ?key=)."""
    path = request.url.path
    return path.startswith("/v1beta/") or (path.startswith("/v1/models") and (":" in path or bool(google_key(request))))


def _envelope(request: Request, message: str, type_: str, code: str | None, status: int,
              headers: Mapping[str, str] | None = None, param: str | None = None) -> JSONResponse:
    """The error in the shape of the request's face (OpenAI's envelope where none was chosen yet)."""
    face = getattr(request.state, "face", None) or _FACE_BY_PATH.get(request.url.path) or adapters.FACES[
        "gemini" if _is_gemini_route(request) else "chat"]
    body = face.error_body(message, status, type_, code)
    if param is not None and isinstance(body.get("error"), dict) and "param" in body["error"]:
        body["error"]["param"] = param
    return JSONResponse(body, status_code=status, headers=headers)


async def render_error(request: Request, exc: Exception) -> Response:
    path = request.url.path
    if isinstance(exc, GatewayError):
        return _envelope(request, exc.message, exc.type, exc.code, exc.status, exc.headers, exc.param)
    if isinstance(exc, HTTPException):
        type_ = _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        return _envelope(request, str(exc.detail), type_, None, exc.status_code, exc.headers)
    if isinstance(exc, ClientDisconnected):
        return Response(status_code=499)
    logger.exception("unexpected error on %s", path)
    record = getattr(request.state, "record", None)  # this handler runs outside RequestLog: name the request here
    headers = {"x-request-id": record.request_id} if record is not None else None
    return _envelope(request, "Internal error in the gateway.", "server_error", None, 500, headers)


# --- Token counting: Anthropic's count_tokens, Gemini's countTokens ---
# "Count tokens in a Message" for clients of the Messages API: a channel that counts (the Anthropic API) answers,
# any other gets the gateway's estimate.


async def count_flow(gw: Gateway, key: ApiKey, model: str, face: Face, body: Mapping[str, Any],
                     record: RequestRecord | None) -> Response:
    """A channel whose engine counts answers; when the model has none, the face's estimate, spending none of the
    key's rate limit."""
    if not any(channel.engine in face.counters for channel in channels_for(gw, key, model)):
        return _json_response(adapters.dumps(face.estimate_tokens(body)))
    return await dispatch(gw, key, model, count_sender(gw, face, body), record)


def count_sender(gw: Gateway, face: Face, body: Mapping[str, Any]) -> Sender:
    async def send(channel: Channel, adapter: Adapter, target: Target, timeout: float) -> Response:
        native = face.counters.get(channel.engine)
        if native is None:
            return _json_response(adapters.dumps(face.estimate_tokens(body)))
        response = await _open(gw, gw.config.policies[channel.provider],
                               native.build_count_tokens_request(body, target), timeout)
        try:
            await _check_status(response, native, timeout)
            return _json_response(await _read(response, timeout))
        finally:
            response.release()

    return send


async def count_tokens(request: Request) -> Response:
    """"Count tokens in a Message" for clients of the Messages API."""
    face = request.state.face = adapters.FACES["messages"]
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    body = await read_json(request, gw.config.body_limit)
    model = checked(face.validate, body)
    return await until_disconnect(request, count_flow(gw, key, model, face, body, _track(request, key, model)))


# --- OpenAI Responses: the store behind previous_response_id, GET / DELETE, compact ---


@dataclass(frozen=True, slots=True)
class StoredResponse:
    owner: bytes  # digest of the key that made it: only that key reads or deletes it
    response: Mapping[str, Any]  # the response object as its client got it
    items: tuple[Any, ...]  # its input (previous context included) and output items: what a chained request continues
    size: int
    stored_at: float


class ResponseStore:
    """Recent responses for previous_response_id, item_reference inputs and GET / DELETE /v1/responses/{id}, capped
    by StoreLimits (count, bytes, age; the oldest evicted first). Shared across reloads; each call takes the
    current limits."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._items: dict[str, str] = {}  # output item id -> the stored response holding it

    def put(self, owner: bytes, response: Mapping[str, Any], items: Sequence[Any], limits: StoreLimits) -> None:
        size = len(adapters.dumps(response)) + len(adapters.dumps(list(items)))
        self._pop(str(response["id"]))
        if size > limits.max_bytes or not limits.max_count:
            return
        self._entries[str(response["id"])] = StoredResponse(owner, response, tuple(items), size, self._clock())
        self._items.update((str(item["id"]), str(response["id"])) for item in _output_items(response))
        self._bytes += size
        self._evict(limits)

    def item(self, item_id: str, owner: bytes, limits: StoreLimits) -> Mapping[str, Any] | None:
        """An output item of a stored response, by its id (what an item_reference input names)."""
        found = self.get(self._items.get(item_id, ""), owner, limits)
        return next((item for item in _output_items(found.response) if item["id"] == item_id), None) if found else None

    def get(self, response_id: str, owner: bytes, limits: StoreLimits) -> StoredResponse | None:
        self._evict(limits)
        found = self._entries.get(response_id)
        return found if found is not None and hmac.compare_digest(found.owner, owner) else None

    def delete(self, response_id: str, owner: bytes, limits: StoreLimits) -> bool:
        return self.get(response_id, owner, limits) is not None and self._pop(response_id)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def _pop(self, response_id: str) -> bool:
        gone = self._entries.pop(response_id, None)
        if gone is not None:
            self._bytes -= gone.size
            for item in _output_items(gone.response):
                self._items.pop(str(item["id"]), None)
        return gone is not None

    def _evict(self, limits: StoreLimits) -> None:
        oldest = self._clock() - limits.max_age
        while self._entries:
            first = next(iter(self._entries.values()))
            if (len(self._entries) <= limits.max_count and self._bytes <= limits.max_bytes
                    and first.stored_at > oldest):
                return
            self._pop(next(iter(self._entries)))


def _output_items(response: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    return (item for item in response.get("output") or () if isinstance(item, Mapping) and item.get("id"))


class ResponseNotFound(GatewayError):
    status, type = 404, "invalid_request_error"


class CompactNotServed(GatewayError):
    """Compaction is OpenAI's own summary of a conversation; only a Responses-native upstream makes one. A 4xx, so
    a client does not retry it (Codex calls compact only for its built-in `openai` provider, codex-rs
    compact.rs should_use_remote_compact_task; a custom provider compacts with an ordinary request)."""

    status, type, code = 404, "invalid_request_error", "compact_not_supported"


def _chained(gw: Gateway, owner: bytes, body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The body with the stored context of its previous_response_id before its input (400 when it is unknown)."""
    previous = body.get("previous_response_id")
    if not previous:
        return body
    stored = gw.responses.get(previous, owner, gw.config.responses_store)
    if stored is None:
        error = adapters.previous_not_found(previous)
        raise InvalidRequest(error.message, code=error.code, param=error.param)
    return adapters.chain_input(list(stored.items), body)


def _dereferenced(gw: Gateway, owner: bytes, body: Mapping[str, Any]) -> Mapping[str, Any]:
    """item_reference inputs replaced by the stored items they name (the AI SDK sends earlier answers so when
    `store` is on); one the store does not hold gets OpenAI's 400."""
    items = body.get("input")
    if not isinstance(items, list) or not any(item.get("type") == "item_reference" for item in items):
        return body
    resolved = []
    for i, item in enumerate(items):
        found = gw.responses.item(str(item.get("id")), owner, gw.config.responses_store) if item.get(
            "type") == "item_reference" else item
        if found is None:
            raise InvalidRequest(f"Item with id '{item.get('id')}' not found.", param=f"input[{i}]")
        resolved.append(found)
    return {**body, "input": resolved}


def _keeper(gw: Gateway, owner: bytes, body: Mapping[str, Any]) -> Callable[[dict[str, Any]], None] | None:
    """What stores a finished response (unless the client said store: false)."""
    if body.get("store") is False:
        return None
    limits = gw.config.responses_store

    def keep(response: dict[str, Any]) -> None:
        gw.responses.put(owner, response, adapters.stored_items(body, response), limits)

    return keep


async def responses(request: Request) -> Response:
    """POST /v1/responses: the face's flow, with previous_response_id resolved and the answer stored."""
    request.state.face = face = adapters.FACES["responses"]
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    body = await read_json(request, gw.config.body_limit)
    model = checked(face.validate, body)
    owner = _digest(key.token)
    previous = body.get("previous_response_id")
    body = _chained(gw, owner, _dereferenced(gw, owner, body))
    storing = adapters.ResponsesFace(_keeper(gw, owner, body), previous)
    record = _track(request, key, model)
    return await until_disconnect(request, face_flow(gw, key, model, storing, body, request.headers, record))


def _stored_request(request: Request) -> tuple[Gateway, bytes, str]:
    request.state.face = adapters.FACES["responses"]
    gw = _gateway(request)
    return gw, _digest(authenticate(request, gw.config).token), request.path_params["response_id"]


async def get_response(request: Request) -> Response:
    """"Get a model response": a stored one, for the key that made it."""
    gw, owner, response_id = _stored_request(request)
    found = gw.responses.get(response_id, owner, gw.config.responses_store)
    if found is None:
        raise ResponseNotFound(f"Response with id '{response_id}' not found.")
    return _json_response(adapters.dumps(found.response))


async def delete_response(request: Request) -> Response:
    """"Delete a model response": {id, object: response.deleted, deleted: true}."""
    gw, owner, response_id = _stored_request(request)
    if not gw.responses.delete(response_id, owner, gw.config.responses_store):
        raise ResponseNotFound(f"Response with id '{response_id}' not found.")
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


async def compact_response(request: Request) -> Response:
    """POST /v1/responses/compact ("Compact a response"): passed through to the model's Responses-native channels,
    the answer relayed as it came; without one, a clean 4xx in OpenAI's envelope after the usual checks."""
    request.state.face = adapters.FACES["responses"]
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    body = await read_json(request, gw.config.body_limit)
    model = checked(adapters.require_model, body)
    if not any("compact" in ADAPTERS[channel.engine].endpoints for channel in channels_for(gw, key, model)):
        raise CompactNotServed(f"POST /v1/responses/compact needs a Responses-native channel for model '{model}' "
                               f"and none serves it; compact the conversation with an ordinary request instead.")
    record = _track(request, key, model)
    send = endpoint_sender(gw, "compact", body, model, record=record)
    return await until_disconnect(request, dispatch(gw, key, model, send, record))


# --- Gemini inbound ---
# Gemini's API for Gemini CLI and the google-genai SDKs (adapters, "Gemini generateContent inbound"), under /v1beta
# and /v1: models.generateContent, models.streamGenerateContent, models.countTokens, models.list and models.get.
# Keys come as x-goog-api-key or ?key= as well (authenticate); errors take Google's shape (_is_gemini_route). /v1/models
# and /v1/models/{model} answer in Gemini's shape to a Gemini client (its key in x-goog-api-key or ?key=), else
# in OpenAI's.


async def gemini_models(request: Request) -> Response:
    """"models.list": the models the key may use, one page (no nextPageToken)."""
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    models = [adapters.gemini_model(alias) for alias in gw.routes[key.token].channels]
    return _json_response(adapters.dumps({"models": models}))


async def gemini_model(request: Request) -> Response:
    """"models.get": a model the key may use (404 or 403 as a generation request would get)."""
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    alias = request.path_params["model"].removeprefix("models/")
    channels_for(gw, key, alias)
    return _json_response(adapters.dumps(adapters.gemini_model(alias)))


async def v1_models(request: Request) -> Response:
    return await (gemini_models if google_key(request) else list_models)(request)


async def v1_model(request: Request) -> Response:
    """GET /v1/models/{model}: Gemini's models.get for a Gemini client, else OpenAI's "Retrieve model"."""
    if google_key(request):
        return await gemini_model(request)
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    alias = request.path_params["model"]
    channels_for(gw, key, alias)
    listing = adapters.loads(gw.routes[key.token].models_body)["data"]
    return _json_response(adapters.dumps(next(entry for entry in listing if entry["id"] == alias)))


_GEMINI_FACE: Final = adapters.FACES["gemini"]
# The colon verbs of models.* that take a body ("models.generateContent", "models.streamGenerateContent",
# "models.countTokens").
_GEMINI_VERBS: Final = frozenset({"generateContent", "streamGenerateContent", "countTokens"})


async def gemini_generate(request: Request) -> Response:
    """POST .../models/{model}:{verb}: the path and query become the body's model, stream and alt keys, then the
    face's flow. With no Gemini channel for the model, what no other engine takes is refused at once with a 400
    naming it."""
    request.state.face = _GEMINI_FACE
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    model, _, verb = request.path_params["target"].removeprefix("models/").rpartition(":")
    if verb not in _GEMINI_VERBS or not model:
        raise ModelNotFound(f"Unknown method '{verb}': this gateway serves {', '.join(sorted(_GEMINI_VERBS))}.")
    body = {**await read_json(request, gw.config.body_limit), "model": model,
            "stream": verb == "streamGenerateContent", "alt": request.query_params.get("alt")}
    record = _track(request, key, model)
    native = any(channel.engine in _GEMINI_FACE.native for channel in channels_for(gw, key, model))
    if verb == "countTokens":
        return await until_disconnect(request, count_flow(gw, key, model, _GEMINI_FACE, body, record))
    checked(_GEMINI_FACE.validate, body)
    if not native:
        checked(adapters.from_gemini_request, body)
    return await until_disconnect(request, face_flow(gw, key, model, _GEMINI_FACE, body, request.headers, record))


# --- Auth and request bodies ---


def authenticate(request: Request, config: Config) -> ApiKey:
    """`Authorization: Bearer <key>`, `x-api-key`, or as Gemini clients send it `x-goog-api-key` or `?key=`; looked
    up by digest and compared in constant time."""
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else (
        request.headers.get("x-api-key") or google_key(request))
    if not token:
        raise InvalidApiKey("Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
    key = find_key(config, token)
    record: RequestRecord | None = getattr(request.state, "record", None)
    if record is not None:  # the request log names the key (by its prefix) on every route
        record.key = key
    return key


def google_key(request: Request) -> str:
    """The key as Google's APIs take it ("API keys": the x-goog-api-key header or the `key` query parameter)."""
    return request.headers.get("x-goog-api-key") or request.query_params.get("key") or ""


def find_key(config: Config, token: str) -> ApiKey:
    """The client key `token`, looked up by digest and compared in constant time."""
    key = config.keys_by_digest.get(_digest(token))
    if key is None or not hmac.compare_digest(key.token.encode(), token.encode()):
        raise InvalidApiKey("Invalid API key.")
    return key


# Content-Encoding of request bodies (RFC 9110 section 8.4.1; zstd: RFC 8878). Codex CLI sends zstd. Each decoder
# is given the room left under the body limit and returns at most one byte more, which is enough to refuse.
try:  # Python 3.14's standard library
    from compression import zstd as _stdlib_zstd  # type: ignore[import-not-found]
except ImportError:
    _stdlib_zstd = None
try:  # the maintained binding, where it comes as a wheel (requirements.txt)
    import zstandard as _zstandard
except ImportError:
    _zstandard = None


class _BodyDecoder(Protocol):
    def feed(self, data: bytes, room: int) -> bytes: ...

    def finish(self) -> None: ...


class _BoundedDecoder:
    """zlib's and compression.zstd's decompressors: `decompress(data, max_length)` keeps what it did not emit."""

    def __init__(self, name: str, decompressor: Any) -> None:
        self._name, self._decompressor = name, decompressor

    def feed(self, data: bytes, room: int) -> bytes:
        try:
            return self._decompressor.decompress(data, room + 1)
        except _DECODE_ERRORS as exc:
            raise _undecodable(self._name, exc) from None

    def finish(self) -> None:
        if not self._decompressor.eof:
            raise InvalidRequest(f"Request body ends inside its {self._name} stream.")


class _Overflow(Exception):
    """Raised by the zstandard sink once the room is used up, which stops the decompressor where it is."""


@dataclass(slots=True)
class _Sink:
    room: int = 0
    chunks: list[bytes] = field(default_factory=list)

    def write(self, data: bytes) -> int:
        self.chunks.append(data)
        self.room -= len(data)
        if self.room < 0:
            raise _Overflow
        return len(data)


class _ZstandardDecoder:
    """zstandard's stream_writer hands its output over in pieces of write_size, so a bomb stops at the first
    piece past the room. (Its decompressobj has no output cap; a truncated frame shows up as a bad body.)"""

    def __init__(self) -> None:
        self._sink = _Sink()
        self._writer = _zstandard.ZstdDecompressor().stream_writer(self._sink, write_size=64 * 1024)

    def feed(self, data: bytes, room: int) -> bytes:
        self._sink.room, self._sink.chunks = room + 1, []
        try:
            self._writer.write(data)
        except _Overflow:
            pass
        except _DECODE_ERRORS as exc:
            raise _undecodable("zstd", exc) from None
        return b"".join(self._sink.chunks)

    def finish(self) -> None:
        return None


def _undecodable(name: str, exc: Exception) -> InvalidRequest:
    return InvalidRequest(f"Request body is not valid {name} data: {exc}", code="invalid_content_encoding")


_DECODE_ERRORS: Final = tuple(error for error in (
    zlib.error, EOFError, getattr(_stdlib_zstd, "ZstdError", None), getattr(_zstandard, "ZstdError", None)) if error)


def _zstd_decoder() -> _BodyDecoder | None:
    if _stdlib_zstd is not None:
        return _BoundedDecoder("zstd", _stdlib_zstd.ZstdDecompressor())
    return _ZstandardDecoder() if _zstandard is not None else None


# "deflate" is the zlib format (RFC 9110 section 8.4.1.2); gzip's wbits take the gzip header.
BODY_DECODERS: Final[Mapping[str, Callable[[], _BodyDecoder | None]]] = MappingProxyType({
    "gzip": lambda: _BoundedDecoder("gzip", zlib.decompressobj(16 + zlib.MAX_WBITS)),
    "x-gzip": lambda: _BoundedDecoder("gzip", zlib.decompressobj(16 + zlib.MAX_WBITS)),
    "deflate": lambda: _BoundedDecoder("deflate", zlib.decompressobj(zlib.MAX_WBITS)),
    "zstd": _zstd_decoder,
})


def body_decoder(encoding: str) -> _BodyDecoder | None:
    """The decoder for a Content-Encoding header (None: identity); 415 for a coding the gateway cannot decode."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return None
    make = BODY_DECODERS.get(name)
    decoder = make() if make is not None else None
    if decoder is not None:
        return decoder
    if make is not None:
        raise UnsupportedEncoding(f"Content-Encoding '{name}' needs a zstd decoder: install the zstandard package "
                                  "(pip install zstandard) or run on Python 3.14, or send the body uncompressed.")
    raise UnsupportedEncoding(f"Content-Encoding '{name}' is not supported; send the body as zstd, gzip, deflate "
                              "or uncompressed (one coding).")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, decoded per Content-Encoding; the limit holds for the compressed and the decoded size, and a
    decoder never makes more than the room left, so a decompression bomb costs no memory before its 413."""
    decoder = body_decoder(request.headers.get("content-encoding", ""))
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if decoder is not None:
            chunk = decoder.feed(chunk, limit - size)
        size += len(chunk)
        if size > limit or received > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    if decoder is not None:
        decoder.finish()
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes (decoded).")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit)
    try:
        data = adapters.loads(body)
    except (adapters.JSONDecodeError, ValueError, UnicodeDecodeError):
        raise InvalidRequest("Request body is not valid JSON.") from None
    except RecursionError:  # the stdlib parser recurses per nesting level
        raise InvalidRequest("Request body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    return data


def checked(check: Callable[..., T], *args: Any) -> T:
    """A face's shape check; its RequestError becomes a 400 naming the field."""
    try:
        return check(*args)
    except adapters.RequestError as exc:
        raise InvalidRequest(exc.message, code=exc.code or "invalid_request", param=exc.param) from None


def parse_multipart(body: bytes, content_type: str) -> tuple[tuple[str, Any], ...]:
    """multipart/form-data fields as (name, text) or (name, (filename, bytes, type))."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidRequest("Expected a multipart/form-data body.")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: list[tuple[str, Any]] = []
    for part in message.iter_parts() if message.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is None:
            fields.append((str(name), payload.decode("utf-8", "replace")))
        else:
            fields.append((str(name), (filename, payload, part.get_content_type())))
    if not fields:
        raise InvalidRequest("The multipart body has no fields.")
    return tuple(fields)


# --- Request flow: admission, moderation, failover ---


async def face_flow(gw: Gateway, key: ApiKey, model: str, face: Face, body: Mapping[str, Any],
                    client_headers: Mapping[str, str], record: RequestRecord | None = None) -> Response:
    """Admission, then moderation when the key has it on, then the attempts."""
    channels = await admitted_channels(gw, key, model)
    if key.moderation:
        await moderate(gw, key, face.user_text(body))
    return await failover(gw, key, model, channels, face_sender(gw, face, body, model, client_headers, record), record)


def channels_for(gw: Gateway, key: ApiKey, model: str) -> tuple[Channel, ...]:
    channels = gw.routes[key.token].channels.get(model)
    if channels:
        return channels
    if model in gw.known_models:
        raise ModelNotAllowed(f"This API key may not use the model '{model}'.")
    shown = model if len(model) <= 200 else model[:200] + "..."  # errors never echo a request back whole
    raise ModelNotFound(f"The model '{shown}' does not exist or no provider serves it.")


async def _keys(flow: Flow, policy: Policy, model: str) -> AsyncIterator[int | None]:
    """The indexes of the provider's keys to try for one request, in scheduled order and each at most once, while
    the request may spend more and a key is free (not benched, under its api_key_rate_limit); a provider without
    keys gets one turn, index None. A key is taken only when its turn comes."""
    if policy.keys.size == 0:
        if flow.can_spend():
            yield None
        return
    tried: list[int] = []
    while flow.can_spend() and (index := await _acquire_key(flow.gw, policy, model, tried)) is not None:
        tried.append(index)
        yield index


async def _acquire_key(gw: Gateway, policy: Policy, model: str, tried: list[int]) -> int | None:
    if gw.shared is not None and policy.keys.rate_limits is not None:
        return await shared_key(gw, gw.shared, policy, model, tried)
    return gw.scheduler.acquire_key(policy.keys, model, tried)


@dataclass(slots=True)
class Flow:
    """One client request on its way through the attempts: whose key asks for which model, what the request may
    still spend (attempts under AUTO_RETRY; time under request_timeout, set by its first channel) and what
    failed so far."""

    gw: Gateway
    key: ApiKey
    model: str
    record: RequestRecord | None = None
    attempts_left: float = math.inf
    deadline: float | None = None
    failures: list[tuple[Channel, UpstreamError]] = field(default_factory=list)

    def start_clock(self, first_timeout: float) -> None:
        if self.deadline is None:
            cap = self.gw.config.request_timeout
            cap = 2 * first_timeout if cap is None else cap or math.inf
            self.deadline = time.monotonic() + cap

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def can_spend(self) -> bool:
        return self.attempts_left > 0 and self.time_left() > 0

    def log_attempt(self, channel: Channel, index: int | None, status: int, started: float, why: str) -> None:
        ms = (time.perf_counter() - started) * 1000
        if self.record is not None:
            self.record.add_attempt(channel, index, status, ms)
        if logger.isEnabledFor(logging.INFO):
            logger.info("attempt key=%s provider=%s model=%s key_index=%s status=%d ms=%.1f %s", self.key.label,
                        channel.provider, channel.upstream_model, "none" if index is None else index, status, ms,
                        why)


class _OutOfTime(UpstreamError):
    """The request's time cap ended an attempt: the channel did not fail on its own terms, so it is not cooled."""


class _NotServed(UpstreamError):
    """The channel's engine has no such endpoint: try the next channel, but the channel itself is fine."""


async def dispatch(gw: Gateway, key: ApiKey, model: str, send: Sender, record: RequestRecord | None = None) -> Response:
    """Admit one request of `key` for `model`, then fail over across its channels."""
    return await failover(gw, key, model, await admitted_channels(gw, key, model), send, record)


async def admitted_channels(gw: Gateway, key: ApiKey, model: str) -> tuple[Channel, ...]:
    """The key's channels for `model`, once the request fits the key's rate limit (recorded as one request)."""
    channels = channels_for(gw, key, model)
    if gw.shared is None:
        wait = gw.scheduler.admit(key.token, model, key.rate_limits or gw.config.rate_limits)
    else:
        wait = await shared_admit(gw, gw.shared, key, model, channels)
    if wait:
        raise RateLimited(f"Rate limit reached for this API key on '{model}'; retry in {wait}s.", wait)
    return channels


async def failover(gw: Gateway, key: ApiKey, model: str, channels: Sequence[Channel], send: Sender,
                   record: RequestRecord | None = None) -> Response:
    """Try `channels` in scheduled order, each key of a channel at most once."""
    flow = Flow(gw, key, model, record, math.inf if key.retries is None else key.retries + 1)
    for channel in gw.scheduler.plan(key.token, channels, key.strategy):
        response = await _try_channel(flow, channel, send)
        if response is not None:
            return response
    raise _all_failed(model, flow.failures)


async def _try_channel(flow: Flow, channel: Channel, send: Sender) -> Response | None:
    """The channel's keys in turn until one answers or a failure is the channel's; failures go on `flow`."""
    gw = flow.gw
    policy = gw.config.policies[channel.provider]
    timeout = resolve_timeout(channel.upstream_model, policy.timeouts, gw.config.timeouts, gw.config.default_timeout)
    flow.start_clock(timeout)
    tried = False
    # closed here, not left to the garbage collector, which would spend a task per request closing it
    async with contextlib.aclosing(_keys(flow, policy, channel.upstream_model)) as keys:
        async for index in keys:
            tried, left = True, flow.time_left()
            flow.attempts_left -= 1
            started = time.perf_counter()
            outcome = await _attempt(flow, channel, index, timeout, send, left)
            gw.recent.record(channel, outcome, time.perf_counter() - started)
            if isinstance(outcome, Response):
                return outcome
            flow.failures.append((channel, outcome))
            if not outcome.retryable:
                raise GatewayError(outcome.message, status=outcome.status, type_="invalid_request_error",
                                   code="upstream_error")
            if isinstance(outcome, _OutOfTime):
                flow.attempts_left = 0
            elif isinstance(outcome, _NotServed):
                flow.attempts_left += 1  # nothing was sent upstream
            elif outcome.status in _KEY_FAILURES and index is not None:
                await key_failed(gw, policy, index, outcome.retry_after)
                continue
            else:
                await channel_failed(gw, channel)
            return None
    if not flow.can_spend():
        return None
    if tried:  # every key failed this request: the channel failed
        await channel_failed(gw, channel)
    else:
        flow.failures.append((channel, UpstreamError(503, "every key is cooling down or rate limited")))
    return None


async def _attempt(flow: Flow, channel: Channel, index: int | None, timeout: float, send: Sender,
                   left: float = math.inf) -> Response | UpstreamError:
    """One try of one channel with one key, cut off when the request's time (`left`) runs out."""
    gw = flow.gw
    provider = gw.config.providers[channel.provider]
    adapter = ADAPTERS[channel.engine]
    started = time.perf_counter()

    async def send_once() -> Response:
        token = await gw.tokens.get(provider) if adapter.auth == "google-oauth" else None
        api_key = "" if index is None else provider.api_keys[index]
        return await send(channel, adapter, Target(provider, channel.upstream_model, api_key, token, time.time()),
                          timeout)

    try:
        response = await _within(None if left == math.inf else left, send_once())
    except asyncio.TimeoutError:  # only the cap: send turns its own timeouts into UpstreamError
        exc = _OutOfTime(504, f"timed out after {left:.3g}s (the request's time limit)")
        flow.log_attempt(channel, index, exc.status, started, f"stopping: {exc.message}")
        return exc
    except UpstreamError as exc:
        exc.message = _redact_secrets(exc.message, gw.config.secrets)
        flow.log_attempt(channel, index, exc.status, started, f"moving on: {exc.message}")
        return exc
    if gw.scheduler.record_success(channel) and gw.shared is not None:  # it was cooling: for everyone, then
        await gw.shared.clear(gw.shared.name("cool", channel.provider, channel.upstream_model))
    flow.log_attempt(channel, index, response.status_code, started, "")
    return response


async def _within(seconds: float | None, work: Awaitable[T]) -> T:
    """`await work`, raising TimeoutError after `seconds`. asyncio.timeout (3.11+) cancels this task in place;
    asyncio.wait_for, the 3.10 fallback, runs `work` in a task of its own (one more per attempt there)."""
    if sys.version_info < (3, 11):
        return await asyncio.wait_for(work, seconds)
    async with asyncio.timeout(seconds):
        return await work


def _all_failed(model: str, failures: Sequence[tuple[Channel, UpstreamError]]) -> AllChannelsFailed:
    statuses = {error.status for _, error in failures}
    status = 504 if statuses <= {504} else 503 if statuses <= {429, 503} else 502  # none tried: out of time
    reasons = "; ".join(f"{c.provider}/{c.upstream_model}: {e}" for c, e in failures) or "no channel was tried"
    if statuses == {400}:  # every channel refused the request as converted for it (a hosted tool, ...): the client's
        return AllChannelsFailed(f"No channel for '{model}' can take this request: {reasons}", status=400,
                                 type_="invalid_request_error")
    return AllChannelsFailed(f"All channels failed for '{model}': {reasons}", status=status)


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it (and the upstream call inside) if the client disconnects first.

    `work` runs in this task and only the watcher gets a task of its own: one task per request, not two.
    The watcher's callback runs while this task waits, so it never cancels a task that already moved on."""
    current = asyncio.current_task()
    watcher = asyncio.ensure_future(_wait_disconnect(request))

    def on_disconnect(done: asyncio.Future[None]) -> None:
        if not done.cancelled() and done.exception() is None and current is not None:
            current.cancel()

    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.remove_done_callback(on_disconnect)
        watcher.cancel()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- Moderation (api_keys[].preferences.ENABLE_MODERATION) ---


class ContentFlagged(GatewayError):
    status, type, code = 400, "invalid_request_error", "content_policy_violation"


_NO_MODERATION_MODEL: Final = (f"moderation is on but this key's model rules reach no moderation model "
                               f"({' or '.join(MODERATION_MODELS)})")


def unmoderated_keys(config: Config, routes: Mapping[str, KeyRoutes]) -> list[int]:
    """Indexes of the keys with moderation on whose rules reach no moderation model."""
    return [i for i, key in enumerate(config.api_keys) if key.moderation and not routes[key.token].moderation_model]


def _check_moderation_rules(config: Config, entries: Sequence[tuple[str, Any, int]]) -> None:
    """At parse time, when every provider lists its models; otherwise check_moderation runs after discovery."""
    if not any(key.moderation for key in config.api_keys) or not all(p.models for p in config.providers.values()):
        return
    for i in unmoderated_keys(config, build_routes(config, {}, 0)[0]):
        path, item, line = entries[i]
        prefs = _Node(item, path, config.source, line).mapping("preferences")
        assert prefs is not None  # ENABLE_MODERATION is on, so the key has preferences
        raise prefs.error(_NO_MODERATION_MODEL, "ENABLE_MODERATION")


def check_moderation(config: Config, routes: Mapping[str, KeyRoutes]) -> None:
    """The same check once discovered model lists are in, at startup and on reload (no line number then)."""
    for i in unmoderated_keys(config, routes):
        where = f"api_keys[{i}].preferences.ENABLE_MODERATION"
        raise ConfigError(f"{_source_name(config.source)}: {where}: {_NO_MODERATION_MODEL}")


def flagged_categories(answer: bytes) -> list[str]:
    """The categories an OpenAI moderation answer flags; ["unspecified"] when flagged without one."""
    try:
        results = [r for r in adapters.loads(answer)["results"] if r.get("flagged")]
        names = [name for r in results for name, hit in (r.get("categories") or {}).items() if hit is True]
    except (adapters.JSONDecodeError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise AllChannelsFailed("The moderation model's answer could not be read.") from None
    return list(dict.fromkeys(names)) or (["unspecified"] if results else [])


async def moderate(gw: Gateway, key: ApiKey, text: str) -> None:
    """Send the last user text to the key's moderation model; raise ContentFlagged when it is flagged.

    It rides on the chat request's admission (no rate-limit slot of its own) and fails closed: when every
    moderation channel fails, the chat request fails too.
    """
    model = gw.routes[key.token].moderation_model
    if not text or model is None:
        return
    send = endpoint_sender(gw, "moderations", {"model": model, "input": text}, model)
    answer = await failover(gw, key, model, channels_for(gw, key, model), send)
    flagged = flagged_categories(answer.body)
    if flagged:
        raise ContentFlagged(f"The request was rejected by moderation; flagged categories: {', '.join(flagged)}.")


# --- Shared state: rate windows, cooldowns and key benches in Redis (or Valkey) ---
# Workers and instances with the same `state:` see one set of limits and cooldowns. The scheduler stays pure:
# admission reads what everyone recorded in one round trip and hands it over (adopt_cooldowns, adopt_benches);
# failures write their cooldown with its real expiry. Time is Redis's own (TIME), so instance clocks may differ.
# Redis keys hold fingerprints (a sha256 prefix), never a client or provider key. Round-robin positions stay per
# instance: over N instances each rotates on its own, so shares even out but strict alternation does not hold.

# KEYS: n sliding windows (sorted sets of request times), then keys whose remaining PTTL is wanted.
# ARGV: n, a member unique to this request, then count and window (ms) per window. Returns the ms until every
# window has room (0: admitted and recorded in all of them), then one PTTL per remaining key, comma-separated
# (one string is parsed far faster by redis-py than an array of integers).
_ADMIT_LUA: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local n = tonumber(ARGV[1])
local wait = 0
for i = 1, n do
  local count, window = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local used = redis.call('ZCARD', KEYS[i])
  if used >= count then
    local oldest = redis.call('ZRANGE', KEYS[i], used - count, used - count, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now)
  end
end
if wait == 0 then
  for i = 1, n do
    redis.call('ZADD', KEYS[i], now, ARGV[2])
    redis.call('PEXPIRE', KEYS[i], math.ceil(tonumber(ARGV[2 + 2 * i])))
  end
end
local out = {math.ceil(wait)}
for i = n + 1, #KEYS do out[#out + 1] = redis.call('PTTL', KEYS[i]) end
return table.concat(out, ',')
"""
# KEYS: per candidate key in order, its bench key then its L windows. ARGV: L, member, count and window (ms) per
# window. Takes the first candidate that is not benched and has room in every window; returns its 1-based
# position, or 0 when none has.
_ACQUIRE_LUA: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local l = tonumber(ARGV[1])
for c = 0, #KEYS / (l + 1) - 1 do
  local base = c * (l + 1)
  if redis.call('EXISTS', KEYS[base + 1]) == 0 then
    local room = true
    for i = 1, l do
      local count, window = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
      redis.call('ZREMRANGEBYSCORE', KEYS[base + 1 + i], '-inf', now - window)
      if redis.call('ZCARD', KEYS[base + 1 + i]) >= count then room = false end
    end
    if room then
      for i = 1, l do
        redis.call('ZADD', KEYS[base + 1 + i], now, ARGV[2])
        redis.call('PEXPIRE', KEYS[base + 1 + i], math.ceil(tonumber(ARGV[2 + 2 * i])))
      end
      return c + 1
    end
  end
end
return 0
"""
# KEYS[1] cools (or is benched) for ARGV[1] ms, unless it already is for longer.
_COOL_LUA: Final = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return 0
"""
SHARED_RETRY_S: Final = 1.0  # after a failure, Redis is left alone this long (requests decide without it)
SHARED_WARN_EVERY_S: Final = 10.0


class SharedStateDown(GatewayError):
    status, type, code = 503, "server_error", "shared_state_unavailable"


class SharedState:
    """The Redis client, the scripts above, and the health that /metrics and /status report.

    Commands issued in one turn of the event loop go to Redis together, in one pipeline: under load many
    requests share a round trip, which is most of what Redis costs a request in CPU (bench/capacity.py).
    Every call returns None instead of raising when Redis is unreachable or slower than `timeout`; the flow
    then does what `on_error` says. After a failure Redis is left alone for SHARED_RETRY_S, then tried again,
    so sharing resumes by itself when it is back and a dead Redis costs a request only the local decision.
    """

    def __init__(self, options: StateOptions) -> None:
        import redis.asyncio  # only here: a one-process gateway never needs redis-py
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.options = options
        self.errors = 0  # decisions taken without Redis (a metric)
        self.down_since: float | None = None
        # No socket_timeout: one timeout bounds each whole pipeline (_execute). No retries: redis-py retries
        # with backoff by default, which would hold requests while Redis is down.
        self._client = redis.asyncio.Redis.from_url(options.redis_url, socket_connect_timeout=options.timeout_s,
                                                    retry=Retry(NoBackoff(), 0))
        self._no_script = redis.exceptions.NoScriptError
        self._faults = (redis.RedisError, OSError, asyncio.TimeoutError)
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Future[None]] = set()
        self._retry_at = self._warned_at = -math.inf
        self._member = os.urandom(6).hex().encode() + b":"  # + a counter: unique per request across instances
        self._count = 0
        # Arguments go to redis-py as bytes: its pure-Python packer then copies them instead of converting each.
        self._names: dict[tuple[str, ...], bytes] = {}

    def name(self, kind: str, *parts: str) -> bytes:
        """`{prefix}:kind:fingerprint`. The braces make the prefix a hash tag: all keys one script touches fall
        in one slot, as Redis Cluster proxies require."""
        found = self._names.get((kind, *parts))
        if found is None:
            if len(self._names) > 100_000:  # reloads leave old names behind; forget them all now and then
                self._names.clear()
            digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]
            found = self._names[(kind, *parts)] = f"{{{self.options.prefix}}}:{kind}:{digest}".encode()
        return found

    def windows(self, owner: tuple[str, ...], found: tuple[str, tuple[RateLimit, ...]]) -> list[bytes]:
        """Redis keys of the sliding windows of `owner` for one rate-limit entry (model name, limits)."""
        entry, limits = found
        return [self.name("rate", *owner, entry, f"{limit.count}/{limit.window_s:g}") for limit in limits]

    async def admit(self, windows: Sequence[bytes], limits: Sequence[RateLimit],
                    ttl_keys: Sequence[bytes]) -> list[int] | None:
        """Check-and-record `windows`; [ms until admitted or 0, PTTL of each of `ttl_keys`...], None when down."""
        keys = [*windows, *ttl_keys]
        found = await self._call(b"EVALSHA", _SHA["admit"], b"%d" % len(keys), *keys, b"%d" % len(windows),
                                 self._next_member(), *_limit_args(limits))
        return None if found is None else [int(number) for number in found.split(b",")]

    async def acquire(self, candidates: Sequence[tuple[bytes, list[bytes]]], limits: Sequence[RateLimit]) -> int | None:
        """First candidate (bench key, window keys) free in Redis: its position, -1 when none, None when down."""
        keys = [name for bench, names in candidates for name in (bench, *names)]
        found = await self._call(b"EVALSHA", _SHA["acquire"], b"%d" % len(keys), *keys, b"%d" % len(limits),
                                 self._next_member(), *_limit_args(limits))
        return None if found is None else int(found) - 1

    async def cool(self, name: bytes, seconds: float) -> None:
        """`name` cools for `seconds` everywhere (a longer cooldown already there stays)."""
        await self._call(b"EVALSHA", _SHA["cool"], b"1", name, b"%d" % math.ceil(seconds * 1000))

    async def clear(self, name: bytes) -> None:
        await self._call("DEL", name)

    async def start(self) -> bool:
        """Load the scripts (so the first requests need one round trip, not five); False when Redis is down."""
        for text in _SCRIPTS.values():
            if await self._call(b"SCRIPT", b"LOAD", text) is None:
                return False
        return True

    def refuse_when_closed(self) -> None:
        """Redis did not answer: with `on_error: closed` the request ends here, with a 503."""
        if self.options.on_error == "closed":
            raise SharedStateDown("Shared state (Redis) is unreachable and state.on_error is closed; retry shortly.")

    async def close(self) -> None:
        closing = getattr(self._client, "aclose", None) or self._client.close  # aclose: redis-py 5.0.1+
        await closing()

    def _next_member(self) -> bytes:
        self._count += 1
        return b"%s%d" % (self._member, self._count)

    async def _call(self, *command: Any) -> Any:
        """One command, sent with the others of this turn of the event loop."""
        if time.monotonic() < self._retry_at:
            self._fault(None)
            return None
        future = asyncio.get_running_loop().create_future()
        self._queue.append((command, future))
        if len(self._queue) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        try:
            result = await future
            if isinstance(result, Exception):  # this command's own error, e.g. a wrong type at its key
                raise result
        except self._faults as exc:
            self._fault(exc)
            return None
        if self.down_since is not None:
            logger.warning("shared state: Redis answers again after %.1f s; limits and cooldowns are shared again",
                           time.time() - self.down_since)
            self.down_since = None
        return result

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            results = await _within(self.options.timeout_s, self._execute([command for command, _ in batch]))
        except Exception as exc:  # handed to each waiting request, which decides by on_error
            results = [exc] * len(batch)
        except BaseException:  # the loop is closing
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # its request may have ended meanwhile
                future.set_result(result)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        results = await self._pipeline(commands)
        if any(isinstance(result, self._no_script) for result in results):  # a restarted Redis forgot them
            for text in _SCRIPTS.values():
                await self._client.script_load(text)
            results = await self._pipeline(commands)
        return results

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if len(commands) == 1:  # a pipeline object costs more than the one command it would carry
            try:
                return [await self._client.execute_command(*commands[0])]
            except self._no_script as exc:
                return [exc]
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

    def _fault(self, exc: BaseException | None) -> None:
        self.errors += 1
        now = time.monotonic()
        if exc is not None:
            self._retry_at = now + SHARED_RETRY_S
            self.down_since = self.down_since or time.time()
        if now - self._warned_at >= SHARED_WARN_EVERY_S:
            self._warned_at = now
            decided = "answering 503" if self.options.on_error == "closed" else "each instance limits on its own"
            logger.warning("shared state: Redis unreachable (%s); on_error=%s: %s until it is back (%d so far)",
                           str(exc or "still down") or type(exc).__name__, self.options.on_error, decided,
                           self.errors)


_SCRIPTS: Final[Mapping[str, str]] = MappingProxyType({"admit": _ADMIT_LUA, "acquire": _ACQUIRE_LUA, "cool": _COOL_LUA})
_SHA: Final[Mapping[str, bytes]] = MappingProxyType({  # the SHA1 by which EVALSHA names each script
    name: hashlib.sha1(text.encode()).hexdigest().encode() for name, text in _SCRIPTS.items()})


def _limit_args(limits: Sequence[RateLimit]) -> list[bytes]:
    return [b"%d" % value for limit in limits for value in (limit.count, math.ceil(limit.window_s * 1000))]


def _redis_where(url: str) -> str:
    """host:port/db of a redis URL, without user or password."""
    rest = url.split("://", 1)[1]
    return rest.rsplit("@", 1)[-1]


def render_shared_metrics(gw: Gateway) -> str:
    lines = ["# HELP uni_api_instance_info The instance that answered (hostname:pid, or $INSTANCE_ID).",
             "# TYPE uni_api_instance_info gauge", f'uni_api_instance_info{{instance_id="{gw.instance}"}} 1']
    if gw.shared is not None:
        lines += ["# HELP uni_api_shared_state_up 1 while Redis (shared state) answers, 0 while it does not.",
                  "# TYPE uni_api_shared_state_up gauge",
                  f"uni_api_shared_state_up {int(gw.shared.down_since is None)}",
                  "# HELP uni_api_shared_state_errors_total Decisions taken without Redis (on_error open or closed).",
                  "# TYPE uni_api_shared_state_errors_total counter",
                  f"uni_api_shared_state_errors_total {gw.shared.errors}"]
    return "\n".join(lines) + "\n"


def shared_state_line(gw: Gateway) -> str:
    """The /status page's sentence about this instance and its shared state."""
    where = f"Instance {html.escape(gw.instance)}."
    shared = gw.shared
    if shared is None:
        return f"{where} Limits and cooldowns are kept in this process only."
    target = html.escape(f"{_redis_where(shared.options.redis_url)} (prefix {shared.options.prefix})")
    if shared.down_since is None:
        return f"{where} Shared state: Redis at {target}, answering."
    since = time.strftime("%H:%M:%S UTC", time.gmtime(shared.down_since))
    return (f"{where} <strong>Shared state: Redis at {target} UNREACHABLE since {since}</strong>; on_error "
            f"{shared.options.on_error}, {shared.errors} decisions taken without it.")


async def shared_admit(gw: Gateway, shared: SharedState, key: ApiKey, model: str,
                       channels: Sequence[Channel]) -> int:
    """One round trip: check-and-record the key's shared rate windows, and adopt the cooldowns of `channels`
    and the benches of their providers' keys. Seconds to wait, 0 when admitted."""
    limits = key.rate_limits or gw.config.rate_limits
    found = limits.lookup(model) if limits is not None else None
    windows = shared.windows(("client", key.token), found) if found is not None else []
    providers = [gw.config.providers[name] for name in dict.fromkeys(channel.provider for channel in channels)]
    cools = [shared.name("cool", c.provider, c.upstream_model) for c in channels]
    benches = [shared.name("bench", p.name, api_key) for p in providers for api_key in p.api_keys]
    answer = await shared.admit(windows, found[1] if found is not None else (), [*cools, *benches])
    if answer is None:
        shared.refuse_when_closed()
        return gw.scheduler.admit(key.token, model, limits)
    wait, ttls = answer[0], [max(0, ms) / 1000 for ms in answer[1:]]
    gw.scheduler.adopt_cooldowns(dict(zip(channels, ttls[:len(channels)], strict=True)))
    start = len(channels)
    for provider in providers:
        gw.scheduler.adopt_benches(provider.name, ttls[start:start + len(provider.api_keys)])
        start += len(provider.api_keys)
    return math.ceil(wait / 1000)


async def shared_key(gw: Gateway, shared: SharedState, policy: Policy, model: str, tried: list[int]) -> int | None:
    """`Scheduler.acquire_key` with the provider's `api_key_rate_limit` windows and benches kept in Redis."""
    pool = policy.keys
    found = pool.rate_limits.lookup(model) if pool.rate_limits is not None else None
    if found is None:
        return gw.scheduler.acquire_key(pool, model, tried)
    order = gw.scheduler.key_order(pool, tried)
    provider = gw.config.providers[pool.provider]
    candidates = [(shared.name("bench", provider.name, provider.api_keys[i]),
                   shared.windows(("key", provider.name, provider.api_keys[i]), found)) for i in order]
    position = await shared.acquire(candidates, found[1]) if order else -1
    if position is None:
        shared.refuse_when_closed()
        return gw.scheduler.acquire_key(pool, model, tried)
    if position < 0:
        return None
    gw.scheduler.key_taken(pool, order[position])
    return order[position]


async def channel_failed(gw: Gateway, channel: Channel) -> None:
    """Cool the channel here and, with shared state, everywhere (until its real expiry)."""
    gw.scheduler.record_failure(channel)
    if gw.shared is not None and channel.cooldown_s > 0:
        await gw.shared.cool(gw.shared.name("cool", channel.provider, channel.upstream_model), channel.cooldown_s)


async def key_failed(gw: Gateway, policy: Policy, index: int, retry_after: float | None) -> None:
    """Bench the key here and, with shared state, everywhere, for the longer of its cooldown and Retry-After."""
    gw.scheduler.record_key_failure(policy.keys, index, retry_after)
    period = max(policy.keys.cooldown_s, retry_after or 0.0)
    if gw.shared is not None and period > 0:
        provider = gw.config.providers[policy.keys.provider]
        await gw.shared.cool(gw.shared.name("bench", provider.name, provider.api_keys[index]), period)


# --- Attempts: one try of one channel, and the relay of its answer ---
# One attempt of one request: (channel, adapter, target, timeout) -> the answer, or UpstreamError.
Sender = Callable[[Channel, Adapter, Target, float], Awaitable[Response]]

_STREAM_HEADERS: Final = MappingProxyType({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
TRIGGER_WINDOW: Final = 256  # with error_triggers set, a stream commits once this much text was checked


def _json_response(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


def face_sender(gw: Gateway, face: Face, body: Mapping[str, Any], model: str, client_headers: Mapping[str, str],
                record: RequestRecord | None = None) -> Sender:
    """One attempt of a face's request: the body as sent to an engine that speaks the face, else converted to an
    OpenAI chat request (once per request) for the engine's adapter, the answer rendered back by the face. Of
    `client_headers`, anthropic-beta reaches the Claude channels that take it ("Beta headers")."""
    converted: list[Sender] = []
    betas = adapters.parse_betas(client_headers.get("anthropic-beta"))

    async def send(channel: Channel, adapter: Adapter, target: Target, timeout: float) -> Response:
        target = replace(target, betas=betas) if betas else target  # Claude engines pass on those they take
        native = face.native.get(channel.engine)
        if native is not None:
            return await native_attempt(gw, face, native, body, model, record, channel, target, timeout)
        if not converted:  # UpstreamError(400, retryable) when only a native channel could serve it
            converted.append(chat_sender(gw, face.to_chat(body), model, record, face, body))
        return await converted[0](channel, adapter, target, timeout)

    return send


def chat_sender(gw: Gateway, body: Mapping[str, Any], model: str, record: RequestRecord | None = None,
                face: Face = adapters.FACES["chat"], face_body: Mapping[str, Any] | None = None) -> Sender:
    """One chat attempt; the answer is rendered by `face` (for `face_body`, the request as the client sent it).

    A stream commits only after its first chunks arrived (see _stream_head), so a channel failing before that is
    retried on the next one. Streams always ask the adapter (and the upstream, where the engine can) for usage,
    for the statistics; the usage chunk is dropped again when the client did not ask for it.
    """
    triggers = gw.config.error_triggers
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    face_body = body if face_body is None else face_body
    inlined: list[dict[str, Any]] = []

    async def send(channel: Channel, adapter: Adapter, target: Target, timeout: float) -> Response:
        policy = gw.config.policies[channel.provider]
        if adapter.inline_images and not inlined:
            inlined.append(await inline_images(gw.session, body))
        request = adapter.build_request(inlined[0] if adapter.inline_images else body, target)
        created = int(target.now)
        response = await _open(gw, policy, request, timeout)
        try:
            await _check_status(response, adapter, timeout)
            if not body.get("stream"):
                raw = await _read(response, timeout)
                _check_triggers(raw.decode("utf-8", "replace"), triggers)
                completion = _stamp(adapter.parse_response(_parse_json(raw), model), created)
                if record is not None:
                    record.add_usage(completion.get("usage"))
                return _json_response(adapters.dumps(face.from_chat(completion, face_body, model)))
            parsed = adapter.parse_stream(adapter.iter_events(response.content.iter_any()), model, include_usage=True)
            chunks = _counted(parsed, include_usage, record, created)
            with _transport_errors(timeout):
                head = await _stream_head(chunks, triggers)
        except BaseException:
            response.close()
            raise
        stream = face.stream(face_body, model)
        frames = _relay(stream, head, chunks, response, timeout, gw.config.secrets)
        return StreamingResponse(frames, media_type=stream.media_type, headers=_STREAM_HEADERS)

    return send


async def _counted(chunks: AsyncIterator[dict[str, Any]], include_usage: bool, record: RequestRecord | None,
                   created: int) -> AsyncIterator[dict[str, Any]]:
    """Chunks stamped with `created`, usage noted on `record`; usage-only chunks dropped unless the client asked."""
    async for chunk in chunks:
        if "usage" not in chunk or _take_usage(chunk, include_usage, record):
            yield _stamp(chunk, created)


def _take_usage(chunk: dict[str, Any], include_usage: bool, record: RequestRecord | None) -> bool:
    """Note a chunk's usage; False when the chunk only carried usage the client did not ask for."""
    if record is not None:
        record.add_usage(chunk.get("usage"))
    if include_usage:
        return True
    chunk.pop("usage", None)
    return bool(chunk.get("choices"))


async def _stream_head(chunks: AsyncIterator[dict[str, Any]], triggers: Sequence[str]) -> list[dict[str, Any]]:
    """The chunks read before a stream commits: up to the first with output (text, reasoning, a tool call or a
    finish). With error_triggers set, reading goes on until TRIGGER_WINDOW characters of text were seen, so a
    trigger in the first chunks fails the attempt before anything reached the client, as for whole answers."""
    head: list[dict[str, Any]] = []
    text = ""
    while True:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            if not head:
                raise UpstreamError(502, "upstream stream ended before its first chunk") from None
            return head
        head.append(chunk)
        if triggers:
            text += _delta_text(chunk)
            _check_triggers(text, triggers)
            _check_triggers(adapters.dumps(chunk).decode(), triggers)
        if _has_output(chunk) and (not triggers or len(text) >= TRIGGER_WINDOW):
            return head


_OUTPUT_FIELDS: Final = ("content", "tool_calls", "reasoning_content", "reasoning", "thinking_blocks", "refusal")


def _has_output(chunk: Mapping[str, Any]) -> bool:
    return any(choice.get("finish_reason") or any((choice.get("delta") or {}).get(name) for name in _OUTPUT_FIELDS)
               for choice in chunk.get("choices") or ())


def _delta_text(chunk: Mapping[str, Any]) -> str:
    texts = ((choice.get("delta") or {}).get(name) for choice in chunk.get("choices") or ()
             for name in ("reasoning_content", "content"))
    return "".join(text for text in texts if isinstance(text, str))


def _parse_json(raw: bytes) -> Any:
    try:
        return adapters.loads(raw)
    except (adapters.JSONDecodeError, ValueError, UnicodeDecodeError, RecursionError):
        raise UpstreamError(502, "upstream answered with invalid JSON") from None


def _stamp(answer: dict[str, Any], created: int) -> dict[str, Any]:
    """Fill `created` where the provider's format has no timestamp (adapters never read the clock)."""
    if not answer.get("created"):
        answer["created"] = created
    return answer


async def _relay(stream: adapters.FaceStream, head: list[dict[str, Any]], chunks: AsyncIterator[dict[str, Any]],
                 response: aiohttp.ClientResponse, timeout: float, secrets: re.Pattern[str] | None
                 ) -> AsyncIterator[bytes]:
    """The committed stream in the face's format; a failure ends it with the face's error event."""
    try:
        for chunk in head:
            for frame in stream.on_chunk(chunk):
                yield frame
        with _transport_errors(timeout):
            async for chunk in chunks:
                for frame in stream.on_chunk(chunk):
                    yield frame
        last = stream.end()
    except UpstreamError as exc:
        last = stream.fail(_stream_failure(exc, secrets), 502)
    finally:
        response.close()
    for frame in last:
        yield frame


def _stream_failure(exc: UpstreamError, secrets: re.Pattern[str] | None) -> str:
    """Log a failure after a stream's commit; the message for its last event."""
    reason = _redact_secrets(str(exc), secrets)  # an upstream may quote the key back in its error
    logger.warning("stream failed after its first chunk: %s", reason)
    return f"upstream failed mid-stream: {reason}"


def endpoint_sender(gw: Gateway, endpoint: adapters.Endpoint, body: Mapping[str, Any] | None, model: str,
                    form: tuple[tuple[str, Any], ...] | None = None, record: RequestRecord | None = None) -> Sender:
    """One attempt of a non-chat endpoint; JSON answers get the client's model name back."""

    async def send(channel: Channel, adapter: Adapter, target: Target, timeout: float) -> Response:
        if endpoint not in adapter.endpoints:
            raise _NotServed(404, f"engine {adapter.engine} does not serve this endpoint", retryable=True)
        policy = gw.config.policies[channel.provider]
        response = await _open(gw, policy, adapter.build_endpoint_request(endpoint, body, target, form), timeout)
        try:
            await _check_status(response, adapter, timeout)
            media_type = response.headers.get("Content-Type", "application/octet-stream")
            if endpoint == "speech":
                return StreamingResponse(_relay_bytes(response, timeout), media_type=media_type)
            raw = await _read(response, timeout)
        finally:
            if endpoint != "speech":
                response.release()
        if media_type.startswith("application/json"):
            answer = adapter.parse_endpoint_response(endpoint, _parse_json(raw), model)
            if record is not None and isinstance(answer, dict):
                record.add_usage(answer.get("usage"))
            return _json_response(adapters.dumps(answer))
        return Response(raw, media_type=media_type)

    return send


async def _relay_bytes(response: aiohttp.ClientResponse, timeout: float) -> AsyncIterator[bytes]:
    try:
        with _transport_errors(timeout):
            async for chunk in response.content.iter_any():
                yield chunk
    except UpstreamError as exc:
        logger.warning("audio stream failed: %s", exc)
    finally:
        response.close()


# --- Passthrough: an engine that speaks the client's API natively ---
# The body goes as sent (the model renamed), the answer comes back as it came, through the face's NativeStream;
# a stream commits after the upstream's first event (an error event there fails the attempt).


async def native_attempt(gw: Gateway, face: Face, native: Adapter, body: Mapping[str, Any], model: str,
                         record: RequestRecord | None, channel: Channel, target: Target, timeout: float) -> Response:
    triggers = gw.config.error_triggers
    request = native.build_request(body, target)
    response = await _open(gw, gw.config.policies[channel.provider], request, timeout)
    try:
        await _check_status(response, native, timeout)
        if not face.is_stream(body):
            raw = await _read(response, timeout)
            _check_triggers(raw.decode("utf-8", "replace"), triggers)
            answer, usage = face.native_answer(raw, model)
            if record is not None:
                record.add_usage(usage)
            return _json_response(answer)
        stream = face.native_stream(body, model)
        events = native.iter_events(response.content.iter_any())
        with _transport_errors(timeout):
            first = stream.on_event(await anext_or_fail(events))
        _check_triggers(first.decode("utf-8", "replace"), triggers)
    except BaseException:
        response.close()
        raise
    frames = _relay_native(stream, first, events, response, timeout, record, gw.config.secrets)
    return StreamingResponse(frames, media_type=stream.media_type, headers=_STREAM_HEADERS)


async def anext_or_fail(events: AsyncIterator[T]) -> T:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        raise UpstreamError(502, "upstream stream ended before its first event") from None


async def _relay_native(stream: adapters.NativeStream, first: bytes, events: AsyncIterator[adapters.SSEEvent],
                        response: aiohttp.ClientResponse, timeout: float, record: RequestRecord | None,
                        secrets: re.Pattern[str] | None) -> AsyncIterator[bytes]:
    """The committed passthrough stream; a cut before the format's last event ends it with the face's error."""
    last: list[bytes] = []
    try:
        yield first
        with _transport_errors(timeout):
            async for event in events:
                yield stream.on_event(event)
        if not stream.done:
            raise UpstreamError(502, "upstream stream ended before its last event")
        last = stream.end()
    except UpstreamError as exc:
        last = stream.fail(_stream_failure(exc, secrets), 502)
    finally:
        response.close()
        if record is not None:
            record.add_usage(stream.usage)
    for frame in last:
        yield frame


# --- Transport: upstream calls, OAuth tokens, image inlining ---


_KEY_FAILURES: Final = frozenset({401, 403, 429})  # that key is bad or busy: try the provider's next key
_SECRET_PATTERN: Final = re.compile(r"\b(?:sk|pk|rk|key|AIza)[-_A-Za-z0-9*]{12,}")


def _redact_secrets(text: str, secrets: re.Pattern[str] | None) -> str:
    """`text` with the config's secrets and anything shaped like a key replaced by [redacted]."""
    text = secrets.sub("[redacted]", text) if secrets else text
    return _SECRET_PATTERN.sub("[redacted]", text)


@contextlib.contextmanager
def _transport_errors(timeout: float) -> Iterator[None]:
    """Connection failures and timeouts of one attempt, as UpstreamError."""
    try:
        yield
    except asyncio.TimeoutError:
        raise UpstreamError(504, f"timed out after {timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(502, f"connection failed: {type(exc).__name__}: {exc}".rstrip(": ")) from None


async def _open(gw: Gateway, policy: Policy, request: UpstreamRequest, timeout: float) -> aiohttp.ClientResponse:
    proxy = policy.proxy
    session = gw.socks_sessions[proxy] if proxy and proxy.startswith("socks") else gw.session
    headers = dict(request.headers)
    data: Any = request.data
    if request.json is not None:
        try:
            data = adapters.dumps(request.json)
        except (ValueError, TypeError, OverflowError):  # e.g. 1e400 parsed as infinity: no JSON can carry it
            raise InvalidRequest("The request holds a number outside JSON's range (such as 1e400).") from None
        headers["Content-Type"] = "application/json"
    elif request.form is not None:
        data = aiohttp.FormData()
        for name, value in request.form:
            if isinstance(value, tuple):
                data.add_field(name, value[1], filename=value[0], content_type=value[2])
            else:
                data.add_field(name, value)
    client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    with _transport_errors(timeout):
        return await session.request(request.method, request.url, headers=headers, data=data, timeout=client_timeout,
                                     proxy=None if session is not gw.session else proxy)


async def _read(response: aiohttp.ClientResponse, timeout: float) -> bytes:
    with _transport_errors(timeout):
        body = await _read_limited(response, UPSTREAM_BODY_LIMIT)
    if body is None:
        raise UpstreamError(502, f"upstream answer is larger than {UPSTREAM_BODY_LIMIT} bytes")
    return body


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None past `limit` bytes (`content.read(n)` would stop at the first network read)."""
    pieces: list[bytes] = []
    size = 0
    async for piece in response.content.iter_any():
        size += len(piece)
        if size > limit:
            return None
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


async def _check_status(response: aiohttp.ClientResponse, adapter: Adapter, timeout: float) -> None:
    if response.status >= 400:
        body = await _read(response, timeout)
        retry_after = adapters.parse_retry_after(response.headers.get("Retry-After"))
        raise adapter.parse_error(response.status, body, retry_after)


def _check_triggers(text: str, triggers: Sequence[str]) -> None:
    for trigger in triggers:
        if trigger in text:
            raise UpstreamError(502, f"answer matched error trigger '{trigger}'", retryable=True)


class TokenCache:
    """Google OAuth tokens per provider: one exchange shared by concurrent requests, reused until near expiry."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._tokens: dict[str, tuple[str, float]] = {}
        self._pending: dict[str, asyncio.Future[str]] = {}

    async def get(self, provider: Provider) -> str:
        cached = self._tokens.get(provider.name)
        if cached and cached[1] - TOKEN_REFRESH_MARGIN > time.time():
            return cached[0]
        pending = self._pending.get(provider.name)
        if pending is None:
            pending = self._pending[provider.name] = asyncio.ensure_future(self._exchange(provider))
            pending.add_done_callback(lambda _: self._pending.pop(provider.name, None))
        return await asyncio.shield(pending)

    def forget(self, names: Iterable[str]) -> None:
        """Drop the tokens of providers whose credentials may have changed (a config reload)."""
        for name in names:
            self._tokens.pop(name, None)

    async def _exchange(self, provider: Provider) -> str:
        extra, now = provider.extra, int(time.time())
        token_uri = extra.get("token_uri") or adapters.GOOGLE_TOKEN_URI
        try:
            assertion = adapters.google_jwt_assertion(extra.get("client_email", ""),
                                                      extra.get("private_key", "").replace("\\n", "\n"), token_uri, now)
        except ValueError as exc:
            raise UpstreamError(502, f"cannot sign the OAuth assertion: {exc}", retryable=True) from None
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
        with _transport_errors(30.0):
            async with self._session.post(token_uri, data=form, timeout=aiohttp.ClientTimeout(total=30)) as response:
                body = await response.read()
        try:
            answer = adapters.loads(body) if response.status == 200 else {}
            token, lifetime = str(answer["access_token"]), float(answer.get("expires_in", 3600))
        except (KeyError, TypeError, ValueError):
            message = f"OAuth token exchange failed with HTTP {response.status}"
            raise UpstreamError(502, message, retryable=True) from None
        self._tokens[provider.name] = (token, now + lifetime)
        return token


_IMAGE_LIMIT: Final = 20 * 1024 * 1024


async def inline_images(session: aiohttp.ClientSession, body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `body` whose http(s) image URLs became data URIs, for providers that cannot fetch URLs."""
    messages = []
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            content = [await _inline_part(session, part) for part in content]
            message = {**message, "content": content}
        messages.append(message)
    return {**body, "messages": messages}


async def _inline_part(session: aiohttp.ClientSession, part: Any) -> Any:
    image = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return part
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
            data = await _read_limited(response, _IMAGE_LIMIT) if response.status == 200 else None
            kind = response.headers.get("Content-Type", "image/jpeg").split(";")[0]
    except (aiohttp.ClientError, asyncio.TimeoutError):
        data = None
    if data is None:
        raise UpstreamError(400, f"could not fetch the image at {url[:200]}")
    return {**part, "image_url": {**image, "url": f"data:{kind};base64,{base64.b64encode(data).decode()}"}}


# --- Stats ---
# Requests are recorded off the request path: the flow fills a RequestRecord, the request log middleware hands the
# finished record to Stats.record (a deque append plus a few counter increments), and a background task writes
# batches to SQLite through asyncio.to_thread. Reads use their own connection, also off the event loop.

STATS_FLUSH_INTERVAL: Final = 1.0
STATS_FLUSH_BATCH: Final = 256
STATS_WRITER_CACHE_KIB: Final = 256
STATS_PRUNE_INTERVAL: Final = 86400.0
DEFAULT_DB_PATH: Final = "./data/stats.db"
DEFAULT_RETENTION_DAYS: Final = 30.0
LATENCY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TRUE_WORDS: Final = ("1", "true", "yes", "on")

# Each version's statements, applied in order from the file's PRAGMA user_version up, each in one transaction.
# v1: requests and attempts; v2: request ids on both, a key fingerprint (for "own usage" queries) and cached tokens;
# v3: tokens written to a prompt cache (Anthropic's cache_creation_input_tokens).
_MIGRATIONS: Final[Mapping[int, tuple[str, ...]]] = MappingProxyType({
    1: ("CREATE TABLE requests (id INTEGER PRIMARY KEY, time REAL NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL,"
        " provider TEXT NOT NULL, upstream_model TEXT NOT NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL,"
        " total_ms REAL NOT NULL, first_byte_ms REAL, prompt_tokens INTEGER NOT NULL DEFAULT 0,"
        " completion_tokens INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,"
        " client_ip TEXT NOT NULL DEFAULT '')",
        "CREATE TABLE attempts (id INTEGER PRIMARY KEY, time REAL NOT NULL, provider TEXT NOT NULL,"
        " model TEXT NOT NULL, key_index INTEGER NOT NULL, status INTEGER NOT NULL, ms REAL NOT NULL)",
        "CREATE INDEX requests_time ON requests (time)",
        "CREATE INDEX attempts_time ON attempts (time)"),
    2: ("ALTER TABLE requests ADD COLUMN request_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE requests ADD COLUMN key_hash TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE requests ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE attempts ADD COLUMN request_id TEXT NOT NULL DEFAULT ''"),
    3: ("ALTER TABLE requests ADD COLUMN cache_creation_tokens INTEGER NOT NULL DEFAULT 0",),
})
SCHEMA_VERSION: Final = max(_MIGRATIONS)


class StatsError(Exception):
    """The statistics database cannot be opened or is newer than this program."""


@dataclass(frozen=True, slots=True)
class StatsOptions:
    """Where statistics go. `path=None` keeps only the in-memory metrics; retention 0 keeps rows forever."""

    path: str | None = None
    retention_days: float = DEFAULT_RETENTION_DAYS

    @classmethod
    def from_env(cls) -> StatsOptions:
        """`DISABLE_DATABASE`, `DB_PATH` and `STATS_RETENTION_DAYS`, read once at startup."""
        if os.environ.get("DISABLE_DATABASE", "").lower() in _TRUE_WORDS:
            return cls(None)
        return cls(os.environ.get("DB_PATH") or DEFAULT_DB_PATH,
                   max(0.0, _env_float("STATS_RETENTION_DAYS", DEFAULT_RETENTION_DAYS)))


@dataclass(slots=True)
class RequestRecord:
    """What one request did: made by the request log middleware, filled in by the flow, recorded when it ends."""

    request_id: str
    endpoint: str  # "POST /v1/chat/completions", as uni-api's stats name endpoints
    client_ip: str
    started: float = field(default_factory=time.perf_counter)
    wall: float = field(default_factory=time.time)
    key: ApiKey | None = None
    model: str = ""
    provider: str = ""
    upstream_model: str = ""
    status: int = 0
    total_ms: float = 0.0
    first_byte_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    attempts: list[tuple[str, str, int, int, float]] = field(default_factory=list)  # provider, model, key, status, ms

    def add_attempt(self, channel: Channel, index: int | None, status: int, ms: float) -> None:
        """`index`: the provider key's, None for a provider without keys (-1 in the attempts table)."""
        self.provider, self.upstream_model = channel.provider, channel.upstream_model
        self.attempts.append((channel.provider, channel.upstream_model, -1 if index is None else index, status, ms))

    def add_usage(self, usage: Any) -> None:
        """The upstream's usage (the last report wins: some providers send running totals)."""
        if isinstance(usage, Mapping):
            self.prompt_tokens = _count(usage.get("prompt_tokens"))
            self.completion_tokens = _count(usage.get("completion_tokens"))
            details = usage.get("prompt_tokens_details")
            self.cached_tokens = _count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
            self.cache_creation_tokens = _count(usage.get("cache_creation_input_tokens"))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _record_rows(record: RequestRecord) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    key = record.key
    label, key_hash = (key.label, _digest(key.token).hex()[:16]) if key else ("", "")
    request = (record.wall, label, key_hash, record.model[:200], record.provider, record.upstream_model[:200],
               record.endpoint[:200], record.status, record.total_ms, record.first_byte_ms, record.prompt_tokens,
               record.completion_tokens, record.cached_tokens, record.cache_creation_tokens, len(record.attempts),
               record.client_ip, record.request_id)
    attempts = [(record.wall, p, m[:200], i, s, ms, record.request_id) for p, m, i, s, ms in record.attempts]
    return request, attempts


class StatsStore:
    """The SQLite file: one writer connection and one reader connection, both used from worker threads."""

    def __init__(self, path: str) -> None:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._writer = self._connect(path)
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.execute("PRAGMA synchronous=NORMAL")
            # Appends touch the last pages of each table and index only: 256 KiB of page cache instead of
            # SQLite's default 2 MB, which the writer would otherwise fill and keep in the idle RSS.
            self._writer.execute(f"PRAGMA cache_size=-{STATS_WRITER_CACHE_KIB:d}")
            migrate(self._writer)
            self._reader = self._connect(path)
        except (OSError, sqlite3.Error) as exc:
            raise StatsError(f"{path}: cannot open the statistics database: {exc}") from None
        self._read_lock = threading.Lock()

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        connection = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        connection.row_factory = sqlite3.Row
        return connection

    def write(self, records: Sequence[RequestRecord]) -> None:
        rows = [_record_rows(record) for record in records]
        with _transaction(self._writer) as db:
            db.executemany("INSERT INTO requests (time, key, key_hash, model, provider, upstream_model, endpoint,"
                           " status, total_ms, first_byte_ms, prompt_tokens, completion_tokens, cached_tokens,"
                           " cache_creation_tokens, attempts, client_ip, request_id)"
                           " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           [request for request, _ in rows])
            db.executemany("INSERT INTO attempts (time, provider, model, key_index, status, ms, request_id)"
                           " VALUES (?,?,?,?,?,?,?)", [a for _, attempts in rows for a in attempts])

    def prune(self, before: float) -> None:
        with _transaction(self._writer) as db:
            db.execute("DELETE FROM requests WHERE time < ?", (before,))
            db.execute("DELETE FROM attempts WHERE time < ?", (before,))

    def query(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._reader.execute(sql, params).fetchall()

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def migrate(db: sqlite3.Connection) -> int:
    """Bring the schema up to SCHEMA_VERSION in place; returns the version found."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise StatsError(f"schema version {found} is newer than this uni-api's ({SCHEMA_VERSION})")
    for version in range(found + 1, SCHEMA_VERSION + 1):
        with _transaction(db):
            for statement in _MIGRATIONS[version]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version:d}")
    return found


@dataclass(slots=True)
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # last: above every bound
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


Labels = tuple[str, ...]


@dataclass(slots=True)
class Metrics:
    """In-memory counters and histograms behind /metrics; updated on the event loop, never per chunk."""

    requests: dict[Labels, int] = field(default_factory=dict)  # (provider, model, status)
    errors: dict[Labels, int] = field(default_factory=dict)  # (provider, model, status), status >= 400
    attempts: dict[Labels, int] = field(default_factory=dict)  # (provider, upstream model, status)
    tokens: dict[Labels, int] = field(default_factory=dict)  # (provider, model, kind)
    latency: dict[Labels, _Histogram] = field(default_factory=dict)  # (provider, model)
    first_byte: dict[Labels, _Histogram] = field(default_factory=dict)

    def observe(self, record: RequestRecord) -> None:
        # Only a routed request names its model: an unknown model name must not become a label.
        channel = (record.provider, record.model if record.provider else "")
        labels = (*channel, str(record.status))
        self.requests[labels] = self.requests.get(labels, 0) + 1
        if record.status >= 400:
            self.errors[labels] = self.errors.get(labels, 0) + 1
        for provider, model, _, status, _ in record.attempts:
            attempt = (provider, model, str(status))
            self.attempts[attempt] = self.attempts.get(attempt, 0) + 1
        for kind, count in (("prompt", record.prompt_tokens), ("completion", record.completion_tokens),
                            ("cached", record.cached_tokens)):
            if count:
                self.tokens[(*channel, kind)] = self.tokens.get((*channel, kind), 0) + count
        _observe(self.latency, channel, record.total_ms / 1000)
        if record.first_byte_ms is not None:
            _observe(self.first_byte, channel, record.first_byte_ms / 1000)


def _observe(histograms: dict[Labels, _Histogram], labels: Labels, seconds: float) -> None:
    histogram = histograms.get(labels)
    if histogram is None:  # not setdefault: that would build a histogram per request only to drop it
        histogram = histograms[labels] = _Histogram()
    histogram.observe(seconds)


_METRIC_HELP: Final = (
    ("uni_api_requests_total", "counter", "Requests answered, by provider, model and status.",
     ("provider", "model", "status"), "requests"),
    ("uni_api_errors_total", "counter", "Requests answered with an error status.",
     ("provider", "model", "status"), "errors"),
    ("uni_api_attempts_total", "counter", "Attempts on upstream channels, by provider, upstream model and status.",
     ("provider", "model", "status"), "attempts"),
    ("uni_api_tokens_total", "counter", "Tokens reported by upstreams (kind: prompt, completion, cached).",
     ("provider", "model", "kind"), "tokens"),
)
_HISTOGRAM_HELP: Final = (
    ("uni_api_request_duration_seconds", "Time from request to the end of the answer.", "latency"),
    ("uni_api_time_to_first_byte_seconds", "Time from request to the first byte of the answer.", "first_byte"),
)


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return ",".join(f'{name}="{escape(value)}"' for name, value in zip(names, values, strict=True))


def render_metrics(metrics: Metrics, cooling: int) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for name, kind, help_text, names, attribute in _METRIC_HELP:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{{{_label_text(names, labels)}}} {value}"
                  for labels, value in sorted(getattr(metrics, attribute).items())]
    for name, help_text, attribute in _HISTOGRAM_HELP:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for labels, histogram in sorted(getattr(metrics, attribute).items()):
            lines += _histogram_lines(name, _label_text(("provider", "model"), labels), histogram)
    lines += ["# HELP uni_api_channels_cooling Channels cooling down after a failure.",
              "# TYPE uni_api_channels_cooling gauge", f"uni_api_channels_cooling {cooling}"]
    return "\n".join(lines) + "\n"


def _histogram_lines(name: str, labels: str, histogram: _Histogram) -> list[str]:
    lines, running = [], 0
    for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), histogram.counts, strict=True):
        running += count
        lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
    lines += [f"{name}_sum{{{labels}}} {histogram.total:.6f}", f"{name}_count{{{labels}}} {running}"]
    return lines


class Stats:
    """Metrics in memory and, unless disabled, rows in SQLite written in batches by a background task."""

    def __init__(self, options: StatsOptions | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.options = options or StatsOptions()
        self.metrics = Metrics()
        self._clock = clock
        self._queue: deque[RequestRecord] = deque()
        self._store: StatsStore | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def enabled(self) -> bool:
        return self._store is not None

    async def start(self) -> None:
        """Open (and migrate) the database, prune old rows, start the writer; raises StatsError."""
        self._wake, self._lock = asyncio.Event(), asyncio.Lock()
        if self.options.path is None:
            return
        self._store = await asyncio.to_thread(StatsStore, self.options.path)
        await self.prune()
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Stop the writer between batches (never mid-write), write what is left, close the file."""
        if self._task is not None and self._wake is not None:
            self._closing = True
            self._wake.set()
            await self._task
        if self._store is not None:
            await self.flush()
            await asyncio.to_thread(self._store.close)
            self._store = None

    def record(self, record: RequestRecord) -> None:
        """The only call on the request path: counters in memory, the record onto the write queue."""
        self.metrics.observe(record)
        if self._store is not None and record.key is not None and record.model:
            self._queue.append(record)
            if len(self._queue) >= STATS_FLUSH_BATCH and self._wake is not None:
                self._wake.set()

    async def flush(self) -> None:
        """Write what is queued (one writer at a time, in a worker thread)."""
        if self._store is None or self._lock is None:
            return
        async with self._lock:
            batch = [self._queue.popleft() for _ in range(len(self._queue))]
            if batch:
                await asyncio.to_thread(self._store.write, batch)

    async def prune(self) -> None:
        if self._store is not None and self._lock is not None and self.options.retention_days > 0:
            before = self._clock() - self.options.retention_days * 86400
            async with self._lock:
                await asyncio.to_thread(self._store.prune, before)

    async def _run(self) -> None:
        assert self._wake is not None
        next_prune = time.monotonic() + STATS_PRUNE_INTERVAL
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), STATS_FLUSH_INTERVAL)
            self._wake.clear()
            try:
                await self.flush()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + STATS_PRUNE_INTERVAL
                    await self.prune()
            except sqlite3.Error as exc:  # a full disk loses this batch, not the gateway
                logger.error("statistics database: %s", exc)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows from the read connection, after writing what is queued, so a read sees every finished request."""
        if self._store is None:
            raise StatsDisabled("Statistics are disabled (DISABLE_DATABASE=true).")
        await self.flush()
        return await asyncio.to_thread(self._store.query, sql, params)

    async def summary(self, hours: int) -> dict[str, Any]:
        """uni-api's /v1/stats answer for the last `hours` hours."""
        since = (self._clock() - hours * 3600,)
        success = "SUM(status BETWEEN 200 AND 399)"
        by_model = await self.query(f"SELECT provider, model, COUNT(*) AS total, {success} AS ok FROM attempts"
                                    " WHERE time >= ? GROUP BY provider, model", since)
        by_provider = await self.query(f"SELECT provider, COUNT(*) AS total, {success} AS ok FROM attempts"
                                       " WHERE time >= ? GROUP BY provider", since)
        counts = {column: await self.query(f"SELECT {column} AS name, COUNT(*) AS count FROM requests WHERE time >= ?"
                                           f" GROUP BY {column} ORDER BY count DESC, name", since)
                  for column in ("model", "endpoint", "client_ip")}
        return {
            "time_range": f"Last {hours} hours",
            "channel_model_success_rates": _rates(by_model, ("provider", "model")),
            "channel_success_rates": _rates(by_provider, ("provider",)),
            "model_request_counts": [{"model": r["name"], "count": r["count"]} for r in counts["model"]],
            "endpoint_request_counts": [{"endpoint": r["name"], "count": r["count"]} for r in counts["endpoint"]],
            "ip_request_counts": [{"ip": r["name"], "count": r["count"]} for r in counts["client_ip"]],
        }

    async def token_usage(self, start: float, end: float, key: ApiKey | None,
                          model: str | None) -> list[dict[str, Any]]:
        """Token totals per key prefix and model between `start` and `end`; `key` limits them to one key's."""
        where, params = ["time >= ?", "time <= ?"], [start, end]
        if key is not None:
            where.append("key_hash = ?")
            params.append(_digest(key.token).hex()[:16])
        if model:
            where.append("model = ?")
            params.append(model)
        rows = await self.query(
            "SELECT key, model, SUM(prompt_tokens) AS prompt, SUM(completion_tokens) AS completion,"
            " SUM(cached_tokens) AS cached, SUM(cache_creation_tokens) AS written, COUNT(*) AS count"
            " FROM requests WHERE " + " AND ".join(where)
            + " GROUP BY key_hash, key, model ORDER BY key, model", params)
        return [{"api_key_prefix": r["key"], "model": r["model"], "total_prompt_tokens": r["prompt"],
                 "total_completion_tokens": r["completion"], "total_tokens": r["prompt"] + r["completion"],
                 "total_cached_tokens": r["cached"], "total_cache_creation_tokens": r["written"],
                 "request_count": r["count"]} for r in rows]


def _rates(rows: Sequence[sqlite3.Row], names: Sequence[str]) -> list[dict[str, Any]]:
    entries = [{**{name: row[name] for name in names}, "success_rate": row["ok"] / row["total"],
                "total_requests": row["total"]} for row in rows]
    return sorted(entries, key=lambda entry: -entry["success_rate"])


class StatsDisabled(GatewayError):
    status, type, code = 503, "server_error", "stats_disabled"


class AdminRequired(GatewayError):
    status, type, code = 403, "permission_error", "admin_required"


# --- Stats routes and the request log ---


def is_admin(config: Config, key: ApiKey) -> bool:
    """`role: admin`; as in uni-api, the first key is the admin when no key has that role."""
    if key.role == "admin":
        return True
    return key is config.api_keys[0] and not any(k.role == "admin" for k in config.api_keys)


def _admin(request: Request) -> Gateway:
    gw = _gateway(request)
    if not is_admin(gw.config, authenticate(request, gw.config)):
        raise AdminRequired("This endpoint needs an API key with role: admin.")
    return gw


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.strip().isdigit() or not low <= int(text) <= high:
        raise InvalidRequest(f"'{name}' must be a whole number from {low} to {high}.")
    return int(text)


async def stats_summary(request: Request) -> Response:
    gw = _admin(request)
    hours = _int_param(request, "hours", 24, 1, 24 * 366)
    return JSONResponse({**await gw.stats.summary(hours), "instance": gw.instance})


def _time_param(request: Request, name: str) -> float | None:
    """An ISO 8601 date or time (UTC unless it says otherwise) or a Unix timestamp."""
    text = request.query_params.get(name)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 date-time or a Unix timestamp.") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)).timestamp()


def _iso(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).isoformat(timespec="seconds")


async def token_usage(request: Request) -> Response:
    """Token totals per key prefix and model; a non-admin key sees only its own."""
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    start, end = _time_param(request, "start_datetime"), _time_param(request, "end_datetime")
    now = time.time()
    if "last_n_days" in request.query_params:
        if start is not None or end is not None:
            raise InvalidRequest("Use either last_n_days or start_datetime/end_datetime, not both.")
        start, end = now - _int_param(request, "last_n_days", 30, 1, 36600) * 86400, now
    start = now - DEFAULT_RETENTION_DAYS * 86400 if start is None else start
    end = now if end is None else end
    if end < start:
        raise InvalidRequest("end_datetime is before start_datetime.")
    model = request.query_params.get("model") or None
    admin = is_admin(gw.config, key)
    usage = await gw.stats.token_usage(start, end, None if admin else key, model)
    details = {"start_datetime": _iso(start), "end_datetime": _iso(end), "api_key_filter": "all" if admin else "self",
               "model_filter": model or "all"}
    return JSONResponse({"usage": usage, "query_details": details})


async def metrics(request: Request) -> Response:
    """Prometheus metrics; admin keys only, like /v1/stats (labels name providers and models, never keys)."""
    gw = _admin(request)
    text = render_metrics(gw.stats.metrics, len(gw.scheduler.cooling())) + render_shared_metrics(gw)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _request_id(scope: Mapping[str, Any]) -> str:
    """The client's x-request-id when it is a short token, else a new one."""
    for name, value in scope.get("headers") or ():
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID.fullmatch(text) else os.urandom(16).hex()
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID object per request


class RequestLog:
    """Pure ASGI middleware: an x-request-id on every answer, then one log line and one stats record per request.

    The record is finished just before the last body message goes out, so a stream is recorded with its usage
    and a client that asks for statistics right after an answer finds it there.
    """

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]],
                       send: Callable[..., Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        record = RequestRecord(_request_id(scope), f"{scope['method']} {scope['path']}", client[0] if client else "")
        scope.setdefault("state", {})["record"] = record
        header = (b"x-request-id", record.request_id.encode())
        bodies = _DebugBodies() if logger.isEnabledFor(logging.DEBUG) else None
        finished = False

        async def send_logged(message: dict[str, Any]) -> None:
            nonlocal finished
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            elif message["type"] == "http.response.body":
                if record.first_byte_ms is None:
                    record.first_byte_ms = (time.perf_counter() - record.started) * 1000
                if bodies is not None:
                    bodies.response.add(message.get("body", b""))
                if not message.get("more_body", False) and not finished:
                    finished = True
                    _finish(scope, record, bodies)
            await send(message)

        try:
            await self.app(scope, bodies.wrap(receive) if bodies else receive, send_logged)
        finally:
            if not finished:  # an exception, or a client that left mid-answer
                record.status = record.status or 500
                _finish(scope, record, bodies)


def _finish(scope: Mapping[str, Any], record: RequestRecord, bodies: _DebugBodies | None) -> None:
    record.total_ms = (time.perf_counter() - record.started) * 1000
    gw: Gateway | None = getattr(scope["app"].state, "gateway", None) if "app" in scope else None
    if gw is not None:
        gw.stats.record(record)
    if logger.isEnabledFor(logging.INFO):
        logger.info("request id=%s key=%s model=%s provider=%s status=%d ms=%.1f attempts=%d tokens=%d/%d %s",
                    record.request_id, record.key.label if record.key else "-", record.model or "-",
                    record.provider or "-", record.status, record.total_ms, len(record.attempts),
                    record.prompt_tokens, record.completion_tokens, record.endpoint)
    if bodies is not None and gw is not None:
        secrets = gw.config.secrets
        logger.debug("request id=%s body: %s", record.request_id, _redact_secrets(bodies.request.text(), secrets))
        logger.debug("response id=%s body: %s", record.request_id, _redact_secrets(bodies.response.text(), secrets))


_DEBUG_BODY_LIMIT: Final = 64 * 1024


@dataclass(slots=True)
class _Capture:
    parts: list[bytes] = field(default_factory=list)
    size: int = 0

    def add(self, data: bytes) -> None:
        if data and self.size < _DEBUG_BODY_LIMIT:
            self.parts.append(data[: _DEBUG_BODY_LIMIT - self.size])
            self.size += len(self.parts[-1])

    def text(self) -> str:
        return b"".join(self.parts).decode("utf-8", "replace")


@dataclass(slots=True)
class _DebugBodies:
    """With DEBUG on: the first 64 KiB of each request and response body, for the log."""

    request: _Capture = field(default_factory=_Capture)
    response: _Capture = field(default_factory=_Capture)

    def wrap(self, receive: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def receive_logged() -> Any:
            message = await receive()
            if message.get("type") == "http.request":
                self.request.add(message.get("body", b""))
            return message

        return receive_logged


def _secrets_pattern(providers: Iterable[Provider], keys: Iterable[ApiKey]) -> re.Pattern[str] | None:
    """Every provider key, provider credential and client key, longest first, as one pattern (built at load)."""
    providers = tuple(providers)
    secrets = {key for provider in providers for key in provider.api_keys if key}
    secrets |= {value for provider in providers for name, value in provider.extra.items()
                if name in ("private_key", "aws_secret_key", "aws_access_key") and value}
    secrets |= {key.token for key in keys}
    return re.compile("|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True))) if secrets else None


# --- Status page (GET /status, admin keys) ---


STATUS_BUCKET_S: Final = 300.0
STATUS_BUCKETS: Final = 72  # six hours of five-minute buckets
_CHART_HEIGHT: Final = 32
_STATUS_HEADERS: Final = MappingProxyType({  # the key may be in the URL: no caching, no referrer, no outside assets
    "Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})
_STATUS_STYLE: Final = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111;background:#fff}"
    "table{border-collapse:collapse}th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
    "th:first-child,td:first-child{text-align:left}th{background:#f3f4f6}.cool{color:#b45309}"
    "svg{display:block;background:#f3f4f6}")


@dataclass(slots=True)
class _Bucket:
    slot: int  # time // bucket_s
    attempts: int = 0
    answered: int = 0  # attempts answered with a status below 400
    total_ms: float = 0.0


class AttemptStats:
    """Attempts per channel (provider, upstream model) in time buckets: memory bounded at any traffic.

    Kept in memory only, for the status page; `record` is plain `def`, so it is atomic on the loop.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, bucket_s: float = STATUS_BUCKET_S,
                 buckets: int = STATUS_BUCKETS) -> None:
        self._clock, self.bucket_s, self.buckets = clock, bucket_s, buckets
        self._series: dict[tuple[str, str], deque[_Bucket]] = {}

    def record(self, channel: Channel, outcome: Response | UpstreamError, seconds: float) -> None:
        status = outcome.status_code if isinstance(outcome, Response) else outcome.status
        slot = int(self._clock() // self.bucket_s)
        series = self._series.get((channel.provider, channel.upstream_model))
        if series is None:
            series = self._series[(channel.provider, channel.upstream_model)] = deque(maxlen=self.buckets)
        if not series or series[-1].slot != slot:
            series.append(_Bucket(slot))
        bucket = series[-1]
        bucket.attempts += 1
        bucket.answered += status < 400
        bucket.total_ms += seconds * 1000

    def window(self) -> list[tuple[str, str, list[_Bucket]]]:
        """Per channel with attempts in the window, its buckets oldest first, empty ones filled in."""
        last = int(self._clock() // self.bucket_s)
        slots = range(last - self.buckets + 1, last + 1)
        out = []
        for (provider, model), series in sorted(self._series.items()):
            by_slot = {bucket.slot: bucket for bucket in series if bucket.slot >= slots.start}
            if by_slot:
                out.append((provider, model, [by_slot.get(slot) or _Bucket(slot) for slot in slots]))
        return out


def _svg_bars(bars: Iterable[tuple[int, float, float, str]], count: int, top: float, label: str) -> str:
    """A bar chart as inline SVG: each bar is (x, bottom, height, color) in value units."""
    scale = _CHART_HEIGHT / (top or 1)
    rects = "".join(f'<rect x="{x}" y="{_CHART_HEIGHT - (bottom + height) * scale:.2f}" width="0.8" '
                    f'height="{height * scale:.2f}" fill="{color}"/>' for x, bottom, height, color in bars if height)
    return (f'<svg role="img" aria-label="{label}" width="{count * 3}" height="{_CHART_HEIGHT}" '
            f'viewBox="0 0 {count} {_CHART_HEIGHT}" preserveAspectRatio="none">{rects}</svg>')


def _requests_chart(buckets: Sequence[_Bucket]) -> str:
    bars = [bar for i, b in enumerate(buckets) for bar in ((i, 0.0, b.answered, "#16a34a"),
                                                           (i, b.answered, b.attempts - b.answered, "#dc2626"))]
    return _svg_bars(bars, len(buckets), max(b.attempts for b in buckets), "attempts: answered green, failed red")


def _latency_chart(buckets: Sequence[_Bucket]) -> str:
    means = [b.total_ms / b.attempts if b.attempts else 0.0 for b in buckets]
    bars = [(i, 0.0, mean, "#2563eb") for i, mean in enumerate(means)]
    return _svg_bars(bars, len(buckets), max(means), "mean latency")


def _status_row(provider: str, model: str, buckets: Sequence[_Bucket], cooling: bool) -> str:
    attempts = sum(b.attempts for b in buckets)
    answered, total_ms = sum(b.answered for b in buckets), sum(b.total_ms for b in buckets)
    name = html.escape(f"{provider}/{model}") + (' <span class="cool">(cooling down)</span>' if cooling else "")
    return (f"<tr><td>{name}</td><td>{attempts}</td><td>{100 * answered / attempts:.1f}%</td>"
            f"<td>{total_ms / attempts:.0f} ms</td><td>{_requests_chart(buckets)}</td>"
            f"<td>{_latency_chart(buckets)}</td></tr>")


def render_status(gw: Gateway, now: float) -> str:
    """The status page: one row per channel with attempts in the window, charts as inline SVG, no script."""
    stats, config = gw.recent, gw.config
    cooling = {(c.provider, c.upstream_model) for c in gw.scheduler.cooling()}
    rows = "".join(_status_row(p, m, b, (p, m) in cooling) for p, m, b in stats.window())
    minutes, hours = stats.bucket_s / 60, stats.bucket_s * stats.buckets / 3600
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    loaded = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(gw.loaded_at))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>uni-api status</title>'
            f'<meta http-equiv="refresh" content="60"><style>{_STATUS_STYLE}</style></head><body>'
            f"<h1>uni-api status</h1><p>Attempts per channel over the last {hours:g} hours in {minutes:g}-minute "
            f"buckets, at {stamp}. Config {html.escape(_source_name(config.source))} loaded at {loaded}: "
            f"{len(config.providers)} providers, {len(config.api_keys)} api keys. Uni-api {VERSION}.</p>"
            f"<p>{shared_state_line(gw)}</p>"
            f"<table><thead><tr><th>channel</th><th>attempts</th><th>answered</th><th>mean latency</th>"
            f"<th>attempts per {minutes:g} min</th><th>mean latency per {minutes:g} min</th></tr></thead><tbody>"
            f"{rows or '<tr><td colspan=6>No attempts yet.</td></tr>'}</tbody></table></body></html>")


async def status_page(request: Request) -> Response:
    """Read-only HTML for admin keys; the key as `?key=` (for a browser) or the usual headers."""
    gw = _gateway(request)
    token = request.query_params.get("key")
    key = find_key(gw.config, token) if token else authenticate(request, gw.config)
    if key.role != "admin":
        raise AdminRequired("The status page needs an admin key (role: admin).")
    return HTMLResponse(render_status(gw, time.time()), headers=_STATUS_HEADERS)


# --- Connection guards: slow request headers and bodies ---


DEFAULT_HEADER_TIMEOUT: Final = 10.0
DEFAULT_GRACE_PERIOD: Final = 30.0


def slow_client_protocol(timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection whose request headers take longer than `timeout`, or
    whose request body pauses for longer than `timeout` between two reads.

    uvicorn bounds only idle keep-alive time: a client trickling header bytes (slowloris) or stopping half
    way through its body would hold its connection and buffers forever. The header timer arms on connect and
    whenever a finished connection gets new bytes; it closes the connection if no new request (uvicorn's
    `cycle`) began before it fires. The body timer arms only when a read leaves a body unfinished, so a
    request that arrives whole costs nothing; the app then sees the client's disconnect.
    """
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class SlowClientProtocol(Base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None
        _reads = 0  # data_received calls: the body timer tells a pause from progress by them

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()
            super().data_received(data)
            self._reads += 1
            if self._body_timer is None and self.cycle is not None and self.cycle.more_body:
                self._body_timer = self.loop.call_later(timeout, self._body_overdue, self.cycle, self._reads)

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._header_timer, self._body_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def _body_overdue(self, cycle: Any, reads: int) -> None:
            self._body_timer = None
            if self.cycle is not cycle or not cycle.more_body or self.transport.is_closing():
                return
            # Not a byte for `timeout` seconds, and not because the app was slow to take the body (uvicorn
            # then pauses reading): the client stalled.
            if self._reads == reads and not self.flow.read_paused:
                self.transport.close()
            else:
                self._body_timer = self.loop.call_later(timeout, self._body_overdue, cycle, self._reads)

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(timeout, self._headers_overdue, self.cycle)

        def _headers_overdue(self, cycle: Any) -> None:
            self._header_timer = None
            if self.cycle is cycle and not self.transport.is_closing():  # no request began since arming
                self.transport.close()

    return SlowClientProtocol


def _exit_zero(sig: int, frame: Any) -> None:
    raise SystemExit(0)


@contextlib.contextmanager
def _signals_exit_zero() -> Iterator[None]:
    """SIGTERM/SIGINT end the process with status 0: uvicorn re-raises the signal after its graceful shutdown,
    which would otherwise kill the process by the signal (-15) or raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _exit_zero) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- Workers: one supervisor, N gateway processes accepting on one listening socket ---


WORKER_RESTART_DELAY_S: Final = 1.0  # a worker that dies younger than this is replaced after this long
_PR_SET_PDEATHSIG: Final = 1  # prctl(2)


@dataclass(frozen=True, slots=True)
class _Serve:
    """What every worker serves: run()'s arguments plus the supervisor's listening socket."""

    config: Config
    host: str
    port: int
    source: str
    grace_period: float
    sock: socket.socket


def listening_socket(host: str, port: int) -> socket.socket:
    """The socket all workers accept on, made before they are forked: a dying worker leaves it open, so no
    connection is refused while its replacement starts."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def supervise(config: Config, host: str, port: int, source: str, grace_period: float, workers: int) -> int:
    """Run `workers` gateway processes on one port: replace one that dies, forward SIGHUP (reload) to all, and
    on SIGTERM/SIGINT forward SIGTERM so each drains within the grace period; returns 0 when all have ended."""
    if not hasattr(os, "fork"):
        print("error: --workers needs fork(), which this platform lacks", file=sys.stderr)
        return STARTUP_FAILURE
    try:
        serve = _Serve(config, host, port, source, grace_period, listening_socket(host, port))
        options = StatsOptions.from_env()
        if options.path is not None:  # create and migrate it once, not in N workers at the same moment
            StatsStore(options.path).close()
    except (OSError, StatsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return STARTUP_FAILURE
    supervisor = os.getpid()
    children: dict[int, tuple[int, float]] = {}  # pid: (slot, started)
    stopping: list[int] = []  # the stop signal, once one came

    def forward(sig: int, frame: Any) -> None:
        if os.getpid() != supervisor:  # a worker forked a moment ago, before it reset its handlers
            return
        if sig != signal.SIGHUP:
            stopping.append(sig)
            serve.sock.close()  # the workers' copies stay open until each has stopped accepting
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP if sig == signal.SIGHUP else signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    logger.info("supervisor (pid %d): %d workers on %s:%d", supervisor, workers, host, port)
    result = 0
    try:
        for slot in range(workers):
            children[_fork_worker(serve, slot, fresh=False)] = (slot, time.monotonic())
        while children:
            pid, status = os.wait()
            slot, born = children.pop(pid, (-1, 0.0))
            if slot < 0 or stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code == STARTUP_FAILURE:  # its lifespan failed (stats file, models): a new one would fail alike
                logger.error("worker %d (pid %d) could not start; stopping the others", slot, pid)
                forward(signal.SIGTERM, None)
                result = STARTUP_FAILURE
                continue
            logger.warning("worker %d (pid %d) ended with %d; starting another", slot, pid, code)
            if time.monotonic() - born < WORKER_RESTART_DELAY_S:
                time.sleep(WORKER_RESTART_DELAY_S)
            if not stopping:
                children[_fork_worker(serve, slot, fresh=True)] = (slot, time.monotonic())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.sock.close()
    return result


def _fork_worker(serve: _Serve, slot: int, *, fresh: bool) -> int:
    """Fork worker `slot`; in the child, serve until stopped and exit, never returning here."""
    pid = os.fork()
    if pid:
        logger.info("worker %d started (pid %d)", slot, pid)
        return pid
    code = 1
    try:
        code = _worker(serve, slot, fresh=fresh)
    except SystemExit as exc:  # SIGTERM's graceful end (see _signals_exit_zero)
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        logger.exception("worker %d failed", slot)
    finally:
        logging.shutdown()
        os._exit(code)


def _worker(serve: _Serve, slot: int, *, fresh: bool) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop takes SIGHUP for reloads
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only, which forwards one SIGTERM to each
    if sys.platform.startswith("linux"):  # end with the supervisor, even when it is killed outright
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if "INSTANCE_ID" in os.environ:
        os.environ["INSTANCE_ID"] += f"/{slot}"
    config = serve.config
    if fresh:  # a replacement serves the config as it is now, as its siblings do after their reloads
        try:
            config = load_config(serve.source)
        except ConfigError as exc:
            logger.error("worker %d: config reload failed, serving the one the supervisor started with: %s", slot, exc)
    return run(config, serve.host, serve.port, serve.source, serve.grace_period, serve.sock)


# --- CLI ---


def speedups() -> list[str]:
    """The optional compiled speedups that are importable here."""
    active = [name for name in SPEEDUPS if importlib.util.find_spec(name) is not None]
    with contextlib.suppress(ImportError):
        from aiohttp import _http_parser  # noqa: F401  (compiled only in platform wheels)

        active.append("aiohttp-c")
    return active


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="uni-api", description="One OpenAI-compatible endpoint for many LLMs.")
    parser.add_argument("--config", help="api.yaml path or http(s) URL (default: $CONFIG_URL, then ./api.yaml)")
    parser.add_argument("--host", default=os.environ.get("HOST") or "0.0.0.0", help="bind address (default $HOST)")
    parser.add_argument("--port", type=int, default=os.environ.get("PORT") or "8000",  # a str default goes through
                        help="port (default $PORT)")                                 # type=int: a bad $PORT errs
    parser.add_argument("--check-config", action="store_true", help="validate the config, print a summary, exit")
    parser.add_argument("--version", action="store_true", help="print the version and active speedups")
    parser.add_argument("--grace-period", type=float, default=_env_float("GRACE_PERIOD", DEFAULT_GRACE_PERIOD),
                        help="seconds in-flight requests may take to finish after SIGTERM/SIGINT "
                             "(default $GRACE_PERIOD, then 30)")
    parser.add_argument("--workers", type=_positive_int, default=os.environ.get("WORKERS") or "1",
                        help="gateway processes serving the port, under one supervisor (default $WORKERS, then 1)")
    parser.add_argument("--allow-unshared-state", action="store_true",
                        help="allow --workers > 1 without state: (each worker then keeps its own limits and cooldowns)")
    return parser.parse_args(argv)


def client_address(host: str, port: int) -> str:
    """The base URL a client on this machine uses: a wildcard bind is reached through loopback."""
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/v1"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def startup_line(gw: Gateway, address: str, stats: StatsOptions) -> str:
    """The one line a start prints once it listens: what runs, where to point clients, what was loaded."""
    config = gw.config
    return (f"uni-api {VERSION} serving {address} ({_plural(len(config.providers), 'provider')}, "
            f"{_plural(len(gw.known_models), 'model')}, {_plural(len(config.api_keys), 'client key')}; "
            f"stats: {stats.path or 'disabled'}; speedups: {', '.join(speedups()) or 'none'})")


def warn_placeholders(config: Config) -> None:
    for where in config.placeholders:
        logger.warning("%s is still the example's placeholder (%s): put your own value there", where, PLACEHOLDER)


def run(config: Config, host: str, port: int, source: str | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD, sock: socket.socket | None = None) -> int:
    """Serve `config` until interrupted; with `source`, reload it on SIGHUP and when the file changes.

    SIGTERM/SIGINT stop accepting, let in-flight requests and streams finish for `grace_period` seconds,
    then cancel what is left and return 0. Once listening it logs `startup_line`. A worker serves `sock`, the
    supervisor's listening socket.
    """
    import uvicorn

    stats = StatsOptions.from_env()
    app = create_app(config, source=source, stats_options=stats)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # bound and listening: say so, and where
                logger.info("%s", startup_line(app.state.gateway, client_address(host, port), stats))

    protocol = slow_client_protocol(_env_float("HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT))
    server = Server(uvicorn.Config(
        app, host=host, port=port, log_level="info" if _debug() else "warning", access_log=_debug(),
        lifespan="on", server_header=False, http=protocol,
        timeout_graceful_shutdown=grace_period))  # type: ignore[arg-type]  # uvicorn waits a float fine
    warn_placeholders(config)
    with _signals_exit_zero(), contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=None if sock is None else [sock])
    return 0 if server.started else STARTUP_FAILURE  # as uvicorn.run exits when the start failed


def _debug() -> bool:
    return os.environ.get("DEBUG", "").lower() in ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.version:
        print(f"uni-api {VERSION} (Python {sys.version.split()[0]}; speedups: {', '.join(speedups()) or 'none'})")
        return 0
    logging.basicConfig(level=logging.DEBUG if _debug() else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The format names no source line, thread, process or task: each request's log lines skip looking them up
    # (the logging HOWTO's "Optimization" switches).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # Python 3.12+
    source = args.config or os.environ.get("CONFIG_URL") or "api.yaml"
    try:
        config = load_config(source)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if args.check_config else STARTUP_FAILURE
    if args.check_config:
        print(f"{source}: OK\n{summarize(config)}")
        for where in config.placeholders:
            print(f"warning: {where} is still the example's placeholder ({PLACEHOLDER})", file=sys.stderr)
        return 0
    if args.workers > 1 and config.state is None and not args.allow_unshared_state:
        print(f"error: --workers {args.workers} without shared state: each worker would keep its own rate limits"
              f" (rate_limit 10/min would admit up to {10 * args.workers}/min), cooldowns and key benches. Set"
              " state.redis_url in the config (or REDIS_URL), or pass --allow-unshared-state to accept that.",
              file=sys.stderr)
        return STARTUP_FAILURE
    if args.workers > 1:
        return supervise(config, args.host, args.port, source, args.grace_period, args.workers)
    return run(config, args.host, args.port, source, args.grace_period)


if __name__ == "__main__":
    sys.exit(main())
