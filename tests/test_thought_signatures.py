"""Gemini thought signatures across client formats: a Gemini 3 function call's thoughtSignature rides in the tool
call id (adapters.encode_signature_id), so an OpenAI or Anthropic client that sends the id back unchanged hands
Gemini its signature again; skip_thought_signature_validator stays the fallback for a client that dropped it.

References: Gemini docs "Thought signatures" (a signature on the first functionCall part of each step, the 400 for a
missing one, the documented skip value), "Function calling" (parallel calls), OpenAI API reference "Chat
Completions" (tool_calls[].id, tool message tool_call_id), Anthropic "Tool use" (tool_use.id, tool_result).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import anthropic
import pytest
from conftest import FakeUpstream, GatewayServer, Reply
from hypothesis import given
from hypothesis import strategies as st
from openai_schema import accumulate_stream

import adapters

MakeGateway = Callable[..., GatewayServer]
SIG_A = "CiQBjz1rX+a/Zb9sig=="  # base64 with + / and padding, as Google sends signatures
SIG_C = "EjQKMgGPPWtf3rOTHER/sig"
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}} for name in ("get_weather", "get_time")]


def gemini_config(upstream: FakeUpstream, *, engine: str = "gemini") -> dict[str, Any]:
    return {"providers": [{"provider": "gem", "base_url": f"{upstream.url}/v1beta", "api": "AIza-gemini-secret",
                           "engine": engine, "model": ["gemini-3-pro-preview"],
                           "preferences": {"cooldown_period": 0}}],
            "api_keys": [{"api": "sk-client"}]}


def call_answer() -> dict[str, Any]:
    """Gemini 3 parallel calls: the signature on the first functionCall part only ("Thought signatures")."""
    return {"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": SIG_A},
        {"functionCall": {"name": "get_time", "args": {"city": "Paris"}}}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
        "modelVersion": "gemini-3-pro-preview", "responseId": "r1"}


def text_answer(text: str = "Sunny, 9am.") -> Reply:
    return Reply(json={"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                       "finishReason": "STOP", "index": 0}]})


def replayed_calls(upstream: FakeUpstream, request: int = 1) -> list[dict[str, Any]]:
    contents = upstream.received[request].json["contents"]
    return [p for content in contents for p in content["parts"] if "functionCall" in p]


@given(st.text(max_size=300), st.sampled_from(["call_abc", "toolu_01A", "call_" + "f" * 32, ""]))
def test_signature_encoding_round_trips_any_signature_and_stays_id_safe(signature: str, call_id: str) -> None:
    encoded = adapters.encode_signature_id(call_id, signature)
    assert adapters.decode_signature_id(encoded) == (call_id, signature or None)
    assert re.fullmatch(r"[A-Za-z0-9_-]*", encoded.removeprefix(call_id))  # Claude's tool_use id alphabet


def test_ids_without_a_signature_decode_to_themselves() -> None:
    for call_id in ("call_1", "toolu_x", "call__ts_", "weird__ts_!!!"):
        assert adapters.decode_signature_id(call_id)[0] == call_id


def test_openai_sdk_round_trip_gives_gemini_its_signature_back(upstream: FakeUpstream,
                                                               make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=call_answer()))
    upstream.enqueue(text_answer())
    client = make_gateway(gemini_config(upstream)).client("sk-client")
    messages: list[Any] = [{"role": "user", "content": "Weather and time in Paris?"}]
    answer = client.chat.completions.create(model="gemini-3-pro-preview", messages=messages, tools=TOOLS)
    message = answer.choices[0].message
    assert message.tool_calls is not None and len(message.tool_calls) == 2
    messages.append(message)  # the SDK object itself, as the openai docs' tool loop does
    messages += [{"role": "tool", "tool_call_id": call.id, "content": "ok"} for call in message.tool_calls]
    final = client.chat.completions.create(model="gemini-3-pro-preview", messages=messages, tools=TOOLS)
    assert final.choices[0].message.content == "Sunny, 9am."
    parts = replayed_calls(upstream)
    assert [p["functionCall"]["name"] for p in parts] == ["get_weather", "get_time"]
    assert parts[0]["thoughtSignature"] == SIG_A
    assert "thoughtSignature" not in parts[1]  # only the part that carried one gets it back
    assert [p["functionResponse"]["name"] for p in upstream.received[1].json["contents"][2]["parts"]] == [
        "get_weather", "get_time"]


def test_streamed_call_ids_carry_the_signature_too(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    events = [{"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}, "thoughtSignature": SIG_C}]},
        "index": 0}]},
        {"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": "STOP",
                         "index": 0}], "usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 3}}]
    upstream.enqueue(Reply(sse=events))
    upstream.enqueue(text_answer())
    client = make_gateway(gemini_config(upstream)).client("sk-client")
    messages: list[Any] = [{"role": "user", "content": "Oslo?"}]
    stream = client.chat.completions.create(model="gemini-3-pro-preview", messages=messages, tools=TOOLS, stream=True)
    folded = accumulate_stream([chunk.model_dump(exclude_unset=True) for chunk in stream])
    call = folded["message"]["tool_calls"][0]
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temp": 3})}]
    client.chat.completions.create(model="gemini-3-pro-preview", messages=messages, tools=TOOLS)
    assert replayed_calls(upstream)[0]["thoughtSignature"] == SIG_C


def test_a_history_that_lost_its_signatures_gets_the_documented_skip_value(upstream: FakeUpstream,
                                                                          make_gateway: MakeGateway) -> None:
    upstream.enqueue(text_answer())
    client = make_gateway(gemini_config(upstream)).client("sk-client")
    calls = [{"id": f"call_{n}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
             for n in (1, 2)]
    client.chat.completions.create(model="gemini-3-pro-preview", tools=TOOLS, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls},
        *({"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in calls)])
    parts = replayed_calls(upstream, 0)
    assert [p.get("thoughtSignature") for p in parts] == ["skip_thought_signature_validator", None]


def test_google_compat_extra_content_signature_is_honoured(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(text_answer())
    client = make_gateway(gemini_config(upstream)).client("sk-client")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"},
            "extra_content": {"google": {"thought_signature": SIG_C}}}
    client.chat.completions.create(model="gemini-3-pro-preview", tools=TOOLS, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"}])
    assert replayed_calls(upstream, 0)[0]["thoughtSignature"] == SIG_C


def test_anthropic_sdk_round_trip_through_messages_keeps_the_signature(upstream: FakeUpstream,
                                                                        make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=call_answer()))
    upstream.enqueue(text_answer())
    gateway = make_gateway(gemini_config(upstream))
    client = anthropic.Anthropic(base_url=gateway.url, api_key="sk-client", max_retries=0)
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    messages: list[Any] = [{"role": "user", "content": "Weather and time in Paris?"}]
    answer = client.messages.create(model="gemini-3-pro-preview", max_tokens=100, messages=messages, tools=tools)
    uses = [block for block in answer.content if block.type == "tool_use"]
    assert len(uses) == 2 and re.fullmatch(r"[A-Za-z0-9_-]+", uses[0].id)
    messages += [{"role": "assistant", "content": answer.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "ok"}
                                              for u in uses]}]
    client.messages.create(model="gemini-3-pro-preview", max_tokens=100, messages=messages, tools=tools)
    parts = replayed_calls(upstream)
    assert parts[0]["thoughtSignature"] == SIG_A and "thoughtSignature" not in parts[1]


@pytest.mark.parametrize("engine", ["gpt"])
def test_other_engines_get_the_plain_ids_on_both_ends(upstream: FakeUpstream, make_gateway: MakeGateway,
                                                      engine: str) -> None:
    config = {"providers": [{"provider": "oa", "base_url": f"{upstream.url}/v1/chat/completions", "api": "sk-up",
                             "engine": engine, "model": ["gpt-4o"]}], "api_keys": [{"api": "sk-client"}]}
    client = make_gateway(config).client("sk-client")
    signed = adapters.encode_signature_id("call_1", SIG_A)
    client.chat.completions.create(model="gpt-4o", tools=TOOLS, messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": signed, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": signed, "content": "ok"}])
    sent = upstream.received[0].json["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1" and sent[2]["tool_call_id"] == "call_1"
