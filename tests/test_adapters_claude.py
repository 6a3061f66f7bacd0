"""Claude (Anthropic Messages API) adapter: golden fixtures from Anthropic's docs, then end to end through the gateway.

References (fixtures/claude/SOURCES.md names the section of each fixture): Messages API "Create a Message",
"Streaming Messages", "Tool use with Claude" (tool_choice, parallel tool use, handling tool results),
"Building with extended thinking", "Vision", "Prompt caching", "Errors", Models API "List Models".
"""

from __future__ import annotations

import functools
import json
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
from adapters import Provider, Target, UpstreamError

FIXTURES = Path(__file__).parent / "fixtures" / "claude"
load = functools.partial(load_fixture, "claude")
load_jsonl = functools.partial(load_fixture_lines, "claude")
sse_chunks = functools.partial(fixture_sse, "claude")
CLAUDE = adapters.ADAPTERS["claude"]
PROVIDER = Provider("c", "claude", "https://api.anthropic.com/v1/messages", api_keys=("sk-ant-secret",))
TARGET = Target(PROVIDER, "claude-3-5-sonnet-20241022", "sk-ant-secret")
REQUEST_CASES = sorted(p.name.split(".")[0] for p in FIXTURES.glob("*.request.json"))
RESPONSE_CASES = sorted(p.name.split(".")[0] for p in FIXTURES.glob("*.upstream.json") if "error" not in p.name
                        and "models" not in p.name)
STREAM_CASES = sorted(p.name.split(".")[0] for p in FIXTURES.glob("*_stream.upstream.sse"))
USER = {"role": "user", "content": "hi"}


def normalise(answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "id": "chatcmpl-test", "created": 0}


