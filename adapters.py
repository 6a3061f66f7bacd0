"""Wire formats: one adapter per engine, converting OpenAI requests to a provider's and its answers back.

Owns the records that cross into uni_api.py (Provider, Target, UpstreamRequest, SSEEvent), the SSE framer,
the OpenAI chunk and response builders, UpstreamError, engine inference and the ADAPTERS table.
Pure code: no sockets, no environment, no clock and no global mutable state.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal
from urllib.parse import SplitResult, urlsplit

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        """JSON-encode to compact UTF-8 bytes."""
        return orjson.dumps(obj)

    loads: Callable[[bytes | str], Any] = orjson.loads
    JSONDecodeError: type[ValueError] = orjson.JSONDecodeError
except ImportError:  # the universal .pex carries no compiled modules
    _ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    def dumps(obj: Any) -> bytes:
        """JSON-encode to compact UTF-8 bytes."""
        return _ENCODER.encode(obj).encode()

    def _reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    def loads(data: bytes | str) -> Any:  # type: ignore[misc]
        return json.loads(data, parse_constant=_reject_constant)

    JSONDecodeError = ValueError

Endpoint = Literal["chat", "embeddings", "images", "transcriptions", "speech", "moderations", "models"]

# --- Records ---


@dataclass(frozen=True, slots=True)
class Provider:
    """One `providers:` entry of api.yaml, as an adapter needs it."""

    name: str
    engine: str
    base_url: str
    engine_forced: bool = False
    api_keys: tuple[str, ...] = ()
    models: tuple[tuple[str, str], ...] = ()  # (alias, upstream model), in config order
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    tools: bool = True
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Target:
    """What one attempt needs: where, which upstream model, which key."""

    provider: Provider
    upstream_model: str
    api_key: str = ""
    token: str | None = None  # a pre-resolved OAuth token, for adapters whose auth needs one
    now: float = 0.0  # wall-clock seconds, for request signing; adapters never read the clock


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: Mapping[str, str]
    json: Any = None
    data: bytes | None = None
    form: tuple[tuple[str, Any], ...] | None = None  # multipart fields: value or (filename, bytes, type)
    stream: bool = False


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: str


class UpstreamError(Exception):
    """An attempt failed; `retryable` says whether another key or channel may succeed."""

    def __init__(
        self, status: int, message: str, *, retryable: bool | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = status not in PASSTHROUGH_STATUSES if retryable is None else retryable
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status} {self.message}" if self.status else self.message


# Contract: a client error that the next channel would refuse too is passed through, not retried.
PASSTHROUGH_STATUSES: Final = frozenset({400, 413, 422})

# --- SSE framing ---


async def iter_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[SSEEvent]:
    """Frame a byte stream into events: tolerant of split chunks, CRLF, comments and multi-line data."""
    buffer, event = b"", "message"
    data: list[str] = []
    async for chunk in chunks:
        buffer += chunk
        if b"\n" not in chunk:
            continue
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:  # a blank line ends one event
                if data:
                    yield SSEEvent(event, "\n".join(data))
                event, data = "message", []
            elif line[0] == ":":
                continue  # comment or keep-alive
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event = value
    # An event without its closing blank line at EOF is dropped, as the SSE specification requires.


def sse_frame(obj: Any) -> bytes:
    """One `data:` event carrying JSON."""
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE: Final = b"data: [DONE]\n\n"

# --- OpenAI builders ---


def new_id(prefix: str = "chatcmpl-") -> str:
    return prefix + uuid.uuid4().hex


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope (schema ErrorResponse: message, type, param, code)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def build_chunk(
    chunk_id: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk` with a single choice (CreateChatCompletionStreamResponse)."""
    chunk: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def build_usage_chunk(chunk_id: str, model: str, created: int, usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: empty choices, usage set."""
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }


def build_usage(
    prompt: int, completion: int, *, cached: int | None = None, reasoning: int | None = None
) -> dict[str, Any]:
    """CompletionUsage with integer counts and the details a provider reported."""
    usage: dict[str, Any] = {
        "prompt_tokens": int(prompt),
        "completion_tokens": int(completion),
        "total_tokens": int(prompt) + int(completion),
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": int(cached)}
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": int(reasoning)}
    return usage


def build_completion(
    model: str,
    created: int,
    message: dict[str, Any],
    finish_reason: str,
    usage: dict[str, Any] | None = None,
    completion_id: str | None = None,
) -> dict[str, Any]:
    """A `chat.completion` with one choice (CreateChatCompletionResponse)."""
    message.setdefault("role", "assistant")
    message.setdefault("content", None)
    message.setdefault("refusal", None)
    completion: dict[str, Any] = {
        "id": completion_id or new_id(),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        completion["usage"] = usage
    return completion


# --- Adapters ---

_CHAT_SUFFIX: Final = "/chat/completions"
# OpenAI API reference: each endpoint's path below /v1.
_OPENAI_PATHS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "chat": "/chat/completions",
        "embeddings": "/embeddings",
        "images": "/images/generations",
        "transcriptions": "/audio/transcriptions",
        "speech": "/audio/speech",
        "moderations": "/moderations",
        "models": "/models",
    }
)
_TOOL_FIELDS: Final = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")


def _first_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        for key in ("message", "error", "detail", "msg"):
            found = _first_text(value.get(key))
            if found:
                return found
    if isinstance(value, list) and value:
        return _first_text(value[0])
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare upstream and treated as absent)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class Adapter:
    """The OpenAI wire format; other engines override the hooks that differ."""

    engine: ClassVar[str] = "gpt"
    stream_format: ClassVar[Literal["sse", "ndjson", "aws"]] = "sse"
    auth: ClassVar[str] = "bearer"
    endpoints: ClassVar[frozenset[str]] = frozenset(_OPENAI_PATHS)
    default_base_url: ClassVar[str] = ""
    inline_images: ClassVar[bool] = False  # True: the gateway fetches http image URLs into data URIs first

    # Request side

    def build_request(self, body: Mapping[str, Any], target: Target) -> UpstreamRequest:
        return UpstreamRequest(
            "POST",
            self.url("chat", body, target),
            self.headers(target),
            json=self.payload(body, target),
            stream=bool(body.get("stream")),
        )

    def build_endpoint_request(
        self, endpoint: Endpoint, body: Mapping[str, Any] | None, target: Target, form: tuple | None = None
    ) -> UpstreamRequest:
        """Non-chat endpoints: JSON bodies get the upstream model; multipart forms likewise."""
        headers = self.headers(target)
        url = self.url(endpoint, body or {}, target)
        if form is not None:
            fields = tuple((k, target.upstream_model if k == "model" else v) for k, v in form)
            return UpstreamRequest("POST", url, headers, form=fields)
        payload = self.apply_overrides({**(body or {}), "model": target.upstream_model}, target)
        return UpstreamRequest("POST", url, headers, json=payload)

    def build_models_request(self, provider: Provider, api_key: str) -> UpstreamRequest:
        target = Target(provider, "", api_key)
        return UpstreamRequest("GET", self.url("models", {}, target), self.headers(target))

    def url(self, endpoint: Endpoint, body: Mapping[str, Any], target: Target) -> str:
        base = target.provider.base_url.rstrip("/")
        base = base.removesuffix(_CHAT_SUFFIX)
        return base + _OPENAI_PATHS[endpoint]

    def headers(self, target: Target) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        headers.update(target.provider.headers)
        return headers

    def payload(self, body: Mapping[str, Any], target: Target) -> dict[str, Any]:
        """Forward every field, unknown ones too, with the upstream model name."""
        payload = {**body, "model": target.upstream_model}
        if not target.provider.tools:
            for name in _TOOL_FIELDS:
                payload.pop(name, None)
        return self.apply_overrides(payload, target)

    def apply_overrides(self, payload: dict[str, Any], target: Target) -> dict[str, Any]:
        """post_body_parameter_overrides: `all` first, then the entry for the upstream model."""
        overrides = target.provider.overrides
        if overrides:
            payload.update(overrides.get("all", {}))
            payload.update(overrides.get(target.upstream_model, {}))
        return payload

    # Response side

    def iter_events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[SSEEvent]:
        """Frame the upstream byte stream into events; engines with another framing override this."""
        return iter_sse(chunks)

    def parse_response(self, native: Any, model: str) -> dict[str, Any]:
        if not isinstance(native, dict) or not isinstance(native.get("choices"), list):
            raise UpstreamError(502, "upstream answered without choices")
        native["model"] = model
        return native

    async def parse_stream(
        self, events: AsyncIterator[SSEEvent], model: str, *, include_usage: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Pass the upstream's chunks through with the client's model name; usage is the upstream's."""
        finished = False
        async for event in events:
            if event.data == "[DONE]":
                return
            chunk = _load_event(event)
            if "error" in chunk and "choices" not in chunk:
                raise _stream_error(chunk)
            chunk["model"] = model
            finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or ())
            yield chunk
        if not finished:
            raise UpstreamError(502, "upstream stream ended before it finished")

    def parse_endpoint_response(self, endpoint: Endpoint, native: Any, model: str) -> Any:
        """Non-chat JSON answers pass through, showing the model name the client asked for."""
        if isinstance(native, dict) and "model" in native:
            native["model"] = model
        return native

    def parse_models(self, native: Any) -> list[str]:
        data = native.get("data") if isinstance(native, dict) else native
        if not isinstance(data, list):
            raise UpstreamError(502, "models list has no data array")
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    def parse_error(self, status: int, body: bytes, retry_after: float | None = None) -> UpstreamError:
        try:
            message = _first_text(loads(body)) if body else None
        except (JSONDecodeError, ValueError, TypeError):
            message = None
        if message is None:
            message = body[:300].decode("utf-8", "replace").strip() or "no body"
        return UpstreamError(status, message, retry_after=retry_after)


