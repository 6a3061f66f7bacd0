"""Responses engine (OpenAI's Responses API as an upstream): chat requests converted to Responses requests and
the answers and streams back to chat, then chat and Messages clients end to end through the gateway.

References (fixtures/responses/SOURCES.md names the source of each fixture): OpenAI API reference "Responses"
("Create a model response", "The response object", "Streaming events"), "Migrate to the Responses API" (the
Chat Completions -> Responses field table), and the OpenAPI spec in ../shared/openai-openapi.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest
from conftest import FakeUpstream, GatewayServer, Reply
from openai_schema import accumulate_stream, validate_chunk, validate_completion
from responses_wire import call_events, call_item, json_reply, message_item, sse_body, stream_reply, text_events

import adapters
import uni_api
from adapters import Provider, Target, UpstreamError

FIXTURES = Path(__file__).parent / "fixtures" / "responses"
RESPONSES = adapters.ADAPTERS["responses"]
PROVIDER = Provider("r", "responses", "https://api.openai.com/v1/responses", api_keys=("sk-resp-secret",))
TARGET = Target(PROVIDER, "gpt-4.1-2025-04-14", "sk-resp-secret")
REQUEST_CASES = sorted(p.name.split(".")[0] for p in FIXTURES.glob("*.request.json"))
RESPONSE_CASES = sorted(p.name.split(".")[0] for p in FIXTURES.glob("*.expected.json"))
STREAM_CASES = sorted(p.name.split(".")[0] for p in FIXTURES.glob("*.expected.jsonl"))
USER = {"role": "user", "content": "hi"}
MakeGateway = Callable[..., GatewayServer]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def load_jsonl(name: str) -> list[Any]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line]


async def _pieces(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):  # small pieces: events split across network reads
        yield data[i:i + size]


async def convert(data: bytes, include_usage: bool = False) -> list[dict[str, Any]]:
    stream = RESPONSES.parse_stream(RESPONSES.iter_events(_pieces(data)), "gpt-4.1", include_usage=include_usage)
    return [chunk async for chunk in stream]


def without_ids(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**chunk, "id": "chatcmpl-test"} for chunk in chunks]


# --- Requests ---


@pytest.mark.parametrize("case", REQUEST_CASES)
def test_responses_request_matches_golden_body(case: str) -> None:
    body = load(f"{case}.request.json")
    request = RESPONSES.build_request(body, TARGET)
    assert request.url == "https://api.openai.com/v1/responses"
    assert request.headers == {"Authorization": "Bearer sk-resp-secret"}
    assert request.json == load(f"{case}.native.json")
    assert request.stream == bool(body.get("stream"))


@pytest.mark.parametrize(("base_url", "endpoint", "expected"), [
    ("https://api.openai.com/v1/responses", "chat", "https://api.openai.com/v1/responses"),
    ("https://api.openai.com/v1/responses/", "embeddings", "https://api.openai.com/v1/embeddings"),
    ("https://api.openai.com/v1/responses", "models", "https://api.openai.com/v1/models"),
    ("https://api.openai.com/v1/responses", "speech", "https://api.openai.com/v1/audio/speech"),
    ("https://proxy.example/v1", "chat", "https://proxy.example/v1/responses"),  # engine: responses forced
    ("https://proxy.example/v1/chat/completions", "chat", "https://proxy.example/v1/responses"),
])
def test_responses_endpoints_derive_from_base_url(base_url: str, endpoint: str, expected: str) -> None:
    target = Target(Provider("r", "responses", base_url), "m", "k")
    assert RESPONSES.url(endpoint, {}, target) == expected


@pytest.mark.parametrize(("base_url", "engine"), [
    ("https://api.openai.com/v1/responses", "responses"),
    ("https://api.openai.com/v1/responses/", "responses"),
    ("http://127.0.0.1:9/responses", "responses"),
    ("https://openrouter.ai/api/v1/responses", "responses"),
    ("https://api.openai.com/v1/chat/completions", "gpt"),
    ("https://openrouter.ai/api/v1/chat/completions", "openrouter"),
    ("https://api.anthropic.com/v1/messages", "claude"),
])
def test_engine_inferred_from_a_responses_base_url(base_url: str, engine: str) -> None:
    assert adapters.infer_engine(base_url) == engine


def test_config_accepts_engine_responses_and_lists_it_for_unknown_engines() -> None:
    text = """
