"""What the fleet is doing: each tenant's last sync and next run, event backlog, dead letters.

Workers append one record per sync task to a bounded Redis list per tenant (`record_run`); the
snapshot store's sync metadata covers syncs run from the CLI. `read_state` gathers everything in a
few pipelined round trips; `mde-monitor status` and the metrics collector both use it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import redis

from monitor.collect.budget import ENDPOINT_LIMITS
from monitor.config import Settings
from monitor.events.stream import stream_key
from monitor.model.schema import LANE_FULL, LANE_IDENTITY

log = logging.getLogger(__name__)

HISTORY_LIMIT = 200  # sync records kept per tenant
FAILED_STATUSES = ("failed", "error")
DISPATCH_BLOCKED = "dispatch blocked: rules not loaded"


def history_key(prefix: str, tenant: str, lane: str = LANE_FULL) -> str:
    """Redis list of the tenant's recent sync task records (of `lane`), newest first."""
    key = f"{prefix}:run:history:{tenant}"
    return key if lane == LANE_FULL else f"{key}:{lane}"


def record_run(client: redis.Redis, prefix: str, record: dict[str, Any]) -> None:
    """Append one sync task record (tenant, task_id, started, finished, status, lane, ...);
    each lane has its own list, so a lane that runs every minute crowds nothing out."""
    key = history_key(prefix, str(record["tenant"]), str(record.get("lane") or LANE_FULL))
    pipe = client.pipeline(transaction=False)
    pipe.lpush(key, json.dumps(record, default=str, separators=(",", ":")))
    pipe.ltrim(key, 0, HISTORY_LIMIT - 1)
    pipe.execute()


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def run_history(
    client: redis.Redis,
    prefix: str,
    tenant: str,
    limit: int = HISTORY_LIMIT,
    lane: str = LANE_FULL,
) -> list[dict[str, Any]]:
    """The tenant's recent sync task records (of `lane`), newest first."""
    raw: Any = client.lrange(history_key(prefix, tenant, lane), 0, limit - 1)
    return _records(raw)


def _records(raw: list[bytes | str]) -> list[dict[str, Any]]:
    """The JSON records of a history list (unreadable ones skipped)."""
    out = []
    for item in raw:
        try:
            out.append(json.loads(_s(item)))
        except ValueError:
            continue
    return out


