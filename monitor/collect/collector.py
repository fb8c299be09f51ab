"""Collect one tenant: sign in, fetch every resource, hand the pages to the graph builder."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import redis

from monitor.auth import TokenProvider
from monitor.collect.account import collect_account
from monitor.collect.budget import Budget, LocalBudget, RedisBudget
from monitor.collect.defender_api import DefenderClient
from monitor.collect.errors import AuthError
from monitor.collect.graph_api import GraphClient
from monitor.collect.http import ApiClient, RequestStats, build_http_client
from monitor.collect.hunting import RowsHint
from monitor.collect.identity import IdentityResult, collect_identity, identity_inputs
from monitor.collect.logon_users import (
    LogonUsersResult,
    RefreshLedger,
    collect_logon_users,
    collect_logon_users_hunting,
    plan_refresh,
    stored_account_details,
)
from monitor.collect.machines import MachinesResult, collect_machines
from monitor.collect.progress import Progress, no_progress
from monitor.collect.users import UsersResult, UsersStateStore, collect_users
from monitor.collect.vulnerabilities import collect_vulnerabilities
from monitor.config import Settings, TenantConfig
from monitor.model.builder import GraphBuilder
from monitor.model.graph import Graph, ScopeState, ScopeStatus
from monitor.model.schema import (
    LANE_FULL,
    SCOPE_ACCOUNT,
    SCOPE_MACHINES,
    SCOPE_VULNERABILITIES,
    logon_users_scope,
)

log = logging.getLogger(__name__)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class TenantSession:
    """Everything needed to talk to one tenant's APIs."""

    tenant: TenantConfig
    tokens: TokenProvider
    graph: GraphClient
    defender: DefenderClient
    stats: RequestStats


@contextmanager
def open_session(
    settings: Settings,
    tenant: TenantConfig,
    *,
    redis_client: redis.Redis | None = None,
    http_client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
    budget: Budget | None = None,
) -> Iterator[TenantSession]:
    """Sign-in and API clients sharing one httpx client and one (Redis-shared) API budget."""
    own_client = http_client is None
    http = http_client or build_http_client(settings)
    try:
        tokens = TokenProvider(tenant, http, settings.http, sleep)
        endpoints = tenant.cloud_endpoints()
        stats = RequestStats()
        if budget is None:
            budget = (
                RedisBudget(redis_client, settings.redis_prefix, tenant.name)
                if redis_client is not None
                else LocalBudget()
            )

        def api(name: str, base: str, scope: str) -> ApiClient:
            return ApiClient(name, base, scope, tokens, http, settings.http, budget, stats, sleep)

        yield TenantSession(
            tenant,
            tokens,
            GraphClient(api("graph", endpoints.graph.base_url, endpoints.graph.scope)),
            DefenderClient(api("defender", endpoints.defender.base_url, endpoints.defender.scope)),
            stats,
        )
    finally:
        if own_client:
            http.close()


