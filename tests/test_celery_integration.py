"""Real `celery worker` and `celery beat` processes against real Redis, the simulator and a receiver."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import redis
from celery_helpers import (
    fleet,
    small,
    synced_after,
    syncs,
    trigger_and_wait,
    wait_until,
    write_alerts,
    write_config,
)
from sink_receivers import Receiver
from standardwebhooks.webhooks import Webhook
from typer.testing import CliRunner

from monitor.cli import app as cli_app
from monitor.demo_receiver import new_secret
from monitor.redis_conn import free_port
from monitor.simulator import Simulator
from monitor.status import run_history


def test_scheduled_syncs_events_and_deliveries(
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = new_secret()
    metrics_port = free_port()
    with (
        Simulator([small("alpha", 1), small("beta", 2)], tmp_path / "sim") as sim,
        Receiver() as rx,
    ):
        alerts = write_alerts(tmp_path / "alerts", rx.url + "/hook")
        cfg = write_config(
            tmp_path / "monitor.yaml", sim, redis_url, redis_prefix, alerts, disabled=("beta",)
        )
        env = {
            "MDE_MONITOR_CONFIG": str(cfg),
            "REDIS_URL": redis_url,
            "MDE_MONITOR_SYNC_EVERY": "2",
            "MDE_MONITOR_DISPATCH_EVERY": "1",
            "MDE_MONITOR_BEAT_MAX_INTERVAL": "1",
            "MDE_MONITOR_METRICS_PORT": str(metrics_port),
            "MDE_MONITOR_LOG_FORMAT": "json",
            "TEST_WEBHOOK_SECRET": secret,
        }
        with fleet(tmp_path, env) as f:
            f.worker()
            f.beat()
            # beat schedules alpha every 2 s: a baseline, then more
            wait_until(
                lambda: len(syncs(redis_client, redis_prefix, "alpha")) >= 2,
                60,
                "two scheduled syncs of alpha",
            )
            f.alive()
            first = syncs(redis_client, redis_prefix, "alpha")
            assert first[0]["baseline"] is True
            assert {r["origin"] for r in first} == {"schedule"}
            assert not run_history(redis_client, redis_prefix, "beta")  # DISABLED: never scheduled

            # a change in the tenant -> an event -> a signed webhook delivery
            alpha = next(t for t in sim.tenants if t.name == "alpha")
            machine = alpha.add_machine()
            mark = time.time()
            wait_until(
                lambda: synced_after(redis_client, redis_prefix, "alpha", mark),
                30,
                "a sync after the change",
            )
            (req,) = rx.wait_for(1, timeout=30)
            payload = Webhook(secret).verify(req.body, req.headers)
            assert payload["type"] == "mde.alert.firing"
            assert payload["data"]["rule"] == "machine-new"
            (event,) = payload["data"]["events"]
            assert event["type"] == "mde.machine.created"
            assert machine["id"] in event["subject"]
            assert req.headers["webhook-id"] == payload["id"]

            # trigger: a DISABLED tenant is synced on demand
            monkeypatch.setenv("REDIS_URL", redis_url)
            triggered = trigger_and_wait(cfg, "beta", timeout=60)
            assert triggered["result"]["status"] == "ok" and triggered["result"]["baseline"] is True
            (rec,) = run_history(redis_client, redis_prefix, "beta")
            assert rec["origin"] == "trigger" and rec["task_id"] == triggered["task_id"]

            # a tenant added to the config is scheduled without restarting anything
            sim.add_tenant(small("gamma", 3))
            write_config(cfg, sim, redis_url, redis_prefix, alerts, disabled=("beta",))
            wait_until(
                lambda: syncs(redis_client, redis_prefix, "gamma"),
                60,
                "the new tenant's first scheduled sync",
            )

            # metrics from the worker's main process, computed from Redis
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            assert 'mde_syncs_total{lane="full",status="ok",tenant="alpha"}' in text
            assert 'mde_events_total{tenant="alpha",type="mde.machine.created"}' in text
            assert 'mde_deliveries_total{outcome="sent",sink="hook"}' in text

            status = CliRunner().invoke(cli_app, ["--config", str(cfg), "status", "--json"])
            assert status.exit_code == 0, status.output
            doc = json.loads(status.stdout)
            by_name = {t["name"]: t for t in doc["tenants"]}
            assert by_name["alpha"]["next_run"] is not None
            assert by_name["beta"]["next_run"] is None
            f.alive()
        worker_log = (tmp_path / "worker.log").read_text()
        assert sim.tenants[0].client_secret not in worker_log  # secrets never logged
        lines = [json.loads(ln) for ln in worker_log.splitlines() if ln.startswith("{")]
        started = [ln for ln in lines if ln.get("message") == "sync started"]
        assert started and all(ln.get("task_id") and ln.get("tenant") for ln in started)
