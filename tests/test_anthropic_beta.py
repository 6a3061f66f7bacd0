"""The client's `anthropic-beta` flags on every Claude path, through the real gateway and fake upstreams.

Anthropic "Beta headers": one `anthropic-beta` header, feature names joined by commas. The claude engine takes
the header (from /v1/messages passthrough and from chat converted to Claude); Vertex AI takes none, so it is left
out there; Bedrock takes betas in the body as `anthropic_beta` (Bedrock user guide, "Anthropic Claude Messages
API", "Request and Response"), leaving out the flags that name the client or its claude.ai sign-in.
The flags below are the ones Claude Code sends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import FakeUpstream, GatewayServer, Reply, bedrock_provider, rsa_pem, vertex_claude_provider

import adapters

FIXTURES = Path(__file__).parent / "fixtures" / "claude"
CLAUDE_CODE_BETAS = ("claude-code-20250219", "oauth-2025-04-20", "interleaved-thinking-2025-05-14",
                     "fine-grained-tool-streaming-2025-05-14")
HEADER = ",".join(CLAUDE_CODE_BETAS)
BEDROCK_BETAS = ["interleaved-thinking-2025-05-14", "fine-grained-tool-streaming-2025-05-14"]
HI = [{"role": "user", "content": "hi"}]
ANSWER = (FIXTURES / "basic.upstream.json").read_bytes()


def claude(upstream: FakeUpstream) -> dict[str, Any]:
    return {"provider": "ant", "base_url": f"{upstream.url}/v1/messages", "api": "sk-ant-secret", "engine": "claude",
            "model": [{"claude-sonnet-4-5-20250929": "sonnet"}]}


def bedrock(upstream: FakeUpstream) -> dict[str, Any]:
    return bedrock_provider(upstream.url, "anthropic.claude-sonnet-4-5-20250929-v1:0", "sonnet")


def start(make_gateway: Any, provider: dict[str, Any]) -> GatewayServer:
    return make_gateway({"providers": [provider], "api_keys": [{"api": "sk-client"}]})  # type: ignore[no-any-return]


def ask_messages(gateway: GatewayServer) -> None:
    """Claude Code's way: the SDK's beta namespace sends the flags as one anthropic-beta header."""
    message = gateway.anthropic().beta.messages.create(model="sonnet", max_tokens=64, messages=HI,
                                                            betas=list(CLAUDE_CODE_BETAS))
    assert message.content[0].text == "Hi! My name is Claude."  # type: ignore[union-attr]


def ask_chat(gateway: GatewayServer) -> None:
    answer = gateway.client("sk-client").chat.completions.create(
        model="sonnet", messages=HI, extra_headers={"anthropic-beta": HEADER})  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "Hi! My name is Claude."


def test_the_header_is_split_into_distinct_flags() -> None:
    assert adapters.parse_betas(f" {HEADER}, claude-code-20250219,,") == CLAUDE_CODE_BETAS
    assert adapters.parse_betas(None) == adapters.parse_betas("") == ()


@pytest.mark.parametrize("ask", [ask_messages, ask_chat], ids=["messages passthrough", "chat converted"])
def test_claude_channels_get_the_clients_anthropic_beta_header(upstream: FakeUpstream, make_gateway: Any,
                                                               ask: Any) -> None:
    upstream.enqueue(Reply(body=ANSWER))
    ask(start(make_gateway, claude(upstream)))
    sent = upstream.received[0]
    assert sent.headers["anthropic-beta"] == HEADER
    assert sent.headers["x-api-key"] == "sk-ant-secret" and sent.headers["anthropic-version"] == "2023-06-01"


@pytest.mark.parametrize("ask", [ask_messages, ask_chat], ids=["messages passthrough", "chat converted"])
def test_bedrock_gets_the_flags_it_takes_in_the_body_and_no_header(upstream: FakeUpstream, make_gateway: Any,
                                                                   ask: Any) -> None:
    upstream.enqueue(Reply(body=ANSWER))
    ask(start(make_gateway, bedrock(upstream)))
    sent = upstream.received[0]
    assert sent.json["anthropic_beta"] == BEDROCK_BETAS
    assert sent.json["anthropic_version"] == "bedrock-2023-05-31"
    assert "anthropic-beta" not in sent.headers and "betas" not in sent.json


def test_bedrock_keeps_anthropic_beta_a_messages_client_put_in_the_body(upstream: FakeUpstream,
                                                                        make_gateway: Any) -> None:
    upstream.enqueue(Reply(body=ANSWER))
    gateway = start(make_gateway, bedrock(upstream))
    gateway.anthropic().beta.messages.create(model="sonnet", max_tokens=64, messages=HI,
                                                  betas=["interleaved-thinking-2025-05-14"],
                                                  extra_body={"anthropic_beta": ["context-1m-2025-08-07"]})
    assert upstream.received[0].json["anthropic_beta"] == ["context-1m-2025-08-07", "interleaved-thinking-2025-05-14"]


@pytest.mark.parametrize("ask", [ask_messages, ask_chat], ids=["messages passthrough", "chat converted"])
def test_vertex_claude_leaves_the_flags_out_and_answers(upstream: FakeUpstream, make_gateway: Any, ask: Any) -> None:
    upstream.enqueue(Reply(json={"access_token": "ya29.token", "expires_in": 3599}))
    upstream.enqueue(Reply(body=ANSWER))
    ask(start(make_gateway, vertex_claude_provider(upstream.url, rsa_pem(), "claude-sonnet-4-5@20250929", "sonnet")))
    call = upstream.received[1]
    assert call.path.endswith(":rawPredict") and call.headers["Authorization"] == "Bearer ya29.token"
    assert "anthropic-beta" not in call.headers and "anthropic_beta" not in call.json


def test_without_the_header_no_flag_is_sent(make_upstream: Any, make_gateway: Any) -> None:
    direct, aws = make_upstream(), make_upstream()
    direct.enqueue(Reply(body=ANSWER))
    aws.enqueue(Reply(body=ANSWER))
    for upstream, provider in ((direct, claude(direct)), (aws, bedrock(aws))):
        start(make_gateway, provider).client("sk-client").chat.completions.create(model="sonnet", messages=HI)
        assert "anthropic-beta" not in upstream.received[0].headers
        assert "anthropic_beta" not in upstream.received[0].json
