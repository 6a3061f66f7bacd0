"""Codex CLI (npm @openai/codex, tests/node) through the gateway: `codex exec` with a custom provider
(config.toml `model_providers.<id>` with `wire_api = "responses"`) runs a shell command the model asks for and
prints the model's final answer, against OpenAI-chat, Claude, Gemini and Responses-native upstreams.

Codex speaks only the Responses API to custom providers. Its tools, as 0.171 sends them with the config below
(the README's): `exec_command` ({"cmd": ...}), `write_stdin`, `request_user_input`, `view_image` and the goal
tools, all function tools; web search and the multi-agent namespace are turned off, as hosted tools and
namespaces need a Responses-native upstream. Nothing leaves the
machine: update checks and analytics are off, and the only provider is the gateway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeUpstream, GatewayServer, Reply, chunks, simple_config
from responses_wire import call_events, stream_reply, text_events

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


# --- The CLI ---


@pytest.fixture(scope="session")
def codex_bin() -> Path:
    """The CLI from tests/node (.ci/run installs it); installed here when missing, skipped only without npm."""
    if not CODEX.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed, so the Codex CLI (npm @openai/codex) cannot be installed")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600,
                       capture_output=True)
    return CODEX


def codex_config(gateway: GatewayServer) -> str:
    return f"""model = "codex-model"
model_provider = "uni"
web_search = "disabled"
check_for_update_on_startup = false

[analytics]
enabled = false

[features]
multi_agent = false