def _load_event(event: SSEEvent) -> dict[str, Any]:
    try:
        chunk = loads(event.data)
    except (JSONDecodeError, ValueError) as exc:
        raise UpstreamError(502, f"upstream sent a malformed stream event: {exc}") from None
    if not isinstance(chunk, dict):
        raise UpstreamError(502, "upstream sent a stream event that is not an object")
    return chunk


def _stream_error(chunk: Mapping[str, Any]) -> UpstreamError:
    error = chunk.get("error")
    status = error.get("code") if isinstance(error, Mapping) else None
    status = status if isinstance(status, int) and 400 <= status < 600 else 502
    return UpstreamError(status, _first_text(chunk) or "upstream stream error")


class OpenAIAdapter(Adapter):
    engine = "gpt"


class OpenRouterAdapter(Adapter):
    """OpenRouter: OpenAI format plus its optional attribution headers (openrouter.ai/docs, "App Attribution")."""

    engine = "openrouter"

    def headers(self, target: Target) -> dict[str, str]:
        headers = {"HTTP-Referer": "https://github.com/yym68686/uni-api", "X-Title": "uni-api"}
        headers.update(super().headers(target))
        return headers


class AzureAdapter(Adapter):
    """Azure OpenAI: deployment URLs with `api-version`, and the `api-key` header (learn.microsoft.com REST reference)."""

    engine = "azure"
    auth = "api-key"
    DEFAULT_API_VERSION: ClassVar[str] = "2024-10-21"

    def url(self, endpoint: Endpoint, body: Mapping[str, Any], target: Target) -> str:
        root = target.provider.base_url.rstrip("/")
        version = target.provider.extra.get("api_version") or self.DEFAULT_API_VERSION
        if endpoint == "models":
            return f"{root}/openai/models?api-version={version}"
        return f"{root}/openai/deployments/{target.upstream_model}{_OPENAI_PATHS[endpoint]}?api-version={version}"

    def headers(self, target: Target) -> dict[str, str]:
        headers = {"api-key": target.api_key}
        headers.update(target.provider.headers)
        return headers


