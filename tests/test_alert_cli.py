"""`mde-monitor rules|dispatch|deliveries|silence|sinks` end to end (real Redis, real file sink)."""

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

pytestmark = pytest.mark.usefixtures("restore_logging")

RULES = """
rules:
  - name: risk-high
    description: Risk raised to High
    severity: high
    match:
      type: mde.machine.risk_raised
      where:
        - {field: changes.riskScore.new, op: gte, value: High}
    sinks: [out, log]
    group_wait: 1m
"""


@pytest.fixture
def env(tmp_path: Path, redis_url: str, redis_prefix: str) -> tuple[CliRunner, list[str], Path]:
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    (alerts / "rules.yaml").write_text(textwrap.dedent(RULES))
    (alerts / "sinks.yaml").write_text(
        textwrap.dedent(
            f"""
            sinks:
              out: {{type: stdout, format: json}}
              log: {{type: file, path: "{tmp_path / "alerts.jsonl"}"}}
            """
        )
    )
    config = tmp_path / "monitor.yaml"
    config.write_text(
        f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\nalerts_dir: {alerts}\n"
    )
    return CliRunner(), ["--config", str(config)], tmp_path


def test_rules_check_ok_and_with_errors(env: tuple[CliRunner, list[str], Path]) -> None:
    runner, base, tmp = env
    ok = runner.invoke(app, [*base, "rules", "check", "--json"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert [r["name"] for r in doc["rules"]] == ["risk-high"]
    assert doc["sinks"]["out"]["built"] and doc["errors"] == []
    (tmp / "alerts" / "zz.yaml").write_text(
        "rules:\n  - name: broken\n    match: {type: mde.machine.nope}\n    sinks: [out]\n"
    )
    bad = runner.invoke(app, [*base, "rules", "check"])
    assert bad.exit_code == 2
    assert (
        f"{tmp / 'alerts' / 'zz.yaml'}:3: rule broken: match.type: unknown event type" in bad.output
    )
    # the shipped pack through --alerts-dir, without a config file
    pack = Path(__file__).resolve().parent.parent / "alerts"
    shipped = runner.invoke(app, ["--alerts-dir", str(pack), "rules", "check"])
    assert shipped.exit_code == 0, shipped.output


def test_rules_test_shows_matches_and_renders_per_sink(
    env: tuple[CliRunner, list[str], Path],
) -> None:
    runner, base, tmp = env
    res = runner.invoke(
        app,
        [
            *base,
            "rules",
            "test",
            "--type",
            "mde.machine.risk_raised",
            "--field",
            "changes.riskScore.old=Low",
            "--field",
            "changes.riskScore.new=High",
            "--field",
            "displayName=vm9",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    (m,) = doc["matches"]
    assert m["rule"] == "risk-high" and m["status"] == "firing"
    assert m["title"] == "Risk raised to High: vm9 risk raised to High in contoso"
    assert set(m["sinks"]) == {"out", "log"}
    assert not (tmp / "alerts.jsonl").exists()  # nothing sent
    none = runner.invoke(
        app,
        [
            *base,
            "rules",
            "test",
            "--type",
            "mde.machine.risk_raised",
            "--field",
            "changes.riskScore.new=Medium",
        ],
    )
    assert none.exit_code == 0 and "no rule fires" in none.output
    ev = tmp / "ev.json"
    ev.write_text(
        json.dumps(change_event("mde.machine.risk_raised", 1, "riskScore", "Low", "Critical"))
    )
    from_file = runner.invoke(app, [*base, "rules", "test", "--event", str(ev)])
    assert from_file.exit_code == 0 and "risk-high (firing)" in from_file.output


def test_dispatch_once_replay_deliveries_and_sinks(
    env: tuple[CliRunner, list[str], Path], redis_client: redis.Redis, redis_prefix: str
) -> None:
    runner, base, tmp = env
    publish(
        redis_client,
        redis_prefix,
        [change_event("mde.machine.risk_raised", i, "riskScore", "Low", "High") for i in range(3)],
    )
    res = runner.invoke(app, [*base, "dispatch", "--once", "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout[res.stdout.index('{\n  "read"') :])
    assert (stats["read"], stats["notifications"], stats["sent"]) == (3, 1, 2)
    (line,) = (tmp / "alerts.jsonl").read_text().splitlines()
    assert json.loads(line)["total"] == 3
    listed = runner.invoke(app, [*base, "deliveries", "list", "--json"])
    assert {d["status"] for d in json.loads(listed.stdout)["deliveries"]} == {"sent"}
    log = runner.invoke(app, [*base, "deliveries", "log", "--json"])
    assert {e["kind"] for e in json.loads(log.stdout)} == {"queued", "attempt"}
    replay = runner.invoke(app, [*base, "rules", "replay", "--since", "1h", "--json"])
    assert replay.exit_code == 0, replay.output
    doc = json.loads(replay.stdout)
    assert doc["events"] == 3 and doc["rules"]["risk-high"] == {
        "matched": 3,
        "throttled": 0,
        "notifications": 1,
        "resolved": 0,
    }
    sinks = runner.invoke(app, [*base, "sinks", "list", "--json"])
    rows = {r["name"]: r for r in json.loads(sinks.stdout)}
    assert rows["log"]["describe"].startswith("file ") and rows["out"]["rules"] == ["risk-high"]


def test_silence_add_list_expire(
    env: tuple[CliRunner, list[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, base, _tmp = env
    monkeypatch.setenv("USER", "alice")
    add = runner.invoke(
        app,
        [
            *base,
            "silence",
            "add",
            "--match",
            "type=mde.machine.*",
            "--match",
            "tenant=contoso",
            "--match",
            "entity.machineTags=lab",
            "--for",
            "8h",
            "--comment",
            "lab rebuild",
            "--json",
        ],
    )
    assert add.exit_code == 0, add.output
    s = json.loads(add.stdout)
    assert s["created_by"] == "alice" and s["ends_at"] - s["starts_at"] == 8 * 3600
    listed = json.loads(runner.invoke(app, [*base, "silence", "list", "--json"]).stdout)
    assert [x["id"] for x in listed] == [s["id"]]
    assert runner.invoke(app, [*base, "silence", "expire", s["id"]]).exit_code == 0
    assert json.loads(runner.invoke(app, [*base, "silence", "list", "--json"]).stdout) == []
    everything = json.loads(
        runner.invoke(app, [*base, "silence", "list", "--all", "--json"]).stdout
    )
    assert everything[0]["active"] is False
    bad = runner.invoke(app, [*base, "silence", "add", "--match", "nonsense", "--for", "1h"])
    assert bad.exit_code == 2 and "bad matcher" in bad.output
    assert runner.invoke(app, [*base, "silence", "expire", "nope"]).exit_code == 1
