"""Logon users (User.Read.All): one call per machine, so refreshed within a per-sync budget.

Microsoft allows 1,500 `/logonusers` calls per hour, so 10,000 machines cannot all be refreshed in
one sync. Each sync refreshes up to `logon_user_budget` machines: never-fetched machines and those
whose `lastSeen` moved first, then the least recently refreshed. Machines not refreshed keep their
previous logon users (scope SKIPPED, not "removed").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.collect.budget import BudgetExhausted
from monitor.collect.defender_api import DefenderClient
from monitor.collect.errors import CollectError, NotFound, PermissionMissing, Throttled
from monitor.collect.http import Json
from monitor.collect.progress import Progress
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import logon_users_scope

Ledger = dict[str, tuple[float, str | None]]  # machine id -> (refreshed at, lastSeen then)


class RefreshLedger:
    """When each machine's logon users were last refreshed, kept in Redis per tenant."""

    def __init__(self, client: redis.Redis | None, prefix: str, tenant: str) -> None:
        self._client = client
        self._key = f"{prefix}:logon_refresh:{tenant}"

    def load(self) -> Ledger:
        if self._client is None:
            return {}
        raw: dict[bytes, bytes] = self._client.hgetall(self._key)  # type: ignore[assignment]
        out: Ledger = {}
        for k, v in raw.items():
            ts, _, rest = v.decode().partition("|")
            seen = rest.removesuffix(
                "|404"
            )  # a 404 machine: refreshed then, as far as the plan goes
            out[k.decode()] = (float(ts), seen or None)
        return out

    def record(
        self,
        refreshed: dict[str, str | None],
        gone: Iterable[str],
        not_found: dict[str, str | None] | None = None,
    ) -> None:
        """Call after the snapshot commit: these machines were refreshed, those are gone.

        `not_found` machines answered 404 twice this sync: they count as refreshed now (marked
        `|404`), so the rotation moves past them instead of asking them first every sync.
        """
        if self._client is None:
            return
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        entries = {mid: f"{now:.3f}|{seen or ''}" for mid, seen in refreshed.items()}
        entries.update(
            {mid: f"{now:.3f}|{seen or ''}|404" for mid, seen in (not_found or {}).items()}
        )
        if entries:
            pipe.hset(self._key, mapping=entries)
        gone = list(gone)
        for i in range(0, len(gone), 1000):
            pipe.hdel(self._key, *gone[i : i + 1000])
        pipe.execute()

    def not_found(self) -> set[str]:
        """Machines whose last refresh answered 404 (for `status` and tests)."""
        if self._client is None:
            return set()
        raw: dict[bytes, bytes] = self._client.hgetall(self._key)  # type: ignore[assignment]
        return {k.decode() for k, v in raw.items() if v.decode().endswith("|404")}


def plan_refresh(
    last_seen: dict[str, str | None],
    ledger: Ledger,
    budget: int,
    onboarded: set[str] | None = None,
) -> list[str]:
    """Machines to refresh this sync, most needed first, at most `budget`.

    Only onboarded machines have logon users to ask for (`/api/machines` also lists discovered
    devices: CanBeOnboarded, Unsupported, InsufficientInfo); None: every machine.
    """

    def priority(mid: str) -> tuple[int, float, str]:
        rec = ledger.get(mid)
        if rec is None:
            return (0, 0.0, mid)
        moved = rec[1] != last_seen.get(mid)
        return (0 if moved else 1, rec[0], mid)

    candidates = last_seen if onboarded is None else [m for m in last_seen if m in onboarded]
    return sorted(candidates, key=priority)[:budget]


@dataclass
class HuntingReport:
    """What `logon_users: hunting` did in one sync (see monitor.collect.hunting)."""

    calls: int = 0
    splits: int = 0
    rows: int = 0
    machines: int = 0  # machines covered by a query
    uncovered: int = 0  # onboarded machines no query answered for: rotation instead
    errors: list[str] = field(default_factory=list)
    fallback: str | None = None  # why the rotation stood in for some or all machines
    details_read: int = 0  # accounts whose facts came from a /logonusers read this sync
    details_pending: int = 0  # accounts without isDomainAdmin & co. (no read yet)
    rows_per_machine: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "splits": self.splits,
            "rows": self.rows,
            "machines": self.machines,
            "uncovered": self.uncovered,
            "errors": self.errors[:5],
            "fallback": self.fallback,
            "details_read": self.details_read,
            "details_pending": self.details_pending,
        }


@dataclass
class LogonUsersResult:
    refreshed: dict[str, str | None] = field(default_factory=dict)  # id -> lastSeen, for the ledger
    failed: int = 0
    skipped: int = 0
    error: str | None = None
    # machines that answered 404 ResourceNotFound twice: skipped this sync, noted in the ledger
    not_found: dict[str, str | None] = field(default_factory=dict)
    throttled: bool = False
    mode: str = "rotation"
    hunting: HuntingReport | None = None