_OPENAI_ADAPTERS: Final = (OpenAIAdapter(), OpenRouterAdapter(), AzureAdapter())

# --- Anthropic: claude, vertex-claude, aws (Bedrock) ---

_CLAUDE_ADAPTERS: Final[tuple[Adapter, ...]] = ()

# --- Google: gemini, vertex-gemini, Vertex OAuth assertion ---

_GOOGLE_ADAPTERS: Final[tuple[Adapter, ...]] = ()

# --- Cohere and Cloudflare ---

_OTHER_ADAPTERS: Final[tuple[Adapter, ...]] = ()

ADAPTERS: Final[Mapping[str, Adapter]] = MappingProxyType(
    {a.engine: a for a in (*_OPENAI_ADAPTERS, *_CLAUDE_ADAPTERS, *_GOOGLE_ADAPTERS, *_OTHER_ADAPTERS)}
)

# --- Engine inference ---


def _host(suffix: str) -> Callable[[SplitResult, str], bool]:
    return lambda url, model: (url.hostname or "").endswith(suffix)


def _path(suffix: str) -> Callable[[SplitResult, str], bool]:
    return lambda url, model: url.path.rstrip("/").endswith(suffix)


_Rule = tuple[str, Callable[[SplitResult, str], bool]]
_GOOGLE_RULES: Final[tuple[_Rule, ...]] = ()
_CLAUDE_RULES: Final[tuple[_Rule, ...]] = ()
_OTHER_RULES: Final[tuple[_Rule, ...]] = ()

# First matching rule wins; `engine:` in api.yaml overrides all of them.
ENGINE_RULES: Final[tuple[_Rule, ...]] = (
    *_GOOGLE_RULES,
    *_CLAUDE_RULES,
    *_OTHER_RULES,
    ("azure", _host(".openai.azure.com")),
    ("openrouter", _host("openrouter.ai")),
)


def infer_engine(base_url: str, model: str = "", forced: str | None = None) -> str:
    """The engine for a provider's base_url (and model, where one host serves several formats)."""
    if forced:
        return forced
    url = urlsplit(base_url)
    for engine, matches in ENGINE_RULES:
        if matches(url, model):
            return engine
    return "gpt"
