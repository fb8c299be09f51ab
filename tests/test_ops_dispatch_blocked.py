"""Dispatch while no rule loads: events stay in the stream, status and metrics say so (issue 9.1)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import redis
from alert_helpers import (
    change_event,
    publish,
    restore_logging,  # noqa: F401 (fixture)
)
from typer.testing import CliRunner

from monitor.cli import app
from monitor.events import stream

pytestmark = pytest.mark.usefixtures("restore_logging")

RULES = """
rules:
  - name: risk-high
    severity: high
    match:
      type: mde.machine.risk_raised
    sinks: [log]
"""
BROKEN = "rules:\n  - name: risk-high\n    match: {type: mde.machine.nope}\n    sinks: [log]\n"


def _setup(tmp_path: Path, redis_url: str, redis_prefix: str) -> tuple[list[str], Path, Path]:
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    out = tmp_path / "alerts.jsonl"
    (alerts / "sinks.yaml").write_text(f'sinks:\n  log: {{type: file, path: "{out}"}}\n')
    config = tmp_path / "monitor.yaml"
    config.write_text(
        f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\nalerts_dir: {alerts}\n"
    )
    return ["--config", str(config)], alerts, out


def _unread(client: redis.Redis, prefix: str) -> int:
    infos = client.xinfo_groups(stream.stream_key(prefix))
    return sum(int(i["lag"]) + int(i["pending"]) for i in infos)  # type: ignore[union-attr]


@pytest.mark.parametrize("state", ["broken", "no-rule-file"])
def test_blocked_dispatch_keeps_events_until_rules_load(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis, state: str
) -> None:
    base, alerts, out = _setup(tmp_path, redis_url, redis_prefix)
    if state == "broken":
        (alerts / "rules.yaml").write_text(BROKEN)
    runner = CliRunner()
    publish(
        redis_client,
        redis_prefix,
        [change_event("mde.machine.risk_raised", i, "riskScore", "Low", "High") for i in (1, 2)],
    )
    res = runner.invoke(app, [*base, "dispatch", "--once", "--json", "--timeout", "5"])
    assert res.exit_code == 2, res.output
    doc = json.loads(res.stdout)
    assert doc["blocked"] == 1 and doc["read"] == 0
    assert _unread(redis_client, redis_prefix) == 2  # neither read nor acknowledged
    assert "dispatch blocked: rules not loaded" in res.stderr

    st = runner.invoke(app, [*base, "status", "--json"])
    assert st.exit_code == 1, st.output
    blocked = json.loads(st.stdout)["dispatch"]
    assert blocked["blocked"] is True
    assert blocked["message"] == "dispatch blocked: rules not loaded"
    human = runner.invoke(app, [*base, "status"])
    assert "dispatch blocked: rules not loaded" in human.stdout
    metrics = runner.invoke(app, [*base, "metrics"])
    assert "mde_dispatch_blocked 1.0" in metrics.stdout

    (alerts / "rules.yaml").write_text(textwrap.dedent(RULES))  # fixed
    res = runner.invoke(app, [*base, "dispatch", "--once", "--json", "--timeout", "5"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["blocked"], doc["read"], doc["sent"]) == (0, 2, 1)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(len(n["events"]) for n in lines) == 2
    assert _unread(redis_client, redis_prefix) == 0
    st = runner.invoke(app, [*base, "status", "--json"])
    assert json.loads(st.stdout)["dispatch"]["blocked"] is False
    metrics = runner.invoke(app, [*base, "metrics"])
    assert "mde_dispatch_blocked 0.0" in metrics.stdout
    # the CLI's delivery is counted like a deliver task's (issue 9.8)
    assert 'mde_deliveries_total{outcome="sent",sink="log"} 1.0' in metrics.stdout


def test_a_bad_file_among_good_ones_does_not_block(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    base, alerts, _out = _setup(tmp_path, redis_url, redis_prefix)
    (alerts / "rules.yaml").write_text(textwrap.dedent(RULES))
    (alerts / "zz-broken.yaml").write_text(BROKEN.replace("risk-high", "other"))
    publish(
        redis_client,
        redis_prefix,
        [change_event("mde.machine.risk_raised", 1, "riskScore", "Low", "High")],
    )
    res = CliRunner().invoke(app, [*base, "dispatch", "--once", "--json", "--timeout", "5"])
    assert res.exit_code == 2  # the broken file is reported
    doc = json.loads(res.stdout)
    assert (doc["blocked"], doc["read"], doc["sent"]) == (0, 1, 1)


def test_json_output_is_only_json_whatever_the_sinks_print(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """`dispatch --once --json` with a stdout sink: stdout is one JSON document (issue 9.7)."""
    base, alerts, _out = _setup(tmp_path, redis_url, redis_prefix)
    (alerts / "sinks.yaml").write_text("sinks:\n  log: {type: stdout, format: human}\n")
    (alerts / "rules.yaml").write_text(textwrap.dedent(RULES))
    publish(
        redis_client,
        redis_prefix,
        [change_event("mde.machine.risk_raised", 1, "riskScore", "Low", "High")],
    )
    res = CliRunner().invoke(app, [*base, "dispatch", "--once", "--json", "--timeout", "5"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sent"] == 1  # the whole of stdout parses
    assert "risk-high" in res.stderr  # the sink's text went to stderr
    for args in (
        ["status", "--json"],
        ["deliveries", "list", "--json"],
        ["rules", "check", "--json"],
    ):
        res = CliRunner().invoke(app, [*base, *args])
        json.loads(res.stdout)