Fetched = tuple[str, str, list[Json] | None, str | None]  # machine, outcome, users, error


class _Fetcher:
    """One machine's /logonusers at a time (from a thread pool); the first 429, exhausted budget
    or missing permission stops the machines not yet asked."""

    def __init__(self, defender: DefenderClient, result: LogonUsersResult) -> None:
        self._defender = defender
        self._result = result
        self._stop = threading.Event()
        self._reasons: list[str] = []
        self._lock = threading.Lock()

    @property
    def stop_reason(self) -> str | None:
        return self._reasons[0] if self._reasons else None

    def _halt(self, reason: str) -> str:
        with self._lock:
            if not self._reasons:
                self._reasons.append(reason)
            first = self._reasons[0]
        self._stop.set()
        return first

    def fetch(self, mid: str) -> Fetched:
        """(machine, outcome, users, error); outcome: ok | skipped | failed | not_found."""
        for attempt in (1, 2):
            if self._stop.is_set():
                return mid, "skipped", None, self.stop_reason
            try:
                return mid, "ok", self._defender.logon_users(mid), None
            except NotFound as exc:
                if attempt == 2:  # Microsoft's 404s can be transient: asked twice
                    return mid, "not_found", None, str(exc)
            except Throttled as exc:
                wait = f"{exc.retry_after:.0f}s" if exc.retry_after is not None else "a while"
                self._result.throttled = True
                reason = self._halt(
                    f"{exc.endpoint}: HTTP 429: throttled, Retry-After {wait}; the remaining"
                    " machines keep their previous logon users"
                )
                return mid, "skipped", None, reason
            except BudgetExhausted as exc:
                reason = self._halt(f"{exc} (remaining machines keep their previous logon users)")
                return mid, "skipped", None, reason
            except PermissionMissing as exc:
                self._halt(str(exc))
                return mid, "failed", None, str(exc)
            except CollectError as exc:
                return mid, "failed", None, str(exc)
        raise AssertionError("unreachable")


def _fetch_all(
    defender: DefenderClient,
    plan: list[str],
    concurrency: int,
    result: LogonUsersResult,
    progress: Progress,
) -> Iterator[Fetched]:
    """Each planned machine's outcome, in plan order, with bounded concurrency."""
    fetcher = _Fetcher(defender, result)
    with ThreadPoolExecutor(
        max_workers=max(1, concurrency), thread_name_prefix="logonusers"
    ) as pool:
        for done, fetched in enumerate(pool.map(fetcher.fetch, plan), 1):
            yield fetched
            progress("logon users", done, len(plan))
    if fetcher.stop_reason:
        result.error = fetcher.stop_reason


def _apply(
    builder: GraphBuilder,
    fetched: Fetched,
    last_seen: dict[str, str | None],
    result: LogonUsersResult,
) -> None:
    """A machine's /logonusers outcome as its logon users and scope status."""
    mid, outcome, users, error = fetched
    scope = logon_users_scope(mid)
    if outcome == "ok":
        assert users is not None
        count = builder.add_logon_users(mid, users)
        builder.set_scope(scope, ScopeStatus(ScopeState.COMPLETE, count=count))
        result.refreshed[mid] = last_seen.get(mid)
    elif outcome == "not_found":
        # not degraded: a discovered or just-offboarded device; try again next turn
        builder.set_scope(scope, ScopeStatus(ScopeState.SKIPPED))
        result.not_found[mid] = last_seen.get(mid)
        result.skipped += 1
    elif outcome == "skipped":
        builder.set_scope(scope, ScopeStatus(ScopeState.SKIPPED, error=error))
        result.skipped += 1
    else:
        builder.set_scope(scope, ScopeStatus(ScopeState.FAILED, error=error))
        result.failed += 1
        result.error = result.error or error


def collect_logon_users(
    defender: DefenderClient,
    builder: GraphBuilder,
    last_seen: dict[str, str | None],
    plan: list[str],
    concurrency: int,
    progress: Progress,
) -> LogonUsersResult:
    """Refresh the planned machines with bounded concurrency; set a scope status for every machine."""
    result = LogonUsersResult()
    for fetched in _fetch_all(defender, plan, concurrency, result, progress):
        _apply(builder, fetched, last_seen, result)
    planned = set(plan)
    for mid in last_seen:
        if mid not in planned:  # rotation: not this sync's turn; keeps its previous logon users
            builder.set_scope(logon_users_scope(mid), ScopeStatus(ScopeState.SKIPPED))
            result.skipped += 1
    return result
