"""Gemini API adapter: golden fixtures from ai.google.dev, then end to end through the gateway with the openai SDK.

References (Gemini API reference and guides): "models.generateContent" (GenerateContentRequest, Candidate,
FinishReason, UsageMetadata, PromptFeedback), "models.streamGenerateContent" (alt=sse: one GenerateContentResponse
per event), "Function calling" (functionDeclarations, FunctionCallingConfig, the parallel-call example with
power_disco_ball / start_music / dim_lights), "Thinking" (thought parts, thinkingConfig), "Thought signatures",
"Schema" (the OpenAPI subset), "models.batchEmbedContents", "models.list", "Grounding with Google Search".
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import FakeUpstream, GatewayServer, Reply, byte_pieces, engine_config, load_fixture, load_fixture_lines
from hypothesis import given, settings
from hypothesis import strategies as st
from openai_schema import accumulate_stream, validate, validate_chunk, validate_completion

import adapters

FIXTURES = Path(__file__).parent / "fixtures" / "gemini"
load = functools.partial(load_fixture, "gemini")
load_jsonl = functools.partial(load_fixture_lines, "gemini")
GEMINI = adapters.ADAPTERS["gemini"]
BASE = "https://generativelanguage.googleapis.com/v1beta"
PROVIDER = adapters.Provider("g", "gemini", BASE, api_keys=("AIza-gemini-secret",))
MODELS = {"text": "gemini-2.0-flash", "tools": "gemini-2.5-flash", "thinking": "gemini-2.5-pro"}
ALIASES = {"text": "gemini-flash", "parallel": "gemini-flash", "thinking": "gemini-2.5-pro-search",
           "blocked": "gemini-flash"}
MakeGateway = Callable[..., GatewayServer]
pytestmark = pytest.mark.anyio


def target(model: str = "gemini-2.0-flash", provider: adapters.Provider = PROVIDER) -> adapters.Target:
    return adapters.Target(provider, model, "AIza-gemini-secret")


def normalize(obj: Any) -> Any:
    """Generated ids (chatcmpl-<uuid hex>, call_<uuid hex>) as fixed placeholders, for golden comparison."""
    text = re.sub(r'"chatcmpl-[0-9a-f]{32}"', '"chatcmpl-ID"', json.dumps(obj))
    return json.loads(re.sub(r'"call_[0-9a-f]{32}"', '"call_ID"', text))


async def convert_stream(data: bytes | str, model: str = "gemini-flash", include_usage: bool = True,
                         adapter: adapters.Adapter = GEMINI) -> list[dict[str, Any]]:
    raw = (FIXTURES / data).read_bytes() if isinstance(data, str) else data
    events = adapters.iter_sse(byte_pieces(raw))
    return [chunk async for chunk in adapter.parse_stream(events, model, include_usage=include_usage)]


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


# --- Request side ---


@pytest.mark.parametrize("case", ["text", "tools", "thinking"])
def test_gemini_request_matches_golden_body(case: str) -> None:
    body = load(f"{case}.request.json")
    request = GEMINI.build_request(body, target(MODELS[case]))
    method = "streamGenerateContent?alt=sse" if body.get("stream") else "generateContent"
    assert (request.method, request.url) == ("POST", f"{BASE}/models/{MODELS[case]}:{method}")
    assert request.headers == {"x-goog-api-key": "AIza-gemini-secret"}
    assert request.json == load(f"{case}.native.json")
    assert request.stream is bool(body.get("stream"))


@pytest.mark.parametrize(("base_url", "chat", "models"), [
    (BASE, f"{BASE}/models/m:generateContent", f"{BASE}/models?pageSize=1000"),
    ("https://generativelanguage.googleapis.com/v1/", "https://generativelanguage.googleapis.com/v1/models/m:"
     "generateContent", "https://generativelanguage.googleapis.com/v1/models?pageSize=1000"),
    ("http://127.0.0.1:9/proxy/v1beta", "http://127.0.0.1:9/proxy/v1beta/models/m:generateContent",
     "http://127.0.0.1:9/proxy/v1beta/models?pageSize=1000"),
])
def test_gemini_urls_derive_from_base_url(base_url: str, chat: str, models: str) -> None:
    provider = adapters.Provider("g", "gemini", base_url)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert GEMINI.build_request(body, target("m", provider)).url == chat
    assert GEMINI.build_request({**body, "stream": True}, target("m", provider)).url == chat.replace(
        ":generateContent", ":streamGenerateContent?alt=sse")
    assert GEMINI.build_models_request(target("", provider)).url == models


def test_gemini_key_travels_in_a_header_never_in_the_url() -> None:
    provider = adapters.Provider("g", "gemini", BASE, headers={"X-Trace": "1"})
    request = GEMINI.build_request({"messages": [{"role": "user", "content": "hi"}]}, target("m", provider))
    assert "AIza" not in request.url and "key=" not in request.url
    assert request.headers == {"x-goog-api-key": "AIza-gemini-secret", "X-Trace": "1"}
    assert GEMINI.build_models_request(target("", provider)).headers["x-goog-api-key"] == "AIza-gemini-secret"


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}),
    ("none", {"mode": "NONE"}),
    ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"mode": "ANY", "allowedFunctionNames": ["get_time"]}),
    (None, None),
])
def test_gemini_tool_choice_maps_to_function_calling_modes(choice: Any, config: dict[str, Any] | None) -> None:
    body = {**load("tools.request.json"), "tool_choice": choice}
    payload = GEMINI.build_request(body, target()).json
    assert payload.get("toolConfig") == ({"functionCallingConfig": config} if config else None)


def test_gemini_legacy_functions_become_declarations() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "function_call": {"name": "f"},
            "functions": [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}]}
    payload = GEMINI.build_request(body, target()).json
    assert payload["tools"] == [{"functionDeclarations": [
        {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}]}]
    assert payload["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["f"]}}


def test_gemini_provider_without_tools_sends_no_declarations_but_keeps_search() -> None:
    provider = adapters.Provider("g", "gemini", BASE, tools=False)
    body = {**load("tools.request.json"), "model": "gemini-2.5-flash-search"}
    payload = GEMINI.build_request(body, target("gemini-2.5-flash", provider)).json
    assert payload["tools"] == [{"googleSearch": {}}]
    assert "toolConfig" not in payload


@pytest.mark.parametrize(("alias", "upstream_model", "tool"), [
    ("gemini-1.5-pro-search", "gemini-1.5-pro", {"googleSearchRetrieval": {}}),
    ("gemini-2.0-flash-search", "gemini-2.0-flash", {"googleSearch": {}}),
    ("gemini-2.0-flash", "gemini-2.0-flash", None),
])
def test_gemini_search_alias_adds_google_search(alias: str, upstream_model: str, tool: Any) -> None:
    body = {"model": alias, "messages": [{"role": "user", "content": "news?"}]}
    payload = GEMINI.build_request(body, target(upstream_model)).json
    assert payload.get("tools") == ([tool] if tool else None)


@pytest.mark.parametrize(("effort", "thinking"), [
    ("none", {"thinkingBudget": 0, "includeThoughts": False}),
    ("low", {"thinkingBudget": 1024, "includeThoughts": True}),
    ("medium", {"thinkingBudget": 8192, "includeThoughts": True}),
    (None, None),
])
def test_gemini_reasoning_effort_becomes_thinking_budget(effort: str | None, thinking: Any) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": effort}
    config = GEMINI.build_request(body, target()).json.get("generationConfig") or {}
    assert config.get("thinkingConfig") == thinking


def test_gemini_generation_config_maps_sampling_fields() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "n": 2, "top_k": 40, "stop": ["a", "b"],
            "presence_penalty": 0.1, "frequency_penalty": 0.2, "response_format": {"type": "json_object"}}
    assert GEMINI.build_request(body, target()).json["generationConfig"] == {
        "candidateCount": 2, "topK": 40, "stopSequences": ["a", "b"], "presencePenalty": 0.1,
        "frequencyPenalty": 0.2, "responseMimeType": "application/json"}


def test_gemini_media_parts_become_inline_or_file_data() -> None:
    content = [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}},
        {"type": "image_url", "image_url": {"url": "gs://bucket/cat.png"}},
        {"type": "image_url", "image_url": "data:image/webp;base64,UklGRg=="},
        {"type": "text", "text": ""},
    ]
    parts = GEMINI.build_request({"messages": [{"role": "user", "content": content}]}, target()).json["contents"]
    assert parts == [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "audio/mp3", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
        {"fileData": {"mimeType": "image/png", "fileUri": "gs://bucket/cat.png"}},
        {"inlineData": {"mimeType": "image/webp", "data": "UklGRg=="}},
    ]}]
    assert GEMINI.inline_images  # the gateway turns http(s) image URLs into data URIs first


def test_gemini_tool_result_without_a_known_call_uses_its_name() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "function", "name": "lookup", "content": "42"},
                {"role": "user", "content": ""}]
    contents = GEMINI.build_request({"messages": messages}, target()).json["contents"]
    assert contents == [{"role": "user", "parts": [
        {"text": "hi"}, {"functionResponse": {"name": "lookup", "response": {"content": 42}}}]}]


def test_gemini_overrides_apply_to_the_native_body() -> None:
    provider = adapters.Provider("g", "gemini", BASE, overrides={
        "all": {"safetySettings": [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE"}]},
        "m": {"generationConfig": {"temperature": 0.1}}})
    payload = GEMINI.build_request({"messages": [{"role": "user", "content": "hi"}], "temperature": 1},
                                   target("m", provider)).json
    assert payload["safetySettings"][0]["threshold"] == "BLOCK_NONE"
    assert payload["generationConfig"] == {"temperature": 0.1}


_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))
_SCHEMA_KEY = st.sampled_from(["type", "properties", "items", "anyOf", "oneOf", "$ref", "$defs", "const", "enum",
                               "format", "additionalProperties", "$schema", "title", "nullable", "required", "x"])
_SCHEMAS = st.recursive(_JSON_LEAF, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(_SCHEMA_KEY, children, max_size=5)), max_leaves=20)


def _keys(schema: Any) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    keys = set(schema)
    for name, value in schema.items():
        children = value.values() if name == "properties" and isinstance(value, dict) else (
            value if name == "anyOf" and isinstance(value, list) else [value] if name == "items" else [])
        for child in children:
            keys |= _keys(child)
    return keys


@settings(max_examples=150, deadline=None)
@given(_SCHEMAS)
def test_gemini_schema_keeps_only_the_openapi_subset(schema: Any) -> None:
    assert _keys(adapters.to_gemini_schema(schema)) <= adapters._GEMINI_SCHEMA_KEYS


def test_gemini_schema_inlines_refs_and_spells_null_the_openapi_way() -> None:
    schema = {"type": "object", "$defs": {"Tag": {"type": "string", "const": "x"}},
              "properties": {"tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}},
                             "n": {"oneOf": [{"type": "integer"}, {"type": "number"}, {"type": "null"}]}}}
    assert adapters.to_gemini_schema(schema) == {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "enum": ["x"]}},
        "n": {"anyOf": [{"type": "integer"}, {"type": "number"}], "nullable": True}}}


# --- Response side ---


@pytest.mark.parametrize("case", ["text", "parallel", "thinking", "blocked"])
def test_gemini_response_converts_to_golden(case: str) -> None:
    converted = GEMINI.parse_response(load(f"{case}.upstream.json"), ALIASES[case])
    validate_completion(converted)
    assert normalize(converted) == load(f"{case}.expected.json")


@pytest.mark.parametrize("case", ["text", "parallel", "thinking", "blocked"])
async def test_gemini_stream_converts_to_golden(case: str) -> None:
    chunks = await convert_stream(f"{case}.upstream.sse", ALIASES[case])
    for chunk in chunks:
        validate_chunk(chunk)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert normalize(chunks) == load_jsonl(f"{case}.expected.jsonl")


@pytest.mark.parametrize("case", ["text", "parallel", "thinking", "blocked"])
async def test_gemini_accumulated_stream_equals_response(case: str) -> None:
    folded = accumulate_stream(await convert_stream(f"{case}.upstream.sse", ALIASES[case]))
    answer = GEMINI.parse_response(load(f"{case}.upstream.json"), ALIASES[case])
    choice = normalize(answer)["choices"][0]
    message = {k: v for k, v in choice["message"].items() if k != "refusal"}
    assert normalize(folded["message"]) == {**message, "content": message["content"] or None}
    assert folded["finish_reason"] == choice["finish_reason"]
    assert folded["usage"] == answer["usage"]


def test_gemini_tool_call_ids_are_unique_call_uuid_hex() -> None:
    calls = GEMINI.parse_response(load("parallel.upstream.json"), "m")["choices"][0]["message"]["tool_calls"]
    assert len({c["id"] for c in calls}) == 3
    assert all(re.fullmatch(r"call_[0-9a-f]{32}", c["id"]) for c in calls)


@pytest.mark.parametrize(("reason", "finish"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"),
    ("OTHER", "stop"), ("MALFORMED_FUNCTION_CALL", "stop"),
])
async def test_gemini_finish_reasons_map_to_openai(reason: str, finish: str) -> None:
    native = {"candidates": [{"content": {"parts": [{"text": "x"}], "role": "model"}, "finishReason": reason}]}
    assert GEMINI.parse_response(native, "m")["choices"][0]["finish_reason"] == finish
    chunks = await convert_stream(sse(native), include_usage=False)
    assert chunks[-1]["choices"][0]["finish_reason"] == finish


async def test_gemini_several_candidates_become_several_choices() -> None:
    native = {"candidates": [
        {"content": {"parts": [{"text": "one"}], "role": "model"}, "finishReason": "STOP", "index": 0},
        {"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}], "role": "model"},
         "finishReason": "STOP", "index": 1}]}
    answer = GEMINI.parse_response(native, "m")
    validate_completion(answer)
    assert [(c["index"], c["finish_reason"]) for c in answer["choices"]] == [(0, "stop"), (1, "tool_calls")]
    chunks = await convert_stream(sse(native), include_usage=False)
    for chunk in chunks:
        validate_chunk(chunk)
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks[-2:]]
    assert finishes == [(0, "stop"), (1, "tool_calls")]
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0


async def test_gemini_stream_without_include_usage_ends_on_the_finish_chunk() -> None:
    chunks = await convert_stream("text.upstream.sse", include_usage=False)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(chunk["choices"] for chunk in chunks) and "usage" not in chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_gemini_stream_cut_before_its_finish_raises() -> None:
    raw = (FIXTURES / "text.upstream.sse").read_bytes().rsplit(b"data:", 1)[0]
    with pytest.raises(adapters.UpstreamError, match="ended before it finished"):
        await convert_stream(raw)


async def test_gemini_stream_error_event_raises_with_its_status() -> None:
    raw = sse({"candidates": [{"content": {"parts": [{"text": "a"}]}}]}, load("error_429.upstream.json"))
    with pytest.raises(adapters.UpstreamError) as caught:
        await convert_stream(raw)
    assert caught.value.status == 429 and "exhausted" in caught.value.message


def test_gemini_answer_without_candidates_is_an_error() -> None:
    with pytest.raises(adapters.UpstreamError, match="without candidates"):
        GEMINI.parse_response({"usageMetadata": {"promptTokenCount": 1}}, "m")


@pytest.mark.parametrize(("fixture", "status", "retryable", "message"), [
    ("error_400.upstream.json", 400, False, "INVALID_ARGUMENT: * GenerateContentRequest.contents"),
    ("error_key.upstream.json", 401, True, "API key not valid"),
    ("error_429.upstream.json", 429, True, "RESOURCE_EXHAUSTED: Resource has been exhausted"),
])
def test_gemini_error_bodies_give_status_and_message(fixture: str, status: int, retryable: bool,
                                                     message: str) -> None:
    error = GEMINI.parse_error(load(fixture)["error"]["code"], (FIXTURES / fixture).read_bytes())
    assert (error.status, error.retryable) == (status, retryable)
    assert message in error.message


def test_gemini_unsupported_location_is_retried_elsewhere() -> None:
    body = json.dumps([{"error": {"code": 400, "message": "User location is not supported for the API use.",
                                  "status": "FAILED_PRECONDITION"}}]).encode()
    error = GEMINI.parse_error(400, body)
    assert error.retryable and error.message.startswith("FAILED_PRECONDITION: User location")


# --- Embeddings and model listing ---


def test_gemini_embeddings_request_matches_golden() -> None:
    request = GEMINI.build_endpoint_request("embeddings", load("embeddings.request.json"), target("text-embedding-004"))
    assert request.url == f"{BASE}/models/text-embedding-004:batchEmbedContents"
    assert request.headers == {"x-goog-api-key": "AIza-gemini-secret"}
    assert request.json == load("embeddings.native.json")
    single = GEMINI.build_endpoint_request("embeddings", {"input": "hi"}, target("e"))
    assert single.json == {"requests": [{"model": "models/e", "content": {"parts": [{"text": "hi"}]}}]}


def test_gemini_embeddings_answer_in_openai_shape() -> None:
    converted = GEMINI.parse_endpoint_response("embeddings", load("embeddings.upstream.json"), "gemini-embed")
    validate(converted, "CreateEmbeddingResponse")
    assert converted == load("embeddings.expected.json")


def test_gemini_embeddings_refuse_token_ids_so_another_channel_can_try() -> None:
    with pytest.raises(adapters.UpstreamError) as caught:
        GEMINI.build_endpoint_request("embeddings", {"input": [[1, 2, 3]]}, target("e"))
    assert caught.value.status == 400 and caught.value.retryable


def test_gemini_models_list_strips_the_prefix_and_keeps_servable_models() -> None:
    assert GEMINI.parse_models(load("models.upstream.json")) == ["gemini-1.5-pro", "text-embedding-004",
                                                                 "gemini-2.0-flash"]
    with pytest.raises(adapters.UpstreamError):
        GEMINI.parse_models({"data": []})


@pytest.mark.parametrize(("base_url", "model", "engine"), [
    ("https://generativelanguage.googleapis.com/v1", "gemini-1.5-pro", "gemini"),
    ("https://my-proxy.example/google/v1beta", "gemini-2.0-flash", "gemini"),
    ("https://us-east5-aiplatform.googleapis.com", "claude-3-5-sonnet@20240620", "vertex-claude"),
    ("https://aiplatform.googleapis.com", "gemini-2.0-flash", "vertex-gemini"),
])
def test_google_engines_are_inferred_from_base_url(base_url: str, model: str, engine: str) -> None:
    assert adapters.infer_engine(base_url, model) == engine


# --- End to end through the gateway ---


gemini_config = functools.partial(engine_config, "gemini")


def sse_reply(name: str) -> Reply:
    data = (FIXTURES / name).read_bytes()
    return Reply(raw_chunks=[data[i:i + 64] for i in range(0, len(data), 64)])


def test_gateway_answers_gemini_through_the_openai_sdk(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("text.upstream.json")))
    gateway = make_gateway(gemini_config(upstream, models=[{"gemini-2.0-flash": "gemini-flash"}]))
    request = {k: v for k, v in load("text.request.json").items() if k != "stream_options"}
    answer = gateway.client("sk-client").chat.completions.create(**{**request, "model": "gemini-flash"})
    validate_completion(answer.model_dump(exclude_unset=True))
    assert answer.choices[0].message.content == "A small orange cat, sitting in the sun."
    assert answer.model == "gemini-flash" and answer.usage is not None and answer.usage.total_tokens == 280
    sent = upstream.received[0]
    assert (sent.method, sent.path, sent.query) == ("POST", "/v1beta/models/gemini-2.0-flash:generateContent", {})
    assert sent.headers["x-goog-api-key"] == "AIza-gemini-secret-0"
    assert sent.json == load("text.native.json")


def test_gateway_streams_gemini_text_with_usage(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(sse_reply("text.upstream.sse"))
    gateway = make_gateway(gemini_config(upstream, models=[{"gemini-2.0-flash": "gemini-flash"}]))
    stream = gateway.client("sk-client").chat.completions.create(
        model="gemini-flash", messages=[{"role": "user", "content": "cat?"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk.model_dump(exclude_unset=True) for chunk in stream]
    for chunk in chunks:
        validate_chunk(chunk)
    folded = accumulate_stream(chunks)
    assert folded["message"] == {"role": "assistant", "content": "A small orange cat, sitting in the sun."}
    assert folded["finish_reason"] == "stop"
    assert folded["usage"] == {"prompt_tokens": 270, "completion_tokens": 10, "total_tokens": 280}
    sent = upstream.received[0]
    assert (sent.path, sent.query) == ("/v1beta/models/gemini-2.0-flash:streamGenerateContent", {"alt": "sse"})


def test_gateway_round_trips_gemini_parallel_tool_calls(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(sse_reply("parallel.upstream.sse"))
    upstream.enqueue(Reply(json={"candidates": [{"content": {"parts": [{"text": "Party on."}], "role": "model"},
                                                 "finishReason": "STOP"}]}))
    gateway = make_gateway(gemini_config(upstream, models=["gemini-2.0-flash"]))
    client = gateway.client("sk-client")
    tools = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"power": {"type": "boolean"}}, "additionalProperties": False}}}
        for name in ("power_disco_ball", "start_music", "dim_lights")]
    messages: list[Any] = [{"role": "user", "content": "Turn this place into a party!"}]
    stream = client.chat.completions.create(model="gemini-2.0-flash", messages=messages, tools=tools, stream=True)
    folded = accumulate_stream([chunk.model_dump(exclude_unset=True) for chunk in stream])
    calls = folded["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["power_disco_ball", "start_music", "dim_lights"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"energetic": True, "loud": True}
    assert folded["finish_reason"] == "tool_calls"
    messages += [folded["message"]] + [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in calls]
    answer = client.chat.completions.create(model="gemini-2.0-flash", messages=messages, tools=tools)
    assert answer.choices[0].message.content == "Party on."
    declarations = upstream.received[0].json["tools"][0]["functionDeclarations"]
    assert "additionalProperties" not in declarations[0]["parameters"]
    replay = upstream.received[1].json["contents"]
    assert [p["functionCall"]["name"] for p in replay[1]["parts"] if "functionCall" in p] == [
        "power_disco_ball", "start_music", "dim_lights"]
    assert replay[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": name, "response": {"content": "ok"}}}
        for name in ("power_disco_ball", "start_music", "dim_lights")]}


def test_gateway_serves_gemini_embeddings(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("embeddings.upstream.json")))
    gateway = make_gateway(gemini_config(upstream, models=[{"text-embedding-004": "gemini-embed"}]))
    answer = gateway.client("sk-client").embeddings.create(**{**load("embeddings.request.json"),
                                                              "model": "gemini-embed"})
    assert [d.embedding for d in answer.data] == [e["values"] for e in load("embeddings.upstream.json")["embeddings"]]
    assert answer.model == "gemini-embed"
    sent = upstream.received[0]
    assert sent.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert sent.json == load("embeddings.native.json")


def test_gateway_adds_google_search_for_a_search_alias(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("text.upstream.json")))
    gateway = make_gateway(gemini_config(upstream, models=[{"gemini-2.0-flash": "gemini-2.0-flash-search"}]))
    gateway.client("sk-client").chat.completions.create(
        model="gemini-2.0-flash-search", messages=[{"role": "user", "content": "Latest news?"}])
    sent = upstream.received[0]
    assert sent.path == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert sent.json["tools"] == [{"googleSearch": {}}]


def test_gateway_inlines_http_images_for_gemini(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(body=b"\x89PNG\r\n", content_type="image/png"))
    upstream.enqueue(Reply(json=load("text.upstream.json")))
    gateway = make_gateway(gemini_config(upstream, models=["gemini-2.0-flash"]))
    image = {"type": "image_url", "image_url": {"url": f"{upstream.url}/cat.png"}}
    gateway.client("sk-client").chat.completions.create(model="gemini-2.0-flash", messages=[
        {"role": "user", "content": [image]}])
    assert upstream.received[0].path == "/cat.png"
    assert upstream.received[1].json["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}}]


def test_gateway_passes_gemini_400_through(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(status=400, json=load("error_400.upstream.json")))
    gateway = make_gateway(gemini_config(upstream, models=["gemini-2.0-flash"]))
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client("sk-client").chat.completions.create(model="gemini-2.0-flash", messages=[
            {"role": "user", "content": "hi"}])
    assert "contents is not specified" in caught.value.message
    assert len(upstream.received) == 1


def test_gateway_moves_to_the_next_key_after_gemini_rejects_one(upstream: FakeUpstream,
                                                                make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(status=400, json=load("error_key.upstream.json")))
    upstream.enqueue(Reply(json=load("text.upstream.json")))
    gateway = make_gateway(gemini_config(upstream, models=["gemini-2.0-flash"], api=["AIza-bad-1", "AIza-good-2"]))
    answer = gateway.client("sk-client").chat.completions.create(model="gemini-2.0-flash", messages=[
        {"role": "user", "content": "hi"}])
    assert answer.choices[0].finish_reason == "stop"
    assert [r.headers["x-goog-api-key"] for r in upstream.received] == ["AIza-bad-1", "AIza-good-2"]


def test_gateway_fails_over_from_a_busy_gemini_channel(make_upstream: Callable[[], FakeUpstream],
                                                       make_gateway: MakeGateway) -> None:
    busy, healthy = make_upstream(), make_upstream()
    busy.enqueue(Reply(status=429, json=load("error_429.upstream.json")))
    healthy.enqueue(sse_reply("thinking.upstream.sse"))
    gateway = make_gateway(gemini_config(busy, healthy, models=["gemini-2.5-pro"]))
    chunks = list(gateway.client("sk-client").chat.completions.create(
        model="gemini-2.5-pro", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert accumulate_stream([c.model_dump(exclude_unset=True) for c in chunks])["message"]["content"] == (
        '{"team": "Argentina", "year": 2022}')
    assert len(busy.received) == 1 and len(healthy.received) == 1


def test_gateway_discovers_gemini_models(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("models.upstream.json")))
    gateway = make_gateway(gemini_config(upstream))
    listed = gateway.client("sk-client").models.list()
    assert sorted(m.id for m in listed.data) == ["gemini-1.5-pro", "gemini-2.0-flash", "text-embedding-004"]
    sent = upstream.received[0]
    assert (sent.method, sent.path, sent.query) == ("GET", "/v1beta/models", {"pageSize": "1000"})
    assert sent.headers["x-goog-api-key"] == "AIza-gemini-secret-0"