def sse_bytes(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def events_of(name: str) -> list[dict[str, Any]]:
    blocks = (FIXTURES / name).read_text().split("\n\n")
    return [json.loads(line[6:]) for block in blocks for line in block.splitlines() if line.startswith("data: ")]


async def convert(data: bytes, include_usage: bool = False, adapter: adapters.Adapter = CLAUDE) -> list[dict[str, Any]]:
    stream = adapter.parse_stream(adapter.iter_events(byte_pieces(data)), "claude-3-5-sonnet",
                                  include_usage=include_usage)
    return [chunk async for chunk in stream]


def fold_claude_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The Message a stream describes, built the way Anthropic's SDK accumulates events."""
    message: dict[str, Any] = {}
    for event in events:
        if event["type"] == "message_start":
            message = {**event["message"], "content": []}
        elif event["type"] == "content_block_start":
            message["content"].append({**event["content_block"], "_json": ""})
        elif event["type"] == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            for field, key in (("text", "text"), ("thinking", "thinking"), ("_json", "partial_json")):
                block[field] = block.get(field, "") + delta.get(key, "")
        elif event["type"] == "message_delta":
            message.update(event["delta"])
            message["usage"] = {**message.get("usage", {}), **event.get("usage", {})}
    for block in message["content"]:
        if block["type"] == "tool_use":
            block["input"] = json.loads(block["_json"] or "{}")
    return message


def parsed_calls(message: dict[str, Any]) -> list[tuple[str, str, Any]]:
    return [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message.get("tool_calls") or ()]


# --- Requests ---


@pytest.mark.parametrize("case", REQUEST_CASES)
def test_claude_request_matches_golden_body(case: str) -> None:
    request = CLAUDE.build_request(load(f"{case}.request.json"), TARGET)
    assert request.url == "https://api.anthropic.com/v1/messages"
    assert request.headers == {"x-api-key": "sk-ant-secret", "anthropic-version": "2023-06-01"}
    assert request.json == load(f"{case}.native.json")
    assert request.stream == bool(load(f"{case}.request.json").get("stream"))


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", {"type": "auto"}),
    ("none", {"type": "none"}),  # the original uni-api sent "any" here
    ("required", {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    (None, None),
])
def test_claude_tool_choice_maps_to_messages_api(choice: Any, expected: dict[str, Any] | None) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    payload = CLAUDE.payload({"messages": [USER], "tools": tools, "tool_choice": choice}, TARGET)
    assert payload.get("tool_choice") == expected


@pytest.mark.parametrize(("choice", "expected"), [
    (None, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", {"type": "any", "disable_parallel_tool_use": True}),
    ("none", {"type": "none"}),
])
def test_claude_parallel_tool_calls_false_disables_parallel_use(choice: Any, expected: dict[str, Any]) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = {"messages": [USER], "tools": tools, "tool_choice": choice, "parallel_tool_calls": False}
    payload = CLAUDE.payload(body, TARGET)
    assert payload["tool_choice"] == expected
    assert payload["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]


def test_claude_native_tool_types_pass_through() -> None:
    web_search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
    assert CLAUDE.payload({"messages": [USER], "tools": [web_search]}, TARGET)["tools"] == [web_search]


def test_claude_provider_without_tools_sends_none() -> None:
    target = Target(Provider("c", "claude", PROVIDER.base_url, tools=False), "m", "k")
    body = {"messages": [USER], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}
    payload = CLAUDE.payload(body, target)
    assert "tools" not in payload and "tool_choice" not in payload


@pytest.mark.parametrize(("body", "expected"), [
    ({}, 4096),
    ({"max_tokens": 100}, 100),
    ({"max_tokens": 100, "max_completion_tokens": 200}, 200),
])
def test_claude_max_tokens_is_always_sent(body: dict[str, Any], expected: int) -> None:
    assert CLAUDE.payload({"messages": [USER], **body}, TARGET)["max_tokens"] == expected


@pytest.mark.parametrize(("body", "thinking", "max_tokens"), [
    ({"reasoning_effort": "low"}, {"type": "enabled", "budget_tokens": 1024}, 4096),
    ({"reasoning_effort": "medium", "max_tokens": 1000}, {"type": "enabled", "budget_tokens": 4096}, 5096),
    ({"reasoning_effort": "minimal"}, None, 4096),
    ({"thinking": {"type": "disabled"}, "reasoning_effort": "high"}, {"type": "disabled"}, 4096),
    ({"thinking": {"type": "enabled"}}, {"type": "enabled", "budget_tokens": 4096}, 8192),
])
def test_claude_reasoning_becomes_thinking(body: dict[str, Any], thinking: dict[str, Any] | None,
                                           max_tokens: int) -> None:
    payload = CLAUDE.payload({"messages": [USER], "temperature": 0.3, "top_k": 5, **body}, TARGET)
    assert payload.get("thinking") == thinking
    assert payload["max_tokens"] == max_tokens
    enabled = (thinking or {}).get("type") == "enabled"
    assert ("temperature" in payload, "top_k" in payload) == (not enabled, not enabled)


def test_claude_json_schema_becomes_a_system_instruction() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = {"messages": [USER], "response_format": response_format}
    (instruction,) = CLAUDE.payload(body, TARGET)["system"]
    assert instruction["text"].startswith("Reply with one valid JSON value only")
    assert json.loads(instruction["text"].split("JSON schema: ", 1)[1]) == schema


def test_claude_conversation_opening_with_the_assistant_gets_a_user_turn_first() -> None:
    body = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "Hello!"}, USER]}
    messages = CLAUDE.payload(body, TARGET)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]


def test_claude_empty_messages_are_dropped_and_neighbours_merged() -> None:
    body = {"messages": [USER, {"role": "user", "content": ""}, {"role": "user", "content": [{"type": "text",
                                                                                             "text": "again"}]}]}
    assert CLAUDE.payload(body, TARGET)["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}]}]


def test_claude_pdf_files_and_cache_control_are_carried() -> None:
    part = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}
    text = {"type": "text", "text": "summarise", "cache_control": {"type": "ephemeral"}}
    payload = CLAUDE.payload({"messages": [{"role": "user", "content": [part, text]}]}, TARGET)
    content = payload["messages"][0]["content"]
    assert content == [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
        {"type": "text", "text": "summarise", "cache_control": {"type": "ephemeral"}}]


