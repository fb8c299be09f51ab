"""`mde-monitor status` and `metrics`: state gathered from real Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from monitor.alerts.deliver import DeliveryQueue
from monitor.cli import app
from monitor.events import stream
from monitor.metrics import counter_key, duration_key, record_delivery, record_sync
from monitor.schedule import schedule_key, sync_entry_key
from monitor.status import any_failed, read_state, record_run


def _config(tmp_path: Path, prefix: str) -> Path:
    doc = {
        "redis_prefix": prefix,
        "tenants": [
            {
                "name": n,
                "tenant_id": f"t-{n}",
                "client_id": "c",
                "client_secret": "s3cr3t-value",
                "polling_interval": iv,
            }
            for n, iv in (("alpha", "ONE_HOUR"), ("beta", "DISABLED"), ("gamma", "ONE_DAY"))
        ],
    }
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _seed(client: redis.Redis, prefix: str) -> None:
    """Sync records, a schedule entry, an event backlog, a dead letter and API budget use."""
    ok = {
        "tenant": "alpha",
        "status": "ok",
        "task_id": "t1",
        "started": "2026-01-01T10:00:00.000Z",
        "finished": "2026-01-01T10:00:02.000Z",
        "duration_seconds": 2.0,
        "generation": 3,
        "counts": {"microsoft_defender_machine": 9, "microsoft_defender_user": 38},
        "events": {"mde.machine.created": 2},
        "requests": {"requests": {"defender:/api/machines": 1}, "retries": {}, "throttled": {}},
    }
    record_run(client, prefix, ok)
    record_run(
        client,
        prefix,
        {
            "tenant": "alpha",
            "status": "busy",
            "task_id": "t2",
            "finished": "2026-01-01T10:05:00.000Z",
            "error": "busy",
        },
    )
    record_run(
        client,
        prefix,
        {
            "tenant": "gamma",
            "status": "failed",
            "task_id": "t3",
            "finished": "2026-01-01T10:00:01.000Z",
            "duration_seconds": 0.5,
            "error": "AADSTS7000215: Invalid client secret provided.",
        },
    )
    record_sync(client, prefix, ok)
    record_sync(client, prefix, {"tenant": "gamma", "status": "failed", "duration_seconds": 0.5})
    identity = {"tenant": "alpha", "status": "ok", "lane": "identity", "duration_seconds": 0.25}
    record_sync(client, prefix, identity)
    # series stored before syncs had a lane: full syncs
    client.hset(counter_key(prefix, "syncs"), '["beta","ok"]', 5)
    client.hset(duration_key(prefix), mapping={"beta:sum": 10.0, "beta:count": 5})
    record_delivery(client, prefix, "hook", "sent")
    record_delivery(client, prefix, "hook", "retrying")
    client.zadd(schedule_key(prefix), {sync_entry_key(prefix, "alpha"): 1_900_000_000})
    stream.ensure_group(client, prefix, "alerts")
    for i in range(3):
        client.xadd(
            stream.stream_key(prefix), {"e": json.dumps({"type": "mde.machine.created", "n": i})}
        )
    stream.read_group(client, prefix, "alerts", "c1", count=1)  # 1 pending, 2 unread
    q = DeliveryQueue(client, prefix)
    client.xadd(q.dead_key, {"delivery": "d1", "sink": "hook", "reason": "HTTP 400"})
    now_s, _ = client.time()  # type: ignore[misc]
    client.zadd(
        f"{prefix}:budget:alpha:defender:/api/machines:m", {"a": now_s * 1000, "b": now_s * 1000}
    )


def test_read_state(redis_client: redis.Redis, redis_prefix: str) -> None:
    _seed(redis_client, redis_prefix)
    st = read_state(redis_client, redis_prefix, ["alpha", "beta", "gamma"])
    alpha, beta, gamma = st.tenants
    assert alpha.last is not None and alpha.last.status == "busy"
    assert alpha.last_completed is not None and alpha.last_completed.status == "ok"
    assert alpha.last_completed.counts["microsoft_defender_machine"] == 9
    assert alpha.next_run_ts == 1_900_000_000
    assert beta.last is None and beta.next_run_ts is None
    assert gamma.last_completed is not None and gamma.last_completed.status == "failed"
    assert any_failed(st)
    assert st.stream_length == 3
    (group,) = st.groups
    assert (group.name, group.pending, group.lag) == ("alerts", 1, 2)
    assert st.dead_letters == 1 and st.failed_deliveries[0]["sink"] == "hook"
    assert st.budget_minute_ratio[("alpha", "defender:/api/machines")] == pytest.approx(2 / 100)


def test_status_cli(
    redis_url: str,
    redis_client: redis.Redis,
    redis_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    cfg = _config(tmp_path, redis_prefix)
    runner = CliRunner()
    empty = runner.invoke(app, ["--config", str(cfg), "status", "--json"])
    assert empty.exit_code == 0, empty.output
    assert [t["last_sync"] for t in json.loads(empty.stdout)["tenants"]] == [None, None, None]

    _seed(redis_client, redis_prefix)
    res = runner.invoke(app, ["--config", str(cfg), "status", "--json"])
    assert res.exit_code == 1  # gamma's last sync failed
    doc = json.loads(res.stdout)
    by_name = {t["name"]: t for t in doc["tenants"]}
    assert by_name["alpha"]["last_completed_sync"]["status"] == "ok"
    assert by_name["alpha"]["next_run"].startswith("2030-")
    assert by_name["beta"]["polling_interval"] == "DISABLED"
    assert doc["events"] == {
        "stream_length": 3,
        "groups": [{"name": "alerts", "pending": 1, "lag": 2, "consumers": 1}],
        "pending": 1,
        "lag": 2,
    }
    assert doc["dead_letters"] == 1
    human = runner.invoke(app, ["--config", str(cfg), "status"])
    assert human.exit_code == 1
    assert "alpha" in human.stdout and "AADSTS7000215" in human.stdout
    assert "s3cr3t-value" not in human.stdout + res.stdout


def test_metrics_cli_exposition(
    redis_url: str,
    redis_client: redis.Redis,
    redis_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    cfg = _config(tmp_path, redis_prefix)
    _seed(redis_client, redis_prefix)
    res = CliRunner().invoke(app, ["--config", str(cfg), "metrics"])
    assert res.exit_code == 0, res.output
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(res.stdout)
        for s in fam.samples
    }
    assert samples[("mde_redis_up", ())] == 1
    full, identity = ("lane", "full"), ("lane", "identity")
    assert samples[("mde_syncs_total", (full, ("status", "ok"), ("tenant", "alpha")))] == 1
    assert samples[("mde_syncs_total", (identity, ("status", "ok"), ("tenant", "alpha")))] == 1
    assert samples[("mde_syncs_total", (full, ("status", "failed"), ("tenant", "gamma")))] == 1
    assert samples[("mde_syncs_total", (full, ("status", "ok"), ("tenant", "beta")))] == 5
    assert samples[("mde_sync_duration_seconds_sum", (full, ("tenant", "alpha")))] == 2.0
    assert samples[("mde_sync_duration_seconds_count", (full, ("tenant", "alpha")))] == 1
    assert samples[("mde_sync_duration_seconds_sum", (identity, ("tenant", "alpha")))] == 0.25
    assert samples[("mde_sync_duration_seconds_count", (full, ("tenant", "beta")))] == 5
    assert (
        samples[
            (
                "mde_api_requests_total",
                (("endpoint", "defender:/api/machines"), ("tenant", "alpha")),
            )
        ]
        == 1
    )
    assert (
        samples[("mde_events_total", (("tenant", "alpha"), ("type", "mde.machine.created")))] == 2
    )
    assert samples[("mde_deliveries_total", (("outcome", "sent"), ("sink", "hook")))] == 1
    assert samples[("mde_sync_last_status", (("status", "ok"), ("tenant", "alpha")))] == 1
    assert (
        samples[("mde_entities", (("tenant", "alpha"), ("type", "microsoft_defender_user")))] == 38
    )
    assert samples[("mde_event_consumer_pending", (("group", "alerts"),))] == 1
    assert samples[("mde_event_consumer_lag", (("group", "alerts"),))] == 2
    assert samples[("mde_dead_letters", ())] == 1
    assert samples[("mde_sync_next_run_timestamp_seconds", (("tenant", "alpha"),))] == 1_900_000_000
    assert samples[
        ("mde_api_budget_used_ratio", (("endpoint", "defender:/api/machines"), ("tenant", "alpha")))
    ] == pytest.approx(0.02)


def test_metrics_report_redis_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.redis_conn import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    res = CliRunner().invoke(app, ["--config", str(_config(tmp_path, "x")), "metrics"])
    assert res.exit_code == 0
    assert "mde_redis_up 0.0" in res.stdout


def test_read_state_snapshot_meta_and_running_sync(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    """A CLI sync (snapshot meta only) and a sync holding the tenant's lock show up."""
    from monitor.snapshot.lock import lock_key
    from monitor.snapshot.store import SnapshotStore

    store = SnapshotStore(redis_client, redis_prefix)
    redis_client.set(store.key("beta", "gen"), 7)
    redis_client.set(
        store.key("beta", "meta"),
        json.dumps(
            {
                "status": "degraded",
                "finished": "2026-01-01T11:00:00Z",
                "duration_seconds": 1.5,
                "generation": 7,
                "counts": {"microsoft_defender_machine": 4, "bogus": "x"},
            }
        ),
    )
    redis_client.set(store.key("gamma", "gen"), 0)
    redis_client.set(
        lock_key(redis_prefix, "beta"),
        json.dumps({"host": "w1", "pid": 42, "since": "2026-01-01T11:00:01Z", "token": "secret"}),
    )
    alpha, beta, gamma = read_state(redis_client, redis_prefix, ["alpha", "beta", "gamma"]).tenants
    assert alpha.last is None and alpha.generation is None and alpha.running is None
    assert beta.generation == 7
    assert beta.last is not None and beta.last == beta.last_completed
    assert (beta.last.status, beta.last.source) == ("degraded", "snapshot")
    assert beta.last.counts == {"microsoft_defender_machine": 4}
    assert beta.running == {"host": "w1", "pid": 42, "since": "2026-01-01T11:00:01Z"}
    assert gamma.generation is None and gamma.running is None


