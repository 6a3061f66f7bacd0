"""uni-api: one OpenAI-compatible endpoint in front of many LLM providers.

Owns the CLI, reading and validating api.yaml into frozen records, authentication, the request flow
(plan, attempt, failover), the shared aiohttp session and the one renderer of OpenAI error envelopes.
Wire formats live in adapters.py and scheduling arithmetic in scheduler.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import importlib.util
import logging
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

import aiohttp
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import adapters
from adapters import ADAPTERS, SSE_DONE, Adapter, Provider, Target, UpstreamError, UpstreamRequest
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

logger = logging.getLogger("uni_api")

# --- Errors ---


class GatewayError(Exception):
    """An error answered to the client in the OpenAI envelope."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, headers: Mapping[str, str] | None = None,
                 type_: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.type = type_ or self.type
        self.code = code or self.code
        self.headers = dict(headers or {})


class InvalidRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class PayloadTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


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
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
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
    return {dict: "a mapping", CommentedMap: "a mapping", list: "a list", CommentedSeq: "a list",
            str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(type(value), "nothing")


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "true or false", dict: "a mapping",
             list: "a list", datetime.date: "a date"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


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

        return _ENV_PATTERN.sub(substitute, value)
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
                          "model_timeout", "cooldown_period", "proxy", "headers", "post_body_parameter_overrides")
_KEY_KEYS: Final = ("api", "model", "role", "preferences")
_KEY_PREFS: Final = ("SCHEDULING_ALGORITHM", "AUTO_RETRY", "rate_limit", "ENABLE_MODERATION")
_GLOBAL_PREFS: Final = ("model_timeout", "cooldown_period", "rate_limit", "error_triggers", "proxy",
                        "max_body_size", "request_timeout")


@dataclass(frozen=True, slots=True)
class _Globals:
    timeouts: ModelTable[float] | None
    cooldown_s: float
    rate_limits: ModelTable[tuple[RateLimit, ...]] | None
    proxy: str | None


