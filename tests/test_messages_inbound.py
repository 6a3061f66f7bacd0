"""Anthropic Messages API inbound: the official anthropic SDK against the real gateway and fake upstreams of each
engine family, passthrough for Messages-speaking channels (claude, vertex-claude, aws), conversion for the rest.

References (Anthropic API reference): "Messages" (request, Message), "Streaming Messages" (event flow and SSE
framing), "Handling stop reasons", "Errors" (error shapes and statuses), "Count tokens in a Message".
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from conftest import (
    FakeUpstream,
    GatewayServer,
    Reply,
    bedrock_provider,
    chunks,
    completion,
    rsa_pem,
    simple_config,
    vertex_claude_provider,
)
from test_adapters_aws import chunk_frame

import adapters
import uni_api

FIXTURES = Path(__file__).parent / "fixtures"
MakeGateway = Callable[..., GatewayServer]
HI = [{"role": "user", "content": "hi"}]
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}


def raw_chunks(path: Path, size: int = 64) -> Reply:
    data = path.read_bytes()
    return Reply(raw_chunks=[data[i:i + size] for i in range(0, len(data), size)])


def sse_events(text: str) -> list[tuple[str, Any]]:
    """(event name, data) of each event of an Anthropic stream, checking its `event:` + `data:` framing."""
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: ")
        events.append((name[7:], json.loads(data[6:])))
    return events


def post_stream(gateway: GatewayServer, body: dict[str, Any]) -> list[tuple[str, Any]]:
    response = httpx.post(gateway.url + "/v1/messages", json={**body, "stream": True},
                          headers={"x-api-key": "sk-client", "anthropic-version": "2023-06-01"}, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    return sse_events(response.text)


def gpt_config(*upstreams: FakeUpstream, models: list[Any] | None = None) -> dict[str, Any]:
    return simple_config(*upstreams, models=models or ["gpt-4o"])


def claude_provider(upstream: FakeUpstream, name: str = "ant", models: list[Any] | None = None) -> dict[str, Any]:
    return {"provider": name, "base_url": f"{upstream.url}/v1/messages", "api": "sk-ant-secret", "engine": "claude",
            "model": models or [{"claude-sonnet-4-5-20250929": "sonnet"}], "preferences": {"cooldown_period": 0}}


def config_of(*providers: dict[str, Any]) -> dict[str, Any]:
    return {"providers": list(providers), "api_keys": [{"api": "sk-client"}]}


def openai_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up", **extra,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(prompt: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
             "total_tokens": prompt + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up", "choices": [],
            "usage": usage}


def call_delta(index: int, call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


# --- OpenAI-format channels: converted both ways ---


def test_gpt_channel_answers_a_non_stream_message(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    usage = {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34,
             "prompt_tokens_details": {"cached_tokens": 20}}
    upstream.enqueue(Reply(json=completion("Hello there", usage=usage)))
    gateway = make_gateway(gpt_config(upstream, models=[{"gpt-4o-2024-08-06": "gpt-4o"}]))
    message = gateway.anthropic().messages.create(
        model="gpt-4o", max_tokens=100, system="Be brief.", messages=HI, stop_sequences=["END"],
        metadata={"user_id": "u1"}, extra_body={"temperature": 0.2, "top_p": 0.9})
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [(b.type, b.text) for b in message.content] == [("text", "Hello there")]
    assert (message.model, message.stop_reason, message.stop_sequence) == ("gpt-4o", "end_turn", None)
    usage_seen = message.usage
    assert (usage_seen.input_tokens, usage_seen.output_tokens, usage_seen.cache_read_input_tokens) == (10, 4, 20)
    assert upstream.received[0].path == "/v1/chat/completions"
    assert upstream.received[0].json == {
        "model": "gpt-4o-2024-08-06", "messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "hi"}],
        "max_tokens": 100, "temperature": 0.2, "top_p": 0.9, "stop": ["END"]}


def test_gpt_stream_gives_the_exact_event_sequence_and_usage(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(sse=chunks(["Hel", "lo"], usage=True))
    gateway = make_gateway(gpt_config(upstream))
    events = post_stream(gateway, {"model": "gpt-4o", "max_tokens": 50, "messages": HI})
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert (start["model"], start["content"], start["stop_reason"]) == ("gpt-4o", [], None)
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[2][1] == {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}
    assert events[5][1] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"input_tokens": 5, "output_tokens": 2, "cache_creation_input_tokens": 0,
                                      "cache_read_input_tokens": 0}}
    assert upstream.received[0].json["stream"] is True
    assert upstream.received[0].json["stream_options"] == {"include_usage": True}


def test_sdk_stream_helper_assembles_text_thinking_and_several_tool_calls(upstream: FakeUpstream,
                                                                          make_gateway: MakeGateway) -> None:
    upstream.enqueue(sse=[
        openai_chunk({"role": "assistant", "reasoning_content": "Two cities, "}),
        openai_chunk({"reasoning_content": "two calls."}),
        openai_chunk({"content": "Checking both."}),
        openai_chunk(call_delta(0, "call_a", "get_weather", "")),
        openai_chunk(call_delta(0, None, None, '{"location": ')),
        openai_chunk(call_delta(0, None, None, '"Paris"}')),
        openai_chunk(call_delta(1, "call_b", "get_weather", '{"location": "Rome"}')),
        openai_chunk({}, "tool_calls"), usage_chunk(40, 12), "[DONE]"])
    gateway = make_gateway(gpt_config(upstream))
    with gateway.anthropic(None, auth_token="sk-client").messages.stream(
            model="gpt-4o", max_tokens=2000, messages=[{"role": "user", "content": "Weather in Paris and Rome?"}],
            tools=[WEATHER], thinking={"type": "enabled", "budget_tokens": 5000}) as stream:
        message = stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[0].thinking == "Two cities, two calls." and message.content[1].text == "Checking both."
    assert [(b.id, b.name, b.input) for b in message.content[2:]] == [
        ("call_a", "get_weather", {"location": "Paris"}), ("call_b", "get_weather", {"location": "Rome"})]
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == ("tool_use", 40, 12)
    sent = upstream.received[0].json
    assert sent["reasoning_effort"] == "medium" and sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["input_schema"], "description": "Weather of a city"}}]


def test_stream_block_indexes_follow_interleaved_text_and_tools(upstream: FakeUpstream,
                                                               make_gateway: MakeGateway) -> None:
    upstream.enqueue(sse=[openai_chunk({"role": "assistant", "content": "A"}),
                          openai_chunk(call_delta(0, "call_1", "f", "{}")), openai_chunk({"content": "B"}),
                          openai_chunk(call_delta(1, "call_2", "g", "{}")), openai_chunk({}, "tool_calls"), "[DONE]"])
    gateway = make_gateway(gpt_config(upstream))
    events = post_stream(gateway, {"model": "gpt-4o", "max_tokens": 50, "messages": HI})
    opened = [(data["index"], data["content_block"]["type"]) for name, data in events if name == "content_block_start"]
    closed = [data["index"] for name, data in events if name == "content_block_stop"]
    assert opened == [(0, "text"), (1, "tool_use"), (2, "text"), (3, "tool_use")] and closed == [0, 1, 2, 3]
    current = None
    for name, data in events:  # every delta and stop belongs to the block open at that point
        if name == "content_block_start":
            assert current is None
            current = data["index"]
        elif name in ("content_block_delta", "content_block_stop"):
            assert data["index"] == current
            current = None if name == "content_block_stop" else current


def test_tool_results_go_back_as_tool_messages_in_order(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    gateway = make_gateway(gpt_config(upstream))
    image = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    messages: list[Any] = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"location": "Paris"}},
            {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": {"location": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "call_b", "content": [
                {"type": "text", "text": "21C"}, {"type": "image", "source": image}]},
            {"type": "text", "text": "Which is warmer?"}]}]
    gateway.anthropic().messages.create(model="gpt-4o", max_tokens=10, messages=messages, tools=[WEATHER],
                                    tool_choice={"type": "any", "disable_parallel_tool_use": True})
    sent = upstream.received[0].json
    assert sent["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"location":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "21C"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                                     {"type": "text", "text": "Which is warmer?"}]}]
    assert (sent["tool_choice"], sent["parallel_tool_calls"]) == ("required", False)


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choice_maps_to_openai(choice: dict[str, Any], expected: Any) -> None:
    request = adapters.from_messages_request({"model": "m", "messages": HI, "tools": [WEATHER], "tool_choice": choice})
    assert request["tool_choice"] == expected and "parallel_tool_calls" not in request


@pytest.mark.parametrize(("extra", "expected"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, {"reasoning_effort": "low"}),
    ({"thinking": {"type": "enabled", "budget_tokens": 20000}}, {"reasoning_effort": "high"}),
    ({"thinking": {"type": "adaptive"}}, {}),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, {"reasoning_effort": "high"}),
    ({"output_config": {"effort": "low", "format": {"type": "json_schema", "schema": {"type": "object"}}}},
     {"reasoning_effort": "low", "response_format": {"type": "json_schema", "json_schema": {
         "name": "output", "schema": {"type": "object"}}}}),
])
def test_thinking_and_output_config_map_to_openai_fields(extra: dict[str, Any], expected: dict[str, Any]) -> None:
    request = adapters.from_messages_request({"model": "m", "max_tokens": 5, "messages": HI, **extra})
    assert request == {"model": "m", "max_tokens": 5, "messages": HI, **expected}


def test_system_blocks_and_image_sources_convert(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    gateway = make_gateway(gpt_config(upstream))
    content = [{"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
               {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
               {"type": "text", "text": "Same cat?"}]
    system = [{"type": "text", "text": "You compare images."},
              {"type": "text", "text": "Be exact.", "cache_control": {"type": "ephemeral"}}]
    gateway.anthropic().messages.create(model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": content}],
                                    system=system)
    assert upstream.received[0].json["messages"] == [
        {"role": "system", "content": "You compare images.\nBe exact."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                                     {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                                     {"type": "text", "text": "Same cat?"}]}]


@pytest.mark.parametrize(("choice", "stop_reason", "stop_sequence"), [
    ({"finish_reason": "stop"}, "end_turn", None),
    ({"finish_reason": "length"}, "max_tokens", None),
    ({"finish_reason": "tool_calls"}, "tool_use", None),
    ({"finish_reason": "content_filter"}, "refusal", None),
    ({"finish_reason": "stop", "stop_reason": "END"}, "stop_sequence", "END"),  # vLLM names the matched stop
    ({"finish_reason": "stop", "matched_stop": "###"}, "stop_sequence", "###"),  # SGLang
    ({"finish_reason": "stop", "stop_reason": 128001}, "end_turn", None),  # a stop token id, not a sequence
])
def test_finish_reasons_map_to_stop_reasons(upstream: FakeUpstream, make_gateway: MakeGateway, choice: dict[str, Any],
                                            stop_reason: str, stop_sequence: str | None) -> None:
    answer = completion("ok")
    answer["choices"][0].update(choice)
    upstream.enqueue(Reply(json=answer))
    gateway = make_gateway(gpt_config(upstream))
    message = gateway.anthropic().messages.create(model="gpt-4o", max_tokens=10, messages=HI,
                                                  stop_sequences=["END", "###"])
    assert (message.stop_reason, message.stop_sequence) == (stop_reason, stop_sequence)


def test_non_stream_reasoning_and_tool_calls_become_blocks(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    answer = completion("", usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})
    answer["choices"][0]["message"] = {"role": "assistant", "content": None, "reasoning_content": "Think.",
                                       "tool_calls": [{"id": "call_1", "type": "function", "function": {
                                           "name": "get_weather", "arguments": '{"location": "Oslo"}'}}]}
    answer["choices"][0]["finish_reason"] = "tool_calls"
    upstream.enqueue(Reply(json=answer))
    gateway = make_gateway(gpt_config(upstream))
    message = gateway.anthropic().messages.create(model="gpt-4o", max_tokens=10, messages=HI, tools=[WEATHER])
    assert [b.type for b in message.content] == ["thinking", "tool_use"] and message.content[0].thinking == "Think."
    assert (message.content[1].id, message.content[1].input, message.stop_reason) == (
        "call_1", {"location": "Oslo"}, "tool_use")


def test_stream_cut_after_commit_ends_with_an_error_event(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(sse=chunks(["one", "two", "three"]), reset_after=2))
    gateway = make_gateway(gpt_config(upstream))
    with pytest.raises(anthropic.APIStatusError) as error, gateway.anthropic().messages.stream(
            model="gpt-4o", max_tokens=10, messages=HI) as stream:
        stream.get_final_message()
    assert error.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "mid-stream" in error.value.body["error"]["message"]  # type: ignore[index]


@pytest.mark.parametrize("engine", ["gpt", "claude"])
def test_client_leaving_mid_stream_releases_the_upstream(upstream: FakeUpstream, make_gateway: MakeGateway,
                                                         engine: str) -> None:
    if engine == "gpt":
        upstream.enqueue(Reply(sse=chunks(["a"] * 50), stall_after=3))
        config = gpt_config(upstream)
    else:
        events = (FIXTURES / "claude" / "basic_stream.upstream.sse").read_bytes().split(b"\n\n")
        upstream.enqueue(Reply(raw_chunks=[event + b"\n\n" for event in events[:5]], stall_after=3))
        config = config_of(claude_provider(upstream, models=["gpt-4o"]))
    gateway = make_gateway(config)
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", gateway.url + "/v1/messages", headers={"x-api-key": "sk-client"},
            json={"model": "gpt-4o", "max_tokens": 5, "messages": HI, "stream": True}) as response:
        assert next(response.iter_bytes()).startswith(b"event: message_start\n")
    assert upstream.wait_cancelled(1, timeout=3)


# --- Native channels: passthrough ---


def test_claude_channel_gets_the_body_unconverted_and_answers_byte_faithfully(upstream: FakeUpstream,
                                                                             make_gateway: MakeGateway) -> None:
    raw = (b'{"id":"msg_1","type":"message","role":"assistant","model" : "claude-sonnet-4-5-20250929",'
           b'"content":[{"type":"text","text":"Hi \\"model\\": there"}],"stop_reason":"end_turn",'
           b'"stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":6,"future_field":1}}')
    upstream.enqueue(Reply(body=raw))
    gateway = make_gateway(config_of(claude_provider(upstream)))
    body = {"model": "sonnet", "max_tokens": 64, "messages": HI, "system": [{"type": "text", "text": "S",
            "cache_control": {"type": "ephemeral"}}], "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "service_tier": "auto"}
    response = httpx.post(gateway.url + "/v1/messages", json=body, timeout=30, headers={
        "x-api-key": "sk-client", "anthropic-version": "2023-06-01",
        "anthropic-beta": "interleaved-thinking-2025-05-14"})
    assert response.status_code == 200
    assert response.content == raw.replace(b'"claude-sonnet-4-5-20250929"', b'"sonnet"')
    sent = upstream.received[0]
    assert sent.path == "/v1/messages" and sent.json == {**body, "model": "claude-sonnet-4-5-20250929"}
    assert sent.headers["x-api-key"] == "sk-ant-secret" and sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"


def test_claude_stream_passes_every_event_through_with_the_alias(upstream: FakeUpstream,
                                                                make_gateway: MakeGateway) -> None:
    fixture = FIXTURES / "claude" / "tool_use_stream.upstream.sse"
    upstream.enqueue(raw_chunks(fixture))
    gateway = make_gateway(config_of(claude_provider(upstream)))
    events = post_stream(gateway, {"model": "sonnet", "max_tokens": 64, "messages": HI, "tools": [WEATHER]})
    expected = sse_events(fixture.read_text())
    expected[0][1]["message"]["model"] = "sonnet"
    assert events == expected
    upstream.enqueue(raw_chunks(fixture))
    with gateway.anthropic().messages.stream(model="sonnet", max_tokens=64, messages=HI, tools=[WEATHER]) as stream:
        message = stream.get_final_message()
    assert message.model == "sonnet" and message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert upstream.received[1].json["stream"] is True and upstream.received[1].json["tools"] == [WEATHER]


def test_claude_error_as_first_event_fails_over_to_the_next_channel(make_upstream: Callable[[], FakeUpstream],
                                                                   make_gateway: MakeGateway) -> None:
    busy, gpt = make_upstream(), make_upstream()
    busy.enqueue(raw_chunks(FIXTURES / "claude" / "error_overloaded.upstream.sse"))
    gpt.enqueue(sse=chunks(["from gpt"], usage=True))
    config = config_of(claude_provider(busy, models=[{"claude-sonnet-4-5-20250929": "gpt-4o"}]),
                       *gpt_config(gpt)["providers"])
    gateway = make_gateway(config)
    with gateway.anthropic().messages.stream(model="gpt-4o", max_tokens=10, messages=HI) as stream:
        message = stream.get_final_message()
    assert message.content[0].text == "from gpt" and len(busy.received) == len(gpt.received) == 1


def test_claude_count_tokens_is_passed_through(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json={"input_tokens": 2095}))
    gateway = make_gateway(config_of(claude_provider(upstream)))
    counted = gateway.anthropic().messages.count_tokens(model="sonnet", messages=HI, system="S", tools=[WEATHER])
    assert counted.input_tokens == 2095
    sent = upstream.received[0]
    assert sent.path == "/v1/messages/count_tokens" and sent.headers["x-api-key"] == "sk-ant-secret"
    assert sent.json == {"model": "claude-sonnet-4-5-20250929", "messages": HI, "system": "S", "tools": [WEATHER]}


def test_bedrock_channel_gets_its_envelope_and_streams_back_as_anthropic_sse(upstream: FakeUpstream,
                                                                            make_gateway: MakeGateway) -> None:
    model = "anthropic.claude-3-5-sonnet-20241022-v2:0"
    events = [json.loads(line[6:]) for line in (FIXTURES / "claude" / "basic_stream.upstream.sse").read_text()
              .splitlines() if line.startswith("data: ")]
    upstream.enqueue(Reply(raw_chunks=[chunk_frame(e) for e in events],
                           content_type="application/vnd.amazon.eventstream"))
    gateway = make_gateway(config_of(bedrock_provider(upstream.url, model, "claude-br")))
    with gateway.anthropic().messages.stream(model="claude-br", max_tokens=64, messages=HI) as stream:
        message = stream.get_final_message()
    assert message.model == "claude-br" and message.content[0].text
    sent = upstream.received[0]
    assert sent.path == f"/model/{model}/invoke-with-response-stream"
    assert sent.json == {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "messages": HI}


def test_vertex_claude_channel_gets_its_envelope_with_the_exchanged_token(upstream: FakeUpstream,
                                                                         make_gateway: MakeGateway) -> None:
    vertex = vertex_claude_provider(upstream.url, rsa_pem(), "claude-sonnet-4-5@20250929", "sonnet")
    upstream.enqueue(Reply(json={"access_token": "ya29.token", "expires_in": 3599}))
    upstream.enqueue(Reply(body=(FIXTURES / "claude" / "basic.upstream.json").read_bytes()))
    gateway = make_gateway(config_of(vertex))
    message = gateway.anthropic().messages.create(model="sonnet", max_tokens=64, messages=HI)
    assert (message.model, message.content[0].text) == ("sonnet", "Hi! My name is Claude.")
    call = upstream.received[1]
    assert call.path == ("/v1/projects/p/locations/us-east5/publishers/anthropic/models/"
                         "claude-sonnet-4-5@20250929:rawPredict")
    assert call.headers["Authorization"] == "Bearer ya29.token" and "anthropic-beta" not in call.headers
    assert call.json == {"anthropic_version": "vertex-2023-10-16", "max_tokens": 64, "messages": HI}


# --- Gemini and Cohere channels: conversion through their adapters ---


def gemini_provider(upstream: FakeUpstream) -> dict[str, Any]:
    return {"provider": "gem", "base_url": f"{upstream.url}/v1beta", "api": "AIza-secret",
            "model": ["gemini-2.0-flash"]}


def cohere_provider(upstream: FakeUpstream) -> dict[str, Any]:
    return {"provider": "co", "base_url": f"{upstream.url}/v2/chat", "api": "co-secret", "engine": "cohere",
            "model": ["command-a-03-2025"]}


def test_gemini_stream_of_text_and_parallel_calls_assembles(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(raw_chunks(FIXTURES / "gemini" / "parallel.upstream.sse"))
    gateway = make_gateway(config_of(gemini_provider(upstream)))
    tools = [{"name": n, "input_schema": {"type": "object", "properties": {}}}
             for n in ("power_disco_ball", "start_music", "dim_lights")]
    with gateway.anthropic().messages.stream(model="gemini-2.0-flash", max_tokens=100, tools=tools,
                                         messages=[{"role": "user", "content": "Party!"}]) as stream:
        message = stream.get_final_message()
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use", "tool_use"]
    assert message.content[0].text == "Let us get this party started."
    assert [(b.name, b.input) for b in message.content[1:]] == [
        ("power_disco_ball", {"power": True}), ("start_music", {"energetic": True, "loud": True}),
        ("dim_lights", {"brightness": 0.5})]
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == ("tool_use", 105, 47)
    assert upstream.received[0].path == "/v1beta/models/gemini-2.0-flash:streamGenerateContent"


def test_gemini_non_stream_thinking_becomes_a_thinking_block(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=json.loads((FIXTURES / "gemini" / "thinking.upstream.json").read_text())))
    gateway = make_gateway(config_of(gemini_provider(upstream)))
    message = gateway.anthropic().messages.create(model="gemini-2.0-flash", max_tokens=100, messages=HI)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking.startswith("**Recalling the final**")
    assert message.usage.cache_read_input_tokens == 16 and message.stop_reason == "end_turn"


def test_cohere_tool_stream_assembles_and_text_answers(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(raw_chunks(FIXTURES / "cohere" / "tools.upstream.sse"))
    upstream.enqueue(Reply(json=json.loads((FIXTURES / "cohere" / "text.upstream.json").read_text())))
    gateway = make_gateway(config_of(cohere_provider(upstream)))
    with gateway.anthropic().messages.stream(model="command-a-03-2025", max_tokens=100, tools=[WEATHER],
                                         messages=[{"role": "user", "content": "Madrid and Brasilia?"}]) as stream:
        message = stream.get_final_message()
    calls = [b for b in message.content if b.type == "tool_use"]
    assert [(b.id, b.input) for b in calls] == [("get_weather_p1t92w7gfgq7", {"location": "Madrid"}),
                                                ("get_weather_ay6nmvjgp9vn", {"location": "Brasilia"})]
    assert message.stop_reason == "tool_use"
    answer = gateway.anthropic().messages.create(model="command-a-03-2025", max_tokens=100, messages=HI)
    assert answer.content[0].type == "text" and answer.content[0].text and answer.stop_reason == "end_turn"
    assert upstream.received[0].json["tools"][0]["function"]["name"] == "get_weather"


# --- count_tokens, errors and auth ---


def test_count_tokens_is_estimated_without_an_anthropic_channel(upstream: FakeUpstream,
                                                                make_gateway: MakeGateway) -> None:
    gateway = make_gateway(gpt_config(upstream))
    text = "word " * 200
    counted = gateway.anthropic().messages.count_tokens(model="gpt-4o", messages=[{"role": "user", "content": text}])
    assert counted.input_tokens == adapters.estimate_input_tokens({"messages": [{"role": "user", "content": text}]})
    assert 250 <= counted.input_tokens <= 270 and upstream.received == []
    image = {"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "A" * 400_000}}]}
    assert gateway.anthropic().messages.count_tokens(model="gpt-4o", messages=[image]).input_tokens < 1700


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]  # type: ignore[no-any-return]


def test_errors_take_anthropic_shape_and_statuses(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    config = gpt_config(upstream, models=["gpt-4o", "o1"])
    config["api_keys"] = [{"api": "sk-client", "model": ["gpt-4o"]}]
    config["preferences"] = {"max_body_size": 2000}
    gateway = make_gateway(config)
    url, good = gateway.url + "/v1/messages", {"model": "gpt-4o", "max_tokens": 5, "messages": HI}
    cases = [({}, good, 401, "authentication_error"), ({"x-api-key": "sk-wrong"}, good, 401, "authentication_error"),
             ({"x-api-key": "sk-client"}, {**good, "model": "o1"}, 403, "permission_error"),
             ({"x-api-key": "sk-client"}, {**good, "model": "nope"}, 404, "not_found_error"),
             ({"x-api-key": "sk-client"}, {"model": "gpt-4o", "max_tokens": 5}, 400, "invalid_request_error"),
             ({"x-api-key": "sk-client"}, {**good, "messages": [{"role": "system", "content": "x"}]}, 400,
              "invalid_request_error"),
             ({"x-api-key": "sk-client"}, {**good, "system": "x" * 3000}, 413, "request_too_large")]
    for headers, body, status, kind in cases:
        response = httpx.post(url, json=body, headers=headers, timeout=30)
        assert (response.status_code, error_of(response)["type"]) == (status, kind), body
    assert upstream.received == []
    with pytest.raises(anthropic.PermissionDeniedError):
        gateway.anthropic().messages.create(model="o1", max_tokens=5, messages=HI)
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "nope", "messages": HI},
                          headers={"x-api-key": "sk-client"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"  # OpenAI's shape


def test_rate_limit_is_429_rate_limit_error_with_retry_after(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    gateway = make_gateway(simple_config(upstream, rate_limit="1/min"))
    gateway.anthropic().messages.create(model="gpt-4o", max_tokens=5, messages=HI)
    with pytest.raises(anthropic.RateLimitError) as error:
        gateway.anthropic().messages.create(model="gpt-4o", max_tokens=5, messages=HI)
    assert int(error.value.response.headers["retry-after"]) >= 1
    assert error.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


@pytest.mark.parametrize(("upstream_status", "status", "kind"), [
    (400, 400, "invalid_request_error"), (500, 502, "api_error"), (429, 503, "overloaded_error")])
def test_upstream_failures_map_to_anthropic_error_types(upstream: FakeUpstream, make_gateway: MakeGateway,
                                                        upstream_status: int, status: int, kind: str) -> None:
    upstream.enqueue(Reply(status=upstream_status, json={"error": {"message": "upstream says no"}}))
    gateway = make_gateway(gpt_config(upstream))
    response = httpx.post(gateway.url + "/v1/messages", json={"model": "gpt-4o", "max_tokens": 5, "messages": HI},
                          headers={"authorization": "Bearer sk-client"}, timeout=30)
    assert (response.status_code, error_of(response)["type"]) == (status, kind)
    assert "upstream says no" in error_of(response)["message"]


def test_server_tools_need_a_claude_channel(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    gateway = make_gateway(gpt_config(upstream))
    with pytest.raises(anthropic.APIStatusError) as error:
        gateway.anthropic().messages.create(model="gpt-4o", max_tokens=5, messages=HI,
                                        tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "needs a Claude channel" in error.value.message and upstream.received == []


# --- Statistics: Messages requests are counted like chat requests ---


def test_messages_requests_are_recorded_with_key_model_provider_and_tokens(
        make_upstream: Callable[[], FakeUpstream], make_gateway: MakeGateway, tmp_path: Path) -> None:
    ant, gpt = make_upstream(), make_upstream()
    db = tmp_path / "stats.db"
    gateway = make_gateway(config_of(claude_provider(ant), *gpt_config(gpt)["providers"]),
                           stats_options=uni_api.StatsOptions(str(db)))
    ant.enqueue(body=(FIXTURES / "claude" / "basic.upstream.json").read_bytes())  # usage 2095 in, 503 out
    ant.enqueue(raw_chunks(FIXTURES / "claude" / "basic_stream.upstream.sse"))  # 25 in, then 15 out
    gpt.enqueue(json=completion("hi", usage={"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}))
    gpt.enqueue(sse=chunks(["a", "b", "c"], usage=True))  # 5 in, 3 out
    gateway.anthropic().messages.create(model="sonnet", max_tokens=10, messages=HI)
    post_stream(gateway, {"model": "sonnet", "max_tokens": 10, "messages": HI})
    gateway.anthropic().messages.create(model="gpt-4o", max_tokens=10, messages=HI)
    post_stream(gateway, {"model": "gpt-4o", "max_tokens": 10, "messages": HI})
    gateway.server_loop.run(gateway.state.stats.flush())
    with sqlite3.connect(db) as connection:
        found = connection.execute("SELECT key, model, provider, upstream_model, endpoint, status, attempts,"
                                   " prompt_tokens, completion_tokens FROM requests ORDER BY id").fetchall()
    assert found == [
        ("sk-clie...", "sonnet", "ant", "claude-sonnet-4-5-20250929", "POST /v1/messages", 200, 1, 2095, 503),
        ("sk-clie...", "sonnet", "ant", "claude-sonnet-4-5-20250929", "POST /v1/messages", 200, 1, 25, 15),
        ("sk-clie...", "gpt-4o", "up0", "gpt-4o", "POST /v1/messages", 200, 1, 7, 2),
        ("sk-clie...", "gpt-4o", "up0", "gpt-4o", "POST /v1/messages", 200, 1, 5, 3)]
