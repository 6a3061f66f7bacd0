"""Codex CLI (npm @openai/codex, tests/node) through the gateway: `codex exec` with a custom provider
(config.toml `model_providers.<id>` with `wire_api = "responses"`) runs a shell command the model asks for and
prints the model's final answer, against OpenAI-chat, Claude and Responses-native upstreams.

Codex speaks only the Responses API to custom providers. Its tools, as 0.171 sends them with the config below:
`exec_command` ({"cmd": ...}), `write_stdin`, `request_user_input`, `view_image` (function tools; web search and
the multi-agent namespace are turned off, as hosted tools need a Responses-native upstream). Nothing leaves the
machine: update checks and analytics are off, and the only provider is the gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from conftest import FakeUpstream, GatewayServer, simple_config

NODE_DIR = Path(__file__).parent / "node"
CODEX = NODE_DIR / "node_modules" / ".bin" / "codex"
MakeGateway = Callable[..., GatewayServer]
FINAL = "Codex saw: hi"
CALL_ID = "call_cx1"
COMMAND = '{"cmd":"echo hi"}'


# --- GET /v1/models?client_version=... (Codex calls it at start with its version) ---


def test_models_list_answers_with_a_client_version_query(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    gateway = make_gateway(simple_config(upstream, models=["gpt-4o", "gpt-5-codex"]))
    with gateway.http("sk-client") as http:
        plain = http.get("/v1/models")
        versioned = http.get("/v1/models", params={"client_version": "0.171.0"})
    assert versioned.status_code == 200
    assert versioned.json() == plain.json()
    assert [m["id"] for m in versioned.json()["data"]] == ["gpt-4o", "gpt-5-codex"]


def test_models_list_with_client_version_still_needs_a_key(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    gateway = make_gateway(simple_config(upstream))
    response = httpx.get(gateway.url + "/v1/models?client_version=0.171.0", timeout=10)
    assert response.status_code == 401