def parse_config(text: str, source: str, env_timeout: float = DEFAULT_TIMEOUT) -> Config:
    """api.yaml text to frozen records; raises ConfigError naming file, line and key path."""
    try:
        raw = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{_source_name(source)}:{line}: YAML syntax error: {exc.problem or exc.context}") from None
    root = _Node(_expand_env(raw, source, "", 0) if raw is not None else CommentedMap(), "", source)
    root.check_keys(("providers", "api_keys", "preferences"))
    prefs = root.mapping("preferences") or _Node(CommentedMap(), "preferences", source)
    prefs.check_keys(_GLOBAL_PREFS)
    glob = _Globals(_timeouts(prefs, "model_timeout"), _seconds(prefs, "cooldown_period", DEFAULT_COOLDOWN),
                    _rate_table(prefs, "rate_limit"), _proxy(prefs, "proxy"))
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
    return Config(
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
    )


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
    )
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
    """ruamel's round-trip containers to plain dicts and lists, for JSON bodies."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


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
    retry = prefs.get("AUTO_RETRY", (bool, int, float, str), True)
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
    if source.startswith(("http://", "https://")):
        text = asyncio.run(fetch_text(source))
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the config: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: cannot read the config: not UTF-8 text ({exc.reason})") from None
    return parse_config(text, source, _env_float("TIMEOUT", DEFAULT_TIMEOUT))


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
        routes[key.token] = KeyRoutes(MappingProxyType({a: tuple(c) for a, c in table.items()}), body)
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


# --- Auth and request bodies ---


def authenticate(request: Request, config: Config) -> ApiKey:
    """`Authorization: Bearer <key>` or `x-api-key`, looked up by digest and compared in constant time."""
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not token:
        raise InvalidApiKey("Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
    key = config.keys_by_digest.get(_digest(token))
    if key is None or not hmac.compare_digest(key.token.encode(), token.encode()):
        raise InvalidApiKey("Invalid API key.")
    return key


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit)
    try:
        data = adapters.loads(body)
    except (adapters.JSONDecodeError, ValueError, UnicodeDecodeError):
        raise InvalidRequest("Request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    return data


def require_model(body: Mapping[str, Any], default: str | None = None) -> str:
    model = body.get("model", default)
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string.", code="invalid_model")
    return model


def validate_chat(body: Mapping[str, Any]) -> str:
    model = require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"'messages[{i}]' must be an object with a string 'role'.")
    if not isinstance(body.get("stream", False), bool):
        raise InvalidRequest("'stream' must be a boolean.")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise InvalidRequest("'stream_options' must be an object.")
    return model


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


# --- Gateway state and transport ---


@dataclass(slots=True)
class Gateway:
    """Per-app runtime state, owned by the lifespan."""

    config: Config
    routes: Mapping[str, KeyRoutes]
    known_models: frozenset[str]
    scheduler: Scheduler
    session: aiohttp.ClientSession
    tokens: TokenCache
    socks_sessions: Mapping[str, aiohttp.ClientSession] = field(default_factory=dict)


_KEY_FAILURES: Final = frozenset({401, 403, 429})  # that key is bad or busy: try the provider's next key
_SECRET_PATTERN: Final = re.compile(r"\b(?:sk|pk|rk|key|AIza)[-_A-Za-z0-9*]{12,}")


def _redact(text: str, provider: Provider) -> str:
    for key in provider.api_keys:
        if key:
            text = text.replace(key, "[redacted]")
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
        data = adapters.dumps(request.json)
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
        body = await response.content.read(UPSTREAM_BODY_LIMIT + 1)
    if len(body) > UPSTREAM_BODY_LIMIT:
        raise UpstreamError(502, f"upstream answer is larger than {UPSTREAM_BODY_LIMIT} bytes")
    return body


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
            data = await response.content.read(_IMAGE_LIMIT + 1)
            kind = response.headers.get("Content-Type", "image/jpeg").split(";")[0]
            ok = response.status == 200 and len(data) <= _IMAGE_LIMIT
    except (aiohttp.ClientError, asyncio.TimeoutError):
        ok = False
    if not ok:
        raise UpstreamError(400, f"could not fetch the image at {url[:200]}")
    return {**part, "image_url": {**image, "url": f"data:{kind};base64,{base64.b64encode(data).decode()}"}}


# --- Attempts: one try of one channel ---

Send = Callable[[Channel, Adapter, Target, float], Awaitable[Response]]


def _json_response(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


def chat_sender(gw: Gateway, body: Mapping[str, Any], model: str) -> Send:
    """Send one chat attempt; streams commit only after the first converted chunk arrived."""
    triggers = gw.config.error_triggers
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

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
                return _json_response(adapters.dumps(completion))
            chunks = adapter.parse_stream(adapter.iter_events(response.content.iter_any()), model,
                                          include_usage=include_usage)
            with _transport_errors(timeout):
                first = _stamp(await anext_or_fail(chunks), created)
            frame = adapters.sse_frame(first)
            _check_triggers(frame.decode(), triggers)
        except BaseException:
            response.close()
            raise
        return StreamingResponse(_relay(frame, chunks, response, timeout, created), media_type="text/event-stream",
                                 headers=_STREAM_HEADERS)

    return send


_STREAM_HEADERS: Final = MappingProxyType({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def anext_or_fail(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        raise UpstreamError(502, "upstream stream ended before its first chunk") from None


def _parse_json(raw: bytes) -> Any:
    try:
        return adapters.loads(raw)
    except (adapters.JSONDecodeError, ValueError, UnicodeDecodeError):
        raise UpstreamError(502, "upstream answered with invalid JSON") from None


def _stamp(answer: dict[str, Any], created: int) -> dict[str, Any]:
    """Fill `created` where the provider's format has no timestamp (adapters never read the clock)."""
    if not answer.get("created"):
        answer["created"] = created
    return answer


async def _relay(first: bytes, chunks: AsyncIterator[dict[str, Any]], response: aiohttp.ClientResponse,
                 timeout: float, created: int) -> AsyncIterator[bytes]:
    """The committed stream: chunks as SSE; a failure ends it with an error chunk and [DONE]."""
    try:
        yield first
        with _transport_errors(timeout):
            async for chunk in chunks:
                yield adapters.sse_frame(_stamp(chunk, created))
    except UpstreamError as exc:
        logger.warning("stream failed after its first chunk: %s", exc)
        yield adapters.sse_frame(adapters.error_body(f"upstream failed mid-stream: {exc}", "upstream_error",
                                                     "stream_interrupted"))
    finally:
        response.close()
    yield SSE_DONE


