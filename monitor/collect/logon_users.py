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
from monitor.collect.errors import CollectError, NotFound, PermissionMissing, Throttled
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
class LogonUsersResult:
    refreshed: dict[str, str | None] = field(default_factory=dict)  # id -> lastSeen, for the ledger
    failed: int = 0
    skipped: int = 0
    error: str | None = None
    # machines that answered 404 ResourceNotFound twice: skipped this sync, noted in the ledger
    not_found: dict[str, str | None] = field(default_factory=dict)
    throttled: bool = False


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
    lock = threading.Lock()

    def halt(reason: str) -> None:
        with lock:
            if not stop_reason:
                stop_reason.append(reason)
        stop.set()

    def fetch(mid: str) -> tuple[str, str, list[dict] | None, str | None]:
        """(machine, outcome, users, error); outcome: ok | skipped | failed | not_found."""
        for attempt in (1, 2):
            if stop.is_set():
                return mid, "skipped", None, stop_reason[0] if stop_reason else None
            try:
                return mid, "ok", defender.logon_users(mid), None
            except NotFound as exc:
                if attempt == 2:  # Microsoft's 404s can be transient: asked twice
                    return mid, "not_found", None, str(exc)
            except Throttled as exc:
                wait = f"{exc.retry_after:.0f}s" if exc.retry_after is not None else "a while"
                result.throttled = True
                halt(
                    f"{exc.endpoint}: HTTP 429: throttled, Retry-After {wait}; the remaining"
                    " machines keep their previous logon users"
                )
                return mid, "skipped", None, stop_reason[0]
            except BudgetExhausted as exc:
                halt(f"{exc} (remaining machines keep their previous logon users)")
                return mid, "skipped", None, stop_reason[0]
            except PermissionMissing as exc:
                halt(str(exc))
                return mid, "failed", None, str(exc)
            except CollectError as exc:
                return mid, "failed", None, str(exc)
        raise AssertionError("unreachable")

    done = 0
    with ThreadPoolExecutor(
        max_workers=max(1, concurrency), thread_name_prefix="logonusers"
    ) as pool:
        for mid, outcome, users, error in pool.map(fetch, plan):
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