@pytest.mark.parametrize("part", [
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-abc"}},
])
def test_claude_rejects_content_it_cannot_carry_but_lets_another_channel_try(part: dict[str, Any]) -> None:
    with pytest.raises(UpstreamError) as caught:
        CLAUDE.build_request({"messages": [{"role": "user", "content": [part]}]}, TARGET)
    assert caught.value.status == 400 and caught.value.retryable


def test_claude_tool_arguments_that_are_not_an_object_are_a_client_error() -> None:
    call = {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}
    with pytest.raises(UpstreamError) as caught:
        CLAUDE.payload({"messages": [USER, {"role": "assistant", "tool_calls": [call]}]}, TARGET)
    assert caught.value.status == 400 and not caught.value.retryable


def test_claude_overrides_and_custom_headers_apply() -> None:
    provider = Provider("c", "claude", PROVIDER.base_url, headers={"anthropic-beta": "prompt-caching-2024-07-31"},
                        overrides={"all": {"top_k": 3}, "claude-3-5-sonnet-20241022": {"max_tokens": 77}})
    request = CLAUDE.build_request({"messages": [USER]}, Target(provider, "claude-3-5-sonnet-20241022", "k"))
    assert request.json["top_k"] == 3 and request.json["max_tokens"] == 77
    assert request.headers["anthropic-beta"] == "prompt-caching-2024-07-31"


@pytest.mark.parametrize(("base_url", "chat", "models"), [
    ("https://api.anthropic.com/v1/messages", "https://api.anthropic.com/v1/messages",
     "https://api.anthropic.com/v1/models?limit=1000"),
    ("http://127.0.0.1:9/proxy/v1/messages/", "http://127.0.0.1:9/proxy/v1/messages",
     "http://127.0.0.1:9/proxy/v1/models?limit=1000"),
    ("https://gw.example/anthropic", "https://gw.example/anthropic/v1/messages",
     "https://gw.example/anthropic/v1/models?limit=1000"),
])
def test_claude_urls_derive_from_base_url(base_url: str, chat: str, models: str) -> None:
    provider = Provider("c", "claude", base_url)
    assert CLAUDE.build_request({"messages": [USER]}, Target(provider, "m", "k")).url == chat
    request = CLAUDE.build_models_request(Target(provider, "", "k"))
    assert (request.method, request.url) == ("GET", models)
    assert request.headers == {"x-api-key": "k", "anthropic-version": "2023-06-01"}


# --- Responses and streams ---


@pytest.mark.parametrize("case", RESPONSE_CASES)
def test_claude_response_converts_to_golden(case: str) -> None:
    answer = CLAUDE.parse_response(load(f"{case}.upstream.json"), "claude-3-5-sonnet")
    validate_completion(answer)
    assert normalise(answer) == load(f"{case}.expected.json")


@pytest.mark.anyio
@pytest.mark.parametrize("case", STREAM_CASES)
async def test_claude_stream_converts_to_golden(case: str) -> None:
    include_usage = bool(load(f"{case}.request.json").get("stream_options"))
    chunks = await convert((FIXTURES / f"{case}.upstream.sse").read_bytes(), include_usage)
    for chunk in chunks:
        validate_chunk(chunk)
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert [normalise(c) for c in chunks] == load_jsonl(f"{case}.expected.jsonl")


@pytest.mark.anyio
@pytest.mark.parametrize("case", STREAM_CASES)
async def test_claude_accumulated_stream_equals_response(case: str) -> None:
    chunks = await convert((FIXTURES / f"{case}.upstream.sse").read_bytes(), include_usage=True)
    folded = accumulate_stream(chunks)
    answer = CLAUDE.parse_response(fold_claude_events(events_of(f"{case}.upstream.sse")), "m")["choices"][0]
    assert folded["message"]["role"] == "assistant"
    for key in ("content", "reasoning_content"):
        assert folded["message"].get(key) == answer["message"].get(key)
    assert parsed_calls(folded["message"]) == parsed_calls(answer["message"])
    assert folded["finish_reason"] == answer["finish_reason"]


