"""Logon users (User.Read.All): one call per machine, so refreshed within a per-sync budget.

Microsoft allows 1,500 `/logonusers` calls per hour, so 10,000 machines cannot all be refreshed in
one sync. Each sync refreshes up to `logon_user_budget` machines: never-fetched machines and those
whose `lastSeen` moved first, then the least recently refreshed. Machines not refreshed keep their
previous logon users (scope SKIPPED, not "removed").

With `logon_users: hunting` (`collect_logon_users_hunting`), advanced hunting covers every machine
in a few queries and the per-machine reads keep the account facts it lacks; machines its queries
could not cover fall back to this rotation for the sync.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.collect.budget import BudgetExhausted
from monitor.collect.defender_api import DefenderClient
from monitor.collect.errors import CollectError, NotFound, PermissionMissing, Throttled
from monitor.collect.http import Json
from monitor.collect.hunting import DETAIL_FIELDS, HuntedLogon, hunt_logon_users, with_details
from monitor.collect.progress import Progress
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import LOGON_USER, logon_users_scope
from monitor.snapshot.store import SnapshotStore

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
    seconds: float = 0.0  # wall time of the hunting queries

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
            "seconds": round(self.seconds, 3),
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


def stored_account_details(
    client: redis.Redis | None, prefix: str, tenant: str
) -> Callable[[list[str]], dict[str, Json]]:
    """A loader of the account facts the last snapshot holds (isDomainAdmin & co., read per
    machine in an earlier sync), by logon-user id; accounts whose facts were never read are left
    out."""

    def load(ids: list[str]) -> dict[str, Json]:
        if client is None or not ids:
            return {}
        lid_of = {LOGON_USER.key(lid): lid for lid in ids}
        out: dict[str, Json] = {}
        shared: dict[tuple[tuple[str, Any], ...], Json] = {}  # most accounts' facts are alike
        for key, body in SnapshotStore(client, prefix).iter_bodies(tenant, lid_of):
            if "isDomainAdmin" not in body:
                continue
            facts = tuple((k, body[k]) for k in DETAIL_FIELDS if k in body)
            try:
                out[lid_of[key]] = shared.setdefault(facts, dict(facts))
            except TypeError:  # an unhashable value: its own dict
                out[lid_of[key]] = dict(facts)
        return out

    return load


def _cover(unknown: set[str], items: dict[str, list[HuntedLogon]], limit: int) -> list[str]:
    """At most `limit` machines whose /logonusers tell the facts of as many `unknown` accounts
    as possible (greedy: each pick is the machine with the most accounts still unknown)."""
    if limit <= 0 or not unknown:
        return []
    unknown_on = {
        mid: {i.id for i in machine_items if i.id in unknown}
        for mid, machine_items in items.items()
    }
    heap = [(-len(accounts), mid) for mid, accounts in unknown_on.items() if accounts]
    heapq.heapify(heap)
    left = set().union(*unknown_on.values()) if unknown_on else set()
    picked: list[str] = []
    while heap and left and len(picked) < limit:
        neg, mid = heapq.heappop(heap)
        gain = len(unknown_on[mid] & left)
        if gain < -neg:  # others were learnt meanwhile: put it back with its true gain
            if gain:
                heapq.heappush(heap, (-gain, mid))
            continue
        picked.append(mid)
        left -= unknown_on[mid]
    return picked


def collect_logon_users_hunting(
    defender: DefenderClient,
    builder: GraphBuilder,
    last_seen: dict[str, str | None],
    onboarded: set[str],
    ledger: Ledger,
    *,
    budget: int,
    concurrency: int,
    window: str,
    max_rows: int,
    rows_per_machine: float | None,
    known_details: Callable[[list[str]], dict[str, Json]],
    progress: Progress,
) -> LogonUsersResult:
    """Every onboarded machine's logon users through advanced hunting (monitor.collect.hunting).

    Each machine a query covered gets a COMPLETE scope (no rows: no logon users). Within
    `budget`, /logonusers is then read for machines carrying accounts whose facts (isDomainAdmin,
    isOnlyNetworkUser, logOnMachinesCount) are not known yet, for the machines no query covered
    (their logon users, as the rotation does), then in the rotation's order (fresher facts).
    Account facts come from this sync's reads, else from the last snapshot; without either they
    are left out. Machines neither covered nor read keep their previous logon users.
    """
    result = LogonUsersResult(mode="hunting")
    report = result.hunting = HuntingReport()
    targets = [m for m in last_seen if m in onboarded]
    hunt = hunt_logon_users(
        defender,
        targets,
        window,
        max_rows=max_rows,
        rows_per_machine=rows_per_machine,
        progress=lambda done, total: progress("logon users (hunting)", done, total),
    )
    report.calls, report.splits, report.rows = hunt.calls, hunt.splits, hunt.rows
    report.machines, report.uncovered = len(hunt.items), len(hunt.uncovered)
    report.errors, report.rows_per_machine = hunt.errors, hunt.rows_per_machine
    report.seconds = hunt.seconds
    uncovered = set(hunt.uncovered)
    if uncovered:
        report.fallback = hunt.stopped or (hunt.errors[0] if hunt.errors else "no answer")
        progress(
            "logon users: not covered by hunting, rotation instead", len(uncovered), len(targets)
        )

    accounts = {item.id for items in hunt.items.values() for item in items}
    details = known_details(sorted(accounts))
    order = plan_refresh(last_seen, ledger, len(targets), onboarded)
    plan = list(
        dict.fromkeys(
            [
                *_cover(accounts - set(details), hunt.items, budget),
                *(m for m in order if m in uncovered),
                *order,
            ]
        )
    )[:budget]
    read: dict[str, tuple[str, Json]] = {}  # account -> (machine, the report it read)
    for fetched in _fetch_all(defender, plan, concurrency, result, progress):
        mid, outcome, users, _error = fetched
        for user in users or []:
            lid = user.get("id")
            lid = lid.lower() if isinstance(lid, str) else None  # hunting's ids are lower-case
            if lid is not None and (lid not in read or mid < read[lid][0]):
                read[lid] = (mid, user)
        if mid not in hunt.items:  # no query covered it: its logon users come from this read
            _apply(builder, fetched, last_seen, result)
        elif outcome == "ok":
            result.refreshed[mid] = last_seen.get(mid)
        elif outcome == "not_found":
            result.not_found[mid] = last_seen.get(mid)
    for lid, (_mid, user) in read.items():
        details[lid] = {k: user[k] for k in DETAIL_FIELDS if k in user}
    report.details_read = len(accounts & set(read))
    report.details_pending = len(accounts - set(details))

    for mid, items in hunt.items.items():
        count = builder.add_logon_users(mid, [with_details(i, details.get(i.id)) for i in items])
        builder.set_scope(logon_users_scope(mid), ScopeStatus(ScopeState.COMPLETE, count=count))
    planned = set(plan)
    for mid in last_seen:
        if mid not in hunt.items and mid not in planned:
            # not onboarded, or no query covered it and the budget did not reach it
            builder.set_scope(logon_users_scope(mid), ScopeStatus(ScopeState.SKIPPED))
            result.skipped += 1
    return result
