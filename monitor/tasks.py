"""Celery tasks: thin wrappers that call the stages (sync, alert dispatch, one delivery).

- `sync_tenant(tenant)` (queue `sync`): collect -> diff -> commit under the tenant's Redis lock; a
  busy tenant is reported, not retried (another sync is doing the work), except when the message was
  redelivered after a worker died: then the dead worker's lock is waited out with a few spaced retries.
  After a commit with events, `dispatch` is enqueued. When a query evaluator is alive, the
  tenant's query rules are left to it: the sync stores its change set and enqueues
  `evaluate_queries`; otherwise it evaluates them itself.
- `evaluate_queries(tenant)` (queue `query`, one long-lived process): the tenant's query alert
  rules over its latest snapshot, from the graph that process keeps (monitor.alerts.query_evaluator).
- `dispatch()` (queue `dispatch`, also every 30 s from beat): rules -> groups -> queued deliveries,
  then one `deliver` per due delivery. Runs are serialized by a Redis lock; a run requested while
  another is in progress makes that one loop once more.
- `deliver(delivery_id)` (queue `deliver`): one attempt. Retries are the Dispatcher's own schedule
  (the delivery's `next_at` in Redis): the periodic `dispatch` enqueues it again when due.

Every task reads the config per run (cached by mtime) and logs JSON lines carrying its task id.
"""

from __future__ import annotations

import logging
import os
import random
import time
from contextvars import Token
from pathlib import Path
from typing import Any

import redis
from celery import Task, signals
from celery.exceptions import Reject, SoftTimeLimitExceeded

from monitor.celery_app import (
    DELIVER_TASK,
    DISPATCH_TASK,
    QUERY_TASK,
    SYNC_TASK,
    RunOptions,
    app,
    settings_cache,
    soft_limit,
)
from monitor.collect.progress import Progress, throttled
from monitor.config import ConfigError, Settings
from monitor.events.envelope import utc_now_iso
from monitor.locks import Renewer, make_lock, release, try_acquire
from monitor.logs import log_context
from monitor.metrics import record_sync
from monitor.model.schema import LANE_FULL
from monitor.redis_conn import connect, describe_error, is_redis_error
from monitor.status import record_run

log = logging.getLogger(__name__)

BUSY_RETRIES = 3  # only for redelivered syncs: wait out a dead worker's tenant lock
REDIS_RETRIES = 20  # a sync that lost Redis: retried with backoff (about an hour and a half)
REDIS_RETRY_MAX_S = 300.0
DISPATCH_LOCK_TTL_S = 30.0  # the dispatch run lock, renewed every 10 s while the run lives

_OPTIONS: RunOptions = app.conf.mde_options
_clients: dict[tuple[int, str], redis.Redis] = {}
_dispatchers: dict[tuple[Any, ...], Any] = {}
_pinned: list[Settings] = []
_log_tokens: dict[str, Token[dict[str, Any]]] = {}

_RECORD_FIELDS = (
    "status",
    "generation",
    "baseline",
    "duration_seconds",
    "counts",
    "events",
    "error",
    "scopes_incomplete",
)


def task_settings() -> Settings:
    """The config as of now, pinned to the Redis URL and prefix this worker was started with.

    Changing `redis_url`/`redis_prefix` needs a worker restart: the broker and every worker must
    share them (so API budgets and locks are shared too).
    """
    settings = settings_cache.get()
    if _pinned and _pinned[0] is settings:
        return _pinned[1]
    url, prefix = app.conf.mde_redis_url, app.conf.mde_prefix
    if settings.redis_prefix != prefix:
        log.warning(
            "redis_prefix changed in the config; restart workers to use it",
            extra={"running_with": prefix},
        )
    if settings.redis_url != url or settings.redis_prefix != prefix:
        pinned = settings.model_copy(update={"redis_url": url, "redis_prefix": prefix})
    else:
        pinned = settings
    _pinned[:] = [settings, pinned]  # the config version in use, and its pinned copy
    return pinned


def task_redis(settings: Settings) -> redis.Redis:
    """One client (connection pool) per worker process and URL."""
    key = (os.getpid(), settings.redis_url)
    client = _clients.get(key)
    if client is None:
        client = connect(settings.redis_url, health_check_interval=25)
        _clients[key] = client
    return client


