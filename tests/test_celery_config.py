"""Celery app configuration, URL handling and the redbeat schedule reconcile (real Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redbeat.schedulers import RedBeatSchedulerEntry

from monitor.celery_app import (
    DELIVER_TASK,
    DISPATCH_TASK,
    QUEUES,
    SYNC_TASK,
    RunOptions,
    SettingsCache,
    build_app,
    redis_urls,
    soft_limit,
)
from monitor.config import ConfigError, parse_settings
from monitor.schedule import (
    MonitorScheduler,
    desired_schedule,
    reconcile,
    schedule_key,
    sync_entry_key,
)

REPO = Path(__file__).resolve().parents[1]


def _settings(prefix: str, tenants: dict[str, str], **options: Any) -> object:
    return parse_settings(
        {
            "redis_prefix": prefix,
            "tenants": [
                {
                    "name": n,
                    "tenant_id": f"tid-{n}",
                    "client_id": "c",
                    "client_secret": "s",
                    "polling_interval": iv,
                    "identity_interval": "off",
                    **options.get(n, {}),
                }
                for n, iv in tenants.items()
            ],
        },
        "test",
    )


def test_redis_urls_tcp_and_sockets() -> None:
    tcp = redis_urls("redis://127.0.0.1:6379/3")
    assert tcp.broker == tcp.backend == tcp.client == "redis://127.0.0.1:6379/3"
    unix = redis_urls("unix:///tmp/r.sock?db=2")
    assert unix.broker == "redis+socket:///tmp/r.sock?virtual_host=2"
    assert unix.client == "unix:///tmp/r.sock?db=2"
    kombu = redis_urls("redis+socket:///tmp/r.sock?virtual_host=5")
    assert kombu.client == "unix:///tmp/r.sock?db=5"
    assert kombu.broker == "redis+socket:///tmp/r.sock?virtual_host=5"
    with pytest.raises(ValueError, match="unsupported Redis URL scheme"):
        redis_urls("http://example.com")


def test_reliability_settings_and_routes() -> None:
    settings = _settings("px", {"a": "ONE_HOUR"})
    app = build_app(settings, env={"REDIS_URL": "redis://127.0.0.1:6399/1"})  # type: ignore[arg-type]
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    opts = RunOptions()
    assert conf.broker_transport_options["visibility_timeout"] == opts.visibility_timeout
    assert opts.visibility_timeout > opts.sync_time_limit  # a running sync is never redelivered
    assert conf.broker_transport_options["global_keyprefix"] == "px:celery:"
    assert conf.redbeat_key_prefix == "px:redbeat:"
    assert conf.broker_url == "redis://127.0.0.1:6399/1"
    assert {q.name for q in conf.task_queues} == set(QUEUES)
    assert conf.task_routes[SYNC_TASK]["queue"] == "sync"
    assert conf.task_routes[DISPATCH_TASK]["queue"] == "dispatch"
    assert conf.task_routes[DELIVER_TASK]["queue"] == "deliver"
    assert conf.beat_scheduler == "monitor.schedule:MonitorScheduler"
    assert soft_limit(3600) == 3540 and 0 < soft_limit(10) < 10


def test_run_options_from_env_errors_name_the_variable() -> None:
    opts = RunOptions.from_env(
        {"MDE_MONITOR_VISIBILITY_TIMEOUT": "30", "MDE_MONITOR_METRICS_PORT": "9100"}
    )
    assert opts.visibility_timeout == 30 and opts.metrics_port == 9100
    with pytest.raises(ConfigError, match="MDE_MONITOR_SYNC_TIME_LIMIT"):
        RunOptions.from_env({"MDE_MONITOR_SYNC_TIME_LIMIT": "soon"})
    with pytest.raises(ConfigError, match="MDE_MONITOR_METRICS_PORT"):
        RunOptions.from_env({"MDE_MONITOR_METRICS_PORT": "http"})


def test_import_without_config_file_falls_back_to_env(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "REDIS_URL": "redis://127.0.0.1:6390/4"}
    env.pop("MDE_MONITOR_CONFIG", None)
    code = (
        "import monitor.celery_app as c, monitor.tasks as t;"
        "print(c.app.conf.broker_url, c.app.conf.mde_prefix, sorted(k for k in c.app.tasks if k.startswith('monitor.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "redis://127.0.0.1:6390/4"
    assert out.stdout.split()[1] == "mde"
    for name in (SYNC_TASK, DISPATCH_TASK, DELIVER_TASK):
        assert name in out.stdout


def test_settings_cache_rereads_on_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text(yaml.safe_dump({"redis_prefix": "one"}))
    monkeypatch.setenv("MDE_MONITOR_CONFIG", str(cfg))
    cache = SettingsCache()
    first = cache.get()
    assert first.redis_prefix == "one" and cache.get() is first
    cfg.write_text(yaml.safe_dump({"redis_prefix": "second"}))
    assert cache.get().redis_prefix == "second"
    cfg.unlink()
    with pytest.raises(ConfigError, match="config file not found"):
        cache.get()


def test_desired_schedule_skips_disabled() -> None:
    s = _settings("p", {"a": "ONE_HOUR", "b": "DISABLED", "c": "FOUR_HOURS"})
    got = desired_schedule(s)  # type: ignore[arg-type]
    assert {k: v.seconds for k, v in got.items()} == {"sync:a": 3600, "sync:c": 14400}
    assert {v.seconds for v in desired_schedule(s, 5).values()} == {5}  # type: ignore[arg-type]


def test_identity_lane_is_scheduled_when_shorter_and_cheap() -> None:
    s = _settings(
        "p",
        {"a": "ONE_HOUR", "b": "ONE_HOUR", "c": "ONE_HOUR", "d": "DISABLED", "e": "ONE_HOUR"},
        a={"identity_interval": "1m"},
        b={"identity_interval": "2m", "users_delta": False},  # each run would read every user
        d={"identity_interval": "1m"},  # not scheduled at all
        e={"identity_interval": "1d"},  # not shorter than the full lane
    )
    got = desired_schedule(s)  # type: ignore[arg-type]
    assert {k: (v.seconds, v.lane) for k, v in got.items()} == {
        "sync:a": (3600, "full"),
        "sync:a:identity": (60, "identity"),
        "sync:b": (3600, "full"),
        "sync:c": (3600, "full"),
        "sync:e": (3600, "full"),
    }
    assert got["sync:a:identity"].kwargs() == {"origin": "schedule", "lane": "identity"}
    assert got["sync:a"].kwargs() == {"origin": "schedule"}
    fast = desired_schedule(s, 30, 3)  # type: ignore[arg-type]
    assert fast["sync:a:identity"].seconds == 3 and fast["sync:a"].seconds == 30
    assert "sync:a:identity" not in desired_schedule(s, 30, 60)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="identity_interval"):
        _settings("p", {"a": "ONE_HOUR"}, a={"identity_interval": "5 fortnights"})


def test_reconcile_adds_the_identity_lane_one_interval_out(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    s = _settings(redis_prefix, {"a": "ONE_HOUR"}, a={"identity_interval": "1m"})
    app = build_app(s, env={"REDIS_URL": redis_url})  # type: ignore[arg-type]
    assert sorted(reconcile(app, s).added) == ["a", "a:identity"]  # type: ignore[arg-type]
    entry = RedBeatSchedulerEntry.from_key(sync_entry_key(redis_prefix, "a") + ":identity", app=app)
    assert entry.kwargs == {"origin": "schedule", "lane": "identity"}
    assert entry.options["expires"] == 60
    # the full sync goes first (it is due now); the lane needs its snapshot
    assert entry.last_run_at is not None and not entry.is_due().is_due
    assert _entry(app, redis_prefix, "a").last_run_at is None
    assert reconcile(app, s).touched is False  # type: ignore[arg-type]
    off = _settings(redis_prefix, {"a": "ONE_HOUR"})
    assert reconcile(app, off).removed == ["a:identity"]  # type: ignore[arg-type]


def _entry(app: object, prefix: str, tenant: str) -> RedBeatSchedulerEntry:
    return RedBeatSchedulerEntry.from_key(sync_entry_key(prefix, tenant), app=app)


def test_reconcile_adds_changes_and_removes_entries(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    s1 = _settings(redis_prefix, {"a": "ONE_HOUR", "b": "DISABLED", "c": "FOUR_HOURS"})
    app = build_app(s1, env={"REDIS_URL": redis_url})  # type: ignore[arg-type]
    r1 = reconcile(app, s1)  # type: ignore[arg-type]
    assert sorted(r1.added) == ["a", "c"] and not r1.removed
    a = _entry(app, redis_prefix, "a")
    assert a.task == SYNC_TASK and a.args == ["a"] and a.kwargs == {"origin": "schedule"}
    assert a.options["queue"] == "sync" and a.options["expires"] == 3600
    assert a.schedule.run_every == timedelta(hours=1)
    raw: Any = redis_client.zrange(schedule_key(redis_prefix), 0, -1)
    members = {m.decode() for m in raw}
    assert members == {sync_entry_key(redis_prefix, "a"), sync_entry_key(redis_prefix, "c")}

    last = datetime.now(UTC) - timedelta(minutes=10)
    a.reschedule(last)  # as if beat ran it 10 minutes ago
    assert reconcile(app, s1).touched is False  # type: ignore[arg-type]

    s2 = _settings(redis_prefix, {"a": "FOUR_HOURS", "b": "ONE_DAY", "d": "FIFTEEN_MINUTES"})
    r2 = reconcile(app, s2)  # type: ignore[arg-type]
    assert r2.changed == ["a"] and sorted(r2.added) == ["b", "d"] and r2.removed == ["c"]
    a2 = _entry(app, redis_prefix, "a")
    assert a2.schedule.run_every == timedelta(hours=4)
    assert abs((a2.last_run_at - last).total_seconds()) < 1  # the new interval counts from it
    score: Any = redis_client.zscore(schedule_key(redis_prefix), sync_entry_key(redis_prefix, "a"))
    # not due now; due no later than 4 h after the last run (redbeat scores the entry a little
    # early - it adds the remaining time to last_run_at - and checks is_due when it loads it)
    assert datetime.now(UTC).timestamp() < score <= (last + timedelta(hours=4)).timestamp() + 2
    assert not redis_client.exists(sync_entry_key(redis_prefix, "c"))


def test_scheduler_follows_config_file(
    redis_url: str, redis_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "monitor.yaml"
    doc: dict[str, Any] = {
        "redis_prefix": redis_prefix,
        "tenants": [
            {
                "name": "a",
                "tenant_id": "t",
                "client_id": "c",
                "client_secret": "s",
                "polling_interval": "ONE_HOUR",
                "identity_interval": "off",
            }
        ],
    }
    cfg.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("MDE_MONITOR_CONFIG", str(cfg))
    monkeypatch.delenv("MDE_MONITOR_SYNC_EVERY", raising=False)
    settings = _settings(redis_prefix, {})
    app = build_app(settings, env={"REDIS_URL": redis_url})  # type: ignore[arg-type]
    sched = MonitorScheduler(app=app)
    first = sched.maybe_reconcile()
    assert first is not None and first.added == ["a"]
    assert sched.maybe_reconcile(force=False) is None  # throttled, and unchanged anyway

    doc["tenants"].append(
        {
            "name": "b",
            "tenant_id": "t2",
            "client_id": "c",
            "client_secret": "s",
            "polling_interval": "THIRTY_MINUTES",
            "identity_interval": "off",
        }
    )
    cfg.write_text(yaml.safe_dump(doc))
    sched._next_check = 0
    second = sched.maybe_reconcile()
    assert second is not None and second.added == ["b"] and second.unchanged == ["a"]

    cfg.write_text("tenants: [oops")  # a broken config keeps the schedule
    sched._next_check = 0
    assert sched.maybe_reconcile() is None
    assert _entry(app, redis_prefix, "b").name == "sync:b"

    monkeypatch.setenv("MDE_MONITOR_SYNC_EVERY", "7")  # the demo override re-times everything
    cfg.write_text(yaml.safe_dump(doc))
    sched._next_check = 0
    third = sched.maybe_reconcile()
    assert third is not None and sorted(third.changed + third.added) == ["a", "b"]
    assert _entry(app, redis_prefix, "a").schedule.run_every == timedelta(seconds=7)
    sched.close()