@dataclass
class CollectResult:
    tenant: str
    graph: Graph | None  # None when sign-in failed
    stats: RequestStats
    started: str
    finished: str
    duration_seconds: float
    auth_error: AuthError | None = None
    logon: LogonUsersResult | None = None
    machine_ids: list[str] | None = None  # None when the machine list is not complete
    ledger_machines: set[str] = field(default_factory=set)  # machines in the refresh ledger
    timings: dict[str, float] = field(default_factory=dict)
    identity: IdentityResult | None = None
    users: UsersResult | None = None
    users_store: UsersStateStore | None = None  # None: the users were read as a full list
    notes: list[str] = field(default_factory=list)  # what the operator should know (fallbacks)
    lane: str = LANE_FULL  # identity: users, groups, roles and employees only

    def after_commit(self) -> None:
        """Once the snapshot is committed: save the users and groups delta states."""
        if self.users is not None and self.users.state is not None and self.users_store:
            self.users_store.save(self.users.state)
        if self.identity is not None:
            self.identity.after_commit()

    def meta(self) -> dict[str, Any]:
        """Sync metadata for the snapshot store (no secrets)."""
        return {
            "lane": self.lane,
            "started": self.started,
            "finished": self.finished,
            "duration_seconds": round(self.duration_seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            **self.stats.to_dict(),
            "logon_users": {
                "refreshed": len(self.logon.refreshed),
                "skipped": self.logon.skipped,
                "failed": self.logon.failed,
                "not_found": len(self.logon.not_found),
                "throttled": self.logon.throttled,
                "mode": self.logon.mode,
                "hunting": self.logon.hunting.to_dict() if self.logon.hunting else None,
            }
            if self.logon
            else None,
            "identity": self.identity.summary() if self.identity else None,
            "users_read": _users_read(self.users, self.users_store),
            "notes": self.notes,
        }


def _users_read(users: UsersResult | None, store: UsersStateStore | None) -> str | None:
    """How the users were read: "list", "delta (full)" or "delta (changes)"."""
    if users is None:
        return None
    if store is None:
        return "list"
    return "delta (full)" if users.full_read else "delta (changes)"


def collect_tenant(
    settings: Settings,
    tenant: TenantConfig,
    *,
    redis_client: redis.Redis | None = None,
    http_client: httpx.Client | None = None,
    progress: Progress = no_progress,
    budget: Budget | None = None,
    lane: str = LANE_FULL,
) -> CollectResult:
    """Fetch account, users, machines, vulnerabilities, logon users and identity into a Graph.

    The identity lane fetches users, groups, roles and employees only: the other scopes get no
    status, so the commit keeps their items (SKIPPED, not degraded).

    Never raises for API trouble: each resource's outcome is its scope status. Sign-in failure
    is returned as `auth_error` with no graph.
    """
    full = lane == LANE_FULL
    t0 = time.monotonic()
    started = _now_iso()
    timings: dict[str, float] = {}
    with open_session(
        settings, tenant, redis_client=redis_client, http_client=http_client, budget=budget
    ) as s:
        endpoints = tenant.cloud_endpoints()
        # Each API's token is fetched when that API is first used (the Defender one by the first
        # Defender call), so a Defender audience problem fails the Defender scopes, named in their
        # errors, not the Graph part. The sync is a sign-in failure only when the sign-in
        # endpoint is down, or when neither API can be signed in to.
        progress("sign-in", 0, 1)
        try:
            s.tokens.token(endpoints.graph.scope)
        except AuthError as graph_error:
            failed = graph_error.transient
            if not failed:
                try:
                    s.tokens.token(endpoints.defender.scope)
                except AuthError:
                    failed = True
            if failed:
                return CollectResult(
                    tenant.name,
                    None,
                    s.stats,
                    started,
                    _now_iso(),
                    time.monotonic() - t0,
                    auth_error=graph_error,
                )
        progress("sign-in", 1, 1)
        builder = GraphBuilder(tenant)

        def timed(name: str, start: float) -> None:
            timings[name] = time.monotonic() - start

        t = time.monotonic()
        if full:
            collect_account(s.graph, builder)
            timed("account", t)
        else:  # not read by this lane: kept as they are, as planned (no error: not degraded)
            for scope in (SCOPE_ACCOUNT, SCOPE_MACHINES, SCOPE_VULNERABILITIES):
                builder.set_scope(scope, ScopeStatus(ScopeState.SKIPPED))
        t = time.monotonic()
        # by delta when the state can be kept (Redis); without it a delta read is a full read
        # at 200 users a request, where the list takes 999
        users_store = (
            UsersStateStore(redis_client, settings.redis_prefix, tenant.name)
            if tenant.users_delta and redis_client is not None
            else None
        )
        users = collect_users(
            s.graph,
            builder,
            progress,
            managers=tenant.identity.directory_employees.managers,
            store=users_store,
        )
        timed("users", t)
        # whether logon accounts can be mapped this sync (users whole, HR file readable): if not,
        # the logon-user refresh is held (previous logon users kept), not fetched and thrown away
        inputs = identity_inputs(tenant, builder.graph())
        held: list[str] = []
        machines: MachinesResult | None = None
        if full:
            t = time.monotonic()
            machines = collect_machines(s.defender, builder, progress)
            timed("machines", t)
            t = time.monotonic()
            collect_vulnerabilities(s.defender, builder, progress)
            timed("vulnerabilities", t)
        logon: LogonUsersResult | None = None
        ledger: dict[str, tuple[float, str | None]] = {}
        notes: list[str] = []
        if machines is not None and machines.complete:
            t = time.monotonic()
            ledger = RefreshLedger(redis_client, settings.redis_prefix, tenant.name).load()
            if tenant.logon_users == "hunting" and inputs.problem is None:
                logon = _hunt_logon_users(
                    settings, tenant, s, builder, machines, ledger, redis_client, progress
                )
                notes += _hunting_notes(tenant, logon)
            else:
                plan = plan_refresh(
                    machines.last_seen, ledger, tenant.logon_user_budget, machines.onboarded
                )
                if inputs.problem is not None:
                    held = plan if tenant.logon_users == "rotation" else sorted(machines.onboarded)
                    plan = []
                logon = collect_logon_users(
                    s.defender,
                    builder,
                    machines.last_seen,
                    plan,
                    tenant.logon_user_concurrency,
                    progress,
                )
            for mid in held:  # not a plain rotation: say why their turn passed
                builder.set_scope(
                    logon_users_scope(mid), ScopeStatus(ScopeState.SKIPPED, error=inputs.problem)
                )
            timed("logon_users", t)
        t = time.monotonic()
        identity = collect_identity(
            s.graph,
            builder.graph(),
            tenant,
            progress,
            redis_client=redis_client,
            redis_prefix=settings.redis_prefix,
            inputs=inputs,
            machines_of=builder.logon_user_machines(),
        )
        identity.logon_set_aside = len(held)
        timed("identity", t)
        return CollectResult(
            tenant.name,
            builder.graph(),
            s.stats,
            started,
            _now_iso(),
            time.monotonic() - t0,
            logon=logon,
            machine_ids=list(machines.last_seen) if machines and machines.complete else None,
            ledger_machines=set(ledger),
            timings=timings,
            identity=identity,
            users=users,
            users_store=users_store,
            notes=notes,
            lane=lane,
        )


def _hunt_logon_users(
    settings: Settings,
    tenant: TenantConfig,
    s: TenantSession,
    builder: GraphBuilder,
    machines: MachinesResult,
    ledger: dict[str, tuple[float, str | None]],
    redis_client: redis.Redis | None,
    progress: Progress,
) -> LogonUsersResult:
    """`logon_users: hunting`: advanced hunting for every onboarded machine (see
    `collect_logon_users_hunting`), remembering the rows per machine for the next sync's ranges."""
    hint = RowsHint(redis_client, settings.redis_prefix, tenant.name)
    logon = collect_logon_users_hunting(
        s.defender,
        builder,
        machines.last_seen,
        machines.onboarded,
        ledger,
        budget=tenant.logon_user_budget,
        concurrency=tenant.logon_user_concurrency,
        window=tenant.logon_users_window,
        max_rows=tenant.hunting_max_rows,
        rows_per_machine=hint.load(),
        known_details=stored_account_details(redis_client, settings.redis_prefix, tenant.name),
        progress=progress,
    )
    if logon.hunting is not None and logon.hunting.rows_per_machine is not None:
        hint.save(logon.hunting.rows_per_machine)
    return logon


def _hunting_notes(tenant: TenantConfig, logon: LogonUsersResult) -> list[str]:
    """The hunting fallback, said once in the log and in the sync's notes."""
    report = logon.hunting
    if report is None or report.fallback is None:
        return []
    uncovered = report.uncovered
    read = len(logon.refreshed)  # per-machine reads, covered machines included
    note = (
        f"logon users: advanced hunting did not cover {uncovered:,} machine(s) ({report.fallback});"
        f" the per-machine rotation stood in for this sync ({read:,} /logonusers read within"
        f" logon_user_budget {tenant.logon_user_budget:,}), the others keep their previous logon"
        " users"
    )
    log.warning(
        "logon users: hunting fell back to the rotation",
        extra={
            "tenant": tenant.name,
            "uncovered": uncovered,
            "covered": report.machines,
            "error": report.fallback,
        },
    )
    return [note]
