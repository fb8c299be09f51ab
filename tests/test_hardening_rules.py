"""Issue 10 items 1-2: one hostile regex or rule file never stalls alerting for everyone.

1. A catastrophic regex (`^(a+)+$` against `"a"*40 + "!"`) runs on RE2 in linear time; nested
   quantifiers are flagged at load; RE2-refused constructs are load errors that say so; an event
   that kills the dispatcher is retried alone and quarantined after MAX_EVAL_TRIES deliveries.
2. A non-UTF-8 byte, 20,000-deep nesting or an alias bomb in a rule file, sinks.yaml or the config
   file is one error naming the file and line; the other files keep working.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
from alert_helpers import (
    FakeClock,
    RecordingSink,
    change_event,
    pending_count,
    publish,
    restore_logging,  # noqa: F401 (fixture)
    settings_for,
)
from typer.testing import CliRunner

from monitor.alerts import quarantine
from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.rules import load_rules
from monitor.cli import app
from monitor.config import ConfigError, load_settings

GOOD_RULES = """
rules:
  - name: risk
    match: {type: mde.machine.risk_raised}
    sinks: [rec]
    group_wait: 0s
"""

CATASTROPHIC = """
rules:
  - name: evil-regex
    match:
      type: mde.machine.risk_raised
      where:
        - {field: displayName, op: regex, value: "^(a+)+$"}
    sinks: [rec]
    group_wait: 0s
