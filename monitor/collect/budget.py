"""Client-side API budgets: Microsoft's documented per-tenant rate limits, enforced before we call.

`RedisBudget` shares the windows through Redis so ten workers never send ten times the allowed rate;
`LocalBudget` does the same in one process. Both are sliding windows (per minute and per hour).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis

from monitor.collect.progress import announce_wait


@dataclass(frozen=True)
class Limit:
    per_minute: int
    per_hour: int


# Documented limits, per app and tenant (Defender API reference pages, "Limitations").
ENDPOINT_LIMITS: dict[str, Limit] = {
    "defender:/api/machines": Limit(100, 1500),
    "defender:/api/machines/{id}": Limit(100, 1500),
    "defender:/api/machines/{id}/logonusers": Limit(100, 1500),
    "defender:/api/machines/{id}/vulnerabilities": Limit(50, 1500),
    "defender:/api/vulnerabilities": Limit(50, 1500),
    "defender:/api/vulnerabilities/machinesVulnerabilities": Limit(30, 1000),
    # advanced hunting: 45 calls/min and 1,500/hour; its CPU quota answers 429 (Retry-After)
    "defender:/api/advancedqueries/run": Limit(45, 1500),
}


class BudgetExhausted(Exception):
    """The next call would have to wait longer than the caller allows."""

    def __init__(self, endpoint: str, wait_seconds: float) -> None:
        super().__init__(f"{endpoint}: API budget exhausted for {wait_seconds:.0f}s more")
        self.endpoint = endpoint
        self.wait_seconds = wait_seconds


class Budget(Protocol):
    def acquire(self, endpoint: str, max_wait: float) -> float:
        """Take one call from the endpoint's budget, waiting if needed; returns seconds waited.

        Raises BudgetExhausted when the wait would exceed `max_wait`.
        """
        ...

    def block(self, endpoint: str, seconds: float) -> None:
        """Microsoft answered 429 with Retry-After: nobody calls `endpoint` for `seconds`."""
        ...


class _SlidingBudget:
    """Shared acquire loop: ask `_try` for the wait, sleep, ask again."""

    sleep: Callable[[float], None] = staticmethod(time.sleep)

    def _try(self, endpoint: str, limit: Limit | None) -> float:
        raise NotImplementedError

    def acquire(self, endpoint: str, max_wait: float) -> float:
        limit = ENDPOINT_LIMITS.get(endpoint)  # None: only a 429's Retry-After holds it back
        waited = 0.0
        while True:
            wait = self._try(endpoint, limit)
            if wait <= 0:
                return waited
            if waited + wait > max_wait:
                raise BudgetExhausted(endpoint, wait)
            if wait >= 1.0:  # worth telling the user why nothing moves
                if limit is None:
                    per = "Retry-After of a 429"
                else:
                    per = f"{limit.per_minute}/min" if wait <= 60 else f"{limit.per_hour}/hour"
                announce_wait(endpoint, wait, per)
            self.sleep(wait)
            waited += wait


class LocalBudget(_SlidingBudget):
    """In-process sliding windows (one sync, `check`, benchmarks)."""

    def __init__(self) -> None:
        self._calls: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}
        self._lock = threading.Lock()

    def block(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            until = time.monotonic() + max(0.0, seconds)
            self._blocked[endpoint] = max(self._blocked.get(endpoint, 0.0), until)

    def _try(self, endpoint: str, limit: Limit | None) -> float:
        now = time.monotonic()
        with self._lock:
            blocked = self._blocked.get(endpoint, 0.0) - now
            if blocked > 0:
                return blocked
            if limit is None:
                return 0.0
            calls = self._calls.setdefault(endpoint, deque())
            while calls and calls[0] <= now - 3600:
                calls.popleft()
            in_minute = sum(1 for t in calls if t > now - 60)
            waits = []
            if in_minute >= limit.per_minute:
                recent = [t for t in calls if t > now - 60]
                waits.append(recent[-limit.per_minute] + 60 - now)
            if len(calls) >= limit.per_hour:
                waits.append(calls[-limit.per_hour] + 3600 - now)
            if waits:
                return max(max(waits), 0.001)
            calls.append(now)
            return 0.0


# KEYS: minute zset, hour zset, blocked-until key (a 429's Retry-After). ARGV: per_minute,
# per_hour, unique member. Uses the server's clock so workers with skewed clocks agree.
_LUA = """
local blocked = redis.call('PTTL', KEYS[3])
if blocked > 0 then
  return blocked
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 3600000)
local per_min = tonumber(ARGV[1])
local per_hour = tonumber(ARGV[2])
local m = redis.call('ZCARD', KEYS[1])
local h = redis.call('ZCARD', KEYS[2])
local wait = 0
if m >= per_min then
  local oldest = redis.call('ZRANGE', KEYS[1], m - per_min, m - per_min, 'WITHSCORES')
  wait = math.max(wait, tonumber(oldest[2]) + 60000 - now)
end
if h >= per_hour then
  local oldest = redis.call('ZRANGE', KEYS[2], h - per_hour, h - per_hour, 'WITHSCORES')
  wait = math.max(wait, tonumber(oldest[2]) + 3600000 - now)
end
if wait > 0 then
  return wait
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], 61000)
redis.call('PEXPIRE', KEYS[2], 3601000)
return 0
"""


class RedisBudget(_SlidingBudget):
    """Sliding windows in Redis, shared by every worker syncing this tenant."""

    def __init__(self, client: redis.Redis, prefix: str, tenant: str) -> None:
        self._client = client
        self._base = f"{prefix}:budget:{tenant}"
        self._script = client.register_script(_LUA)
        self._seq = 0
        self._lock = threading.Lock()
        self._id = f"{time.time_ns()}-{id(self)}"

    def _try(self, endpoint: str, limit: Limit | None) -> float:
        if limit is None:
            return float(self._client.pttl(f"{self._base}:{endpoint}:blocked")) / 1000.0  # type: ignore[arg-type]
        with self._lock:
            self._seq += 1
            member = f"{self._id}-{self._seq}"
        keys = [
            f"{self._base}:{endpoint}:m",
            f"{self._base}:{endpoint}:h",
            f"{self._base}:{endpoint}:blocked",
        ]
        wait_ms = self._script(keys=keys, args=[limit.per_minute, limit.per_hour, member])
        return float(wait_ms) / 1000.0

    def block(self, endpoint: str, seconds: float) -> None:
        ms = int(max(0.0, seconds) * 1000)
        if ms <= 0:
            return
        key = f"{self._base}:{endpoint}:blocked"
        # keep the later of an existing block and this one
        current = self._client.pttl(key)
        if not isinstance(current, int) or current < ms:
            self._client.set(key, "1", px=ms)

    def used(self, endpoint: str) -> tuple[int, int]:
        """Calls in the last minute and hour (for `status` and the fleet bench)."""
        now_s, now_us = self._client.time()  # type: ignore[misc]
        now = now_s * 1000 + now_us // 1000
        m = self._client.zcount(f"{self._base}:{endpoint}:m", now - 60000, "+inf")
        h = self._client.zcount(f"{self._base}:{endpoint}:h", now - 3600000, "+inf")
        return int(m), int(h)  # type: ignore[arg-type]


class UnmeteredBudget:
    """No client-side pacing: for measuring the client's own cost (benchmarks) only."""

    def acquire(self, endpoint: str, max_wait: float) -> float:
        return 0.0

    def block(self, endpoint: str, seconds: float) -> None:
        """Not paced: the 429 is retried by the client as usual."""
