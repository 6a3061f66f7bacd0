"""scheduler.py alone: pure functions and the Scheduler object on a FakeClock and a seeded Random, no gateway, no
network (test_scheduling_through_gateway.py drives the same behaviour end to end)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from types import MappingProxyType

import pytest
from conftest import FakeClock

from scheduler import (
    KEY_STRATEGIES,
    STRATEGIES,
    Channel,
    KeyPool,
    ModelTable,
    RateLimit,
    Scheduler,
    Strategy,
    parse_rate_limits,
    resolve_timeout,
)

DAY = 86_400.0


A = Channel("alpha", "gpt-4o", "gpt-4o", weight=5, cooldown_s=30)
B = Channel("beta", "gpt-4o", "gpt-4o", weight=3, cooldown_s=30)
C = Channel("gamma", "gpt-4o", "gpt-4o", weight=2, cooldown_s=30)
PLAIN = [Channel(name, "gpt-4o", "gpt-4o", cooldown_s=30) for name in ("p0", "p1", "p2")]


def make(clock: FakeClock | None = None, seed: int = 0) -> tuple[Scheduler, FakeClock]:
    clock = clock or FakeClock()
    return Scheduler(clock=clock, rng=random.Random(seed)), clock


def limits(text: str) -> ModelTable[tuple[RateLimit, ...]]:
    return ModelTable({}, default=parse_rate_limits(text))


def firsts(
    scheduler: Scheduler, channels: list[Channel], strategy: Strategy, n: int, client: str = "k"
) -> list[str]:
    """Provider of the first channel of `n` successive plans."""
    return [scheduler.plan(client, channels, strategy)[0].provider for _ in range(n)]


# --- Tables ---


def test_strategy_tables_are_read_only_and_complete() -> None:
    assert isinstance(STRATEGIES, MappingProxyType)
    assert isinstance(KEY_STRATEGIES, MappingProxyType)
    assert set(STRATEGIES) == {"fixed_priority", "round_robin", "weighted_round_robin", "lottery", "random"}
    assert set(KEY_STRATEGIES) == {"round_robin", "random", "fixed_priority"}


# --- Channel strategies ---


def test_fixed_priority_always_keeps_rule_order() -> None:
    scheduler, _ = make()
    for _ in range(5):
        assert scheduler.plan("k", [A, B, C], "fixed_priority") == [A, B, C]


def test_round_robin_rotates_the_starting_channel() -> None:
    scheduler, _ = make()
    plans = [scheduler.plan("k", PLAIN, "round_robin") for _ in range(4)]
    assert plans == [PLAIN, [*PLAIN[1:], PLAIN[0]], [PLAIN[2], *PLAIN[:2]], PLAIN]


def test_round_robin_cursor_is_independent_per_client_and_model() -> None:
    scheduler, _ = make()
    other_model = [Channel(c.provider, "claude", "claude") for c in PLAIN]
    assert firsts(scheduler, PLAIN, "round_robin", 2, client="k1") == ["p0", "p1"]
    assert firsts(scheduler, PLAIN, "round_robin", 1, client="k2") == ["p0"]
    assert firsts(scheduler, other_model, "round_robin", 1, client="k1") == ["p0"]
    assert firsts(scheduler, PLAIN, "round_robin", 1, client="k1") == ["p2"]


def test_weighted_round_robin_gives_exact_shares_interleaved() -> None:
    scheduler, _ = make()
    picks = firsts(scheduler, [A, B, C], "weighted_round_robin", 10)
    assert Counter(picks) == {"alpha": 5, "beta": 3, "gamma": 2}
    assert picks == ["alpha", "beta", "gamma", "alpha", "alpha", "beta", "alpha", "gamma", "beta", "alpha"]


def test_weighted_round_robin_never_bursts_over_many_cycles() -> None:
    scheduler, _ = make()
    picks = firsts(scheduler, [A, B, C], "weighted_round_robin", 1_000)
    assert Counter(picks) == {"alpha": 500, "beta": 300, "gamma": 200}
    assert max(len(list(run)) for _, run in itertools.groupby(picks)) <= 2


def test_weighted_round_robin_keeps_the_rest_as_fallback_in_rule_order() -> None:
    scheduler, _ = make()
    plans = [scheduler.plan("k", [A, B, C], "weighted_round_robin") for _ in range(3)]
    assert plans == [[A, B, C], [B, A, C], [C, A, B]]


def test_weighted_round_robin_without_weights_behaves_like_round_robin() -> None:
    scheduler, _ = make()
    assert firsts(scheduler, PLAIN, "weighted_round_robin", 4) == ["p0", "p1", "p2", "p0"]


def test_weighted_round_robin_counts_a_missing_weight_as_one() -> None:
    scheduler, _ = make()
    unweighted = Channel("delta", "gpt-4o", "gpt-4o")
    picks = firsts(scheduler, [A, unweighted], "weighted_round_robin", 12)
    assert Counter(picks) == {"alpha": 10, "delta": 2}


def test_lottery_respects_weights_with_seeded_rng() -> None:
    scheduler, _ = make(seed=42)
    counts = Counter(firsts(scheduler, [A, B, C], "lottery", 10_000))
    for name, share in (("alpha", 0.5), ("beta", 0.3), ("gamma", 0.2)):
        assert abs(counts[name] / 10_000 - share) < 0.02


def test_lottery_is_reproducible_with_the_same_seed() -> None:
    first, _ = make(seed=7)
    second, _ = make(seed=7)
    assert firsts(first, [A, B, C], "lottery", 50) == firsts(second, [A, B, C], "lottery", 50)


def test_lottery_returns_every_channel_once_with_the_winner_first() -> None:
    scheduler, _ = make(seed=3)
    for _ in range(20):
        plan = scheduler.plan("k", [A, B, C], "lottery")
        assert sorted(c.provider for c in plan) == ["alpha", "beta", "gamma"]
        assert plan[1:] == [c for c in [A, B, C] if c is not plan[0]]


def test_lottery_without_weights_behaves_like_round_robin() -> None:
    scheduler, _ = make()
    assert firsts(scheduler, PLAIN, "lottery", 4) == ["p0", "p1", "p2", "p0"]


def test_lottery_counts_a_missing_weight_as_one() -> None:
    scheduler, _ = make(seed=1)
    unweighted = Channel("delta", "gpt-4o", "gpt-4o")
    weighted = Channel("alpha", "gpt-4o", "gpt-4o", weight=3)
    counts = Counter(firsts(scheduler, [weighted, unweighted], "lottery", 8_000))
    assert abs(counts["delta"] / 8_000 - 0.25) < 0.02


def test_random_shuffles_with_the_injected_rng() -> None:
    scheduler, _ = make(seed=5)
    plans = [scheduler.plan("k", PLAIN, "random") for _ in range(200)]
    assert all(sorted(p, key=PLAIN.index) == PLAIN for p in plans)
    assert {p[0].provider for p in plans} == {"p0", "p1", "p2"}
    again, _ = make(seed=5)
    assert [again.plan("k", PLAIN, "random") for _ in range(200)] == plans


def test_plan_of_no_channels_is_empty() -> None:
    scheduler, _ = make()
    assert scheduler.plan("k", [], "round_robin") == []


# --- Channel cooldowns ---


def test_failed_channel_is_left_out_until_its_cooldown_expires() -> None:
    scheduler, clock = make()
    scheduler.record_failure(A)
    assert scheduler.plan("k", [A, B], "fixed_priority") == [B]
    assert scheduler.cooling() == [A]
    clock.advance(29.9)
    assert scheduler.plan("k", [A, B], "fixed_priority") == [B]
    clock.advance(0.1)
    assert scheduler.plan("k", [A, B], "fixed_priority") == [A, B]
    assert scheduler.cooling() == []


def test_failure_without_cooldown_period_is_a_no_op() -> None:
    scheduler, _ = make()
    no_cooldown = Channel("alpha", "gpt-4o", "gpt-4o")
    scheduler.record_failure(no_cooldown)
    assert scheduler.plan("k", [no_cooldown, B], "fixed_priority") == [no_cooldown, B]
    assert scheduler.cooling() == []


def test_renamed_alias_of_one_upstream_model_shares_the_cooldown() -> None:
    scheduler, _ = make()
    original = Channel("alpha", "gpt-4o", "gpt-4o-2024-08-06", cooldown_s=60)
    renamed = Channel("alpha", "my-4o", "gpt-4o-2024-08-06", cooldown_s=60)
    other_provider = Channel("beta", "my-4o", "gpt-4o-2024-08-06", cooldown_s=60)
    scheduler.record_failure(original)
    assert scheduler.plan("k", [renamed, other_provider], "fixed_priority") == [other_provider]


def test_when_every_channel_is_cooling_plan_returns_the_soonest_ready() -> None:
    scheduler, clock = make()
    long_cooldown = Channel("alpha", "gpt-4o", "gpt-4o", cooldown_s=300)
    scheduler.record_failure(long_cooldown)
    clock.advance(10)
    scheduler.record_failure(B)
    clock.advance(10)
    scheduler.record_failure(C)
    assert scheduler.plan("k", [long_cooldown, C, B], "round_robin") == [B]


def test_record_success_clears_the_cooldown() -> None:
    scheduler, _ = make()
    scheduler.record_failure(A)
    scheduler.record_success(A)
    assert scheduler.plan("k", [A, B], "fixed_priority") == [A, B]
    assert scheduler.cooling() == []


def test_strategies_only_rotate_among_channels_not_cooling() -> None:
    scheduler, _ = make()
    scheduler.record_failure(PLAIN[1])
    assert firsts(scheduler, PLAIN, "round_robin", 4) == ["p0", "p2", "p0", "p2"]


# --- Provider key pools ---


def test_key_pool_round_robin_rotates_per_provider() -> None:
    scheduler, _ = make()
    pool, other = KeyPool("alpha", 3), KeyPool("beta", 2)
    assert [scheduler.acquire_key(pool, "m") for _ in range(4)] == [0, 1, 2, 0]
    assert [scheduler.acquire_key(other, "m") for _ in range(3)] == [0, 1, 0]


def test_key_pool_fixed_priority_prefers_the_first_usable_key() -> None:
    scheduler, _ = make()
    pool = KeyPool("alpha", 3, strategy="fixed_priority")
    assert [scheduler.acquire_key(pool, "m") for _ in range(3)] == [0, 0, 0]
    assert scheduler.acquire_key(pool, "m", exclude={0}) == 1


def test_key_pool_random_uses_every_key_reproducibly() -> None:
    scheduler, _ = make(seed=11)
    pool = KeyPool("alpha", 4, strategy="random")
    picks = [scheduler.acquire_key(pool, "m") for _ in range(400)]
    assert set(picks) == {0, 1, 2, 3}
    assert all(80 <= n <= 120 for n in Counter(picks).values())
    again, _ = make(seed=11)
    assert [again.acquire_key(pool, "m") for _ in range(400)] == picks


def test_key_pool_skips_excluded_keys_and_reports_none_when_all_are_excluded() -> None:
    scheduler, _ = make()
    pool = KeyPool("alpha", 3)
    assert scheduler.acquire_key(pool, "m", exclude=[0, 1]) == 2
    assert scheduler.acquire_key(pool, "m", exclude=[0, 1, 2]) is None
    assert scheduler.acquire_key(KeyPool("empty", 0), "m") is None


def test_failed_key_is_benched_for_the_cooldown_period() -> None:
    scheduler, clock = make()
    pool = KeyPool("alpha", 2, strategy="fixed_priority", cooldown_s=60)
    scheduler.record_key_failure(pool, 0)
    assert scheduler.acquire_key(pool, "m") == 1
    clock.advance(60)
    assert scheduler.acquire_key(pool, "m") == 0


def test_key_bench_uses_retry_after_when_longer_than_the_cooldown() -> None:
    scheduler, clock = make()
    pool = KeyPool("alpha", 1, cooldown_s=60)
    scheduler.record_key_failure(pool, 0, retry_after=300)
    clock.advance(299)
    assert scheduler.acquire_key(pool, "m") is None
    clock.advance(1)
    assert scheduler.acquire_key(pool, "m") == 0


def test_key_bench_keeps_the_cooldown_when_retry_after_is_shorter() -> None:
    scheduler, clock = make()
    pool = KeyPool("alpha", 1, cooldown_s=60)
    scheduler.record_key_failure(pool, 0, retry_after=5)
    clock.advance(59)
    assert scheduler.acquire_key(pool, "m") is None


def test_key_failure_without_cooldown_or_retry_after_does_not_bench() -> None:
    scheduler, _ = make()
    pool = KeyPool("alpha", 1)
    scheduler.record_key_failure(pool, 0)
    assert scheduler.acquire_key(pool, "m") == 0


def test_key_over_its_rate_limit_is_skipped_and_records_each_use() -> None:
    scheduler, clock = make()
    pool = KeyPool("alpha", 2, strategy="fixed_priority", rate_limits=limits("2/min"))
    assert [scheduler.acquire_key(pool, "m") for _ in range(5)] == [0, 0, 1, 1, None]
    clock.advance(60)
    assert scheduler.acquire_key(pool, "m") == 0


def test_key_rate_limit_uses_the_per_model_entry() -> None:
    scheduler, _ = make()
    table = ModelTable({"gemini-1.5-pro": parse_rate_limits("1/min")}, default=parse_rate_limits("100/min"))
    pool = KeyPool("alpha", 1, rate_limits=table)
    assert scheduler.acquire_key(pool, "gemini-1.5-pro-latest") == 0
    assert scheduler.acquire_key(pool, "gemini-1.5-pro-latest") is None
    assert scheduler.acquire_key(pool, "gemini-1.5-flash") == 0


# --- Client rate limits (admit) ---


def test_admit_lets_exactly_the_limit_through_and_records_nothing_for_rejections() -> None:
    scheduler, clock = make()
    table = limits("100/min")
    results = [scheduler.admit("k", "gpt-4o", table) for _ in range(200)]
    assert results.count(0) == 100
    assert results[:100] == [0] * 100
    assert results[100:] == [60] * 100
    clock.advance(60)
    assert scheduler.admit("k", "gpt-4o", table) == 0


def test_admit_retry_after_counts_whole_seconds_until_the_oldest_call_expires() -> None:
    scheduler, clock = make()
    table = limits("2/min")
    assert scheduler.admit("k", "m", table) == 0
    clock.advance(20.5)
    assert scheduler.admit("k", "m", table) == 0
    assert scheduler.admit("k", "m", table) == 40
    clock.advance(39.2)
    assert scheduler.admit("k", "m", table) == 1
    clock.advance(0.3)
    assert scheduler.admit("k", "m", table) == 0
    assert scheduler.admit("k", "m", table) == 21


def test_admit_without_limits_always_admits() -> None:
    scheduler, _ = make()
    assert all(scheduler.admit("k", "m", None) == 0 for _ in range(1_000))
    unmatched = ModelTable({"other": parse_rate_limits("1/min")})
    assert all(scheduler.admit("k", "m", unmatched) == 0 for _ in range(5))


def test_admit_keeps_one_window_per_client_key() -> None:
    scheduler, _ = make()
    table = limits("1/min")
    assert scheduler.admit("k1", "m", table) == 0
    assert scheduler.admit("k2", "m", table) == 0
    assert scheduler.admit("k1", "m", table) == 60


def test_a_plain_default_limit_is_one_window_across_models() -> None:
    scheduler, _ = make()
    table = limits("2/min")
    assert scheduler.admit("k", "gpt-4o", table) == 0
    assert scheduler.admit("k", "claude", table) == 0
    assert scheduler.admit("k", "gemini", table) == 60


def test_day_window_frees_after_a_day() -> None:
    scheduler, clock = make()
    table = limits("3/day")
    assert [scheduler.admit("k", "m", table) for _ in range(4)] == [0, 0, 0, 86_400]
    clock.advance(DAY - 1)
    assert scheduler.admit("k", "m", table) == 1
    clock.advance(1)
    assert scheduler.admit("k", "m", table) == 0


def test_month_and_year_windows_are_30_and_365_days() -> None:
    scheduler, clock = make()
    month, year = limits("1/month"), limits("1/year")
    assert scheduler.admit("k", "m", month) == 0
    assert scheduler.admit("k", "m", month) == 30 * 86_400
    assert scheduler.admit("j", "m", year) == 0
    clock.advance(30 * DAY)
    assert scheduler.admit("k", "m", month) == 0
    assert scheduler.admit("j", "m", year) == 335 * 86_400
    clock.advance(335 * DAY)
    assert scheduler.admit("j", "m", year) == 0


def test_list_limits_apply_every_window() -> None:
    scheduler, clock = make()
    table = limits("15/min,10/day")
    results = [scheduler.admit("k", "m", table) for _ in range(12)]
    assert results[:10] == [0] * 10
    assert results[10:] == [86_400, 86_400]
    clock.advance(120)
    assert scheduler.admit("k", "m", table) == 86_400 - 120
    clock.advance(DAY)
    assert [scheduler.admit("k", "m", table) for _ in range(16)].count(0) == 10


def test_list_limit_rejection_records_nothing_in_the_other_windows() -> None:
    scheduler, clock = make()
    table = limits("2/min,3/hour")
    assert [scheduler.admit("k", "m", table) for _ in range(5)] == [0, 0, 60, 60, 60]
    clock.advance(60)
    assert [scheduler.admit("k", "m", table) for _ in range(2)] == [0, 3_540]


def test_per_model_limits_match_exact_then_longest_prefix_then_default() -> None:
    table = ModelTable.from_mapping({
        "default": parse_rate_limits("100/min"),
        "gemini-1.5-pro": parse_rate_limits("2/min"),
        "gemini-1.5-pro-002": parse_rate_limits("1/min"),
        "gemini": parse_rate_limits("50/min"),
    })
    assert table.lookup("gemini-1.5-pro-002") == ("gemini-1.5-pro-002", (RateLimit(1, 60.0),))
    assert table.lookup("gemini-1.5-pro-latest") == ("gemini-1.5-pro", (RateLimit(2, 60.0),))
    assert table.lookup("gemini-1.5-pro") == ("gemini-1.5-pro", (RateLimit(2, 60.0),))
    assert table.lookup("gemini-2.0-flash") == ("gemini", (RateLimit(50, 60.0),))
    assert table.lookup("gpt-4o") == ("default", (RateLimit(100, 60.0),))
    assert table.match("gpt-4o") is None


def test_each_per_model_entry_has_its_own_window() -> None:
    scheduler, _ = make()
    table = ModelTable.from_mapping({
        "default": parse_rate_limits("100/min"),
        "gemini-1.5-pro": parse_rate_limits("1/min"),
        "gemini-1.5-pro-002": parse_rate_limits("1/min"),
    })
    assert scheduler.admit("k", "gemini-1.5-pro-latest", table) == 0
    assert scheduler.admit("k", "gemini-1.5-pro", table) == 60
    assert scheduler.admit("k", "gemini-1.5-pro-002", table) == 0
    assert scheduler.admit("k", "gpt-4o", table) == 0


def test_model_table_is_frozen_and_copies_its_entries() -> None:
    source = {"a": 1}
    table = ModelTable(source)
    source["b"] = 2
    assert dict(table.entries) == {"a": 1}
    assert isinstance(table.entries, MappingProxyType)
    assert table.lookup("zzz") is None
    with pytest.raises(AttributeError):
        table.default = 3  # type: ignore[misc]


def test_model_tables_and_key_pools_are_hashable_records() -> None:
    table = ModelTable({"gpt-4o": parse_rate_limits("1/min")}, default=parse_rate_limits("9/min"))
    twin = ModelTable({"gpt-4o": parse_rate_limits("1/min")}, default=parse_rate_limits("9/min"))
    assert table == twin
    assert hash(table) == hash(twin)
    assert len({KeyPool("alpha", 2, rate_limits=table), KeyPool("alpha", 2, rate_limits=twin)}) == 1


# --- Parsing rate limits ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15/min", (RateLimit(15, 60.0),)),
        ("15/min,10/day", (RateLimit(15, 60.0), RateLimit(10, DAY))),
        (" 15 / min , 1000 / day ", (RateLimit(15, 60.0), RateLimit(1000, DAY))),
        ("5/s", (RateLimit(5, 1.0),)),
        ("5/second", (RateLimit(5, 1.0),)),
        ("60/hour", (RateLimit(60, 3_600.0),)),
        ("60/h", (RateLimit(60, 3_600.0),)),
        ("2/d", (RateLimit(2, DAY),)),
        ("1000/month", (RateLimit(1000, 30 * DAY),)),
        ("9999/year", (RateLimit(9999, 365 * DAY),)),
        ("100/5min", (RateLimit(100, 300.0),)),
        ("10/MIN", (RateLimit(10, 60.0),)),
    ],
)
def test_parse_rate_limits_accepts_units_lists_and_multiples(
    text: str, expected: tuple[RateLimit, ...]
) -> None:
    assert parse_rate_limits(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "abc", "10/fortnight", "0/min", "-1/min", "1.5/min", "15/min,", "15", "/min", "15/0min",
     "1/min 1/day"],
)
def test_parse_rate_limits_rejects_garbage_with_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="expected a rate limit like 15/min or 15/min,1000/day"):
        parse_rate_limits(text)


# --- Timeouts ---

PROVIDER_TIMEOUTS = ModelTable({"gpt-4o": 30.0, "o1": 300.0}, default=60.0)
GLOBAL_TIMEOUTS = ModelTable({"claude": 90.0}, default=120.0)


@pytest.mark.parametrize(
    ("model", "provider", "global_", "expected"),
    [
        ("gpt-4o", PROVIDER_TIMEOUTS, GLOBAL_TIMEOUTS, 30.0),
        ("gpt-4o-2024-08-06", PROVIDER_TIMEOUTS, GLOBAL_TIMEOUTS, 30.0),
        ("o1-preview", PROVIDER_TIMEOUTS, GLOBAL_TIMEOUTS, 300.0),
        ("claude-3-5-sonnet", PROVIDER_TIMEOUTS, GLOBAL_TIMEOUTS, 60.0),
        ("claude-3-5-sonnet", ModelTable({"gpt-4o": 30.0}), GLOBAL_TIMEOUTS, 90.0),
        ("gemini", ModelTable({"gpt-4o": 30.0}), GLOBAL_TIMEOUTS, 120.0),
        ("gemini", None, GLOBAL_TIMEOUTS, 120.0),
        ("gemini", None, ModelTable({"claude": 90.0}), 100.0),
        ("gemini", None, None, 100.0),
    ],
)
def test_resolve_timeout_falls_back_level_by_level(
    model: str, provider: ModelTable[float] | None, global_: ModelTable[float] | None, expected: float
) -> None:
    assert resolve_timeout(model, provider, global_, 100.0) == expected


# --- Bounded memory ---


def test_state_shrinks_once_windows_cooldowns_and_benches_pass() -> None:
    scheduler, clock = make()
    table = limits("5/min,10/hour")
    pool = KeyPool("alpha", 1_000, cooldown_s=30, rate_limits=limits("1/min"))
    for n in range(1_000):
        scheduler.admit(f"client-{n}", "m", table)
        scheduler.record_failure(Channel(f"p{n}", "m", "m", cooldown_s=30))
        scheduler.record_key_failure(pool, n, retry_after=90)
    scheduler.acquire_key(KeyPool("beta", 1, rate_limits=limits("1/min")), "m")
    assert scheduler.state_size() >= 4_000
    clock.advance(3_600)
    assert scheduler.admit("late", "m", table) == 0
    # Left: the two windows of "late", and the key cursor of "beta" (one per configured provider).
    assert scheduler.state_size() == 3


def test_idle_round_robin_cursors_are_forgotten_after_an_hour() -> None:
    scheduler, clock = make()
    for n in range(100):
        scheduler.plan(f"client-{n}", PLAIN, "round_robin")
    assert scheduler.state_size() == 100
    clock.advance(3_601)
    scheduler.plan("late", PLAIN, "round_robin")
    assert scheduler.state_size() == 1


def test_expired_single_call_windows_are_dropped_by_later_calls() -> None:
    scheduler, clock = make()
    table = limits("1/s")
    for second in range(600):
        clock.advance(1)
        assert scheduler.admit(f"client-{second}", "m", table) == 0
    assert scheduler.state_size() <= 61


# --- State kept elsewhere (shared state hands Redis's view over) ---


def test_adopted_cooldowns_replace_the_local_ones_and_expire_on_their_own() -> None:
    scheduler, clock = make()
    scheduler.record_failure(B)
    scheduler.adopt_cooldowns({A: 10.0, B: 0.0})  # another instance cooled A; B's cooldown ended there
    assert scheduler.plan("k", [A, B, C], "fixed_priority") == [B, C]
    clock.advance(10)
    assert scheduler.plan("k", [A, B, C], "fixed_priority") == [A, B, C]


def test_record_success_says_whether_it_ended_a_cooldown() -> None:
    scheduler, _ = make()
    scheduler.adopt_cooldowns({A: 5.0})
    assert scheduler.record_success(A) is True
    assert scheduler.record_success(A) is False


def test_adopted_benches_leave_keys_out_until_they_end() -> None:
    scheduler, clock = make()
    pool = KeyPool("p", 3, "fixed_priority")
    scheduler.adopt_benches("p", [30.0, 0.0, 5.0])
    assert scheduler.key_order(pool) == [1]
    clock.advance(5)
    assert scheduler.key_order(pool, exclude=[1]) == [2]
    scheduler.adopt_benches("p", [0.0, 0.0, 0.0])
    assert scheduler.key_order(pool) == [0, 1, 2]


def test_key_order_records_nothing_until_key_taken_moves_the_rotation() -> None:
    scheduler, _ = make()
    pool = KeyPool("p", 3, "round_robin")
    assert scheduler.key_order(pool) == scheduler.key_order(pool) == [0, 1, 2]
    scheduler.key_taken(pool, 1)
    assert scheduler.key_order(pool) == [2, 0, 1]
    assert scheduler.acquire_key(pool, "m") == 2  # acquire_key follows the same rotation