PARALLEL_STREAM = [
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                          "model": "claude", "usage": {"input_tokens": 10, "output_tokens": 1,
                                                                       "cache_read_input_tokens": 90}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking both."}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_a",
                                                                   "name": "get_weather", "input": {}}},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_b",
                                                                   "name": "get_time", "input": {}}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"tz\""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ": \"SF\"}"}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ": \"PT\"}"}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 40}},
    {"type": "message_stop"},
]


@pytest.mark.anyio
async def test_claude_stream_keeps_every_parallel_tool_call_with_its_own_index() -> None:
    chunks = await convert(sse_bytes(PARALLEL_STREAM), include_usage=True)
    indexes = [call["index"] for c in chunks if c["choices"] for call in c["choices"][0]["delta"].get("tool_calls", ())]
    assert indexes == [0, 1, 1, 0, 0, 1]  # OpenAI indexes by tool order, not Anthropic's content index
    folded = accumulate_stream(chunks)
    assert parsed_calls(folded["message"]) == [("toolu_a", "get_weather", {"city": "SF"}),
                                               ("toolu_b", "get_time", {"tz": "PT"})]
    assert folded["finish_reason"] == "tool_calls"
    assert folded["usage"] == {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
                               "prompt_tokens_details": {"cached_tokens": 90}}
    assert chunks[-1]["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.anyio
@pytest.mark.parametrize(("reason", "finish"), [("max_tokens", "length"), ("stop_sequence", "stop"),
                                                ("refusal", "content_filter"), ("end_turn", "stop")])
async def test_claude_stop_reasons_map_to_finish_reasons(reason: str, finish: str) -> None:
    events = [PARALLEL_STREAM[0], {"type": "message_delta", "delta": {"stop_reason": reason}}, {"type": "message_stop"}]
    chunks = await convert(sse_bytes(events))
    assert chunks[-1]["choices"][0]["finish_reason"] == finish
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    answer = CLAUDE.parse_response({"content": [], "stop_reason": reason}, "m")
    assert answer["choices"][0]["finish_reason"] == finish and answer["choices"][0]["message"]["content"] is None


@pytest.mark.anyio
async def test_claude_stream_error_event_raises_a_retryable_overload() -> None:
    with pytest.raises(UpstreamError) as caught:
        await convert((FIXTURES / "error_overloaded.upstream.sse").read_bytes())
    assert (caught.value.status, caught.value.retryable) == (529, True)
    assert "Overloaded" in caught.value.message


@pytest.mark.anyio
async def test_claude_stream_cut_before_it_finished_raises() -> None:
    with pytest.raises(UpstreamError) as caught:
        await convert(sse_bytes(PARALLEL_STREAM[:5]))
    assert caught.value.status == 502


@pytest.mark.parametrize(("fixture", "status", "message"), [
    ("error_400.upstream.json", 400, "max_tokens: Field required"),
    ("error_529.upstream.json", 529, "Overloaded"),
])
def test_claude_error_bodies_give_their_message(fixture: str, status: int, message: str) -> None:
    error = CLAUDE.parse_error(status, (FIXTURES / fixture).read_bytes())
    assert (error.status, error.message, error.retryable) == (status, message, status != 400)


@pytest.mark.anyio
async def test_claude_answers_leave_created_zero_for_the_gateway_to_stamp() -> None:
    """The Messages API carries no timestamp and adapters never read the clock: uni_api._stamp fills it."""
    assert CLAUDE.parse_response(load("basic.upstream.json"), "m")["created"] == 0
    events = CLAUDE.parse_stream(adapters.iter_sse(byte_pieces(sse_bytes(PARALLEL_STREAM))), "m", include_usage=True)
    assert {chunk["created"] async for chunk in events} == {0}


def test_claude_models_list_gives_ids() -> None:
    assert CLAUDE.parse_models(load("models.upstream.json")) == ["claude-sonnet-4-20250514",
                                                                 "claude-3-5-haiku-20241022"]


@pytest.mark.parametrize(("base_url", "engine"), [
    ("https://api.anthropic.com/v1/messages", "claude"),
    ("https://my-proxy.example/v1/messages", "claude"),
    ("https://bedrock-runtime.eu-west-1.amazonaws.com", "aws"),
    ("https://vpce-1.bedrock-runtime.us-east-1.vpce.amazonaws.com", "aws"),
])
def test_claude_engines_are_inferred_from_base_url(base_url: str, engine: str) -> None:
    assert adapters.infer_engine(base_url, "claude-3-5-sonnet") == engine


# --- End to end through the gateway ---

MakeGateway = Callable[..., GatewayServer]


claude_config = functools.partial(engine_config, "claude")


SONNET = [{"claude-3-5-sonnet-20241022": "claude-3-5-sonnet"}]


def test_gateway_answers_claude_tool_calls_through_the_openai_sdk(upstream: FakeUpstream,
                                                                  make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("conversation.upstream.json")))
    gateway = make_gateway(claude_config(upstream, models=SONNET))
    request = load("conversation.request.json")
    answer = gateway.client("sk-client").chat.completions.create(**request)
    validate_completion(answer.model_dump(exclude_unset=True))
    expected = load("conversation.expected.json")["choices"][0]
    assert answer.model == "claude-3-5-sonnet" and answer.choices[0].finish_reason == "tool_calls"
    assert [c.model_dump() for c in answer.choices[0].message.tool_calls or ()] == expected["message"]["tool_calls"]
    assert answer.usage is not None and answer.usage.prompt_tokens == 188107
    sent = upstream.received[0]
    assert (sent.method, sent.path) == ("POST", "/v1/messages")
    assert (sent.headers["x-api-key"], sent.headers["anthropic-version"]) == ("sk-ant-secret-0", "2023-06-01")
    assert sent.json == load("conversation.native.json")