def endpoint_sender(gw: Gateway, endpoint: adapters.Endpoint, body: Mapping[str, Any] | None, model: str,
                    form: tuple[tuple[str, Any], ...] | None = None) -> Send:
    """Send one attempt of a non-chat endpoint; JSON answers get the client's model name back."""

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
            return _json_response(adapters.dumps(adapter.parse_endpoint_response(endpoint, _parse_json(raw), model)))
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


# --- Request flow: plan, attempts, failover ---


def channels_for(gw: Gateway, key: ApiKey, model: str) -> tuple[Channel, ...]:
    channels = gw.routes[key.token].channels.get(model)
    if channels:
        return channels
    if model in gw.known_models:
        raise ModelNotAllowed(f"This API key may not use the model '{model}'.")
    raise ModelNotFound(f"The model '{model}' does not exist or no provider serves it.")


def _next_key(gw: Gateway, policy: Policy, model: str, tried: list[int]) -> int | None:
    if policy.keys.size == 0:
        return None if tried else -1
    return gw.scheduler.acquire_key(policy.keys, model, tried)


@dataclass(slots=True)
class _Budget:
    """What one request may still spend: attempts (AUTO_RETRY) and time (request_timeout), set by the first."""

    attempts: float
    deadline: float | None = None

    def start(self, config: Config, first_timeout: float) -> None:
        if self.deadline is None:
            cap = 2 * first_timeout if config.request_timeout is None else config.request_timeout or math.inf
            self.deadline = time.monotonic() + cap

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()


class _OutOfTime(UpstreamError):
    """The request's time cap ended an attempt: the channel did not fail on its own terms, so it is not cooled."""


class _NotServed(UpstreamError):
    """The channel's engine has no such endpoint: try the next channel, but the channel itself is fine."""


async def dispatch(gw: Gateway, key: ApiKey, model: str, send: Send) -> Response:
    """Try the key's channels for `model` in scheduled order, each key of a channel at most once."""
    channels = channels_for(gw, key, model)
    wait = gw.scheduler.admit(key.token, model, key.rate_limits or gw.config.rate_limits)
    if wait:
        raise RateLimited(f"Rate limit reached for this API key on '{model}'; retry in {wait}s.", wait)
    budget = _Budget(math.inf if key.retries is None else key.retries + 1)
    failures: list[tuple[Channel, UpstreamError]] = []
    for channel in gw.scheduler.plan(key.token, channels, key.strategy):
        response = await _try_channel(gw, key, channel, send, budget, failures)
        if response is not None:
            return response
    raise _all_failed(model, failures)


async def _try_channel(gw: Gateway, key: ApiKey, channel: Channel, send: Send, budget: _Budget,
                       failures: list[tuple[Channel, UpstreamError]]) -> Response | None:
    """The channel's keys in turn until one answers or a failure is the channel's; failures are appended."""
    policy = gw.config.policies[channel.provider]
    timeout = resolve_timeout(channel.upstream_model, policy.timeouts, gw.config.timeouts, gw.config.default_timeout)
    budget.start(gw.config, timeout)
    tried: list[int] = []
    while budget.attempts > 0 and (left := budget.time_left()) > 0:
        index = _next_key(gw, policy, channel.upstream_model, tried)
        if index is None:
            if tried:  # every key failed this request: the channel failed
                gw.scheduler.record_failure(channel)
            else:
                failures.append((channel, UpstreamError(503, "every key is cooling down or rate limited")))
            return None
        tried.append(index)
        budget.attempts -= 1
        outcome = await _attempt(gw, key, channel, index, timeout, send, left)
        if isinstance(outcome, Response):
            return outcome
        failures.append((channel, outcome))
        if not outcome.retryable:
            raise GatewayError(outcome.message, status=outcome.status, type_="invalid_request_error",
                               code="upstream_error")
        if isinstance(outcome, _OutOfTime):
            budget.attempts = 0
        elif isinstance(outcome, _NotServed):
            budget.attempts += 1  # nothing was sent upstream
        elif outcome.status in _KEY_FAILURES and index >= 0:
            gw.scheduler.record_key_failure(policy.keys, index, outcome.retry_after)
            continue
        else:
            gw.scheduler.record_failure(channel)
        return None
    return None


