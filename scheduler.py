"""Channel ordering, provider-key rotation, cooldowns and sliding-window rate limits for uni-api.

Pure: no HTTP, asyncio, env or wall clock. The clock and RNG are injected into `Scheduler`, whose
methods are plain `def`s so each call is atomic on the event loop. Strategies are table entries.
Imports nothing from our own modules; `uni_api.py` builds the records here from api.yaml.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Generic, Literal, TypeVar

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
Strategy = Literal["fixed_priority", "round_robin", "weighted_round_robin", "lottery", "random"]
KeyStrategy = Literal["round_robin", "random", "fixed_priority"]

# --- Rate limits ---

_DAY: Final = 86_400.0
UNIT_SECONDS: Final[Mapping[str, float]] = MappingProxyType({
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3_600.0),
    **dict.fromkeys(("d", "day", "days"), _DAY),
    **dict.fromkeys(("mo", "month", "months"), 30 * _DAY),
    **dict.fromkeys(("y", "yr", "year", "years"), 365 * _DAY),
})
_RATE_ITEM: Final = re.compile(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RateLimit:
    count: int
    window_s: float


def parse_rate_limits(text: str) -> tuple[RateLimit, ...]:
    """Parse `15/min`, `15/min,1000/day` or `100/5min`; raise ValueError on anything else."""
    return tuple(_parse_rate_item(item, text) for item in text.split(","))


def _parse_rate_item(item: str, text: str) -> RateLimit:
    match = _RATE_ITEM.fullmatch(item)
    unit = match[3].lower() if match is not None else ""
    if match is None or unit not in UNIT_SECONDS:
        raise _rate_error(text)
    count, multiple = int(match[1]), int(match[2] or 1)
    if count < 1 or multiple < 1:
        raise _rate_error(text)
    return RateLimit(count, multiple * UNIT_SECONDS[unit])


def _rate_error(text: str) -> ValueError:
    return ValueError(f"expected a rate limit like 15/min or 15/min,1000/day, got {text!r}")


# --- Per-model tables ---


@dataclass(frozen=True, slots=True)
class ModelTable(Generic[T]):
    """Per-model values: exact name first, then the longest entry that is a prefix, then `default`."""

    entries: Mapping[str, T]
    default: T | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))

    def __hash__(self) -> int:  # a mappingproxy is unhashable; records holding a table stay hashable
        return hash((tuple(self.entries.items()), self.default))

    @classmethod
    def from_mapping(cls, values: Mapping[str, T]) -> ModelTable[T]:
        """Build from a config map whose optional `default` key is the fallback value."""
        entries = {name: value for name, value in values.items() if name != "default"}
        return cls(entries, values.get("default"))

    def match(self, model: str) -> tuple[str, T] | None:
        if model in self.entries:
            return model, self.entries[model]
        prefixes = [name for name in self.entries if model.startswith(name)]
        if not prefixes:
            return None
        name = max(prefixes, key=len)
        return name, self.entries[name]

    def lookup(self, model: str) -> tuple[str, T] | None:
        found = self.match(model)
        if found is None and self.default is not None:
            return "default", self.default
        return found


def resolve_timeout(
    model: str, provider: ModelTable[float] | None, global_: ModelTable[float] | None, fallback: float
) -> float:
    """Provider model match, provider default, global model match, global default, then `fallback`."""
    for table in (provider, global_):
        found = table.lookup(model) if table is not None else None
        if found is not None:
            return found[1]
    return fallback


# --- Records ---


@dataclass(frozen=True, slots=True)
class Channel:
    """Identity of a (provider, model) pair; mutable status lives in Scheduler."""

    provider: str
    model: str
    upstream_model: str
    engine: str = "gpt"
    weight: int = 0
    cooldown_s: float = 0.0


@dataclass(frozen=True, slots=True)
class KeyPool:
    provider: str
    size: int
    strategy: KeyStrategy = "round_robin"
    cooldown_s: float = 0.0
    rate_limits: ModelTable[tuple[RateLimit, ...]] | None = None


@dataclass(slots=True)
class _Rotation:
    """Per (client, model) strategy state: a round-robin cursor and smooth-WRR current weights."""

    used: float
    cursor: int = 0
    current: dict[Channel, int] = field(default_factory=dict)


# --- Strategies ---

OrderFn = Callable[[Sequence[Channel], _Rotation, random.Random], list[Channel]]
KeyOrderFn = Callable[[int, int, random.Random], list[int]]


def _weights(channels: Sequence[Channel]) -> list[int] | None:
    """Weights with a missing one counted as 1, or None when no channel has a weight."""
    if all(channel.weight <= 0 for channel in channels):
        return None
    return [max(channel.weight, 1) for channel in channels]


def _first_then_rest(channels: Sequence[Channel], first: Channel) -> list[Channel]:
    return [first, *(channel for channel in channels if channel is not first)]


def _fixed_priority(channels: Sequence[Channel], rotation: _Rotation, rng: random.Random) -> list[Channel]:
    return list(channels)


def _round_robin(channels: Sequence[Channel], rotation: _Rotation, rng: random.Random) -> list[Channel]:
    start = rotation.cursor % len(channels)
    rotation.cursor = start + 1
    return [*channels[start:], *channels[:start]]


def _weighted_round_robin(
    channels: Sequence[Channel], rotation: _Rotation, rng: random.Random
) -> list[Channel]:
    """nginx's smooth weighted round robin: exact shares per cycle, interleaved rather than in bursts."""
    weights = _weights(channels)
    if weights is None:
        return _round_robin(channels, rotation, rng)
    # Rebuilt each call, so channels that left the list (cooling, reconfigured) drop their state.
    pairs = zip(channels, weights, strict=True)
    current = {channel: rotation.current.get(channel, 0) + weight for channel, weight in pairs}
    best = max(channels, key=current.__getitem__)
    current[best] -= sum(weights)
    rotation.current = current
    return _first_then_rest(channels, best)