[model_providers.uni]
name = "uni-api"
base_url = "{gateway.url}/v1"
env_key = "UNI_API_KEY"
wire_api = "responses"
"""


def run_codex(codex: Path, gateway: GatewayServer, tmp_path: Path, prompt: str) -> subprocess.CompletedProcess[str]:
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(codex_config(gateway))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "CODEX_HOME": str(home),
           "UNI_API_KEY": "sk-client", "NO_COLOR": "1"}
    command = [str(codex), "exec", "--skip-git-repo-check", "--strict-config",
               # the command runs unsandboxed: this container has no landlock/bubblewrap, and it is `echo hi`
               "--dangerously-bypass-approvals-and-sandbox", prompt]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-cx", "object": "chat.completion.chunk", "created": 1, "model": "up",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def chat_call_reply() -> Reply:
    call = {"index": 0, "id": CALL_ID, "type": "function", "function": {"name": "exec_command", "arguments": ""}}
    usage = {"prompt_tokens": 900, "completion_tokens": 12, "total_tokens": 912}
    return Reply(sse=[chat_chunk({"role": "assistant", "content": None, "tool_calls": [call]}),
                      chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": COMMAND[:8]}}]}),
                      chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": COMMAND[8:]}}]}),
                      chat_chunk({}, "tool_calls"),
                      {**chat_chunk({}), "choices": [], "usage": usage}, "[DONE]"])


def anthropic_sse(events: list[dict[str, Any]]) -> Reply:
    """Anthropic "Streaming Messages" framing: `event: <type>` + `data: <json>`."""
    body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)
    return Reply(raw_chunks=[body.encode()])


def claude_reply(block: dict[str, Any], deltas: list[dict[str, Any]], stop: str) -> Reply:
    start = {"type": "message_start", "message": {
        "id": "msg_cx", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 900, "output_tokens": 1}}}
    return anthropic_sse([
        start, {"type": "content_block_start", "index": 0, "content_block": block},
        *({"type": "content_block_delta", "index": 0, "delta": delta} for delta in deltas),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
         "usage": {"output_tokens": 12}},
        {"type": "message_stop"}])


def script_gpt(upstream: FakeUpstream) -> None:
    upstream.enqueue(chat_call_reply())
    upstream.enqueue(sse=chunks(["Codex ", "saw: hi"], usage=True))


def script_claude(upstream: FakeUpstream) -> None:
    tool = {"type": "tool_use", "id": CALL_ID, "name": "exec_command", "input": {}}
    upstream.enqueue(claude_reply(tool, [{"type": "input_json_delta", "partial_json": COMMAND}], "tool_use"))
    text = [{"type": "text_delta", "text": "Codex "}, {"type": "text_delta", "text": "saw: hi"}]
    upstream.enqueue(claude_reply({"type": "text", "text": ""}, text, "end_turn"))


def gemini_sse(parts: list[dict[str, Any]], finish: str | None = None) -> str:
    """One streamGenerateContent event ("Generate content", alt=sse: GenerateContentResponse per `data:`)."""
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    usage = {"promptTokenCount": 900, "candidatesTokenCount": 12, "totalTokenCount": 912}
    return json.dumps({"candidates": [candidate], "usageMetadata": usage, "modelVersion": "gemini-2.5-pro"})


def script_gemini(upstream: FakeUpstream) -> None:
    call = {"functionCall": {"name": "exec_command", "args": json.loads(COMMAND)}}
    upstream.enqueue(sse=[gemini_sse([call], "STOP")])
    upstream.enqueue(sse=[gemini_sse([{"text": "Codex "}]), gemini_sse([{"text": "saw: hi"}], "STOP")])


def script_responses(upstream: FakeUpstream) -> None:
    upstream.enqueue(stream_reply(call_events("exec_command", [COMMAND[:8], COMMAND[8:]], call_id=CALL_ID)))
    upstream.enqueue(stream_reply(text_events(["Codex ", "saw: hi"])))


def tool_output_of_gpt(body: dict[str, Any]) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "tool" and m["tool_call_id"] == CALL_ID)


def tool_output_of_claude(body: dict[str, Any]) -> str:
    results = [block for message in body["messages"] if isinstance(message["content"], list)
               for block in message["content"] if block.get("type") == "tool_result"]
    (result,) = [r for r in results if r["tool_use_id"] == CALL_ID]
    content = result["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def tool_output_of_gemini(body: dict[str, Any]) -> str:
    (response,) = [part["functionResponse"] for content in body["contents"] for part in content["parts"]
                   if "functionResponse" in part]
    assert response["name"] == "exec_command"
    return str(response["response"].get("content", response["response"]))


def tool_output_of_responses(body: dict[str, Any]) -> str:
    (item,) = [i for i in body["input"] if i.get("type") == "function_call_output" and i["call_id"] == CALL_ID]
    return item["output"] if isinstance(item["output"], str) else json.dumps(item["output"])


UPSTREAMS: dict[str, tuple[str, str, Callable[[FakeUpstream], None], Callable[[dict[str, Any]], str]]] = {
    "gpt": ("/v1/chat/completions", "gpt", script_gpt, tool_output_of_gpt),
    "claude": ("/v1/messages", "claude", script_claude, tool_output_of_claude),
    "gemini": ("/v1beta", "gemini", script_gemini, tool_output_of_gemini),
    "responses": ("/v1/responses", "responses", script_responses, tool_output_of_responses),
}


@pytest.mark.parametrize("kind", sorted(UPSTREAMS))
def test_codex_exec_runs_a_shell_tool_call_to_a_final_answer(
        codex_bin: Path, upstream: FakeUpstream, make_gateway: MakeGateway, tmp_path: Path, kind: str) -> None:
    path, engine, script, tool_output = UPSTREAMS[kind]
    script(upstream)
    provider = {"provider": kind, "base_url": upstream.url + path, "api": "sk-up-secret", "engine": engine,
                "model": [{"up-model": "codex-model"}], "preferences": {"cooldown_period": 0}}
    gateway = make_gateway({"providers": [provider], "api_keys": [{"api": "sk-client"}]})

    result = run_codex(codex_bin, gateway, tmp_path, "Run `echo hi` in the shell and tell me what it printed.")

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(FINAL), (result.stdout, result.stderr[-3000:])
    answers = [r for r in upstream.received if r.path.startswith(path) and not r.path.endswith("/models")]
    assert len(answers) == 2, [r.path for r in upstream.received]
    first, second = (r.json for r in answers)
    assert "exec_command" in json.dumps(first.get("tools"))
    assert "\nhi\n" in tool_output(second) + "\n", tool_output(second)
