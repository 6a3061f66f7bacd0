"""`--workers N`: one supervisor and N gateway processes on one port, run as users run it (python uni_api.py).
Workers share limits through Redis (`state:`), reload together on SIGHUP, are replaced when one dies, and all
drain on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from conftest import FakeUpstream, Reply, chunks, simple_config, to_yaml
from gateway_process import SCRIPT, gateway_process
from redis_server import RedisServer
from test_shutdown import read_stream, streamed_content

CLIENT = {"Authorization": "Bearer sk-client"}


def worker_config(redis: RedisServer, upstream: FakeUpstream, **key_prefs: Any) -> dict[str, Any]:
    config = simple_config(upstream, models=["gpt-4o", "slow-stream"], **key_prefs)
    config["api_keys"][0]["role"] = "admin"
    config["state"] = {"redis_url": redis.url, "prefix": "workers"}
    return config


def answering_instance(url: str) -> str:
    """The instance id in /metrics, over a new connection (so the kernel may hand it to either worker)."""
    text = httpx.get(f"{url}/metrics", headers={**CLIENT, "Connection": "close"}, timeout=10).text
    return re.search(r'uni_api_instance_info\{instance_id="([^"]+)"\}', text)[1]  # type: ignore[index]


def model_ids(url: str) -> set[str]:
    answer = httpx.get(f"{url}/v1/models", headers={**CLIENT, "Connection": "close"}, timeout=10).json()
    return {entry["id"] for entry in answer["data"]}


def worker_pids(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", log)]


def wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_more_than_one_worker_without_shared_state_is_refused_naming_what_would_break(tmp_path: Path) -> None:
    (tmp_path / "api.yaml").write_text(to_yaml({"providers": [{"provider": "p", "base_url": "http://127.0.0.1:9/v1",
                                                               "api": "sk-p", "model": ["m"]}],
                                                "api_keys": [{"api": "sk-client"}]}))
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WORKERS")}
    out = subprocess.run([sys.executable, str(SCRIPT), "--config", "api.yaml", "--workers", "2"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=20, env=env)
    assert out.returncode == 3
    assert "rate limits" in out.stderr and "cooldowns" in out.stderr and "--allow-unshared-state" in out.stderr


def test_workers_must_be_a_whole_number_of_at_least_one(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--workers", "0"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 2
    assert "--workers: expected a whole number >= 1, got '0'" in out.stderr


def test_workers_that_cannot_start_stop_the_supervisor_with_exit_3(upstream: FakeUpstream, tmp_path: Path) -> None:
    config = {"providers": [{"provider": "listed", "base_url": f"{upstream.url}/v1/chat/completions", "api": "sk-up"}],
              "api_keys": [{"api": "sk-client", "preferences": {"ENABLE_MODERATION": True}}]}
    (tmp_path / "api.yaml").write_text(to_yaml(config))  # discovery finds no moderation model: the lifespan fails
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WORKERS")}
    out = subprocess.run([sys.executable, str(SCRIPT), "--config", "api.yaml", "--host", "127.0.0.1", "--port", "0",
                          "--workers", "2", "--allow-unshared-state"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30, env={**env, "DISABLE_DATABASE": "true"})
    assert out.returncode == 3
    assert "could not start; stopping the others" in out.stderr
    assert "starting another" not in out.stderr


def test_two_workers_serve_one_port_share_limits_reload_on_sighup_and_a_dead_one_is_replaced(
        upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    config = worker_config(redis_server, upstream, rate_limit="4/min")
    with gateway_process(config, tmp_path, "--workers", "2", CONFIG_POLL_SECONDS="0") as gateway:
        seen = {answering_instance(gateway.url) for _ in range(60)}
        assert len(seen) == 2  # the kernel hands new connections to both workers
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        statuses = [httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=10,
                               headers={**CLIENT, "Connection": "close"}).status_code for _ in range(8)]
        assert sorted(statuses) == [200] * 4 + [429] * 4  # one limit for both workers

        config["providers"][0]["model"].append("gpt-new")
        gateway.config_path.write_text(to_yaml(config))
        gateway.send(signal.SIGHUP)
        wait_until(lambda: gateway.log().count("config reloaded") == 2)
        assert all("gpt-new" in model_ids(gateway.url) for _ in range(10))

        first, _ = worker_pids(gateway.log())
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(worker_pids(gateway.log())) == 3)
        replacement = worker_pids(gateway.log())[2]
        wait_until(lambda: answering_instance(gateway.url).endswith(f":{replacement}"))
        assert "gpt-new" in model_ids(gateway.url)  # the replacement read the config as it is now
        assert gateway.process.poll() is None


def test_sigterm_drains_every_worker_and_no_stream_in_flight_is_lost(
        upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    parts = ["one ", "two ", "three ", "four ", "five "]
    for _ in range(6):
        upstream.enqueue(Reply(sse=chunks(parts), chunk_delay=0.2))
    with gateway_process(worker_config(redis_server, upstream), tmp_path, "--workers", "2") as gateway, \
            ThreadPoolExecutor(6) as pool:
        firsts: list[Future[None]] = [Future() for _ in range(6)]
        streams = [pool.submit(read_stream, gateway.url, first) for first in firsts]
        for first in firsts:
            first.result(10)
        gateway.send(signal.SIGTERM)
        texts = [stream.result(20) for stream in streams]
        assert gateway.wait(10) == 0
    assert all(streamed_content(text) == "".join(parts) and text.endswith("data: [DONE]\n\n") for text in texts)
    assert "Traceback" not in gateway.log()
