"""Injected faults (errors, hangs, broken bodies, dropped connections) and Defender rate limits.

Fault kinds and what the client sees:
  status     the given HTTP status with the API's own error body (Graph / Defender / Entra ID
             shape), with `code` / `message` when given (e.g. 403 DisabledFeature, 404
             NotFound); `body: "none"` sends no JSON body at all (text/plain); 429 and 503
             carry `Retry-After: <retry_after>`.
  hang       the answer comes after `seconds` (the request is then served normally), so a
             client timeout fires; other requests are served meanwhile.
  malformed  200 with Content-Type application/json and a body that is not valid JSON.
  truncated  200 whose Content-Length announces the full body but only the first half is
             sent before the connection is closed; HTTP clients raise (httpx:
             RemoteProtocolError "peer closed connection without sending complete message
             body"), so a cut page can never be mistaken for a complete one.
  drop       the connection is closed without any answer.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FaultKind = Literal["status", "hang", "malformed", "truncated", "drop"]
FAULT_KINDS: tuple[str, ...] = ("status", "hang", "malformed", "truncated", "drop")

_ids = itertools.count(1)


@dataclass
class Fault:
    """A fault on one endpoint key (as in `counts()`, e.g. "defender:/api/machines/{id}").

    `times` is how many matching requests it hits (None: every one until cleared), after letting
    the first `after` matching requests through (e.g. after=1: the second page fails);
    `tenant_id` / `machine_id` narrow it to one tenant / one machine's URL.
    """

    endpoint: str
    kind: FaultKind = "status"
    times: int | None = None
    status: int = 503
    retry_after: int | None = 2
    seconds: float = 5.0
    tenant_id: str | None = None
    machine_id: str | None = None
    code: str | None = None  # the API's error code (default: the status's usual one)
    message: str | None = None
    body: Literal["json", "none"] = "json"
    after: int = 0
    id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(
                f"fault kind must be one of {', '.join(FAULT_KINDS)} (got {self.kind!r})"
            )
        if ":" not in self.endpoint:
            raise ValueError(
                f"fault endpoint must be a counts key like 'defender:/api/machines' (got {self.endpoint!r})"
            )
        if self.times is not None and self.times < 1:
            raise ValueError(f"fault times must be >= 1 or None (got {self.times})")
        if not 100 <= self.status <= 599:
            raise ValueError(f"fault status must be an HTTP status (got {self.status})")
        if self.seconds < 0:
            raise ValueError(f"fault seconds must be >= 0 (got {self.seconds})")
        if self.after < 0:
            raise ValueError(f"fault after must be >= 0 (got {self.after})")
        if self.body not in ("json", "none"):
            raise ValueError(f"fault body must be 'json' or 'none' (got {self.body!r})")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        """Build from the admin API's JSON; unknown fields are an error naming them."""
        allowed = {f for f in cls.__dataclass_fields__ if f != "id"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        if "endpoint" not in data:
            raise ValueError("fault needs an 'endpoint'")
        return cls(**data)


class FaultBook:
    """The active faults; `take` finds (and uses up) the first one matching a request."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def active(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def take(self, endpoint: str, tenant_id: str | None, machine_id: str | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.endpoint != endpoint:
                    continue
                if fault.tenant_id is not None and fault.tenant_id != tenant_id:
                    continue
                if fault.machine_id is not None and fault.machine_id != machine_id:
                    continue
                if fault.after > 0:
                    fault.after -= 1
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults.remove(fault)
                return fault
        return None


DEFAULT_RATE_LIMITED = ("defender:/api/machines", "defender:/api/machines/{id}/logonusers")


class RateLimiter:
    """Sliding windows per (tenant, endpoint): N calls per minute and M per hour.

    Only accepted calls count, so `Retry-After` is exactly when the next call will pass.
    """

    def __init__(
        self,
        per_minute: int = 100,
        per_hour: int = 1500,
        *,
        minute_seconds: float = 60.0,
        hour_seconds: float = 3600.0,
        endpoints: Iterable[str] = DEFAULT_RATE_LIMITED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = False
        self.per_minute = per_minute
        self.per_hour = per_hour
        self.minute_seconds = minute_seconds
        self.hour_seconds = hour_seconds
        self.endpoints = set(endpoints)
        self._clock = clock
        self._calls: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()

    def check(self, tenant_id: str, endpoint: str) -> int | None:
        """None when the call may pass (and is recorded), else Retry-After seconds."""
        if not self.enabled or endpoint not in self.endpoints:
            return None
        now = self._clock()
        with self._lock:
            calls = self._calls.setdefault((tenant_id, endpoint), deque())
            while calls and calls[0] <= now - self.hour_seconds:
                calls.popleft()
            waits = []
            if len(calls) >= self.per_hour:
                waits.append(calls[len(calls) - self.per_hour] + self.hour_seconds - now)
            in_minute = sum(1 for t in calls if t > now - self.minute_seconds)
            if in_minute >= self.per_minute:
                waits.append(calls[len(calls) - self.per_minute] + self.minute_seconds - now)
            if waits:
                return max(1, math.ceil(max(waits)))
            calls.append(now)
            return None