providers:
  - provider: codex
    base_url: https://proxy.example/v1
    api: sk-x
    engine: responses
    model: [gpt-5-codex]
api_keys:
  - api: sk-client
"""
    config = uni_api.parse_config(text, "api.yaml")
    assert config.providers["codex"].engine == "responses"
    with pytest.raises(uni_api.ConfigError, match="responses"):
        uni_api.parse_config(text.replace("engine: responses", "engine: nope"), "api.yaml")


@pytest.mark.parametrize(("field", "value"), [
    ("stop", ["\n"]), ("n", 2), ("logprobs", True), ("frequency_penalty", 0.5), ("logit_bias", {"50256": -100}),
    ("audio", {"voice": "alloy", "format": "mp3"}), ("modalities", ["text", "audio"]),
])
def test_chat_fields_without_a_responses_counterpart_are_refused_for_the_next_channel(field: str, value: Any) -> None:
    with pytest.raises(UpstreamError) as caught:
        RESPONSES.payload({"messages": [USER], field: value}, TARGET)
    assert caught.value.status == 400 and caught.value.retryable
    assert field in caught.value.message or "audio" in caught.value.message


@pytest.mark.parametrize(("field", "value"), [("stop", None), ("stop", []), ("n", 1), ("logprobs", False),
                                              ("frequency_penalty", 0), ("modalities", ["text"])])
def test_harmless_values_of_those_fields_are_accepted(field: str, value: Any) -> None:
    assert RESPONSES.payload({"messages": [USER], field: value}, TARGET)["input"]


def test_audio_input_is_refused_for_the_next_channel() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with pytest.raises(UpstreamError) as caught:
        RESPONSES.payload({"messages": [{"role": "user", "content": [audio]}]}, TARGET)
    assert caught.value.status == 400 and caught.value.retryable and "input_audio" in caught.value.message


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", "auto"), ("none", "none"), ("required", "required"),
    ({"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "name": "get_weather"}),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_weather"}}]}},
     {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]}),
])
def test_tool_choice_maps_to_tool_choice_param(choice: Any, expected: Any) -> None:
    payload = RESPONSES.payload({"messages": [USER], "tools": [WEATHER_TOOL], "tool_choice": choice}, TARGET)
    assert payload["tool_choice"] == expected


def test_custom_tools_and_their_calls_and_outputs_convert() -> None:
    tool = {"type": "custom", "custom": {"name": "apply_patch", "description": "Patch files",
                                         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}}
    call = {"id": "call_p", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin Patch"}}
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_p", "content": "Done"}]
    payload = RESPONSES.payload({"messages": messages, "tools": [tool]}, TARGET)
    assert payload["tools"] == [{"type": "custom", **tool["custom"]}]
    assert payload["input"][1:] == [
        {"type": "custom_tool_call", "call_id": "call_p", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "custom_tool_call_output", "call_id": "call_p", "output": "Done"}]


def test_json_object_response_format_becomes_text_format() -> None:
    payload = RESPONSES.payload({"messages": [USER], "response_format": {"type": "json_object"}}, TARGET)
    assert payload["text"] == {"format": {"type": "json_object"}}


def test_provider_without_tools_sends_none() -> None:
    target = Target(Provider("r", "responses", PROVIDER.base_url, tools=False), "m", "k")
    body = {"messages": [USER], "tools": [WEATHER_TOOL], "tool_choice": "auto", "parallel_tool_calls": True}
    payload = RESPONSES.payload(body, target)
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(payload)


def test_overrides_apply_to_the_responses_body() -> None:
    provider = Provider("r", "responses", PROVIDER.base_url, overrides={"all": {"reasoning": {"summary": "auto"}}})
    assert RESPONSES.payload({"messages": [USER]}, Target(provider, "m", "k"))["reasoning"] == {"summary": "auto"}


# --- Answers ---


@pytest.mark.parametrize("case", RESPONSE_CASES)
def test_responses_answer_converts_to_golden_completion(case: str) -> None:
    completion = RESPONSES.parse_response(load(f"{case}.upstream.json"), "gpt-4.1")
    validate_completion(completion)
    assert {**completion, "id": "chatcmpl-test"} == load(f"{case}.expected.json")


def test_custom_tool_call_in_an_answer_becomes_a_custom_tool_call() -> None:
    item = {"type": "custom_tool_call", "id": "ctc_1", "call_id": "call_p", "name": "apply_patch", "input": "x"}
    completion = RESPONSES.parse_response(json_reply(item).json, "m")
    validate_completion(completion)
    assert completion["choices"][0]["message"]["tool_calls"] == [
        {"id": "call_p", "type": "custom", "custom": {"name": "apply_patch", "input": "x"}}]
    assert completion["choices"][0]["finish_reason"] == "tool_calls"


def test_refusal_part_becomes_the_message_refusal() -> None:
    item = {**message_item(""), "content": [{"type": "refusal", "refusal": "I can't help with that."}]}
    message = RESPONSES.parse_response(json_reply(item).json, "m")["choices"][0]["message"]
    assert message["refusal"] == "I can't help with that." and message["content"] is None


@pytest.mark.parametrize(("native", "status"), [
    ({**json_reply().json, "status": "failed", "error": {"code": "server_error", "message": "boom"}}, 502),
    ({**json_reply().json, "status": "failed", "error": {"code": "invalid_prompt", "message": "no"}}, 400),
    ({**json_reply().json, "status": "failed", "error": {"code": "rate_limit_exceeded", "message": "slow"}}, 429),
    ({**json_reply().json, "status": "queued"}, 502),
    ({"object": "response"}, 502),
])
def test_failed_or_unfinished_answers_raise(native: dict[str, Any], status: int) -> None:
    with pytest.raises(UpstreamError) as caught:
        RESPONSES.parse_response(native, "m")
    assert caught.value.status == status


def test_http_error_body_keeps_openai_message() -> None:
    error = RESPONSES.parse_error(400, (FIXTURES / "error_400.upstream.json").read_bytes())
    assert error.status == 400 and not error.retryable and "input[0].content" in error.message


# --- Streams ---


@pytest.mark.anyio
@pytest.mark.parametrize("case", STREAM_CASES)
async def test_responses_stream_converts_to_golden_chunks(case: str) -> None:
    request = FIXTURES / f"{case}.request.json"
    include_usage = request.exists() and bool((load(request.name).get("stream_options") or {}).get("include_usage"))
    chunks = await convert((FIXTURES / f"{case}.upstream.sse").read_bytes(), include_usage)
    for chunk in chunks:
        validate_chunk(chunk)
    assert without_ids(chunks) == load_jsonl(f"{case}.expected.jsonl")
    assert len({chunk["id"] for chunk in chunks}) == 1


@pytest.mark.anyio
async def test_stream_folds_to_what_the_answer_says() -> None:
    """The tool_use stream's chunks fold to the calls its response.completed lists, with their call ids."""
    data = (FIXTURES / "tool_use_stream.upstream.sse").read_bytes()
    folded = accumulate_stream(await convert(data))
    final = json.loads(data.decode().strip().split("\n\n")[-1].split("data: ", 1)[1])["response"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in folded["message"]["tool_calls"]] == [
        (item["call_id"], item["name"], item["arguments"]) for item in final["output"]]
    assert folded["finish_reason"] == "tool_calls"


