"""Per-API-key rate limits: requests per minute and tokens per minute, as token buckets.

Each limited key has a bucket per unit that holds at most one minute's allowance and refills
continuously (limit / 60 per second), so a key may burst up to its per-minute limit and then
runs at its average rate. A request is charged its prompt tokens plus its `max_tokens` when it
is admitted (what it may cost; OpenAI counts the same way), and both buckets must have room, or
nothing is charged and the caller learns how long until they would. A limit of 0 means none.

Pure policy: the caller passes `now_s`. Memory is one small record per limited key that has been
seen, bounded by the number of keys in the store.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

_SECONDS_PER_MINUTE = 60.0


@dataclass(frozen=True)
class KeyLimits:
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute <= 0 and self.tokens_per_minute <= 0


@dataclass(frozen=True)
class Admission:
    admitted: bool
    retry_after_s: float = 0.0       # meaningful when refused and `never` is False
    reason: str = ""
    never: bool = False              # the request alone exceeds a per-minute limit


@dataclass
class _Bucket:
    level: float
    at_s: float

    def refill(self, limit_per_minute: int, now_s: float) -> None:
        rate = limit_per_minute / _SECONDS_PER_MINUTE
        self.level = min(float(limit_per_minute), self.level + max(0.0, now_s - self.at_s) * rate)
        self.at_s = now_s

    def wait_s(self, need: float, limit_per_minute: int) -> float:
        return max(0.0, need - self.level) * _SECONDS_PER_MINUTE / limit_per_minute


@dataclass
class _KeyState:
    requests: _Bucket
    tokens: _Bucket


@dataclass
class RateLimiter:
    _keys: dict[str, _KeyState] = field(default_factory=dict)

    def admit(self, key: str, limits: KeyLimits, num_tokens: int, now_s: float) -> Admission:
        """Charge one request of `num_tokens` to `key` if both its buckets have room."""
        if limits.unlimited:
            return Admission(True)
        checks = [(limit, need, unit) for limit, need, unit in (
            (limits.requests_per_minute, 1, "requests"), (limits.tokens_per_minute, num_tokens, "tokens"))
            if limit > 0]
        for limit, need, unit in checks:
            if need > limit:
                return Admission(False, reason=f"this request needs {need} {unit}, more than the key's limit "
                                               f"of {limit} {unit} per minute", never=True)
        state = self._state(key, limits, now_s)
        buckets = {"requests": state.requests, "tokens": state.tokens}
        waits = []
        for limit, need, unit in checks:
            bucket = buckets[unit]
            bucket.refill(limit, now_s)
            if bucket.level < need:
                waits.append((bucket.wait_s(need, limit), f"{limit} {unit} per minute"))
        if waits:
            wait_s, what = max(waits)
            return Admission(False, retry_after_s=wait_s, reason=f"rate limit of {what} reached for this key")
        for _, need, unit in checks:
            buckets[unit].level -= need
        return Admission(True)

    def _state(self, key: str, limits: KeyLimits, now_s: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState(_Bucket(float(limits.requests_per_minute), now_s),
                                                 _Bucket(float(limits.tokens_per_minute), now_s))
        return state


def retry_after_header(wait_s: float) -> str:
    """Whole seconds, rounded up (a client retrying at once would be refused again)."""
    return str(max(1, math.ceil(wait_s)))
