"""POST /v1/responses end to end: the official openai SDK (responses.create / .stream / .parse) through the real
gateway against fake upstreams speaking each engine's wire format; every event and response object validated
against ../shared/openai-openapi. Also GET / DELETE /v1/responses/{id}, previous_response_id over the gateway's
store, /v1/responses/compact, and the store's caps.

References: OpenAI API reference "Responses" (Create a model response, Get, Delete, The response object) and
"Streaming events"; Anthropic "Streaming Messages"; Gemini "models.streamGenerateContent".
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import FakeClock, FakeUpstream, GatewayServer, Reply, completion, simple_config, to_yaml
from openai_schema import validate, validate_response, validate_response_event
from pydantic import BaseModel
from test_faults import ENGINES as RECORDED
from test_faults import Engine

import uni_api

MakeGateway = Callable[..., GatewayServer]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
PARIS = {"city": "Paris"}

# --- Fake upstream answers, one wire format per engine ---


def _openai_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1700000000, "model": "up",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _openai_usage() -> dict[str, Any]:
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1700000000, "model": "up",
            "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def gpt_text(stream: bool) -> Reply:
    if not stream:
        return Reply(json=completion("Hello"))
    return Reply(sse=[_openai_chunk({"role": "assistant", "content": ""}), _openai_chunk({"content": "Hel"}),
                      _openai_chunk({"content": "lo"}), _openai_chunk({}, "stop"), _openai_usage(), "[DONE]"])


def gpt_call(stream: bool) -> Reply:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(PARIS)}}
    if not stream:
        answer = completion("")
        answer["choices"][0].update(message={"role": "assistant", "content": None, "tool_calls": [call]},
                                    finish_reason="tool_calls")
        return Reply(json=answer)
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    rest = {"index": 0, "function": {"arguments": json.dumps(PARIS)}}
    return Reply(sse=[_openai_chunk({"role": "assistant", "tool_calls": [first]}),
                      _openai_chunk({"tool_calls": [rest]}), _openai_chunk({}, "tool_calls"), _openai_usage(),
                      "[DONE]"])


def _claude_stream(blocks: list[list[dict[str, Any]]], stop: str) -> Reply:
    message = {"id": "msg_up", "type": "message", "role": "assistant", "model": "up", "content": [],
               "stop_reason": None, "usage": {"input_tokens": 5, "output_tokens": 1}}
    events: list[Any] = [{"type": "message_start", "message": message}]
    for index, (start, *deltas) in enumerate(blocks):
        events += [{"type": "content_block_start", "index": index, "content_block": start},
                   *({"type": "content_block_delta", "index": index, "delta": d} for d in deltas),
                   {"type": "content_block_stop", "index": index}]
    events += [{"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 2}},
               {"type": "message_stop"}]
    return Reply(sse=events)


def _claude_message(content: list[dict[str, Any]], stop: str) -> Reply:
    return Reply(json={"id": "msg_up", "type": "message", "role": "assistant", "model": "up", "content": content,
                       "stop_reason": stop, "usage": {"input_tokens": 5, "output_tokens": 2}})


def claude_text(stream: bool) -> Reply:
    if not stream:
        return _claude_message([{"type": "text", "text": "Hello"}], "end_turn")
    return _claude_stream([[{"type": "text", "text": ""}, {"type": "text_delta", "text": "Hel"},
                            {"type": "text_delta", "text": "lo"}]], "end_turn")


def claude_call(stream: bool) -> Reply:
    if not stream:
        return _claude_message([{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": PARIS}],
                               "tool_use")
    return _claude_stream([[{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
                            {"type": "input_json_delta", "partial_json": json.dumps(PARIS)}]], "tool_use")


def _gemini(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7}}


def gemini_text(stream: bool) -> Reply:
    if not stream:
        return Reply(json=_gemini([{"text": "Hello"}]))
    first = _gemini([{"text": "Hel"}])
    del first["candidates"][0]["finishReason"]
    return Reply(sse=[first, _gemini([{"text": "lo"}])])


def gemini_call(stream: bool) -> Reply:
    answer = _gemini([{"functionCall": {"name": "get_weather", "args": PARIS}}])
    return Reply(sse=[answer]) if stream else Reply(json=answer)


# engine -> (provider entry for an upstream, text answer, tool-call answer)
ENGINES: dict[str, tuple[Callable[[FakeUpstream], dict[str, Any]], Callable[[bool], Reply],
                         Callable[[bool], Reply]]] = {
    "gpt": (lambda up: {"base_url": f"{up.url}/v1/chat/completions"}, gpt_text, gpt_call),
    "claude": (lambda up: {"base_url": f"{up.url}/v1/messages", "engine": "claude"}, claude_text, claude_call),
    "gemini": (lambda up: {"base_url": f"{up.url}/v1beta", "engine": "gemini"}, gemini_text, gemini_call),
}


def config_for(engine: str, *upstreams: FakeUpstream, **extra: Any) -> dict[str, Any]:
    providers = [{"provider": f"up{i}", "api": f"sk-up{i}-secret", "model": [{"up-model": "m"}],
                  "preferences": {"cooldown_period": 0}, **ENGINES[engine][0](up)} for i, up in enumerate(upstreams)]
    return {"providers": providers, "api_keys": [{"api": "sk-client"}, {"api": "sk-other"}], **extra}


# --- Clients ---


def client(gateway: GatewayServer, key: str = "sk-client") -> openai.OpenAI:
    return gateway.client(key)


def post(gateway: GatewayServer, body: dict[str, Any], key: str = "sk-client") -> httpx.Response:
    return httpx.post(gateway.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=30)


def stream_events(gateway: GatewayServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a streamed answer, each framed `event:` + `data:` and valid against its schema, with one
    terminal event last and sequence numbers counting up from 0."""
    response = post(gateway, {**body, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in response.text
    events = []
    for block in response.text.strip().split("\n\n"):
        head, data = block.split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        validate_response_event(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    terminal = [e["type"] for e in events if e["type"] in ("response.completed", "response.incomplete",
                                                              "response.failed")]
    assert terminal == [events[-1]["type"]]
    return events


def check_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    validate(response.json(), "ErrorResponse")
    return response.json()["error"]  # type: ignore[no-any-return]


# --- Text, per engine ---


@pytest.mark.parametrize("engine", ENGINES)
def test_a_text_answer_is_a_valid_response(engine: str, upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(ENGINES[engine][1](False))
    gateway = make_gateway(config_for(engine, upstream))
    raw = client(gateway).responses.with_raw_response.create(model="m", input="hi", instructions="Be brief.",
                                                              max_output_tokens=100, temperature=0.2)
    validate_response(raw.http_response.json())
    response = raw.parse()
    assert response.output_text == "Hello" and response.status == "completed" and response.model == "m"
    assert response.instructions == "Be brief." and response.usage is not None and response.usage.input_tokens == 5
    assert response.usage.output_tokens == 2 and response.usage.total_tokens == 7


@pytest.mark.parametrize("engine", ENGINES)
def test_a_text_stream_is_the_exact_event_sequence(engine: str, upstream: FakeUpstream,
                                                    make_gateway: MakeGateway) -> None:
    upstream.enqueue(ENGINES[engine][1](True))
    gateway = make_gateway(config_for(engine, upstream))
    events = stream_events(gateway, {"model": "m", "input": "hi"})
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    final = events[-1]["response"]
    validate_response(final)
    assert final["output"][0]["content"][0]["text"] == "Hello" and final["usage"]["input_tokens"] == 5


@pytest.mark.parametrize("engine", ENGINES)
def test_the_sdk_stream_helper_folds_the_events(engine: str, upstream: FakeUpstream,
                                                 make_gateway: MakeGateway) -> None:
    upstream.enqueue(ENGINES[engine][1](True))
    gateway = make_gateway(config_for(engine, upstream))
    with client(gateway).responses.stream(model="m", input="hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello" and final.output_text == "Hello" and final.status == "completed"


# --- Every engine, from recorded answers (gpt, claude, gemini, cohere, cloudflare, aws) ---


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("engine", RECORDED, ids=[e.name for e in RECORDED])
def test_every_engine_answers_a_valid_response(engine: Engine, stream: bool, upstream: FakeUpstream,
                                               make_gateway: MakeGateway) -> None:
    pieces = engine.stream() if stream else [engine.good()]
    upstream.enqueue(Reply(raw_chunks=pieces, content_type=engine.stream_type if stream else "application/json"))
    provider = {"provider": "up", "engine": engine.name, **engine.provider(upstream.url),
                "model": [{engine.upstream_model: "m"}]}
    gateway = make_gateway({"providers": [provider], "api_keys": [{"api": "sk-client"}]})
    body = {"model": "m", "input": "hi"}
    final = stream_events(gateway, body)[-1]["response"] if stream else post(gateway, body).json()
    validate_response(final)
    assert final["status"] == "completed" and final["model"] == "m"
    assert final["output"][-1]["content"][0]["text"] == (engine.stream_text if stream else engine.text)


# --- A tool loop with function_call_output, per engine ---


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_tool_loop_round_trips_the_call_and_its_output(engine: str, stream: bool, upstream: FakeUpstream,
                                                         make_gateway: MakeGateway) -> None:
    _, text, call = ENGINES[engine]
    upstream.enqueue(call(stream))
    upstream.enqueue(text(stream))
    gateway = make_gateway(config_for(engine, upstream))
    body: dict[str, Any] = {"model": "m", "input": [{"role": "user", "content": "Weather in Paris?"}],
                            "tools": [WEATHER], "store": False}
    first = stream_events(gateway, body)[-1]["response"] if stream else post(gateway, body).json()
    validate_response(first)
    [item] = first["output"]
    assert (item["type"], item["name"], json.loads(item["arguments"]), item["status"]) == (
        "function_call", "get_weather", PARIS, "completed")
    body["input"] += [item, {"type": "function_call_output", "call_id": item["call_id"], "output": "18C, sunny"}]
    second = stream_events(gateway, body)[-1]["response"] if stream else post(gateway, body).json()
    validate_response(second)
    assert second["output"][-1]["content"][0]["text"] == "Hello"
    sent = json.dumps(upstream.received[1].json)
    assert "18C, sunny" in sent and "get_weather" in sent
    assert item["call_id"] in sent or engine == "gemini"  # Gemini pairs a result with its call by name


@pytest.mark.parametrize("engine", ENGINES)
def test_the_sdk_tool_loop_with_the_stream_helper(engine: str, upstream: FakeUpstream,
                                                  make_gateway: MakeGateway) -> None:
    _, text, call = ENGINES[engine]
    upstream.enqueue(call(True))
    upstream.enqueue(text(False))
    gateway = make_gateway(config_for(engine, upstream))
    sdk = client(gateway)
    with sdk.responses.stream(model="m", input="Weather in Paris?", tools=[WEATHER]) as stream:
        first = stream.get_final_response()
    call = first.output[0]
    assert call.type == "function_call" and json.loads(call.arguments) == PARIS
    followup = sdk.responses.create(model="m", previous_response_id=first.id, tools=[WEATHER], input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}])
    assert followup.output_text == "Hello" and followup.previous_response_id == first.id
    assert engine != "claude" or upstream.received[1].json["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": PARIS}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                      "content": [{"type": "text", "text": "18C"}]}]}]