def iso_to_ts(value: Any) -> float | None:
    """Unix time of an ISO-8601 string (None when absent or unparsable)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def ts_to_iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class LastSync:
    """The most recent sync of a tenant (by a worker, or from the CLI via the snapshot meta)."""

    status: str  # ok | degraded | failed | busy | error
    finished: str | None
    duration_seconds: float | None = None
    generation: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    task_id: str | None = None
    source: str = "worker"  # worker | snapshot

    @property
    def finished_ts(self) -> float | None:
        return iso_to_ts(self.finished)


@dataclass
class TenantState:
    name: str
    polling_interval: str | None
    last: LastSync | None
    last_completed: LastSync | None  # the last sync that was not "busy"
    generation: int | None
    next_run_ts: float | None
    running: dict[str, Any] | None = None  # the sync holding the tenant's lock (host, pid, since)
    identity_lane: LastSync | None = None  # the last identity-lane sync that was not "busy"

    @property
    def next_run(self) -> str | None:
        return ts_to_iso(self.next_run_ts)


@dataclass
class GroupState:
    """A consumer group on the all-tenants event stream."""

    name: str
    pending: int
    lag: int | None
    consumers: int


@dataclass
class State:
    tenants: list[TenantState]
    stream_length: int
    groups: list[GroupState]
    dead_letters: int | None  # None: the alert stage is not installed
    failed_deliveries: list[dict[str, Any]] = field(default_factory=list)
    budget_minute_ratio: dict[tuple[str, str], float] = field(default_factory=dict)
    dispatch_blocked: dict[str, Any] | None = None  # {reason, since, checked, errors}
    query_evaluator: str | None = None  # the live query evaluator's host:pid (None: syncs do it)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenants": [
                {
                    "name": t.name,
                    "polling_interval": t.polling_interval,
                    "last_sync": asdict(t.last) if t.last else None,
                    "last_completed_sync": asdict(t.last_completed) if t.last_completed else None,
                    "generation": t.generation,
                    "next_run": t.next_run,
                    "running": t.running,
                    "identity_lane": asdict(t.identity_lane) if t.identity_lane else None,
                }
                for t in self.tenants
            ],
            "events": {
                "stream_length": self.stream_length,
                "groups": [asdict(g) for g in self.groups],
                "pending": sum(g.pending for g in self.groups),
                "lag": sum(g.lag or 0 for g in self.groups),
            },
            "dead_letters": self.dead_letters,
            "failed_deliveries": self.failed_deliveries,
            "query_evaluator": self.query_evaluator,
            "dispatch": {
                "blocked": self.dispatch_blocked is not None,
                "message": DISPATCH_BLOCKED if self.dispatch_blocked else None,
                **(self.dispatch_blocked or {}),
            },
        }


def _from_record(rec: dict[str, Any]) -> LastSync:
    return LastSync(
        status=str(rec.get("status") or "unknown"),
        finished=rec.get("finished"),
        duration_seconds=rec.get("duration_seconds"),
        generation=rec.get("generation"),
        counts=dict(rec.get("counts") or {}),
        events=dict(rec.get("events") or {}),
        error=rec.get("error"),
        task_id=rec.get("task_id"),
    )


def _from_meta(meta: dict[str, Any]) -> LastSync | None:
    status = meta.get("status")
    if not status:
        return None
    counts = meta.get("counts") or {}
    return LastSync(
        status=str(status),
        finished=meta.get("finished"),
        duration_seconds=meta.get("duration_seconds"),
        generation=meta.get("generation"),
        counts={str(k): int(v) for k, v in counts.items() if isinstance(v, int | float)},
        error=meta.get("error"),
        source="snapshot",
    )


def _groups(client: redis.Redis, prefix: str) -> tuple[int, list[GroupState]]:
    key = stream_key(prefix)
    try:
        length = int(client.xlen(key))  # type: ignore[arg-type]
        infos: Any = client.xinfo_groups(key)
    except redis.ResponseError:  # no stream yet
        return 0, []
    groups = []
    for info in infos:
        info = {_s(k): v for k, v in info.items()}
        lag = info.get("lag")
        if lag is None:  # Redis < 7: count what follows the group's last delivered id
            last = _s(info.get("last-delivered-id") or "0-0")
            rest: Any = client.xrange(key, min=f"({last}", max="+", count=100_000)
            lag = len(rest)
        groups.append(
            GroupState(
                name=_s(info["name"]),
                pending=int(info.get("pending") or 0),
                lag=int(lag),
                consumers=int(info.get("consumers") or 0),
            )
        )
    return length, groups


def _dead_letters(
    client: redis.Redis, prefix: str, limit: int = 20
) -> tuple[int | None, list[dict[str, Any]]]:
    """(number of dead letters, the newest few) from the alert stage's delivery queue."""
    try:
        from monitor.alerts.deliver import DeliveryQueue
    except ImportError:  # pragma: no cover - alert stage not installed
        return None, []
    queue = DeliveryQueue(client, prefix)
    count = int(client.xlen(queue.dead_key))  # type: ignore[arg-type]
    return count, queue.dead_letters(limit) if count else []


def _dispatch_blocked(client: redis.Redis, prefix: str) -> dict[str, Any] | None:
    """What the dispatcher recorded while no rule loads (None: not blocked)."""
    try:
        from monitor.alerts.dispatch import dispatch_blocked_key
    except ImportError:  # pragma: no cover - alert stage not installed
        return None
    raw: Any = client.get(dispatch_blocked_key(prefix))
    if not raw:
        return None
    try:
        doc = orjson.loads(raw)
    except ValueError:
        return {"reason": "unreadable record"}
    return doc if isinstance(doc, dict) else {"reason": str(doc)}


