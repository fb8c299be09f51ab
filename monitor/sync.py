"""One sync of one tenant: collect -> model -> diff -> commit snapshot and events, under its lock."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.alerts.query_rules import evaluate_after_commit
from monitor.collect.budget import Budget
from monitor.collect.collector import CollectResult, collect_tenant
from monitor.collect.logon_users import RefreshLedger
from monitor.collect.progress import Progress, no_progress
from monitor.config import Settings, TenantConfig
from monitor.model.graph import ScopeState
from monitor.model.schema import LANE_FULL
from monitor.redact import register_secret, scrub
from monitor.redis_conn import connect
from monitor.snapshot.commit import (
    CommitResult,
    ConcurrentCommit,
    LockLost,
    detect_and_commit,
    record_failed_sync,
)
from monitor.snapshot.lock import TenantBusy, TenantLock
from monitor.snapshot.store import SnapshotStore

log = logging.getLogger(__name__)

# The tenant lock is renewed every TTL/3 while its sync runs; a dead worker's lock frees itself
# after the TTL. MDE_MONITOR_LOCK_TTL shortens it (tests kill workers on purpose).
LOCK_TTL_SECONDS = float(os.environ.get("MDE_MONITOR_LOCK_TTL", "90"))


@dataclass
class SyncSummary:
    """What one sync did, for the CLI, the task result and metrics."""

    tenant: str
    status: str  # ok | degraded | failed
    generation: int | None
    duration_seconds: float
    counts: dict[str, int] = field(default_factory=dict)  # _type -> items in the new snapshot
    requests: dict[str, Any] = field(default_factory=dict)  # RequestStats.to_dict()
    events: dict[str, int] = field(default_factory=dict)  # event type -> n
    scopes_incomplete: dict[str, str | None] = field(default_factory=dict)  # scope -> error
    error: str | None = None
    baseline: bool = False
    notes: list[str] = field(default_factory=list)  # e.g. a logon-user hunting fallback
    lane: str = LANE_FULL  # identity: users, groups, roles and employees only
    query_rules: int = 0  # query alert rules for the tenant
    query_rules_deferred: bool = False  # left to the query evaluator (queue `query`)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "status": self.status,
            "lane": self.lane,
            "generation": self.generation,
            "baseline": self.baseline,
            "duration_seconds": round(self.duration_seconds, 3),
            "counts": self.counts,
            "requests": self.requests,
            "events": self.events,
            "scopes_incomplete": self.scopes_incomplete,
            "error": self.error,
            "notes": self.notes,
            "query_rules": self.query_rules,
            "query_rules_deferred": self.query_rules_deferred,
        }


def run_sync(
    settings: Settings,
    tenant_name: str,
    *,
    redis_client: redis.Redis | None = None,
    accept_drop: bool = False,
    progress: Progress = no_progress,
    budget: Budget | None = None,
    defer_query_rules: bool = False,
    lane: str = LANE_FULL,
) -> SyncSummary:
    """Collect the tenant, diff against its snapshot and commit atomically; then evaluate the
    tenant's query rules, or with `defer_query_rules` store the commit's change set for the
    query evaluator (the caller enqueues it: see monitor.tasks).

    `budget`: the API budget (default: the tenant's shared one in Redis; benches pass an
    unmetered one and compute the pacing themselves). `lane`: "identity" reads users, groups,
    roles and employees only and keeps the rest; before the tenant's first full sync it does
    nothing (status "skipped").

    Raises TenantBusy when another sync of the tenant holds the lock. Any other crash (a bug,
    data that escaped the builder's per-item checks) is recorded as a failed sync - status
    "failed" and one `mde.sync.failed` event - and returned as a "failed" summary. A lost
    lock or a lost Redis connection propagate: nothing can be recorded safely then.
    """
    t0 = time.monotonic()
    tenant = settings.tenant(tenant_name)
    client = redis_client or connect(settings.redis_url)
    store = SnapshotStore(client, settings.redis_prefix)
    if lane != LANE_FULL and not store.generation(tenant.name):
        return SyncSummary(
            tenant.name,
            "skipped",
            None,
            time.monotonic() - t0,
            error=f"the {lane} lane waits for the tenant's first full sync",
            lane=lane,
        )
    try:
        return _run_sync(
            settings,
            tenant,
            client,
            store,
            accept_drop=accept_drop,
            progress=progress,
            budget=budget,
            defer_query_rules=defer_query_rules,
            lane=lane,
        )
    except _NOT_RECORDABLE:
        raise
    except Exception as exc:
        error = _crash_text(exc, tenant)
        log.exception("sync crashed", extra={"tenant": tenant.name, "error": error})
        try:
            with TenantLock(
                client, settings.redis_prefix, tenant.name, ttl_seconds=LOCK_TTL_SECONDS
            ) as lock:
                return _failed(store, tenant.name, error, "crash", lock, time.monotonic() - t0)
        except TenantBusy:
            raise exc from None  # another sync took the tenant over: it records its own outcome


# A lost lock means another sync owns the tenant now; a Redis outage means nothing can be written.
_NOT_RECORDABLE = (
    TenantBusy,
    LockLost,
    ConcurrentCommit,
    redis.ConnectionError,
    redis.TimeoutError,
)
_CRASH_TEXT_LIMIT = 500


def _crash_text(exc: BaseException, tenant: TenantConfig) -> str:
    """A short description of an unexpected exception, scrubbed like every other error text
    (the tenant's own secrets registered first, in case the crash came before sign-in)."""
    with contextlib.suppress(OSError):
        register_secret(tenant.secret())
    if tenant.certificate is not None:
        register_secret(tenant.certificate.pfx_password)
    return scrub(f"unexpected {type(exc).__name__}: {exc}", _CRASH_TEXT_LIMIT)


def _failed(
    store: SnapshotStore,
    tenant: str,
    error: str,
    stage: str,
    lock: TenantLock,
    duration_seconds: float,
    collected: CollectResult | None = None,
) -> SyncSummary:
    """Record a failed sync (status "failed", one `mde.sync.failed` event) and summarise it."""
    meta = collected.meta() if collected is not None else None
    record_failed_sync(store, tenant=tenant, error=error, stage=stage, meta=meta, lock=lock)
    return SyncSummary(
        tenant,
        "failed",
        store.generation(tenant),
        duration_seconds,
        requests=collected.stats.to_dict() if collected is not None else {},
        events={"mde.sync.failed": 1},
        error=error,
    )


def _run_sync(
    settings: Settings,
    tenant: TenantConfig,
    client: redis.Redis,
    store: SnapshotStore,
    *,
    accept_drop: bool,
    progress: Progress,
    budget: Budget | None,
    defer_query_rules: bool,
    lane: str,
) -> SyncSummary:
    """`run_sync` without the crash handling."""
    with TenantLock(
        client, settings.redis_prefix, tenant.name, ttl_seconds=LOCK_TTL_SECONDS
    ) as lock:
        collected = collect_tenant(
            settings, tenant, redis_client=client, progress=progress, budget=budget, lane=lane
        )
        if collected.graph is None:
            error = str(collected.auth_error)
            log.warning("sync failed", extra={"tenant": tenant.name, "error": error})
            return _failed(
                store, tenant.name, error, "auth", lock, collected.duration_seconds, collected
            )
        progress("diff and commit", 0, None)
        result = detect_and_commit(
            store,
            tenant=tenant.name,
            graph=collected.graph,
            meta=collected.meta(),
            detect=settings.detect,
            events=settings.events,
            lock=lock,
            accept_drop=accept_drop,
        )
        _record_logon_refresh(client, settings, tenant.name, collected)
        collected.after_commit()  # the users and groups delta states, only once committed
        queries = evaluate_after_commit(
            client, settings, tenant.name, result, collected.graph, defer=defer_query_rules
        )
    summary = _summary(collected, result)
    for typ, n in queries.counts.items():  # query alert rules' entered / left events
        summary.events[typ] = summary.events.get(typ, 0) + n
    summary.query_rules, summary.query_rules_deferred = queries.rules, queries.deferred
    summary.lane = lane
    return summary


def _record_logon_refresh(
    client: redis.Redis, settings: Settings, tenant: str, collected: CollectResult
) -> None:
    """After the commit: remember which machines' logon users were refreshed, forget gone ones."""
    if collected.logon is None or collected.machine_ids is None:
        return
    gone = collected.ledger_machines - set(collected.machine_ids)
    RefreshLedger(client, settings.redis_prefix, tenant).record(
        collected.logon.refreshed, gone, collected.logon.not_found
    )


def _summary(collected: CollectResult, result: CommitResult) -> SyncSummary:
    graph = collected.graph
    assert graph is not None
    incomplete = {
        scope: status.error
        for scope, status in graph.scopes.items()
        # a planned skip (logon-user rotation, scopes outside the lane: no error) is not
        # worth a line
        if status.state is not ScopeState.COMPLETE
        and (status.error or status.state is not ScopeState.SKIPPED)
    }
    events = Counter(ev["type"] for ev in result.events)
    return SyncSummary(
        tenant=collected.tenant,
        status=result.status,
        generation=result.generation,
        duration_seconds=collected.duration_seconds,
        counts=dict(result.counts),
        requests=collected.stats.to_dict(),
        events=dict(sorted(events.items())),
        scopes_incomplete=incomplete,
        baseline=result.baseline,
        notes=list(collected.notes),
    )
