"""The tenant schedule: one redbeat entry per enabled tenant (`sync:<tenant>`), and one for its
identity lane (`sync:<tenant>:identity`) when that is on, reconciled with the config file.

Beat runs `MonitorScheduler` (redbeat's scheduler: schedule and lock in Redis, so of several beat
processes exactly one is active). On its ticks the active beat checks the config file's mtime and,
when it changed, upserts/deletes the `sync:<tenant>` entries - no restart needed. DISABLED tenants
are never scheduled (`mde-monitor trigger` still syncs them on demand).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis
from celery import Celery
from celery.schedules import schedule as every
from redbeat.schedulers import RedBeatScheduler, RedBeatSchedulerEntry, get_redis
from redis.exceptions import LockNotOwnedError

from monitor.config import ConfigError, Settings, config_path, load_settings
from monitor.model.schema import LANE_FULL, LANE_IDENTITY

log = logging.getLogger(__name__)

SYNC_TASK = "monitor.tasks.sync_tenant"
SYNC_ENTRY_PREFIX = "sync:"
RECONCILE_CHECK_SECONDS = 5.0  # how often the active beat stats the config file


def redbeat_key_prefix(prefix: str) -> str:
    """Redbeat's key prefix for a deployment's `redis_prefix`."""
    return f"{prefix}:redbeat:"


def schedule_key(prefix: str) -> str:
    """Redbeat's sorted set of entry keys scored by their next due time (unix seconds)."""
    return redbeat_key_prefix(prefix) + ":schedule"


def sync_entry_name(tenant: str) -> str:
    return f"{SYNC_ENTRY_PREFIX}{tenant}"


def sync_entry_key(prefix: str, tenant: str) -> str:
    return redbeat_key_prefix(prefix) + sync_entry_name(tenant)


def identity_entry_name(tenant: str) -> str:
    """The tenant's identity lane (tenant names have no colon)."""
    return f"{SYNC_ENTRY_PREFIX}{tenant}:{LANE_IDENTITY}"


@dataclass(frozen=True)
class SyncSchedule:
    """A tenant's sync (of `lane`) every `seconds`."""

    tenant: str
    seconds: float
    lane: str = LANE_FULL

    def kwargs(self) -> dict[str, Any]:
        if self.lane == LANE_FULL:
            return {"origin": "schedule"}
        return {"origin": "schedule", "lane": self.lane}


def desired_schedule(
    settings: Settings,
    override_seconds: float | None = None,
    identity_override: float | None = None,
) -> dict[str, SyncSchedule]:
    """Entry name -> schedule for every tenant not DISABLED, and its identity lane when that
    is shorter (`override_seconds`, `identity_override`: demo, tests, benches)."""
    out: dict[str, SyncSchedule] = {}
    for t in settings.tenants:
        seconds = t.polling_interval.seconds
        if seconds is None:
            continue
        full = override_seconds or float(seconds)
        out[sync_entry_name(t.name)] = SyncSchedule(t.name, full)
        fast = t.identity_seconds()
        if fast is not None:
            fast_s = identity_override or float(fast)
            if fast_s < full:
                out[identity_entry_name(t.name)] = SyncSchedule(t.name, fast_s, LANE_IDENTITY)
    return out


