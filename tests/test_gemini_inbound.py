"""Gemini generateContent inbound: GeminiFace's conversions (pure), then the google-genai SDK and Gemini CLI against
the real gateway and fake upstreams of each engine family.

References (Gemini API reference, ai.google.dev/api): "models.generateContent" (GenerateContentRequest, Content,
Part, Tool, FunctionDeclaration, ToolConfig / FunctionCallingConfig, GenerationConfig, ThinkingConfig,
GenerateContentResponse, Candidate.FinishReason, UsageMetadata), "models.streamGenerateContent" (alt=sse events;
without alt one JSON array), "models.countTokens", "models.list" / "models.get" (Model), "Schema" (Type enum in
capitals), Google API design guide "Errors" (google.rpc.Status code / message / status names).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeUpstream, GatewayServer, Reply, chunks, completion
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

import adapters
import uni_api

FACE = adapters.GeminiFace()
MakeGateway = Callable[..., GatewayServer]
FIXTURES = Path(__file__).parent / "fixtures"
WEATHER = {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "OBJECT", "properties": {"city": {"type": "STRING", "description": "City"},
                                     "days": {"type": "INTEGER", "nullable": True, "minimum": 1, "maxItems": "3"},
                                     "tags": {"type": "ARRAY", "items": {"type": "STRING"}}},
    "required": ["city"], "propertyOrdering": ["city", "days"]}}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "contents": [{"role": "user", "parts": [{"text": "hi"}]}], **fields}


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def sse_frames(frames: list[bytes]) -> list[Any]:
    text = b"".join(frames).decode()
    assert text.endswith("\r\n\r\n")
    events = text.split("\r\n\r\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events]


# --- validate ---


@pytest.mark.parametrize(("request_body", "param"), [
    ({"model": "m"}, "contents"),
    ({"model": "m", "contents": []}, "contents"),
    (body(contents=[{"role": "system", "parts": [{"text": "x"}]}]), "contents[0].role"),
    (body(contents=[{"role": "user", "parts": "hi"}]), "contents[0].parts"),
    (body(contents=[{"role": "user", "parts": [{"text": 3}]}]), "contents[0].parts[0]"),
    (body(contents=[{"role": "model", "parts": [{"functionCall": {"args": {}}}]}]), "contents[0].parts[0]"),
    (body(tools={"functionDeclarations": []}), "tools"),
    (body(tools=[{"functionDeclarations": [{"description": "no name"}]}]), "tools[0]"),
    (body(generationConfig={"temperature": "hot"}), "generationConfig.temperature"),
    (body(generationConfig={"maxOutputTokens": 1.5}), "generationConfig.maxOutputTokens"),
    (body(generationConfig={"stopSequences": [1]}), "generationConfig.stopSequences"),
    (body(toolConfig=[]), "toolConfig"),
    (body(cachedContent=5), "cachedContent"),
    ({"contents": [{"parts": [{"text": "hi"}]}]}, "model"),
])
def test_malformed_requests_are_refused_naming_the_field(request_body: dict[str, Any], param: str) -> None:
    with pytest.raises(adapters.RequestError) as caught:
        FACE.validate(request_body)
    assert caught.value.param == param


def test_snake_case_requests_validate_and_convert_like_camel_case() -> None:
    snake = {"model": "m", "system_instruction": {"parts": [{"text": "Be brief."}]},
             "contents": [{"role": "user", "parts": [{"inline_data": {"mime_type": "image/png", "data": "iVBO"}}]}],
             "generation_config": {"max_output_tokens": 10, "stop_sequences": ["END"]},
             "tools": [{"function_declarations": [{"name": "f", "parameters_json_schema": {
                 "type": "object", "properties": {"snake_name": {"type": "string"}}}}]}]}
    assert FACE.validate(snake) == "m"
    chat = FACE.to_chat(snake)
    assert chat["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}]
    assert (chat["max_tokens"], chat["stop"]) == (10, ["END"])
    assert chat["tools"][0]["function"]["parameters"]["properties"] == {"snake_name": {"type": "string"}}


# --- to_chat ---


def test_a_whole_tool_loop_converts_to_openai_messages_in_order() -> None:
    request = body(systemInstruction={"parts": [{"text": "Be brief."}, {"text": "Use tools."}]}, contents=[
        {"role": "user", "parts": [{"text": "Weather in Paris and Oslo?"}]},
        {"role": "model", "parts": [
            {"text": "thinking...", "thought": True},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
            {"functionCall": {"id": "fc-2", "name": "get_weather", "args": {"city": "Oslo"}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"id": "fc-2", "name": "get_weather", "response": {"output": "snow"}}},
            {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}}]},
        {"role": "model", "parts": [{"text": "Paris 21, Oslo snow."}]},
        {"role": "user", "parts": [{"text": "Thanks"}, {"inlineData": {"mimeType": "audio/mpeg", "data": "AAA"}},
                                   {"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}}]}],
        tools=[{"functionDeclarations": [WEATHER]}],
        toolConfig={"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
    chat = FACE.to_chat(request)
    first_id = adapters.encode_signature_id("call_1_1", "c2ln")
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief.\nUse tools."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": first_id, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "fc-2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "fc-2", "content": "snow"},
        {"role": "tool", "tool_call_id": first_id, "content": '{"temp":21}'},
        {"role": "assistant", "content": "Paris 21, Oslo snow."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"},
                                     {"type": "input_audio", "input_audio": {"data": "AAA", "format": "mp3"}},
                                     {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}}]}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city", "parameters": {
            "type": "object", "required": ["city"], "properties": {
                "city": {"type": "string", "description": "City"},
                "days": {"type": ["integer", "null"], "minimum": 1, "maxItems": 3},
                "tags": {"type": "array", "items": {"type": "string"}}}}}}]
    assert "stream" not in chat


@pytest.mark.parametrize(("config", "expected"), [
    ({"temperature": 0.2, "topP": 0.9, "topK": 40, "maxOutputTokens": 64, "candidateCount": 2, "seed": 7,
      "presencePenalty": 0.1, "frequencyPenalty": 0.3, "stopSequences": ["x"]},
     {"temperature": 0.2, "top_p": 0.9, "max_tokens": 64, "n": 2, "seed": 7, "presence_penalty": 0.1,
      "frequency_penalty": 0.3, "stop": ["x"]}),
    ({"responseMimeType": "application/json"}, {"response_format": {"type": "json_object"}}),
    ({"responseMimeType": "application/json", "responseSchema": {"type": "OBJECT", "properties": {
        "a": {"type": "NUMBER"}}}}, {"response_format": {"type": "json_schema", "json_schema": {
            "name": "response", "schema": {"type": "object", "properties": {"a": {"type": "number"}}}}}}),
    ({"responseMimeType": "application/json", "responseJsonSchema": {"type": "object", "additionalProperties": False}},
     {"response_format": {"type": "json_schema", "json_schema": {
         "name": "response", "schema": {"type": "object", "additionalProperties": False}}}}),
    ({"thinkingConfig": {"thinkingLevel": "HIGH", "includeThoughts": True}}, {"reasoning_effort": "high"}),
    ({"thinkingConfig": {"thinkingLevel": "low"}}, {"reasoning_effort": "low"}),
    ({"thinkingConfig": {"thinkingBudget": 8192, "includeThoughts": True}}, {}),  # what Gemini CLI always sends
    ({"thinkingConfig": {"thinkingBudget": -1}}, {}),
    ({"thinkingConfig": {"thinkingBudget": 0}}, {}),
])
def test_generation_config_maps_to_openai_fields(config: dict[str, Any], expected: dict[str, Any]) -> None:
    chat = FACE.to_chat(body(generationConfig=config, safetySettings=[
        {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]))
    assert {k: v for k, v in chat.items() if k not in ("model", "messages")} == expected


@pytest.mark.parametrize(("mode", "choice"), [("AUTO", "auto"), ("ANY", "required"), ("NONE", "none"),
                                              ("VALIDATED", "auto"), (None, "auto")])
def test_function_calling_modes_map_to_tool_choice(mode: str | None, choice: str) -> None:
    config = {"functionCallingConfig": {"mode": mode}} if mode else {}
    chat = FACE.to_chat(body(tools=[{"functionDeclarations": [{"name": "f"}]}], toolConfig=config))
    assert chat["tool_choice"] == choice
    assert chat["tools"][0]["function"]["parameters"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize("tool", ["googleSearch", "codeExecution", "urlContext", "googleSearchRetrieval"])
def test_google_side_tools_are_refused_elsewhere_naming_the_tool(tool: str) -> None:
    with pytest.raises(adapters.RequestError, match=f"'{tool}'"):
        adapters.from_gemini_request(body(tools=[{tool: {}}]))
    with pytest.raises(adapters.UpstreamError, match=f"'{tool}'") as caught:  # the face: a Gemini channel may take it
        FACE.to_chat(body(tools=[{tool: {}}]))
    assert (caught.value.status, caught.value.retryable) == (400, True)


@pytest.mark.parametrize("request_body", [
    body(cachedContent="cachedContents/abc"),
    body(contents=[{"role": "user", "parts": [{"fileData": {"mimeType": "video/mp4", "fileUri": "gs://b/v.mp4"}}]}]),
    body(contents=[{"role": "model", "parts": [{"executableCode": {"language": "PYTHON", "code": "1"}}]}]),
])
def test_gemini_only_content_is_refused_elsewhere(request_body: dict[str, Any]) -> None:
    FACE.validate(request_body)
    with pytest.raises(adapters.RequestError):
        adapters.from_gemini_request(request_body)


def test_stream_requests_ask_for_usage() -> None:
    chat = FACE.to_chat(body(stream=True, alt="sse"))
    assert (chat["stream"], chat["stream_options"]) == (True, {"include_usage": True})
    assert "alt" not in chat


# --- from_chat ---


def test_completion_becomes_a_generate_content_response() -> None:
    signed = adapters.encode_signature_id("call_9", "c2lnbmF0dXJl")
    completion = {"id": "chatcmpl-7", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
            "role": "assistant", "content": "Checking.", "reasoning_content": "Need weather.", "tool_calls": [
                {"id": signed, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"P"}'}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "not json"}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 30, "total_tokens": 40,
                  "completion_tokens_details": {"reasoning_tokens": 12},
                  "prompt_tokens_details": {"cached_tokens": 4}}}
    thinking = body(generationConfig={"thinkingConfig": {"includeThoughts": True}})
    assert FACE.from_chat(completion, body(), "m")["candidates"][0]["content"]["parts"][0] == {"text": "Checking."}
    answer = FACE.from_chat(completion, thinking, "gem-alias")
    assert answer == {"candidates": [{"content": {"role": "model", "parts": [
        {"text": "Need weather.", "thought": True}, {"text": "Checking."},
        {"functionCall": {"id": "call_9", "name": "get_weather", "args": {"city": "P"}},
         "thoughtSignature": "c2lnbmF0dXJl"},
        {"functionCall": {"id": "call_b", "name": "get_time", "args": {}}}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 18, "totalTokenCount": 40,
                          "thoughtsTokenCount": 12, "cachedContentTokenCount": 4},
        "modelVersion": "gem-alias", "responseId": "chatcmpl-7"}


@pytest.mark.parametrize(("finish", "reason"), [("stop", "STOP"), ("length", "MAX_TOKENS"),
                                                ("content_filter", "SAFETY"), ("tool_calls", "STOP")])
def test_finish_reasons_map_to_gemini(finish: str, reason: str) -> None:
    completion = {"id": "c", "choices": [{"index": 0, "finish_reason": finish, "message": {"content": ""}}]}
    candidate = FACE.from_chat(completion, body(), "m")["candidates"][0]
    assert candidate == {"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": reason, "index": 0}


# --- stream ---


def test_sse_stream_sends_text_as_it_comes_and_calls_whole_at_the_end() -> None:
    snake_case = {"generation_config": {"thinking_config": {"include_thoughts": True}}}
    stream = FACE.stream(body(stream=True, alt="sse", **snake_case), "gem")
    assert stream.media_type == "text/event-stream"
    frames = [*stream.on_chunk(chunk({"role": "assistant", "content": ""})),
              *stream.on_chunk(chunk({"reasoning_content": "hmm"})),
              *stream.on_chunk(chunk({"content": "Hel"})),
              *stream.on_chunk(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                      "function": {"name": "f", "arguments": '{"a":'}}]})),
              *stream.on_chunk(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})),
              *stream.on_chunk(chunk({}, "tool_calls")),
              *stream.on_chunk({"id": "chatcmpl-1", "choices": [], "usage": {
                  "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
              *stream.end()]
    events = sse_frames(frames)
    assert [e["candidates"][0]["content"]["parts"] for e in events] == [
        [{"text": "hmm", "thought": True}], [{"text": "Hel"}],
        [{"functionCall": {"id": "call_1", "name": "f", "args": {"a": 1}}}]]
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert events[-1]["usageMetadata"] == {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7}
    assert {(e["modelVersion"], e["responseId"]) for e in events} == {("gem", "chatcmpl-1")}
    assert all("finishReason" not in e["candidates"][0] for e in events[:-1])


def test_thought_parts_are_sent_only_when_include_thoughts_asks() -> None:
    stream = FACE.stream(body(stream=True, alt="sse"), "gem")
    frames = [*stream.on_chunk(chunk({"reasoning_content": "hmm"})), *stream.on_chunk(chunk({"content": "a"}))]
    assert [e["candidates"][0]["content"]["parts"] for e in sse_frames(frames)] == [[{"text": "a"}]]


def test_json_array_stream_is_one_json_array_of_responses() -> None:
    stream = FACE.stream(body(stream=True), "gem")
    assert stream.media_type == "application/json"
    frames = [*stream.on_chunk(chunk({"content": "a"})), *stream.on_chunk(chunk({"content": "b"}, "length")),
              *stream.end()]
    array = json.loads(b"".join(frames))
    assert [r["candidates"][0]["content"]["parts"][0]["text"] for r in array] == ["a", "b", ""]
    assert array[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"


def test_failure_after_commit_ends_with_googles_error_object() -> None:
    stream = FACE.stream(body(stream=True), "gem")
    frames = [*stream.on_chunk(chunk({"content": "a"})), *stream.fail("upstream failed mid-stream", 502)]
    assert json.loads(b"".join(frames))[-1] == {"error": {"code": 502, "message": "upstream failed mid-stream",
                                                          "status": "UNAVAILABLE"}}
    sse = FACE.stream(body(stream=True, alt="sse"), "gem")
    assert sse_frames(sse.fail("cut", 504)) == [{"error": {"code": 504, "message": "cut",
                                                           "status": "DEADLINE_EXCEEDED"}}]


@pytest.mark.parametrize(("status", "name"), [(400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED"),
                                              (403, "PERMISSION_DENIED"), (404, "NOT_FOUND"),
                                              (429, "RESOURCE_EXHAUSTED"), (500, "INTERNAL"), (503, "UNAVAILABLE")])
def test_errors_take_googles_shape_and_status_names(status: int, name: str) -> None:
    assert FACE.error_body("nope", status, "invalid_request_error", None) == {
        "error": {"code": status, "message": "nope", "status": name}}


# --- native passthrough ---


def test_gemini_channels_get_the_body_as_sent_without_the_route_keys() -> None:
    provider = adapters.Provider("g", "gemini", "https://generativelanguage.googleapis.com/v1beta", api_keys=("k",))
    sent = body(stream=True, alt="sse", cachedContent="cachedContents/1", tools=[{"googleSearch": {}}],
                safetySettings=[{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}])
    request = FACE.native["gemini"].build_request(sent, adapters.Target(provider, "gemini-2.5-pro", "k"))
    assert request.url.endswith("/models/gemini-2.5-pro:streamGenerateContent?alt=sse")
    assert request.json == {k: v for k, v in sent.items() if k not in ("model", "stream", "alt")}
    count = FACE.native["gemini"].build_count_tokens_request(body(), adapters.Target(provider, "gemini-2.5-pro", "k"))
    assert count.url.endswith("/models/gemini-2.5-pro:countTokens") and count.json == {"contents": body()["contents"]}
    assert set(FACE.native) == {"gemini", "vertex-gemini"}


def test_native_stream_relays_events_renaming_the_model_version() -> None:
    stream = FACE.native_stream(body(stream=True), "alias")
    first = adapters.SSEEvent("message", '{"candidates":[{"content":{"parts":[{"text":"a"}]}}],'
                                         '"modelVersion":"gemini-2.5-pro-001"}')
    last = adapters.SSEEvent("message", '{"candidates":[{"content":{"parts":[{"text":"b"}]},"finishReason":"STOP"}],'
                                        '"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":3,'
                                        '"totalTokenCount":5},"modelVersion":"gemini-2.5-pro-001"}')
    frames = [stream.on_event(first), stream.on_event(last), *stream.end()]
    array = json.loads(b"".join(frames))
    assert [r["modelVersion"] for r in array] == ["alias", "alias"]
    assert stream.done and stream.usage == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    failing = FACE.native_stream(body(stream=True, alt="sse"), "alias")
    with pytest.raises(adapters.UpstreamError) as caught:
        failing.on_event(adapters.SSEEvent("message", '{"error":{"code":429,"message":"busy"}}'))
    assert caught.value.status == 429


def test_native_answer_renames_the_model_version_and_reads_usage() -> None:
    raw = b'{"candidates":[],"usageMetadata":{"promptTokenCount":4,"totalTokenCount":4},"modelVersion":"x-001"}'
    sent, usage = FACE.native_answer(raw, "alias")
    assert json.loads(sent)["modelVersion"] == "alias"
    assert usage is not None and usage["prompt_tokens"] == 4


def test_token_estimate_counts_text_and_media() -> None:
    text_only = adapters.estimate_gemini_tokens(body(contents=[{"role": "user", "parts": [{"text": "x" * 400}]}]))
    assert text_only == 101  # 404 characters: the text and its field name
    with_image = adapters.estimate_gemini_tokens(body(contents=[{"role": "user", "parts": [
        {"text": "x" * 400}, {"inlineData": {"mimeType": "image/png", "data": "A" * 100_000}}]}]))
    assert with_image == 101 + 1600
    wrapped = adapters.estimate_gemini_tokens({"generateContentRequest": {"model": "models/m", "contents": [
        {"role": "user", "parts": [{"text": "x" * 40}]}]}})
    assert wrapped == 11


# --- Through the gateway: the google-genai SDK against each engine family ---


def genai_client(gateway: GatewayServer, key: str = "sk-client") -> genai.Client:
    options = types.HttpOptions(base_url=gateway.url, retry_options=types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key=key, http_options=options)


def family_config(gpt: FakeUpstream, claude: FakeUpstream, gemini: FakeUpstream) -> dict[str, Any]:
    """One provider per engine family, each serving one alias; the client key may use all but `hidden`."""
    return {"providers": [
        {"provider": "oa", "base_url": f"{gpt.url}/v1/chat/completions", "api": "sk-up-secret",
         "model": [{"gpt-4o-2024-08-06": "gpt-4o"}, "hidden"], "preferences": {"cooldown_period": 0}},
        {"provider": "ant", "base_url": f"{claude.url}/v1/messages", "api": "sk-ant-secret",
         "model": [{"claude-sonnet-4-5": "sonnet"}], "preferences": {"cooldown_period": 0}},
        {"provider": "gem", "base_url": f"{gemini.url}/v1beta", "api": "AIza-gemini-secret",
         "model": [{"gemini-2.5-flash": "flash"}], "preferences": {"cooldown_period": 0}}],
        "api_keys": [{"api": "sk-client", "model": ["oa/gpt-4o", "ant/sonnet", "gem/flash"]}]}


@pytest.fixture
def families(make_upstream: Callable[[], FakeUpstream], make_gateway: MakeGateway
             ) -> tuple[GatewayServer, FakeUpstream, FakeUpstream, FakeUpstream]:
    gpt, claude, gemini = make_upstream(), make_upstream(), make_upstream()
    return make_gateway(family_config(gpt, claude, gemini)), gpt, claude, gemini


Families = tuple[GatewayServer, FakeUpstream, FakeUpstream, FakeUpstream]


def test_sdk_lists_and_gets_only_the_models_the_key_may_use(families: Families) -> None:
    gateway = families[0]
    client = genai_client(gateway)
    models = list(client.models.list())
    assert [m.name for m in models] == ["models/gpt-4o", "models/sonnet", "models/flash"]
    assert all(m.supported_actions == ["generateContent", "streamGenerateContent", "countTokens"] for m in models)
    assert client.models.get(model="sonnet").display_name == "sonnet"
    with pytest.raises(genai_errors.ClientError) as missing:
        client.models.get(model="nope")
    assert (missing.value.code, missing.value.status) == (404, "NOT_FOUND")
    with pytest.raises(genai_errors.ClientError) as hidden:
        client.models.get(model="hidden")
    assert (hidden.value.code, hidden.value.status) == (403, "PERMISSION_DENIED")


def test_v1_models_answers_each_client_in_its_own_shape(families: Families) -> None:
    gateway = families[0]
    openai_listing = gateway.http("sk-client").get("/v1/models").json()
    assert [m["id"] for m in openai_listing["data"]] == ["gpt-4o", "sonnet", "flash"]
    gemini_listing = httpx.get(gateway.url + "/v1/models", headers={"x-goog-api-key": "sk-client"}).json()
    assert [m["name"] for m in gemini_listing["models"]] == ["models/gpt-4o", "models/sonnet", "models/flash"]
    assert httpx.get(gateway.url + "/v1/models/flash?key=sk-client").json()["name"] == "models/flash"
    retrieved = gateway.http("sk-client").get("/v1/models/flash").json()
    assert (retrieved["id"], retrieved["object"], retrieved["owned_by"]) == ("flash", "model", "gem")
    for version in ("v1", "v1beta"):
        client = genai.Client(api_key="sk-client", http_options=types.HttpOptions(base_url=gateway.url,
                                                                                  api_version=version))
        assert [m.name for m in client.models.list()][0] == "models/gpt-4o"


def test_missing_or_unknown_keys_get_googles_error_shape(families: Families) -> None:
    gateway = families[0]
    answer = httpx.post(gateway.url + "/v1beta/models/gpt-4o:generateContent", json=body())
    assert answer.status_code == 401
    assert answer.json()["error"]["status"] == "UNAUTHENTICATED" and answer.json()["error"]["code"] == 401
    client = genai_client(gateway, "sk-wrong")
    with pytest.raises(genai_errors.ClientError) as caught:
        client.models.generate_content(model="gpt-4o", contents="hi")
    assert (caught.value.code, caught.value.status) == (401, "UNAUTHENTICATED")


def claude_message(*content: dict[str, Any], stop: str = "end_turn") -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": list(content), "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 7, "output_tokens": 3}}


def gemini_answer(*parts: dict[str, Any], finish: str = "STOP") -> dict[str, Any]:
    candidate = {"content": {"role": "model", "parts": list(parts)}, "index": 0, **({"finishReason": finish} if finish
                                                                                  else {})}
    return {"candidates": [candidate],
            "usageMetadata": {"promptTokenCount": 6, "candidatesTokenCount": 2, "totalTokenCount": 8},
            "modelVersion": "gemini-2.5-flash-001", "responseId": "up-1"}


CONFIG = types.GenerateContentConfig(system_instruction="Be brief.", temperature=0.3, max_output_tokens=50,
                                     stop_sequences=["END"])


def test_sdk_generate_content_on_a_gpt_channel(families: Families) -> None:
    gateway, gpt = families[0], families[1]
    gpt.enqueue(Reply(json=completion("Hello there", usage={
        "prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
        "completion_tokens_details": {"reasoning_tokens": 1}})))
    client = genai_client(gateway)
    answer = client.models.generate_content(model="gpt-4o", contents="Say hello", config=CONFIG)
    assert answer.text == "Hello there"
    assert answer.candidates is not None and answer.candidates[0].finish_reason == types.FinishReason.STOP
    usage = answer.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count, usage.thoughts_token_count,
            usage.total_token_count) == (9, 3, 1, 13)
    assert answer.model_version == "gpt-4o"
    assert gpt.received[0].path == "/v1/chat/completions"
    assert gpt.received[0].json == {
        "model": "gpt-4o-2024-08-06", "temperature": 0.3, "max_tokens": 50, "stop": ["END"],
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]}


def test_sdk_stream_on_a_gpt_channel(families: Families) -> None:
    gateway, gpt = families[0], families[1]
    gpt.enqueue(sse=chunks(["Hel", "lo"], usage=True))
    client = genai_client(gateway)
    pieces = list(client.models.generate_content_stream(model="gpt-4o", contents="Say hello"))
    assert "".join(p.text or "" for p in pieces) == "Hello"
    last = pieces[-1]
    assert last.candidates is not None and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata is not None and last.usage_metadata.total_token_count == 7
    assert gpt.received[0].json["stream"] is True
    assert gpt.received[0].json["stream_options"] == {"include_usage": True}


def weather_tool() -> types.Tool:
    return types.Tool(function_declarations=[types.FunctionDeclaration(
        name="get_weather", description="Weather of a city", parameters=types.Schema(
            type=types.Type.OBJECT, properties={"city": types.Schema(type=types.Type.STRING)}, required=["city"]))])


def tool_loop(client: genai.Client, model: str, *, stream: bool = False) -> tuple[types.FunctionCall, str]:
    """The google-genai function-calling loop: ask, get a call, send its result back, get the answer."""
    config = types.GenerateContentConfig(tools=[weather_tool()], automatic_function_calling=types.
                                         AutomaticFunctionCallingConfig(disable=True))
    contents: list[Any] = [types.Content(role="user", parts=[types.Part(text="Weather in Paris?")])]
    if stream:
        pieces = list(client.models.generate_content_stream(model=model, contents=contents, config=config))
        calls = [c for p in pieces for c in p.function_calls or ()]
        turn = types.Content(role="model", parts=[types.Part(function_call=c) for c in calls])
    else:
        first = client.models.generate_content(model=model, contents=contents, config=config)
        calls, turn = first.function_calls or [], first.candidates[0].content  # type: ignore[index]
    assert len(calls) == 1
    contents += [turn, types.Content(role="user", parts=[types.Part(function_response=types.FunctionResponse(
        id=calls[0].id, name=calls[0].name, response={"output": "sunny, 21 C"}))])]
    final = client.models.generate_content(model=model, contents=contents, config=config)
    return calls[0], final.text or ""


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_function_calling_loop_on_a_gpt_channel(families: Families, stream: bool) -> None:
    gateway, gpt = families[0], families[1]
    call = {"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    if stream:
        gpt.enqueue(sse=[{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [
            {"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0, **call}]}, "logprobs": None,
             "finish_reason": None}]}, {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]}, "[DONE]"])
    else:
        gpt.enqueue(Reply(json=completion("", choices=[{"index": 0, "logprobs": None, "finish_reason": "tool_calls",
                                                         "message": {"role": "assistant", "content": None,
                                                                     "tool_calls": [call]}}])))
    gpt.enqueue(Reply(json=completion("Sunny in Paris.")))
    function_call, text = tool_loop(genai_client(gateway), "gpt-4o", stream=stream)
    assert (function_call.name, function_call.args, function_call.id) == ("get_weather", {"city": "Paris"}, "call_w1")
    assert text == "Sunny in Paris."
    sent = gpt.received[1].json
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 21 C"}]


def test_sdk_function_calling_loop_on_a_claude_channel(families: Families) -> None:
    gateway, claude = families[0], families[2]
    claude.enqueue(Reply(json=claude_message(
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}, stop="tool_use")))
    claude.enqueue(Reply(json=claude_message({"type": "text", "text": "Sunny in Paris."})))
    function_call, text = tool_loop(genai_client(gateway), "sonnet")
    assert (function_call.name, function_call.id, text) == ("get_weather", "toolu_01", "Sunny in Paris.")
    replay = claude.received[1].json
    assert claude.received[1].path == "/v1/messages" and replay["model"] == "claude-sonnet-4-5"
    assert replay["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                      "content": [{"type": "text", "text": "sunny, 21 C"}]}]}]


def test_sdk_stream_on_a_claude_channel(families: Families) -> None:
    gateway, claude = families[0], families[2]
    data = (FIXTURES / "claude" / "basic_stream.upstream.sse").read_bytes()
    claude.enqueue(Reply(raw_chunks=[data[i:i + 64] for i in range(0, len(data), 64)]))
    client = genai_client(gateway)
    pieces = list(client.models.generate_content_stream(model="sonnet", contents="Hi"))
    assert "".join(p.text or "" for p in pieces)
    assert pieces[-1].usage_metadata is not None and pieces[-1].usage_metadata.prompt_token_count == 25


def test_sdk_function_calling_loop_on_a_gemini_channel_passes_bodies_through(families: Families) -> None:
    gateway, gemini = families[0], families[3]
    gemini.enqueue(Reply(json=gemini_answer({"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                                             "thoughtSignature": "c2ln"})))
    gemini.enqueue(Reply(json=gemini_answer({"text": "Sunny in Paris."})))
    function_call, text = tool_loop(genai_client(gateway), "flash")
    assert (function_call.name, text) == ("get_weather", "Sunny in Paris.")
    first, second = gemini.received
    assert first.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert first.headers["x-goog-api-key"] == "AIza-gemini-secret" and "key" not in first.query
    assert not {"model", "stream", "alt"} & set(first.json)  # the SDK's body as sent, no route keys added
    declaration = first.json["tools"][0]["functionDeclarations"][0]
    assert declaration["parameters"] == {"type": "OBJECT", "required": ["city"],
                                         "properties": {"city": {"type": "STRING"}}}
    assert second.json["contents"][1]["parts"][0]["thoughtSignature"] == "c2ln"  # the SDK sent it back as is


def test_sdk_stream_on_a_gemini_channel_relays_each_event(families: Families) -> None:
    gateway, gemini = families[0], families[3]
    gemini.enqueue(Reply(sse=[gemini_answer({"text": "Hel"}, finish="")] + [gemini_answer({"text": "lo"})]))
    client = genai_client(gateway)
    pieces = list(client.models.generate_content_stream(model="flash", contents="Hi"))
    assert [p.text for p in pieces] == ["Hel", "lo"]
    assert {p.model_version for p in pieces} == {"flash"} and pieces[-1].response_id == "up-1"
    assert gemini.received[0].path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert gemini.received[0].query == {"alt": "sse"}


def test_json_array_stream_without_alt(families: Families) -> None:
    gateway, gpt, gemini = families[0], families[1], families[3]
    gpt.enqueue(sse=chunks(["a", "b"], usage=True))
    gemini.enqueue(Reply(sse=[gemini_answer({"text": "x"}, finish=""), gemini_answer({"text": "y"})]))
    for model, texts in (("gpt-4o", ["a", "b", ""]), ("flash", ["x", "y"])):
        answer = httpx.post(f"{gateway.url}/v1beta/models/{model}:streamGenerateContent", json=body(),
                            headers={"x-goog-api-key": "sk-client"})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
        array = answer.json()
        assert [r["candidates"][0]["content"]["parts"][0]["text"] for r in array] == texts
        assert array[-1]["candidates"][0]["finishReason"] == "STOP"


@pytest.mark.parametrize(("model", "tokens"), [("gpt-4o", 4), ("sonnet", 4), ("flash", 42)])
def test_sdk_count_tokens_counts_on_gemini_and_estimates_elsewhere(families: Families, model: str,
                                                                   tokens: int) -> None:
    gateway, gemini = families[0], families[3]
    gemini.enqueue(Reply(json={"totalTokens": 42}))
    client = genai_client(gateway)
    assert client.models.count_tokens(model=model, contents="Hello there").total_tokens == tokens
    if model == "flash":
        assert gemini.received[0].path == "/v1beta/models/gemini-2.5-flash:countTokens"
        assert gemini.received[0].json == {"contents": [{"parts": [{"text": "Hello there"}], "role": "user"}]}


def test_google_side_tools_get_a_400_naming_them_without_a_gemini_channel(families: Families) -> None:
    gateway, gpt = families[0], families[1]
    client = genai_client(gateway)
    config = types.GenerateContentConfig(tools=[types.Tool(google_search=types.GoogleSearch())])
    with pytest.raises(genai_errors.ClientError) as caught:
        client.models.generate_content(model="gpt-4o", contents="news?", config=config)
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert "googleSearch" in str(caught.value.message)
    assert gpt.received == []


@pytest.mark.parametrize("auth", [{"headers": {"Authorization": "Bearer sk-client"}}, {"params": {"key": "sk-client"}},
                                  {"headers": {"x-goog-api-key": "sk-client"}}])
def test_keys_are_taken_from_bearer_query_or_goog_header(families: Families, auth: dict[str, Any]) -> None:
    gateway, gpt = families[0], families[1]
    gpt.enqueue(Reply(json=completion("ok")))
    answer = httpx.post(gateway.url + "/v1/models/gpt-4o:generateContent", json=body(), **auth)
    assert answer.status_code == 200 and answer.json()["candidates"][0]["content"]["parts"] == [{"text": "ok"}]


def test_bad_request_bodies_get_googles_400(families: Families) -> None:
    answer = httpx.post(families[0].url + "/v1beta/models/gpt-4o:generateContent?key=sk-client",
                        json={"contents": "hi"})
    assert answer.status_code == 400
    assert answer.json()["error"]["status"] == "INVALID_ARGUMENT" and "contents" in answer.json()["error"]["message"]
    unknown = httpx.post(families[0].url + "/v1beta/models/gpt-4o:predictLongRunning?key=sk-client", json=body())
    assert unknown.status_code == 404 and unknown.json()["error"]["status"] == "NOT_FOUND"


def test_vertex_gemini_channel_gets_the_body_with_the_exchanged_token(upstream: FakeUpstream,
                                                                      make_gateway: MakeGateway) -> None:
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    from cryptography.hazmat.primitives import serialization

    pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    vertex = {"provider": "vx", "base_url": upstream.url, "engine": "vertex-gemini", "project_id": "p",
              "region": "us-central1", "client_email": "gw@p.iam.gserviceaccount.com", "private_key": pem,
              "token_uri": f"{upstream.url}/token", "model": [{"gemini-2.5-pro": "pro"}]}
    upstream.enqueue(Reply(json={"access_token": "ya29.token", "expires_in": 3599}))
    upstream.enqueue(Reply(sse=[gemini_answer({"text": "Hi from Vertex"})]))
    gateway = make_gateway({"providers": [vertex], "api_keys": [{"api": "sk-client"}]})
    client = genai_client(gateway)
    pieces = list(client.models.generate_content_stream(model="pro", contents="Hi"))
    assert [p.text for p in pieces] == ["Hi from Vertex"] and pieces[0].model_version == "pro"
    call = upstream.received[1]
    assert call.path == "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:" \
                        "streamGenerateContent" and call.query == {"alt": "sse"}
    assert call.headers["Authorization"] == "Bearer ya29.token" and "x-goog-api-key" not in call.headers
    assert call.json == {"contents": [{"parts": [{"text": "Hi"}], "role": "user"}]}


@pytest.mark.parametrize("alt", ["sse", None])
def test_converted_stream_cut_after_commit_ends_with_googles_error(families: Families, alt: str | None) -> None:
    gateway, gpt = families[0], families[1]
    gpt.enqueue(Reply(sse=chunks(["one", "two", "three"]), reset_after=2))
    query = "?alt=sse" if alt else ""
    answer = httpx.post(f"{gateway.url}/v1beta/models/gpt-4o:streamGenerateContent{query}", json=body(),
                        headers={"x-goog-api-key": "sk-client"}, timeout=30)
    assert answer.status_code == 200
    frames = sse_frames([answer.content]) if alt else answer.json()
    assert frames[0]["candidates"][0]["content"]["parts"] == [{"text": "one"}]
    assert frames[-1]["error"]["code"] == 502 and frames[-1]["error"]["status"] == "UNAVAILABLE"
    assert "mid-stream" in frames[-1]["error"]["message"]


def test_native_stream_cut_after_commit_ends_with_googles_error(families: Families) -> None:
    gateway, gemini = families[0], families[3]
    gemini.enqueue(Reply(sse=[gemini_answer({"text": "a"}, finish=""), gemini_answer({"text": "b"}, finish="")]))
    answer = httpx.post(f"{gateway.url}/v1beta/models/flash:streamGenerateContent", json=body(),
                        headers={"x-goog-api-key": "sk-client"}, timeout=30)
    array = answer.json()  # still one well-formed JSON array
    assert [r.get("candidates", [{}])[0].get("content", {}).get("parts") for r in array[:2]] == [
        [{"text": "a"}], [{"text": "b"}]]
    assert array[-1]["error"]["status"] == "UNAVAILABLE"


def test_native_error_event_first_fails_over_to_the_next_channel(make_upstream: Callable[[], FakeUpstream],
                                                                  make_gateway: MakeGateway) -> None:
    busy, spare = make_upstream(), make_upstream()
    busy.enqueue(Reply(sse=[{"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}]))
    spare.enqueue(sse=chunks(["fine"]))
    gateway = make_gateway({"providers": [
        {"provider": "gem", "base_url": f"{busy.url}/v1beta", "api": "AIza-x", "model": [{"gemini-2.5-flash": "m"}],
         "preferences": {"cooldown_period": 0}},
        {"provider": "oa", "base_url": f"{spare.url}/v1/chat/completions", "api": "sk-x", "model": [{"gpt-4o": "m"}],
         "preferences": {"cooldown_period": 0}}], "api_keys": [{"api": "sk-client"}]})
    client = genai_client(gateway)
    pieces = list(client.models.generate_content_stream(model="m", contents="Hi"))
    assert "".join(p.text or "" for p in pieces) == "fine"
    assert len(busy.received) == 1 and len(spare.received) == 1


def test_gemini_requests_are_recorded_with_their_tokens(make_upstream: Callable[[], FakeUpstream],
                                                         make_gateway: MakeGateway, tmp_path: Path) -> None:
    gemini, gpt = make_upstream(), make_upstream()
    db = tmp_path / "stats.db"
    gateway = make_gateway(family_config(gpt, make_upstream(), gemini), stats_options=uni_api.StatsOptions(str(db)))
    gemini.enqueue(Reply(json=gemini_answer({"text": "ok"})))  # 6 in, 2 out
    gemini.enqueue(Reply(sse=[gemini_answer({"text": "ok"})]))
    gpt.enqueue(sse=chunks(["a", "b", "c"], usage=True))  # 5 in, 3 out
    client = genai_client(gateway)
    client.models.generate_content(model="flash", contents="Hi")
    list(client.models.generate_content_stream(model="flash", contents="Hi"))
    list(client.models.generate_content_stream(model="gpt-4o", contents="Hi"))
    gateway.server_loop.run(gateway.state.stats.flush())
    with sqlite3.connect(db) as connection:
        found = connection.execute("SELECT model, provider, upstream_model, endpoint, status, prompt_tokens,"
                                   " completion_tokens FROM requests ORDER BY id").fetchall()
    assert found == [  # this google-genai calls /v1 under a custom base_url
        ("flash", "gem", "gemini-2.5-flash", "POST /v1/models/flash:generateContent", 200, 6, 2),
        ("flash", "gem", "gemini-2.5-flash", "POST /v1/models/flash:streamGenerateContent", 200, 6, 2),
        ("gpt-4o", "oa", "gpt-4o-2024-08-06", "POST /v1/models/gpt-4o:streamGenerateContent", 200, 5, 3)]


def test_moderation_reads_the_last_user_turns_text() -> None:
    request = body(contents=[{"role": "user", "parts": [{"text": "first"}]},
                             {"role": "model", "parts": [{"text": "answer"}]},
                             {"parts": [{"text": "second"}, {"inlineData": {"mimeType": "image/png", "data": "x"}},
                                        {"text": "third"}]}])
    assert FACE.user_text(request) == "second\nthird"
