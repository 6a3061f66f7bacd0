"""Wire formats: one adapter per engine, converting OpenAI requests to a provider's and its answers back.

Owns the records that cross into uni_api.py (Provider, Target, UpstreamRequest, SSEEvent), the SSE framer,
the OpenAI chunk and response builders, UpstreamError, engine inference and the ADAPTERS table.
Pure code: no sockets, no environment, no clock and no global mutable state.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import mimetypes
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit

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

Endpoint = Literal["chat", "embeddings", "images", "transcriptions", "speech", "moderations", "models", "compact"]
StreamFormat = Literal["sse", "aws"]

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
    prompt_cache: bool = False  # preference prompt_cache: auto, cache breakpoints added for Claude channels


@dataclass(frozen=True, slots=True)
class Target:
    """What one attempt needs: where, which upstream model, which key."""

    provider: Provider
    upstream_model: str
    api_key: str = ""
    token: str | None = None  # a pre-resolved OAuth token, for adapters whose auth needs one
    now: float = 0.0  # wall-clock seconds, for request signing; adapters never read the clock
    betas: tuple[str, ...] = ()  # the client's `anthropic-beta` flags; Claude engines pass on those they take


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
    buffer, event, size = bytearray(), "message", 0
    data: list[str] = []
    async for chunk in chunks:
        buffer += chunk
        if b"\n" not in chunk:
            if len(buffer) > SSE_LINE_LIMIT:  # a line that never ends must not hold memory without bound
                raise _line_too_long()
            continue
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            if len(raw) > SSE_LINE_LIMIT:
                raise _line_too_long()
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:  # a blank line ends one event
                if data:
                    yield SSEEvent(event, "\n".join(data))
                event, data, size = "message", [], 0
            elif line[0] == ":":
                continue  # comment or keep-alive
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                    size += len(value)
                    if size > SSE_LINE_LIMIT:  # data lines that never reach a blank line, likewise
                        raise _line_too_long()
                elif name == "event":
                    event = value
    # An event without its closing blank line at EOF is dropped, as the SSE specification requires.


SSE_LINE_LIMIT: Final = 64 * 1024 * 1024  # as uni_api's limit on a whole non-stream answer


def _line_too_long() -> UpstreamError:
    return UpstreamError(502, f"upstream sent a stream line or event larger than {SSE_LINE_LIMIT} bytes")


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
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    *,
    index: int = 0,
) -> dict[str, Any]:
    """One `chat.completion.chunk` (CreateChatCompletionStreamResponse): one choice, or none when `delta` is
    None. Every engine's chunks come from here. `created` 0 means the provider gave no timestamp: the gateway
    stamps the request's time on it (uni_api._stamp), as adapters never read the clock."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    chunk: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def build_usage_chunk(chunk_id: str, model: str, created: int, usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: empty choices, usage set."""
    return build_chunk(chunk_id, model, created, None, usage=usage)


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


@dataclass(slots=True)
class ChunkStream:
    """The chunks of one stream converted from another engine's events: one id, the assistant role on the
    first; `created` is left 0 for the gateway to stamp (these formats carry no timestamp)."""

    model: str
    id: str = field(default_factory=new_id)
    started: bool = False

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        if not self.started:  # the role rides on the first chunk with content, so an early error can fail over
            self.started = True
            delta = {"role": "assistant", **delta}
        return build_chunk(self.id, self.model, 0, delta, finish_reason)

    def tail(self, finish: str, usage: dict[str, Any] | None, include_usage: bool) -> list[dict[str, Any]]:
        """The finish chunk, then the usage chunk when the client asked for it and the upstream reported one."""
        tail = [self.delta({}, finish)]
        if include_usage and usage is not None:
            tail.append(build_usage_chunk(self.id, self.model, 0, usage))
        return tail


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
    stream_format: ClassVar[StreamFormat] = "sse"  # how the upstream frames a stream: a key of FRAMERS
    auth: ClassVar[str] = "bearer"
    endpoints: ClassVar[frozenset[str]] = frozenset(_OPENAI_PATHS)
    default_base_url: ClassVar[str] = ""
    inline_images: ClassVar[bool] = False  # True: the gateway fetches http image URLs into data URIs first
    # Provider fields (Provider.extra) the engine cannot work without: parse_config refuses a provider that
    # lacks one, naming file, line and key, so no request ever finds out.
    requires: ClassVar[tuple[str, ...]] = ()

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

    def build_count_tokens_request(self, body: Mapping[str, Any], target: Target) -> UpstreamRequest:
        """The engine's own token counting, for the faces whose `counters` name it."""
        raise NotImplementedError

    def build_models_request(self, target: Target) -> UpstreamRequest:
        """The provider's model listing, for startup discovery; `target.upstream_model` is empty."""
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
        """Forward every field, unknown ones too, with the upstream model name; streams ask for usage."""
        payload = {**body, "model": target.upstream_model}
        if "messages" in body:  # Gemini thought signatures ride in tool call ids; other engines get the plain id
            payload["messages"] = plain_tool_ids(body["messages"])
        if payload.get("stream"):  # the gateway counts tokens; it drops the usage chunk if the client did not ask
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
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
        """Frame the upstream byte stream into events, by the engine's `stream_format`."""
        return FRAMERS[self.stream_format](chunks)

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
    except (JSONDecodeError, ValueError, RecursionError) as exc:
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
    """Azure OpenAI: deployment URLs with `api-version` and the `api-key` header (Azure OpenAI REST reference)."""

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


ANTHROPIC_VERSION: Final = "2023-06-01"
# The Messages API requires max_tokens. 4096 is the output cap of the smallest Claude models (Claude 3 Haiku
# and Opus), so every Claude model accepts it; clients wanting longer answers send max_tokens themselves.
CLAUDE_DEFAULT_MAX_TOKENS: Final = 4096
# reasoning_effort -> thinking.budget_tokens ("Extended thinking": 1024 is the minimum budget).
_CLAUDE_THINKING_BUDGETS: Final = MappingProxyType({"low": 1024, "medium": 4096, "high": 16384})
_CLAUDE_TOOL_CHOICES: Final = MappingProxyType({"auto": "auto", "none": "none", "required": "any"})
# Messages API `stop_reason` -> OpenAI finish_reason.
_CLAUDE_STOP_REASONS: Final = MappingProxyType({
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
    "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter",
})
# Anthropic "Errors": error.type -> HTTP status, for errors that arrive inside a 200 stream.
_CLAUDE_ERROR_STATUS: Final = MappingProxyType({
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403, "not_found_error": 404,
    "request_too_large": 413, "rate_limit_error": 429, "api_error": 500, "overloaded_error": 529,
})
# The Messages API has no JSON mode, so response_format json_object/json_schema becomes this system text.
_CLAUDE_JSON_INSTRUCTION: Final = "Reply with one valid JSON value only: no prose around it and no markdown fences."
# Claude wants the conversation to open with a user turn; a history opening with the assistant gets this first.
_CLAUDE_OPENING_TURN: Final = "(continued)"


def _claude_source(url: str) -> dict[str, str] | None:
    """A `data:<type>;base64,<data>` URI as a Claude base64 source, else None."""
    head, comma, data = url.partition(",")
    if not (url.startswith("data:") and comma and head.endswith(";base64")):
        return None
    return {"type": "base64", "media_type": head[5:-7], "data": data}


def _claude_text(part: Mapping[str, Any]) -> dict[str, Any] | None:
    text = part.get("text") or part.get("refusal")
    return {"type": "text", "text": text} if text else None  # Claude rejects empty text blocks


def _claude_image(part: Mapping[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    url = str(image.get("url", "")) if isinstance(image, Mapping) else str(image or "")
    # "Vision": Claude fetches http(s) images itself (source type "url"), so the gateway does not inline them.
    return {"type": "image", "source": _claude_source(url) or {"type": "url", "url": url}}


def _claude_document(part: Mapping[str, Any]) -> dict[str, Any]:
    source = _claude_source(str((part.get("file") or {}).get("file_data") or ""))
    if source is None:
        raise UpstreamError(400, "Claude takes files only as base64 data URIs in file.file_data", retryable=True)
    return {"type": "document", "source": source}


_CLAUDE_PARTS: Final[Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any] | None]]] = MappingProxyType(
    {"text": _claude_text, "refusal": _claude_text, "image_url": _claude_image, "file": _claude_document}
)


def to_claude_content(content: Any) -> list[dict[str, Any]]:
    """OpenAI message content (a string or a list of parts) as Claude content blocks."""
    if not content:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for part in content:
        part = {"type": "text", "text": part} if isinstance(part, str) else part
        convert = _CLAUDE_PARTS.get(part.get("type"))
        if convert is None:  # retryable: a channel of another engine may accept it
            raise UpstreamError(400, f"Claude does not accept '{part.get('type')}' content", retryable=True)
        block = convert(part)
        if block and "cache_control" in part:
            block["cache_control"] = part["cache_control"]
        if block:
            blocks.append(block)
    return blocks