# --- Reasoning: Claude thinking with its signature, replayed statelessly ---


def test_claude_thinking_signature_round_trips_through_encrypted_content(upstream: FakeUpstream,
                                                                         make_gateway: MakeGateway) -> None:
    upstream.enqueue(_claude_stream([
        [{"type": "thinking", "thinking": "", "signature": ""}, {"type": "thinking_delta", "thinking": "Need "},
         {"type": "thinking_delta", "thinking": "weather."}, {"type": "signature_delta", "signature": "SIG=="}],
        [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
         {"type": "input_json_delta", "partial_json": json.dumps(PARIS)}]], "tool_use"))
    upstream.enqueue(claude_text(True))
    gateway = make_gateway(config_for("claude", upstream))
    body: dict[str, Any] = {"model": "m", "input": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER],
                            "reasoning": {"effort": "low", "summary": "auto"}, "store": False,
                            "include": ["reasoning.encrypted_content"]}
    events = stream_events(gateway, body)
    assert "response.reasoning_summary_text.delta" in [e["type"] for e in events]
    reasoning, call = events[-1]["response"]["output"]
    assert reasoning["summary"] == [{"type": "summary_text", "text": "Need weather."}]
    assert upstream.received[0].json["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    body["input"] += [reasoning, call, {"type": "function_call_output", "call_id": call["call_id"], "output": "18C"}]
    stream_events(gateway, body)
    assert upstream.received[1].json["messages"][1] == {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Need weather.", "signature": "SIG=="},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": PARIS}]}


