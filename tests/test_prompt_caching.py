"""Prompt caching end to end: breakpoints reach Claude, cache token counts come back and are counted.

Anthropic "Prompt caching": `cache_control: {"type": "ephemeral"}` on tools, system blocks and message content
blocks marks breakpoints (at most 4 a request); usage reports `cache_creation_input_tokens` (written to the cache)
and `cache_read_input_tokens` (read from it). OpenAI-format clients put `cache_control` on content parts, whole
messages and tools, as Anthropic-compatible gateways accept; the gateway answers OpenAI usage with
`prompt_tokens_details.cached_tokens` plus `cache_creation_input_tokens`, and Messages usage as Anthropic's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    FakeUpstream,
    GatewayServer,
    Reply,
    bedrock_provider,
    completion,
    rsa_pem,
    simple_config,
    vertex_claude_provider,
)
from test_adapters_aws import chunk_frame

import adapters
import uni_api

FIXTURES = Path(__file__).parent / "fixtures" / "claude"
EPHEMERAL = {"type": "ephemeral"}
KEY = "sk-client-0123456789"
CLAUDE_USAGE = {"input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 50,
                "output_tokens": 5}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": CITY}}


def claude_answer(usage: dict[str, Any] = CLAUDE_USAGE) -> bytes:
    answer = json.loads((FIXTURES / "basic.upstream.json").read_bytes())
    return json.dumps({**answer, "usage": usage}).encode()


def claude_stream(usage: dict[str, Any] = CLAUDE_USAGE) -> list[dict[str, Any]]:
    """A "Streaming Messages" event flow: message_start carries the input counts, message_delta the output."""
    start_usage = {**usage, "output_tokens": 1}
    return [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                              "model": "claude-sonnet-4-5-20250929", "stop_reason": None,
                                              "stop_sequence": None, "usage": start_usage}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello!"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": usage["output_tokens"]}},
        {"type": "message_stop"},
    ]


def sse(events: list[dict[str, Any]]) -> Reply:
    return Reply(raw_chunks=[f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events])


def claude_provider(upstream: FakeUpstream, engine: str = "claude", **prefs: Any) -> dict[str, Any]:
    entries = {
        "claude": {"base_url": f"{upstream.url}/v1/messages", "api": "sk-ant-secret",
                   "model": [{"claude-sonnet-4-5-20250929": "sonnet"}]},
        "aws": bedrock_provider(upstream.url, "anthropic.claude-sonnet-4-5-20250929-v1:0", "sonnet"),
    }
    return {**entries[engine], "provider": engine, "engine": engine, **({"preferences": prefs} if prefs else {})}


def start(make_gateway: Any, providers: list[dict[str, Any]], db: Path, **global_prefs: Any) -> GatewayServer:
    config: dict[str, Any] = {"providers": providers, "api_keys": [{"api": KEY}]}
    if global_prefs:
        config["preferences"] = global_prefs
    gateway: GatewayServer = make_gateway(config, stats_options=uni_api.StatsOptions(str(db)))
    return gateway


def token_usage(gateway: GatewayServer) -> list[dict[str, Any]]:
    gateway.server_loop.run(gateway.state.stats.flush())
    with gateway.http(KEY) as http:
        usage: list[dict[str, Any]] = http.get("/v1/token_usage").json()["usage"]
    return usage


def breakpoints(request: dict[str, Any]) -> list[str]:
    """Where the request to Claude carries cache_control, as short paths."""
    found = [f"tools[{i}]" for i, tool in enumerate(request.get("tools") or ()) if "cache_control" in tool]
    found += [f"system[{i}]" for i, block in enumerate(request.get("system") or ()) if "cache_control" in block]
    return found + [f"messages[{i}].content[{j}]" for i, turn in enumerate(request["messages"])
                    for j, block in enumerate(turn["content"]) if "cache_control" in block]


# An OpenAI-format conversation with a breakpoint in each place such clients put one.
CHAT_WITH_BREAKPOINTS: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse.", "cache_control": EPHEMERAL},  # a whole message
    {"role": "user", "content": [{"type": "text", "text": "Long document ...", "cache_control": EPHEMERAL},
                                 {"type": "text", "text": "Question?"}]},  # a content part
    {"role": "assistant", "content": "Answer."},
    {"role": "user", "content": "And then?", "cache_control": EPHEMERAL},
]
CACHED_TOOL = {**WEATHER, "cache_control": EPHEMERAL}


@pytest.mark.parametrize("engine", ["claude", "aws"])
def test_chat_breakpoints_on_messages_parts_and_tools_reach_claude(upstream: FakeUpstream, make_gateway: Any,
                                                                  tmp_path: Path, engine: str) -> None:
    upstream.enqueue(Reply(body=claude_answer()))
    gateway = start(make_gateway, [claude_provider(upstream, engine)], tmp_path / "stats.db")
    gateway.client(KEY).chat.completions.create(model="sonnet", messages=CHAT_WITH_BREAKPOINTS,  # type: ignore[arg-type]
                                                tools=[CACHED_TOOL])  # type: ignore[list-item]
    sent = upstream.received[0].json
    assert breakpoints(sent) == ["tools[0]", "system[0]", "messages[0].content[0]", "messages[2].content[0]"]
    assert sent["system"] == [{"type": "text", "text": "You are terse.", "cache_control": EPHEMERAL}]
    assert sent["tools"][0]["cache_control"] == EPHEMERAL and sent["tools"][0]["name"] == "get_weather"


def test_chat_breakpoints_reach_claude_on_vertex(upstream: FakeUpstream, make_gateway: Any, tmp_path: Path) -> None:
    vertex = vertex_claude_provider(upstream.url, rsa_pem(), "claude-sonnet-4-5@20250929", "sonnet")
    upstream.enqueue(Reply(json={"access_token": "ya29.token", "expires_in": 3599}))
    upstream.enqueue(Reply(body=claude_answer()))
    gateway = start(make_gateway, [vertex], tmp_path / "stats.db")
    answer = gateway.client(KEY).chat.completions.create(model="sonnet", messages=CHAT_WITH_BREAKPOINTS,  # type: ignore[arg-type]
                                                         tools=[CACHED_TOOL])  # type: ignore[list-item]
    sent = upstream.received[1].json
    assert sent["anthropic_version"] == "vertex-2023-10-16"
    assert breakpoints(sent) == ["tools[0]", "system[0]", "messages[0].content[0]", "messages[2].content[0]"]
    assert answer.usage is not None and answer.usage.model_extra == {"cache_creation_input_tokens": 100}


def test_chat_answer_reports_cache_writes_and_reads_and_stats_count_them(upstream: FakeUpstream,
                                                                        make_gateway: Any, tmp_path: Path) -> None:
    upstream.enqueue(Reply(body=claude_answer()))
    gateway = start(make_gateway, [claude_provider(upstream)], tmp_path / "stats.db")
    answer = gateway.client(KEY).chat.completions.create(model="sonnet", messages=CHAT_WITH_BREAKPOINTS)  # type: ignore[arg-type]
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens == 160 and usage.completion_tokens == 5
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 50
    assert usage.model_extra == {"cache_creation_input_tokens": 100}
    [totals] = token_usage(gateway)
    assert (totals["total_prompt_tokens"], totals["total_cached_tokens"], totals["total_cache_creation_tokens"]) == (
        160, 50, 100)


def test_chat_stream_usage_chunk_carries_the_cache_counts(upstream: FakeUpstream, make_gateway: Any,
                                                          tmp_path: Path) -> None:
    upstream.enqueue(sse(claude_stream()))
    gateway = start(make_gateway, [claude_provider(upstream)], tmp_path / "stats.db")
    stream = gateway.client(KEY).chat.completions.create(model="sonnet", messages=CHAT_WITH_BREAKPOINTS,  # type: ignore[arg-type]
                                                         stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens == 160
    assert usage[0].prompt_tokens_details is not None and usage[0].prompt_tokens_details.cached_tokens == 50
    assert usage[0].model_extra == {"cache_creation_input_tokens": 100}
    [totals] = token_usage(gateway)
    assert (totals["total_cached_tokens"], totals["total_cache_creation_tokens"]) == (50, 100)


MESSAGES_REQUEST: dict[str, Any] = {
    "model": "sonnet", "max_tokens": 64,
    "system": [{"type": "text", "text": "You are terse.", "cache_control": EPHEMERAL}],
    "tools": [{"name": "get_weather", "input_schema": {"type": "object"}, "cache_control": EPHEMERAL}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "Long document ...",
                                               "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}],
}


@pytest.mark.parametrize("engine", ["claude", "aws"])
def test_messages_breakpoints_pass_through_and_usage_comes_back_as_sent(upstream: FakeUpstream, make_gateway: Any,
                                                                       tmp_path: Path, engine: str) -> None:
    upstream.enqueue(Reply(body=claude_answer()))
    gateway = start(make_gateway, [claude_provider(upstream, engine)], tmp_path / "stats.db")
    message = gateway.anthropic(KEY).messages.create(**MESSAGES_REQUEST)
    sent = upstream.received[0].json
    assert breakpoints(sent) == ["tools[0]", "system[0]", "messages[0].content[0]"]
    assert sent["messages"] == MESSAGES_REQUEST["messages"] and sent["tools"] == MESSAGES_REQUEST["tools"]
    usage = message.usage
    assert (usage.input_tokens, usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (10, 100, 50)
    [totals] = token_usage(gateway)
    assert (totals["total_prompt_tokens"], totals["total_cached_tokens"], totals["total_cache_creation_tokens"]) == (
        160, 50, 100)


def test_messages_stream_from_bedrock_reports_and_counts_the_cache(upstream: FakeUpstream, make_gateway: Any,
                                                                   tmp_path: Path) -> None:
    upstream.enqueue(Reply(raw_chunks=[chunk_frame(e) for e in claude_stream()],
                           content_type="application/vnd.amazon.eventstream"))
    gateway = start(make_gateway, [claude_provider(upstream, "aws")], tmp_path / "stats.db")
    with gateway.anthropic(KEY).messages.stream(**MESSAGES_REQUEST) as stream:
        message = stream.get_final_message()
    assert (message.usage.cache_creation_input_tokens, message.usage.cache_read_input_tokens) == (100, 50)
    assert breakpoints(upstream.received[0].json) == ["tools[0]", "system[0]", "messages[0].content[0]"]
    [totals] = token_usage(gateway)
    assert (totals["total_cached_tokens"], totals["total_cache_creation_tokens"]) == (50, 100)


def test_messages_answered_by_an_openai_channel_show_its_cached_tokens(upstream: FakeUpstream, make_gateway: Any,
                                                                      tmp_path: Path) -> None:
    usage = {"prompt_tokens": 90, "completion_tokens": 4, "total_tokens": 94, "prompt_tokens_details": {
        "cached_tokens": 64}}
    upstream.enqueue(json=completion("ok", usage=usage))
    config = simple_config(upstream, models=[{"gpt-4o": "sonnet"}])
    gateway = start(make_gateway, config["providers"], tmp_path / "stats.db")
    message = gateway.anthropic(KEY).messages.create(**{**MESSAGES_REQUEST, "tools": []})
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (26, 64)
    assert message.usage.cache_creation_input_tokens == 0
    assert token_usage(gateway)[0]["total_cached_tokens"] == 64


# --- prompt_cache: auto ---


def test_prompt_cache_auto_adds_breakpoints_to_tools_system_and_the_last_user_turn(
        upstream: FakeUpstream, make_gateway: Any, tmp_path: Path) -> None:
    upstream.enqueue(Reply(body=claude_answer()))
    gateway = start(make_gateway, [claude_provider(upstream)], tmp_path / "stats.db", prompt_cache="auto")
    plain = [{k: v for k, v in m.items() if k != "cache_control"} for m in CHAT_WITH_BREAKPOINTS]
    plain[1] = {"role": "user", "content": "Long document ... Question?"}
    gateway.client(KEY).chat.completions.create(model="sonnet", messages=plain, tools=[WEATHER])  # type: ignore[arg-type, list-item]
    sent = upstream.received[0].json
    assert breakpoints(sent) == ["tools[0]", "system[0]", "messages[2].content[0]"]
    assert sent["messages"][2]["content"][0] == {"type": "text", "text": "And then?", "cache_control": EPHEMERAL}


def test_prompt_cache_auto_leaves_the_clients_own_breakpoints_alone(upstream: FakeUpstream, make_gateway: Any,
                                                                   tmp_path: Path) -> None:
    upstream.enqueue(Reply(body=claude_answer()))
    gateway = start(make_gateway, [claude_provider(upstream)], tmp_path / "stats.db", prompt_cache="auto")
    messages = [{"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "text", "text": "Q", "cache_control": EPHEMERAL}]},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]
    gateway.client(KEY).chat.completions.create(model="sonnet", messages=messages)  # type: ignore[arg-type]
    assert breakpoints(upstream.received[0].json) == ["messages[0].content[0]"]


@pytest.mark.parametrize(("global_mode", "provider_mode", "added"), [
    (None, None, False), ("auto", None, True), ("auto", "off", False), (None, "auto", True), ("off", True, True),
])
def test_prompt_cache_is_off_unless_the_provider_or_global_preference_says_auto(
        upstream: FakeUpstream, make_gateway: Any, tmp_path: Path, global_mode: str | None,
        provider_mode: Any, added: bool) -> None:
    upstream.enqueue(Reply(body=claude_answer()))
    provider = claude_provider(upstream, **({"prompt_cache": provider_mode} if provider_mode is not None else {}))
    prefs = {"prompt_cache": global_mode} if global_mode else {}
    gateway = start(make_gateway, [provider], tmp_path / "stats.db", **prefs)
    gateway.client(KEY).chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "hi"}])
    assert breakpoints(upstream.received[0].json) == (["messages[0].content[0]"] if added else [])


def test_prompt_cache_takes_only_auto_or_off() -> None:
    text = "providers:\n  - provider: p\n    base_url: https://x.test\n    preferences:\n      prompt_cache: always\n"
    with pytest.raises(uni_api.ConfigError) as caught:
        uni_api.parse_config(text + "api_keys:\n  - api: sk-a\n", "api.yaml")
    assert str(caught.value) == "api.yaml:5: providers[0].preferences.prompt_cache: expected one of off, auto"


def test_auto_breakpoints_skip_thinking_blocks_and_stay_within_four() -> None:
    request: dict[str, Any] = {
        "tools": [{"name": "a"}, {"name": "b"}], "system": [{"type": "text", "text": "S"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
                     {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"},
                                                  {"type": "redacted_thinking", "data": "d"}]}]}
    adapters.add_cache_breakpoints(request)
    assert breakpoints(request) == ["tools[1]", "system[0]", "messages[2].content[0]"]
    assert len(breakpoints(request)) <= 4


# --- prompt_cache_key (OpenAI "Prompt caching": routes requests sharing a prefix together) ---


def test_prompt_cache_key_passes_through_to_openai_format_upstreams(upstream: FakeUpstream,
                                                                   make_gateway: Any) -> None:
    gateway = make_gateway(simple_config(upstream))
    gateway.client("sk-client").chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                        prompt_cache_key="tenant-42")
    assert upstream.received[0].json["prompt_cache_key"] == "tenant-42"