@pytest.mark.anyio
async def test_arguments_given_only_in_output_item_done_still_reach_the_client() -> None:
    events, item = call_events("get_weather", [])
    events[-1]["item"] = call_item("get_weather", '{"city":"Paris"}')  # no argument deltas, only the whole
    chunks = await convert(stream_reply((events, item)).raw_chunks[0])
    assert accumulate_stream(chunks)["message"]["tool_calls"][0]["function"]["arguments"] == '{"city":"Paris"}'


@pytest.mark.anyio
async def test_arguments_partly_streamed_are_completed_from_output_item_done() -> None:
    events, item = call_events("f", ['{"a":'])
    events[-1]["item"] = call_item("f", '{"a":1}')
    chunks = await convert(stream_reply((events, item)).raw_chunks[0])
    assert accumulate_stream(chunks)["message"]["tool_calls"][0]["function"]["arguments"] == '{"a":1}'


@pytest.mark.anyio
@pytest.mark.parametrize(("case", "status", "words"), [
    ("error_failed", 429, "Rate limit reached"),
    ("error_event", 502, "server had an error"),
])
async def test_failure_events_raise_before_any_chunk(case: str, status: int, words: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        await convert((FIXTURES / f"{case}.upstream.sse").read_bytes())
    assert caught.value.status == status and words in caught.value.message


@pytest.mark.anyio
async def test_stream_ending_without_a_terminal_event_raises() -> None:
    data = (FIXTURES / "basic_stream.upstream.sse").read_bytes()
    truncated = data[:data.rindex(b"event: response.completed")]
    with pytest.raises(UpstreamError, match="before response.completed"):
        await convert(truncated)


@pytest.mark.anyio
async def test_failure_after_text_raises_after_the_text() -> None:
    events, item = text_events(["Hel", "lo"])
    failed = {"type": "response.failed", "response": {**json_reply().json, "status": "failed",
                                                      "error": {"code": "server_error", "message": "lost"}}}
    received: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError, match="lost"):
        stream = RESPONSES.parse_stream(RESPONSES.iter_events(_pieces(sse_body([*events[:3], failed]))), "m")
        async for chunk in stream:
            received.append(chunk)
    assert [c["choices"][0]["delta"].get("content") for c in received] == ["Hel"]