def test_gemini_thoughts_stream_as_reasoning_before_the_text(upstream: FakeUpstream,
                                                             make_gateway: MakeGateway) -> None:
    thought = _gemini([{"text": "Counting.", "thought": True}])
    del thought["candidates"][0]["finishReason"]
    upstream.enqueue(Reply(sse=[thought, _gemini([{"text": "4"}])]))
    gateway = make_gateway(config_for("gemini", upstream))
    events = stream_events(gateway, {"model": "m", "input": "2+2?", "reasoning": {"effort": "low"}})
    assert [e["type"] for e in events][2:7] == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done"]
    reasoning, message = events[-1]["response"]["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Counting."}]
    assert message["content"][0]["text"] == "4"
    assert upstream.received[0].json["generationConfig"]["thinkingConfig"]["includeThoughts"] is True


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_cut_by_max_tokens_is_incomplete(stream: bool, upstream: FakeUpstream,
                                                   make_gateway: MakeGateway) -> None:
    if stream:
        upstream.enqueue(_claude_stream([[{"type": "text", "text": ""}, {"type": "text_delta", "text": "Hel"}]],
                                        "max_tokens"))
    else:
        upstream.enqueue(_claude_message([{"type": "text", "text": "Hel"}], "max_tokens"))
    gateway = make_gateway(config_for("claude", upstream))
    body = {"model": "m", "input": "hi", "max_output_tokens": 16}
    events = stream_events(gateway, body) if stream else []
    final = events[-1]["response"] if stream else post(gateway, body).json()
    validate_response(final)
    assert (final["status"], final["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert not stream or events[-1]["type"] == "response.incomplete"
    assert upstream.received[0].json["max_tokens"] == 16


# --- Structured outputs ---


class Weather(BaseModel):
    city: str
    celsius: int


@pytest.mark.parametrize("engine", ["gpt", "claude", "gemini"])
def test_responses_parse_with_a_pydantic_model(engine: str, upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    answer = json.dumps({"city": "Paris", "celsius": 18})
    upstream.enqueue({"gpt": Reply(json=completion(answer)), "gemini": Reply(json=_gemini([{"text": answer}])),
                      "claude": _claude_message([{"type": "text", "text": answer}], "end_turn")}[engine])
    gateway = make_gateway(config_for(engine, upstream))
    parsed = client(gateway).responses.parse(model="m", input="Weather?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Paris", celsius=18)
    sent = upstream.received[0].json
    if engine == "gpt":
        assert sent["response_format"]["type"] == "json_schema"
        assert sent["response_format"]["json_schema"]["name"] == "Weather"
    elif engine == "claude":  # Claude gets the schema as an instruction
        assert '"celsius"' in sent["system"][-1]["text"]
    else:
        assert sent["generationConfig"]["responseMimeType"] == "application/json"
        assert sent["generationConfig"]["responseSchema"]["properties"]["celsius"]["type"] == "integer"


# --- Errors ---


def test_an_upstream_400_is_passed_through_in_openais_envelope(upstream: FakeUpstream,
                                                               make_gateway: MakeGateway) -> None:
    upstream.enqueue(status=400, json={"error": {"message": "bad schema", "type": "invalid_request_error"}})
    gateway = make_gateway(config_for("gpt", upstream))
    with pytest.raises(openai.BadRequestError, match="bad schema"):
        client(gateway).responses.create(model="m", input="hi")


def test_all_channels_failing_is_one_openai_envelope(make_upstream: Callable[[], FakeUpstream],
                                                     make_gateway: MakeGateway) -> None:
    first, second = make_upstream(), make_upstream()
    first.enqueue(status=500, json={"error": {"message": "boom"}})
    second.enqueue(status=503, json={"error": {"message": "busy"}})
    gateway = make_gateway(config_for("gpt", first, second))
    error = check_error(post(gateway, {"model": "m", "input": "hi"}), 502)
    assert "up0" in error["message"] and "up1" in error["message"]


def test_a_malformed_field_is_a_400_naming_it(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    gateway = make_gateway(config_for("gpt", upstream))
    error = check_error(post(gateway, {"model": "m", "input": "hi", "temperature": "hot"}), 400)
    assert error["param"] == "temperature" and error["type"] == "invalid_request_error"
    assert upstream.received == []


def test_a_hosted_tool_is_a_400_naming_its_type_on_a_converted_channel(upstream: FakeUpstream,
                                                                       make_gateway: MakeGateway) -> None:
    gateway = make_gateway(config_for("claude", upstream))
    error = check_error(post(gateway, {"model": "m", "input": "hi", "tools": [{"type": "web_search"}]}), 400)
    assert "web_search" in error["message"] and upstream.received == []


# --- Failover and cuts ---


def test_a_channel_failing_before_its_first_output_fails_over(make_upstream: Callable[[], FakeUpstream],
                                                               make_gateway: MakeGateway) -> None:
    first, second = make_upstream(), make_upstream()
    first.enqueue(Reply(sse=[_openai_chunk({"role": "assistant", "content": ""})], reset_after=1))
    second.enqueue(gpt_text(True))
    gateway = make_gateway(config_for("gpt", first, second))
    events = stream_events(gateway, {"model": "m", "input": "hi"})
    assert events[-1]["type"] == "response.completed" and len(second.received) == 1
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello"


def test_a_stream_cut_after_its_start_ends_with_response_failed(upstream: FakeUpstream,
                                                                make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(sse=[_openai_chunk({"role": "assistant", "content": "Hel"}),
                                _openai_chunk({"content": "l"})], reset_after=2))
    gateway = make_gateway(config_for("gpt", upstream))
    events = stream_events(gateway, {"model": "m", "input": "hi"})
    failed = events[-1]["response"]
    assert events[-1]["type"] == "response.failed" and failed["error"]["code"] == "server_error"
    assert "sk-up0-secret" not in json.dumps(events)


def test_a_client_leaving_mid_stream_cancels_the_upstream(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(sse=[_openai_chunk({"role": "assistant", "content": "Hel"})] * 3, stall_after=2))
    gateway = make_gateway(config_for("gpt", upstream))
    with httpx.stream("POST", gateway.url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True},
                      headers={"Authorization": "Bearer sk-client"}, timeout=30) as response:
        seen = b""
        for piece in response.iter_bytes():
            seen += piece
            if b"response.output_text.delta" in seen:
                break
    assert upstream.wait_cancelled()


# --- The store: previous_response_id, GET, DELETE ---


def test_previous_response_id_chains_and_get_and_delete_serve_stored_responses(upstream: FakeUpstream,
                                                                               make_gateway: MakeGateway) -> None:
    upstream.enqueue(gpt_text(False))
    upstream.enqueue(Reply(json=completion("Again")))
    gateway = make_gateway(config_for("gpt", upstream))
    sdk = client(gateway)
    first = sdk.responses.create(model="m", input="hi", instructions="Be brief.")
    second = sdk.responses.create(model="m", input="more", previous_response_id=first.id)
    assert upstream.received[1].json["messages"] == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "more"}]  # instructions are not carried over
    got = httpx.get(gateway.url + f"/v1/responses/{second.id}", headers={"Authorization": "Bearer sk-client"})
    validate_response(got.json())
    assert got.json()["output"][0]["content"][0]["text"] == "Again" and got.json()["previous_response_id"] == first.id
    assert sdk.responses.retrieve(first.id).output_text == "Hello"
    other = httpx.get(gateway.url + f"/v1/responses/{first.id}", headers={"Authorization": "Bearer sk-other"})
    check_error(other, 404)
    deleted = httpx.delete(gateway.url + f"/v1/responses/{first.id}", headers={"Authorization": "Bearer sk-client"})
    assert deleted.json() == {"id": first.id, "object": "response.deleted", "deleted": True}
    check_error(httpx.get(gateway.url + f"/v1/responses/{first.id}", headers={"Authorization": "Bearer sk-client"}),
                404)
    error = check_error(post(gateway, {"model": "m", "input": "x", "previous_response_id": first.id}), 400)
    assert error == {"message": f"Previous response with id '{first.id}' not found.",
                     "type": "invalid_request_error", "param": "previous_response_id",
                     "code": "previous_response_not_found"}


def test_item_references_to_stored_output_items_are_resolved(upstream: FakeUpstream,
                                                             make_gateway: MakeGateway) -> None:
    upstream.enqueue(gpt_call(False))
    upstream.enqueue(gpt_text(False))
    gateway = make_gateway(config_for("gpt", upstream))
    first = post(gateway, {"model": "m", "input": "Weather?", "tools": [WEATHER]}).json()
    [call] = first["output"]
    second = post(gateway, {"model": "m", "tools": [WEATHER], "input": [
        {"role": "user", "content": "Weather?"}, {"type": "item_reference", "id": call["id"]},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "18C"}]})
    validate_response(second.json())
    assert upstream.received[1].json["messages"][1]["tool_calls"][0]["id"] == call["call_id"]
    error = check_error(post(gateway, {"model": "m", "input": [{"type": "item_reference", "id": "fc_nope"}]}), 400)
    assert error["message"] == "Item with id 'fc_nope' not found." and error["param"] == "input[0]"
    other = post(gateway, {"model": "m", "input": [{"type": "item_reference", "id": call["id"]}]}, key="sk-other")
    check_error(other, 400)