def test_identity_lane_runs_have_their_own_history(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    """A lane that runs every minute neither hides the last full sync nor passes for it."""
    import orjson

    from monitor.snapshot.store import SnapshotStore
    from monitor.status import run_history

    full = {"tenant": "alpha", "status": "ok", "finished": "2026-01-01T10:00:02.000Z"}
    record_run(redis_client, redis_prefix, {**full, "task_id": "full", "generation": 3})
    for i in range(30):
        record_run(
            redis_client,
            redis_prefix,
            {
                **full,
                "lane": "identity",
                "task_id": f"id{i}",
                "generation": 4 + i,
                "finished": f"2026-01-01T10:{10 + i}:00.000Z",
            },
        )
    meta = {"lane": "identity", "status": "ok", "generation": 33, "finished": "2026-01-01T11:00Z"}
    redis_client.set(
        SnapshotStore(redis_client, redis_prefix).key("alpha", "meta"), orjson.dumps(meta)
    )
    st = read_state(redis_client, redis_prefix, ["alpha"])
    (alpha,) = st.tenants
    assert alpha.last_completed is not None and alpha.last_completed.task_id == "full"
    assert alpha.identity_lane is not None and alpha.identity_lane.task_id == "id29"
    assert [r["task_id"] for r in run_history(redis_client, redis_prefix, "alpha")] == ["full"]
    assert len(run_history(redis_client, redis_prefix, "alpha", lane="identity")) == 30
    doc = st.to_dict()["tenants"][0]
    assert doc["identity_lane"]["task_id"] == "id29"