def _alerts_signature(alerts_dir: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        files = sorted(alerts_dir.glob("*.y*ml"))
        return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    except OSError:
        return ()


def task_dispatcher(settings: Settings, client: redis.Redis, consumer: str) -> Any:
    """A Dispatcher, rebuilt only when the config or a rule/sink file changed."""
    from monitor.alerts.dispatch import Dispatcher

    key = (os.getpid(), id(settings), consumer, _alerts_signature(Path(settings.alerts_dir)))
    d = _dispatchers.get(key)
    if d is None:
        stale = [k for k in _dispatchers if k[1:2] != key[1:2] or k[3] != key[3]]
        for k in stale:  # built from an older config or rule files
            del _dispatchers[k]
        d = Dispatcher(settings, client, consumer=consumer)
        _dispatchers[key] = d
    return d


def _redelivered(task: Task) -> bool:
    return bool((task.request.delivery_info or {}).get("redelivered"))


def _busy_countdown(client: redis.Redis, prefix: str, tenant: str) -> float:
    """Seconds until the tenant's lock expires by itself (a dead holder stops renewing it)."""
    from monitor import sync
    from monitor.snapshot.lock import lock_key

    try:
        pttl: Any = client.pttl(lock_key(prefix, tenant))
    except redis.RedisError:
        pttl = None
    if isinstance(pttl, int) and pttl > 0:
        return pttl / 1000 + 1.0
    if pttl == -2:  # released meanwhile
        return 0.5
    return max(1.0, float(sync.LOCK_TTL_SECONDS) / BUSY_RETRIES)


@app.task(
    bind=True,
    name=SYNC_TASK,
    soft_time_limit=soft_limit(_OPTIONS.sync_time_limit),
    time_limit=_OPTIONS.sync_time_limit,
    max_retries=BUSY_RETRIES,
)
def sync_tenant(
    self: Task,
    tenant: str,
    origin: str = "manual",
    accept_drop: bool = False,
    lane: str = LANE_FULL,
) -> dict[str, Any]:
    """Sync one tenant now (`lane` "identity": its identity lane only); returns the
    SyncSummary as a dict (status busy/skipped/...)."""
    from monitor.snapshot.lock import TenantBusy
    from monitor.sync import run_sync

    ctx = log_context.set({**log_context.get(), "tenant": tenant})
    try:
        settings = task_settings()
        client = task_redis(settings)
        record: dict[str, Any] = {
            "task_id": self.request.id,
            "tenant": tenant,
            "origin": origin,
            "lane": lane,
            "worker": self.request.hostname,
            "pid": os.getpid(),
            "started": utc_now_iso(),
            "redelivered": _redelivered(self),
            "retries": self.request.retries,
        }
        started = time.monotonic()

        def finish(result: dict[str, Any]) -> dict[str, Any]:
            record.update(
                finished=utc_now_iso(),
                elapsed_seconds=round(time.monotonic() - started, 3),
                **{k: result.get(k) for k in _RECORD_FIELDS if k in result},
            )
            record["events_total"] = sum((result.get("events") or {}).values())
            try:
                record_run(client, settings.redis_prefix, record)
                record_sync(client, settings.redis_prefix, {"lane": lane, **result})
            except redis.RedisError as exc:
                log.warning("could not record the sync", extra={"error": str(exc)})
            return result

        try:
            settings.tenant(tenant)
        except ConfigError as exc:
            log.warning("tenant not in the config (removed?)", extra={"error": str(exc)})
            return finish({"tenant": tenant, "status": "skipped", "error": str(exc)})
        log.info("sync started", extra={"origin": origin, "redelivered": record["redelivered"]})
        try:
            summary = run_sync(
                settings,
                tenant,
                redis_client=client,
                accept_drop=accept_drop,
                progress=_log_progress(),
                defer_query_rules=_evaluator_alive(client, settings.redis_prefix),
                lane=lane,
            )
        except TenantBusy as exc:
            result = finish({"tenant": tenant, "status": "busy", "error": str(exc)})
            if record["redelivered"] and self.request.retries < BUSY_RETRIES:
                countdown = _busy_countdown(client, settings.redis_prefix, tenant)
                log.info("tenant busy after a redelivery; retrying", extra={"in_s": countdown})
                raise self.retry(countdown=countdown, exc=exc) from None
            log.info(
                "tenant busy: another sync is running", extra={"holder": str(exc), "lane": lane}
            )
            return result
        except SoftTimeLimitExceeded:
            log.error("sync hit its time limit", extra={"limit_s": _OPTIONS.sync_time_limit})
            return finish({"tenant": tenant, "status": "failed", "error": "time limit exceeded"})
        except Exception as exc:
            if is_redis_error(exc):
                _retry_on_redis_error(self, exc)
            finish({"tenant": tenant, "status": "error", "error": f"{type(exc).__name__}: {exc}"})
            raise
        result = finish(summary.to_dict())
        log.info(
            "sync finished",
            extra={
                "status": summary.status,
                "generation": summary.generation,
                "events": sum(summary.events.values()),
                "duration_s": round(summary.duration_seconds, 3),
            },
        )
        if summary.query_rules_deferred:
            _enqueue_query_rules(settings, client, tenant)
        if summary.events:
            _enqueue_dispatch()
        return result
    finally:
        log_context.reset(ctx)


def _enqueue_dispatch() -> None:
    """Alert dispatch now, for new events (the broker away: the periodic dispatch catches up)."""
    try:
        dispatch.apply_async()
    except Exception as exc:
        log.warning("could not enqueue dispatch", extra={"error": type(exc).__name__})


def _evaluator_alive(client: redis.Redis, prefix: str) -> bool:
    from monitor.alerts.query_evaluator import evaluator_alive

    try:
        return evaluator_alive(client, prefix)
    except redis.RedisError:
        return False  # the sync will find out; evaluating inline needs nobody else


def _enqueue_query_rules(settings: Settings, client: redis.Redis, tenant: str) -> None:
    """Hand the tenant's query rules to the evaluator; evaluate them here if that fails."""
    try:
        evaluate_queries.apply_async((tenant,))
        return
    except Exception as exc:
        log.warning("could not enqueue query rules", extra={"error": type(exc).__name__})
    from monitor.alerts.query_rules import evaluate_latest

    try:
        evs = evaluate_latest(client, settings, tenant)
    except Exception:  # the next sync's evaluation catches up (sets are compared, not events)
        log.exception("query rules could not be evaluated", extra={"tenant": tenant})
        return
    if any(e.events for e in evs):
        _enqueue_dispatch()


QUERY_BUSY_RETRIES = 10


@app.task(
    bind=True,
    name=QUERY_TASK,
    soft_time_limit=soft_limit(_OPTIONS.sync_time_limit),
    time_limit=_OPTIONS.sync_time_limit,
    max_retries=QUERY_BUSY_RETRIES,
)
def evaluate_queries(self: Task, tenant: str) -> dict[str, Any]:
    """The tenant's query alert rules over its latest committed snapshot (see query_evaluator)."""
    from monitor.alerts.query_rules import EvaluationBusy, evaluate_latest

    ctx = log_context.set({**log_context.get(), "tenant": tenant})
    try:
        settings = task_settings()
        client = task_redis(settings)
        try:
            settings.tenant(tenant)
        except ConfigError as exc:
            return {"tenant": tenant, "status": "skipped", "error": str(exc)}
        try:
            evs = evaluate_latest(client, settings, tenant, long_lived=True)
        except EvaluationBusy as exc:
            raise self.retry(countdown=5.0, exc=exc) from None
        except Exception as exc:
            if is_redis_error(exc):
                _retry_on_redis_error(self, exc)
            raise
        events = sum(len(e.events) for e in evs)
        if events:
            _enqueue_dispatch()
        return {
            "tenant": tenant,
            "status": "ok",
            "rules": len(evs),
            "evaluated": sum(not e.skipped for e in evs),
            "incremental": sum(e.incremental for e in evs),
            "errors": sum(e.error is not None for e in evs),
            "events": events,
        }
    finally:
        log_context.reset(ctx)


PROGRESS_EVERY_S = 30.0


def _log_progress(every_s: float = PROGRESS_EVERY_S) -> Progress:
    """A sync progress callback that logs each stage at most every `every_s` (and when done)."""

    def emit(stage: str, done: int, total: int | None) -> None:
        log.info("sync progress", extra={"stage": stage, "done": done, "total": total})

    return throttled(emit, every_s)


def redis_retry_delay(retries: int) -> float:
    """Backoff before retrying a sync that lost Redis: 5 s doubling to 5 min, +-20% jitter."""
    base = min(REDIS_RETRY_MAX_S, 5.0 * 2**retries)
    return round(base * random.uniform(0.8, 1.2), 3)


def _retry_on_redis_error(task: Task, exc: BaseException) -> None:
    """Retry a sync that failed because Redis (or the broker) went away; never ack it as failed.

    The snapshot is committed atomically, so a sync cut short by Redis left nothing half-written;
    running it again is safe. If the retry cannot even be published (the broker is the same Redis),
    the message is rejected for redelivery instead of being dropped.
    """
    why = describe_error(exc)
    if task.request.retries >= REDIS_RETRIES:
        log.error("sync failed: Redis unavailable, giving up", extra={"error": why})
        return
    countdown = redis_retry_delay(task.request.retries)
    log.warning(
        "sync interrupted: Redis unavailable; retrying", extra={"error": why, "in_s": countdown}
    )
    try:
        raise task.retry(countdown=countdown, exc=exc, max_retries=REDIS_RETRIES)
    except Reject:
        raise Reject(why, requeue=True) from None


def _dispatch_keys(prefix: str) -> tuple[str, str]:
    return f"{prefix}:run:dispatch:lock", f"{prefix}:run:dispatch:again"


def queued_marker_key(prefix: str, delivery_id: str) -> str:
    """Set while a `deliver` task for this delivery is queued or running."""
    return f"{prefix}:run:deliver:queued:{delivery_id}"


def enqueue_due_deliveries(dispatcher: Any, client: redis.Redis, prefix: str) -> int:
    """One `deliver` task per due delivery that has none queued yet; returns how many."""
    lease = float(getattr(dispatcher.ruleset.delivery, "lease", 120.0))
    ttl_ms = int((max(lease, _OPTIONS.deliver_time_limit) + 5.0) * 1000)
    n = 0
    for did in dispatcher.due_deliveries():
        if client.set(queued_marker_key(prefix, did), "1", nx=True, px=ttl_ms):
            deliver.apply_async((did,))
            n += 1
    return n


@app.task(
    bind=True,
    name=DISPATCH_TASK,
    ignore_result=True,
    soft_time_limit=soft_limit(_OPTIONS.dispatch_time_limit),
    time_limit=_OPTIONS.dispatch_time_limit,
)
def dispatch(self: Task) -> dict[str, Any]:
    """Evaluate new events against the rules, queue deliveries, enqueue the due ones."""
    settings = task_settings()
    client = task_redis(settings)
    lock_key, again_key = _dispatch_keys(settings.redis_prefix)
    ttl_ms = int(_OPTIONS.dispatch_time_limit * 1000) + 5000
    # renewed while the run lives: a run that dies, or loses Redis before its release, holds
    # dispatch up for one short TTL, not for the whole time limit
    lock_ttl = min(DISPATCH_LOCK_TTL_S, ttl_ms / 1000)
    run_lock = make_lock(client, lock_key, lock_ttl)
    if not try_acquire(run_lock):
        client.set(again_key, "1", px=ttl_ms)  # the running one loops once more
        return {"status": "busy"}
    renewer = Renewer(run_lock, lock_ttl)
    totals: dict[str, int] = {}
    enqueued = 0
    try:
        for _ in range(10):
            client.delete(again_key)
            d = task_dispatcher(settings, client, consumer="dispatch")
            stats = d.run_once()
            for k, v in stats.to_dict().items():
                totals[k] = totals.get(k, 0) + int(v)
            enqueued += enqueue_due_deliveries(d, client, settings.redis_prefix)
            if not client.exists(again_key):
                break
    finally:
        renewer.stop()
        release(run_lock)
    if totals.get("read") or enqueued:
        log.info("dispatch", extra={**totals, "enqueued": enqueued})
    status = "blocked" if totals.get("blocked") else "ok"
    return {"status": status, "enqueued": enqueued, **totals}


@app.task(
    bind=True,
    name=DELIVER_TASK,
    ignore_result=True,
    soft_time_limit=soft_limit(_OPTIONS.deliver_time_limit),
    time_limit=_OPTIONS.deliver_time_limit,
    max_retries=5,
)
def deliver(self: Task, delivery_id: str) -> dict[str, Any]:
    """One delivery attempt (the Dispatcher schedules retries and dead letters)."""
    settings = task_settings()
    client = task_redis(settings)
    consumer = f"{self.request.hostname or 'worker'}:{os.getpid()}"
    d = task_dispatcher(settings, client, consumer=consumer)
    marker = queued_marker_key(settings.redis_prefix, delivery_id)
    outcome = d.deliver(delivery_id)
    if outcome.status == "busy":
        # another worker holds the delivery's lease; after a crash it expires by itself
        if _redelivered(self) and self.request.retries < 5:
            lease_ms: Any = client.pttl(d.queue.lease_key(delivery_id))
            countdown = max(
                0.5, (int(lease_ms) if lease_ms and int(lease_ms) > 0 else 1000) / 1000 + 0.5
            )
            raise self.retry(countdown=countdown)
        return dict(outcome.to_dict())
    client.delete(marker)  # (the Dispatcher counted the attempt in the metrics)
    if outcome.status in ("retrying", "dead", "held"):
        log.warning(
            "delivery not done",
            extra={"delivery": delivery_id, "sink": outcome.sink, "status": outcome.status},
        )
    return dict(outcome.to_dict())


@signals.task_prerun.connect
def _task_log_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Attach the Celery task id (and name) to every log line the task writes."""
    if task_id:
        _log_tokens[task_id] = log_context.set(
            {"task_id": task_id, "task": getattr(task, "name", None)}
        )


@signals.task_postrun.connect
def _task_log_context_done(task_id: str | None = None, **_: Any) -> None:
    token = _log_tokens.pop(task_id or "", None)
    if token is not None:
        try:
            log_context.reset(token)
        except ValueError:  # set in another context (thread pools)
            log_context.set({})


@signals.worker_process_init.connect
def _fresh_clients(**_: Any) -> None:
    """Forked pool processes never reuse the parent's Redis connections."""
    _clients.clear()
    _dispatchers.clear()
    _pinned.clear()
