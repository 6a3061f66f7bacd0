"""Scheduling end to end: the real gateway against several fake upstreams, judged by what each upstream received
(test_scheduler_pure.py tests scheduler.py alone).

Channels are providers up0, up1, ... (one per FakeUpstream, see `simple_config`); a provider with several keys
is told apart by the `Authorization` header each request carried. Time-based behaviour (cooldowns, benched
keys, rate windows) runs on a fake clock injected through `create_app(scheduler=...)`; only the timeout tests
use real time, with timeouts of a few tenths of a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from conftest import FakeClock, FakeUpstream, GatewayServer, Reply, chunks, completion, simple_config, to_yaml

import uni_api
from scheduler import Scheduler

USER = [{"role": "user", "content": "hi"}]
TRIGGER = "The bot's usage is covered by the developer"


def start(make_gateway: Any, config: dict[str, Any], seed: int = 0) -> tuple[GatewayServer, FakeClock]:
    """A gateway whose scheduler runs on a fake clock and a seeded RNG."""
    clock = FakeClock()
    return make_gateway(config, scheduler=Scheduler(clock=clock, rng=random.Random(seed))), clock


_clients: dict[int, httpx.Client] = {}


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for client in _clients.values():
        client.close()
    _clients.clear()


def post(gw: GatewayServer, model: str = "gpt-4o", key: str = "sk-client", timeout: float = 10,
         **body: Any) -> httpx.Response:
    """POST a chat request on one kept-alive connection per gateway (a new client per call costs ~50 ms)."""
    http = _clients.get(gw.port) or _clients.setdefault(gw.port, httpx.Client(base_url=gw.url))
    return http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                     json={"model": model, "messages": USER, **body}, timeout=timeout)


def served(gw: GatewayServer, upstreams: list[FakeUpstream], n: int, **kwargs: Any) -> list[str]:
    """Send `n` requests one after another; the provider (up0, up1, ...) that received each."""
    out: list[str] = []
    for _ in range(n):
        before = [len(u.received) for u in upstreams]
        response = post(gw, **kwargs)
        assert response.status_code == 200, response.text
        grew = [f"up{i}" for i, u in enumerate(upstreams) if len(u.received) > before[i]]
        assert len(grew) == 1, grew
        out.append(grew[0])
    return out


def keys_used(upstream: FakeUpstream) -> list[str]:
    return [r.headers["Authorization"].removeprefix("Bearer ") for r in upstream.received]


def with_keys(config: dict[str, Any], index: int, keys: list[str], **prefs: Any) -> dict[str, Any]:
    """Give provider up<index> a key pool and provider preferences."""
    config["providers"][index]["api"] = keys
    config["providers"][index]["preferences"].update(prefs)
    return config


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    return body["error"]  # type: ignore[no-any-return]


def fail(status: int, message: str = "boom", **headers: str) -> Reply:
    return Reply(status=status, json={"error": {"message": message}}, headers=headers)


# --- 1. SCHEDULING_ALGORITHM ---


def test_fixed_priority_sends_every_request_to_the_first_channel_until_it_fails(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(3)]
    gw = make_gateway(simple_config(*ups))
    assert served(gw, ups, 4) == ["up0"] * 4
    ups[0].enqueue(fail(500))
    assert post(gw).status_code == 200
    assert [len(u.received) for u in ups] == [5, 1, 0]
    assert served(gw, ups, 1) == ["up0"]  # cooldown_period 0: back to rule order at once


def test_round_robin_rotates_the_first_channel_per_key_and_model(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(3)]
    config = simple_config(*ups, models=["gpt-4o", "o1"], SCHEDULING_ALGORITHM="round_robin")
    config["api_keys"].append({"api": "sk-other", "preferences": {"SCHEDULING_ALGORITHM": "round_robin"}})
    gw, _ = start(make_gateway, config)
    assert served(gw, ups, 4) == ["up0", "up1", "up2", "up0"]
    assert served(gw, ups, 2, model="o1") == ["up0", "up1"]
    assert served(gw, ups, 2, key="sk-other") == ["up0", "up1"]
    assert served(gw, ups, 1) == ["up1"]


def test_weighted_round_robin_gives_5_3_2_of_10_requests_interleaved(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(3)]
    config = simple_config(*ups, SCHEDULING_ALGORITHM="weighted_round_robin")
    config["api_keys"][0]["model"] = [{"up0/gpt-4o": 5}, {"up1/gpt-4o": 3}, {"up2/gpt-4o": 2}]
    gw, _ = start(make_gateway, config)
    order = served(gw, ups, 20)
    assert order[:10] == ["up0", "up1", "up2", "up0", "up0", "up1", "up0", "up2", "up1", "up0"]
    assert order[10:] == order[:10]
    assert Counter(order[:10]) == {"up0": 5, "up1": 3, "up2": 2}


def test_weighted_round_robin_falls_back_in_rule_order_when_its_pick_fails(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(3)]
    config = simple_config(*ups, SCHEDULING_ALGORITHM="weighted_round_robin")
    config["api_keys"][0]["model"] = [{"up0/gpt-4o": 1}, {"up1/gpt-4o": 1}, {"up2/gpt-4o": 8}]
    gw, _ = start(make_gateway, config)
    ups[2].enqueue(fail(500))
    ups[0].enqueue(fail(500))
    assert post(gw).status_code == 200
    assert [len(u.received) for u in ups] == [1, 1, 1]


def test_lottery_draws_the_first_channel_by_weight_with_the_injected_rng(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(2)]
    config = simple_config(*ups, SCHEDULING_ALGORITHM="lottery")
    config["api_keys"][0]["model"] = [{"up0/gpt-4o": 3}, {"up1/gpt-4o": 1}]
    gw, _ = start(make_gateway, config, seed=7)
    order = served(gw, ups, 120)
    replay = random.Random(7)
    assert order == [replay.choices(["up0", "up1"], weights=[3, 1])[0] for _ in range(120)]
    assert 70 <= order.count("up0") <= 110


def test_random_shuffles_channels_with_the_injected_rng(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(3)]
    gw, _ = start(make_gateway, simple_config(*ups, SCHEDULING_ALGORITHM="random"), seed=3)
    order = served(gw, ups, 45)
    replay = random.Random(3)
    assert order == [replay.sample(["up0", "up1", "up2"], 3)[0] for _ in range(45)]
    assert set(order) == {"up0", "up1", "up2"}


@pytest.mark.parametrize("strategy", ["weighted_round_robin", "lottery"])
def test_weighted_strategies_without_weights_fall_back_to_round_robin(make_upstream, make_gateway,
                                                                      strategy: str) -> None:
    ups = [make_upstream() for _ in range(3)]
    gw, _ = start(make_gateway, simple_config(*ups, SCHEDULING_ALGORITHM=strategy))
    assert served(gw, ups, 6) == ["up0", "up1", "up2"] * 2


# --- 2. AUTO_RETRY ---


def test_auto_retry_true_tries_every_channel_and_every_key_of_a_pool_once(make_upstream, make_gateway) -> None:
    a, b, c = make_upstream(), make_upstream(), make_upstream()
    gw = make_gateway(with_keys(simple_config(a, b, c), 0, ["sk-a-1", "sk-a-2"]))
    a.enqueue(fail(429))
    a.enqueue(fail(429))
    b.enqueue(fail(500))
    assert post(gw).status_code == 200
    assert sorted(keys_used(a)) == ["sk-a-1", "sk-a-2"]
    assert (len(b.received), len(c.received)) == (1, 1)


def test_auto_retry_false_makes_exactly_one_attempt_despite_spare_keys(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    gw = make_gateway(with_keys(simple_config(a, b, AUTO_RETRY=False), 0, ["sk-a-1", "sk-a-2"]))
    a.enqueue(fail(401))
    response = post(gw)
    assert response.status_code == 502 and "up0/gpt-4o: 401" in error_of(response)["message"]
    assert (len(a.received), len(b.received)) == (1, 0)


def test_auto_retry_number_allows_that_many_retries_after_the_first_attempt(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(4)]
    for u in ups:
        u.enqueue(fail(500))
    gw = make_gateway(simple_config(*ups, AUTO_RETRY=2))
    response = post(gw)
    assert response.status_code == 502 and error_of(response)["message"].count("500 boom") == 3
    assert [len(u.received) for u in ups] == [1, 1, 1, 0]


def test_auto_retry_number_counts_retries_on_other_keys_too(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    gw = make_gateway(with_keys(simple_config(a, b, AUTO_RETRY=1), 0, ["sk-a-1", "sk-a-2", "sk-a-3"]))
    for _ in range(3):
        a.enqueue(fail(429))
    assert post(gw).status_code == 503
    assert keys_used(a) == ["sk-a-1", "sk-a-2"] and not b.received


def test_a_request_never_tries_the_same_channel_and_key_twice(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = with_keys(simple_config(a, b, AUTO_RETRY=10), 0, ["sk-a-1", "sk-a-2"])
    gw = make_gateway(with_keys(config, 1, ["sk-b-1", "sk-b-2"]))
    for upstream in (a, b):
        upstream.enqueue(fail(429))
        upstream.enqueue(fail(429))
    response = post(gw)  # a fifth attempt would reach a default 200 answer
    assert response.status_code == 503
    assert sorted(keys_used(a)) == ["sk-a-1", "sk-a-2"] and sorted(keys_used(b)) == ["sk-b-1", "sk-b-2"]


@pytest.mark.parametrize("status", [400, 413, 422])
def test_client_errors_are_passed_through_without_trying_other_keys_or_channels(make_upstream, make_gateway,
                                                                                 status: int) -> None:
    a, b = make_upstream(), make_upstream()
    gw = make_gateway(with_keys(simple_config(a, b), 0, ["sk-a-1", "sk-a-2"]))
    a.enqueue(fail(status, "max_tokens is too large"))
    response = post(gw)
    assert response.status_code == status and error_of(response)["message"] == "max_tokens is too large"
    assert (len(a.received), len(b.received)) == (1, 0)


@pytest.mark.parametrize("status", [401, 403, 429])
def test_bad_or_busy_key_moves_on_to_the_next_key_of_the_same_channel(make_upstream, make_gateway,
                                                                      status: int) -> None:
    a, b = make_upstream(), make_upstream()
    config = with_keys(simple_config(a, b), 0, ["sk-a-1", "sk-a-2"], api_key_schedule_algorithm="fixed_priority")
    gw = make_gateway(config)
    a.enqueue(fail(status))
    assert post(gw).status_code == 200
    assert keys_used(a) == ["sk-a-1", "sk-a-2"] and not b.received


def test_model_missing_on_a_channel_moves_on_to_the_next_channel_not_the_next_key(make_upstream,
                                                                                  make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    gw = make_gateway(with_keys(simple_config(a, b), 0, ["sk-a-1", "sk-a-2"]))
    a.enqueue(fail(404, "The model does not exist"))
    assert post(gw).status_code == 200
    assert (len(a.received), len(b.received)) == (1, 1)


# --- 3. Provider key pools ---


def test_key_pool_round_robin_is_the_default_rotation(make_upstream, make_gateway) -> None:
    a = make_upstream()
    gw, _ = start(make_gateway, with_keys(simple_config(a), 0, ["k1", "k2", "k3"]))
    served(gw, [a], 6)
    assert keys_used(a) == ["k1", "k2", "k3", "k1", "k2", "k3"]


def test_key_pool_random_draws_keys_with_the_injected_rng(make_upstream, make_gateway) -> None:
    a = make_upstream()
    config = with_keys(simple_config(a), 0, ["k0", "k1", "k2"], api_key_schedule_algorithm="random")
    gw, _ = start(make_gateway, config, seed=5)
    served(gw, [a], 30)
    replay = random.Random(5)
    assert keys_used(a) == [f"k{replay.sample(range(3), 3)[0]}" for _ in range(30)]
    assert set(keys_used(a)) == {"k0", "k1", "k2"}


def test_key_pool_fixed_priority_uses_the_first_key_until_it_is_benched(make_upstream, make_gateway) -> None:
    a = make_upstream()
    config = with_keys(simple_config(a), 0, ["k1", "k2"], api_key_schedule_algorithm="fixed_priority",
                       api_key_cooldown_period=30)
    gw, clock = start(make_gateway, config)
    served(gw, [a], 2)
    a.enqueue(fail(401, "invalid key"))
    assert post(gw).status_code == 200
    served(gw, [a], 1)
    clock.advance(29)
    served(gw, [a], 1)
    clock.advance(2)
    served(gw, [a], 1)
    assert keys_used(a) == ["k1", "k1", "k1", "k2", "k2", "k2", "k1"]


@pytest.mark.parametrize(("retry_after", "benched_s"), [("120", 120), ("5", 10)])
def test_key_is_benched_after_a_429_for_retry_after_when_longer_than_its_cooldown(
        make_upstream, make_gateway, retry_after: str, benched_s: int) -> None:
    a = make_upstream()
    config = with_keys(simple_config(a), 0, ["k1", "k2"], api_key_schedule_algorithm="fixed_priority",
                       api_key_cooldown_period=10)
    gw, clock = start(make_gateway, config)
    a.enqueue(fail(429, "slow down", **{"Retry-After": retry_after}))
    assert post(gw).status_code == 200
    clock.advance(benched_s - 1)
    served(gw, [a], 1)
    clock.advance(2)
    served(gw, [a], 1)
    assert keys_used(a) == ["k1", "k2", "k2", "k1"]


def test_key_over_its_rate_limit_is_skipped_and_a_channel_with_no_usable_key_too(make_upstream,
                                                                                 make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = with_keys(simple_config(a, b), 0, ["k1", "k2"], api_key_schedule_algorithm="fixed_priority",
                       api_key_rate_limit="1/min")
    gw, clock = start(make_gateway, config)
    assert served(gw, [a, b], 3) == ["up0", "up0", "up1"]
    clock.advance(60)
    assert served(gw, [a, b], 1) == ["up0"]
    assert keys_used(a) == ["k1", "k2", "k1"]


def test_provider_key_rate_limit_has_one_window_per_key_and_model_entry(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = with_keys(simple_config(a, b, models=["gpt-4o", "o1"]), 0, ["k1"],
                       api_key_rate_limit={"gpt-4o": "1/min", "default": "2/min"})
    gw, _ = start(make_gateway, config)
    assert served(gw, [a, b], 2) == ["up0", "up1"]
    assert served(gw, [a, b], 3, model="o1") == ["up0", "up0", "up1"]


def test_channel_whose_keys_are_all_benched_is_skipped_without_a_request(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = with_keys(simple_config(a, b), 0, ["k1"], api_key_cooldown_period=60)
    config["api_keys"].append({"api": "sk-only-a", "model": ["up0/*"]})
    gw, clock = start(make_gateway, config)
    a.enqueue(fail(401, "invalid key"))
    assert post(gw).status_code == 200
    assert served(gw, [a, b], 1) == ["up1"] and len(a.received) == 1
    response = post(gw, key="sk-only-a")
    assert response.status_code == 503 and "every key is cooling down or rate limited" in error_of(response)["message"]
    assert len(a.received) == 1
    clock.advance(61)
    assert served(gw, [a, b], 1) == ["up0"]


# --- 4. Channel cooldown ---


def cooling_config(*ups: FakeUpstream, period: float = 60, **key_prefs: Any) -> dict[str, Any]:
    """simple_config with the global cooldown_period in force (simple_config turns it off per provider)."""
    config = simple_config(*ups, **key_prefs)
    for provider in config["providers"]:
        del provider["preferences"]["cooldown_period"]
    config["preferences"] = {"cooldown_period": period}
    return config


def test_failed_channel_is_left_out_for_the_global_cooldown_period(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    gw, clock = start(make_gateway, cooling_config(a, b))
    a.enqueue(fail(500))
    assert post(gw).status_code == 200
    assert served(gw, [a, b], 1) == ["up1"]
    clock.advance(59)
    assert served(gw, [a, b], 1) == ["up1"]
    clock.advance(2)
    assert served(gw, [a, b], 1) == ["up0"]
    assert len(a.received) == 2


@pytest.mark.parametrize(("provider_period", "back_after"), [(5, 6), (0, 0)])
def test_provider_cooldown_period_overrides_the_global_one_and_zero_disables(
        make_upstream, make_gateway, provider_period: float, back_after: float) -> None:
    a, b = make_upstream(), make_upstream()
    config = cooling_config(a, b, period=300)
    config["providers"][0]["preferences"]["cooldown_period"] = provider_period
    gw, clock = start(make_gateway, config)
    a.enqueue(fail(500))
    assert post(gw).status_code == 200
    if back_after:
        assert served(gw, [a, b], 1) == ["up1"]
    clock.advance(back_after)
    assert served(gw, [a, b], 1) == ["up0"]


def test_aliases_of_one_upstream_model_cool_down_together(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = cooling_config(a, b)
    for provider in config["providers"]:
        provider["model"] = [{"up-x": "alias-1"}, {"up-x": "alias-2"}, {"up-y": "other"}]
    gw, _ = start(make_gateway, config)
    a.enqueue(fail(500))
    assert post(gw, model="alias-1").status_code == 200
    assert served(gw, [a, b], 1, model="alias-2") == ["up1"]
    assert served(gw, [a, b], 1, model="other") == ["up0"]


def test_client_errors_and_client_disconnects_never_cool_a_channel(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    gw, _ = start(make_gateway, cooling_config(a, b))
    a.enqueue(fail(400, "bad temperature"))
    assert post(gw).status_code == 400
    assert served(gw, [a, b], 1) == ["up0"]
    a.enqueue(delay=3, json=completion("late"))
    with pytest.raises(httpx.ReadTimeout):
        post(gw, timeout=0.3)
    assert a.wait_cancelled(1, timeout=3)
    assert served(gw, [a, b], 1) == ["up0"]
    assert not b.received


def test_when_every_channel_is_cooling_the_one_ready_soonest_is_tried(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = cooling_config(a, b)
    config["providers"][0]["preferences"]["cooldown_period"] = 100
    config["providers"][1]["preferences"]["cooldown_period"] = 50
    gw, clock = start(make_gateway, config)
    a.enqueue(fail(500))
    b.enqueue(fail(500))
    assert post(gw).status_code == 502
    clock.advance(10)
    assert served(gw, [a, b], 1) == ["up1"]  # b is ready at 50 s, a at 100 s: b, rule order notwithstanding
    assert served(gw, [a, b], 1) == ["up1"]  # its success ended b's cooldown; a is still cooling


def test_channel_whose_only_key_failed_is_cooled_like_any_failed_channel(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    gw, clock = start(make_gateway, cooling_config(a, b))
    a.enqueue(fail(401, "invalid key"))
    assert post(gw).status_code == 200
    assert served(gw, [a, b], 1) == ["up1"]
    clock.advance(61)
    assert served(gw, [a, b], 1) == ["up0"]


# --- 5. Rate limits ---


def test_200_concurrent_requests_against_100_per_minute_let_exactly_100_through(upstream: FakeUpstream,
                                                                                make_gateway) -> None:
    gw, _ = start(make_gateway, simple_config(upstream, rate_limit="100/min"))

    async def one(http: aiohttp.ClientSession) -> tuple[int, str | None, Any]:
        async with http.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": USER},
                             headers={"Authorization": "Bearer sk-client"}) as response:
            return response.status, response.headers.get("Retry-After"), await response.json()

    async def burst() -> list[tuple[int, str | None, Any]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            return await asyncio.gather(*(one(http) for _ in range(200)))

    answers = asyncio.run(burst())
    assert Counter(status for status, _, _ in answers) == {200: 100, 429: 100}
    assert len(upstream.received) == 100
    for _, retry_after, body in (a for a in answers if a[0] == 429):
        assert retry_after == "60"  # whole seconds; the fake clock stands still
        assert body["error"]["code"] == "rate_limit_exceeded"


def test_rate_limit_lists_apply_every_window(upstream: FakeUpstream, make_gateway) -> None:
    gw, clock = start(make_gateway, simple_config(upstream, rate_limit="2/min,3/hour"))
    assert [post(gw).status_code for _ in range(3)] == [200, 200, 429]
    clock.advance(60)
    assert post(gw).status_code == 200
    refused = post(gw)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == str(3600 - 60)
    assert len(upstream.received) == 3


def test_per_model_rate_limits_match_exact_then_longest_prefix_then_default(upstream: FakeUpstream,
                                                                            make_gateway) -> None:
    models = ["gpt-4o", "gpt-4o-mini", "gpt-4o-mini-tts", "o1", "o3"]
    limits = {"gpt-4o": "1/min", "gpt-4o-mini": "2/min", "default": "1/min"}
    gw, _ = start(make_gateway, simple_config(upstream, models=models, rate_limit=limits))
    asked = ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini-tts", "gpt-4o-mini", "o1", "o3"]
    assert [post(gw, model=m).status_code for m in asked] == [200, 429, 200, 200, 429, 200, 429]


def test_global_rate_limit_counts_per_key_for_keys_without_their_own(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream)
    config["preferences"] = {"rate_limit": "1/min"}
    config["api_keys"] += [{"api": "sk-second"}, {"api": "sk-own", "preferences": {"rate_limit": "3/min"}}]
    gw, _ = start(make_gateway, config)
    assert [post(gw).status_code for _ in range(2)] == [200, 429]
    assert [post(gw, key="sk-second").status_code for _ in range(2)] == [200, 429]
    assert [post(gw, key="sk-own").status_code for _ in range(4)] == [200, 200, 200, 429]


# --- 6. Timeouts ---


def timeout_config(a: FakeUpstream, b: FakeUpstream, model: str, provider: Any, global_: Any) -> dict[str, Any]:
    config = simple_config(a, b, models=[model])
    if provider is not None:
        config["providers"][0]["preferences"]["model_timeout"] = provider
    if global_ is not None:
        config["preferences"] = {"model_timeout": global_}
    return config


@pytest.mark.parametrize(("model", "provider", "global_", "times_out"), [
    ("gpt-4o", {"gpt-4o": 0.2, "default": 3}, None, True),  # channel model before channel default
    ("gpt-4o", {"default": 0.2}, {"gpt-4o": 3}, True),  # channel default before global model
    ("gpt-4o", {"gpt-4o": 3}, {"gpt-4o": 0.2}, False),  # channel model before global model
    ("gpt-4o", None, {"gpt-4o": 0.2, "default": 3}, True),  # global model before global default
    ("gpt-4o", None, {"default": 0.2}, True),  # global default
    ("gpt-4o-mini", None, {"gpt-4": 0.2, "gpt-4o": 3}, False),  # exact name, else the longest prefix
    ("gpt-4-turbo", None, {"gpt-4": 0.2, "gpt-4o": 3}, True),
])
def test_model_timeout_is_resolved_channel_model_channel_default_global_model_global_default(
        make_upstream, make_gateway, model: str, provider: Any, global_: Any, times_out: bool) -> None:
    a, b = make_upstream(), make_upstream()
    a.enqueue(delay=0.4, json=completion("slow"))
    gw = make_gateway(timeout_config(a, b, model, provider, global_))
    answer = post(gw, model=model).json()["choices"][0]["message"]["content"]
    assert answer == ("echo: hi" if times_out else "slow")
    assert len(b.received) == (1 if times_out else 0)


def test_env_timeout_is_the_last_fallback_and_defaults_to_100_seconds(make_upstream, server_loop, tmp_path,
                                                                      monkeypatch) -> None:
    a, b = make_upstream(), make_upstream()
    path = tmp_path / "api.yaml"
    path.write_text(to_yaml(simple_config(a, b)))
    monkeypatch.delenv("TIMEOUT", raising=False)
    assert uni_api.load_config(str(path)).default_timeout == 100
    monkeypatch.setenv("TIMEOUT", "0.2")
    gw = GatewayServer(server_loop, uni_api.load_config(str(path)))
    gw.start()
    try:
        a.enqueue(delay=0.4, json=completion("slow"))
        assert post(gw).json()["choices"][0]["message"]["content"] == "echo: hi"
    finally:
        gw.stop()


def test_attempt_timing_out_before_its_first_byte_goes_to_the_next_channel(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = simple_config(a, b)
    config["preferences"] = {"model_timeout": 0.3}
    a.enqueue(delay=5, json=completion("late"))
    gw = make_gateway(config)
    started = time.monotonic()
    assert post(gw).json()["choices"][0]["message"]["content"] == "echo: hi"
    assert time.monotonic() - started < 1.5 and len(b.received) == 1


def test_stream_stalling_before_its_first_chunk_goes_to_the_next_channel(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = simple_config(a, b)
    config["preferences"] = {"model_timeout": 0.3}
    a.enqueue(sse=chunks(["never"]), stall_after=0)
    b.enqueue(sse=chunks(["from ", "b"]))
    gw = make_gateway(config)
    stream = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "from b"


def test_stream_stalling_after_its_first_chunk_ends_with_an_error_chunk_instead_of_failing_over(
        make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = simple_config(a, b)
    config["preferences"] = {"model_timeout": 0.2}
    a.enqueue(sse=chunks(["a", "b"]), stall_after=2)
    gw = make_gateway(config)
    events = [line[6:] for line in post(gw, stream=True).text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "timed out after 0.2s" in events[-2]
    assert not b.received


def test_stream_that_answered_in_time_is_not_cut_by_the_request_cap(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = simple_config(a, b)
    config["preferences"] = {"model_timeout": 0.2, "request_timeout": 0.3}
    a.enqueue(delay=5, json=completion("late"))
    # the first output comes at once (no role chunk first); the gaps after it are under the channel's timeout and
    # longer than the time the request had left
    b.enqueue(sse=chunks(["x", "y"])[1:], chunk_delay=0.15)
    gw = make_gateway(config)
    stream = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "xy"


def test_failover_stops_at_twice_the_first_timeout_by_default(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(3)]
    config = simple_config(*ups)
    config["preferences"] = {"model_timeout": 0.2}
    for u in ups[:2]:
        u.enqueue(delay=5, json=completion("late"))
    gw = make_gateway(config)
    started = time.monotonic()
    response = post(gw)
    elapsed = time.monotonic() - started
    assert response.status_code == 504 and error_of(response)["code"] == "all_channels_failed"
    assert 0.38 < elapsed < 1.0
    assert [len(u.received) for u in ups] == [1, 1, 0]
    message = error_of(response)["message"]
    assert "up0/gpt-4o: 504 timed out after 0.2s" in message and "up1/gpt-4o: 504 timed out after" in message


def test_request_timeout_preference_caps_the_whole_request(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(3)]
    config = simple_config(*ups)
    config["preferences"] = {"model_timeout": 0.2, "request_timeout": 0.3}
    for u in ups[:2]:
        u.enqueue(delay=5, json=completion("late"))
    gw = make_gateway(config)
    started = time.monotonic()
    response = post(gw)
    assert response.status_code == 504 and time.monotonic() - started < 0.8
    assert [len(u.received) for u in ups] == [1, 1, 0]
    assert "the request's time limit" in error_of(response)["message"]


def test_request_timeout_zero_lets_failover_run_through_every_channel(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(3)]
    config = simple_config(*ups)
    config["preferences"] = {"model_timeout": 0.2, "request_timeout": 0}
    for u in ups[:2]:
        u.enqueue(delay=5, json=completion("late"))
    gw = make_gateway(config)
    assert post(gw).json()["choices"][0]["message"]["content"] == "echo: hi"
    assert [len(u.received) for u in ups] == [1, 1, 1]


def test_channel_cut_short_by_the_request_cap_is_not_cooled(make_upstream, make_gateway) -> None:
    ups = [make_upstream() for _ in range(3)]
    config = cooling_config(*ups)
    config["preferences"]["model_timeout"] = 0.2
    for u in ups[:2]:
        u.enqueue(delay=5, json=completion("late"))
    gw, _ = start(make_gateway, config)
    assert post(gw).status_code == 504
    assert served(gw, ups, 1) == ["up1"]  # up0 timed out on its own and cools; up1 only ran out of time


@pytest.mark.parametrize(("value", "message"), [(-1, "expected a number of seconds >= 0"),
                                                 ("soon", "expected a number, got a string")])
def test_bad_request_timeout_is_a_config_error_naming_the_key(value: Any, message: str) -> None:
    text = f"providers:\n  - provider: p\n    base_url: http://x/v1/chat/completions\n    model: [m]\n" \
           f"api_keys:\n  - api: sk-k\npreferences:\n  request_timeout: {value}\n"
    with pytest.raises(uni_api.ConfigError) as caught:
        uni_api.parse_config(text, "api.yaml")
    assert str(caught.value) == f"api.yaml:8: preferences.request_timeout: {message}"


# --- 7. error_triggers ---


def trigger_config(*ups: FakeUpstream) -> dict[str, Any]:
    config = simple_config(*ups)
    config["preferences"] = {"error_triggers": ["usage is covered by the developer"]}
    return config


def test_error_trigger_in_a_non_stream_body_tries_the_next_channel(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    a.enqueue(json=completion(TRIGGER))
    gw = make_gateway(trigger_config(a, b))
    assert post(gw).json()["choices"][0]["message"]["content"] == "echo: hi"
    assert (len(a.received), len(b.received)) == (1, 1)


def _trigger_first(events: list[Any]) -> list[Any]:
    events[0]["choices"][0]["delta"]["content"] = TRIGGER
    return events


@pytest.mark.parametrize("events", [
    _trigger_first(chunks(["later"])),  # in the first chunk
    chunks(["The bot's usage ", "is covered ", "by the developer", " and more"]),  # split over the first chunks
], ids=["first-chunk", "split-over-chunks"])
def test_error_trigger_early_in_a_stream_tries_the_next_channel(make_upstream, make_gateway,
                                                                  events: list[Any]) -> None:
    a, b = make_upstream(), make_upstream()
    a.enqueue(sse=events)
    gw = make_gateway(trigger_config(a, b))
    stream = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: hi"
    assert (len(a.received), len(b.received)) == (1, 1)


def test_error_trigger_in_a_messages_stream_tries_the_next_channel(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    a.enqueue(sse=chunks(["", TRIGGER]))
    gw = make_gateway(trigger_config(a, b))
    response = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": "sk-client"}, timeout=10, json={
        "model": "gpt-4o", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    deltas = [json.loads(line[6:])["delta"] for line in response.text.splitlines() if "text_delta" in line]
    assert response.status_code == 200 and "".join(delta["text"] for delta in deltas) == "echo: hi"
    assert (len(a.received), len(b.received)) == (1, 1)


def test_a_stream_without_triggers_commits_at_its_first_output_not_its_role_chunk(make_upstream,
                                                                                  make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    a.enqueue(raw_chunks=[b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":'
                          b'[{"index":0,"delta":{"role":"assistant"},"logprobs":null,"finish_reason":null}]}\n\n'])
    gw = make_gateway(simple_config(a, b))
    stream = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: hi"
    assert (len(a.received), len(b.received)) == (1, 1)


# --- 8. One log line per attempt ---


def test_each_attempt_logs_one_line_with_its_outcome_and_never_a_provider_key(make_upstream, make_gateway,
                                                                              caplog) -> None:
    a, b = make_upstream(), make_upstream()
    config = with_keys(simple_config(a, b, models=[{"up-model-a": "gpt-4o"}]), 0, ["alpha-one", "alpha-two"],
                       api_key_schedule_algorithm="fixed_priority")
    config["providers"][1]["api"] = "beta-only"
    a.enqueue(fail(401, "Incorrect API key provided: alpha-one"))
    a.enqueue(fail(500, "internal error near alpha-two"))
    gw = make_gateway(config)
    caplog.set_level(logging.INFO, logger="uni_api")
    assert post(gw).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "uni_api" and r.getMessage().startswith("attempt")]
    assert len(lines) == 3
    expected = [("up0", "up-model-a", 0, 401), ("up0", "up-model-a", 1, 500), ("up1", "up-model-a", 0, 200)]
    for line, (provider, model, index, status) in zip(lines, expected, strict=True):
        assert f"provider={provider} model={model} key_index={index} status={status} ms=" in line
    assert "moving on: Incorrect API key provided: [redacted]" in lines[0]
    assert "moving on: internal error near [redacted]" in lines[1]
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert not any(secret in text for secret in ("alpha-one", "alpha-two", "beta-only"))