def budget_minute_ratios(
    client: redis.Redis, prefix: str, tenants: list[str]
) -> dict[tuple[str, str], float]:
    """Calls in the last minute / documented per-minute limit, per tenant and endpoint.

    Reads `RedisBudget`'s windows (`<prefix>:budget:<tenant>:<endpoint>:m`, scored in ms).
    """
    if not tenants:
        return {}
    now_s, now_us = client.time()  # type: ignore[misc]
    now_ms = int(now_s) * 1000 + int(now_us) // 1000
    pipe = client.pipeline(transaction=False)
    pairs = [(t, ep) for t in tenants for ep in ENDPOINT_LIMITS]
    for t, ep in pairs:
        pipe.zcount(f"{prefix}:budget:{t}:{ep}:m", now_ms - 60_000, "+inf")
    out: dict[tuple[str, str], float] = {}
    for (t, ep), n in zip(pairs, pipe.execute(), strict=True):
        if n:
            out[(t, ep)] = int(n) / ENDPOINT_LIMITS[ep].per_minute
    return out


def read_state(
    client: redis.Redis,
    prefix: str,
    tenants: list[str],
    intervals: dict[str, str] | None = None,
) -> State:
    """Everything `status` and the metrics show, read from Redis."""
    from monitor.alerts.query_evaluator import evaluator_name
    from monitor.schedule import schedule_key, sync_entry_key
    from monitor.snapshot.lock import lock_key, read_holder
    from monitor.snapshot.store import SnapshotStore

    store = SnapshotStore(client, prefix)
    pipe = client.pipeline(transaction=False)
    for t in tenants:
        pipe.lrange(history_key(prefix, t), 0, 20)
        pipe.zscore(schedule_key(prefix), sync_entry_key(prefix, t))
        pipe.get(store.key(t, "gen"))  # SnapshotStore.generation / .meta, in one round trip
        pipe.get(store.key(t, "meta"))
        pipe.exists(lock_key(prefix, t))
        pipe.lrange(history_key(prefix, t, LANE_IDENTITY), 0, 20)
    results = pipe.execute() if tenants else []
    states: list[TenantState] = []
    for i, t in enumerate(tenants):
        history, score, gen, meta, locked, lane_history = results[6 * i : 6 * i + 6]
        records = _records(history)
        generation = int(gen or 0) or None
        meta_doc = orjson.loads(meta) if meta else {}
        # an identity-lane sync's metadata is not the last full sync's
        full_meta = meta_doc.get("lane", LANE_FULL) == LANE_FULL
        meta_last = _from_meta(meta_doc) if meta and full_meta else None
        last = _from_record(records[0]) if records else None
        completed = next((_from_record(r) for r in records if r.get("status") != "busy"), None)
        if meta_last is not None and (
            completed is None or (meta_last.finished_ts or 0) > (completed.finished_ts or 0) + 1
        ):
            completed = meta_last  # a newer sync ran from the CLI
            if last is None or (meta_last.finished_ts or 0) > (last.finished_ts or 0):
                last = meta_last
        states.append(
            TenantState(
                name=t,
                polling_interval=(intervals or {}).get(t),
                last=last,
                last_completed=completed,
                generation=generation
                if generation is not None
                else (completed.generation if completed else None),
                next_run_ts=float(score) if score is not None and float(score) > 0 else None,
                running=read_holder(client, prefix, t) if locked else None,
                identity_lane=next(
                    (_from_record(r) for r in _records(lane_history) if r.get("status") != "busy"),
                    None,
                ),
            )
        )
    length, groups = _groups(client, prefix)
    dead, failed = _dead_letters(client, prefix)
    return State(
        tenants=states,
        stream_length=length,
        groups=groups,
        dead_letters=dead,
        failed_deliveries=failed,
        budget_minute_ratio=budget_minute_ratios(client, prefix, tenants),
        dispatch_blocked=_dispatch_blocked(client, prefix),
        query_evaluator=evaluator_name(client, prefix),
    )


def collect_status(settings: Settings, client: redis.Redis) -> State:
    """`read_state` for the configured tenants."""
    return read_state(
        client,
        settings.redis_prefix,
        [t.name for t in settings.tenants],
        {t.name: t.polling_interval.value for t in settings.tenants},
    )


def any_failed(state: State) -> bool:
    """True when some tenant's last completed sync failed or dispatch is blocked (exit 1)."""
    return state.dispatch_blocked is not None or any(
        t.last_completed is not None and t.last_completed.status in FAILED_STATUSES
        for t in state.tenants
    )
