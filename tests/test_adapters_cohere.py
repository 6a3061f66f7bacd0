"""Cohere Chat API v2 adapter: golden fixtures from docs.cohere.com, then end to end through the gateway.

References: "Chat" (POST /v2/chat, request body and "v2_chat_Response"), "Chat with Streaming" (stream event
variants), "Streaming for tool use" (the parallel tool-call example), "Image Inputs", "List Models".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import (
    FakeUpstream,
    GatewayServer,
    Reply,
    byte_pieces,
    engine_config,
    fixture_sse,
    load_fixture,
    load_fixture_lines,
)
from openai_schema import accumulate_stream, validate_chunk, validate_completion

import adapters

FIXTURES = Path(__file__).parent / "fixtures" / "cohere"
load = functools.partial(load_fixture, "cohere")
load_jsonl = functools.partial(load_fixture_lines, "cohere")
sse_chunks = functools.partial(fixture_sse, "cohere")
COHERE = adapters.ADAPTERS["cohere"]
PROVIDER = adapters.Provider("co", "cohere", "https://api.cohere.com/v2/chat", api_keys=("co-secret",),
                             models=(("command-a", "command-a-03-2025"),))
TARGET = adapters.Target(PROVIDER, "command-a-03-2025", "co-secret")


async def convert_stream(name: str, include_usage: bool = False) -> list[dict[str, Any]]:
    events = adapters.iter_sse(byte_pieces((FIXTURES / name).read_bytes()))
    return [chunk async for chunk in COHERE.parse_stream(events, "command-a", include_usage=include_usage)]


# --- Request side ---


@pytest.mark.parametrize("case", ["text", "tools", "history"])
def test_cohere_request_matches_golden_body(case: str) -> None:
    request = COHERE.build_request(load(f"{case}.request.json"), TARGET)
    assert request.method == "POST"
    assert request.url == "https://api.cohere.com/v2/chat"
    assert request.headers == {"Authorization": "Bearer co-secret"}
    assert request.json == load(f"{case}.native.json")
    assert request.stream is load(f"{case}.request.json").get("stream", False)


@pytest.mark.parametrize(("choice", "expected"), [("auto", None), ("none", "NONE"), ("required", "REQUIRED")])
def test_cohere_tool_choice_maps_to_v2_modes(choice: str, expected: str | None) -> None:
    body = {**load("tools.request.json"), "tool_choice": choice}
    payload = COHERE.build_request(body, TARGET).json
    assert payload.get("tool_choice") == expected
    assert [t["function"]["name"] for t in payload["tools"]] == ["get_weather", "get_time"]


def test_cohere_provider_without_tools_sends_none() -> None:
    provider = adapters.Provider("co", "cohere", PROVIDER.base_url, tools=False)
    payload = COHERE.build_request(load("tools.request.json"), adapters.Target(provider, "m", "k")).json
    assert "tools" not in payload and "tool_choice" not in payload


def test_cohere_overrides_apply_to_the_native_body() -> None:
    provider = adapters.Provider("co", "cohere", PROVIDER.base_url,
                                 overrides={"all": {"safety_mode": "STRICT"}, "m": {"temperature": 0.9}})
    payload = COHERE.build_request(load("text.request.json"), adapters.Target(provider, "m", "k")).json
    assert payload["safety_mode"] == "STRICT" and payload["temperature"] == 0.9


@pytest.mark.parametrize(("body", "thinking"), [
    ({"reasoning_effort": "high"}, {"type": "enabled", "token_budget": 16384}),
    ({"reasoning_effort": "none"}, {"type": "disabled"}),
    ({"reasoning": {"max_tokens": 2000}}, {"type": "enabled", "token_budget": 2000}),
    ({"reasoning": {"enabled": True}}, {"type": "enabled"}),
    ({}, None),
])
def test_cohere_reasoning_becomes_thinking(body: dict[str, Any], thinking: dict[str, Any] | None) -> None:
    payload = COHERE.build_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, TARGET).json
    assert payload.get("thinking") == thinking


def test_cohere_rejects_content_it_cannot_carry() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}
    with pytest.raises(adapters.UpstreamError) as caught:
        COHERE.build_request(body, TARGET)
    assert caught.value.status == 400 and not caught.value.retryable


@pytest.mark.parametrize(("base_url", "chat", "models"), [
    ("https://api.cohere.com/v2/chat", "https://api.cohere.com/v2/chat",
     "https://api.cohere.com/v1/models?endpoint=chat&page_size=1000"),
    ("https://proxy.example/cohere/v2/chat/", "https://proxy.example/cohere/v2/chat",
     "https://proxy.example/cohere/v1/models?endpoint=chat&page_size=1000"),
    ("https://api.cohere.ai", "https://api.cohere.ai/v2/chat",
     "https://api.cohere.ai/v1/models?endpoint=chat&page_size=1000"),
])
def test_cohere_urls_derive_from_base_url(base_url: str, chat: str, models: str) -> None:
    provider = adapters.Provider("co", "cohere", base_url)
    assert COHERE.build_request({"messages": []}, adapters.Target(provider, "m", "k")).url == chat
    assert COHERE.build_models_request(adapters.Target(provider, "", "k")).url == models


# --- Response side ---


@pytest.mark.parametrize("case", ["text", "tools", "history"])
def test_cohere_response_converts_to_golden(case: str) -> None:
    converted = COHERE.parse_response(load(f"{case}.upstream.json"), "command-a")
    assert converted == load(f"{case}.expected.json")
    validate_completion(converted)


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["text", "tools", "history"])
async def test_cohere_stream_converts_to_golden(case: str) -> None:
    include_usage = load(f"{case}.request.json").get("stream_options", {}).get("include_usage", False)
    chunks = await convert_stream(f"{case}.upstream.sse", include_usage)
    assert chunks == load_jsonl(f"{case}.expected.jsonl")
    for chunk in chunks:
        validate_chunk(chunk)


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["text", "tools", "history"])
async def test_cohere_accumulated_stream_equals_response(case: str) -> None:
    folded = accumulate_stream(await convert_stream(f"{case}.upstream.sse", include_usage=True))
    choice = COHERE.parse_response(load(f"{case}.upstream.json"), "command-a")["choices"][0]
    assert folded["finish_reason"] == choice["finish_reason"]
    assert folded["message"] == {k: v for k, v in choice["message"].items() if k != "refusal"}


@pytest.mark.parametrize(("reason", "status"), [("ERROR", 502), ("TIMEOUT", 504)])
def test_cohere_failed_generation_is_a_retryable_error(reason: str, status: int) -> None:
    native = {**load("text.upstream.json"), "finish_reason": reason}
    with pytest.raises(adapters.UpstreamError) as caught:
        COHERE.parse_response(native, "command-a")
    assert caught.value.status == status and caught.value.retryable


@pytest.mark.anyio
async def test_cohere_stream_error_in_message_end_raises() -> None:
    sse = (b'data: {"type":"message-start","id":"x"}\n\n'
           b'data: {"type":"message-end","delta":{"finish_reason":"ERROR","error":"internal failure"}}\n\n')
    chunks = COHERE.parse_stream(adapters.iter_sse(byte_pieces(sse)), "command-a")
    assert (await chunks.__anext__())["choices"][0]["delta"]["role"] == "assistant"
    with pytest.raises(adapters.UpstreamError, match="internal failure"):
        await chunks.__anext__()


@pytest.mark.anyio
async def test_cohere_stream_cut_before_message_end_raises() -> None:
    sse = (FIXTURES / "text.upstream.sse").read_bytes().rsplit(b"event: message-end", 1)[0]
    with pytest.raises(adapters.UpstreamError, match="before message-end"):
        [chunk async for chunk in COHERE.parse_stream(adapters.iter_sse(byte_pieces(sse)), "m")]


@pytest.mark.parametrize(("fixture", "status", "message"), [
    ("error_400.upstream.json", 400, "invalid request: message must be at least 1 token long"),
    ("error_429.upstream.json", 429, "You are using a Trial key"),
])
def test_cohere_error_bodies_give_their_message(fixture: str, status: int, message: str) -> None:
    error = COHERE.parse_error(status, (FIXTURES / fixture).read_bytes())
    assert error.status == status and error.message.startswith(message)
    assert error.retryable is (status == 429)


def test_cohere_models_list_gives_names() -> None:
    assert COHERE.parse_models(load("models.upstream.json")) == ["command-a-03-2025", "command-r7b-12-2024"]


@pytest.mark.parametrize(("base_url", "engine"), [
    ("https://api.cohere.com/v2/chat", "cohere"),
    ("https://api.cohere.ai/v2/chat", "cohere"),
    ("https://my-gateway.example/cohere/v2/chat", "cohere"),
    ("https://api.cohere.com/compatibility/v1/chat/completions", "gpt"),
])
def test_cohere_engine_is_inferred_from_base_url(base_url: str, engine: str) -> None:
    assert adapters.infer_engine(base_url) == engine


# --- End to end through the gateway ---

MakeGateway = Callable[..., GatewayServer]


cohere_config = functools.partial(engine_config, "cohere")


def test_gateway_answers_cohere_through_the_openai_sdk(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("text.upstream.json")))
    gateway = make_gateway(cohere_config(upstream, models=[{"command-a-03-2025": "command-a"}]))
    request = load("text.request.json")
    extra = {"top_k": request.pop("top_k")}  # not an OpenAI parameter, so the SDK sends it as extra_body
    answer = gateway.client("sk-client").chat.completions.create(**request, extra_body=extra)
    assert answer.choices[0].message.content == load("text.expected.json")["choices"][0]["message"]["content"]
    assert answer.model == "command-a" and answer.usage is not None and answer.usage.total_tokens == 519
    sent = upstream.received[0]
    assert (sent.method, sent.path) == ("POST", "/v2/chat")
    assert sent.headers["Authorization"] == "Bearer co-secret-0"
    assert sent.json == load("text.native.json")
    validate_completion(answer.model_dump(exclude_unset=True))


def test_gateway_streams_cohere_parallel_tool_calls(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(raw_chunks=sse_chunks("tools.upstream.sse")))
    gateway = make_gateway(cohere_config(upstream, models=[{"command-a-03-2025": "command-a"}]))
    stream = gateway.client("sk-client").chat.completions.create(**load("tools.request.json"))
    chunks = [chunk.model_dump(exclude_unset=True) for chunk in stream]
    for chunk in chunks:
        validate_chunk(chunk)
    folded = accumulate_stream(chunks)
    expected = load("tools.expected.json")["choices"][0]
    assert folded["message"]["tool_calls"] == expected["message"]["tool_calls"]
    assert folded["message"]["content"] == expected["message"]["content"]
    assert folded["finish_reason"] == "tool_calls"
    assert folded["usage"] == {"prompt_tokens": 913, "completion_tokens": 83, "total_tokens": 996}
    assert upstream.received[0].json == load("tools.native.json")


def test_gateway_stream_without_include_usage_has_no_usage_chunk(upstream: FakeUpstream,
                                                                 make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(raw_chunks=sse_chunks("text.upstream.sse")))
    gateway = make_gateway(cohere_config(upstream, models=["command-a"]))
    chunks = list(gateway.client("sk-client").chat.completions.create(
        model="command-a", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_gateway_passes_cohere_400_through(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(status=400, json=load("error_400.upstream.json")))
    gateway = make_gateway(cohere_config(upstream, models=["command-a"]))
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client("sk-client").chat.completions.create(model="command-a", messages=[{"role": "user",
                                                                                          "content": ""}])
    assert "at least 1 token long" in caught.value.message
    assert len(upstream.received) == 1


def test_gateway_fails_over_from_a_busy_cohere_channel(make_upstream: Callable[[], FakeUpstream],
                                                       make_gateway: MakeGateway) -> None:
    busy, healthy = make_upstream(), make_upstream()
    busy.enqueue(Reply(status=429, json=load("error_429.upstream.json")))
    healthy.enqueue(Reply(raw_chunks=sse_chunks("text.upstream.sse")))
    gateway = make_gateway(cohere_config(busy, healthy, models=["command-a"]))
    chunks = list(gateway.client("sk-client").chat.completions.create(
        model="command-a", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith('{"text": "LLMs')
    assert len(busy.received) == 1 and len(healthy.received) == 1


def test_gateway_reports_a_failed_cohere_generation(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json={**load("text.upstream.json"), "finish_reason": "ERROR"}))
    gateway = make_gateway(cohere_config(upstream, models=["command-a"]))
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client("sk-client").chat.completions.create(model="command-a", messages=[{"role": "user",
                                                                                          "content": "hi"}])
    assert caught.value.status_code == 502 and "cohere stopped with ERROR" in caught.value.message


def test_gateway_discovers_cohere_models(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("models.upstream.json")))
    gateway = make_gateway(cohere_config(upstream))
    listed = gateway.client("sk-client").models.list()
    assert [m.id for m in listed.data] == ["command-a-03-2025", "command-r7b-12-2024"]
    assert (upstream.received[0].path, upstream.received[0].query) == ("/v1/models",
                                                                      {"endpoint": "chat", "page_size": "1000"})