@dataclass
class ReconcileResult:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def touched(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def _existing_sync_entries(app: Celery) -> dict[str, RedBeatSchedulerEntry]:
    client = get_redis(app)
    prefix = app.redbeat_conf.key_prefix + SYNC_ENTRY_PREFIX
    out: dict[str, RedBeatSchedulerEntry] = {}
    for key in client.scan_iter(match=f"{prefix}*", count=500):
        try:
            entry = RedBeatSchedulerEntry.from_key(key, app=app)
        except KeyError:
            continue
        out[entry.name] = entry
    return out


def _seconds_of(entry: RedBeatSchedulerEntry) -> float | None:
    run_every = getattr(entry.schedule, "run_every", None)
    return run_every.total_seconds() if isinstance(run_every, timedelta) else None


def reconcile(
    app: Celery, settings: Settings, override_seconds: float | None = None
) -> ReconcileResult:
    """Make the redbeat sync entries match the config; keeps each entry's last run time."""
    from redbeat.schedulers import ensure_conf

    ensure_conf(app)
    desired = desired_schedule(settings, override_seconds, identity_every_override())
    existing = _existing_sync_entries(app)
    result = ReconcileResult()
    for name, spec in desired.items():
        old = existing.get(name)
        if (
            old is not None
            and _seconds_of(old) == spec.seconds
            and list(old.args or []) == [spec.tenant]
            and dict(old.kwargs or {}) == spec.kwargs()
            and old.task == SYNC_TASK
        ):
            result.unchanged.append(name.removeprefix(SYNC_ENTRY_PREFIX))
            continue
        entry = RedBeatSchedulerEntry(
            name,
            SYNC_TASK,
            every(timedelta(seconds=spec.seconds)),
            args=[spec.tenant],
            kwargs=spec.kwargs(),
            # a queued sync older than one interval is dropped: the next one is on its way
            options={"queue": "sync", "expires": spec.seconds},
            app=app,
        )
        if old is None:
            # a new tenant is synced at once, not one interval later; its identity lane waits
            # one interval (it needs the first full sync's snapshot)
            entry.last_run_at = None if spec.lane == LANE_FULL else app.now()
        entry.save()
        if old is not None and old.last_run_at is not None:
            entry.reschedule(old.last_run_at)  # the new interval counts from the last run
            result.changed.append(name.removeprefix(SYNC_ENTRY_PREFIX))
        else:
            result.added.append(name.removeprefix(SYNC_ENTRY_PREFIX))
    for name, entry in existing.items():
        if name not in desired:
            entry.delete()
            result.removed.append(name.removeprefix(SYNC_ENTRY_PREFIX))
    if result.touched:
        log.info(
            "schedule reconciled",
            extra={"added": result.added, "changed": result.changed, "removed": result.removed},
        )
    return result


def sync_every_override() -> float | None:
    """$MDE_MONITOR_SYNC_EVERY (seconds): one interval for every enabled tenant (demo, tests)."""
    return _seconds_env("MDE_MONITOR_SYNC_EVERY")


def identity_every_override() -> float | None:
    """$MDE_MONITOR_IDENTITY_EVERY (seconds): one identity-lane interval (tests, benches)."""
    return _seconds_env("MDE_MONITOR_IDENTITY_EVERY")


def _seconds_env(name: str) -> float | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"environment: {name}: not a number: {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"environment: {name}: must be > 0, got {raw!r}")
    return value


class MonitorScheduler(RedBeatScheduler):
    """Redbeat's scheduler plus the config reconcile, done by the active (lock-holding) beat."""

    def __init__(self, app: Celery, *args: Any, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        self._config_key: tuple[str, int, int, float | None] | None = None
        self._next_check = 0.0
        self._reported_error: str | None = None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One beat tick; a Redis outage is waited out (a lost lock still stops this beat)."""
        try:
            self.maybe_reconcile()
            interval: float = super().tick(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("beat: Redis unavailable, retrying", extra={"error": type(exc).__name__})
            return 1.0
        except LockNotOwnedError:
            # our lock expired (a stalled tick, a long Redis outage): another beat may be active
            # now. Become a standby instead of dying: block until the lock is ours again.
            log.error("beat: lost the scheduler lock; waiting to take it back")
            if self.lock is not None:
                self.lock.acquire()
                log.info("beat: Acquired lock")
            return 0.0
        return min(interval, RECONCILE_CHECK_SECONDS)

    def maybe_reconcile(self, force: bool = False) -> ReconcileResult | None:
        """Reconcile when the config file changed (checked at most every few seconds)."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return None
        self._next_check = now + RECONCILE_CHECK_SECONDS
        path = config_path()
        try:
            st = path.stat()
            key = (str(path), st.st_mtime_ns, st.st_size, sync_every_override())
            if not force and key == self._config_key:
                return None
            result = reconcile(self.app, load_settings(path), key[3])
        except (FileNotFoundError, ConfigError) as exc:
            # a missing or broken config never wipes the schedule: keep it until fixed
            error = str(exc) if isinstance(exc, ConfigError) else f"{path}: config file not found"
            if self._reported_error != error:
                log.error("config error: schedule kept as it was", extra={"error": error})
                self._reported_error = error
            return None
        self._config_key = key
        self._reported_error = None
        return result
