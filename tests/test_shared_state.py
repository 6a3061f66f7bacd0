"""Shared state against a real redis-server: several gateway processes (python uni_api.py, as users run them)
with one `state:` keep each rate limit, cooldown and key bench exactly as one process would, and a Redis fault
does what `state.on_error` says."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from conftest import FakeUpstream, Reply, simple_config
from gateway_process import GatewayProcess, gateway_process
from redis_server import RedisServer

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
CLIENT = {"Authorization": "Bearer sk-client"}


def shared_config(redis: RedisServer, *upstreams: FakeUpstream, on_error: str = "open",
                  **key_prefs: Any) -> dict[str, Any]:
    config = simple_config(*upstreams, **key_prefs)
    config["state"] = {"redis_url": redis.url, "prefix": "test", "on_error": on_error}
    config["api_keys"][0]["role"] = "admin"  # /status, /metrics and /v1/stats too
    return config


@contextmanager
def gateways(config: dict[str, Any], directory: Path, count: int) -> Iterator[list[GatewayProcess]]:
    """`count` gateway processes on one config, each in its own folder, started together."""
    with ExitStack() as stack:
        started = [GatewayProcess(config, _folder(directory, i)) for i in range(count)]
        for gateway in started:
            stack.callback(gateway.stop)
        for gateway in started:
            gateway.wait_ready()
        yield started


def _folder(directory: Path, index: int) -> Path:
    folder = directory / f"gateway{index}"
    folder.mkdir()
    return folder


def chat(gateway: GatewayProcess) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=CLIENT, timeout=10)


def admin(gateway: GatewayProcess, path: str) -> str:
    return httpx.get(f"{gateway.url}{path}", headers=CLIENT, timeout=10).text


def test_three_gateways_on_one_redis_admit_exactly_ten_of_thirty_concurrent_requests(
        upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    config = shared_config(redis_server, upstream, rate_limit="10/min")
    with gateways(config, tmp_path, 3) as started:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as client:
                return await asyncio.gather(*(
                    client.post(f"{started[i % 3].url}/v1/chat/completions", json=CHAT, headers=CLIENT)
                    for i in range(30)))

        responses = asyncio.run(burst())
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 10 + [429] * 20
    waits = [int(r.headers["Retry-After"]) for r in responses if r.status_code == 429]
    assert all(55 <= wait <= 60 for wait in waits), waits  # the real reset: a minute after the first admitted
    assert len(upstream.received) == 10
    stored = redis_server.stored()
    assert stored and all(name.startswith("{test}:") for name in stored)
    assert not any(b"sk-" in name.encode() + value for name, value in stored.items())  # fingerprints only


def test_a_channel_cooled_by_one_gateway_is_skipped_by_the_others(
        make_upstream: Any, redis_server: RedisServer, tmp_path: Path) -> None:
    failing, healthy = make_upstream(), make_upstream()
    config = shared_config(redis_server, failing, healthy)
    config["providers"][0]["preferences"] = {"cooldown_period": 60}
    failing.enqueue(Reply(status=500, json={"error": {"message": "boom"}}))
    with gateways(config, tmp_path, 3) as (first, second, third):
        assert chat(first).status_code == 200  # up0 failed and cooled, up1 answered
        assert [chat(second).status_code, chat(third).status_code] == [200, 200]
    assert len(failing.received) == 1  # the others never tried the cooled channel
    assert len(healthy.received) == 3


def test_an_upstream_key_benched_after_a_429_is_benched_on_every_gateway(
        upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    config = shared_config(redis_server, upstream)
    config["providers"][0]["api"] = ["sk-up-first", "sk-up-second"]
    config["providers"][0]["preferences"]["api_key_schedule_algorithm"] = "fixed_priority"
    upstream.enqueue(Reply(status=429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "30"}))
    with gateways(config, tmp_path, 3) as started:
        assert [chat(gateway).status_code for gateway in started] == [200, 200, 200]
    keys = [received.headers["Authorization"] for received in upstream.received]
    assert keys == ["Bearer sk-up-first"] + ["Bearer sk-up-second"] * 3


def test_an_upstream_keys_rate_limit_holds_across_gateways(
        upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    config = shared_config(redis_server, upstream)
    config["providers"][0]["preferences"]["api_key_rate_limit"] = "2/min"
    with gateways(config, tmp_path, 3) as started:
        statuses = [chat(gateway).status_code for gateway in started]
    assert statuses == [200, 200, 503]  # the third finds the provider's only key used up
    assert len(upstream.received) == 2


def test_with_on_error_open_a_dead_redis_admits_with_a_warning_and_sharing_resumes_when_it_is_back(
        upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    config = shared_config(redis_server, upstream, rate_limit="100/min")
    with gateway_process(config, tmp_path) as gateway:
        assert chat(gateway).status_code == 200
        redis_server.stop()
        started = time.monotonic()
        assert [chat(gateway).status_code for _ in range(3)] == [200, 200, 200]
        assert time.monotonic() - started < 2
        assert "shared state: Redis unreachable" in gateway.log()
        metrics = admin(gateway, "/metrics")
        assert "uni_api_shared_state_up 0" in metrics
        assert int(re.search(r"uni_api_shared_state_errors_total (\d+)", metrics)[1]) == 3
        assert "UNREACHABLE" in admin(gateway, "/status")
        redis_server.start()  # a fresh, empty Redis on the same port
        _until(lambda: chat(gateway).status_code == 200 and bool(redis_server.stored()))
        assert "uni_api_shared_state_up 1" in admin(gateway, "/metrics")
        assert "Redis answers again" in gateway.log()


def test_with_on_error_closed_a_dead_redis_answers_503_at_once_and_recovers_when_it_is_back(
        upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    with gateway_process(shared_config(redis_server, upstream, on_error="closed"), tmp_path) as gateway:
        assert chat(gateway).status_code == 200
        redis_server.stop()
        for _ in range(3):
            started = time.monotonic()
            response = chat(gateway)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "shared_state_unavailable"
            assert time.monotonic() - started < 1
        redis_server.start()
        _until(lambda: chat(gateway).status_code == 200)
    assert len(upstream.received) == 2


def test_stats_and_metrics_name_the_instance_that_answered(
        upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    config = shared_config(redis_server, upstream)
    with gateway_process(config, tmp_path, INSTANCE_ID="eu-1", DISABLE_DATABASE="false") as gateway:
        assert 'uni_api_instance_info{instance_id="eu-1"} 1' in admin(gateway, "/metrics")
        assert httpx.get(f"{gateway.url}/v1/stats", headers=CLIENT).json()["instance"] == "eu-1"


def _until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_gateways_with_different_prefixes_on_one_redis_keep_their_limits_apart(
        upstream: FakeUpstream, redis_server: RedisServer, make_gateway: Any) -> None:
    answered = []
    for prefix in ("team-a", "team-b", "team-a"):
        config = shared_config(redis_server, upstream, rate_limit="2/min")
        config["state"]["prefix"] = prefix
        gateway = make_gateway(config)
        with gateway.http("sk-client") as client:
            answered.append([client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(2)])
    assert answered == [[200, 200], [200, 200], [429, 429]]  # the second team-a gateway finds team-a's window full
    assert {name.split(":")[0] for name in redis_server.stored()} == {"{team-a}", "{team-b}"}
