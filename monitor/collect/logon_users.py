"""Logon users (User.Read.All): one call per machine, so refreshed within a per-sync budget.

Microsoft allows 1,500 `/logonusers` calls per hour, so 10,000 machines cannot all be refreshed in
one sync. Each sync refreshes up to `logon_user_budget` machines: never-fetched machines and those
whose `lastSeen` moved first, then the least recently refreshed. Machines not refreshed keep their
previous logon users (scope SKIPPED, not "removed").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis

from monitor.collect.budget import BudgetExhausted
from monitor.collect.defender_api import DefenderClient
from monitor.collect.errors import CollectError, PermissionMissing
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
            ts, _, seen = v.decode().partition("|")
            out[k.decode()] = (float(ts), seen or None)
        return out

    def record(self, refreshed: dict[str, str | None], gone: Iterable[str]) -> None:
        """Call after the snapshot commit: these machines were refreshed, those are gone."""
        if self._client is None:
            return
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        if refreshed:
            pipe.hset(
                self._key,
                mapping={mid: f"{now:.3f}|{seen or ''}" for mid, seen in refreshed.items()},
            )
        gone = list(gone)
        for i in range(0, len(gone), 1000):
            pipe.hdel(self._key, *gone[i : i + 1000])
        pipe.execute()


def plan_refresh(last_seen: dict[str, str | None], ledger: Ledger, budget: int) -> list[str]:
    """Machines to refresh this sync, most needed first, at most `budget`."""

    def priority(mid: str) -> tuple[int, float, str]:
        rec = ledger.get(mid)
        if rec is None:
            return (0, 0.0, mid)
        moved = rec[1] != last_seen.get(mid)
        return (0 if moved else 1, rec[0], mid)

    return sorted(last_seen, key=priority)[:budget]


@dataclass
class LogonUsersResult:
    refreshed: dict[str, str | None] = field(default_factory=dict)  # id -> lastSeen, for the ledger
    failed: int = 0
    skipped: int = 0
    error: str | None = None


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
    stop = threading.Event()
    stop_reason: list[str] = []

    def fetch(mid: str) -> tuple[str, list[dict] | None, str | None, bool]:
        if stop.is_set():
            return mid, None, stop_reason[0] if stop_reason else None, True
        try:
            return mid, defender.logon_users(mid), None, False
        except BudgetExhausted as exc:
            stop_reason.append(f"{exc} (remaining machines keep their previous logon users)")
            stop.set()
            return mid, None, stop_reason[0], True
        except PermissionMissing as exc:
            stop_reason.append(str(exc))
            stop.set()
            return mid, None, str(exc), False
        except CollectError as exc:
            return mid, None, str(exc), False

    done = 0
    with ThreadPoolExecutor(
        max_workers=max(1, concurrency), thread_name_prefix="logonusers"
    ) as pool:
        for mid, users, error, skipped in pool.map(fetch, plan):
            scope = logon_users_scope(mid)
            if users is not None:
                count = builder.add_logon_users(mid, users)
                builder.set_scope(scope, ScopeStatus(ScopeState.COMPLETE, count=count))
                result.refreshed[mid] = last_seen.get(mid)
            elif skipped:
                builder.set_scope(scope, ScopeStatus(ScopeState.SKIPPED, error=error))
                result.skipped += 1
            else:
                builder.set_scope(scope, ScopeStatus(ScopeState.FAILED, error=error))
                result.failed += 1
                result.error = result.error or error
            done += 1
            progress("logon users", done, len(plan))
    planned = set(plan)
    for mid in last_seen:
        if mid not in planned:  # rotation: not this sync's turn; keeps its previous logon users
            builder.set_scope(logon_users_scope(mid), ScopeStatus(ScopeState.SKIPPED))
            result.skipped += 1
    if stop_reason:
        result.error = stop_reason[0]
    return result
