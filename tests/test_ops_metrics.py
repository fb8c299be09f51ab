"""Metrics: the endpoint, build/process/queue metrics, CLI runs counted, shipped alert rules (9.8)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from alert_helpers import restore_logging  # noqa: F401 (fixture)
from typer.testing import CliRunner

from monitor.celery_app import DISPATCH_QUEUE, DISPATCH_TASK, build_app
from monitor.cli import app
from monitor.config import Settings
from monitor.metrics import exposition, start_metrics_server
from monitor.simulator import Simulator, load_recorded_tenant

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("restore_logging")


def _names(text: str) -> set[str]:
    """Metric names of an exposition (families without samples too, from their TYPE line)."""
    samples = {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M)}
    return samples | set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def test_endpoint_serves_only_metrics_with_build_process_and_queue_metrics(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    celery = build_app(Settings(redis_url=redis_url, redis_prefix=redis_prefix), env={})
    celery.send_task(DISPATCH_TASK, queue=DISPATCH_QUEUE)  # no worker: it waits in the queue
    celery.close()
    server = start_metrics_server(0, redis_client, redis_prefix, lambda: [], addr="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with httpx.Client(timeout=10) as http:
            resp = http.get(f"{base}/metrics")
            assert resp.status_code == 200
            text = resp.text
            for path in ("/", "/favicon.ico", "/metrics/../x", "/debug"):
                assert http.get(base + path).status_code == 404, path
    finally:
        server.shutdown()
        server.server_close()
    assert re.search(r'^mde_build_info\{python="[\d.]+",version="[\w.+-]+"\} 1\.0$', text, re.M)
    assert 'mde_celery_queue_length{queue="dispatch"} 1.0' in text
    assert 'mde_celery_queue_length{queue="sync"} 0.0' in text
    assert "process_resident_memory_bytes" in text and "python_info" in text


def test_endpoint_answers_while_another_client_stalls(
    redis_prefix: str, redis_client: redis.Redis
) -> None:
    server = start_metrics_server(0, redis_client, redis_prefix, lambda: [], addr="127.0.0.1")
    try:
        # a client that connects and never sends its request (a hung scraper, a port scan)
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10):
            resp = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10)
            assert resp.status_code == 200 and "mde_redis_up 1.0" in resp.text
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def sim_config(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[Path]:
    tenant = load_recorded_tenant()
    with Simulator(tenants=[tenant], state_dir=tmp_path / "sim") as sim:
        data = sim.config_dict(extra={"redis_url": redis_url, "redis_prefix": redis_prefix})
        config = tmp_path / "monitor.yaml"
        config.write_text(yaml.safe_dump(data))
        yield config


def test_cli_sync_is_counted_like_a_task(sim_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    runner = CliRunner()
    done = runner.invoke(app, ["--config", str(sim_config), "sync", "--tenant", "sim", "--json"])
    assert done.exit_code == 0, done.output
    text = runner.invoke(app, ["--config", str(sim_config), "metrics"]).stdout
    assert 'mde_syncs_total{lane="full",status="ok",tenant="sim"} 1.0' in text
    assert re.search(r'mde_api_requests_total\{endpoint="[^"]+",tenant="sim"\} [1-9]', text)
    assert 'mde_events_total{tenant="sim",type="mde.sync.baseline"} 1.0' in text
    assert 'mde_sync_duration_seconds_count{lane="full",tenant="sim"} 1.0' in text


def _promtool() -> str | None:
    for candidate in (os.environ.get("PROMTOOL"), shutil.which("promtool")):
        if candidate and Path(candidate).is_file():
            return candidate
    local = REPO / ".data" / "tools" / "promtool"
    return str(local) if local.is_file() else None


def test_shipped_prometheus_rules_and_dashboard_use_real_metrics(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    rules_file = REPO / "deploy" / "prometheus" / "alerts.yml"
    doc = yaml.safe_load(rules_file.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"MdeSyncFailing", "MdeSyncLate", "MdeDispatchBlocked", "MdeDeadLettersGrowing"} <= names
    assert "MdeApiBudgetExhausted" in names
    exposed = _names(exposition(redis_client, redis_prefix, lambda: ["t"]))
    exposed |= {"mde_sync_duration_seconds_sum", "mde_sync_duration_seconds_count"}
    exposed |= {f"{n}_total" for n in exposed}  # counter families with no sample yet
    dashboard = json.loads((REPO / "deploy" / "grafana" / "mde-monitor.json").read_text())
    exprs = [r["expr"] for r in rules]
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for expr in exprs:
        for metric in re.findall(r"\b(mde_[a-z_]+)", expr):
            assert metric in exposed, (metric, expr)
        assert expr.count("(") == expr.count(")"), expr
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs it from Debian's prometheus package)")
    check = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 9 rules found" in check.stdout