def test_a_streamed_response_is_stored_and_store_false_is_not(upstream: FakeUpstream,
                                                              make_gateway: MakeGateway) -> None:
    upstream.enqueue(gpt_text(True))
    upstream.enqueue(gpt_text(True))
    gateway = make_gateway(config_for("gpt", upstream))
    kept = stream_events(gateway, {"model": "m", "input": "hi"})[-1]["response"]
    dropped = stream_events(gateway, {"model": "m", "input": "hi", "store": False})[-1]["response"]
    auth = {"Authorization": "Bearer sk-client"}
    assert httpx.get(gateway.url + f"/v1/responses/{kept['id']}", headers=auth).json() == kept
    check_error(httpx.get(gateway.url + f"/v1/responses/{dropped['id']}", headers=auth), 404)


def test_compact_without_a_responses_native_channel_is_an_openai_envelope(upstream: FakeUpstream,
                                                                          make_gateway: MakeGateway) -> None:
    gateway = make_gateway(config_for("claude", upstream))
    response = httpx.post(gateway.url + "/v1/responses/compact", json={"model": "m", "input": []},
                          headers={"Authorization": "Bearer sk-client"})
    error = check_error(response, 404)
    assert "compact" in error["message"] and upstream.received == []


def test_the_store_evicts_by_count_bytes_and_age() -> None:
    clock = FakeClock()
    store = uni_api.ResponseStore(clock)
    limits = uni_api.StoreLimits(max_count=2, max_bytes=10_000, max_age=60)
    owner = b"k"
    for name in ("a", "b", "c"):
        store.put(owner, {"id": name}, [], limits)
    assert store.get("a", owner, limits) is None and store.get("c", owner, limits) is not None and len(store) == 2
    assert store.get("c", b"other", limits) is None
    store.put(owner, {"id": "big", "text": "x" * 20_000}, [], limits)
    assert store.get("big", owner, limits) is None  # larger than the whole cap: never stored
    store.put(owner, {"id": "half", "text": "x" * 6_000}, [], limits)
    store.put(owner, {"id": "half2", "text": "x" * 6_000}, [], limits)
    assert store.get("half", owner, limits) is None and store.bytes <= 10_000
    store.put(owner, {"id": "r", "output": [{"id": "msg_1", "type": "message"}]}, [], limits)
    assert store.item("msg_1", owner, limits) == {"id": "msg_1", "type": "message"}
    assert store.item("msg_1", b"other", limits) is None
    clock.advance(61)
    assert store.get("half2", owner, limits) is None and len(store) == 0 and store.bytes == 0
    assert store.item("msg_1", owner, limits) is None


