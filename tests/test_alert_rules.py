"""Rule and sink loading: errors name file, line and rule; a bad file never stops the good ones."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from monitor.alerts.rules import (
    COUNTERPARTS,
    build_sinks,
    derived_resolve_types,
    load_rules,
)
from monitor.durations import format_duration, parse_duration
from monitor.events.envelope import EVENT_TYPES

SINKS = """
sinks:
  ops: {type: stdout}
  siem: {type: file, path: out.jsonl}
"""

GOOD = """
rules:
  - name: machine-risk-high
    description: A machine's risk score was raised to High
    severity: high
    match:
      type: mde.machine.risk_raised
      tenant: [contoso]
      where:
        - {field: changes.riskScore.new, op: eq, value: High}
        - {field: entity.machineTags, op: contains, value: production}
    sinks: [ops, siem]
    group_by: [tenant]
    group_wait: 30s
    group_interval: 5m
    realert: 4h
    template: {title: "{{ total }} risky", summary: "{{ first.data.displayName }}"}
"""


def write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_rule_compiles_with_all_settings(tmp_path: Path) -> None:
    write(tmp_path, "sinks.yaml", SINKS)
    write(tmp_path, "good.yaml", GOOD)
    rs = load_rules(tmp_path)
    assert rs.errors == []
    (rule,) = rs.rules
    assert rule.name == "machine-risk-high" and rule.severity == "high"
    assert rule.sinks == ("ops", "siem")
    assert (rule.group_wait, rule.group_interval, rule.repeat_interval) == (30, 300, 4 * 3600)
    assert rule.resolve_types == ("mde.machine.risk_lowered",)  # derived counterpart
    assert rule.tenants == ("contoso",)
    assert rule.line == 3 and rule.file.endswith("good.yaml")
    assert rule.title_template is not None
    assert set(rs.sinks) == {"ops", "siem"}


def test_errors_name_file_line_and_rule_and_bad_files_do_not_stop_good_ones(
    tmp_path: Path,
) -> None:
    write(tmp_path, "sinks.yaml", SINKS)
    write(tmp_path, "a_good.yaml", GOOD)
    write(
        tmp_path,
        "b_bad.yaml",
        """
        rules:
          - name: bad-regex
            match:
              type: mde.machine.updated
              where:
                - {field: entity.displayName, op: regex, value: "(unclosed"}
            sinks: [ops]
          - name: bad-sink
            match: {type: mde.machine.created}
            sinks: [ops, nowhere]
          - name: bad-duration
            match: {type: mde.machine.created}
            sinks: [ops]
            group_wait: soon
          - name: bad-type
            match: {type: mde.machine.exploded}
            sinks: [ops]
          - name: glob-nothing
            match: {type: "mde.printer.*"}
            sinks: [ops]
          - name: still-good
            match: {type: mde.user.created}
            sinks: [siem]
        """,
    )
    write(tmp_path, "c_broken.yaml", "rules:\n  - name: x\n    match: {type: [\n")
    rs = load_rules(tmp_path)
    assert [r.name for r in rs.rules] == ["machine-risk-high", "glob-nothing", "still-good"]
    by_rule = {(e.rule, e.level): e for e in rs.errors}
    regex = by_rule[("bad-regex", "error")]
    assert regex.file.endswith("b_bad.yaml") and regex.line == 7
    assert "match.where[0].value" in regex.message and "bad regex" in regex.message
    sink = by_rule[("bad-sink", "error")]
    assert sink.line == 11 and "unknown sink 'nowhere'" in sink.message
    dur = by_rule[("bad-duration", "error")]
    assert dur.line == 15 and "group_wait" in dur.message and "not a duration" in dur.message
    assert "unknown event type 'mde.machine.exploded'" in by_rule[("bad-type", "error")].message
    assert by_rule[("glob-nothing", "warning")].message.endswith("matches no known event type")
    broken = next(e for e in rs.errors if e.file.endswith("c_broken.yaml"))
    assert broken.line >= 3 and "invalid YAML" in broken.message
    assert str(regex).startswith(f"{regex.file}:7: rule bad-regex:")


def test_duplicate_names_unknown_keys_and_duplicate_yaml_keys(tmp_path: Path) -> None:
    write(tmp_path, "sinks.yaml", SINKS)
    write(
        tmp_path,
        "rules.yaml",
        """
        rules:
          - name: twice
            match: {type: mde.user.created}
            sinks: [ops]
          - name: twice
            match: {type: mde.user.deleted}
            sinks: [ops]
          - name: typo
            match: {type: mde.user.created}
            sinks: [ops]
            severty: high
          - name: dup-key
            match: {type: mde.user.created}
            sinks: [ops]
            sinks: [siem]
        """,
    )
    rs = load_rules(tmp_path)
    msgs = [str(e) for e in rs.errors]
    assert any("rule twice: duplicate rule name (first defined at" in m for m in msgs)
    assert any(":12: rule typo: severty: Extra inputs are not permitted" in m for m in msgs)
    assert any(":16: rule dup-key: duplicate key 'sinks'" in m for m in msgs)
    assert [r.name for r in rs.rules] == ["twice"]


def test_sinks_file_interpolates_env_and_reports_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_URL", "https://hooks.example.com/T000/secret-token")
    monkeypatch.delenv("MISSING_URL", raising=False)
    write(
        tmp_path,
        "sinks.yaml",
        """
        delivery: {max_attempts: 3, backoff_base: 1s}
        sinks:
          hook: {type: webhook, url: "${HOOK_URL}"}
          gone: {type: webhook, url: "${MISSING_URL}"}
        """,
    )
    rs = load_rules(tmp_path)
    assert rs.delivery.max_attempts == 3 and rs.delivery.backoff_base == 1
    assert rs.sinks["hook"].settings["url"] == "https://hooks.example.com/T000/secret-token"
    assert "secret-token" not in repr(rs.sinks["hook"])
    (err,) = rs.errors
    assert err.line == 5 and "MISSING_URL is not set" in err.message


def test_durations() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    assert parse_duration(90) == 90
    assert parse_duration("2d") == 172800
    for bad in ("soon", "-5s", "", True, "5 minutes"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert format_duration(5400) == "1h30m" and format_duration(0) == "0s"


def test_counterparts_cover_every_transition_both_ways() -> None:
    for a, b in COUNTERPARTS.items():
        assert a in EVENT_TYPES and b in EVENT_TYPES and COUNTERPARTS[b] == a
    assert derived_resolve_types(["mde.machine.health_degraded"]) == (
        "mde.machine.health_recovered",
    )
    assert derived_resolve_types(["mde.machine.*"]) == ()  # all counterparts are matched too


def test_shipped_pack_loads_clean() -> None:
    rs = load_rules(Path(__file__).resolve().parent.parent / "alerts")
    assert rs.errors == []
    assert len(rs.rules) >= 15
    assert {"stdout", "file"} <= set(rs.sinks)


def test_sink_build_errors_name_file_and_line_without_secrets(tmp_path: Path) -> None:
    write(
        tmp_path,
        "sinks.yaml",
        """
        sinks:
          ok: {type: stdout}
          chat: {type: slack, url: "http://chat.example.com/services/T0/B0/s3cr3t"}
          odd: {type: carrier-pigeon}
        """,
    )
    sinks, errors = build_sinks(load_rules(tmp_path))
    assert set(sinks) == {"ok"}
    by_line = {e.line: e for e in errors}
    assert set(by_line) == {4, 5}
    assert "https" in by_line[4].message and "s3cr3t" not in str(errors)
    assert "unknown sink type 'carrier-pigeon'" in by_line[5].message
