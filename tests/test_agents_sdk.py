"""The openai-agents SDK on its default path (OpenAIProvider -> the Responses API) through the gateway: an agent
with a function tool runs to its final answer, stream and non-stream, against OpenAI-chat, Claude, Gemini and
Responses-native upstreams. Tracing is off, so nothing but the gateway is contacted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import openai
import pytest
from agents import Agent, OpenAIProvider, RunConfig, Runner, function_tool
from conftest import FakeUpstream, GatewayServer, Reply, completion
from responses_wire import call_events, call_item, json_reply, message_item, stream_reply, text_events
from test_codex_cli import chat_chunk, claude_reply, gemini_sse

MakeGateway = Callable[..., GatewayServer]
CALL_ID = "call_ag1"
ARGUMENTS = '{"city":"Paris"}'
FINAL = "In Paris it is 14 °C."


@function_tool
def get_weather(city: str) -> str:
    """The current weather of a city."""
    return f"14 °C in {city}"


def chat_replies(stream: bool) -> list[Reply]:
    call = {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    if not stream:
        first = completion("", tool_calls=None)
        first["choices"][0].update(message={"role": "assistant", "content": None, "tool_calls": [call]},
                                   finish_reason="tool_calls")
        return [Reply(json=first), Reply(json=completion(FINAL))]
    return [Reply(sse=[chat_chunk({"role": "assistant", "tool_calls": [{"index": 0, **call}]}),
                       chat_chunk({}, "tool_calls"), "[DONE]"]),
            Reply(sse=[chat_chunk({"role": "assistant", "content": FINAL}), chat_chunk({}, "stop"), "[DONE]"])]


def claude_message(block: dict[str, Any], stop: str) -> dict[str, Any]:
    return {"id": "msg_ag", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [block],
            "stop_reason": stop, "stop_sequence": None, "usage": {"input_tokens": 30, "output_tokens": 9}}


def claude_replies(stream: bool) -> list[Reply]:
    tool = {"type": "tool_use", "id": CALL_ID, "name": "get_weather", "input": json.loads(ARGUMENTS)}
    if not stream:
        return [Reply(json=claude_message(tool, "tool_use")),
                Reply(json=claude_message({"type": "text", "text": FINAL}, "end_turn"))]
    return [claude_reply({**tool, "input": {}}, [{"type": "input_json_delta", "partial_json": ARGUMENTS}], "tool_use"),
            claude_reply({"type": "text", "text": ""}, [{"type": "text_delta", "text": FINAL}], "end_turn")]


def gemini_replies(stream: bool) -> list[Reply]:
    call = gemini_sse([{"functionCall": {"name": "get_weather", "args": json.loads(ARGUMENTS)}}], "STOP")
    text = gemini_sse([{"text": FINAL}], "STOP")
    if not stream:
        return [Reply(json=json.loads(call)), Reply(json=json.loads(text))]
    return [Reply(sse=[call]), Reply(sse=[text])]


def responses_replies(stream: bool) -> list[Reply]:
    if not stream:
        return [json_reply(call_item("get_weather", ARGUMENTS, CALL_ID)), json_reply(message_item(FINAL))]
    return [stream_reply(call_events("get_weather", [ARGUMENTS[:6], ARGUMENTS[6:]], call_id=CALL_ID)),
            stream_reply(text_events([FINAL[:8], FINAL[8:]]))]


def tool_output(kind: str, body: dict[str, Any]) -> Any:
    if kind == "gpt":
        return next(m["content"] for m in body["messages"] if m["role"] == "tool")
    if kind == "claude":
        return next(block["content"] for m in body["messages"] if isinstance(m["content"], list)
                    for block in m["content"] if block.get("type") == "tool_result")
    if kind == "gemini":
        return next(part["functionResponse"] for content in body["contents"] for part in content["parts"]
                    if "functionResponse" in part)
    return next(item["output"] for item in body["input"] if item.get("type") == "function_call_output")


UPSTREAMS: dict[str, tuple[str, Callable[[bool], list[Reply]]]] = {
    "gpt": ("/v1/chat/completions", chat_replies),
    "claude": ("/v1/messages", claude_replies),
    "gemini": ("/v1beta", gemini_replies),
    "responses": ("/v1/responses", responses_replies),
}


async def run_agent(gateway: GatewayServer, stream: bool) -> str:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0)
    agent = Agent(name="Weather", instructions="Answer with the weather tool.", tools=[get_weather])
    config = RunConfig(model="agent-model", model_provider=OpenAIProvider(openai_client=client),
                       tracing_disabled=True)
    if not stream:
        return str((await Runner.run(agent, "What is the weather in Paris?", run_config=config)).final_output)
    result = Runner.run_streamed(agent, "What is the weather in Paris?", run_config=config)
    async for _ in result.stream_events():
        pass
    return str(result.final_output)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("kind", sorted(UPSTREAMS))
def test_agent_with_a_function_tool_runs_to_its_final_answer(
        upstream: FakeUpstream, make_gateway: MakeGateway, kind: str, stream: bool) -> None:
    path, replies = UPSTREAMS[kind]
    for reply in replies(stream):
        upstream.enqueue(reply)
    provider = {"provider": kind, "base_url": upstream.url + path, "api": "sk-up-secret", "engine": kind,
                "model": [{"up-model": "agent-model"}], "preferences": {"cooldown_period": 0}}
    gateway = make_gateway({"providers": [provider], "api_keys": [{"api": "sk-client"}]})

    assert asyncio.run(run_agent(gateway, stream)) == FINAL

    first, second = (r.json for r in upstream.received if r.path.startswith(path))
    assert "get_weather" in json.dumps(first["tools"])
    assert "14 °C in Paris" in json.dumps(tool_output(kind, second), ensure_ascii=False)