def test_responses_store_limits_are_read_from_preferences(upstream: FakeUpstream) -> None:
    config = simple_config(upstream)
    config["preferences"] = {"responses_store": {"max_count": 5, "max_bytes": "1MiB", "max_age": 30}}
    parsed = uni_api.parse_config(to_yaml(config), "api.yaml")
    assert parsed.responses_store == uni_api.StoreLimits(5, 1024 * 1024, 30.0)
    config["preferences"] = {"responses_store": {"max_count": 5, "max_age": -1}}
    with pytest.raises(uni_api.ConfigError, match="preferences.responses_store.max_age"):
        uni_api.parse_config(to_yaml(config), "api.yaml")


# --- Statistics: Responses requests are counted like chat requests ---


def test_responses_requests_are_recorded_with_key_model_provider_and_tokens(
        upstream: FakeUpstream, make_gateway: MakeGateway, tmp_path: Path) -> None:
    db = tmp_path / "stats.db"
    gateway = make_gateway(config_for("claude", upstream), stats_options=uni_api.StatsOptions(str(db)))
    upstream.enqueue(claude_text(False))
    upstream.enqueue(claude_text(True))
    client(gateway).responses.create(model="m", input="hi")
    stream_events(gateway, {"model": "m", "input": "hi"})
    gateway.server_loop.run(gateway.state.stats.flush())
    with sqlite3.connect(db) as connection:
        found = connection.execute("SELECT key, model, provider, upstream_model, endpoint, status, prompt_tokens,"
                                   " completion_tokens FROM requests ORDER BY id").fetchall()
    assert found == [("sk-clie...", "m", "up0", "up-model", "POST /v1/responses", 200, 5, 2)] * 2