async def _attempt(gw: Gateway, key: ApiKey, channel: Channel, index: int, timeout: float,
                   send: Send, left: float = math.inf) -> Response | UpstreamError:
    """One try of one channel with one key, cut off when the request's time (`left`) runs out."""
    provider = gw.config.providers[channel.provider]
    adapter = ADAPTERS[channel.engine]
    started = time.perf_counter()

    async def send_once() -> Response:
        token = await gw.tokens.get(provider) if adapter.auth == "google-oauth" else None
        target = Target(provider, channel.upstream_model, provider.api_keys[index] if index >= 0 else "", token,
                        time.time())
        return await send(channel, adapter, target, timeout)

    try:
        response = await asyncio.wait_for(send_once(), None if left == math.inf else left)
    except asyncio.TimeoutError:  # only the cap: send turns its own timeouts into UpstreamError
        exc = _OutOfTime(504, f"timed out after {left:.3g}s (the request's time limit)")
        _log_attempt(key, channel, index, exc.status, started, f"stopping: {exc.message}")
        return exc
    except UpstreamError as exc:
        exc.message = _redact(exc.message, provider)
        _log_attempt(key, channel, index, exc.status, started, f"moving on: {exc.message}")
        return exc
    gw.scheduler.record_success(channel)
    _log_attempt(key, channel, index, response.status_code, started, "")
    return response


def _log_attempt(key: ApiKey, channel: Channel, index: int, status: int, started: float, why: str) -> None:
    if logger.isEnabledFor(logging.INFO):
        ms = (time.perf_counter() - started) * 1000
        logger.info("attempt key=%s provider=%s model=%s key_index=%d status=%d ms=%.1f %s", key.label,
                    channel.provider, channel.upstream_model, index, status, ms, why)


def _all_failed(model: str, failures: Sequence[tuple[Channel, UpstreamError]]) -> AllChannelsFailed:
    statuses = {error.status for _, error in failures}
    status = 504 if statuses <= {504} else 503 if statuses <= {429, 503} else 502  # none tried: out of time
    reasons = "; ".join(f"{c.provider}/{c.upstream_model}: {e}" for c, e in failures) or "no channel was tried"
    return AllChannelsFailed(f"All channels failed for '{model}': {reasons}", status=status)


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it (and the upstream call inside) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnected()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- Routes ---


def _gateway(request: Request) -> Gateway:
    return request.state.gateway  # type: ignore[no-any-return]


async def chat_completions(request: Request) -> Response:
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    body = await read_json(request, gw.config.body_limit)
    model = validate_chat(body)
    return await until_disconnect(request, dispatch(gw, key, model, chat_sender(gw, body, model)))