def _lottery(channels: Sequence[Channel], rotation: _Rotation, rng: random.Random) -> list[Channel]:
    weights = _weights(channels)
    if weights is None:
        return _round_robin(channels, rotation, rng)
    first = rng.choices(channels, weights=weights)[0]
    return _first_then_rest(channels, first)


def _random(channels: Sequence[Channel], rotation: _Rotation, rng: random.Random) -> list[Channel]:
    return rng.sample(channels, len(channels))


STRATEGIES: Final[Mapping[Strategy, OrderFn]] = MappingProxyType({
    "fixed_priority": _fixed_priority,
    "round_robin": _round_robin,
    "weighted_round_robin": _weighted_round_robin,
    "lottery": _lottery,
    "random": _random,
})

KEY_STRATEGIES: Final[Mapping[KeyStrategy, KeyOrderFn]] = MappingProxyType({
    "round_robin": lambda size, cursor, rng: [*range(cursor % size, size), *range(cursor % size)],
    "random": lambda size, cursor, rng: rng.sample(range(size), size),
    "fixed_priority": lambda size, cursor, rng: list(range(size)),
})

# --- Scheduler ---

_SWEEP_EVERY_S: Final = 60.0  # how often stale windows, cooldowns and idle rotations are dropped
_ROTATION_IDLE_S: Final = 3_600.0  # an idle cursor is forgotten; rotation restarts at the first channel
WindowKey = tuple[tuple[str, ...], str, RateLimit]  # (owner, matched entry name, limit)


def _expire(window: deque[float], window_s: float, now: float) -> None:
    while window and window[0] <= now - window_s:
        window.popleft()


def _wait_s(window: deque[float], limit: RateLimit, now: float) -> float:
    """Seconds until `window` has room for one more call (0 when it has room now)."""
    _expire(window, limit.window_s, now)
    if len(window) < limit.count:
        return 0.0
    return window[-limit.count] + limit.window_s - now