# --- End to end: chat and Messages clients through the gateway to a Responses upstream ---


def responses_config(upstream: FakeUpstream) -> dict[str, Any]:
    return {"providers": [{"provider": "codex", "base_url": f"{upstream.url}/v1/responses", "api": "sk-resp-secret",
                           "model": [{"gpt-5-codex": "codex"}], "preferences": {"cooldown_period": 0}}],
            "api_keys": [{"api": "sk-client"}]}


def enqueue_tool_loop(upstream: FakeUpstream, stream: bool) -> None:
    """First a get_weather call, then the answer that uses its result."""
    if stream:
        upstream.enqueue(stream_reply(call_events("get_weather", ['{"city":', '"Paris"}'])))
        upstream.enqueue(stream_reply(text_events(["It is ", "14 °C."])))
    else:
        upstream.enqueue(json_reply(call_item("get_weather", '{"city":"Paris"}')))
        upstream.enqueue(json_reply(message_item("It is 14 °C.")))


def check_upstream_tool_loop(upstream: FakeUpstream, stream: bool) -> None:
    first, second = (received.json for received in upstream.received)
    assert [r.path for r in upstream.received] == ["/v1/responses"] * 2
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-resp-secret"
    assert first["model"] == second["model"] == "gpt-5-codex"
    assert first["tools"][0]["name"] == "get_weather" and first.get("stream", False) is stream
    assert second["input"][-2:] == [
        {"type": "function_call", "call_id": "call_fake1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_fake1", "output": "14 °C"}]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_client_runs_a_tool_loop_on_a_responses_upstream(
        upstream: FakeUpstream, make_gateway: MakeGateway, stream: bool) -> None:
    enqueue_tool_loop(upstream, stream)
    client = make_gateway(responses_config(upstream)).client("sk-client")
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]

    def ask() -> dict[str, Any]:
        if not stream:
            answer = client.chat.completions.create(model="codex", messages=messages, tools=[WEATHER_TOOL])
            validate_completion(answer.model_dump(exclude_unset=True))
            return answer.choices[0].model_dump()
        chunks = [c.model_dump(exclude_unset=True) for c in client.chat.completions.create(
            model="codex", messages=messages, tools=[WEATHER_TOOL], stream=True,
            stream_options={"include_usage": True})]
        for chunk in chunks:
            validate_chunk(chunk)
        assert chunks[-1]["usage"]["prompt_tokens"] == 12
        return accumulate_stream(chunks)

    first = ask()
    call = first["message"]["tool_calls"][0]
    assert first["finish_reason"] == "tool_calls" and call["function"]["name"] == "get_weather"
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call["id"], "content": "14 °C"}]
    second = ask()
    assert second["message"]["content"] == "It is 14 °C." and second["finish_reason"] == "stop"
    check_upstream_tool_loop(upstream, stream)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_messages_client_runs_a_tool_loop_on_a_responses_upstream(
        upstream: FakeUpstream, make_gateway: MakeGateway, stream: bool) -> None:
    enqueue_tool_loop(upstream, stream)
    gateway = make_gateway(responses_config(upstream))
    client = anthropic.Anthropic(base_url=gateway.url, api_key="sk-client", max_retries=0)
    tool = {"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]

    def ask() -> Any:
        if not stream:
            return client.messages.create(model="codex", max_tokens=256, messages=messages, tools=[tool])
        with client.messages.stream(model="codex", max_tokens=256, messages=messages, tools=[tool]) as events:
            return events.get_final_message()

    first = ask()
    use = next(block for block in first.content if block.type == "tool_use")
    assert first.stop_reason == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    assert use.id == "call_fake1"
    messages += [{"role": "assistant", "content": [block.model_dump() for block in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "14 °C"}]}]
    second = ask()
    assert second.content[0].text == "It is 14 °C." and second.stop_reason == "end_turn"
    assert second.usage.input_tokens == 12 and second.usage.output_tokens == 5
    check_upstream_tool_loop(upstream, stream)