def json_endpoint(endpoint: adapters.Endpoint, default_model: str | None = None) -> Callable[..., Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        gw = _gateway(request)
        key = authenticate(request, gw.config)
        body = await read_json(request, gw.config.body_limit)
        model = require_model(body, default_model)
        return await until_disconnect(request, dispatch(gw, key, model, endpoint_sender(gw, endpoint, body, model)))

    return handle


async def transcriptions(request: Request) -> Response:
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    form = parse_multipart(await read_body(request, gw.config.body_limit), request.headers.get("content-type", ""))
    model = require_model(dict((k, v) for k, v in form if isinstance(v, str)))
    send = endpoint_sender(gw, "transcriptions", None, model, form)
    return await until_disconnect(request, dispatch(gw, key, model, send))


async def list_models(request: Request) -> Response:
    gw = _gateway(request)
    key = authenticate(request, gw.config)
    return _json_response(gw.routes[key.token].models_body)


async def healthz(request: Request) -> Response:
    return _json_response(b'{"status":"ok"}')


# --- Errors rendered in one place ---


def _envelope(message: str, type_: str, code: str | None, status: int,
              headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(adapters.error_body(message, type_, code), status_code=status, headers=headers)


async def render_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, GatewayError):
        return _envelope(exc.message, exc.type, exc.code, exc.status, exc.headers)
    if isinstance(exc, HTTPException):
        type_ = _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        return _envelope(str(exc.detail), type_, None, exc.status_code, exc.headers)
    if isinstance(exc, ClientDisconnected):
        return Response(status_code=499)
    logger.exception("unexpected error on %s", request.url.path)
    return _envelope("Internal error in the gateway.", "server_error", None, 500)


# --- App ---


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
            logger.warning("provider %s: could not list its models (%s); it serves none until restart",
                           provider.name, _redact(str(exc) or type(exc).__name__, provider))
            return provider.name, ()
        return provider.name, tuple((name, name) for name in names)

    pending = [one(p) for p in config.providers.values() if not p.models]
    return dict(await asyncio.gather(*pending)) if pending else {}


def _socks_session(proxy: str) -> aiohttp.ClientSession:
    from aiohttp_socks import ProxyConnector  # optional; checked when the config was parsed

    return aiohttp.ClientSession(connector=ProxyConnector.from_url(proxy), timeout=aiohttp.ClientTimeout(total=None))


def create_app(config: Config, *, scheduler: Scheduler | None = None) -> Starlette:
    """The Starlette app serving `config`; runtime state is made in its lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        proxies = {p.proxy for p in config.policies.values() if p.proxy and p.proxy.startswith("socks")}
        socks = {proxy: _socks_session(proxy) for proxy in proxies}
        try:
            tokens = TokenCache(session)
            routes, known = build_routes(config, await discover_models(config, session, tokens), int(time.time()))
            gateway = Gateway(config, routes, known, scheduler or Scheduler(), session, tokens, socks)
            app.state.gateway = gateway
            yield {"gateway": gateway}
        finally:
            for open_session in (session, *socks.values()):
                await open_session.close()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", json_endpoint("embeddings"), methods=["POST"]),
        Route("/v1/images/generations", json_endpoint("images", "dall-e-2"), methods=["POST"]),
        Route("/v1/moderations", json_endpoint("moderations", "omni-moderation-latest"), methods=["POST"]),
        Route("/v1/audio/speech", json_endpoint("speech"), methods=["POST"]),
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
    ]
    handlers: dict[Any, Any] = {GatewayError: render_error, HTTPException: render_error,
                                ClientDisconnected: render_error, Exception: render_error}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


# --- CLI ---


def speedups() -> list[str]:
    """The optional compiled speedups that are importable here."""
    active = [name for name in SPEEDUPS if importlib.util.find_spec(name) is not None]
    with contextlib.suppress(ImportError):
        from aiohttp import _http_parser  # noqa: F401  (compiled only in platform wheels)

        active.append("aiohttp-c")
    return active


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="uni-api", description="One OpenAI-compatible endpoint for many LLMs.")
    parser.add_argument("--config", help="api.yaml path or http(s) URL (default: $CONFIG_URL, then ./api.yaml)")
    parser.add_argument("--host", default=os.environ.get("HOST") or "0.0.0.0", help="bind address (default $HOST)")
    parser.add_argument("--port", type=int, default=os.environ.get("PORT") or "8000",  # a str default goes through
                        help="port (default $PORT)")                                 # type=int: a bad $PORT errs
    parser.add_argument("--check-config", action="store_true", help="validate the config, print a summary, exit")
    parser.add_argument("--version", action="store_true", help="print the version and active speedups")
    return parser.parse_args(argv)


def run(config: Config, host: str, port: int) -> int:
    """Serve `config` until interrupted."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="info" if _debug() else "warning",
                access_log=_debug(), lifespan="on", server_header=False)
    return 0


def _debug() -> bool:
    return os.environ.get("DEBUG", "").lower() in ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.version:
        print(f"uni-api {VERSION} (Python {sys.version.split()[0]}; speedups: {', '.join(speedups()) or 'none'})")
        return 0
    logging.basicConfig(level=logging.DEBUG if _debug() else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = args.config or os.environ.get("CONFIG_URL") or "api.yaml"
    try:
        config = load_config(source)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if args.check_config else STARTUP_FAILURE
    if args.check_config:
        print(f"{source}: OK\n{summarize(config)}")
        return 0
    return run(config, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
