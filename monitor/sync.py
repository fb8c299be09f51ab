"""One sync of one tenant: collect -> model -> diff -> commit snapshot and events, under its lock."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.collect.collector import CollectResult, collect_tenant
from monitor.collect.logon_users import RefreshLedger
from monitor.collect.progress import Progress, no_progress
from monitor.config import Settings
from monitor.model.graph import ScopeState
from monitor.model.schema import SCOPE_LOGON_USERS
from monitor.redis_conn import connect
from monitor.snapshot.commit import CommitResult, detect_and_commit, record_failed_sync
from monitor.snapshot.lock import TenantLock
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "status": self.status,
            "generation": self.generation,
            "baseline": self.baseline,
            "duration_seconds": round(self.duration_seconds, 3),
            "counts": self.counts,
            "requests": self.requests,
            "events": self.events,
            "scopes_incomplete": self.scopes_incomplete,
            "error": self.error,
        }


def run_sync(
    settings: Settings,
    tenant_name: str,
    *,
    redis_client: redis.Redis | None = None,
    accept_drop: bool = False,
    progress: Progress = no_progress,
) -> SyncSummary:
    """Collect the tenant, diff against its snapshot and commit atomically.

    Raises TenantBusy when another sync of the tenant holds the lock.
    """
    tenant = settings.tenant(tenant_name)
    client = redis_client or connect(settings.redis_url)
    store = SnapshotStore(client, settings.redis_prefix)
    with TenantLock(
        client, settings.redis_prefix, tenant.name, ttl_seconds=LOCK_TTL_SECONDS
    ) as lock:
        collected = collect_tenant(settings, tenant, redis_client=client, progress=progress)
        if collected.graph is None:
            error = str(collected.auth_error)
            record_failed_sync(
                store,
                tenant=tenant.name,
                error=error,
                stage="auth",
                meta=collected.meta(),
                lock=lock,
            )
            log.warning("sync failed", extra={"tenant": tenant.name, "error": error})
            return SyncSummary(
                tenant.name,
                "failed",
                store.generation(tenant.name),
                collected.duration_seconds,
                requests=collected.stats.to_dict(),
                events={"mde.sync.failed": 1},
                error=error,
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
        if collected.identity is not None:
            collected.identity.after_commit()  # the groups delta link, only once committed
    return _summary(collected, result)


def _record_logon_refresh(
    client: redis.Redis, settings: Settings, tenant: str, collected: CollectResult
) -> None:
    """After the commit: remember which machines' logon users were refreshed, forget gone ones."""
    if collected.logon is None or collected.machine_ids is None:
        return
    gone = collected.ledger_machines - set(collected.machine_ids)
    RefreshLedger(client, settings.redis_prefix, tenant).record(collected.logon.refreshed, gone)


def _summary(collected: CollectResult, result: CommitResult) -> SyncSummary:
    graph = collected.graph
    assert graph is not None
    incomplete = {
        scope: status.error
        for scope, status in graph.scopes.items()
        # a planned logon-user rotation (skipped, no error) is not worth a line
        if status.state is not ScopeState.COMPLETE
        and (status.error or not scope.startswith(f"{SCOPE_LOGON_USERS}:"))
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
    )
