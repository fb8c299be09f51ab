"""Issue 10 item 3: templates run on a budget; titles and summaries fit every sink.

`{{ 'x' * 200000000 }}` once produced a 200 MB summary stored per delivery and nested
`range(100000)` loops ran to MemoryError; both passed `rules check`. Now `rules check` trial-renders
every template, a template over budget at run time falls back to the default text, and long
titles/summaries are cut for each sink's own limits.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import redis
from alert_helpers import FakeClock, change_event, publish, settings_for, write_alerts
from sink_receivers import Receiver

from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.render import SUMMARY_LIMIT, TITLE_LIMIT
from monitor.alerts.rules import load_rules

SINKS = "sinks:\n  rec: {type: stdout}\n"


def test_rules_check_reports_templates_over_budget(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    (alerts / "sinks.yaml").write_text(SINKS)
    (alerts / "rules.yaml").write_text(
        textwrap.dedent(
            """
            rules:
              - name: huge-string
                match: {type: mde.machine.updated}
                sinks: [rec]
                template:
                  summary: "{{ 'x' * 200000000 }}"
              - name: nested-loops
                match: {type: mde.machine.updated}
                sinks: [rec]
                template:
                  title: "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
              - name: fine
                match: {type: mde.machine.updated}
                sinks: [rec]
                template:
                  title: "{{ total }} machines changed in {{ tenant }}"
            """
        )
    )
    rs = load_rules(alerts)
    assert [r.name for r in rs.rules] == ["fine"]
    by_rule = {e.rule: e for e in rs.problems}
    assert set(by_rule) == {"huge-string", "nested-loops"}
    assert by_rule["huge-string"].message.startswith("template.summary: over the render budget")
    assert by_rule["huge-string"].line == 7
    assert by_rule["nested-loops"].message.startswith("template.title: over the render budget")


RULES = """
rules:
  - name: data-bomb
    match: {type: mde.machine.risk_raised}
    sinks: [hook]
    group_wait: 0s
    template:
      # harmless on the sample event (no changes), 200 MB on a real one
      summary: "{{ 'x' * ((first.data.changes.riskScore.new | length) * 50000000) }}"
  - name: long-text
    match: {type: mde.machine.risk_raised}
    sinks: [chat, pd, hook]
    group_wait: 0s
    template:
      title: "{% for i in range(200) %}title-{% endfor %}"
      summary: "{% for i in range(3000) %}abcdefghij{% endfor %}"
"""


def test_over_budget_at_run_time_falls_back_and_long_text_fits_each_sink(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    with Receiver() as rx:
        alerts = write_alerts(
            tmp_path / "alerts",
            RULES,
            f"""
            sinks:
              chat: {{type: slack, url: "{rx.url}/slack/T0/B0/abcdefgh"}}
              pd: {{type: pagerduty, routing_key: "R0123456789", url: "{rx.url}/pd"}}
              hook: {{type: webhook, url: "{rx.url}/hook", batch: false}}
            """,
        )
        rs = load_rules(alerts)
        assert rs.problems == [], rs.problems
        publish(
            redis_client,
            redis_prefix,
            [change_event("mde.machine.risk_raised", 1, "riskScore", "Low", "High")],
        )
        clock = FakeClock()
        d = Dispatcher(
            settings_for(redis_url, redis_prefix, alerts),
            redis_client,
            clock=clock,
            sleep=clock.sleep,
        )
        stats = d.drain(10)
        d.close()
        assert stats.sent == 4 and stats.dead == 0, stats
        by_path = {
            r.path.split("/")[1]: json.loads(r.body) for r in rx.requests if "hook" not in r.path
        }
        hooks = [json.loads(r.body) for r in rx.requests if r.path == "/hook"]
    # the bomb fell back to the default summary (one line per event), nothing huge was stored
    bomb = next(h for h in hooks if h["data"]["rule"] == "data-bomb")
    assert bomb["data"]["summary"].startswith("- vm1.contoso.local")
    for key in redis_client.scan_iter(f"{redis_prefix}:alerts:delivery:*"):
        assert len(redis_client.dump(key) or b"") < 200_000
    # long title and summary: cut at render, then to each sink's own limits
    long = next(h for h in hooks if h["data"]["rule"] == "long-text")["data"]
    assert len(long["title"]) == TITLE_LIMIT and long["title"].endswith("…")
    assert len(long["summary"]) == SUMMARY_LIMIT
    slack = by_path["slack"]
    header = slack["blocks"][0]["text"]["text"]
    assert len(header) <= 150 and all(len(json.dumps(b)) < 3200 for b in slack["blocks"])
    assert len(by_path["pd"]["payload"]["summary"]) <= 1024