def test_gateway_streams_claude_tool_use_with_a_final_finish_reason(upstream: FakeUpstream,
                                                                   make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(raw_chunks=sse_chunks("tool_use_stream.upstream.sse")))
    gateway = make_gateway(claude_config(upstream, models=SONNET))
    request = {**load("tool_use_stream.request.json"), "stream_options": {"include_usage": True}}
    chunks = [c.model_dump(exclude_unset=True) for c in gateway.client("sk-client").chat.completions.create(**request)]
    for chunk in chunks:
        validate_chunk(chunk)
    folded = accumulate_stream(chunks)
    assert folded["message"]["content"] == "Okay, let's check the weather for San Francisco, CA:"
    assert parsed_calls(folded["message"]) == [("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather",
                                                {"location": "San Francisco, CA", "unit": "fahrenheit"})]
    assert folded["finish_reason"] == "tool_calls"
    assert folded["usage"] == {"prompt_tokens": 472, "completion_tokens": 89, "total_tokens": 561}
    assert upstream.received[0].json == load("tool_use_stream.native.json")


def test_gateway_streams_claude_thinking_as_reasoning_content(upstream: FakeUpstream,
                                                              make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(raw_chunks=sse_chunks("thinking_stream.upstream.sse")))
    gateway = make_gateway(claude_config(upstream, models=SONNET))
    stream = gateway.client("sk-client").chat.completions.create(
        model="claude-3-5-sonnet", messages=[{"role": "user", "content": "What is 27 * 453?"}], stream=True,
        reasoning_effort="low")
    chunks = [c.model_dump(exclude_unset=True) for c in stream]
    assert all(chunk.get("usage") is None for chunk in chunks)  # include_usage was not asked for
    folded = accumulate_stream(chunks)
    assert folded["message"]["content"] == "27 * 453 = 12,231"
    assert folded["message"]["reasoning_content"].endswith("10,800 + 1,350 + 81 = 12,231")
    assert upstream.received[0].json["thinking"] == {"type": "enabled", "budget_tokens": 1024}


def test_gateway_passes_claude_400_through(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(status=400, json=load("error_400.upstream.json")))
    gateway = make_gateway(claude_config(upstream, models=SONNET))
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client("sk-client").chat.completions.create(model="claude-3-5-sonnet", messages=[USER])
    assert "max_tokens: Field required" in caught.value.message
    assert len(upstream.received) == 1


