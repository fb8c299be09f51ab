"""The query evaluator as it runs: a sync worker, a `query` worker, the simulator, a receiver.

Syncs leave query rules to the evaluator while its heartbeat is fresh; it evaluates them from
the graph it keeps, incrementally; when it stops, syncs evaluate them themselves again. Each
machine that enters the rule's answer is notified once.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from celery_helpers import fleet, trigger_and_wait, wait_until, write_alerts, write_config
from sink_receivers import Receiver
from standardwebhooks.webhooks import Webhook
from typer.testing import CliRunner

from monitor.alerts.query_evaluator import heartbeat_key
from monitor.alerts.query_rules import meta_key
from monitor.cli import app as cli_app
from monitor.demo_receiver import new_secret
from monitor.events import stream
from monitor.simulator import Simulator, generate_tenant

RULE = {
    "name": "high-risk",
    "description": "a machine's risk is High",
    "severity": "high",
    "query": "FIND HostAgent WITH riskScore = 'High'",
    "sinks": ["hook"],
    "group_wait": "0s",
    "group_interval": "1s",
    "send_resolved": False,
}


def _trigger(cfg: Path) -> dict[str, Any]:
    result: dict[str, Any] = trigger_and_wait(cfg, "alpha")["result"]
    assert result["status"] == "ok", result
    return result


def _status(cfg: Path) -> dict[str, Any]:
    res = CliRunner().invoke(cli_app, ["--config", str(cfg), "status", "--json"])
    assert res.exit_code == 0, res.output
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def _meta(client: redis.Redis, prefix: str) -> dict[str, Any] | None:
    raw: Any = client.get(meta_key(prefix, "alpha", "high-risk"))
    return orjson.loads(raw) if raw else None


def _evaluated(client: redis.Redis, prefix: str, generation: int) -> dict[str, Any] | None:
    meta = _meta(client, prefix)
    return meta if meta and meta["generation"] >= generation else None


def test_syncs_hand_query_rules_to_the_evaluator_and_take_them_back(
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = new_secret()
    tenant = generate_tenant(
        machines=20, users=6, vulns_per_machine=1, cves=10, logon_users_per_machine=1, seed=8
    )
    tenant.name = "alpha"
    ids = sorted(tenant.machines)
    for mid in ids:
        tenant.set_machine(mid, riskScore="Low")
    with Simulator([tenant], tmp_path / "sim") as sim, Receiver() as rx:
        alerts = write_alerts(tmp_path / "alerts", rx.url + "/hook", rules=[RULE])
        cfg = write_config(tmp_path / "monitor.yaml", sim, redis_url, redis_prefix, alerts)
        env = {
            "MDE_MONITOR_CONFIG": str(cfg),
            "REDIS_URL": redis_url,
            "MDE_MONITOR_DISPATCH_EVERY": "1",
            "MDE_MONITOR_LOG_FORMAT": "json",
            "TEST_WEBHOOK_SECRET": secret,
        }
        monkeypatch.setenv("REDIS_URL", redis_url)
        with fleet(tmp_path, env) as f:
            f.worker(queues="sync,dispatch,deliver")
            query = f.worker("query", concurrency=1, queues="query")
            wait_until(lambda: redis_client.exists(heartbeat_key(redis_prefix)), 60, "heartbeat")

            assert _status(cfg)["query_evaluator"]  # host:pid
            first = _trigger(cfg)  # the baseline: recorded silently, by the evaluator
            assert first["query_rules"] == 1 and first["query_rules_deferred"] is True
            wait_until(lambda: _evaluated(redis_client, redis_prefix, 1), 60, "evaluation 1")

            tenant.set_machine(ids[0], riskScore="High")
            second = _trigger(cfg)
            assert second["query_rules_deferred"] is True
            assert "mde.query.entered" not in second["events"]  # not the sync's to count
            meta = wait_until(lambda: _evaluated(redis_client, redis_prefix, 2), 60, "eval 2")
            assert meta["incremental"] is True  # the evaluator kept generation 1's graph
            (req,) = rx.wait_for(1, timeout=60)
            payload = Webhook(secret).verify(req.body, req.headers)
            assert payload["data"]["rule"] == "high-risk"
            (event,) = payload["data"]["events"]
            assert event["type"] == "mde.query.entered" and ids[0] in event["subject"]

            # the evaluator stops (warm shutdown withdraws its heartbeat): syncs evaluate again
            query.send_signal(signal.SIGTERM)
            query.wait(timeout=60)
            f.procs.pop("query")
            assert not redis_client.exists(heartbeat_key(redis_prefix))
            assert _status(cfg)["query_evaluator"] is None
            tenant.set_machine(ids[1], riskScore="High")
            third = _trigger(cfg)
            assert third["query_rules_deferred"] is False
            assert third["events"].get("mde.query.entered") == 1
            assert _evaluated(redis_client, redis_prefix, 3)
            reqs = rx.wait_for(2, timeout=60)
            payload = Webhook(secret).verify(reqs[1].body, reqs[1].headers)
            assert ids[1] in payload["data"]["events"][0]["subject"]
            f.alive()
        entered = [
            str(ev["subject"])
            for _sid, ev in stream.read_range(redis_client, redis_prefix, "alpha", count=1000)
            if ev.get("type") == "mde.query.entered"
        ]
        assert len(entered) == 2 and ids[0] in entered[0] and ids[1] in entered[1]
        lines = [
            json.loads(ln)
            for ln in (tmp_path / "query.log").read_text().splitlines()
            if ln.startswith("{")
        ]
        done = [ln for ln in lines if ln.get("message") == "query rules evaluated"]
        assert [d["where"] for d in done] == ["evaluator", "evaluator"]
        assert sim.tenants[0].client_secret not in (tmp_path / "query.log").read_text()
