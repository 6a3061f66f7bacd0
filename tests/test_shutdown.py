"""Graceful shutdown of the real CLI process: SIGTERM and SIGINT stop accepting, let in-flight requests and
streams finish within the grace period (`--grace-period` / `GRACE_PERIOD`), then exit 0."""

from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeUpstream, Reply, chunks
from gateway_process import GatewayProcess, gateway_process

PARTS = ["one ", "two ", "three ", "four ", "five ", "six"]


def two_model_config(streamer: FakeUpstream, answerer: FakeUpstream) -> dict[str, Any]:
    def provider(name: str, upstream: FakeUpstream, model: str) -> dict[str, Any]:
        return {"provider": name, "base_url": f"{upstream.url}/v1/chat/completions", "api": f"sk-{name}-secret",
                "model": [model]}

    return {"providers": [provider("streamer", streamer, "slow-stream"), provider("answerer", answerer, "slow-json")],
            "api_keys": [{"api": "sk-client"}]}


def read_stream(url: str, first_chunk: Future[None]) -> str:
    body = {"model": "slow-stream", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    text = ""
    with httpx.Client(base_url=url, timeout=20) as client, client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-client"}) as response:
        assert response.status_code == 200
        for piece in response.iter_text():
            text += piece
            if not first_chunk.done():
                first_chunk.set_result(None)
    return text


def streamed_content(text: str) -> str:
    events = [json.loads(block[6:]) for block in text.split("\n\n") if block.startswith("data: {")]
    return "".join(event["choices"][0]["delta"].get("content") or "" for event in events if event.get("choices"))


def ask(url: str) -> httpx.Response:
    body = {"model": "slow-json", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=url, timeout=20) as client:
        return client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-client"})


def refuses_connections(port: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return True
        time.sleep(0.05)
    return False


def wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_lets_in_flight_stream_and_request_finish_then_exits_zero(
        make_upstream: Any, tmp_path: Path, sig: signal.Signals) -> None:
    streamer, answerer = make_upstream(), make_upstream()
    streamer.enqueue(Reply(sse=chunks(PARTS), chunk_delay=0.25))
    answerer.enqueue(Reply(json={"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}]}, delay=1.0))
    with gateway_process(two_model_config(streamer, answerer), tmp_path) as gateway, ThreadPoolExecutor(2) as pool:
        first_chunk: Future[None] = Future()
        stream = pool.submit(read_stream, gateway.url, first_chunk)
        first_chunk.result(10)
        answer = pool.submit(ask, gateway.url)
        wait_until(lambda: len(answerer.received) == 1)
        signalled = time.monotonic()
        gateway.send(sig)
        assert refuses_connections(gateway.port, within=1.0)  # no new connections once shutting down
        text = stream.result(20)
        assert streamed_content(text) == "".join(PARTS)
        assert text.endswith("data: [DONE]\n\n")
        assert answer.result(20).json()["choices"][0]["message"]["content"] == "done"
        assert gateway.wait(10) == 0
        assert time.monotonic() - signalled < 5
        assert "Traceback" not in gateway.log()


def test_requests_still_running_after_the_grace_period_are_cut_and_it_exits_zero(
        upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.enqueue(Reply(sse=chunks(PARTS), stall_after=2))
    config = two_model_config(upstream, upstream)
    with gateway_process(config, tmp_path, "--grace-period", "1") as gateway, ThreadPoolExecutor(1) as pool:
        first_chunk: Future[None] = Future()
        stream = pool.submit(read_stream, gateway.url, first_chunk)
        first_chunk.result(10)
        signalled = time.monotonic()
        gateway.send(signal.SIGTERM)
        assert gateway.wait(10) == 0
        assert 0.9 < time.monotonic() - signalled < 4
        assert upstream.wait_cancelled(timeout=2)  # the stalled upstream call was closed, not leaked
        with pytest.raises(httpx.HTTPError):
            stream.result(10)  # the client sees the cut stream as a broken transfer


def test_grace_period_comes_from_the_environment(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.enqueue(Reply(sse=chunks(PARTS), stall_after=2))
    gateway = GatewayProcess(two_model_config(upstream, upstream), tmp_path, GRACE_PERIOD="0.5")
    try:
        gateway.wait_ready()
        with ThreadPoolExecutor(1) as pool:
            first_chunk: Future[None] = Future()
            stream = pool.submit(read_stream, gateway.url, first_chunk)
            first_chunk.result(10)
            signalled = time.monotonic()
            gateway.send(signal.SIGTERM)
            assert gateway.wait(10) == 0
            assert time.monotonic() - signalled < 2.5
            with pytest.raises(httpx.HTTPError):
                stream.result(10)
    finally:
        gateway.stop()