def test_gateway_fails_over_from_an_overloaded_claude_stream(make_upstream: Callable[[], FakeUpstream],
                                                             make_gateway: MakeGateway) -> None:
    busy, healthy = make_upstream(), make_upstream()
    overloaded = sse_chunks("basic_stream.upstream.sse")[:1] + sse_chunks("error_overloaded.upstream.sse")
    busy.enqueue(Reply(raw_chunks=overloaded))
    healthy.enqueue(Reply(raw_chunks=sse_chunks("basic_stream.upstream.sse")))
    gateway = make_gateway(claude_config(busy, healthy, models=SONNET))
    chunks = list(gateway.client("sk-client").chat.completions.create(model="claude-3-5-sonnet", messages=[USER],
                                                                      stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello!"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(busy.received) == 1 and len(healthy.received) == 1


def test_gateway_discovers_claude_models(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("models.upstream.json")))
    gateway = make_gateway(claude_config(upstream))
    listed = gateway.client("sk-client").models.list()
    assert [m.id for m in listed.data] == ["claude-sonnet-4-20250514", "claude-3-5-haiku-20241022"]
    sent = upstream.received[0]
    assert (sent.method, sent.path, sent.query) == ("GET", "/v1/models", {"limit": "1000"})
    assert sent.headers["x-api-key"] == "sk-ant-secret-0"


# Anthropic "Extended thinking" with tool use: the turn's thinking blocks must come back verbatim, signed, first
# in the assistant turn. They ride in the OpenAI message as `thinking_blocks`, so a client that sends the
# assistant message back as it got it (the openai SDK keeps unknown fields) keeps a Claude tool loop going.
THINKING_TOOL_ANSWER = {
    "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "stop_reason": "tool_use",
    "content": [{"type": "thinking", "thinking": "I should look the weather up.", "signature": "sig-EqQBCgIYAh"},
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"location": "Paris"}}],
    "usage": {"input_tokens": 20, "output_tokens": 30}}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}


def test_thinking_blocks_go_back_to_claude_signed_when_the_client_returns_the_message(
        upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=THINKING_TOOL_ANSWER))
    upstream.enqueue(Reply(json=load("basic.upstream.json")))
    client = make_gateway(claude_config(upstream, models=SONNET)).client("sk-client")
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model="claude-3-5-sonnet", messages=messages, tools=[WEATHER_TOOL],
                                           reasoning_effort="low")
    reply = first.choices[0].message
    assert reply.reasoning_content == "I should look the weather up."  # type: ignore[attr-defined]
    assert reply.thinking_blocks == THINKING_TOOL_ANSWER["content"][:2]  # type: ignore[attr-defined]
    messages += [reply, {"role": "tool", "tool_call_id": "toolu_01", "content": "18 C, sunny"}]
    client.chat.completions.create(model="claude-3-5-sonnet", messages=messages, tools=[WEATHER_TOOL],
                                   reasoning_effort="low")
    turns = upstream.received[1].json["messages"]
    assert [turn["role"] for turn in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == THINKING_TOOL_ANSWER["content"]  # signed thinking first, verbatim
    assert turns[2]["content"][0] == {"type": "tool_result", "tool_use_id": "toolu_01",
                                      "content": [{"type": "text", "text": "18 C, sunny"}]}


@pytest.mark.anyio
async def test_a_streamed_thinking_block_arrives_whole_and_signed_after_its_text() -> None:
    chunks = await convert((FIXTURES / "thinking_stream.upstream.sse").read_bytes(), include_usage=False)
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks if c["choices"])
    blocks = [block for c in chunks if c["choices"] for block in c["choices"][0]["delta"].get("thinking_blocks", ())]
    signature = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds..."  # the fixture's signature_delta
    assert blocks == [{"type": "thinking", "thinking": reasoning, "signature": signature}]


def test_thinking_blocks_of_other_types_or_shapes_are_not_sent_to_claude() -> None:
    body = {"model": "m", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok", "thinking_blocks": [
            {"type": "thinking", "thinking": "t", "signature": "s", "extra": 1}, {"type": "other"}, "text"]}]}
    sent = CLAUDE.payload(body, TARGET)["messages"][1]["content"]
    assert sent == [{"type": "thinking", "thinking": "t", "signature": "s"}, {"type": "text", "text": "ok"}]
