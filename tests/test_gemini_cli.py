"""Gemini CLI from npm (@google/gemini-cli, installed in tests/node) end to end through the gateway: `gemini -p` with
GOOGLE_GEMINI_BASE_URL and GEMINI_API_KEY pointing at it, one tool call round (the model asks for read_file, the CLI
reads the file and sends the result back), against an OpenAI-format, a Claude and a Gemini channel.

The CLI runs with a temporary HOME whose settings select API-key sign-in and turn telemetry, usage statistics and
update checks off (Gemini CLI docs, "Configuration": security.auth.selectedType, telemetry.enabled,
privacy.usageStatisticsEnabled, general.enableAutoUpdate / enableAutoUpdateNotification).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeUpstream, GatewayServer, Reply

NODE_DIR = Path(__file__).parent / "node"
GEMINI_BIN = NODE_DIR / "node_modules" / ".bin" / "gemini"
NOTE = "The launch code is 4711."
SETTINGS = {"security": {"auth": {"selectedType": "gemini-api-key"}, "folderTrust": {"enabled": False}},
            "privacy": {"usageStatisticsEnabled": False}, "telemetry": {"enabled": False},
            "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False}}
MakeGateway = Callable[..., GatewayServer]


@pytest.fixture(scope="module")
def gemini_cli() -> Path:
    """The installed CLI; npm installs it here when .ci/run has not (the npm registry is reachable in CI)."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm and node are needed to install and run @google/gemini-cli")
    if not GEMINI_BIN.exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True,
                       timeout=600)
    return GEMINI_BIN


@pytest.fixture
def cli_home(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    home, work = tmp_path / "home", tmp_path / "work"
    (home / ".gemini").mkdir(parents=True)
    (home / ".gemini" / "settings.json").write_text(json.dumps(SETTINGS))
    work.mkdir()
    (work / "note.txt").write_text(NOTE + "\n")
    yield home, work


def run_cli(cli: Path, gateway: GatewayServer, home: Path, work: Path, model: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "NO_COLOR": "1", "GEMINI_CLI_NO_RELAUNCH": "true",
           "GOOGLE_GEMINI_BASE_URL": gateway.url, "GEMINI_API_KEY": "sk-client"}
    return subprocess.run([str(cli), "-p", "What does note.txt say?", "-m", model, "--yolo"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=180)


def openai_stream(delta: dict[str, Any], finish: str) -> list[Any]:
    base = {"id": "chatcmpl-cli", "object": "chat.completion.chunk", "created": 1, "model": "up"}
    return [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", **delta}, "logprobs": None,
                                  "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]},
            {**base, "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55}},
            "[DONE]"]


def claude_stream(block: dict[str, Any], delta: dict[str, Any], stop: str) -> bytes:
    events = [("message_start", {"type": "message_start", "message": {
        "id": "msg_cli", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5",
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 50, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                           "usage": {"output_tokens": 5}}),
        ("message_stop", {"type": "message_stop"})]
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


def gemini_event(part: dict[str, Any]) -> dict[str, Any]:
    return {"candidates": [{"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 50, "candidatesTokenCount": 5, "totalTokenCount": 55}}


def script(upstream: FakeUpstream, engine: str, path: str) -> None:
    """The model's two turns in the engine's wire format: read_file on `path`, then an answer quoting the note."""
    arguments = {"file_path": path}
    if engine == "gpt":
        call = {"index": 0, "id": "call_cli1", "type": "function",
                "function": {"name": "read_file", "arguments": json.dumps(arguments)}}
        upstream.enqueue(Reply(sse=openai_stream({"tool_calls": [call]}, "tool_calls")))
        upstream.enqueue(Reply(sse=openai_stream({"content": "The note says: 4711."}, "stop")))
    elif engine == "claude":
        block = {"type": "tool_use", "id": "toolu_cli1", "name": "read_file", "input": {}}
        upstream.enqueue(Reply(raw_chunks=[claude_stream(block, {"type": "input_json_delta",
                                                                 "partial_json": json.dumps(arguments)}, "tool_use")]))
        upstream.enqueue(Reply(raw_chunks=[claude_stream({"type": "text", "text": ""}, {
            "type": "text_delta", "text": "The note says: 4711."}, "end_turn")]))
    else:
        upstream.enqueue(Reply(sse=[gemini_event({"functionCall": {"name": "read_file", "args": arguments},
                                                  "thoughtSignature": "c2lnLWNsaQ=="})]))
        upstream.enqueue(Reply(sse=[gemini_event({"text": "The note says: 4711."})]))


PROVIDERS = {"gpt": ("/v1/chat/completions", "gpt-4o"), "claude": ("/v1/messages", "claude-sonnet-4-5"),
             "gemini": ("/v1beta", "gemini-2.5-flash")}


@pytest.mark.parametrize("engine", ["gpt", "claude", "gemini"])
def test_gemini_cli_runs_a_tool_round_through_the_gateway(gemini_cli: Path, cli_home: tuple[Path, Path],
                                                          upstream: FakeUpstream, make_gateway: MakeGateway,
                                                          engine: str) -> None:
    home, work = cli_home
    suffix, upstream_model = PROVIDERS[engine]
    gateway = make_gateway({"providers": [{"provider": "up", "base_url": upstream.url + suffix, "api": "sk-up-secret",
                                           "engine": engine, "model": [{upstream_model: "team-model"}],
                                           "preferences": {"cooldown_period": 0}}],
                            "api_keys": [{"api": "sk-client"}]})
    script(upstream, engine, str(work / "note.txt"))
    done = run_cli(gemini_cli, gateway, home, work, "team-model")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "The note says: 4711." in done.stdout
    assert len(upstream.received) == 2, [r.path for r in upstream.received]
    first, second = (r.json for r in upstream.received)
    replay = json.dumps(second)
    assert NOTE in replay  # the tool's result went back upstream
    if engine == "gemini":  # the CLI's own body, passed through: its tools and the signature it sent back
        assert any(d["name"] == "read_file" for t in first["tools"] for d in t.get("functionDeclarations", ()))
        assert second["contents"][-2]["parts"][0]["thoughtSignature"] == "c2lnLWNsaQ=="
    else:
        assert any((t.get("function") or t)["name"] == "read_file" for t in first["tools"])