class Scheduler:
    """Runtime state of scheduling: cursors, cooldowns, benched keys and rate windows."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None
    ) -> None:
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._rotations: dict[tuple[str, str], _Rotation] = {}
        self._cool_until: dict[tuple[str, str], tuple[float, Channel]] = {}
        self._benched_until: dict[tuple[str, int], float] = {}
        self._key_cursor: dict[str, int] = {}
        self._windows: dict[WindowKey, deque[float]] = {}
        self._next_sweep = -math.inf

    # Rate limits

    def admit(self, client: str, model: str, limits: ModelTable[tuple[RateLimit, ...]] | None) -> int:
        """Record one request of `client` for `model`: 0 when admitted, else seconds until a slot frees."""
        now = self._now()
        found = limits.lookup(model) if limits is not None else None
        if found is None:
            return 0
        return self._take(("client", client), found, now)

    def _take(self, owner: tuple[str, ...], found: tuple[str, tuple[RateLimit, ...]], now: float) -> int:
        """Atomic check-and-record against every limit of `found`; records nothing when any is full."""
        entry, limits = found
        windows = [(self._windows.setdefault((owner, entry, limit), deque()), limit) for limit in limits]
        wait = max((_wait_s(window, limit, now) for window, limit in windows), default=0.0)
        if wait > 0:
            return max(1, math.ceil(wait))
        for window, _ in windows:
            window.append(now)
        return 0

    # Channels

    def plan(self, client: str, channels: Sequence[Channel], strategy: Strategy) -> list[Channel]:
        """Order `channels` for one request; cooling ones are left out unless all are cooling."""
        now = self._now()
        if not channels:
            return []
        ready = [channel for channel in channels if self._cooling_until(channel) <= now]
        if not ready:
            return [min(channels, key=self._cooling_until)]
        rotation = self._rotations.setdefault((client, channels[0].model), _Rotation(now))
        rotation.used = now
        return STRATEGIES[strategy](ready, rotation, self._rng)

    def record_success(self, channel: Channel) -> bool:
        """End the channel's cooldown; True when it had one (shared state then clears it for everyone)."""
        return self._cool_until.pop((channel.provider, channel.upstream_model), None) is not None

    def record_failure(self, channel: Channel) -> None:
        if channel.cooldown_s <= 0:
            return
        until = self._now() + channel.cooldown_s
        if until > self._cooling_until(channel):
            self._cool_until[channel.provider, channel.upstream_model] = (until, channel)

    def cooling(self) -> list[Channel]:
        """Channels currently cooling down (for metrics)."""
        now = self._now()
        return [channel for until, channel in self._cool_until.values() if until > now]

    def _cooling_until(self, channel: Channel) -> float:
        # Keyed by upstream model, so every alias of a failing upstream model cools down together.
        return self._cool_until.get((channel.provider, channel.upstream_model), (-math.inf, channel))[0]

    # Provider keys

    def acquire_key(self, pool: KeyPool, model: str, exclude: Collection[int] = ()) -> int | None:
        """Next usable key index by `pool.strategy`, recording its use; None when every key is unusable."""
        now = self._now()
        found = pool.rate_limits.lookup(model) if pool.rate_limits is not None else None
        for index in self._key_order(pool, exclude, now):
            if found is None or self._take(("key", pool.provider, str(index)), found, now) == 0:
                self.key_taken(pool, index)
                return index
        return None

    def key_order(self, pool: KeyPool, exclude: Collection[int] = ()) -> list[int]:
        """The key indexes `acquire_key` would try, in order, leaving out excluded and benched ones; records
        nothing. Shared state takes the first one whose shared rate windows have room, then calls `key_taken`."""
        return self._key_order(pool, exclude, self._now())

    def _key_order(self, pool: KeyPool, exclude: Collection[int], now: float) -> list[int]:
        if pool.size <= 0:
            return []
        order = KEY_STRATEGIES[pool.strategy](pool.size, self._key_cursor.get(pool.provider, 0), self._rng)
        benched = self._benched_until
        return [i for i in order if i not in exclude and benched.get((pool.provider, i), -math.inf) <= now]

    def key_taken(self, pool: KeyPool, index: int) -> None:
        """Move the pool's rotation past `index`, the key just used."""
        self._key_cursor[pool.provider] = index + 1

    def record_key_failure(self, pool: KeyPool, index: int, retry_after: float | None = None) -> None:
        """Bench the key for the longer of `pool.cooldown_s` and the upstream's Retry-After."""
        period = max(pool.cooldown_s, retry_after or 0.0)
        if period <= 0:
            return
        key = (pool.provider, index)
        self._benched_until[key] = max(self._benched_until.get(key, -math.inf), self._now() + period)

    # State kept elsewhere (uni_api.py's SharedState reads it from Redis and hands it over here)

    def adopt_cooldowns(self, remaining: Mapping[Channel, float]) -> None:
        """Each channel cools for its remaining seconds from now, or not at all when 0; replaces what was here."""
        now = self._now()
        for channel, seconds in remaining.items():
            if seconds > 0:
                self._cool_until[channel.provider, channel.upstream_model] = (now + seconds, channel)
            else:
                self._cool_until.pop((channel.provider, channel.upstream_model), None)

    def adopt_benches(self, provider: str, remaining: Sequence[float]) -> None:
        """Key `i` of `provider` is benched for `remaining[i]` seconds from now, or not at all when 0."""
        now = self._now()
        for index, seconds in enumerate(remaining):
            if seconds > 0:
                self._benched_until[provider, index] = now + seconds
            else:
                self._benched_until.pop((provider, index), None)

    # Housekeeping

    def state_size(self) -> int:
        """Number of entries held in the state maps; stays bounded in a long-running process."""
        maps: tuple[Sized, ...] = (
            self._rotations, self._cool_until, self._benched_until, self._key_cursor, self._windows,
        )
        return sum(len(state) for state in maps)

    def _now(self) -> float:
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_EVERY_S
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        """Drop expired cooldowns and benches, emptied rate windows and idle rotations."""
        for window_key, window in list(self._windows.items()):
            _expire(window, window_key[2].window_s, now)
            if not window:
                del self._windows[window_key]
        _drop(self._cool_until, lambda value: value[0] <= now)
        _drop(self._benched_until, lambda until: until <= now)
        _drop(self._rotations, lambda rotation: rotation.used <= now - _ROTATION_IDLE_S)


def _drop(state: dict[K, V], stale: Callable[[V], bool]) -> None:
    for key in [key for key, value in state.items() if stale(value)]:
        del state[key]