"""

SINKS = "sinks:\n  rec: {type: stdout}\n"

# ~0.7 KB: 9 levels of 9 aliases, 387 million nodes once expanded
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)
DEEP = "rules: " + "[" * 20_000 + "]" * 20_000 + "\n"
NON_UTF8 = b"rules:\n  - name: latin1\n    description: caf\xe9\n"


def _alerts(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    d = tmp_path / "alerts"
    d.mkdir(exist_ok=True)
    for name, body in files.items():
        data = body if isinstance(body, bytes) else textwrap.dedent(body).encode()
        (d / name).write_bytes(data)
    return d


@pytest.mark.timeout(60)
def test_catastrophic_regex_does_not_stall_dispatch_and_good_rules_deliver(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    alerts = _alerts(
        tmp_path, {"a_evil.yaml": CATASTROPHIC, "b_good.yaml": GOOD_RULES, "sinks.yaml": SINKS}
    )
    rs = load_rules(alerts)
    assert [r.name for r in rs.rules] == ["evil-regex", "risk"]
    (warning,) = [e for e in rs.errors if e.rule == "evil-regex"]
    assert warning.level == "warning" and "nested quantifier" in warning.message
    assert warning.file.endswith("a_evil.yaml") and warning.line == 7
    events = [
        change_event("mde.machine.risk_raised", i, "riskScore", "Low", "High") for i in range(3)
    ]
    for e in events:
        e["data"]["displayName"] = "a" * 40 + "!"  # 2^40 steps on a backtracking engine
    publish(redis_client, redis_prefix, events)
    sink = RecordingSink("rec")
    clock = FakeClock()
    d = Dispatcher(
        settings_for(redis_url, redis_prefix, alerts),
        redis_client,
        consumer="t1",
        sinks={"rec": sink},
        clock=clock,
        sleep=clock.sleep,
    )
    stats = d.drain(5)
    assert stats.read == 3 and stats.sent == 1
    assert [n.rule for n in sink.sent] == ["risk"] and sink.sent[0].total == 3
    assert pending_count(redis_client, redis_prefix) == 0


def test_regex_constructs_re2_refuses_are_load_errors_naming_the_construct(
    tmp_path: Path,
) -> None:
    rules = """
    rules:
      - name: backref
        match:
          type: mde.machine.updated
          where: [{field: displayName, op: regex, value: '(a)\\1'}]
        sinks: [rec]
      - name: lookahead
        match:
          type: mde.machine.updated
          where: [{field: displayName, op: regex, value: '^(?!vm)'}]
        sinks: [rec]
      - name: fine
        match:
          type: mde.machine.updated
          where: [{field: displayName, op: regex, value: '^vm[0-9]+\\.'}]
        sinks: [rec]
    """
    rs = load_rules(_alerts(tmp_path, {"r.yaml": rules, "sinks.yaml": SINKS}))
    assert [r.name for r in rs.rules] == ["fine"]
    by_rule = {e.rule: e for e in rs.problems}
    assert set(by_rule) == {"backref", "lookahead"}
    for e in by_rule.values():
        assert "RE2" in e.message and "lookahead/lookbehind" in e.message, e.message
        assert e.line == {"backref": 6, "lookahead": 11}[str(e.rule)]


POISON_SCRIPT = """
import json, sys
from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.sinks.file import FileSink
from monitor.config import Settings
from monitor.redis_conn import connect
s = Settings(redis_url=sys.argv[1], redis_prefix=sys.argv[2], alerts_dir=sys.argv[3])
d = Dispatcher(s, connect(s.redis_url), consumer="poisoned")
print(json.dumps(d.drain(30).to_dict()))
"""


def test_event_that_kills_the_dispatcher_is_quarantined_and_the_others_are_delivered(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    out = tmp_path / "out.jsonl"
    alerts = _alerts(
        tmp_path,
        {
            "rules.yaml": GOOD_RULES.replace(
                "group_wait: 0s", "group_wait: 0s\n    max_events: 50"
            ),
            "sinks.yaml": f'sinks:\n  rec: {{type: file, path: "{out}"}}\n',
        },
    )
    events = [
        change_event("mde.machine.risk_raised", i, "riskScore", "Low", "High") for i in range(6)
    ]
    publish(redis_client, redis_prefix, events)
    poison = events[2]["id"]
    env = {**os.environ, "MDE_MONITOR_CRASH_AT": f"evaluate_{poison}"}
    codes = []
    for _ in range(quarantine.MAX_EVAL_TRIES + 2):
        run = subprocess.run(
            [sys.executable, "-c", POISON_SCRIPT, redis_url, redis_prefix, str(alerts)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        codes.append(run.returncode)
        if run.returncode == 0:
            break
    # killed while handling it: as a batch, as a batch again, alone; then it is set aside
    assert codes == [-signal.SIGKILL] * quarantine.MAX_EVAL_TRIES + [0], run.stderr
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    assert stats["quarantined"] == 1 and stats["dead"] == 0
    (entry,) = quarantine.entries(redis_client, redis_prefix)
    assert entry["event_id"] == poison and entry["tries"] == str(quarantine.MAX_EVAL_TRIES)
    assert "did not complete" in entry["reason"]
    delivered = [json.loads(line) for line in out.read_text().splitlines()]
    got = sorted(e["id"] for n in delivered for e in n["events"])
    assert got == sorted(e["id"] for e in events if e["id"] != poison)  # each exactly once
    assert pending_count(redis_client, redis_prefix) == 0


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("restore_logging")
def test_bad_rule_files_are_one_error_each_and_the_good_file_keeps_working(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    alerts = _alerts(
        tmp_path,
        {
            "a_bomb.yaml": ALIAS_BOMB,
            "b_deep.yaml": DEEP,
            "c_latin1.yaml": NON_UTF8,
            "d_good.yaml": GOOD_RULES,
            "sinks.yaml": SINKS,
        },
    )
    rs = load_rules(alerts)
    assert [r.name for r in rs.rules] == ["risk"]
    by_file = {Path(e.file).name: e for e in rs.problems}
    assert set(by_file) == {"a_bomb.yaml", "b_deep.yaml", "c_latin1.yaml"}
    assert "alias bomb" in by_file["a_bomb.yaml"].message and by_file["a_bomb.yaml"].line > 0
    assert "nested deeper than" in by_file["b_deep.yaml"].message
    assert by_file["b_deep.yaml"].line == 1
    assert "not UTF-8" in by_file["c_latin1.yaml"].message
    assert by_file["c_latin1.yaml"].line == 3
    # dispatch with the same directory still delivers through the good rule
    publish(
        redis_client,
        redis_prefix,
        [change_event("mde.machine.risk_raised", 1, "riskScore", "Low", "High")],
    )
    sink = RecordingSink("rec")
    d = Dispatcher(settings_for(redis_url, redis_prefix, alerts), redis_client, sinks={"rec": sink})
    assert d.drain(5).sent == 1
    # `rules check` names every bad file and exits 2 (not a traceback)
    config = tmp_path / "monitor.yaml"
    config.write_text(f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\n")
    res = CliRunner().invoke(
        app, ["--config", str(config), "--alerts-dir", str(alerts), "rules", "check", "--json"]
    )
    assert res.exit_code == 2, res.output  # config problems: 2
    assert res.exception is None or isinstance(res.exception, SystemExit)
    doc = json.loads(res.output)
    found = {
        (Path(e["file"]).name, e["line"])
        for k in doc
        if k != "rules"
        for e in doc[k]
        if isinstance(e, dict) and "file" in e
    }
    assert {("b_deep.yaml", 1), ("c_latin1.yaml", 3)} <= found, res.output
    assert any(name == "a_bomb.yaml" for name, _line in found)


def test_bad_sinks_file_is_an_error_naming_its_line(tmp_path: Path) -> None:
    for body, expect in (
        (b"sinks:\n  rec: {type: stdout}\n  x: caf\xe9\n", ("not UTF-8", 3)),
        (ALIAS_BOMB.encode(), ("alias bomb", None)),
        (("sinks: " + "{a: " * 20_000 + "1" + "}" * 20_000).encode(), ("nested deeper", 1)),
    ):
        alerts = _alerts(tmp_path, {"sinks.yaml": body, "rules.yaml": GOOD_RULES})
        rs = load_rules(alerts)
        sinks_errors = [e for e in rs.problems if e.file.endswith("sinks.yaml")]
        assert len(sinks_errors) == 1 and expect[0] in sinks_errors[0].message
        if expect[1] is not None:
            assert sinks_errors[0].line == expect[1]


@pytest.mark.timeout(60)
def test_bad_config_file_is_a_config_error_naming_file_and_line(tmp_path: Path) -> None:
    for name, body, expect in (
        ("bomb.yaml", ALIAS_BOMB.encode(), "alias bomb"),
        ("deep.yaml", ("tenants: " + "[" * 20_000 + "]" * 20_000).encode(), "nested deeper"),
        ("latin1.yaml", b"redis_prefix: caf\xe9\n", "not UTF-8"),
    ):
        p = tmp_path / name
        p.write_bytes(body)
        with pytest.raises(ConfigError) as info:
            load_settings(p)
        assert str(info.value).startswith(f"{p}:") and expect in str(info.value)