def _claude_tool_input(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, Mapping):
        return dict(arguments)
    try:
        value = loads(arguments) if arguments else {}
    except (JSONDecodeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise UpstreamError(400, "tool_calls[].function.arguments must be a JSON object for Claude")
    return value


# Claude's thinking blocks ride in an OpenAI message as `thinking_blocks` (the field LiteLLM and its clients use),
# so a client that sends the assistant message back hands Claude its signed thinking again. "Extended thinking"
# (Anthropic; Bedrock "Thinking encryption"): with tools, the thinking blocks of the turn must come back verbatim,
# first in the assistant turn; elsewhere the API strips them. A stream's signature arrives as a signature_delta
# just before the block's content_block_stop.
_THINKING_FIELDS: Final = MappingProxyType({"thinking": ("type", "thinking", "signature"),
                                            "redacted_thinking": ("type", "data")})


def _thinking_block(block: Mapping[str, Any]) -> dict[str, Any]:
    return {name: block.get(name) for name in _THINKING_FIELDS[block["type"]]}


def _claude_assistant(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Its thinking blocks, text, then one tool_use block per tool call, ids kept."""
    thinking = message.get("thinking_blocks")
    blocks = [_thinking_block(block) for block in (thinking if isinstance(thinking, list) else ())
              if isinstance(block, Mapping) and block.get("type") in _THINKING_FIELDS]
    blocks += to_claude_content(message.get("content"))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                       "input": _claude_tool_input(function.get("arguments"))})
    return blocks


def _claude_tool_result(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
    content = to_claude_content(message.get("content"))
    if content:
        result["content"] = content
    return [result]


def _claude_user(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    return to_claude_content(message.get("content"))


# OpenAI role -> (Claude role, converter); any other non-system role is a user turn.
_CLAUDE_TURNS: Final = MappingProxyType(
    {"assistant": ("assistant", _claude_assistant), "tool": ("user", _claude_tool_result)}
)


# "Prompt caching": a `cache_control` breakpoint marks a block, and the prompt up to it (tools, then system, then
# messages) is cached. OpenAI-format clients put it where Anthropic-compatible gateways take it: on content parts,
# on a whole message (its last block gets it) and on a tool; all of these reach Claude. Thinking blocks cannot
# carry one. At most 4 per request: the client's own are passed as given; prompt_cache: auto adds at most 3.
_UNCACHEABLE: Final = frozenset({"thinking", "redacted_thinking"})
CACHE_BREAKPOINT: Final[Mapping[str, str]] = MappingProxyType({"type": "ephemeral"})


def _cache_last(blocks: list[dict[str, Any]], cache_control: Any) -> list[dict[str, Any]]:
    """Put `cache_control` (a whole message's, when it has one) on the last of `blocks` that may carry it."""
    cacheable = [block for block in blocks if block.get("type") not in _UNCACHEABLE]
    if isinstance(cache_control, Mapping) and cacheable and "cache_control" not in cacheable[-1]:
        cacheable[-1]["cache_control"] = dict(cache_control)
    return blocks


def _has_breakpoint(request: Mapping[str, Any]) -> bool:
    blocks = [*request.get("tools", ()), *request.get("system", ()),
              *(block for turn in request["messages"] for block in turn["content"])]
    return any("cache_control" in block for block in blocks)


def add_cache_breakpoints(request: dict[str, Any]) -> dict[str, Any]:
    """prompt_cache: auto, for a request whose client set no breakpoint: one on the last tool, one on the last
    system block and one on the last block of the last user turn (so each turn reads the cache the one before
    wrote; "Prompt caching", "Caching multi-turn conversations")."""
    if _has_breakpoint(request):
        return request
    users = [turn for turn in request["messages"] if turn["role"] == "user"]
    for blocks in (request.get("tools") or [], request.get("system") or [], users[-1]["content"] if users else []):
        _cache_last(blocks, CACHE_BREAKPOINT)
    return request


def to_claude_messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, turns): every system message in order; neighbours of one role merged, user first."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.get("role") in ("system", "developer"):
            system += _cache_last(to_claude_content(message.get("content")), message.get("cache_control"))
            continue
        role, convert = _CLAUDE_TURNS.get(message.get("role"), ("user", _claude_user))
        blocks = _cache_last(convert(message), message.get("cache_control"))
        if blocks and turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        elif blocks:
            turns.append({"role": role, "content": blocks})
    for turn in turns:  # "Handle tool calls": tool_result blocks must come first in their user message
        turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    if turns and turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": [{"type": "text", "text": _CLAUDE_OPENING_TURN}]})
    return system, turns


def _claude_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    if tool.get("type", "function") != "function":
        return dict(tool)  # Anthropic's own tool types (web_search_..., bash_...) pass through as given
    function = tool.get("function") or {}
    converted = {"name": function.get("name"),
                 "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        converted["description"] = function["description"]
    if isinstance(tool.get("cache_control"), Mapping):  # a breakpoint after the tools ("Prompt caching")
        converted["cache_control"] = dict(tool["cache_control"])
    return converted


def _claude_tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    """"Tool use": auto / none / any / {"type": "tool", "name"}; parallel_tool_calls=false disables parallel use."""
    if isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name")
        result = {"type": "tool", "name": name} if name else None
    else:
        result = {"type": _CLAUDE_TOOL_CHOICES[choice]} if choice in _CLAUDE_TOOL_CHOICES else None
    if parallel is False and (result or {}).get("type") != "none":
        result = {**(result or {"type": "auto"}), "disable_parallel_tool_use": True}
    return result


def _claude_json_instruction(response_format: Any) -> list[dict[str, Any]]:
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "json_object":
        return [{"type": "text", "text": _CLAUDE_JSON_INSTRUCTION}]
    if kind == "json_schema":
        schema = dumps((response_format.get("json_schema") or {}).get("schema") or {}).decode()
        return [{"type": "text", "text": f"{_CLAUDE_JSON_INSTRUCTION} It must match this JSON schema: {schema}"}]
    return []


def _add_claude_thinking(request: dict[str, Any], body: Mapping[str, Any]) -> None:
    """A `thinking` field passes through (an enabled one without budget gets one); reasoning_effort
    low/medium/high becomes a thinking budget; minimal or none leaves thinking off."""
    thinking = body.get("thinking")
    budget = _CLAUDE_THINKING_BUDGETS.get(body.get("reasoning_effort"))
    if isinstance(thinking, Mapping):
        enabled = thinking.get("type") == "enabled"
        thinking = {"budget_tokens": budget or _CLAUDE_THINKING_BUDGETS["medium"], **thinking} if enabled else thinking
    elif budget:
        thinking = {"type": "enabled", "budget_tokens": budget}
    else:
        return
    request["thinking"] = dict(thinking)
    if thinking.get("type") == "enabled":
        # "Extended thinking": budget_tokens must stay below max_tokens; temperature and top_k must be unset.
        if request["max_tokens"] <= thinking["budget_tokens"]:
            request["max_tokens"] += thinking["budget_tokens"]
        request.pop("temperature", None)
        request.pop("top_k", None)


def to_claude_request(body: Mapping[str, Any], tools: bool = True) -> dict[str, Any]:
    """An OpenAI chat request as a Messages API body, without the model (variants put their envelope on)."""
    system, messages = to_claude_messages(body.get("messages") or ())
    system += _claude_json_instruction(body.get("response_format"))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or CLAUDE_DEFAULT_MAX_TOKENS
    request: dict[str, Any] = {"messages": messages, "max_tokens": int(max_tokens)}
    if system:
        request["system"] = system
    request.update({name: body[name] for name in ("temperature", "top_p", "top_k") if body.get(name) is not None})
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        request["metadata"] = {"user_id": str(body["user"])}
    if tools and body.get("tools"):
        request["tools"] = [_claude_tool(tool) for tool in body["tools"]]
        choice = _claude_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice:
            request["tool_choice"] = choice
    _add_claude_thinking(request, body)
    if body.get("stream"):
        request["stream"] = True
    return request


def claude_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """prompt_tokens counts fresh, cache-written and cache-read input; cache reads are the cached tokens, and
    cache writes keep Anthropic's name, `cache_creation_input_tokens` (as Anthropic-compatible gateways show it)."""
    prompt = sum(int(usage.get(name) or 0)
                 for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    converted = build_usage(prompt, int(usage.get("output_tokens") or 0), cached=usage.get("cache_read_input_tokens"))
    if usage.get("cache_creation_input_tokens") is not None:
        converted["cache_creation_input_tokens"] = int(usage["cache_creation_input_tokens"])
    return converted


def _claude_error(native: Any) -> UpstreamError:
    error = native.get("error") if isinstance(native, Mapping) else None
    error = error if isinstance(error, Mapping) else {}
    kind = str(error.get("type") or "error")
    return UpstreamError(_CLAUDE_ERROR_STATUS.get(kind, 502), f"{kind}: {error.get('message') or 'no message'}")


def _claude_tool_call(block: Mapping[str, Any]) -> dict[str, Any]:
    arguments = dumps(block.get("input") or {}).decode()
    return {"id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": arguments}}


@dataclass
class _ClaudeStream:
    """One Claude stream being converted: its chunks, tool-call numbering, usage so far and the stop reason."""

    out: ChunkStream
    tools: dict[int, int] = field(default_factory=dict)  # Anthropic content index -> OpenAI tool_calls index
    usage: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None
    thinking: dict[int, str] = field(default_factory=dict)  # content index -> thinking text so far

    def on_message_start(self, event: Mapping[str, Any]) -> None:
        self.usage.update((event.get("message") or {}).get("usage") or {})

    def on_message_delta(self, event: Mapping[str, Any]) -> None:
        # "Streaming Messages": message_delta usage counts are cumulative, so they replace earlier ones.
        self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
        self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason

    def on_block_start(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        block = event.get("content_block") or {}
        if block.get("type") == "tool_use":
            index = self.tools[event.get("index", -1)] = len(self.tools)
            call = {**_claude_tool_call(block), "index": index}
            if not block.get("input"):
                call["function"]["arguments"] = ""  # the input follows as input_json_delta
            return {"tool_calls": [call]}
        if block.get("type") == "redacted_thinking":
            return {"thinking_blocks": [_thinking_block(block)]}
        if block.get("type") == "thinking":
            self.thinking[event.get("index", -1)] = block.get("thinking") or ""
        text = block.get("text") or block.get("thinking")
        return {"reasoning_content" if block.get("type") == "thinking" else "content": text} if text else None

    def on_block_delta(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        delta = event.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return {"content": delta["text"]}
        if kind == "thinking_delta" and delta.get("thinking"):
            position = event.get("index", -1)
            self.thinking[position] = self.thinking.get(position, "") + delta["thinking"]
            return {"reasoning_content": delta["thinking"]}
        if kind == "signature_delta":  # the block is whole: hand it over, signed
            text = self.thinking.pop(event.get("index", -1), "")
            return {"thinking_blocks": [{"type": "thinking", "thinking": text, "signature": delta.get("signature")}]}
        index = self.tools.get(event.get("index", -1))
        if kind == "input_json_delta" and delta.get("partial_json") and index is not None:
            return {"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]}
        return None  # citations_delta: OpenAI chunks have no field for it

    def on_error(self, event: Mapping[str, Any]) -> None:
        raise _claude_error(event)


# "Streaming Messages" event types; ping, content_block_stop and unknown events carry nothing to convert.
_CLAUDE_STREAM_HANDLERS: Final[Mapping[str, Callable[[_ClaudeStream, Mapping[str, Any]], dict[str, Any] | None]]] = (
    MappingProxyType({
        "message_start": _ClaudeStream.on_message_start,
        "message_delta": _ClaudeStream.on_message_delta,
        "content_block_start": _ClaudeStream.on_block_start,
        "content_block_delta": _ClaudeStream.on_block_delta,
        "error": _ClaudeStream.on_error,
    })
)


def _claude_root(base_url: str) -> str:
    """The `.../v1` of a base_url given as `.../v1/messages` (or, leniently, as `.../v1` or the bare host)."""
    root = base_url.rstrip("/").removesuffix("/messages")
    return root if root.endswith("/v1") else root + "/v1"


def parse_betas(header: str | None) -> tuple[str, ...]:
    """An `anthropic-beta` header ("Beta headers": comma-separated feature names) as its distinct names."""
    return tuple(dict.fromkeys(name.strip() for name in (header or "").split(",") if name.strip()))


class ClaudeAdapter(Adapter):
    """Anthropic Messages API; vertex-claude and aws inherit the conversion and change the envelope only."""

    engine = "claude"
    auth = "x-api-key"
    endpoints = frozenset({"chat"})
    default_base_url = "https://api.anthropic.com/v1/messages"

    def url(self, endpoint: Endpoint, body: Mapping[str, Any], target: Target) -> str:
        root = _claude_root(target.provider.base_url)
        return root + "/models?limit=1000" if endpoint == "models" else root + "/messages"  # "List Models" pages

    def headers(self, target: Target) -> dict[str, str]:
        headers = {"x-api-key": target.api_key, "anthropic-version": ANTHROPIC_VERSION}
        if target.betas:  # "Beta headers": the client's flags go on as one comma-separated header
            headers["anthropic-beta"] = ",".join(target.betas)
        headers.update(target.provider.headers)
        return headers

    def payload(self, body: Mapping[str, Any], target: Target) -> dict[str, Any]:
        request = to_claude_request(body, target.provider.tools)
        if target.provider.prompt_cache:
            add_cache_breakpoints(request)
        return self.apply_overrides(self.envelope(request, target), target)

    def envelope(self, request: dict[str, Any], target: Target) -> dict[str, Any]:
        return {"model": target.upstream_model, **request}

    def parse_response(self, native: Any, model: str) -> dict[str, Any]:
        if isinstance(native, dict) and isinstance(native.get("error"), Mapping):
            raise _claude_error(native)
        if not isinstance(native, dict) or not isinstance(native.get("content"), list):
            raise UpstreamError(502, "upstream answered without content")
        blocks = [block for block in native["content"] if isinstance(block, dict)]
        text = "".join(block.get("text", "") for block in blocks if block.get("type") == "text")
        reasoning = "".join(block.get("thinking", "") for block in blocks if block.get("type") == "thinking")
        calls = [_claude_tool_call(block) for block in blocks if block.get("type") == "tool_use"]
        thinking = [_thinking_block(block) for block in blocks if block.get("type") in _THINKING_FIELDS]
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if thinking:
            message["thinking_blocks"] = thinking
        if calls:
            message["tool_calls"] = calls
        finish = _CLAUDE_STOP_REASONS.get(native.get("stop_reason"), "stop")
        usage = claude_usage(native["usage"]) if isinstance(native.get("usage"), Mapping) else None
        return build_completion(model, 0, message, finish, usage)

    async def parse_stream(
        self, events: AsyncIterator[SSEEvent], model: str, *, include_usage: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        state = _ClaudeStream(ChunkStream(model))
        async for event in events:
            data = _load_event(event)
            if data.get("type") == "message_stop":
                break
            handler = _CLAUDE_STREAM_HANDLERS.get(data.get("type"))
            delta = handler(state, data) if handler else None
            if delta:
                yield state.out.delta(delta)
        else:
            if state.stop_reason is None:
                raise UpstreamError(502, "upstream stream ended before message_stop")
        finish = _CLAUDE_STOP_REASONS.get(state.stop_reason or "", "stop")
        for chunk in state.out.tail(finish, claude_usage(state.usage), include_usage):
            yield chunk


# Vertex AI: the project is in every URL; the service account's email and key sign the OAuth assertion.
VERTEX_REQUIRES: Final = ("project_id", "client_email", "private_key")


class VertexClaudeAdapter(ClaudeAdapter):
    """Claude on Vertex AI ("Use Claude models"): rawPredict / streamRawPredict, anthropic_version in the body."""

    engine = "vertex-claude"
    auth = "google-oauth"
    requires = VERTEX_REQUIRES
    default_base_url = "https://aiplatform.googleapis.com"
    ANTHROPIC_VERSION: ClassVar[str] = "vertex-2023-10-16"

    def url(self, endpoint: Endpoint, body: Mapping[str, Any], target: Target) -> str:
        extra = target.provider.extra
        region = extra.get("region") or "global"
        root = vertex_root(target.provider.base_url, region)
        if endpoint == "models":  # "publishers.models.list" (v1beta1); the version view names `@date` versions
            return f"{root}/v1beta1/publishers/anthropic/models?pageSize=1000&view=PUBLISHER_MODEL_VERSION_VIEW_BASIC"
        method = "streamRawPredict" if body.get("stream") else "rawPredict"
        return (f"{root}/v1/projects/{extra['project_id']}/locations/{region}"
                f"/publishers/anthropic/models/{target.upstream_model}:{method}")

    def headers(self, target: Target) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
        headers.update(target.provider.headers)
        return headers

    def envelope(self, request: dict[str, Any], target: Target) -> dict[str, Any]:
        return {"anthropic_version": self.ANTHROPIC_VERSION, **request}  # the model is in the URL

    def parse_models(self, native: Any) -> list[str]:
        """{"publisherModels": [{"name": "publishers/anthropic/models/claude-3-5-sonnet-v2", "versionId":
        "20241022"}]}: rawPredict wants `name@version`."""
        models = native.get("publisherModels") if isinstance(native, Mapping) else None
        if not isinstance(models, list):
            raise UpstreamError(502, "models list has no publisherModels array")
        return [str(m["name"]).rsplit("/", 1)[-1] + (f"@{m['versionId']}" if m.get("versionId") else "")
                for m in models if isinstance(m, Mapping) and "name" in m]


# Anthropic section, continued. AWS: Signature Version 4, event-stream framing, Bedrock.


def sign_aws_v4(method: str, url: str, headers: Mapping[str, str], body: bytes, *, access_key: str,
                secret_key: str, region: str, service: str, now: float) -> dict[str, str]:
    """`headers` plus X-Amz-Date and Authorization, every one of them signed (AWS Signature Version 4,
    IAM User Guide "Create a signed AWS API request"). The URL's path must be exactly the one sent."""
    parts = urlsplit(url)
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    signed = {name.lower(): " ".join(str(value).split()) for name, value in headers.items()}
    signed.update({"host": parts.netloc, "x-amz-date": amz_date})
    names = ";".join(sorted(signed))
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in parse_qsl(parts.query, True))
    canonical = "\n".join((
        method, quote(parts.path or "/", safe="/~"),  # non-S3 services: the sent path, URI-encoded once more
        "&".join(f"{k}={v}" for k, v in pairs), "".join(f"{n}:{signed[n]}\n" for n in sorted(signed)), names,
        hashlib.sha256(body).hexdigest(),
    ))
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    string_to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = ("AWS4" + secret_key).encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={names}, Signature={signature}"
    return {**headers, "X-Amz-Date": amz_date, "Authorization": authorization}


# "Event stream encoding" header value types with a fixed size (6 byte array and 7 string carry a 2-byte length).
_AWS_FIXED_SIZES: Final = MappingProxyType({0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16})
AWS_MAX_MESSAGE: Final = 16 * 1024 * 1024


def _aws_headers(raw: bytes) -> dict[str, Any]:
    """Headers of one event-stream message: name length, name, value type, value."""
    headers: dict[str, Any] = {}
    pos = 0
    while pos < len(raw):
        end = pos + 1 + raw[pos]
        name, kind, pos = raw[pos + 1:end].decode(), raw[end], end + 1
        size = struct.unpack_from(">H", raw, pos)[0] if kind in (6, 7) else _AWS_FIXED_SIZES[kind]
        pos += 2 if kind in (6, 7) else 0
        value: Any = raw[pos:pos + size]
        pos += size
        if pos > len(raw):
            raise ValueError("header value runs past the headers")
        if kind == 7:
            value = value.decode()
        elif kind < 2:
            value = kind == 0
        elif kind not in (6, 9):
            value = int.from_bytes(value, "big", signed=True)
        headers[name] = value
    return headers


async def iter_aws_frames(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[dict[str, Any], bytes]]:
    """(headers, payload) of each AWS event-stream message, both CRC32s checked ("Event stream encoding": total
    length, headers length, prelude CRC, headers, payload, message CRC; all big-endian)."""
    buffer = bytearray()
    seen: tuple[bytes, dict[str, Any]] = (b"", {})  # Bedrock repeats one header block per event: parse it once
    async for chunk in chunks:
        buffer += chunk
        while len(buffer) >= 12:
            total, headers_length, prelude_crc = struct.unpack_from(">III", buffer)
            if zlib.crc32(buffer[:8]) != prelude_crc or not 16 + headers_length <= total <= AWS_MAX_MESSAGE:
                raise UpstreamError(502, "upstream sent a corrupt event-stream prelude")
            if len(buffer) < total:
                break
            message = bytes(buffer[:total])
            del buffer[:total]
            if zlib.crc32(message[:-4]) != struct.unpack_from(">I", message, total - 4)[0]:
                raise UpstreamError(502, "upstream sent an event-stream message with a bad CRC")
            raw = message[12:12 + headers_length]
            if raw != seen[0]:
                try:
                    seen = (raw, _aws_headers(raw))
                except (IndexError, KeyError, ValueError, struct.error):
                    raise UpstreamError(502, "upstream sent malformed event-stream headers") from None
            yield seen[1], message[12 + headers_length:-4]
    if buffer:
        raise UpstreamError(502, "upstream event stream ended inside a message")


# Bedrock "ResponseStream": exception events and their documented HTTP status codes.
_BEDROCK_STREAM_ERRORS: Final = MappingProxyType({
    "internalServerException": 500, "modelStreamErrorException": 424, "modelTimeoutException": 408,
    "serviceUnavailableException": 503, "throttlingException": 429, "validationException": 400,
})


def _bedrock_stream_error(headers: Mapping[str, Any], payload: bytes) -> UpstreamError:
    name = str(headers.get(":exception-type") or headers.get(":error-code") or "error")
    try:
        message = _first_text(loads(payload)) if payload else None
    except (JSONDecodeError, ValueError):
        message = None
    message = message or headers.get(":error-message") or payload[:300].decode("utf-8", "replace")
    return UpstreamError(_BEDROCK_STREAM_ERRORS.get(name, 502), f"{name}: {message}")


async def iter_aws_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[SSEEvent]:
    """Bedrock InvokeModelWithResponseStream as events: each `chunk` message carries {"bytes": base64 of one
    Anthropic stream event}; exception messages raise UpstreamError with the documented status."""
    async for headers, payload in iter_aws_frames(chunks):
        kind = headers.get(":message-type")
        if kind == "event" and headers.get(":event-type") == "chunk":
            try:
                data = base64.b64decode(loads(payload)["bytes"], validate=True).decode()
            except (JSONDecodeError, ValueError, KeyError, TypeError):
                raise UpstreamError(502, "upstream sent a chunk without base64 bytes") from None
            yield SSEEvent("chunk", data)
        elif kind in ("exception", "error"):
            raise _bedrock_stream_error(headers, payload)


# Flags naming the client (Claude Code) or its claude.ai sign-in: features of Anthropic's own API that Bedrock's
# SigV4 path has no use for, so they are not passed on as anthropic_beta.
_BEDROCK_SKIPPED_BETAS: Final = frozenset({"claude-code-20250219", "oauth-2025-04-20"})

# Stream framing by Adapter.stream_format: server-sent events, or AWS event-stream messages (Bedrock).
FRAMERS: Final[Mapping[StreamFormat, Callable[[AsyncIterator[bytes]], AsyncIterator[SSEEvent]]]] = MappingProxyType(
    {"sse": iter_sse, "aws": iter_aws_events}
)


class BedrockAdapter(ClaudeAdapter):
    """Claude on Amazon Bedrock: InvokeModel / InvokeModelWithResponseStream, SigV4-signed with the provider's
    aws_access_key / aws_secret_key; streams arrive in AWS event-stream framing (`iter_aws_events`)."""

    engine = "aws"
    auth = "sigv4"
    stream_format = "aws"
    requires = ("aws_access_key", "aws_secret_key")  # the region has a default (us-east-1)
    default_base_url = "https://bedrock-runtime.us-east-1.amazonaws.com"
    ANTHROPIC_VERSION: ClassVar[str] = "bedrock-2023-05-31"

    def build_request(self, body: Mapping[str, Any], target: Target) -> UpstreamRequest:
        extra = target.provider.extra
        url, data = self.url("chat", body, target), dumps(self.payload(body, target))
        headers = sign_aws_v4("POST", url, {"Content-Type": "application/json"}, data,
                              access_key=extra["aws_access_key"], secret_key=extra["aws_secret_key"],
                              region=self.region(target.provider), service="bedrock", now=target.now)
        headers.update(target.provider.headers)  # added unsigned, after signing
        return UpstreamRequest("POST", url, headers, data=data, stream=bool(body.get("stream")))

    def region(self, provider: Provider) -> str:
        """The region of an explicit `bedrock-runtime.<region>.amazonaws.com` base_url, else `region:`."""
        base = provider.base_url.rstrip("/")
        labels = (urlsplit(base).hostname or "").split(".")
        named = labels[1] if base != self.default_base_url and len(labels) > 3 and "bedrock" in labels[0] else ""
        return named or provider.extra.get("region") or "us-east-1"

    def url(self, endpoint: Endpoint, body: Mapping[str, Any], target: Target) -> str:
        root = target.provider.base_url.rstrip("/")
        if root == self.default_base_url:
            root = f"https://bedrock-runtime.{self.region(target.provider)}.amazonaws.com"
        action = "invoke-with-response-stream" if body.get("stream") else "invoke"
        # ':' stays literal (aiohttp sends it so anyway) and '/' of ARNs is escaped: the signed path is the sent one.
        return f"{root}/model/{quote(target.upstream_model, safe=':')}/{action}"

    def envelope(self, request: dict[str, Any], target: Target) -> dict[str, Any]:
        request.pop("stream", None)  # the operation, not the body, chooses streaming on Bedrock
        betas = [*(request.get("anthropic_beta") or ()), *(b for b in target.betas if b not in _BEDROCK_SKIPPED_BETAS)]
        if betas:  # "Request and Response": betas ride in the body, as `anthropic_beta`, the headers being signed
            request["anthropic_beta"] = list(dict.fromkeys(betas))
        return {"anthropic_version": self.ANTHROPIC_VERSION, **request}

    def parse_error(self, status: int, body: bytes, retry_after: float | None = None) -> UpstreamError:
        # Bedrock errors are {"message": ...}, some (AccessDenied) spelled {"Message": ...}.
        return super().parse_error(status, body.replace(b'"Message":', b'"message":', 1), retry_after)

    def build_models_request(self, target: Target) -> UpstreamRequest:
        """ListFoundationModels (Bedrock API Reference): the control-plane host `bedrock.<region>`, Anthropic's
        models only, SigV4-signed like every call; a user-given base_url is used as-is."""
        extra, provider = target.provider.extra, target.provider
        root = provider.base_url.rstrip("/")
        if root == self.default_base_url or "bedrock-runtime." in root:
            root = f"https://bedrock.{self.region(provider)}.amazonaws.com"
        url = f"{root}/foundation-models?byProvider=Anthropic"
        headers = sign_aws_v4("GET", url, {}, b"", access_key=extra["aws_access_key"],
                              secret_key=extra["aws_secret_key"], region=self.region(provider),
                              service="bedrock", now=target.now)
        return UpstreamRequest("GET", url, headers)

    def parse_models(self, native: Any) -> list[str]:
        """{"modelSummaries": [{"modelId": "anthropic.claude-3-5-sonnet-20241022-v2:0", ...}]}"""
        models = native.get("modelSummaries") if isinstance(native, Mapping) else None
        if not isinstance(models, list):
            raise UpstreamError(502, "models list has no modelSummaries array")
        return [str(m["modelId"]) for m in models if isinstance(m, Mapping) and "modelId" in m]


_CLAUDE_ADAPTERS: Final[tuple[Adapter, ...]] = (ClaudeAdapter(), VertexClaudeAdapter(), BedrockAdapter())

# --- Google: gemini, vertex-gemini, Vertex OAuth assertion ---


GOOGLE_TOKEN_URI: Final = "https://oauth2.googleapis.com/token"
GOOGLE_SCOPE: Final = "https://www.googleapis.com/auth/cloud-platform"
VERTEX_DEFAULT_REGION: Final = "global"

# Gemini API reference, "Schema": `parameters` and `responseSchema` take "a select subset of an OpenAPI 3.0 schema
# object" and answer 400 "Unknown name" for other keys ($schema, additionalProperties, $ref, const, oneOf, strict...).
# We send `parameters`, not `parametersJsonSchema` (full JSON Schema, newer revisions only), as every API version and
# model takes it: keep the keys below, inline local $refs, and respell JSON Schema's forms (null in type lists or
# anyOf -> nullable, const -> enum, oneOf -> anyOf). title/default/example are dropped too (newer revisions only).
_GEMINI_SCHEMA_KEYS: Final = frozenset({
    "type", "format", "description", "nullable", "enum", "items", "maxItems", "minItems", "properties", "required",
    "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "anyOf", "propertyOrdering", "minimum",
    "maximum"})
_GEMINI_SCHEMA_FORMATS: Final = frozenset({"float", "double", "int32", "int64", "enum", "date-time"})  # the rest: 400
# "GenerationConfig" fields from OpenAI's (max_completion_tokens wins over max_tokens: it comes later).
_GEMINI_GENERATION_FIELDS: Final[Mapping[str, str]] = MappingProxyType({
    "temperature": "temperature", "top_p": "topP", "top_k": "topK", "n": "candidateCount", "seed": "seed",
    "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty",
    "max_tokens": "maxOutputTokens", "max_completion_tokens": "maxOutputTokens"})
# Gemini docs, "OpenAI compatibility": low/medium/high are 1K/8K/24K thinking tokens and none is 0 (off); minimal
# (OpenAI's newer level) sits between none and low.
_GEMINI_THINKING_BUDGETS: Final[Mapping[str, int]] = MappingProxyType(
    {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576})
_GEMINI_TOOL_MODES: Final[Mapping[str, str]] = MappingProxyType({"auto": "AUTO", "none": "NONE", "required": "ANY"})
# "Candidate.FinishReason"; others (OTHER, LANGUAGE, MALFORMED_FUNCTION_CALL...) read as stop.
_GEMINI_FINISH_REASONS: Final[Mapping[str, str]] = MappingProxyType({
    "STOP": "stop", "MAX_TOKENS": "length", **dict.fromkeys(
        ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"), "content_filter")})
# Gemini docs, "Thought signatures" (FAQ): Gemini 3 refuses a replayed function call without the signature its answer
# carried. The signature rides in the tool call id (encode_signature_id); for a client that dropped it, this
# documented value skips the check.
_GEMINI_SKIP_SIGNATURE: Final = "skip_thought_signature_validator"
SIGNATURE_MARK: Final = "__ts_"
_GEMINI_SERVED_METHODS: Final = frozenset({"generateContent", "embedContent", "batchEmbedContents", "predict"})


def encode_signature_id(call_id: str, signature: str | None) -> str:
    """A tool call id carrying a Gemini thoughtSignature: `<id>__ts_<signature as unpadded base64url>`.

    Gemini docs, "Thought signatures": a Gemini 3 function call must come back with the signature its answer
    carried. OpenAI clients send a tool call's id back unchanged (assistant `tool_calls[].id`, tool `tool_call_id`),
    Anthropic clients likewise (`tool_use.id`, `tool_result.tool_use_id`), so the id is where the signature survives
    a round trip through any client format. base64url keeps the id within `[A-Za-z0-9_-]` (Claude's id pattern).
    """
    if not signature:
        return call_id
    return call_id + SIGNATURE_MARK + base64.urlsafe_b64encode(signature.encode()).rstrip(b"=").decode()


def decode_signature_id(call_id: str) -> tuple[str, str | None]:
    """(the id without its signature, the thoughtSignature or None): encode_signature_id read backwards."""
    base, mark, encoded = call_id.partition(SIGNATURE_MARK)
    if not mark or not encoded:
        return call_id, None
    try:
        signature = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True).decode()
        return (base, signature) if signature else (call_id, None)
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError: not ours, leave the id alone
        return call_id, None


def plain_tool_ids(messages: Any) -> Any:
    """OpenAI messages with signature-carrying tool call ids cut back to their plain ids, for engines other than
    Gemini (ids there may be length-limited); both ends of each call are cut alike, so they still pair up."""
    if not isinstance(messages, list):
        return messages
    return [_plain_ids(m) if isinstance(m, Mapping) and (m.get("tool_calls") or m.get("tool_call_id")) else m
            for m in messages]


def _plain_id(value: Any) -> Any:
    return decode_signature_id(value)[0] if isinstance(value, str) and SIGNATURE_MARK in value else value


def _plain_ids(message: Mapping[str, Any]) -> Mapping[str, Any]:
    calls = message.get("tool_calls")
    if SIGNATURE_MARK not in str(message.get("tool_call_id")) and not (isinstance(calls, list) and any(
            SIGNATURE_MARK in str(_gemini_map(c).get("id")) for c in calls)):
        return message
    plain = {**message, **({"tool_call_id": _plain_id(message["tool_call_id"])} if "tool_call_id" in message else {})}
    if isinstance(calls, list):
        plain["tool_calls"] = [{**c, "id": _plain_id(c.get("id"))} if isinstance(c, Mapping) else c for c in calls]
    return plain


def _gemini_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that carry something: Gemini refuses empty parts, contents and tool lists."""
    return {key: value for key, value in fields.items() if value not in (None, "", [], {})}


def to_gemini_schema(schema: Any, defs: Mapping[str, Any] | None = None, depth: int = 0) -> dict[str, Any]:
    """A JSON Schema cut down to the OpenAPI subset Gemini accepts (see _GEMINI_SCHEMA_KEYS)."""
    if not isinstance(schema, Mapping) or depth > 32:
        return {}
    defs = {**(defs or {}), **_gemini_map(schema.get("$defs")), **_gemini_map(schema.get("definitions"))}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.rsplit("/", 1)[-1] in defs:
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return to_gemini_schema({**_gemini_map(defs[ref.rsplit("/", 1)[-1]]), **rest}, defs, depth + 1)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        key = "anyOf" if key == "oneOf" and "anyOf" not in schema else key
        key, value = ("enum", [value]) if key == "const" and "enum" not in schema else (key, value)
        converted = _gemini_schema_value(key, value, defs, depth) if key in _GEMINI_SCHEMA_KEYS else None
        if converted is not None:
            out[key] = converted
    types = out.get("type")
    if isinstance(types, list):  # the subset has one type per schema, and null as `nullable`
        out.update(type=next((t for t in types if t != "null"), "null"),
                   nullable="null" in types or out.get("nullable"))
    options = out.pop("anyOf", None) or []
    kept = [o for o in options if o.get("type") != "null"]
    if len(kept) < len(options):
        out["nullable"] = True
    return _gemini_fields({**kept[0], **out} if len(kept) == 1 and len(options) > 1 else {**out, "anyOf": kept})


def _gemini_map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _gemini_schema_value(key: str, value: Any, defs: Mapping[str, Any], depth: int) -> Any:
    """A kept key's value with nested schemas converted; None when Gemini would refuse its shape."""
    if key in ("properties", "items", "anyOf"):
        if isinstance(value, Mapping) and key == "properties":
            return {str(n): to_gemini_schema(s, defs, depth + 1) for n, s in value.items()}
        if isinstance(value, list) and key == "anyOf":
            return [to_gemini_schema(s, defs, depth + 1) for s in value]
        return to_gemini_schema(value, defs, depth + 1) if isinstance(value, Mapping) and key == "items" else None
    if key in ("enum", "required", "propertyOrdering"):  # string lists only ("Schema.enum" too)
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
    return value if key != "format" or (isinstance(value, str) and value in _GEMINI_SCHEMA_FORMATS) else None


def _gemini_object(text: Any) -> dict[str, Any]:
    """Function args and results as the JSON object Gemini requires; other JSON or plain text under "content"."""
    if isinstance(text, Mapping) or text is None or text == "":
        return dict(text or {})
    try:
        value = loads(text) if isinstance(text, (str, bytes)) else text
    except (JSONDecodeError, ValueError):
        value = text
    return value if isinstance(value, dict) else {"content": value}


def _gemini_media(url: Any, fallback_type: str = "image/jpeg") -> dict[str, Any] | None:
    if not isinstance(url, str) or not url:
        return None
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        return {"inlineData": {"mimeType": header[5:].split(";")[0] or fallback_type, "data": data}}
    # http(s) images were inlined by the gateway (inline_images); gs:// and File API URIs are Gemini's own.
    return {"fileData": {"mimeType": mimetypes.guess_type(url)[0] or fallback_type, "fileUri": url}}


def _gemini_audio(audio: Mapping[str, Any]) -> dict[str, Any] | None:
    data = audio.get("data")
    return {"inlineData": {"mimeType": f"audio/{audio.get('format', 'wav')}", "data": data}} if data else None


# OpenAI content part type -> Gemini part ("Part": text, inlineData, fileData).
_GEMINI_PARTS: Final[Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any] | None]]] = MappingProxyType({
    "text": lambda part: {"text": part["text"]} if part.get("text") else None,
    "image_url": lambda part: _gemini_media(_gemini_map(part.get("image_url")).get("url", part.get("image_url"))),
    "input_audio": lambda part: _gemini_audio(_gemini_map(part.get("input_audio"))),
    "file": lambda part: _gemini_media(_gemini_map(part.get("file")).get("file_data"), "application/pdf"),
})


def to_gemini_parts(content: Any) -> list[dict[str, Any]]:
    """OpenAI message content (a string or typed parts) as Gemini parts; empty text is dropped (Gemini refuses it)."""
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts = content if isinstance(content, list) else ()
    builds = [_GEMINI_PARTS.get(p.get("type"), lambda p: None)(p) for p in parts if isinstance(p, Mapping)]
    return [part for part in builds if part]


def _gemini_model_turn(message: Mapping[str, Any], names: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    """An assistant message: its text, then one functionCall part per tool call (several for parallel calls)."""
    calls = [*(message.get("tool_calls") or ()), *([{"function": message["function_call"]}]
                                                   if isinstance(message.get("function_call"), Mapping) else [])]
    parts = to_gemini_parts(message.get("content"))
    signed = []
    for call in map(_gemini_map, calls):
        function = _gemini_map(call.get("function"))
        names[call.get("id") or ""] = function.get("name") or ""
        # Google's OpenAI compatibility layer puts the signature in extra_content.google.thought_signature.
        signature = decode_signature_id(str(call.get("id") or ""))[1] or _gemini_map(
            _gemini_map(call.get("extra_content")).get("google")).get("thought_signature")
        part = {"functionCall": {"name": function.get("name") or "", "args": _gemini_object(function.get("arguments"))}}
        signed.append(bool(signature))
        parts.append({**part, "thoughtSignature": signature} if signature else part)
    if calls and not any(signed):  # "Thought signatures": the first call of a step is the one that carries it
        next(p for p in parts if "functionCall" in p)["thoughtSignature"] = _GEMINI_SKIP_SIGNATURE
    return "model", parts


def _gemini_tool_turn(message: Mapping[str, Any], names: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    """A tool result as a functionResponse naming the function of its tool_call_id (the original lost it)."""
    name = names.get(message.get("tool_call_id") or "") or message.get("name") or ""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return "user", [{"functionResponse": {"name": name, "response": _gemini_object(content)}}]


_GEMINI_TURNS: Final = MappingProxyType({"assistant": _gemini_model_turn, "tool": _gemini_tool_turn,
                                         "function": _gemini_tool_turn})


def to_gemini_contents(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(systemInstruction parts, contents): system turns apart, roles user/model, consecutive same roles merged."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, from the assistant turns seen so far
    for message in (m for m in messages if isinstance(m, Mapping)):
        if message.get("role") in ("system", "developer"):
            system += to_gemini_parts(message.get("content"))
            continue
        turn = _GEMINI_TURNS.get(message.get("role"))
        role, parts = turn(message, names) if turn else ("user", to_gemini_parts(message.get("content")))
        if parts and contents and contents[-1]["role"] == role:
            contents[-1]["parts"] += parts
        elif parts:
            contents.append({"role": role, "parts": parts})
    return system, contents


def _gemini_declaration(function: Mapping[str, Any]) -> dict[str, Any]:
    parameters = to_gemini_schema(function.get("parameters"))
    return _gemini_fields({"name": function.get("name", ""), "description": function.get("description"),
                           "parameters": parameters if parameters.get("properties") else None})  # empty OBJECT: 400


def _gemini_tools(body: Mapping[str, Any], target: Target) -> list[dict[str, Any]]:
    """Function declarations (Gemini docs, "Function calling"), plus Grounding with Google Search for an alias
    ending in -search: `googleSearchRetrieval` on Gemini 1.x, `googleSearch` from 2.0 on."""
    functions = [t["function"] for t in body.get("tools") or () if isinstance(t, Mapping)
                 and t.get("type") == "function" and isinstance(t.get("function"), Mapping)]
    functions += [f for f in body.get("functions") or () if isinstance(f, Mapping)]
    tools = [{"functionDeclarations": [_gemini_declaration(f) for f in functions]}] if functions and (
        target.provider.tools) else []
    if str(body.get("model", "")).endswith("-search"):  # the client's alias, e.g. gemini-2.0-flash-search
        legacy = target.upstream_model.removeprefix("models/").startswith(("gemini-1.", "gemini-pro"))
        tools.append({"googleSearchRetrieval": {}} if legacy else {"googleSearch": {}})
    return tools


def _gemini_tool_config(choice: Any) -> dict[str, Any] | None:
    """"FunctionCallingConfig": auto/none/required as AUTO/NONE/ANY, a named function as ANY limited to it."""
    if isinstance(choice, str):
        return {"functionCallingConfig": {"mode": _GEMINI_TOOL_MODES[choice]}} if choice in _GEMINI_TOOL_MODES else None
    name = _gemini_map(_gemini_map(choice).get("function") or choice).get("name")
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}} if name else None


def _gemini_generation_config(body: Mapping[str, Any]) -> dict[str, Any]:
    config = {field: body[name] for name, field in _GEMINI_GENERATION_FIELDS.items() if body.get(name) is not None}
    stop, response_format = body.get("stop"), _gemini_map(body.get("response_format"))
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if response_format.get("type") in ("json_object", "json_schema"):
        schema = to_gemini_schema(_gemini_map(response_format.get("json_schema")).get("schema"))
        config.update(_gemini_fields({"responseMimeType": "application/json", "responseSchema": schema}))
    budget = _GEMINI_THINKING_BUDGETS.get(body.get("reasoning_effort") or "")
    if budget is not None:
        config["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": budget > 0}
    return config


def _from_gemini_candidate(candidate: Mapping[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    """(text, thoughts, tool calls) of a candidate's parts; thought parts carry `thought: true`."""
    text: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in map(_gemini_map, _gemini_map(candidate.get("content")).get("parts") or ()):
        call = part.get("functionCall")
        if isinstance(call, Mapping):
            function = {"name": call.get("name", ""), "arguments": dumps(call.get("args") or {}).decode()}
            call_id = encode_signature_id(new_id("call_"), part.get("thoughtSignature"))
            calls.append({"id": call_id, "type": "function", "function": function})
        elif isinstance(part.get("text"), str):
            (thoughts if part.get("thought") else text).append(part["text"])
    return "".join(text), "".join(thoughts), calls


def _gemini_finish(reason: Any, has_calls: bool) -> str:
    mapped = _GEMINI_FINISH_REASONS.get(reason or "STOP", "stop")
    return "tool_calls" if has_calls and mapped == "stop" else mapped


def _gemini_usage(metadata: Any) -> dict[str, Any] | None:
    """usageMetadata as CompletionUsage; thinking tokens are completion tokens, as OpenAI counts reasoning."""
    if not isinstance(metadata, Mapping):
        return None
    thoughts = metadata.get("thoughtsTokenCount")
    prompt = (metadata.get("promptTokenCount") or 0) + (metadata.get("toolUsePromptTokenCount") or 0)
    completion = (metadata.get("candidatesTokenCount") or 0) + (thoughts or 0)
    return build_usage(prompt, completion, cached=metadata.get("cachedContentTokenCount"), reasoning=thoughts)


def _gemini_created(native: Mapping[str, Any]) -> int:
    """Vertex stamps answers (`createTime`, RFC 3339); the Gemini API does not, and adapters never read the clock."""
    try:
        moment = datetime.datetime.fromisoformat(str(native.get("createTime"))[:19])
    except ValueError:
        return 0
    return int(moment.replace(tzinfo=datetime.timezone.utc).timestamp())


def _google_error(body: bytes) -> Mapping[str, Any]:
    """The `error` object of Google's error shape (a JSON array of it when a stream lacked alt=sse)."""
    try:
        native = loads(body) if body else None
    except (JSONDecodeError, ValueError):
        return {}
    return _gemini_map(_gemini_map(native[0] if isinstance(native, list) and native else native).get("error"))


class GeminiAdapter(Adapter):
    """Gemini API (ai.google.dev/api): generateContent, streamGenerateContent?alt=sse, batchEmbedContents."""

    engine = "gemini"
    auth = "x-goog-api-key"
    endpoints = frozenset({"chat", "embeddings"})
    default_base_url = "https://generativelanguage.googleapis.com/v1beta"
    inline_images = True  # Gemini fetches no URLs but its own (File API, gs://)
    methods: ClassVar[Mapping[str, str]] = MappingProxyType({"chat": "generateContent",
                                                             "embeddings": "batchEmbedContents"})
    models_key: ClassVar[str] = "models"

    def method(self, endpoint: Endpoint, body: Mapping[str, Any]) -> str:
        stream = endpoint == "chat" and body.get("stream")
        return "streamGenerateContent?alt=sse" if stream else self.methods[endpoint]

    def url(self, endpoint: Endpoint, body: Mapping[str, Any], target: Target) -> str:
        base = target.provider.base_url.rstrip("/")
        if endpoint == "models":
            return f"{base}/models?pageSize=1000"  # "models.list": at most 1000 per page
        return f"{base}/models/{target.upstream_model}:{self.method(endpoint, body)}"

    def headers(self, target: Target) -> dict[str, str]:
        return {"x-goog-api-key": target.api_key, **target.provider.headers}  # never ?key=: URLs land in logs

    def payload(self, body: Mapping[str, Any], target: Target) -> dict[str, Any]:
        """GenerateContentRequest (Gemini API reference, "models.generateContent")."""
        system, contents = to_gemini_contents(body.get("messages") or ())
        tools = _gemini_tools(body, target)
        declared = any("functionDeclarations" in tool for tool in tools)
        return self.apply_overrides({"contents": contents, **_gemini_fields({
            "systemInstruction": _gemini_fields({"parts": system}), "tools": tools,
            "toolConfig": _gemini_tool_config(body.get("tool_choice", body.get("function_call"))) if declared else None,
            "generationConfig": _gemini_generation_config(body),
            "safetySettings": body.get("safety_settings") or body.get("safetySettings"),
        })}, target)

    def parse_response(self, native: Any, model: str) -> dict[str, Any]:
        if not isinstance(native, dict):
            raise UpstreamError(502, "upstream answered with something other than a GenerateContentResponse")
        choices = []
        for position, candidate in enumerate(map(_gemini_map, native.get("candidates") or ())):
            text, thoughts, calls = _from_gemini_candidate(candidate)
            message = {"role": "assistant", "content": text if text or not calls else None, "refusal": None,
                       **_gemini_fields({"reasoning_content": thoughts, "tool_calls": calls})}
            choices.append({"index": candidate.get("index", position), "message": message, "logprobs": None,
                            "finish_reason": _gemini_finish(candidate.get("finishReason"), bool(calls))})
        if not choices and not _gemini_map(native.get("promptFeedback")).get("blockReason"):
            raise UpstreamError(502, "upstream answered without candidates")
        choices = choices or [{"index": 0, "message": {"role": "assistant", "content": "", "refusal": None},
                               "logprobs": None, "finish_reason": "content_filter"}]  # "PromptFeedback.blockReason"
        completion = build_completion(model, _gemini_created(native), choices[0]["message"],
                                      choices[0]["finish_reason"], _gemini_usage(native.get("usageMetadata")))
        completion["choices"] = choices
        return completion

    async def parse_stream(
        self, events: AsyncIterator[SSEEvent], model: str, *, include_usage: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Each event is a whole GenerateContentResponse carrying the next piece of every candidate."""
        chunk_id, created, usage = new_id(), 0, None
        calls: dict[int, int] = {}  # per candidate seen: its tool calls so far (the next tool_call index)
        finish: dict[int, str] = {}
        async for event in events:
            native = _load_event(event)
            if "error" in native:
                raise _stream_error(native)
            created, usage = created or _gemini_created(native), _gemini_usage(native.get("usageMetadata")) or usage
            if _gemini_map(native.get("promptFeedback")).get("blockReason"):
                finish.setdefault(0, "content_filter")
            for position, candidate in enumerate(map(_gemini_map, native.get("candidates") or ())):
                index = candidate.get("index", position)
                text, thoughts, new_calls = _from_gemini_candidate(candidate)
                tool_calls = [{"index": calls.get(index, 0) + i, **call} for i, call in enumerate(new_calls)]
                delta = {**({} if index in calls else {"role": "assistant"}),
                         **_gemini_fields({"content": text, "reasoning_content": thoughts, "tool_calls": tool_calls})}
                calls[index] = calls.get(index, 0) + len(new_calls)
                if candidate.get("finishReason"):
                    finish[index] = _gemini_finish(candidate["finishReason"], calls[index] > 0)
                if delta:
                    yield build_chunk(chunk_id, model, created, delta, index=index)  # n > 1: several candidates
        if not finish:
            raise UpstreamError(502, "upstream stream ended before it finished")
        for index, reason in sorted(finish.items()):
            yield build_chunk(chunk_id, model, created, {} if index in calls else {"role": "assistant", "content": ""},
                              reason, index=index)
        if include_usage:
            yield build_usage_chunk(chunk_id, model, created, usage or build_usage(0, 0))

    def parse_error(self, status: int, body: bytes, retry_after: float | None = None) -> UpstreamError:
        """Google's shape: {"error": {"code", "message", "status", "details": [{"reason"}]}}."""
        error, info = super().parse_error(status, body, retry_after), _google_error(body)
        if info.get("status"):
            error.message = f"{info['status']}: {error.message}"
        if any(_gemini_map(d).get("reason") == "API_KEY_INVALID" for d in info.get("details") or ()):
            return UpstreamError(401, error.message, retry_after=retry_after)  # a 400 for a bad key: try the next
        error.retryable = error.retryable or info.get("status") == "FAILED_PRECONDITION"  # "location not supported"
        return error

    # Embeddings and model listing

    def build_endpoint_request(
        self, endpoint: Endpoint, body: Mapping[str, Any] | None, target: Target, form: tuple | None = None
    ) -> UpstreamRequest:
        if endpoint != "embeddings":
            return super().build_endpoint_request(endpoint, body, target, form)
        texts = (body or {}).get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            # Token-id inputs have no Google equivalent; another channel may take them.
            raise UpstreamError(400, "Google embeddings take a string or a list of strings as input", retryable=True)
        payload = self.embedding_payload(texts, (body or {}).get("dimensions"), target)
        return UpstreamRequest("POST", self.url(endpoint, body or {}, target), self.headers(target),
                               json=self.apply_overrides(payload, target))

    def embedding_payload(self, texts: list[str], dimensions: Any, target: Target) -> dict[str, Any]:
        """"models.batchEmbedContents": one EmbedContentRequest per input, each naming the model."""
        return {"requests": [_gemini_fields({"model": f"models/{target.upstream_model}", "content": {"parts": [
            {"text": text}]}, "outputDimensionality": dimensions}) for text in texts]}

    def embedding_vectors(self, native: Any) -> tuple[list[Any], int]:
        """BatchEmbedContentsResponse: `embeddings[].values`; the Gemini API counts no tokens for them."""
        return [e["values"] for e in native["embeddings"]], 0

    def parse_endpoint_response(self, endpoint: Endpoint, native: Any, model: str) -> Any:
        if endpoint != "embeddings":
            return super().parse_endpoint_response(endpoint, native, model)
        try:
            vectors, tokens = self.embedding_vectors(native)
        except (KeyError, TypeError, IndexError):
            raise UpstreamError(502, "upstream embeddings answer has an unexpected shape") from None
        data = [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)]
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def parse_models(self, native: Any) -> list[str]:
        """"models.list" {"models": [{"name": "models/gemini-1.5-pro", "supportedGenerationMethods"}]} (Vertex:
        "publisherModels"), keeping the models this adapter can serve."""
        models = native.get(self.models_key) if isinstance(native, Mapping) else None
        if not isinstance(models, list):
            raise UpstreamError(502, f"models list has no {self.models_key} array")
        return [str(m["name"]).rsplit("/", 1)[-1] for m in models if isinstance(m, Mapping) and "name" in m
                and _GEMINI_SERVED_METHODS.intersection(m.get("supportedGenerationMethods") or _GEMINI_SERVED_METHODS)]


def vertex_root(base_url: str, region: str) -> str:
    """Vertex AI's service root: the regional host for a region, unless the user's base_url names another host."""
    root = base_url.rstrip("/")
    if region != "global" and urlsplit(root).hostname == "aiplatform.googleapis.com":
        return f"https://{region}-aiplatform.googleapis.com"
    return root


class VertexGeminiAdapter(GeminiAdapter):
    """Gemini on Vertex AI (REST "projects.locations.publishers.models.generateContent"): same wire, OAuth bearer."""

    engine = "vertex-gemini"
    auth = "google-oauth"
    requires = VERTEX_REQUIRES
    default_base_url = "https://aiplatform.googleapis.com"
    methods = MappingProxyType({"chat": "generateContent", "embeddings": "predict"})
    models_key = "publisherModels"

    def url(self, endpoint: Endpoint, body: Mapping[str, Any], target: Target) -> str:
        extra = target.provider.extra
        region = extra.get("region") or VERTEX_DEFAULT_REGION
        root = vertex_root(target.provider.base_url, region)
        if endpoint == "models":  # "publishers.models.list", v1beta1 only; it needs the OAuth token too
            return f"{root}/v1beta1/publishers/google/models?pageSize=1000"
        model_path = f"projects/{extra['project_id']}/locations/{region}/publishers/google/models"
        return f"{root}/v1/{model_path}/{target.upstream_model}:{self.method(endpoint, body)}"

    def headers(self, target: Target) -> dict[str, str]:
        return {**({"Authorization": f"Bearer {target.token}"} if target.token else {}), **target.provider.headers}

    def embedding_payload(self, texts: list[str], dimensions: Any, target: Target) -> dict[str, Any]:
        """Vertex AI "Get text embeddings": `predict` with one instance per input."""
        return _gemini_fields({"instances": [{"content": text} for text in texts],
                               "parameters": _gemini_fields({"outputDimensionality": dimensions})})

    def embedding_vectors(self, native: Any) -> tuple[list[Any], int]:
        """`predictions[].embeddings` with `values` and `statistics.token_count`."""
        embeddings = [p["embeddings"] for p in native["predictions"]]
        tokens = sum(int(_gemini_map(e.get("statistics")).get("token_count") or 0) for e in embeddings)
        return [e["values"] for e in embeddings], tokens


# Vertex OAuth: the service account's signed assertion (Google, "Using OAuth 2.0 for Server to Server
# Applications"; RFC 7523). uni_api.py posts it to token_uri and caches the token.


def google_jwt_assertion(
    client_email: str, private_key_pem: str, token_uri: str, now: int, scope: str = GOOGLE_SCOPE
) -> str:
    """A JWT signed RS256 with the service account key, valid for an hour from `now`."""
    claims = {"iss": client_email, "scope": scope, "aud": token_uri, "iat": int(now), "exp": int(now) + 3600}
    signing_input = ".".join(_jwt_b64url(dumps(part)) for part in ({"alg": "RS256", "typ": "JWT"}, claims))
    # api.yaml often carries the key as the JSON key file does, with literal \n escapes.
    signature = rs256_sign(private_key_pem.replace("\\n", "\n"), signing_input.encode())
    return f"{signing_input}.{_jwt_b64url(signature)}"


def _jwt_b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rs256_sign(private_key_pem: str, message: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 with SHA-256: `cryptography` when importable, else the pure-Python signer."""
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError:  # the universal .pex carries no compiled modules
        return rs256_sign_pure(private_key_pem, message)
    key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("private_key is not an RSA key")
    return key.sign(message, padding.PKCS1v15(), hashes.SHA256())


_SHA256_DIGEST_INFO: Final = bytes.fromhex("3031300d060960864801650304020105000420")  # RFC 8017 §9.2 note 1


def rs256_sign_pure(private_key_pem: str, message: bytes) -> bytes:
    """RFC 8017 §8.2.1: EMSA-PKCS1-v1_5 encoding, then RSASP1 in its CRT form (§5.1.2)."""
    n, _e, _d, p, q, dp, dq, qinv = _rsa_private_numbers(private_key_pem)
    size = (n.bit_length() + 7) // 8
    digest_info = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    if size < len(digest_info) + 11:
        raise ValueError("private_key is too short for RS256")
    m = int.from_bytes(b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00" + digest_info, "big")
    s1, s2 = pow(m, dp, p), pow(m, dq, q)
    return (s2 + q * ((qinv * (s1 - s2)) % p)).to_bytes(size, "big")


def _der_next(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """One DER element at `offset`: (tag, contents, offset after it)."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length, offset = data[offset], data[offset + 1], offset + 2
    if length & 0x80:  # long form: the low bits count the length octets that follow
        count = length & 0x7F
        length, offset = int.from_bytes(data[offset:offset + count], "big"), offset + count
    if offset + length > len(data):
        raise ValueError("truncated DER")
    return tag, data[offset:offset + length], offset + length


def _der_sequence(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, contents) elements of the DER SEQUENCE at the start of `data`."""
    tag, contents, _ = _der_next(data, 0)
    if tag != 0x30:
        raise ValueError("expected a DER SEQUENCE")
    items, offset = [], 0
    while offset < len(contents):
        tag, value, offset = _der_next(contents, offset)
        items.append((tag, value))
    return items


def _rsa_private_numbers(pem: str) -> list[int]:
    """n, e, d, p, q, dp, dq, qinv of a PKCS#8 ("BEGIN PRIVATE KEY") or PKCS#1 ("BEGIN RSA PRIVATE KEY") PEM."""
    body = "".join(line.strip() for line in pem.strip().splitlines() if not line.startswith("-----"))
    try:
        fields = _der_sequence(base64.b64decode(body, validate=True))
        if len(fields) >= 3 and fields[1][0] == 0x30 and fields[2][0] == 0x04:  # RFC 5208 PrivateKeyInfo
            fields = _der_sequence(fields[2][1])
    except ValueError as exc:  # binascii.Error is a ValueError
        raise ValueError(f"private_key is not a PEM RSA key: {exc}") from None
    numbers = [int.from_bytes(value, "big") for tag, value in fields if tag == 0x02]
    if len(numbers) < 9:
        raise ValueError("private_key is not an RSA private key")
    return numbers[1:9]  # RFC 8017 A.1.2 RSAPrivateKey, after its version


_GOOGLE_ADAPTERS: Final[tuple[Adapter, ...]] = (GeminiAdapter(), VertexGeminiAdapter())

# --- Cohere and Cloudflare ---


def _text_of(content: Any) -> str:
    """The text of an OpenAI message content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else ()
    return "".join(str(p.get("text") or "") for p in parts if isinstance(p, Mapping) and p.get("type") == "text")


def _json_text(value: Any) -> str:
    """Tool-call arguments as the JSON string OpenAI promises, whatever the upstream sent."""
    return value if isinstance(value, str) else dumps(value if value is not None else {}).decode()


def _openai_tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped tool call from `{id, function: {name, arguments}}` or Workers AI's flat
    `{name, arguments: object}` ("Traditional function calling"); a missing id is generated."""
    function = call.get("function") if isinstance(call.get("function"), Mapping) else call
    return {"id": call.get("id") or new_id("call_"), "type": "function",
            "function": {"name": function.get("name") or "", "arguments": _json_text(function.get("arguments"))}}


def _model_names(native: Any, key: str) -> list[str]:
    models = native.get(key) if isinstance(native, dict) else None
    if not isinstance(models, list):
        raise UpstreamError(502, f"models list has no '{key}' array")
    return [str(m["name"]) for m in models if isinstance(m, dict) and "name" in m]


# Cohere Chat API v2 (docs.cohere.com/reference/chat), "ChatFinishReason"; ERROR and TIMEOUT are failures.
_COHERE_FINISH: Final[Mapping[str, str]] = MappingProxyType(
    {"COMPLETE": "stop", "STOP_SEQUENCE": "stop", "MAX_TOKENS": "length", "TOOL_CALL": "tool_calls"}
)
_COHERE_FAILED: Final[Mapping[str, int]] = MappingProxyType({"ERROR": 502, "TIMEOUT": 504})
_COHERE_ROLES: Final[Mapping[str, str]] = MappingProxyType(
    {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
)
# OpenAI body field -> Cohere v2 request field; later entries win, so max_completion_tokens beats max_tokens.
_COHERE_FIELDS: Final[Mapping[str, str]] = MappingProxyType(
    {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
     "top_p": "p", "top_k": "k", "seed": "seed", "frequency_penalty": "frequency_penalty",
     "presence_penalty": "presence_penalty"}
)
# reasoning_effort -> Cohere "Thinking".token_budget; the numbers are this gateway's choice, not Cohere's.
_COHERE_BUDGETS: Final[Mapping[str, int]] = MappingProxyType(
    {"minimal": 512, "low": 1024, "medium": 4096, "high": 16384}
)


def _to_cohere_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Cohere v2 "ChatMessageV2": system messages stay in place; tool calls and results keep their ids."""
    role = _COHERE_ROLES.get(message["role"])
    if role is None:
        raise UpstreamError(400, f"cohere does not accept messages with role '{message['role']}'")
    if role == "tool":
        return {"role": "tool", "tool_call_id": str(message.get("tool_call_id") or ""),
                "content": _text_of(message.get("content"))}
    if role == "assistant" and message.get("tool_calls"):
        native = {"role": "assistant", "tool_calls": [_openai_tool_call(call) for call in message["tool_calls"]]}
        plan = _text_of(message.get("content"))
        return {**native, "tool_plan": plan} if plan else native  # the text before tool calls is a tool_plan
    content = message.get("content")
    if role == "user" and isinstance(content, list):
        return {"role": role, "content": [_to_cohere_part(part) for part in content]}
    return {"role": role, "content": _text_of(content)}


def _to_cohere_part(part: Mapping[str, Any]) -> dict[str, Any]:
    """User content parts: "ChatTextContent" and "ImageContent" (data: or http URLs, "Image Inputs" guide)."""
    if part.get("type") == "text":
        return {"type": "text", "text": part.get("text", "")}
    if part.get("type") == "image_url":
        image = part["image_url"] if isinstance(part["image_url"], Mapping) else {"url": part["image_url"]}
        return {"type": "image_url", "image_url": {k: image[k] for k in ("url", "detail") if k in image}}
    raise UpstreamError(400, f"cohere does not accept content parts of type '{part.get('type')}'")


def _cohere_tools(tools: Any, choice: Any) -> dict[str, Any]:
    """"ToolV2" and tool_choice; v2 knows only REQUIRED and NONE, so a named function becomes REQUIRED with
    `tools` narrowed to that function."""
    if not tools:
        return {}
    named = choice.get("function", {}).get("name") if isinstance(choice, Mapping) else None
    functions = [t["function"] for t in tools if named is None or t["function"].get("name") == named]
    native: dict[str, Any] = {"tools": [{"type": "function", "function": {
        "name": f["name"], **({"description": f["description"]} if f.get("description") else {}),
        "parameters": f.get("parameters") or {"type": "object", "properties": {}}}} for f in functions]}
    if any(f.get("strict") for f in functions):
        native["strict_tools"] = True
    mode = "REQUIRED" if named else {"required": "REQUIRED", "none": "NONE"}.get(choice)  # auto: omitted
    return {**native, "tool_choice": mode} if mode else native


def _cohere_response_format(value: Any) -> dict[str, Any]:
    """"ResponseFormatV2": both OpenAI JSON modes become json_object, a json_schema carrying the schema."""
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind not in ("json_object", "json_schema"):
        return {}
    schema = (value.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    return {"response_format": {"type": "json_object", **({"json_schema": schema} if schema else {})}}


def _cohere_thinking(body: Mapping[str, Any]) -> dict[str, Any]:
    """"Thinking": OpenAI reasoning_effort, or OpenRouter-style `reasoning: {effort, max_tokens}`."""
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), Mapping) else {}
    effort = body.get("reasoning_effort") or reasoning.get("effort")
    if effort == "none" or reasoning.get("enabled") is False:
        return {"thinking": {"type": "disabled"}}
    budget = reasoning.get("max_tokens") or _COHERE_BUDGETS.get(effort)
    if not budget and not reasoning:
        return {}
    return {"thinking": {"type": "enabled", **({"token_budget": int(budget)} if budget else {})}}


def _cohere_usage(usage: Any) -> dict[str, Any] | None:
    """"Usage": tokens counts, billed_units when tokens are missing; counts arrive as doubles."""
    if not isinstance(usage, Mapping):
        return None
    counts = usage.get("tokens") or usage.get("billed_units") or {}
    if "input_tokens" not in counts and "output_tokens" not in counts:
        return None
    cached = usage.get("cached_tokens")
    return build_usage(counts.get("input_tokens") or 0, counts.get("output_tokens") or 0,
                       cached=int(cached) if cached else None)


def _cohere_finish(reason: Any, error: Any = None) -> str:
    if reason in _COHERE_FAILED:
        raise UpstreamError(_COHERE_FAILED[reason], f"cohere stopped with {reason}: {error or 'no detail'}",
                            retryable=True)
    return _COHERE_FINISH.get(str(reason), "stop")


class CohereAdapter(Adapter):
    """Cohere Chat API v2: POST {base}/v2/chat, bearer auth (docs.cohere.com/reference/chat)."""

    engine = "cohere"
    endpoints = frozenset({"chat", "models"})
    default_base_url = "https://api.cohere.com/v2/chat"

    def url(self, endpoint: Endpoint, body: Mapping[str, Any], target: Target) -> str:
        root = target.provider.base_url.rstrip("/").removesuffix("/v2/chat")
        # "List Models": GET /v1/models, filtered to chat models, one page of the maximum size.
        return root + ("/v1/models?endpoint=chat&page_size=1000" if endpoint == "models" else "/v2/chat")

    def payload(self, body: Mapping[str, Any], target: Target) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": target.upstream_model, "stream": bool(body.get("stream")),
                                   "messages": [_to_cohere_message(m) for m in body["messages"]]}
        payload.update((native, body[name]) for name, native in _COHERE_FIELDS.items() if body.get(name) is not None)
        stop = body.get("stop")
        if stop:
            payload["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        payload.update(_cohere_response_format(body.get("response_format")))
        payload.update(_cohere_thinking(body))
        if target.provider.tools:
            payload.update(_cohere_tools(body.get("tools"), body.get("tool_choice")))
        return self.apply_overrides(payload, target)

    def parse_response(self, native: Any, model: str) -> dict[str, Any]:
        """"v2_chat_Response": content[] text and thinking, tool_plan, tool_calls, finish_reason, usage."""
        message = native.get("message") if isinstance(native, dict) else None
        if not isinstance(message, dict):
            raise UpstreamError(502, "cohere answered without a message")
        finish = _cohere_finish(native.get("finish_reason"))
        items = [c for c in message.get("content") or () if isinstance(c, dict)]
        text = (message.get("tool_plan") or "") + "".join(c.get("text", "") for c in items if c.get("type") == "text")
        result: dict[str, Any] = {"role": "assistant", "content": text or None}
        thinking = "".join(c.get("thinking", "") for c in items if c.get("type") == "thinking")
        if thinking:
            result["reasoning_content"] = thinking
        if message.get("tool_calls"):
            result["tool_calls"] = [_openai_tool_call(c) for c in message["tool_calls"]]
        return build_completion(model, 0, result, finish, _cohere_usage(native.get("usage")),
                                native.get("id") or None)

    async def parse_stream(
        self, events: AsyncIterator[SSEEvent], model: str, *, include_usage: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Cohere v2 "Chat with Streaming" events, each JSON with a `type`, to OpenAI chunks."""
        chunks, tool_index = ChunkStream(model), {}
        async for event in events:
            if event.data == "[DONE]":
                continue
            data = _load_event(event)
            kind, delta = data.get("type"), data.get("delta") or {}
            if kind == "message-start":
                chunks.id = str(data.get("id") or chunks.id)
            if kind == "message-end":
                finish = _cohere_finish(delta.get("finish_reason"), delta.get("error"))
                for chunk in chunks.tail(finish, _cohere_usage(delta.get("usage")), include_usage):
                    yield chunk
                return
            converted = _COHERE_DELTAS.get(kind, _no_delta)(data, tool_index)
            if converted or not chunks.started:
                yield chunks.delta(converted or {"content": ""})
        raise UpstreamError(502, "cohere stream ended before message-end")

    def parse_models(self, native: Any) -> list[str]:
        return _model_names(native, "models")  # "List Models": {"models": [{"name": ...}]}


def _no_delta(data: Mapping[str, Any], tool_index: dict[int, int]) -> dict[str, Any] | None:
    return None


def _cohere_content_delta(data: Mapping[str, Any], tool_index: dict[int, int]) -> dict[str, Any] | None:
    """content-start/content-delta: text, or a reasoning model's thinking, as reasoning_content."""
    content = ((data.get("delta") or {}).get("message") or {}).get("content") or {}
    if content.get("thinking"):
        return {"reasoning_content": content["thinking"]}
    return {"content": content["text"]} if content.get("text") else None


def _cohere_plan_delta(data: Mapping[str, Any], tool_index: dict[int, int]) -> dict[str, Any] | None:
    plan = ((data.get("delta") or {}).get("message") or {}).get("tool_plan")
    return {"content": plan} if plan else None


def _cohere_call_start(data: Mapping[str, Any], tool_index: dict[int, int]) -> dict[str, Any] | None:
    """tool-call-start: parallel calls each get the next OpenAI index, whatever Cohere's `index` says."""
    call = ((data.get("delta") or {}).get("message") or {}).get("tool_calls") or {}
    tool_index[data.get("index", len(tool_index))] = index = len(tool_index)
    return {"tool_calls": [{"index": index, **_openai_tool_call(call)}]}


def _cohere_call_delta(data: Mapping[str, Any], tool_index: dict[int, int]) -> dict[str, Any] | None:
    call = ((data.get("delta") or {}).get("message") or {}).get("tool_calls") or {}
    arguments = (call.get("function") or {}).get("arguments")
    index = tool_index.get(data.get("index", len(tool_index) - 1), len(tool_index) - 1)
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]} if arguments else None


# "Chat with Streaming" event types that carry a delta; the others (content-end, tool-call-end,
# citation-start/-end) carry nothing an OpenAI chunk has.
_COHERE_DELTAS: Final[Mapping[str, Callable[[Mapping[str, Any], dict[int, int]], dict[str, Any] | None]]] = (
    MappingProxyType({"content-start": _cohere_content_delta, "content-delta": _cohere_content_delta,
                      "tool-plan-delta": _cohere_plan_delta, "tool-call-start": _cohere_call_start,
                      "tool-call-delta": _cohere_call_delta})
)


# Workers AI text generation input ("Messages" schema of each model page): the fields forwarded when present.
_CLOUDFLARE_FIELDS: Final = (
    "stream", "max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty",
    "presence_penalty", "tools", "tool_choice", "parallel_tool_calls", "reasoning_effort", "stop",
)
_CLOUDFLARE_FINISH: Final = frozenset({"stop", "length", "tool_calls", "content_filter"})


def _to_cloudflare_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Older models take `content` as a string only, so text parts are joined; image parts (vision models)
    keep the list form, with data: URIs (the gateway inlines http images first)."""
    content = message.get("content")
    native = {k: v for k, v in message.items() if k in ("role", "tool_calls", "tool_call_id", "name")}
    kinds = {p.get("type") for p in content if isinstance(p, Mapping)} if isinstance(content, list) else set()
    if kinds - {"text", "image_url"}:
        raise UpstreamError(400, f"workers ai does not accept content parts {sorted(kinds - {'text', 'image_url'})}")
    native["content"] = content if "image_url" in kinds else _text_of(content)
    return native


def _cloudflare_response_format(value: Any) -> dict[str, Any]:
    """"JSON Mode": json_schema carries the bare JSON Schema, not OpenAI's {name, schema} wrapper."""
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "json_schema":
        return {"response_format": {"type": kind, "json_schema": (value.get("json_schema") or {}).get("schema", {})}}
    return {"response_format": {"type": kind}} if kind == "json_object" else {}


def _cloudflare_usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, Mapping) or "prompt_tokens" not in usage:
        return None
    return build_usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)


def _cloudflare_message(errors: Any) -> str | None:
    """The REST envelope's `errors: [{code, message}]`."""
    found = [f"{e.get('message')} (code {e.get('code')})" for e in errors or () if isinstance(e, Mapping)]
    return "; ".join(found) or None


def _cloudflare_result(native: Any) -> dict[str, Any]:
    """The `result` of the REST envelope {result, success, errors, messages}."""
    if not isinstance(native, dict) or native.get("success") is False or not isinstance(native.get("result"), dict):
        errors = native.get("errors") if isinstance(native, dict) else None
        raise UpstreamError(502, _cloudflare_message(errors) or "workers ai answered without a result", retryable=True)
    return native["result"]


def _complete_openai_shape(completion: dict[str, Any], model: str) -> dict[str, Any]:
    """A newer model's chat.completion with the fields OpenAI always sends (refusal, logprobs) filled in."""
    completion["model"] = model
    for index, choice in enumerate(completion["choices"]):
        choice.setdefault("index", index)
        choice.setdefault("logprobs", None)
        message = choice.setdefault("message", {})
        message.update({k: message.get(k) for k in ("content", "refusal")}, role="assistant")
        if not message.get("tool_calls"):
            message.pop("tool_calls", None)
    return completion


def _cloudflare_delta(data: Mapping[str, Any], tools: list[int]) -> tuple[dict[str, Any], str | None]:
    """One stream event as (delta, finish): `{"response", "tool_calls", "usage"}`, or an OpenAI chunk.
    `tools` collects the indexes given so far, so parallel calls spread over events stay distinct."""
    choices = data.get("choices")
    if isinstance(choices, list):
        choice = choices[0] if choices else {}
        passed = {k: v for k, v in (choice.get("delta") or {}).items() if k != "role" and v is not None}
        return passed, choice.get("finish_reason")
    delta: dict[str, Any] = {"content": data["response"]} if data.get("response") else {}
    calls = [{"index": len(tools) + i, **_openai_tool_call(c)} for i, c in enumerate(data.get("tool_calls") or ())]
    tools.extend(call["index"] for call in calls)
    return ({**delta, "tool_calls": calls} if calls else delta), data.get("finish_reason")


class CloudflareAdapter(Adapter):
    """Workers AI REST API, "Execute AI model": POST {root}/client/v4/accounts/{cf_account_id}/ai/run/{model}."""

    engine = "cloudflare"
    endpoints = frozenset({"chat", "embeddings", "models"})
    default_base_url = "https://api.cloudflare.com"
    inline_images = True  # vision models take data: URIs only ("HTTP URL will not be accepted")
    requires = ("cf_account_id",)

    def url(self, endpoint: Endpoint, body: Mapping[str, Any], target: Target) -> str:
        account = target.provider.extra["cf_account_id"]
        root = target.provider.base_url.rstrip("/").split("/client/v4")[0] + f"/client/v4/accounts/{account}/ai"
        if endpoint == "models":  # "Model Search"
            return root + "/models/search?task=Text%20Generation&per_page=100"
        return f"{root}/run/{target.upstream_model}"  # "@cf/meta/..." keeps its slashes, as the docs show

    def payload(self, body: Mapping[str, Any], target: Target) -> dict[str, Any]:
        payload = {name: body[name] for name in _CLOUDFLARE_FIELDS if body.get(name) is not None}
        if body.get("max_completion_tokens") is not None:
            payload["max_tokens"] = body["max_completion_tokens"]
        payload["messages"] = [_to_cloudflare_message(m) for m in body["messages"]]
        payload.update(_cloudflare_response_format(body.get("response_format")))
        if not target.provider.tools:
            for name in _TOOL_FIELDS:
                payload.pop(name, None)
        return self.apply_overrides(payload, target)

    def parse_response(self, native: Any, model: str) -> dict[str, Any]:
        result = _cloudflare_result(native)
        if isinstance(result.get("choices"), list):  # newer models answer an OpenAI chat.completion
            return _complete_openai_shape(result, model)
        text = result.get("response")
        message: dict[str, Any] = {"role": "assistant", "content": _json_text(text) if text else None}
        calls = [_openai_tool_call(c) for c in result.get("tool_calls") or ()]
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else "stop"
        return build_completion(model, 0, message, finish, _cloudflare_usage(result.get("usage")))

    async def parse_stream(
        self, events: AsyncIterator[SSEEvent], model: str, *, include_usage: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """SSE `data: {"response": "...", "p": "..."}` ... `data: {"response": "", "usage": {...}}`, [DONE]."""
        chunks, tools = ChunkStream(model), []
        usage, finish, done = None, None, False
        async for event in events:
            if event.data == "[DONE]":
                done = True
                break
            data = _load_event(event)
            if data.get("errors") and not data.get("response"):
                raise UpstreamError(502, _cloudflare_message(data["errors"]) or "workers ai stream error")
            delta, event_finish = _cloudflare_delta(data, tools)
            finish = event_finish or finish
            usage = _cloudflare_usage(data.get("usage")) or usage
            if delta or not chunks.started:
                yield chunks.delta(delta or {"content": ""})
        if not done and finish is None:
            raise UpstreamError(502, "workers ai stream ended before [DONE]")
        finish = finish if finish in _CLOUDFLARE_FINISH else "tool_calls" if tools else "stop"
        for chunk in chunks.tail(finish, usage, include_usage):
            yield chunk

    def build_endpoint_request(
        self, endpoint: Endpoint, body: Mapping[str, Any] | None, target: Target, form: tuple | None = None
    ) -> UpstreamRequest:
        """Embeddings through the bge models: `{"text": [...]}` ("Text Embeddings" model schema)."""
        if endpoint != "embeddings" or body is None:
            return super().build_endpoint_request(endpoint, body, target, form)
        text = body.get("input")
        payload = self.apply_overrides({"text": [text] if isinstance(text, str) else list(text or ())}, target)
        return UpstreamRequest("POST", self.url(endpoint, body, target), self.headers(target), json=payload)

    def parse_endpoint_response(self, endpoint: Endpoint, native: Any, model: str) -> Any:
        """`result: {shape, data: [[float]]}` to an OpenAI embedding list; Workers AI reports no token usage."""
        if endpoint != "embeddings":
            return super().parse_endpoint_response(endpoint, native, model)
        vectors = _cloudflare_result(native).get("data") or []
        return {"object": "list", "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0},
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}

    def parse_models(self, native: Any) -> list[str]:
        return _model_names(native, "result")  # "Model Search": {"result": [{"name": ...}]}

    def parse_error(self, status: int, body: bytes, retry_after: float | None = None) -> UpstreamError:
        try:
            envelope = loads(body)
        except (JSONDecodeError, ValueError):
            envelope = None
        message = _cloudflare_message(envelope.get("errors")) if isinstance(envelope, dict) else None
        return UpstreamError(status, message, retry_after=retry_after) if message else super().parse_error(
            status, body, retry_after)


def _is_cohere(url: SplitResult, model: str) -> bool:
    """Cohere's own hosts or a v2 chat path; its OpenAI-compatible path (/compatibility/...) stays gpt."""
    path = url.path.rstrip("/")
    own_host = url.hostname in ("api.cohere.com", "api.cohere.ai")
    return not path.endswith(_CHAT_SUFFIX) and (own_host or path.endswith("/v2/chat"))


def _is_cloudflare(url: SplitResult, model: str) -> bool:
    """The Workers AI REST root; its OpenAI-compatible /ai/v1/chat/completions stays gpt."""
    return url.hostname == "api.cloudflare.com" and not url.path.rstrip("/").endswith(_CHAT_SUFFIX)


# --- OpenAI Responses (engine "responses") ---
# A provider that speaks only OpenAI's Responses API (base_url `.../v1/responses`, e.g. gpt-5-pro and the *-codex
# models) serves chat and Messages clients too: chat requests become Responses requests and answers come back as
# chat completions. OpenAI API reference, "Responses": "Create a model response" (request body), "The response
# object", "Streaming events"; "Migrate to the Responses API" (the field-by-field table from Chat Completions).

_RESPONSES_SUFFIX: Final = "/responses"
# Chat fields that keep their name and meaning in a Responses request ("Create a model response").
_RESPONSES_SAME_FIELDS: Final = ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier",
                                 "prompt_cache_key", "prompt_cache_retention", "service_tier", "metadata")
# Chat fields the Responses API has no counterpart for: each changes the answer, so a set one is refused (and the
# next channel tried) rather than dropped. A value in the second place is the harmless one that is ignored.
_RESPONSES_REFUSED: Final[Mapping[str, Any]] = MappingProxyType(
    {"stop": None, "n": 1, "logit_bias": None, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
     "audio": None, "prediction": None, "functions": None, "function_call": None, "web_search_options": None}
)
# "The response object": incomplete_details.reason -> chat finish_reason.
_RESPONSES_INCOMPLETE: Final[Mapping[str, str]] = MappingProxyType(
    {"max_output_tokens": "length", "content_filter": "content_filter"}
)
# ResponseErrorCode (response.failed) and the `error` event's code -> HTTP status; unknown codes are 502.
_RESPONSES_ERROR_STATUS: Final[Mapping[str, int]] = MappingProxyType(
    {"rate_limit_exceeded": 429, "insufficient_quota": 429, "server_error": 502, "vector_store_timeout": 504,
     "context_length_exceeded": 400, "invalid_prompt": 400, "bio_policy": 400, "data_residency_mismatch": 400,
     **dict.fromkeys(("invalid_image", "invalid_image_format", "invalid_base64_image", "invalid_image_url",
                      "image_too_large", "image_too_small", "image_parse_error", "image_content_policy_violation",
                      "invalid_image_mode", "image_file_too_large", "unsupported_image_media_type",
                      "empty_image_file", "failed_to_download_image", "image_file_not_found"), 400)}
)


def _responses_image(part: Mapping[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    image = image if isinstance(image, Mapping) else {"url": image}
    return {"type": "input_image", "image_url": image.get("url"), "detail": image.get("detail") or "auto"}


def _responses_file(part: Mapping[str, Any]) -> dict[str, Any]:
    file = part.get("file") if isinstance(part.get("file"), Mapping) else {}
    return {"type": "input_file", **{k: file[k] for k in ("file_id", "file_data", "filename") if file.get(k)}}


# Chat content part type -> Responses input content part (InputContent: input_text, input_image, input_file).
_RESPONSES_PARTS: Final[Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = MappingProxyType({
    "text": lambda part: {"type": "input_text", "text": part.get("text") or ""},
    "image_url": _responses_image,
    "file": _responses_file,
})


def _responses_part(part: Mapping[str, Any]) -> dict[str, Any]:
    convert = _RESPONSES_PARTS.get(part.get("type"))
    if convert is None:  # Responses inputs take no audio
        raise UpstreamError(400, f"the Responses API does not accept '{part.get('type')}' content", retryable=True)
    return convert(part)


def _responses_content(content: Any) -> str | list[dict[str, Any]]:
    if isinstance(content, list):
        return [_responses_part(part) for part in content if isinstance(part, Mapping)]
    return content if isinstance(content, str) else ""


def _responses_message(message: Mapping[str, Any], custom: set[str]) -> list[dict[str, Any]]:
    """user, system and developer messages: one `message` item (EasyInputMessage)."""
    return [{"type": "message", "role": message["role"], "content": _responses_content(message.get("content"))}]


def _responses_assistant(message: Mapping[str, Any], custom: set[str]) -> list[dict[str, Any]]:
    """The assistant's text as a message item, then each tool call as a function_call (or custom_tool_call) item."""
    text = _text_of(message.get("content"))
    items: list[dict[str, Any]] = [{"type": "message", "role": "assistant", "content": text}] if text else []
    for call in message.get("tool_calls") or ():
        if call.get("type") == "custom":
            custom.add(call.get("id") or "")
            tool = call.get("custom") or {}
            items.append({"type": "custom_tool_call", "call_id": call.get("id"), "name": tool.get("name"),
                          "input": tool.get("input") or ""})
        else:
            function = call.get("function") or {}
            items.append({"type": "function_call", "call_id": call.get("id"), "name": function.get("name"),
                          "arguments": _json_text(function.get("arguments"))})
    return items


def _responses_tool_output(message: Mapping[str, Any], custom: set[str]) -> list[dict[str, Any]]:
    """A tool result: function_call_output (FunctionCallOutputItemParam: a string or input parts)."""
    call_id = message.get("tool_call_id")
    kind = "custom_tool_call_output" if call_id in custom else "function_call_output"
    return [{"type": kind, "call_id": call_id, "output": _responses_content(message.get("content"))}]


_RESPONSES_TURNS: Final[Mapping[str, Callable[[Mapping[str, Any], set[str]], list[dict[str, Any]]]]] = (
    MappingProxyType({"system": _responses_message, "developer": _responses_message, "user": _responses_message,
                      "assistant": _responses_assistant, "tool": _responses_tool_output})
)


def to_responses_input(messages: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """(instructions, input items): the system and developer messages that open the conversation become
    `instructions`; later ones stay in place as items with their role."""
    messages = [m for m in messages or () if isinstance(m, Mapping)]
    leading = 0
    while leading < len(messages) and messages[leading].get("role") in ("system", "developer"):
        leading += 1
    instructions = "\n\n".join(_text_of(m.get("content")) for m in messages[:leading]) or None
    custom: set[str] = set()
    items: list[dict[str, Any]] = []
    for message in messages[leading:]:
        turn = _RESPONSES_TURNS.get(message.get("role"))
        if turn is None:
            raise UpstreamError(400, f"the Responses API does not accept messages with role '{message.get('role')}'")
        items.extend(turn(message, custom))
    return instructions, items


def _responses_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """FunctionTool is flat, and strict unless told otherwise: a chat tool is strict only when it says so."""
    if tool.get("type") == "custom":
        custom = tool.get("custom") or {}
        return {"type": "custom", **{k: custom[k] for k in ("name", "description", "format") if k in custom}}
    if tool.get("type") != "function":
        return dict(tool)  # a hosted tool (web_search, ...) a Responses upstream may know
    function = tool.get("function") or {}
    converted = {"type": "function", "name": function.get("name"),
                 "parameters": function.get("parameters") or {"type": "object", "properties": {}},
                 "strict": bool(function.get("strict"))}
    if function.get("description"):
        converted["description"] = function["description"]
    return converted


def _responses_named(tool: Mapping[str, Any]) -> dict[str, Any]:
    """`{"type": "function", "function": {"name"}}` (or custom) as the flat `{"type", "name"}` of ToolChoiceFunction."""
    kind = tool.get("type") or "function"
    return {"type": kind, "name": (tool.get(kind) or {}).get("name")}


def _responses_tool_choice(choice: Any) -> Any:
    if not isinstance(choice, Mapping):
        return choice  # "none" | "auto" | "required" mean the same in both APIs
    if choice.get("type") == "allowed_tools":  # ToolChoiceAllowed
        allowed = choice.get("allowed_tools") or {}
        return {"type": "allowed_tools", "mode": allowed.get("mode") or "auto",
                "tools": [_responses_named(tool) for tool in allowed.get("tools") or ()]}
    return _responses_named(choice)


def _responses_text(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """response_format -> text.format (TextResponseFormatConfiguration: json_schema is flat); verbosity likewise."""
    text: dict[str, Any] = {}
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping):
        schema = response_format.get("json_schema") if response_format.get("type") == "json_schema" else None
        text["format"] = {"type": response_format.get("type"), **(schema or {})}
    if body.get("verbosity") is not None:
        text["verbosity"] = body["verbosity"]
    return text or None


def _check_responses_fields(body: Mapping[str, Any]) -> None:
    for name, harmless in _RESPONSES_REFUSED.items():
        value = body.get(name)
        if value is not None and value != harmless and value != []:
            raise UpstreamError(400, f"the Responses API has no '{name}' parameter", retryable=True)
    if "audio" in (body.get("modalities") or ()):
        raise UpstreamError(400, "the Responses API does not answer with audio", retryable=True)


def to_responses_request(body: Mapping[str, Any], tools: bool = True) -> dict[str, Any]:
    """An OpenAI chat request as a Responses request ("Migrate to the Responses API": messages -> input, system
    -> instructions, max_completion_tokens -> max_output_tokens, response_format -> text.format,
    reasoning_effort -> reasoning.effort). Like chat, nothing is stored unless the client asked for `store`."""
    _check_responses_fields(body)
    instructions, items = to_responses_input(body.get("messages"))
    request: dict[str, Any] = {"input": items, "store": bool(body.get("store"))}
    if instructions is not None:
        request["instructions"] = instructions
    request.update((name, body[name]) for name in _RESPONSES_SAME_FIELDS if body.get(name) is not None)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        request["max_output_tokens"] = limit
    reasoning = dict(body["reasoning"]) if isinstance(body.get("reasoning"), Mapping) else {}
    if body.get("reasoning_effort") is not None:
        reasoning["effort"] = body["reasoning_effort"]
    if reasoning:
        request["reasoning"] = reasoning
    text = _responses_text(body)
    if text:
        request["text"] = text
    if tools and body.get("tools"):
        request["tools"] = [_responses_tool(tool) for tool in body["tools"] if isinstance(tool, Mapping)]
    if tools and body.get("tool_choice") is not None:
        request["tool_choice"] = _responses_tool_choice(body["tool_choice"])
    if not tools:
        request.pop("parallel_tool_calls", None)
    if body.get("stream"):
        request["stream"] = True
    return request


def responses_error(error: Any, fallback: str = "the upstream response failed") -> UpstreamError:
    """A failed response's `error` ({code, message}) or an `error` stream event, as an UpstreamError."""
    error = error if isinstance(error, Mapping) else {}
    code = error.get("code")
    status = _RESPONSES_ERROR_STATUS.get(code, 502) if isinstance(code, str) else 502
    message = error.get("message") or fallback
    return UpstreamError(status, f"{code}: {message}" if code else str(message))


def _from_responses_call(item: Mapping[str, Any]) -> dict[str, Any]:
    if item.get("type") == "custom_tool_call":
        return {"id": item.get("call_id"), "type": "custom",
                "custom": {"name": item.get("name"), "input": item.get("input") or ""}}
    return {"id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": _json_text(item.get("arguments"))}}


def _reasoning_text(item: Mapping[str, Any]) -> str:
    """A reasoning item's readable text: its summary parts, else its reasoning_text content."""
    parts = item.get("summary") or item.get("content") or ()
    return "\n\n".join(str(part.get("text") or "") for part in parts if isinstance(part, Mapping))


def _citation(annotation: Mapping[str, Any]) -> dict[str, Any]:
    fields = ("start_index", "end_index", "url", "title")
    return {"type": "url_citation", "url_citation": {k: annotation.get(k) for k in fields}}


def _from_responses_output(output: list[Any]) -> dict[str, Any]:
    """The output items (OutputItem) as one chat message: text, refusal, reasoning, citations and tool calls."""
    items = [item for item in output if isinstance(item, Mapping)]
    parts = [part for item in items if item.get("type") == "message"
             for part in item.get("content") or () if isinstance(part, Mapping)]
    text = "".join(str(p.get("text") or "") for p in parts if p.get("type") == "output_text")
    refusal = "".join(str(p.get("refusal") or "") for p in parts if p.get("type") == "refusal")
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": refusal or None}
    reasoning = "\n\n".join(_reasoning_text(item) for item in items if item.get("type") == "reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    citations = [_citation(a) for p in parts for a in p.get("annotations") or ()
                 if isinstance(a, Mapping) and a.get("type") == "url_citation"]
    if citations:
        message["annotations"] = citations
    calls = [_from_responses_call(item) for item in items if item.get("type") in ("function_call", "custom_tool_call")]
    if calls:
        message["tool_calls"] = calls
    return message


def _responses_finish(response: Mapping[str, Any], called: bool) -> str:
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return _RESPONSES_INCOMPLETE.get(reason, "length")
    return "tool_calls" if called else "stop"


@dataclass(slots=True)
class _ResponsesChunks:
    """One Responses stream being converted: output items -> tool-call indexes, arguments sent so far."""

    chunks: ChunkStream
    tools: dict[str, int] = field(default_factory=dict)  # item id (or output index) -> chat tool_calls index
    sent: dict[str, str] = field(default_factory=dict)  # item id -> arguments (or input) streamed so far
    final: Mapping[str, Any] | None = None  # the response of the terminal event

    def _key(self, event: Mapping[str, Any]) -> str:
        item = event.get("item")
        return str((item or {}).get("id") or event.get("output_index")) if item else str(
            event.get("item_id") or event.get("output_index"))

    def on_item_added(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        item = event.get("item") or {}
        if item.get("type") not in ("function_call", "custom_tool_call"):
            return None
        key = self._key(event)
        index = self.tools[key] = len(self.tools)
        call = {"index": index, **_from_responses_call(item)}
        field_name = "input" if item.get("type") == "custom_tool_call" else "arguments"
        self.sent[key] = str(item.get(field_name) or "")
        (call.get("function") or call.get("custom") or {})[field_name] = self.sent[key]
        return {"tool_calls": [call]}

    def on_arguments(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        key = self._key(event)
        if key not in self.tools or not event.get("delta"):
            return None
        self.sent[key] += event["delta"]
        return {"tool_calls": [{"index": self.tools[key], "function": {"arguments": event["delta"]}}]}

    def on_custom_input(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        key = self._key(event)
        if key not in self.tools or not event.get("delta"):
            return None
        self.sent[key] += event["delta"]
        return {"tool_calls": [{"index": self.tools[key], "type": "custom", "custom": {"input": event["delta"]}}]}

    def on_item_done(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        """Some upstreams give a call's arguments only whole, in output_item.done: send what the deltas missed."""
        item, key = event.get("item") or {}, self._key(event)
        if key not in self.tools:
            return None
        custom = item.get("type") == "custom_tool_call"
        whole = str(item.get("input" if custom else "arguments") or "")
        rest = whole[len(self.sent[key]):] if whole.startswith(self.sent[key]) else ""
        self.sent[key] = whole
        if not rest:
            return None
        body = {"type": "custom", "custom": {"input": rest}} if custom else {"function": {"arguments": rest}}
        return {"tool_calls": [{"index": self.tools[key], **body}]}

    def on_summary_part(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        # Summary parts read as paragraphs, as the non-stream answer joins them.
        return {"reasoning_content": "\n\n"} if event.get("summary_index") else None

    def on_end(self, event: Mapping[str, Any]) -> None:
        self.final = event.get("response") or {}

    def on_failed(self, event: Mapping[str, Any]) -> None:
        raise responses_error((event.get("response") or {}).get("error"))

    def on_error(self, event: Mapping[str, Any]) -> None:
        raise responses_error(event, "the upstream stream failed")


def _delta_of(name: str) -> Callable[[_ResponsesChunks, Mapping[str, Any]], dict[str, Any] | None]:
    return lambda state, event: {name: event["delta"]} if event.get("delta") else None


# "Streaming events": the ones that carry something a chat chunk has; the rest (content_part.*, *.done,
# in_progress, annotation_added, hosted tools' progress) carry nothing new for it.
_RESPONSES_STREAM_HANDLERS: Final[
    Mapping[str, Callable[[_ResponsesChunks, Mapping[str, Any]], dict[str, Any] | None]]
] = MappingProxyType({
    "response.output_item.added": _ResponsesChunks.on_item_added,
    "response.output_item.done": _ResponsesChunks.on_item_done,
    "response.output_text.delta": _delta_of("content"),
    "response.refusal.delta": _delta_of("refusal"),
    "response.reasoning_summary_part.added": _ResponsesChunks.on_summary_part,
    "response.reasoning_summary_text.delta": _delta_of("reasoning_content"),
    "response.reasoning_text.delta": _delta_of("reasoning_content"),
    "response.function_call_arguments.delta": _ResponsesChunks.on_arguments,
    "response.custom_tool_call_input.delta": _ResponsesChunks.on_custom_input,
    "response.completed": _ResponsesChunks.on_end,
    "response.incomplete": _ResponsesChunks.on_end,
    "response.failed": _ResponsesChunks.on_failed,
    "error": _ResponsesChunks.on_error,
})


# "Responses": the answer itself, and "Compact a response" (POST /responses/compact), which only this engine serves.
_RESPONSES_PATHS: Final[Mapping[str, str]] = MappingProxyType(
    {"chat": _RESPONSES_SUFFIX, "compact": _RESPONSES_SUFFIX + "/compact"})


class ResponsesAdapter(Adapter):
    """OpenAI's Responses API as an upstream: chat in, Responses out, and the answer back as chat.
    Its other endpoints (embeddings, models, ...) sit next to /responses, as gpt's sit next to /chat/completions."""

    engine = "responses"
    endpoints = frozenset({*_OPENAI_PATHS, "compact"})

    def url(self, endpoint: Endpoint, body: Mapping[str, Any], target: Target) -> str:
        base = target.provider.base_url.rstrip("/").removesuffix(_RESPONSES_SUFFIX).removesuffix(_CHAT_SUFFIX)
        return base + (_RESPONSES_PATHS.get(endpoint) or _OPENAI_PATHS[endpoint])

    def payload(self, body: Mapping[str, Any], target: Target) -> dict[str, Any]:
        request = {"model": target.upstream_model, **to_responses_request(body, target.provider.tools)}
        return self.apply_overrides(request, target)

    def parse_response(self, native: Any, model: str) -> dict[str, Any]:
        if not isinstance(native, dict) or not isinstance(native.get("output"), list):
            if isinstance(native, dict) and isinstance(native.get("error"), Mapping):
                raise responses_error(native["error"])
            raise UpstreamError(502, "upstream answered without output")
        if native.get("status") not in ("completed", "incomplete"):
            raise responses_error(native.get("error"), f"the upstream response is {native.get('status')}")
        message = _from_responses_output(native["output"])
        finish = _responses_finish(native, bool(message.get("tool_calls")))
        stamp = native.get("created_at")  # 0 (none given) is stamped by the gateway
        created = int(stamp) if isinstance(stamp, (int, float)) else 0
        return build_completion(model, created, message, finish, from_responses_usage(native.get("usage")))

    async def parse_stream(
        self, events: AsyncIterator[SSEEvent], model: str, *, include_usage: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Events until the terminal one (response.completed or .incomplete); response.failed and `error`
        raise, so a failure before the first chunk moves on to the next channel. Chunks leave `created` 0 for the
        gateway to stamp, as every converted stream's do."""
        state = _ResponsesChunks(ChunkStream(model))
        async for event in events:
            data = _load_event(event)
            handler = _RESPONSES_STREAM_HANDLERS.get(data.get("type"))
            delta = handler(state, data) if handler else None
            if delta:
                yield state.chunks.delta(delta)
            if state.final is not None:
                break
        else:
            raise UpstreamError(502, "upstream stream ended before response.completed")
        finish = _responses_finish(state.final, bool(state.tools))
        for chunk in state.chunks.tail(finish, from_responses_usage(state.final.get("usage")), include_usage):
            yield chunk


class ResponsesNativeAdapter(ResponsesAdapter):
    """A Responses request sent to a Responses upstream as it came, but for the model name (and the tools, for a
    provider with `tools: false`); its answer is relayed by the Responses face."""

    def payload(self, body: Mapping[str, Any], target: Target) -> dict[str, Any]:
        stripped = ("tools", "tool_choice", "parallel_tool_calls") if not target.provider.tools else ()
        request = {name: value for name, value in body.items() if name not in stripped}
        return self.apply_overrides({**request, "model": target.upstream_model}, target)


_OTHER_ADAPTERS: Final[tuple[Adapter, ...]] = (CohereAdapter(), CloudflareAdapter())

ADAPTERS: Final[Mapping[str, Adapter]] = MappingProxyType(
    {a.engine: a for a in (*_OPENAI_ADAPTERS, *_CLAUDE_ADAPTERS, *_GOOGLE_ADAPTERS, *_OTHER_ADAPTERS,
                            ResponsesAdapter())}
)

# --- Faces: the client APIs ---
# A face is one API clients speak (OpenAI chat, Anthropic Messages, ...). It checks a request's shape, turns it into
# an OpenAI chat request for the adapters, and renders the answer, the stream and errors back in its own format.
# Engines that speak the face natively (`native`) get the body as sent and their answer is relayed as it came.
# uni_api.py knows faces only through FACES, at the end of the inbound sections.


class RequestError(Exception):
    """A request the face cannot take: answered 400 in the face's error shape; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class FaceStream:
    """OpenAI chat chunks rendered as one face's stream, as framed bytes; one per request."""

    media_type: ClassVar[str] = "text/event-stream"

    def on_chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        raise NotImplementedError

    def end(self) -> list[bytes]:
        """The frames of a normal end (the face's terminal event)."""
        raise NotImplementedError

    def fail(self, message: str, status: int) -> list[bytes]:
        """The frames that end a stream failing after its commit, in the face's error shape."""
        raise NotImplementedError


class NativeStream:
    """A native upstream's events relayed as they came; `usage` (OpenAI-shaped) and `done` are read by the relay."""

    media_type: ClassVar[str] = "text/event-stream"
    usage: dict[str, Any] | None = None
    done: bool = False

    def on_event(self, event: SSEEvent) -> bytes:
        """The event's frame; an error event first in the stream raises UpstreamError, so another channel can try."""
        raise NotImplementedError

    def end(self) -> list[bytes]:
        """Frames after the upstream's last event (a format whose stream needs closing, such as a JSON array)."""
        return []

    def fail(self, message: str, status: int) -> list[bytes]:
        raise NotImplementedError


class Face:
    """A client API. `to_chat` may raise UpstreamError(400, retryable=True) for what only a native engine serves."""

    name: ClassVar[str]
    native: ClassVar[Mapping[str, Adapter]] = MappingProxyType({})
    counters: ClassVar[Mapping[str, Adapter]] = MappingProxyType({})  # engines that count the face's tokens

    def validate(self, body: Mapping[str, Any]) -> str:
        """Shape checks the conversions rely on; returns the model alias or raises RequestError."""
        raise NotImplementedError

    def to_chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def from_chat(self, completion: dict[str, Any], body: Mapping[str, Any], model: str) -> dict[str, Any]:
        raise NotImplementedError

    def stream(self, body: Mapping[str, Any], model: str) -> FaceStream:
        raise NotImplementedError

    def error_body(self, message: str, status: int, type_: str, code: str | None) -> dict[str, Any]:
        return error_body(message, type_, code)

    def is_stream(self, body: Mapping[str, Any]) -> bool:
        return bool(body.get("stream"))

    def user_text(self, body: Mapping[str, Any]) -> str:
        """The text of the last user turn, for moderation: a string content, or its text parts joined."""
        for message in reversed(body.get("messages") or ()):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    return "\n".join(part["text"] for part in content if isinstance(part, dict)
                                     and part.get("type") == "text" and isinstance(part.get("text"), str))
                return content if isinstance(content, str) else ""
        return ""

    def native_answer(self, raw: bytes, model: str) -> tuple[bytes, dict[str, Any] | None]:
        """A native upstream's whole answer as sent to the client, and its usage in OpenAI's shape."""
        raise NotImplementedError

    def native_stream(self, body: Mapping[str, Any], model: str) -> NativeStream:
        raise NotImplementedError

    def estimate_tokens(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The face's token-count answer, estimated, for a model no counting engine serves."""
        raise NotImplementedError


def require_model(body: Mapping[str, Any], default: str | None = None) -> str:
    model = body.get("model", default)
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required and must be a non-empty string.", "model", "invalid_model")
    return model


class _ChatStream(FaceStream):
    def on_chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        return [sse_frame(chunk)]

    def end(self) -> list[bytes]:
        return [SSE_DONE]

    def fail(self, message: str, status: int) -> list[bytes]:
        return [sse_frame(error_body(message, "upstream_error", "stream_interrupted")), SSE_DONE]


_CHAT_STREAM: Final = _ChatStream()  # stateless, so one serves every request


class ChatFace(Face):
    """OpenAI Chat Completions, the gateway's own format: conversions are the identity."""

    name = "chat"

    def validate(self, body: Mapping[str, Any]) -> str:
        model = require_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' is required and must be a non-empty array.", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise RequestError(f"'messages[{i}]' must be an object with a string 'role'.", f"messages[{i}]")
        if not isinstance(body.get("stream", False), bool):
            raise RequestError("'stream' must be a boolean.", "stream")
        if not isinstance(body.get("stream_options") or {}, dict):
            raise RequestError("'stream_options' must be an object.", "stream_options")
        return model

    def to_chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return body  # type: ignore[return-value]  # read only, as every face's chat request is

    def from_chat(self, completion: dict[str, Any], body: Mapping[str, Any], model: str) -> dict[str, Any]:
        return completion

    def stream(self, body: Mapping[str, Any], model: str) -> FaceStream:
        return _CHAT_STREAM


# --- Anthropic Messages inbound ---
# Clients of Anthropic's Messages API (Claude Code, the anthropic SDKs) reach every channel: a channel speaking that
# API gets the body as sent (MESSAGES_PASSTHROUGH); for any other the request becomes an OpenAI chat request and
# the answer an Anthropic message or event stream. Anthropic API reference: "Messages" (request and Message
# shapes), "Streaming Messages" (the event flow), "Handling stop reasons", "Errors", "Token counting".

import re  # noqa: E402  (kept in this section, as the adapter sections do)

# OpenAI finish_reason -> Messages stop_reason: the Claude table read backwards, its first name for each winning.
_MESSAGES_STOP_REASONS: Final[Mapping[str, str]] = MappingProxyType(
    {finish: reason for reason, finish in reversed(_CLAUDE_STOP_REASONS.items())} | {"function_call": "tool_use"}
)
_MESSAGES_TOOL_CHOICES: Final[Mapping[str, str]] = MappingProxyType({v: k for k, v in _CLAUDE_TOOL_CHOICES.items()})
# "Errors": HTTP status -> error.type, the Claude table read backwards; 503 (every channel busy) is overloaded.
_MESSAGES_ERROR_TYPES: Final[Mapping[int, str]] = MappingProxyType(
    {status: kind for kind, status in _CLAUDE_ERROR_STATUS.items()} | {503: "overloaded_error"}
)
# "Streaming Messages": the event types; Bedrock's frames carry no event name, so theirs comes from the data.
_MESSAGES_EVENTS: Final = frozenset({"message_start", "message_delta", "message_stop", "content_block_start",
                                     "content_block_delta", "content_block_stop", "ping", "error"})
_MESSAGES_EMPTY_BLOCKS: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType({
    "thinking": MappingProxyType({"type": "thinking", "thinking": "", "signature": ""}),
    "text": MappingProxyType({"type": "text", "text": ""}),
})
# "Vision": an image costs about width * height / 750 tokens, at most about 1,600; counted as 4 characters each.
_IMAGE_TOKEN_ESTIMATE: Final = 1600
_MODEL_FIELD: Final = re.compile(rb'("model"\s*:\s*)"(?:[^"\\]|\\.)*"')


def messages_error_body(message: str, status: int) -> dict[str, Any]:
    """Anthropic's error shape ("Errors"), its type named for the HTTP status."""
    kind = _MESSAGES_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _media_url(source: Mapping[str, Any]) -> str:
    if source.get("type") == "url":
        return str(source.get("url") or "")
    return f"data:{source.get('media_type')};base64,{source.get('data')}"


def _from_claude_image(block: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": _media_url(block.get("source") or {})}}


def _from_claude_document(block: Mapping[str, Any]) -> dict[str, Any]:
    source = block.get("source") or {}
    if source.get("type") == "text":
        return {"type": "text", "text": str(source.get("data") or "")}
    if source.get("type") != "base64":
        raise UpstreamError(400, "only base64 and text documents convert to other engines", retryable=True)
    return {"type": "file", "file": {"file_data": _media_url(source)}}


_FROM_CLAUDE_PARTS: Final[Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = MappingProxyType({
    "text": lambda block: {"type": "text", "text": str(block.get("text") or "")},
    "image": _from_claude_image,
    "document": _from_claude_document,
})


def _from_claude_part(block: Mapping[str, Any]) -> dict[str, Any]:
    convert = _FROM_CLAUDE_PARTS.get(block.get("type"))
    if convert is None:  # retryable: a channel speaking the Messages API may take it
        raise UpstreamError(400, f"'{block.get('type')}' content converts to no other engine", retryable=True)
    return convert(block)


def _from_claude_tool_result(block: Mapping[str, Any], media: list[dict[str, Any]]) -> dict[str, Any]:
    """A tool message with the result's text; its images go to `media`, since tool messages carry text only."""
    content = block.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else [
        b for b in (content if isinstance(content, list) else ()) if isinstance(b, Mapping)]
    text = "\n".join(str(b.get("text") or "") for b in blocks if b.get("type") == "text")
    media += [_from_claude_part(b) for b in blocks if b.get("type") != "text"]
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}


def _from_claude_user(content: Any) -> list[dict[str, Any]]:
    """tool_result blocks come first as tool messages (OpenAI wants them right after the calls), then the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    parts: list[dict[str, Any]] = []
    messages = [_from_claude_tool_result(b, parts) for b in content if b.get("type") == "tool_result"]
    parts += [_from_claude_part(b) for b in content if b.get("type") != "tool_result"]
    return [*messages, {"role": "user", "content": parts}] if parts else messages


def _from_claude_assistant(content: Any) -> list[dict[str, Any]]:
    """Text and tool_use blocks; thinking blocks stay behind (their signatures mean nothing to other engines)."""
    if isinstance(content, str):
        return [{"role": "assistant", "content": content}]
    text = "".join(str(b.get("text") or "") for b in content if b.get("type") == "text")
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    calls = [_claude_tool_call(b) for b in content if b.get("type") == "tool_use"]
    if calls:
        message["tool_calls"] = calls
    return [message]


def _from_claude_system(system: Any) -> list[dict[str, Any]]:
    if isinstance(system, list):  # text blocks; cache_control has no meaning elsewhere
        system = "\n".join(str(b.get("text") or "") for b in system if b.get("type") == "text")
    return [{"role": "system", "content": system}] if system else []


def _from_claude_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    if "input_schema" not in tool:  # server tools (web_search_..., bash_...) run only on Anthropic's side
        raise UpstreamError(400, f"tool type '{tool.get('type')}' needs a Claude channel", retryable=True)
    function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _add_openai_tools(request: dict[str, Any], body: Mapping[str, Any]) -> None:
    """tools, and "Tool use" tool_choice auto / any / tool / none, disable_parallel_tool_use included."""
    if not body.get("tools"):
        return
    request["tools"] = [_from_claude_tool(tool) for tool in body["tools"]]
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping):
        kind = choice.get("type")
        named = {"type": "function", "function": {"name": choice.get("name")}}
        request["tool_choice"] = named if kind == "tool" else _MESSAGES_TOOL_CHOICES.get(kind, "auto")
        if choice.get("disable_parallel_tool_use"):
            request["parallel_tool_calls"] = False


def _reasoning_effort(body: Mapping[str, Any]) -> str | None:
    """output_config.effort (xhigh and max as OpenAI's highest, high), else an "Extended thinking" budget_tokens as
    the largest effort whose Claude budget it reaches; adaptive thinking alone leaves the target's default."""
    effort = (body.get("output_config") or {}).get("effort")
    if effort:
        return effort if effort in _CLAUDE_THINKING_BUDGETS else "high"
    thinking = body.get("thinking")
    if not isinstance(thinking, Mapping) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens") or 0
    reached = [effort for effort, tokens in _CLAUDE_THINKING_BUDGETS.items() if tokens <= budget]
    return reached[-1] if reached else "low"


def _response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """"Structured outputs": output_config.format {type: json_schema, schema} as OpenAI's response_format."""
    output = (body.get("output_config") or {}).get("format")
    if not isinstance(output, Mapping) or output.get("type") != "json_schema":
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": output.get("schema") or {}}}


def from_messages_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Messages API request as an OpenAI chat request, the model still the client's alias."""
    messages = _from_claude_system(body.get("system"))
    for message in body.get("messages") or ():
        convert = _from_claude_assistant if message.get("role") == "assistant" else _from_claude_user
        messages += convert(message.get("content"))
    request: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    request.update({name: body[name] for name in ("max_tokens", "temperature", "top_p") if body.get(name) is not None})
    if body.get("stop_sequences"):
        request["stop"] = list(body["stop_sequences"])
    _add_openai_tools(request, body)
    effort, response_format = _reasoning_effort(body), _response_format(body)
    if effort:
        request["reasoning_effort"] = effort
    if response_format:
        request["response_format"] = response_format
    if body.get("stream"):  # usage arrives only at the end of an OpenAI stream, and only when asked for
        request.update(stream=True, stream_options={"include_usage": True})
    return request


def to_messages_usage(usage: Any) -> dict[str, Any]:
    """CompletionUsage as Messages usage: input_tokens leaves out the cache reads and writes, counted apart."""
    usage = usage if isinstance(usage, Mapping) else {}
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    return {"input_tokens": max(0, int(usage.get("prompt_tokens") or 0) - cached - written),
            "output_tokens": int(usage.get("completion_tokens") or 0),
            "cache_creation_input_tokens": written, "cache_read_input_tokens": cached}


def _messages_stop(choice: Mapping[str, Any], called: bool, stop_sequences: tuple[str, ...]) -> tuple[str, str | None]:
    """"Handling stop reasons": (stop_reason, stop_sequence). Only some servers name the stop string that matched
    (vLLM `stop_reason`, SGLang `matched_stop`); a plain `stop` after tool calls is a tool_use stop."""
    matched = choice.get("stop_reason") or choice.get("matched_stop")
    if isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    finish = choice.get("finish_reason")
    if called and finish in ("stop", None):
        return "tool_use", None
    return _MESSAGES_STOP_REASONS.get(finish or "", "end_turn"), None


def _thinking_of(message: Mapping[str, Any]) -> Any:
    return message.get("reasoning_content") or message.get("reasoning")  # the latter: OpenRouter's name


def _tool_input(arguments: Any) -> dict[str, Any]:
    try:
        return _claude_tool_input(arguments)
    except UpstreamError:  # a model's malformed arguments: Message.tool_use.input must still be an object
        return {}


def to_messages_response(completion: Mapping[str, Any], model: str,
                         stop_sequences: tuple[str, ...] = ()) -> dict[str, Any]:
    """An OpenAI chat.completion as a Message: thinking, text, then tool_use blocks."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if isinstance(_thinking_of(message), str):
        content.append({"type": "thinking", "thinking": _thinking_of(message), "signature": ""})
    text = message.get("content") or message.get("refusal")
    if text:
        content.append({"type": "text", "text": text if isinstance(text, str) else _text_of(text)})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or new_id("toolu_"), "name": function.get("name"),
                        "input": _tool_input(function.get("arguments"))})
    stop_reason, stop_sequence = _messages_stop(choice, bool(message.get("tool_calls")), stop_sequences)
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": to_messages_usage(completion.get("usage"))}


@dataclass
class _MessagesStream(FaceStream):
    """OpenAI chunks becoming "Streaming Messages" events: message_start, content_block_start / _delta / _stop per
    block (one open at a time, indexes in order), message_delta with stop_reason and usage, message_stop."""

    model: str
    stop_sequences: tuple[str, ...] = ()
    index: int = -1  # the open (or last) block's index
    kind: str | None = None  # "thinking", "text" or "tool_use" while a block is open
    tool: int | None = None  # OpenAI tool_calls index of the open tool_use block
    called: bool = False
    finish: Mapping[str, Any] = field(default_factory=dict)  # the choice that carried finish_reason
    usage: Any = None
    started: bool = False

    def start(self) -> dict[str, Any]:
        message = {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return {"type": "message_start", "message": message}

    def close(self) -> list[dict[str, Any]]:
        if self.kind is None:
            return []
        self.kind = None
        return [{"type": "content_block_stop", "index": self.index}]

    def open(self, kind: str, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.kind, self.index = kind, self.index + 1
        return [*events, {"type": "content_block_start", "index": self.index, "content_block": block}]

    def delta(self, kind: str, delta: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.open(kind, dict(_MESSAGES_EMPTY_BLOCKS[kind])) if self.kind != kind else []
        return [*events, {"type": "content_block_delta", "index": self.index, "delta": delta}]

    def tool_delta(self, call: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A call's first delta (another index) opens its block; OpenAI streams calls one after another."""
        function = call.get("function") or {}
        events: list[dict[str, Any]] = []
        if self.kind != "tool_use" or call.get("index", self.tool) != self.tool:
            block = {"type": "tool_use", "id": call.get("id") or new_id("toolu_"), "name": function.get("name") or "",
                     "input": {}}
            events, self.tool, self.called = self.open("tool_use", block), call.get("index", 0), True
        if function.get("arguments"):
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}})
        return events

    def on_chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        events = [] if self.started else [self.start()]
        self.started = True
        return [event_frame(event) for event in events + self.chunk_events(chunk)]

    def chunk_events(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.usage = chunk.get("usage") or self.usage
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # a Message is one answer
            delta = choice.get("delta") or {}
            if isinstance(_thinking_of(delta), str) and _thinking_of(delta):
                events += self.delta("thinking", {"type": "thinking_delta", "thinking": _thinking_of(delta)})
            if delta.get("content"):
                events += self.delta("text", {"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or ():
                events += self.tool_delta(call)
            self.finish = choice if choice.get("finish_reason") else self.finish
        return events

    def end(self) -> list[bytes]:
        stop_reason, stop_sequence = _messages_stop(self.finish, self.called, self.stop_sequences)
        events = [*self.close(), {"type": "message_delta", "delta": {"stop_reason": stop_reason,
                                                                      "stop_sequence": stop_sequence},
                                  "usage": to_messages_usage(self.usage)}, {"type": "message_stop"}]
        return [event_frame(event) for event in events]

    def fail(self, message: str, status: int) -> list[bytes]:
        """"Errors": an error event may arrive mid-stream; it is the stream's last."""
        return [event_frame(messages_error_body(message, status))]


def messages_frame(name: str, data: bytes) -> bytes:
    """One "Streaming Messages" event; a data value spanning lines keeps one `data:` field per line."""
    return b"event: " + name.encode() + b"\ndata: " + data.replace(b"\n", b"\ndata: ") + b"\n\n"


def event_frame(event: Mapping[str, Any]) -> bytes:
    return messages_frame(str(event["type"]), dumps(event))


def rename_model(raw: bytes, model: str) -> bytes:
    """`raw` JSON with its first "model" value (the Message's own, which precedes its content) set to `model`,
    every other byte as the upstream sent it."""
    return _MODEL_FIELD.sub(lambda match: match.group(1) + dumps(model), raw, count=1)


def messages_event_name(event: SSEEvent) -> str:
    """The event's type: its SSE name, or for Bedrock's unnamed frames the `type` in its data."""
    return event.event if event.event in _MESSAGES_EVENTS else str(_load_event(event).get("type") or "message")


def first_messages_event(event: SSEEvent) -> str:
    """messages_event_name of a stream's first event; an error there fails the attempt, so another channel can try."""
    name = messages_event_name(event)
    if name == "error":
        raise _claude_error(_load_event(event))
    return name


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        if value.get("type") == "base64":
            return _IMAGE_TOKEN_ESTIMATE * 4
        return sum(len(str(key)) + _text_length(item) for key, item in value.items())
    if isinstance(value, list):
        return sum(_text_length(item) for item in value)
    return 0 if value is None else len(str(value))


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """"Token counting" for channels that cannot count: about 4 characters per token over the text of system,
    messages and tools; base64 media count as one full-size image each."""
    chars = _text_length([body.get("system"), body.get("messages"), body.get("tools")])
    return max(1, -(-chars // 4))


class MessagesAdapter(ClaudeAdapter):
    """A Messages API body sent as it came: only the engine's envelope changes (the model, or for Vertex and
    Bedrock anthropic_version in its place). The variants below inherit it."""

    counts_tokens: ClassVar[bool] = True

    def payload(self, body: Mapping[str, Any], target: Target) -> dict[str, Any]:
        stripped = ("model",) if target.provider.tools else ("model", "tools", "tool_choice")
        request = {name: value for name, value in body.items() if name not in stripped}
        return self.apply_overrides(self.envelope(request, target), target)

    def build_count_tokens_request(self, body: Mapping[str, Any], target: Target) -> UpstreamRequest:
        """"Count tokens in a Message": POST /v1/messages/count_tokens with the body and the upstream model."""
        url = _claude_root(target.provider.base_url) + "/messages/count_tokens"
        return UpstreamRequest("POST", url, self.headers(target), json={**body, "model": target.upstream_model})


class VertexMessagesAdapter(MessagesAdapter, VertexClaudeAdapter):
    counts_tokens = False  # and no anthropic-beta: VertexClaudeAdapter.headers leaves Target.betas out


class BedrockMessagesAdapter(MessagesAdapter, BedrockAdapter):
    counts_tokens = False  # Target.betas go in the body, as anthropic_beta (BedrockAdapter.envelope)


MESSAGES_PASSTHROUGH: Final[Mapping[str, MessagesAdapter]] = MappingProxyType(
    {a.engine: a for a in (MessagesAdapter(), VertexMessagesAdapter(), BedrockMessagesAdapter())}
)

# "Messages": the answer's `usage`; "Streaming Messages": message_start's message.usage, then message_delta's
# cumulative counts. The JSON is read only for these events; the relayed bytes stay as the upstream sent them.
_USAGE_PATHS: Final = MappingProxyType({"message": ("usage",), "message_start": ("message", "usage"),
                                        "message_delta": ("usage",)})


def _native_usage(name: str, data: bytes | str) -> Mapping[str, Any] | None:
    path = _USAGE_PATHS.get(name)
    if path is None:
        return None
    try:
        found: Any = loads(data)
        for step in path:
            found = found.get(step)
    except (ValueError, AttributeError, RecursionError):  # not JSON, or not the documented shape: nothing to count
        return None
    return found if isinstance(found, Mapping) else None


@dataclass
class _MessagesNative(NativeStream):
    """A Messages-speaking channel's stream: relayed as sent but for message_start's model; usage noted."""

    model: str
    counts: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    done: bool = False
    first: bool = True

    def on_event(self, event: SSEEvent) -> bytes:
        name = first_messages_event(event) if self.first else messages_event_name(event)
        self.first = False
        found = _native_usage(name, event.data)
        if found is not None:
            self.counts.update((k, v) for k, v in found.items() if v is not None)
            self.usage = claude_usage(self.counts)
        self.done = name in ("message_stop", "error")
        data = event.data.encode()
        return messages_frame(name, rename_model(data, self.model) if name == "message_start" else data)

    def fail(self, message: str, status: int) -> list[bytes]:
        return [event_frame(messages_error_body(message, status))]


def _validate_blocks(body: Mapping[str, Any]) -> None:
    for i, message in enumerate(body["messages"]):
        if message["role"] not in ("user", "assistant") or not _blocks_ok(message.get("content")):
            raise RequestError(f"'messages[{i}]' needs role 'user' or 'assistant' and content that is a string "
                               "or an array of content blocks.", f"messages[{i}]")
    if body.get("system") is not None and not _blocks_ok(body["system"]):
        raise RequestError("'system' must be a string or an array of text blocks.", "system")
    for name in ("tools", "stop_sequences"):
        if not isinstance(body.get(name) or [], list):
            raise RequestError(f"'{name}' must be an array.", name)
    for name in ("tool_choice", "thinking", "output_config"):
        if not isinstance(body.get(name) or {}, dict):
            raise RequestError(f"'{name}' must be an object.", name)


def _blocks_ok(content: Any) -> bool:
    return isinstance(content, str) or (isinstance(content, list) and all(isinstance(b, dict) for b in content))


class MessagesFace(Face):
    """Anthropic's Messages API (Claude Code, the anthropic SDKs); errors in Anthropic's shape."""

    name = "messages"
    native = MESSAGES_PASSTHROUGH
    counters = MappingProxyType({engine: a for engine, a in MESSAGES_PASSTHROUGH.items() if a.counts_tokens})

    def validate(self, body: Mapping[str, Any]) -> str:
        model = _CHAT.validate(body)
        _validate_blocks(body)
        return model

    def to_chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return from_messages_request(body)

    def from_chat(self, completion: dict[str, Any], body: Mapping[str, Any], model: str) -> dict[str, Any]:
        return to_messages_response(completion, model, tuple(body.get("stop_sequences") or ()))

    def stream(self, body: Mapping[str, Any], model: str) -> FaceStream:
        return _MessagesStream(model, tuple(body.get("stop_sequences") or ()))

    def error_body(self, message: str, status: int, type_: str, code: str | None) -> dict[str, Any]:
        return messages_error_body(message, status)

    def native_answer(self, raw: bytes, model: str) -> tuple[bytes, dict[str, Any] | None]:
        found = _native_usage("message", raw)
        return rename_model(raw, model), None if found is None else claude_usage(found)

    def native_stream(self, body: Mapping[str, Any], model: str) -> NativeStream:
        return _MessagesNative(model)

    def estimate_tokens(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return {"input_tokens": estimate_input_tokens(body)}


_CHAT: Final = ChatFace()

# --- OpenAI Responses inbound ---
# Clients of OpenAI's Responses API (Codex CLI, the openai-agents SDK, the AI SDK) reach every channel: input items
# become an OpenAI chat request, the answer a `response` object or its event stream. OpenAI API reference:
# "Responses" (Create a model response, The response object), "Streaming events"; every shape below is the one
# ../shared/openai-openapi names (CreateResponse, Response, OutputItem, Response*Event).

_NUMBER: Final = (int, float)
# CreateResponse: each field's JSON type (null is accepted for every one: the spec makes them nullable).
_RESPONSES_TYPES: Final[Mapping[str, tuple[type, ...]]] = MappingProxyType({
    "model": (str,), "input": (str, list), "instructions": (str,), "tools": (list,), "tool_choice": (str, dict),
    "parallel_tool_calls": (bool,), "max_output_tokens": (int,), "temperature": _NUMBER, "top_p": _NUMBER,
    "reasoning": (dict,), "text": (dict,), "include": (list,), "store": (bool,), "previous_response_id": (str,),
    "metadata": (dict,), "prompt_cache_key": (str,), "prompt_cache_retention": (str,), "service_tier": (str,),
    "user": (str,), "safety_identifier": (str,), "stream": (bool,), "stream_options": (dict,), "truncation": (str,),
    "background": (bool,), "top_logprobs": (int,), "max_tool_calls": (int,), "conversation": (str, dict),
    "prompt": (dict,), "context_management": (list,),
})
_JSON_TYPES: Final[Mapping[type, str]] = MappingProxyType(
    {str: "a string", list: "an array", dict: "an object", bool: "a boolean", int: "an integer", float: "a number"})
# Closed string sets: ToolChoiceOptions, ReasoningEffort, Reasoning.summary, Verbosity, ServiceTierResponses, ...
_RESPONSES_ENUMS: Final[Mapping[str, frozenset[str]]] = MappingProxyType({
    "tool_choice": frozenset({"none", "auto", "required"}),
    "reasoning.effort": frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"}),
    "reasoning.summary": frozenset({"auto", "concise", "detailed"}),
    "text.verbosity": frozenset({"low", "medium", "high"}),
    "text.format.type": frozenset({"text", "json_schema", "json_object"}),
    "service_tier": frozenset({"auto", "default", "flex", "scale", "priority", "fast", "ultrafast"}),
    "truncation": frozenset({"auto", "disabled"}),
    "prompt_cache_retention": frozenset({"in-memory", "in_memory", "24h"}),
})
_RESPONSES_RANGES: Final[Mapping[str, tuple[float, float]]] = MappingProxyType({
    "temperature": (0, 2), "top_p": (0, 1), "max_output_tokens": (16, float("inf")), "top_logprobs": (0, 20)})
_INCLUDABLE: Final = frozenset({
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url", "code_interpreter_call.outputs",
    "reasoning.encrypted_content", "message.output_text.logprobs"})
_INPUT_ROLES: Final = frozenset({"user", "assistant", "system", "developer"})
# Fields that change the answer and that no chat request can carry: refused on converted channels, by test.
_RESPONSES_UNCONVERTIBLE: Final[Mapping[str, Callable[[Any], bool]]] = MappingProxyType({
    "background": lambda value: value is True,
    "conversation": lambda value: value is not None,
    "prompt": lambda value: value is not None,
    "context_management": lambda value: value is not None,
    "truncation": lambda value: value == "auto",
    "top_logprobs": lambda value: bool(value),
    "include": lambda value: "message.output_text.logprobs" in (value or ()),
})
# CreateResponse field -> the chat request field that means the same.
_RESPONSES_TO_CHAT: Final[Mapping[str, str]] = MappingProxyType({
    "max_output_tokens": "max_completion_tokens", "temperature": "temperature", "top_p": "top_p",
    "prompt_cache_key": "prompt_cache_key", "prompt_cache_retention": "prompt_cache_retention",
    "service_tier": "service_tier", "user": "user", "safety_identifier": "safety_identifier"})
# finish_reason -> (Response.status, incomplete_details.reason).
_RESPONSES_FINISH: Final[Mapping[str, tuple[str, str | None]]] = MappingProxyType({
    "length": ("incomplete", "max_output_tokens"), "content_filter": ("incomplete", "content_filter")})
# ResponseErrorCode for a stream failing after its start, by HTTP status (the rest: server_error).
_RESPONSES_FAILURES: Final[Mapping[int, str]] = MappingProxyType({429: "rate_limit_exceeded", 400: "invalid_prompt"})
_RESPONSES_TERMINAL: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Signed reasoning (Claude thinking blocks) rides in a reasoning item's encrypted_content as prefixed base64 JSON;
# a replayed item hands it back as `thinking_blocks`. Another service's encrypted_content means nothing here.
_REASONING_PREFIX: Final = "uni-api.v1:"


def encode_reasoning(blocks: list[dict[str, Any]]) -> str:
    return _REASONING_PREFIX + base64.b64encode(dumps({"thinking_blocks": blocks})).decode()


def decode_reasoning(value: Any) -> list[dict[str, Any]]:
    """The signed blocks an encrypted_content of ours carries; [] for anything else."""
    if not isinstance(value, str) or not value.startswith(_REASONING_PREFIX):
        return []
    try:
        data = loads(base64.b64decode(value[len(_REASONING_PREFIX):], validate=True))
    except (JSONDecodeError, ValueError):
        return []
    blocks = data.get("thinking_blocks") if isinstance(data, dict) else None
    return [block for block in blocks if isinstance(block, dict)] if isinstance(blocks, list) else []


# --- Responses: request checks ---


def _dig(body: Mapping[str, Any], path: str) -> Any:
    value: Any = body
    for name in path.split("."):
        value = value.get(name) if isinstance(value, Mapping) else None
    return value


def _check_type(value: Any, kinds: tuple[type, ...], where: str) -> None:
    if value is None or (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)):
        return
    expected = " or ".join(_JSON_TYPES[kind] for kind in kinds)
    raise RequestError(f"Invalid type for '{where}': expected {expected}.", where, "invalid_type")


def _check_values(body: Mapping[str, Any]) -> None:
    for path, allowed in _RESPONSES_ENUMS.items():
        value = _dig(body, path)
        if value is not None and not isinstance(value, dict) and (not isinstance(value, str) or value not in allowed):
            supported = ", ".join(f"'{name}'" for name in sorted(allowed))
            raise RequestError(f"Invalid value for '{path}': {value!r}. Supported values are: {supported}.", path,
                               "invalid_value")
    for name, (low, high) in _RESPONSES_RANGES.items():
        value = body.get(name)
        if value is not None and not low <= value <= high:
            raise RequestError(f"Invalid '{name}': {value} is outside [{low}, {high}].", name, "invalid_value")
    for value in body.get("include") or ():
        if not isinstance(value, str) or value not in _INCLUDABLE:
            raise RequestError(f"Invalid value for 'include': {value!r}.", "include", "invalid_value")
    for key, value in (body.get("metadata") or {}).items():
        _check_type(value, (str,), f"metadata.{key}")


def _check_message(item: Mapping[str, Any], where: str) -> None:
    if not isinstance(item.get("role"), str) or item["role"] not in _INPUT_ROLES:
        raise RequestError(f"Invalid value for '{where}.role': {item.get('role')!r}.", f"{where}.role", "invalid_value")
    _check_parts(item.get("content"), f"{where}.content")


def _check_parts(content: Any, where: str) -> None:
    """A string, or content parts: objects with a `type`."""
    if not isinstance(content, (str, list)):
        raise RequestError(f"Invalid type for '{where}': expected a string or an array.", where, "invalid_type")
    for j, part in enumerate(content if isinstance(content, list) else ()):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(f"Invalid '{where}[{j}]': expected an object with a 'type'.", f"{where}[{j}]",
                               "invalid_type")


def _check_strings(*names: str) -> Callable[[Mapping[str, Any], str], None]:
    def check(item: Mapping[str, Any], where: str) -> None:
        for name in names:
            if not isinstance(item.get(name), str):
                raise RequestError(f"Missing or invalid '{where}.{name}': expected a string.", f"{where}.{name}",
                                   "invalid_type")
    return check


def _check_output(item: Mapping[str, Any], where: str) -> None:
    _check_strings("call_id")(item, where)
    _check_parts(item.get("output"), f"{where}.output")


# Input item type -> its shape check (EasyInputMessage, FunctionToolCall, FunctionCallOutputItemParam, ReasoningItem).
_INPUT_CHECKS: Final[Mapping[str, Callable[[Mapping[str, Any], str], None]]] = MappingProxyType({
    "message": _check_message, "function_call": _check_strings("call_id", "name", "arguments"),
    "function_call_output": _check_output,
    "reasoning": lambda item, where: _check_type(item.get("encrypted_content"), (str,), f"{where}.encrypted_content"),
})


def _check_items(body: Mapping[str, Any]) -> None:
    items = body.get("input")
    for i, item in enumerate(items if isinstance(items, list) else ()):
        if not isinstance(item, dict):
            raise RequestError(f"Invalid type for 'input[{i}]': expected an object.", f"input[{i}]", "invalid_type")
        _check_type(item.get("type"), (str,), f"input[{i}].type")
        check = _INPUT_CHECKS.get(item.get("type") or ("message" if "role" in item else ""))
        if check is None and not isinstance(item.get("type"), str):
            raise RequestError(f"Missing required parameter: 'input[{i}].type'.", f"input[{i}].type",
                               "missing_required_parameter")
        if check:
            check(item, f"input[{i}]")
    for i, tool in enumerate(body.get("tools") or ()):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise RequestError(f"Invalid 'tools[{i}]': expected an object with a 'type'.", f"tools[{i}]",
                               "invalid_type")
        if tool["type"] == "function":
            _check_strings("name")(tool, f"tools[{i}]")
            _check_type(tool.get("parameters"), (dict,), f"tools[{i}].parameters")


def _check_format(body: Mapping[str, Any]) -> None:
    _check_type(_dig(body, "text.format"), (dict,), "text.format")
    _check_type(_dig(body, "tool_choice.name"), (str,), "tool_choice.name")
    if _dig(body, "text.format.type") == "json_schema":
        _check_strings("name")(body["text"]["format"], "text.format")
        if not isinstance(body["text"]["format"].get("schema"), dict):
            raise RequestError("Missing required parameter: 'text.format.schema'.", "text.format.schema",
                               "missing_required_parameter")


# --- Responses: input items -> chat messages ---


def _chat_image(part: Mapping[str, Any]) -> dict[str, Any]:
    if not part.get("image_url"):  # a file_id names an upload only OpenAI holds
        raise UpstreamError(400, "input_image with a file_id needs a Responses-native upstream", retryable=True)
    image = {"url": part["image_url"], **({"detail": part["detail"]} if part.get("detail") else {})}
    return {"type": "image_url", "image_url": image}


def _chat_file(part: Mapping[str, Any]) -> dict[str, Any]:
    if not part.get("file_data"):  # file_id and file_url name files only OpenAI fetches
        raise UpstreamError(400, "input_file without file_data needs a Responses-native upstream", retryable=True)
    file = {"file_data": part["file_data"], **({"filename": part["filename"]} if part.get("filename") else {})}
    return {"type": "file", "file": file}


# Input content part type (InputContent, OutputMessageContent) -> chat content part.
_CHAT_PARTS: Final[Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = MappingProxyType({
    "input_text": lambda part: {"type": "text", "text": str(part.get("text") or "")},
    "output_text": lambda part: {"type": "text", "text": str(part.get("text") or "")},
    "refusal": lambda part: {"type": "text", "text": str(part.get("refusal") or "")},
    "input_image": _chat_image,
    "input_file": _chat_file,
})


def _chat_parts(content: Any) -> list[dict[str, Any]]:
    parts = []
    for part in content:
        convert = _CHAT_PARTS.get(part.get("type"))
        if convert is None:
            raise UpstreamError(400, f"content type '{part.get('type')}' needs a Responses-native upstream",
                                retryable=True)
        parts.append(convert(part))
    return parts


def _open_assistant(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message the next output item belongs to: the last message if it is one (a turn's reasoning,
    text and calls are one chat message), else a new one."""
    if not messages or messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": None})
    return messages[-1]


def _add_message(item: Mapping[str, Any], messages: list[dict[str, Any]]) -> None:
    content = item.get("content")
    if item.get("role") != "assistant":
        messages.append({"role": item.get("role"), "content": content if isinstance(content, str) else
                         _chat_parts(content)})
        return
    text = content if isinstance(content, str) else _text_of(_chat_parts(content))
    assistant = _open_assistant(messages)
    assistant["content"] = (assistant["content"] or "") + text


def _add_call(item: Mapping[str, Any], messages: list[dict[str, Any]]) -> None:
    call = {"id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
    _open_assistant(messages).setdefault("tool_calls", []).append(call)


def _add_output(item: Mapping[str, Any], messages: list[dict[str, Any]]) -> None:
    """A tool message with the output's text; its images and files follow as a user message (tool messages carry
    text only on most engines)."""
    output = item.get("output")
    parts = [{"type": "input_text", "text": output}] if isinstance(output, str) else output
    converted = _chat_parts(parts)
    text = [part for part in converted if part["type"] == "text"]
    messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text_of(text)})
    if len(text) < len(converted):
        messages.append({"role": "user", "content": [part for part in converted if part["type"] != "text"]})


def _add_reasoning(item: Mapping[str, Any], messages: list[dict[str, Any]]) -> None:
    """Signed thinking goes back to the engine that signed it; unsigned reasoning is no model input (OpenAI drops
    replayed summaries too), so it is left out."""
    blocks = decode_reasoning(item.get("encrypted_content"))
    if blocks:
        _open_assistant(messages).setdefault("thinking_blocks", []).extend(blocks)


_CHAT_ITEMS: Final[Mapping[str, Callable[[Mapping[str, Any], list[dict[str, Any]]], None]]] = MappingProxyType({
    "message": _add_message, "function_call": _add_call, "function_call_output": _add_output,
    "reasoning": _add_reasoning})


def responses_input(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`input` as a list of items (a string is one user message)."""
    value = body.get("input")
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else list(value or ())


def to_chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    instructions = body.get("instructions")  # "a system (or developer) message inserted into the model's context"
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for item in responses_input(body):
        kind = item.get("type") or "message"
        convert = _CHAT_ITEMS.get(kind)
        if convert is None:
            raise UpstreamError(400, f"input item type '{kind}' needs a Responses-native upstream", retryable=True)
        convert(item, messages)
    return [m for m in messages if m["role"] != "assistant" or m["content"] is not None or m.get("tool_calls")]


# --- Responses: request -> chat request ---


def _chat_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":  # hosted tools run on OpenAI's side; custom tools take free text
        raise UpstreamError(400, f"tool type '{tool.get('type')}' needs a Responses-native upstream", retryable=True)
    function = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
    function.update({name: tool[name] for name in ("description", "strict") if tool.get(name) is not None})
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any) -> Any:
    if not isinstance(choice, Mapping):
        return choice
    if choice.get("type") != "function":
        raise UpstreamError(400, f"tool_choice type '{choice.get('type')}' needs a Responses-native upstream",
                            retryable=True)
    return {"type": "function", "function": {"name": choice.get("name")}}


def _chat_response_format(text: Any) -> dict[str, Any] | None:
    """text.format (TextResponseFormatJsonSchema is flat; chat nests it under json_schema)."""
    fmt = text.get("format") if isinstance(text, Mapping) else None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        return None
    schema = {name: fmt[name] for name in ("name", "schema", "description", "strict") if fmt.get(name) is not None}
    return {"type": "json_schema", "json_schema": schema}


def _refuse_unconvertible(body: Mapping[str, Any]) -> None:
    for name, refused in _RESPONSES_UNCONVERTIBLE.items():
        if refused(body.get(name)):
            raise UpstreamError(400, f"'{name}' as sent needs a Responses-native upstream", retryable=True)


def to_chat_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """A CreateResponse body (its previous_response_id already resolved by the gateway) as a chat request."""
    _refuse_unconvertible(body)
    request: dict[str, Any] = {"model": body.get("model"), "messages": to_chat_messages(body)}
    request.update({chat: body[name] for name, chat in _RESPONSES_TO_CHAT.items() if body.get(name) is not None})
    if body.get("tools"):
        request["tools"] = [_chat_tool(tool) for tool in body["tools"]]
        request.update({name: value for name, value in (
            ("tool_choice", _chat_tool_choice(body.get("tool_choice"))),
            ("parallel_tool_calls", body.get("parallel_tool_calls"))) if value is not None})
    effort, response_format = _dig(body, "reasoning.effort"), _chat_response_format(body.get("text"))
    verbosity = _dig(body, "text.verbosity")
    request.update({name: value for name, value in (("reasoning_effort", effort), ("verbosity", verbosity),
                                                      ("response_format", response_format)) if value is not None})
    if body.get("stream"):  # usage arrives only at the end of an OpenAI stream, and only when asked for
        request.update(stream=True, stream_options={"include_usage": True})
    return request


# --- Responses: answers ---


def to_responses_usage(usage: Any) -> dict[str, Any]:
    """CompletionUsage as ResponseUsage; cache writes are Claude's, reported as cache_creation_input_tokens."""
    usage = usage if isinstance(usage, Mapping) else {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}


def from_responses_usage(usage: Any) -> dict[str, Any] | None:
    """ResponseUsage as CompletionUsage, for the gateway's stats."""
    if not isinstance(usage, Mapping):
        return None
    details = usage.get("input_tokens_details") or {}
    converted = build_usage(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0),
                            cached=details.get("cached_tokens"),
                            reasoning=(usage.get("output_tokens_details") or {}).get("reasoning_tokens"))
    if details.get("cache_write_tokens"):
        converted["cache_creation_input_tokens"] = int(details["cache_write_tokens"])
    return converted


def _echo_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A function tool as the Response echoes it (FunctionTool requires strict and parameters, null allowed)."""
    if tool.get("type") != "function":
        return dict(tool)
    return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict")}


def build_response(body: Mapping[str, Any], model: str, response_id: str, created: int, status: str,
                   output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The response object (schema Response) with the request's settings echoed, defaults as OpenAI shows them."""
    text = body.get("text") or {}
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status, "background": False,
        "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "max_tool_calls": body.get("max_tool_calls"),
        "model": model, "output": output, "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"), "safety_identifier": body.get("safety_identifier"),
        "reasoning": {"effort": _dig(body, "reasoning.effort"), "summary": _dig(body, "reasoning.summary")},
        "service_tier": body.get("service_tier") or "default", "store": body.get("store") is not False,
        "temperature": _first_set(body.get("temperature"), 1.0), "top_p": _first_set(body.get("top_p"), 1.0),
        "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"},
        "tool_choice": body.get("tool_choice") or "auto", "tools": [_echo_tool(t) for t in body.get("tools") or ()],
        "top_logprobs": body.get("top_logprobs") or 0, "truncation": body.get("truncation") or "disabled",
        "metadata": body.get("metadata") or {},
        **({"user": body["user"]} if body.get("user") else {}), **extra,  # Response.user is a string, never null
    }


def _first_set(value: Any, default: Any) -> Any:
    return default if value is None else value


def _finished(response: dict[str, Any], finish: Any, usage: Any) -> dict[str, Any]:
    status, reason = _RESPONSES_FINISH.get(finish or "", ("completed", None))
    response.update(status=status, usage=to_responses_usage(usage),
                    incomplete_details={"reason": reason} if reason else None)
    return response


def _reasoning_item(text: str, blocks: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    item: dict[str, Any] = {"id": new_id("rs_"), "type": "reasoning", "summary": []}
    if text:
        item.setdefault(_PARTS[kind].field, []).append({"type": kind, "text": text})
    if blocks:  # "encrypted_content ... populated by default for reasoning items returned by POST /v1/responses"
        item["encrypted_content"] = encode_reasoning(blocks)
    return item


def _reasoning_kind(body: Mapping[str, Any]) -> str:
    """A reasoning summary when the client asked for one (Reasoning.summary), else the reasoning text itself."""
    return "summary_text" if _dig(body, "reasoning.summary") else "reasoning_text"


def from_chat_completion(completion: Mapping[str, Any], body: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A chat.completion as a response: a reasoning item, a message, then one function_call item per call."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    thinking, blocks = _thinking_of(message), message.get("thinking_blocks")
    if thinking or blocks:
        blocks = [b for b in blocks if isinstance(b, dict)] if isinstance(blocks, list) else []
        output.append(_reasoning_item(thinking if isinstance(thinking, str) else "", blocks, _reasoning_kind(body)))
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}
               for text in (_text_of(message.get("content")),) if text]
    content += [{"type": "refusal", "refusal": message["refusal"]}] if message.get("refusal") else []
    if content:
        output.append({"id": new_id("msg_"), "type": "message", "status": "completed", "role": "assistant",
                       "content": content})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        output.append({"id": new_id("fc_"), "type": "function_call", "status": "completed",
                       "call_id": call.get("id") or new_id("call_"), "name": function.get("name") or "",
                       "arguments": _json_text(function.get("arguments"))})
    response = build_response(body, model, new_id("resp_"), int(completion.get("created") or 0), "completed", output)
    return _finished(response, choice.get("finish_reason"), completion.get("usage"))


def responses_error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return error_body(message, type_, code, param)


def previous_not_found(response_id: str) -> RequestError:
    """OpenAI's answer to an unknown or expired previous_response_id (400, invalid_request_error)."""
    return RequestError(f"Previous response with id '{response_id}' not found.", "previous_response_id",
                        "previous_response_not_found")


def chain_input(stored: list[dict[str, Any]], body: Mapping[str, Any]) -> dict[str, Any]:
    """The body with a stored response's context (its input and output items) before its own input, and without
    previous_response_id: the gateway resolved it, so no engine (a Responses-native one included) gets it."""
    rest = {name: value for name, value in body.items() if name != "previous_response_id"}
    return {**rest, "input": [*stored, *responses_input(body)]}


def stored_items(body: Mapping[str, Any], response: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a later request chained to `response` continues from; instructions are not carried over."""
    return [*responses_input(body), *(response.get("output") or ())]


# --- Responses: the event stream ---


@dataclass(frozen=True, slots=True)
class _Part:
    """How one kind of content part streams: the item list it joins, its index name, text field and events."""

    field: str
    index: str
    text: str
    added: str
    delta: str
    done: str
    closed: str
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


# "Streaming events": content parts of messages (output_text, refusal) and of reasoning items (summary_text,
# reasoning_text); output_text events carry logprobs (empty: none are asked for).
_PARTS: Final[Mapping[str, _Part]] = MappingProxyType({
    "output_text": _Part("content", "content_index", "text", "response.content_part.added",
                         "response.output_text.delta", "response.output_text.done", "response.content_part.done",
                         MappingProxyType({"logprobs": []})),
    "refusal": _Part("content", "content_index", "refusal", "response.content_part.added", "response.refusal.delta",
                     "response.refusal.done", "response.content_part.done"),
    "summary_text": _Part("summary", "summary_index", "text", "response.reasoning_summary_part.added",
                          "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
                          "response.reasoning_summary_part.done"),
    "reasoning_text": _Part("content", "content_index", "text", "response.content_part.added",
                            "response.reasoning_text.delta", "response.reasoning_text.done",
                            "response.content_part.done"),
})
_EMPTY_PARTS: Final[Mapping[str, Mapping[str, Any]]] = MappingProxyType({
    "output_text": MappingProxyType({"type": "output_text", "text": "", "annotations": [], "logprobs": []}),
    "refusal": MappingProxyType({"type": "refusal", "refusal": ""}),
    "summary_text": MappingProxyType({"type": "summary_text", "text": ""}),
    "reasoning_text": MappingProxyType({"type": "reasoning_text", "text": ""}),
})
# Content part type -> the kind of output item holding it.
_PART_ITEMS: Final[Mapping[str, str]] = MappingProxyType(
    {"output_text": "message", "refusal": "message", "summary_text": "reasoning", "reasoning_text": "reasoning"})


def responses_frame(payload: Mapping[str, Any]) -> bytes:
    """One event as OpenAI frames it: the type named in `event:` and again in the data."""
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + dumps(payload) + b"\n\n"


def _new_item(kind: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"id": new_id("rs_"), "type": "reasoning", "summary": []}
    return {"id": new_id("msg_"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}


@dataclass
class _ResponsesStream(FaceStream):
    """OpenAI chunks becoming "Streaming events": one output item open at a time, one content part open in it."""

    body: Mapping[str, Any]
    model: str
    response: dict[str, Any] | None = None  # the response being built; its output holds every item so far
    sequence: int = 0
    item: dict[str, Any] | None = None  # the open item
    positions: dict[str, int] = field(default_factory=dict)  # item id -> output_index
    part: str | None = None  # the open part's type
    where: dict[str, Any] = field(default_factory=dict)  # item_id, output_index and index of the open part
    pieces: list[str] = field(default_factory=list)  # the open part's text so far, joined when it closes
    blocks: list[dict[str, Any]] = field(default_factory=list)  # signed thinking of the open reasoning item
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # chat tool_calls index -> function_call item
    finish: Any = None
    usage: Any = None
    on_answer: Callable[[dict[str, Any]], None] | None = None  # sees the final response of a stream that completed

    def emit(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return responses_frame(payload)

    def start(self, created: int) -> list[bytes]:
        self.response = build_response(self.body, self.model, new_id("resp_"), created, "in_progress", [])
        return [self.emit("response.created", response=self.response),
                self.emit("response.in_progress", response=self.response)]

    def on_chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        frames = self.start(int(chunk.get("created") or 0)) if self.response is None else []
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # a response is one answer
            delta = choice.get("delta") or {}
            thinking = _thinking_of(delta)
            if isinstance(thinking, str) and thinking:
                frames += self.text(_reasoning_kind(self.body), thinking)
            for block in delta.get("thinking_blocks") or ():
                frames += self.sign(block)
            for kind in ("output_text", "refusal"):
                value = delta.get("content" if kind == "output_text" else kind)
                frames += self.text(kind, value) if isinstance(value, str) and value else []
            for call in delta.get("tool_calls") or ():
                frames += self.call(call)
            self.finish = choice.get("finish_reason") or self.finish
        return frames

    def index(self, item: Mapping[str, Any]) -> int:
        return self.positions[item["id"]]

    def open(self, item: dict[str, Any]) -> list[bytes]:
        assert self.response is not None
        frames = self.close()
        self.item, self.positions[item["id"]] = item, len(self.response["output"])
        self.response["output"].append(item)
        return [*frames, self.emit("response.output_item.added", output_index=self.index(item), item=item)]

    def text(self, kind: str, text: str) -> list[bytes]:
        spec = _PARTS[kind]
        frames: list[bytes] = []
        if self.part != kind:
            frames = self.open_part(kind)
        self.pieces.append(text)
        return [*frames, self.emit(spec.delta, **self.where, delta=text, **spec.extra)]

    def open_part(self, kind: str) -> list[bytes]:
        spec = _PARTS[kind]
        frames = self.close_part() if self.item is not None and self.item["type"] == _PART_ITEMS[kind] else self.open(
            _new_item(_PART_ITEMS[kind]))
        assert self.item is not None
        parts = self.item.setdefault(spec.field, [])
        parts.append(dict(_EMPTY_PARTS[kind]))
        self.part, self.pieces = kind, []
        self.where = {"item_id": self.item["id"], "output_index": self.index(self.item), spec.index: len(parts) - 1}
        return [*frames, self.emit(spec.added, **self.where, part=parts[-1])]

    def close_part(self) -> list[bytes]:
        if self.part is None or self.item is None:
            return []
        spec, self.part = _PARTS[self.part], None
        part = self.item[spec.field][-1]
        part[spec.text] = "".join(self.pieces)
        return [self.emit(spec.done, **self.where, **{spec.text: part[spec.text]}, **spec.extra),
                self.emit(spec.closed, **self.where, part=part)]

    def sign(self, block: Any) -> list[bytes]:
        """Signed thinking joins the open reasoning item (a redacted block opens one of its own)."""
        frames = self.close_part() if self.item is not None and self.item["type"] == "reasoning" else self.open(
            _new_item("reasoning"))
        if isinstance(block, dict):
            self.blocks.append(block)
        return frames

    def call(self, call: Mapping[str, Any]) -> list[bytes]:
        function = call.get("function") or {}
        item = self.calls.get(call.get("index", 0))
        frames: list[bytes] = []
        if item is None:
            item = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress",
                    "call_id": call.get("id") or new_id("call_"), "name": function.get("name") or "", "arguments": ""}
            self.calls[call.get("index", 0)] = item
            frames = self.open(item)
        if function.get("arguments"):
            item["arguments"] += function["arguments"]
            frames.append(self.emit("response.function_call_arguments.delta", item_id=item["id"],
                                    output_index=self.index(item), delta=function["arguments"]))
        return frames

    def close(self, status: str = "completed") -> list[bytes]:
        if self.item is None:
            return []
        frames, item = self.close_part(), self.item
        if item["type"] == "function_call":
            frames.append(self.emit("response.function_call_arguments.done", item_id=item["id"],
                                    output_index=self.index(item), name=item["name"], arguments=item["arguments"]))
        if item["type"] == "reasoning" and self.blocks:
            item["encrypted_content"], self.blocks = encode_reasoning(self.blocks), []
        if "status" in item:
            item["status"] = status
        self.item = None
        return [*frames, self.emit("response.output_item.done", output_index=self.index(item), item=item)]

    def end(self) -> list[bytes]:
        frames = self.start(0) if self.response is None else []
        assert self.response is not None
        status = _RESPONSES_FINISH.get(self.finish or "", ("completed", None))[0]
        frames += self.close(status)
        response = _finished(self.response, self.finish, self.usage)
        if self.on_answer is not None:
            self.on_answer(response)
        return [*frames, self.emit(f"response.{response['status']}", response=response)]

    def fail(self, message: str, status: int) -> list[bytes]:
        frames = self.start(0) if self.response is None else []
        assert self.response is not None
        frames += self.close("incomplete")
        self.response.update(status="failed", error={"code": _RESPONSES_FAILURES.get(status, "server_error"),
                                                     "message": message})
        self.response.update({"usage": to_responses_usage(self.usage)} if self.usage else {})
        return [*frames, self.emit("response.failed", response=self.response)]


# --- Responses: native passthrough ---


def _native_failure(data: Mapping[str, Any]) -> UpstreamError:
    """An `error` event (ResponseErrorEvent: code and message on the event) or a response.failed one."""
    error = _dig(data, "response.error") or data.get("error") or data
    code = error.get("code") if isinstance(error, Mapping) else None
    status = {name: status for status, name in _RESPONSES_FAILURES.items()}.get(code, 502)
    return UpstreamError(status, _first_text(error) or "upstream stream error")


@dataclass
class _ResponsesNative(NativeStream):
    """A Responses-native upstream's events relayed with the client's model name; usage from the terminal event."""

    model: str
    on_answer: Callable[[dict[str, Any]], None] | None = None
    usage: dict[str, Any] | None = None
    done: bool = False
    started: bool = False
    sequence: int = 0
    response: dict[str, Any] = field(default_factory=dict)

    def on_event(self, event: SSEEvent) -> bytes:
        data = _load_event(event)
        kind = str(data.get("type") or event.event)
        if not self.started and kind in ("error", "response.failed"):
            raise _native_failure(data)  # nothing was relayed yet, so another channel can try
        self.started = True
        self.sequence = int(data.get("sequence_number") or self.sequence) + 1
        response = data.get("response")
        if isinstance(response, dict):
            response["model"] = self.model
            self.response = response
            if kind in _RESPONSES_TERMINAL:
                self.done, self.usage = True, from_responses_usage(response.get("usage"))
                if self.on_answer is not None and kind != "response.failed":
                    self.on_answer(response)
        return responses_frame({**data, "type": kind})

    def fail(self, message: str, status: int) -> list[bytes]:
        response = {**self.response, "status": "failed",
                    "error": {"code": _RESPONSES_FAILURES.get(status, "server_error"), "message": message}}
        return [responses_frame({"type": "response.failed", "response": response, "sequence_number": self.sequence})]


# --- Responses: the face ---


class ResponsesFace(Face):
    """OpenAI's Responses API (POST /v1/responses); errors in OpenAI's envelope. `on_answer` sees every finished
    response object (converted or native, whole or streamed): the gateway stores them for previous_response_id."""

    name = "responses"
    native: ClassVar[Mapping[str, Adapter]] = MappingProxyType({"responses": ResponsesNativeAdapter()})

    def __init__(self, on_answer: Callable[[dict[str, Any]], None] | None = None,
                 previous_response_id: str | None = None) -> None:
        self.on_answer, self.previous_response_id = on_answer, previous_response_id

    def echoed(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """The body a response echoes: with the previous_response_id the gateway resolved (see chain_input)."""
        return {**body, "previous_response_id": self.previous_response_id} if self.previous_response_id else body

    def answered(self, response: dict[str, Any]) -> dict[str, Any]:
        if self.on_answer is not None:
            self.on_answer(response)
        return response

    def user_text(self, body: Mapping[str, Any]) -> str:
        """The last user message's text (what moderation checks)."""
        for item in reversed(responses_input(body)):
            if item.get("role") == "user" and (item.get("type") or "message") == "message":
                content = item.get("content")
                return content if isinstance(content, str) else "\n".join(
                    str(part.get("text") or "") for part in content or () if part.get("type") == "input_text")
        return ""

    def validate(self, body: Mapping[str, Any]) -> str:
        if not isinstance(body, Mapping):
            raise RequestError("The request body must be a JSON object.", None, "invalid_type")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise RequestError("Missing required parameter: 'model'.", "model", "missing_required_parameter")
        for name, kinds in _RESPONSES_TYPES.items():
            _check_type(body.get(name), kinds, name)
        _check_format(body)
        _check_values(body)
        _check_items(body)
        return str(body["model"])

    def to_chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return to_chat_request(body)

    def from_chat(self, completion: dict[str, Any], body: Mapping[str, Any], model: str) -> dict[str, Any]:
        return self.answered(from_chat_completion(completion, self.echoed(body), model))

    def stream(self, body: Mapping[str, Any], model: str) -> FaceStream:
        return _ResponsesStream(self.echoed(body), model, on_answer=self.on_answer)

    def error_body(self, message: str, status: int, type_: str, code: str | None,
                   param: str | None = None) -> dict[str, Any]:
        return error_body(message, type_, code, param)

    def native_answer(self, raw: bytes, model: str) -> tuple[bytes, dict[str, Any] | None]:
        try:
            answer = loads(raw)
        except (JSONDecodeError, ValueError):
            return raw, None
        if not isinstance(answer, dict):
            return raw, None
        answer["model"] = model
        if answer.get("object") == "response" and answer.get("id"):
            self.answered(answer)
        return dumps(answer), from_responses_usage(answer.get("usage"))

    def native_stream(self, body: Mapping[str, Any], model: str) -> NativeStream:
        return _ResponsesNative(model, self.on_answer)

# --- Gemini generateContent inbound ---
# Clients of Gemini's API (Gemini CLI, the google-genai SDKs) reach every channel: Gemini and Vertex-Gemini channels
# get the body as sent (GeminiFace.native); for any other the request becomes an OpenAI chat request and the answer a
# GenerateContentResponse. Gemini API reference (ai.google.dev/api): "models.generateContent" (GenerateContentRequest,
# Content, Part, Tool, ToolConfig, GenerationConfig, GenerateContentResponse, Candidate, FinishReason,
# UsageMetadata), "models.streamGenerateContent" (with alt=sse one GenerateContentResponse per `data:` event, else
# one JSON array of them), "models.countTokens", "models.list" / "models.get" (Model), "Schema", and the error
# model of Google APIs ("API design guide", Errors: google.rpc.Status with code, message and status).


# Keys the gateway's route adds to the body (the model and verb come in the URL; alt in the query); never sent.
GEMINI_ROUTE_KEYS: Final = frozenset({"model", "stream", "alt"})
# Proto3 JSON takes snake_case field names as well as lowerCamelCase (Google's curl examples use snake_case); the
# conversions read lowerCamelCase. These fields hold free-form JSON whose keys are the client's own.
_GEMINI_FREE_FIELDS: Final = frozenset({"args", "response", "parametersJsonSchema", "responseJsonSchema", "default",
                                        "example", "labels", "enum"})
# "Tool": besides functionDeclarations, tools that run on Google's side; other engines have no such thing.
_GEMINI_FUNCTION_TOOLS: Final = "functionDeclarations"
# "FunctionCallingConfig.Mode" -> OpenAI tool_choice (VALIDATED, like AUTO, lets the model choose).
_FROM_GEMINI_TOOL_MODES: Final[Mapping[str, str]] = MappingProxyType(
    {"AUTO": "auto", "VALIDATED": "auto", "ANY": "required", "NONE": "none"})
# "GenerationConfig" -> OpenAI fields, the Gemini adapter's table read backwards (topK has no OpenAI field and
# max_tokens, the older name, reaches the most engines).
_FROM_GEMINI_GENERATION: Final[Mapping[str, str]] = MappingProxyType(
    {gemini: openai for openai, gemini in reversed(_GEMINI_GENERATION_FIELDS.items()) if openai != "top_k"})
# OpenAI finish_reason -> "Candidate.FinishReason".
_TO_GEMINI_FINISH: Final[Mapping[str, str]] = MappingProxyType({
    "stop": "STOP", "tool_calls": "STOP", "function_call": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"})
# HTTP status -> google.rpc.Code name ("API design guide", Errors: "Error codes").
_GOOGLE_STATUS_NAMES: Final[Mapping[int, str]] = MappingProxyType({
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "ABORTED",
    413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
    502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"})
_GEMINI_METHODS: Final = ("generateContent", "streamGenerateContent", "countTokens")
_MODEL_VERSION_FIELD: Final = re.compile(rb'("modelVersion"\s*:\s*)"(?:[^"\\]|\\.)*"')
_GEMINI_CONFIG_TYPES: Final[Mapping[str, tuple[type, ...]]] = MappingProxyType({
    "temperature": (int, float), "topP": (int, float), "topK": (int, float), "maxOutputTokens": (int,),
    "candidateCount": (int,), "stopSequences": (list,), "responseMimeType": (str,), "thinkingConfig": (dict,),
    "responseSchema": (dict,), "seed": (int,)})
_GEMINI_REQUEST_TYPES: Final[Mapping[str, tuple[type, str]]] = MappingProxyType({
    "tools": (list, "an array"), "safetySettings": (list, "an array"), "toolConfig": (dict, "an object"),
    "generationConfig": (dict, "an object"), "cachedContent": (str, "a string")})


def gemini_error_body(message: str, status: int) -> dict[str, Any]:
    """Google's error shape: {"error": {"code", "message", "status"}}, status the google.rpc.Code name."""
    name = _GOOGLE_STATUS_NAMES.get(status) or ("INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
    return {"error": {"code": status, "message": message, "status": name}}


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def gemini_camel(value: Any) -> Any:
    """A request with every field name in lowerCamelCase, leaving free-form JSON and schema property names as sent."""
    if isinstance(value, list):
        return [gemini_camel(item) for item in value]
    if not isinstance(value, Mapping):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        key = _camel(key) if "_" in key.strip("_") else key
        if key in _GEMINI_FREE_FIELDS:
            out[key] = item
        elif key == "properties" and isinstance(item, Mapping):
            out[key] = {name: gemini_camel(schema) for name, schema in item.items()}
        else:
            out[key] = gemini_camel(item)
    return out


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise RequestError(message, param)


def _check_gemini_parts(parts: Any, param: str) -> None:
    _check(isinstance(parts, list) and all(isinstance(p, dict) for p in parts), f"'{param}' must be an array of "
           "Part objects.", param)
    for i, part in enumerate(parts):
        where = f"{param}[{i}]"
        _check(isinstance(part.get("text", ""), str), f"'{where}.text' must be a string.", where)
        for kind in ("inlineData", "fileData", "functionCall", "functionResponse"):
            _check(isinstance(part.get(kind, {}), dict), f"'{where}.{kind}' must be an object.", where)
        _check("name" in part.get("functionCall", {"name": ""}) and "name" in part.get("functionResponse", {
            "name": ""}), f"'{where}' needs the function's 'name'.", where)
        _check(isinstance(part.get("inlineData", {}).get("data", ""), str), f"'{where}.inlineData.data' must be "
               "a base64 string.", where)


def validate_gemini(body: Mapping[str, Any]) -> str:
    """The shape checks of a GenerateContentRequest that the conversions rely on; returns the model."""
    request = gemini_camel(body)
    model = request.get("model")
    _check(isinstance(model, str) and bool(model), "The model name is required.", "model")
    contents = request.get("contents")
    _check(isinstance(contents, list) and bool(contents) and all(isinstance(c, dict) for c in contents),
           "'contents' is required and must be a non-empty array of Content objects.", "contents")
    for i, content in enumerate(contents):
        _check(content.get("role") in (None, "", "user", "model", "function"),
               f"'contents[{i}].role' must be 'user' or 'model'.", f"contents[{i}].role")
        _check_gemini_parts(content.get("parts"), f"contents[{i}].parts")
    system = request.get("systemInstruction")
    if system is not None:
        _check(isinstance(system, (dict, str)), "'systemInstruction' must be a Content object.", "systemInstruction")
        _check_gemini_parts(system.get("parts") if isinstance(system, dict) else [], "systemInstruction.parts")
    for name, (kind, noun) in _GEMINI_REQUEST_TYPES.items():
        _check(isinstance(request.get(name, kind()), kind), f"'{name}' must be {noun}.", name)
    for i, tool in enumerate(request.get("tools") or ()):
        declarations = tool.get(_GEMINI_FUNCTION_TOOLS, []) if isinstance(tool, dict) else None
        _check(isinstance(declarations, list) and all(isinstance(d, dict) and isinstance(d.get("name"), str)
                                                      for d in declarations),
               f"'tools[{i}].functionDeclarations' must be an array of declarations with a 'name'.", f"tools[{i}]")
    _check_generation(request.get("generationConfig") or {})
    return str(model)


def _check_generation(config: Mapping[str, Any]) -> None:
    for name, kinds in _GEMINI_CONFIG_TYPES.items():
        value = config.get(name)
        _check(value is None or (isinstance(value, kinds) and not isinstance(value, bool)),
               f"'generationConfig.{name}' has the wrong type.", f"generationConfig.{name}")
    _check(all(isinstance(s, str) for s in config.get("stopSequences") or ()),
           "'generationConfig.stopSequences' must be an array of strings.", "generationConfig.stopSequences")


def _from_gemini_type(value: Any) -> Any:
    """"Schema.type" is an enum spelled in capitals (OBJECT, STRING...); JSON Schema spells types in lower case."""
    return value.lower() if isinstance(value, str) and value != "TYPE_UNSPECIFIED" else None


def from_gemini_schema(schema: Any) -> Any:
    """A Gemini "Schema" (the OpenAPI subset) as JSON Schema: lower-case types, `nullable` as a null type, int64
    counts (proto JSON strings) as numbers; propertyOrdering and example have no JSON Schema meaning."""
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties",) and isinstance(value, Mapping):
            out[key] = {name: from_gemini_schema(item) for name, item in value.items()}
        elif key in ("items", "anyOf"):
            out[key] = [from_gemini_schema(v) for v in value] if isinstance(value, list) else from_gemini_schema(value)
        elif key == "type":
            out[key] = _from_gemini_type(value)
        elif key not in ("nullable", "propertyOrdering", "example"):
            out[key] = int(value) if isinstance(value, str) and value.isdigit() and key.startswith(("min", "max")) \
                else value
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return {key: value for key, value in out.items() if value is not None}


def _data_url(blob: Mapping[str, Any]) -> str:
    return f"data:{blob.get('mimeType') or 'application/octet-stream'};base64,{blob.get('data') or ''}"


def _from_inline_data(blob: Mapping[str, Any]) -> dict[str, Any]:
    """"Blob" as an OpenAI part: images as image_url, wav/mp3 as input_audio, other media (PDF...) as a file."""
    mime = str(blob.get("mimeType") or "")
    if mime.startswith("image/"):
        return {"type": "image_url", "image_url": {"url": _data_url(blob)}}
    audio = mime.removeprefix("audio/").replace("mpeg", "mp3")
    if mime.startswith("audio/") and audio in ("wav", "mp3"):
        return {"type": "input_audio", "input_audio": {"data": blob.get("data") or "", "format": audio}}
    return {"type": "file", "file": {"file_data": _data_url(blob)}}


def _from_file_data(file: Mapping[str, Any]) -> dict[str, Any]:
    """"FileData": an http(s) image URL converts; File API and gs:// URIs are readable by Gemini alone."""
    uri = str(file.get("fileUri") or "")
    if str(file.get("mimeType") or "image/").startswith("image/") and uri.startswith(("http://", "https://")):
        return {"type": "image_url", "image_url": {"url": uri}}
    raise RequestError(f"fileData '{uri}' can be read by a Gemini channel only; this model has none.",
                       "contents.parts.fileData")


# "Part" data -> OpenAI content part, for user turns.
_FROM_GEMINI_PARTS: Final[Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = MappingProxyType({
    "text": lambda part: {"type": "text", "text": part["text"]},
    "inlineData": lambda part: _from_inline_data(part["inlineData"]),
    "fileData": lambda part: _from_file_data(part["fileData"]),
})


def _part_kind(part: Mapping[str, Any]) -> str:
    """The part's data field; one no other engine has (executableCode, codeExecutionResult...) is refused."""
    kind = next((k for k in (*_FROM_GEMINI_PARTS, "functionCall", "functionResponse") if k in part), None)
    name = next((k for k in part if k not in ("thoughtSignature", "thought", "videoMetadata")), None)
    if kind is None and name is not None:
        raise RequestError(f"'{name}' parts need a Gemini channel; this model has none.", "contents.parts")
    return kind or ""  # "": a part carrying no data (a bare signature)


def _from_gemini_part(part: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = _part_kind(part)
    if part.get("thought") or not kind:
        return None  # the model's own thoughts: meaningful to Gemini alone
    return _FROM_GEMINI_PARTS[kind](part)


def _from_gemini_system(system: Any) -> list[dict[str, Any]]:
    parts = system.get("parts") if isinstance(system, Mapping) else [{"text": system}] if system else []
    text = "\n".join(str(p.get("text") or "") for p in parts or () if isinstance(p, Mapping) and "text" in p)
    return [{"role": "system", "content": text}] if text else []


def _from_gemini_call(part: Mapping[str, Any], turn: int, position: int) -> dict[str, Any]:
    """A functionCall part as an OpenAI tool call; its id carries the part's thoughtSignature."""
    call = part["functionCall"]
    call_id = encode_signature_id(str(call.get("id") or f"call_{turn}_{position}"), part.get("thoughtSignature"))
    arguments = dumps(call.get("args") or {}).decode()
    return {"id": call_id, "type": "function", "function": {"name": call.get("name") or "", "arguments": arguments}}


def _from_gemini_model(parts: list[Mapping[str, Any]], turn: int) -> list[dict[str, Any]]:
    """A model turn as one assistant message: its text (thoughts left out), then its function calls."""
    for part in parts:
        _part_kind(part)
    text = "".join(str(p["text"]) for p in parts if "text" in p and not p.get("thought"))
    calls = [_from_gemini_call(p, turn, i) for i, p in enumerate(parts) if "functionCall" in p]
    if not text and not calls:
        return []
    return [{"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}]


def _result_text(response: Any) -> str:
    """A functionResponse.response object as tool message text; {"output": text} and {"content": text}, the forms
    Google's guides and SDKs use, as the bare text."""
    if isinstance(response, Mapping) and len(response) == 1:
        value = next(iter(response.values()))
        if next(iter(response)) in ("output", "content", "result") and isinstance(value, str):
            return value
    return dumps(response if response is not None else {}).decode()


def _pair_call(response: Mapping[str, Any], pending: list[dict[str, Any]]) -> str:
    """The id of the call a functionResponse answers: by its id, else the first open call of its name."""
    match = [c for c in pending if response.get("id") and decode_signature_id(c["id"])[0] == response["id"]] or [
        c for c in pending if c["function"]["name"] == response.get("name")] or pending[:1]
    if not match:
        return str(response.get("id") or f"call_{response.get('name') or 'result'}")
    pending.remove(match[0])
    return str(match[0]["id"])


def _from_gemini_user(parts: list[Mapping[str, Any]], pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """functionResponse parts first, as tool messages (OpenAI wants them right after the calls), then the rest."""
    messages: list[dict[str, Any]] = [
        {"role": "tool", "tool_call_id": _pair_call(p["functionResponse"], pending),
         "content": _result_text(p["functionResponse"].get("response"))}
        for p in parts if "functionResponse" in p]
    content = [c for c in (_from_gemini_part(p) for p in parts if "functionResponse" not in p) if c]
    if content:
        single = len(content) == 1 and content[0]["type"] == "text"
        messages.append({"role": "user", "content": content[0]["text"] if single else content})
    return messages


def from_gemini_contents(contents: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """"Content" turns as OpenAI messages, each functionResponse paired with the call it answers."""
    messages: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # the calls of the last model turn not answered yet
    for turn, content in enumerate(contents):
        parts = [p for p in content.get("parts") or () if isinstance(p, Mapping)]
        if content.get("role") == "model":
            messages += _from_gemini_model(parts, turn)
            pending = [dict(call) for m in messages[-1:] for call in m.get("tool_calls") or ()]
        else:
            messages += _from_gemini_user(parts, pending)
    return messages


def _from_gemini_declaration(declaration: Mapping[str, Any]) -> dict[str, Any]:
    """"FunctionDeclaration": `parameters` (the Schema subset) or `parametersJsonSchema` (JSON Schema as is)."""
    parameters = declaration.get("parametersJsonSchema")
    if parameters is None:
        parameters = from_gemini_schema(declaration.get("parameters")) or {"type": "object", "properties": {}}
    function = {"name": declaration.get("name"), "parameters": parameters}
    if declaration.get("description"):
        function["description"] = declaration["description"]
    return {"type": "function", "function": function}


def _from_gemini_tool_choice(config: Any) -> Any:
    calling = _gemini_map(_gemini_map(config).get("functionCallingConfig"))
    choice = _FROM_GEMINI_TOOL_MODES.get(str(calling.get("mode") or "AUTO").upper(), "auto")
    names = calling.get("allowedFunctionNames") or []
    if choice == "required" and len(names) == 1:
        return {"type": "function", "function": {"name": names[0]}}
    return choice


def _add_gemini_tools(request: dict[str, Any], body: Mapping[str, Any]) -> None:
    tools: list[dict[str, Any]] = []
    for tool in body.get("tools") or ():
        for kind in tool:
            if kind != _GEMINI_FUNCTION_TOOLS:  # googleSearch, codeExecution, urlContext...: Google runs them
                raise RequestError(f"The '{kind}' tool runs on Gemini channels only; this model has none.", "tools")
        tools += [_from_gemini_declaration(d) for d in tool.get(_GEMINI_FUNCTION_TOOLS) or ()]
    if tools:
        request["tools"] = tools
        request["tool_choice"] = _from_gemini_tool_choice(body.get("toolConfig"))


def _from_gemini_thinking(thinking: Mapping[str, Any]) -> str | None:
    """"ThinkingConfig": a thinkingLevel (Gemini 3) by name. A thinkingBudget leaves the target's default: Gemini CLI
    sends one with every request, and OpenAI models without reasoning refuse any reasoning_effort."""
    level = thinking.get("thinkingLevel")
    return level.lower() if isinstance(level, str) and level.lower() in _GEMINI_THINKING_BUDGETS else None


def _response_format_of(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """responseMimeType application/json with responseJsonSchema or responseSchema as json_schema, else json_object."""
    if config.get("responseMimeType") != "application/json":
        return None
    schema = config.get("responseJsonSchema") or from_gemini_schema(config.get("responseSchema"))
    if not schema:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}


def _from_gemini_generation(config: Mapping[str, Any]) -> dict[str, Any]:
    request = {name: config[field] for field, name in _FROM_GEMINI_GENERATION.items() if config.get(field) is not None}
    if config.get("stopSequences"):
        request["stop"] = list(config["stopSequences"])
    effort, response_format = _from_gemini_thinking(_gemini_map(config.get("thinkingConfig"))), \
        _response_format_of(config)
    return {**request, **({"reasoning_effort": effort} if effort else {}),
            **({"response_format": response_format} if response_format else {})}


def from_gemini_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """A GenerateContentRequest as an OpenAI chat request, the model still the client's alias. safetySettings have
    no meaning elsewhere and stay behind."""
    request = gemini_camel(body)
    if request.get("cachedContent"):
        raise RequestError("'cachedContent' lives on Gemini's side; this model has no Gemini channel.",
                           "cachedContent")
    messages = _from_gemini_system(request.get("systemInstruction")) + from_gemini_contents(request["contents"])
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages,
                            **_from_gemini_generation(_gemini_map(request.get("generationConfig")))}
    _add_gemini_tools(chat, request)
    if body.get("stream"):  # usage arrives only at the end of an OpenAI stream, and only when asked for
        chat.update(stream=True, stream_options={"include_usage": True})
    return chat


def to_gemini_usage(usage: Any) -> dict[str, Any] | None:
    """CompletionUsage as "UsageMetadata": reasoning tokens are thoughtsTokenCount, apart from candidatesTokenCount
    (the Gemini adapter's _gemini_usage read backwards)."""
    if not isinstance(usage, Mapping):
        return None
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    thoughts = int(_gemini_map(usage.get("completion_tokens_details")).get("reasoning_tokens") or 0)
    cached = int(_gemini_map(usage.get("prompt_tokens_details")).get("cached_tokens") or 0)
    metadata = {"promptTokenCount": prompt, "candidatesTokenCount": max(0, completion - thoughts),
                "totalTokenCount": int(usage.get("total_tokens") or prompt + completion)}
    return {**metadata, **({"thoughtsTokenCount": thoughts} if thoughts else {}),
            **({"cachedContentTokenCount": cached} if cached else {})}


def _to_gemini_call(call: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as a functionCall part; a signature its id carries goes back on the part."""
    function = _gemini_map(call.get("function"))
    call_id, signature = decode_signature_id(str(call.get("id") or ""))
    part: dict[str, Any] = {"functionCall": {**({"id": call_id} if call_id else {}), "name": function.get("name") or "",
                                             "args": _tool_input(function.get("arguments"))}}
    return {**part, "thoughtSignature": signature} if signature else part


def _to_gemini_parts(message: Mapping[str, Any], thoughts: bool = True) -> list[dict[str, Any]]:
    reasoning, text = _thinking_of(message), message.get("content") or message.get("refusal")
    parts = [{"text": reasoning, "thought": True}] if thoughts and isinstance(reasoning, str) and reasoning else []
    if text:
        parts.append({"text": text if isinstance(text, str) else _text_of(text)})
    return parts + [_to_gemini_call(call) for call in message.get("tool_calls") or () if isinstance(call, Mapping)]


def _to_gemini_finish(reason: Any) -> str:
    return _TO_GEMINI_FINISH.get(reason or "stop", "OTHER")


def wants_thoughts(body: Mapping[str, Any]) -> bool:
    """"ThinkingConfig.includeThoughts": thought parts are in the answer only when the request asked for them."""
    config = _gemini_map(body.get("generationConfig") or body.get("generation_config"))
    thinking = _gemini_map(config.get("thinkingConfig") or config.get("thinking_config"))
    return bool(thinking.get("includeThoughts") or thinking.get("include_thoughts"))


def to_gemini_response(completion: Mapping[str, Any], model: str, thoughts: bool = True) -> dict[str, Any]:
    """An OpenAI chat.completion as a GenerateContentResponse, one candidate per choice."""
    candidates = [{"content": {"role": "model", "parts": _to_gemini_parts(_gemini_map(choice.get("message")),
                                                                          thoughts) or [
        {"text": ""}]}, "finishReason": _to_gemini_finish(choice.get("finish_reason")),
        "index": choice.get("index", i)} for i, choice in enumerate(map(_gemini_map, completion.get("choices") or ()))]
    return _gemini_fields({"candidates": candidates, "usageMetadata": to_gemini_usage(completion.get("usage")),
                           "modelVersion": model, "responseId": completion.get("id")})


@dataclass
class GeminiStream(FaceStream):
    """OpenAI chunks as streamGenerateContent frames: with alt=sse one `data:` event per GenerateContentResponse
    (CRLF-terminated, as Google frames them), else the elements of one JSON array. Text and thoughts go out as
    they come; a function call goes out whole, in the last frame, with finishReason and usageMetadata."""

    model: str
    sse: bool = True
    thoughts: bool = True  # reasoning as thought parts (includeThoughts)
    response_id: str | None = None
    opened: bool = False  # the JSON array's "[" is out
    calls: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)  # (choice, tool call index) -> call
    finish: dict[int, str] = field(default_factory=dict)
    usage: Any = None

    @property
    def media_type(self) -> str:
        return "text/event-stream" if self.sse else "application/json"

    def frame(self, response: Mapping[str, Any]) -> bytes:
        if self.sse:
            return b"data: " + dumps(response) + b"\r\n\r\n"
        opening, self.opened = (b"\n," if self.opened else b"["), True
        return opening + dumps(response)

    def response(self, candidates: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        return _gemini_fields({"candidates": candidates, "usageMetadata": usage, "modelVersion": self.model,
                               "responseId": self.response_id})

    def add_call(self, index: int, call: Mapping[str, Any]) -> None:
        function = _gemini_map(call.get("function"))
        seen = self.calls.setdefault((index, call.get("index", 0)), {"id": "", "function": {
            "name": "", "arguments": ""}})
        seen["id"] = seen["id"] or call.get("id") or ""
        seen["function"]["name"] = seen["function"]["name"] or function.get("name") or ""
        seen["function"]["arguments"] += function.get("arguments") or ""

    def on_chunk(self, chunk: Mapping[str, Any]) -> list[bytes]:
        self.usage, self.response_id = chunk.get("usage") or self.usage, self.response_id or chunk.get("id")
        candidates = []
        for choice in map(_gemini_map, chunk.get("choices") or ()):
            index, delta = choice.get("index", 0), _gemini_map(choice.get("delta"))
            for call in delta.get("tool_calls") or ():
                self.add_call(index, _gemini_map(call))
            if choice.get("finish_reason"):
                self.finish[index] = choice["finish_reason"]
            parts = _to_gemini_parts({"content": delta.get("content"), "reasoning_content": _thinking_of(delta)},
                                     self.thoughts)
            if parts:
                candidates.append({"content": {"role": "model", "parts": parts}, "index": index})
        return [self.frame(self.response(candidates))] if candidates else []

    def end(self) -> list[bytes]:
        candidates = [{"content": {"role": "model", "parts": [
            _to_gemini_call(call) for key, call in sorted(self.calls.items()) if key[0] == index] or [{"text": ""}]},
            "finishReason": _to_gemini_finish(self.finish.get(index)), "index": index}
            for index in sorted({*self.finish, *(key[0] for key in self.calls)} or {0})]
        last = self.frame(self.response(candidates, to_gemini_usage(self.usage)))
        return [last] if self.sse else [last, b"\n]"]

    def fail(self, message: str, status: int) -> list[bytes]:
        """A failure after the commit: Google's error object as the last event (or array element)."""
        return [self.frame(gemini_error_body(message, status)), *(() if self.sse else (b"\n]",))]


def rename_model_version(raw: bytes, model: str) -> bytes:
    """`raw` with each "modelVersion" set to the client's alias, every other byte as the upstream sent it."""
    return _MODEL_VERSION_FIELD.sub(lambda match: match.group(1) + dumps(model), raw)


@dataclass
class GeminiNativeStream(GeminiStream, NativeStream):
    """A Gemini channel's stream (always asked for with alt=sse) relayed event by event, framed as the client asked;
    only modelVersion changes. An error event first fails the attempt, so another channel can try."""

    done: bool = False

    def on_event(self, event: SSEEvent) -> bytes:
        native = _load_event(event)
        if "error" in native and not self.opened and not self.done:
            raise _stream_error(native)
        self.usage = _gemini_usage(native.get("usageMetadata")) or self.usage
        self.done = self.done or "error" in native or any(
            _gemini_map(c).get("finishReason") for c in native.get("candidates") or ())
        data = rename_model_version(event.data.encode(), self.model)
        if self.sse:
            return b"data: " + data + b"\r\n\r\n"
        opening, self.opened = (b"\n," if self.opened else b"["), True
        return opening + data

    def end(self) -> list[bytes]:
        return [] if self.sse else [b"\n]" if self.opened else b"[]"]


class GeminiNativeAdapter(GeminiAdapter):
    """A GenerateContentRequest sent as it came, but for the keys the route added; the model is in the URL."""

    def payload(self, body: Mapping[str, Any], target: Target) -> dict[str, Any]:
        stripped = GEMINI_ROUTE_KEYS if target.provider.tools else GEMINI_ROUTE_KEYS | {"tools", "toolConfig",
                                                                                        "tool_config"}
        return self.apply_overrides({k: v for k, v in body.items() if k not in stripped}, target)

    def build_count_tokens_request(self, body: Mapping[str, Any], target: Target) -> UpstreamRequest:
        """"models.countTokens": the same URL with the countTokens verb, the body as sent."""
        url = self.url("chat", {}, target).rsplit(":", 1)[0] + ":countTokens"
        return UpstreamRequest("POST", url, self.headers(target), json=self.payload(body, target))


class VertexGeminiNativeAdapter(GeminiNativeAdapter, VertexGeminiAdapter):
    pass


def estimate_gemini_tokens(body: Mapping[str, Any]) -> int:
    """"models.countTokens" for channels that cannot count: about 4 characters per token over the text of the
    system instruction, contents and tools; each inline or file medium counts as one full-size image."""
    request = gemini_camel(body)
    request = _gemini_map(request.get("generateContentRequest")) or request
    parts = [p for c in [request.get("systemInstruction"), *(request.get("contents") or ())]
             for p in _gemini_map(c).get("parts") or () if isinstance(p, Mapping)]
    media = sum(1 for p in parts if "inlineData" in p or "fileData" in p)
    chars = _text_length([[p for p in parts if "inlineData" not in p and "fileData" not in p], request.get("tools")])
    return max(1, -(-(chars + media * _IMAGE_TOKEN_ESTIMATE * 4) // 4))


def gemini_model(alias: str) -> dict[str, Any]:
    """"Model" for an alias the key may use: what the gateway knows of it (limits depend on the channel)."""
    return {"name": f"models/{alias}", "baseModelId": alias, "version": "uni-api", "displayName": alias,
            "description": f"{alias} through uni-api", "supportedGenerationMethods": list(_GEMINI_METHODS)}


class GeminiFace(Face):
    """Gemini's generateContent API (Gemini CLI, the google-genai SDKs); errors in Google's shape. The route puts
    the model, the verb's stream flag and the alt query parameter into the body (GEMINI_ROUTE_KEYS)."""

    name = "gemini"
    native = MappingProxyType({a.engine: a for a in (GeminiNativeAdapter(), VertexGeminiNativeAdapter())})
    counters = native  # "models.countTokens", on Vertex too

    def validate(self, body: Mapping[str, Any]) -> str:
        return validate_gemini(body)

    def to_chat(self, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return from_gemini_request(body)
        except RequestError as exc:  # a Gemini channel later in the plan may take it
            raise UpstreamError(400, exc.message, retryable=True) from None

    def user_text(self, body: Mapping[str, Any]) -> str:
        """The last user turn's text parts, for moderation."""
        users = [c for c in body.get("contents") or () if isinstance(c, Mapping) and c.get("role") != "model"]
        parts = (users[-1].get("parts") or ()) if users else ()
        return "\n".join(p["text"] for p in parts if isinstance(p, Mapping) and isinstance(p.get("text"), str))

    def from_chat(self, completion: dict[str, Any], body: Mapping[str, Any], model: str) -> dict[str, Any]:
        return to_gemini_response(completion, model, wants_thoughts(body))

    def stream(self, body: Mapping[str, Any], model: str) -> GeminiStream:
        return GeminiStream(model, sse=body.get("alt") == "sse", thoughts=wants_thoughts(body))

    def error_body(self, message: str, status: int, type_: str, code: str | None) -> dict[str, Any]:
        return gemini_error_body(message, status)

    def native_stream(self, body: Mapping[str, Any], model: str) -> GeminiNativeStream:
        return GeminiNativeStream(model, sse=body.get("alt") == "sse")

    def native_answer(self, raw: bytes, model: str) -> tuple[bytes, dict[str, Any] | None]:
        try:
            usage = _gemini_usage(_gemini_map(loads(raw)).get("usageMetadata"))
        except (JSONDecodeError, ValueError, RecursionError):
            usage = None
        return rename_model_version(raw, model), usage

    def estimate_tokens(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return {"totalTokens": estimate_gemini_tokens(body)}


# --- The faces, by name (uni_api.py's routes pick theirs here) ---

FACES: Final[Mapping[str, Face]] = MappingProxyType(
    {face.name: face for face in (_CHAT, MessagesFace(), ResponsesFace(), GeminiFace())})

# --- Engine inference ---


def _host(suffix: str) -> Callable[[SplitResult, str], bool]:
    return lambda url, model: (url.hostname or "").endswith(suffix)


def _path(suffix: str) -> Callable[[SplitResult, str], bool]:
    return lambda url, model: url.path.rstrip("/").endswith(suffix)


EngineRule = tuple[str, Callable[[SplitResult, str], bool]]
_GOOGLE_RULES: Final[tuple[EngineRule, ...]] = (
    ("gemini", _host("generativelanguage.googleapis.com")),
    ("gemini", _path("/v1beta")),
    # One Vertex host serves both wire formats: the model name tells them apart.
    ("vertex-claude", lambda url, model: "claude" in model and _host("aiplatform.googleapis.com")(url, model)),
    ("vertex-gemini", _host("aiplatform.googleapis.com")),
)
_CLAUDE_RULES: Final[tuple[EngineRule, ...]] = (
    ("claude", _host("api.anthropic.com")),
    ("claude", _path("/v1/messages")),
    ("aws", lambda url, model: "bedrock-runtime" in (url.hostname or "")),
    ("aws", _host("amazonaws.com")),
)
_OTHER_RULES: Final[tuple[EngineRule, ...]] = (("cohere", _is_cohere), ("cloudflare", _is_cloudflare))

# First matching rule wins; `engine:` in api.yaml overrides all of them.
ENGINE_RULES: Final[tuple[EngineRule, ...]] = (
    *_GOOGLE_RULES,
    *_CLAUDE_RULES,
    *_OTHER_RULES,
    ("responses", _path(_RESPONSES_SUFFIX)),  # OpenAI's Responses API (also openrouter.ai/api/v1/responses)
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