def test_failed_responses_stream_fails_over_to_the_next_channel(
        make_upstream: Callable[[], FakeUpstream], make_gateway: MakeGateway) -> None:
    broken, healthy = make_upstream(), make_upstream()
    broken.enqueue(Reply(raw_chunks=[(FIXTURES / "error_failed.upstream.sse").read_bytes()]))
    healthy.enqueue(stream_reply(text_events(["fine"])))
    config = responses_config(broken)
    config["providers"].append({**config["providers"][0], "provider": "codex2",
                                "base_url": f"{healthy.url}/v1/responses"})
    client = make_gateway(config).client("sk-client")
    chunks = list(client.chat.completions.create(model="codex", messages=[USER], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fine"
    assert len(broken.received) == 1 and len(healthy.received) == 1


def test_embeddings_and_models_of_a_responses_provider_sit_next_to_responses(
        upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    client = make_gateway(responses_config(upstream)).client("sk-client")
    assert client.embeddings.create(model="codex", input="hi").data[0].embedding == [0.1, 0.2]
    assert upstream.received[-1].path == "/v1/embeddings"


def test_native_adapter_sends_a_responses_body_as_it_came_with_the_upstream_model() -> None:
    native = adapters.ResponsesNativeAdapter()
    body = {"model": "codex", "input": "hi", "tools": [{"type": "web_search"}], "include": ["x"], "stream": True}
    request = native.build_request(body, TARGET)
    assert request.url == "https://api.openai.com/v1/responses" and request.stream
    assert request.json == {**body, "model": "gpt-4.1-2025-04-14"}
    without_tools = Target(Provider("r", "responses", PROVIDER.base_url, tools=False), "m", "k")
    assert "tools" not in native.payload(body, without_tools)


def test_compact_passes_through_to_a_responses_native_channel_for_the_openai_sdk(upstream: FakeUpstream,
                                                             make_gateway: MakeGateway) -> None:
    compacted = {"id": "resp_c1", "object": "response.compaction", "created_at": 1, "output": [
        {"type": "compaction", "id": "cmp_1", "encrypted_content": "opaque"}],
        "usage": {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11}}
    upstream.enqueue(json=compacted)
    client = make_gateway(responses_config(upstream)).client("sk-client")
    answer = client.responses.compact(model="codex", input=[{"role": "user", "content": "hi"}])
    assert answer.output[0].encrypted_content == "opaque"
    sent = upstream.received[-1]
    assert sent.path == "/v1/responses/compact" and sent.json["model"] == "gpt-5-codex"
    assert sent.headers["Authorization"] == "Bearer sk-resp-secret"
