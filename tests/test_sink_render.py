"""Sink previews (`render`): the exact payload, no secret, nothing sent; PagerDuty keeps a group's
incident open while some of its subjects still fire."""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import json
import logging
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from alert_helpers import (
    FakeClock,
    change_event,
    publish,
    restore_logging,  # noqa: F401 (fixture)
    settings_for,
    write_alerts,
)
from sink_receivers import (
    HOSTILE,
    Receiver,
    Reply,
    SmtpReceiver,
    hostile_notification,
    make_notification,
)
from typer.testing import CliRunner

from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.sinks import slack, stdout, teams
from monitor.alerts.sinks.base import Notification, Sink
from monitor.alerts.sinks.common import notification_document, safe_text, to_json_line
from monitor.alerts.sinks.registry import build_sink, sink_types
from monitor.alerts.sinks.webhook import SIGNATURE_PLACEHOLDER
from monitor.cli import app

SOURCE = "tests/sinks.yaml"
SLACK_TOKEN = "SlackTokenSECRET0001"
TEAMS_SIG = "TeamsSigSECRET0002"
HOOK_PATH = "WebhookPathSECRET0003"
HOOK_SECRET = "whsec_" + base64.b64encode(b"K" * 32).decode()
HOOK_HEADER = "Bearer HeaderTokenSECRET0004"
ROUTING_KEY = "R0UTINGkeySECRET0005abcdef012345"
SMTP_PASSWORD = "SmtpPassSECRET0006"


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver(default=Reply(202, b'{"status":"success"}')).start() as receiver:
        yield receiver


@pytest.fixture
def smtp() -> Iterator[SmtpReceiver]:
    with SmtpReceiver().start() as receiver:
        yield receiver


def sink_settings(kind: str, rx: Receiver, smtp: SmtpReceiver, tmp_path: Path) -> dict[str, Any]:
    """Settings of each sink type, full of secrets, pointing at local receivers."""
    settings: dict[str, dict[str, Any]] = {
        "slack": {"url": f"{rx.url}/services/T0/B0/{SLACK_TOKEN}"},
        "teams": {"url": f"{rx.url}/workflows/1/invoke?sig={TEAMS_SIG}"},
        "webhook": {
            "url": f"{rx.url}/in/{HOOK_PATH}",
            "secret": HOOK_SECRET,
            "headers": {"Authorization": HOOK_HEADER},
        },
        "pagerduty": {"routing_key": ROUTING_KEY, "url": f"{rx.url}/v2/enqueue"},
        "email": {
            "host": "127.0.0.1",
            "port": smtp.port,
            "starttls": False,
            "username": "alerts",
            "password": SMTP_PASSWORD,
            "from": "mde-monitor@contoso.example",
            "to": ["secops@contoso.example"],
        },
        "file": {"path": str(tmp_path / "out" / "alerts.jsonl")},
        "stdout": {"format": "json"},
    }
    return settings[kind]


SECRETS = (
    SLACK_TOKEN,
    TEAMS_SIG,
    HOOK_PATH,
    HOOK_SECRET,
    HOOK_SECRET.removeprefix("whsec_"),
    HOOK_HEADER,
    "HeaderTokenSECRET",
    ROUTING_KEY,
    SMTP_PASSWORD,
)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def check_payload(kind: str, sink: Sink, n: Notification, text: str, tmp_path: Path) -> None:
    """The essentials of each sink's preview (the same payload `send` builds)."""
    if kind == "slack":
        doc = orjson.loads(text)
        assert doc == slack.build_payload(n)
        assert doc["blocks"][0]["type"] == "header"
        assert doc["text"].startswith("[HIGH] &lt;!channel&gt; &lt;@U123&gt;")
    elif kind == "teams":
        doc = orjson.loads(text)
        assert doc == teams.build_payload(n)
        assert doc["attachments"][0]["content"]["type"] == "AdaptiveCard"
    elif kind == "webhook":
        head, _, body = text.partition("\n\n")
        headers = dict(line.split(": ", 1) for line in head.splitlines())
        assert headers["webhook-id"] == n.id and headers["webhook-timestamp"].isdigit()
        assert headers["webhook-signature"] == SIGNATURE_PLACEHOLDER
        assert headers["Authorization"] == "***"
        assert headers["content-type"].startswith("application/cloudevents-batch+json")
        assert headers["mde-status"] == "firing" and headers["mde-total"] == str(n.total)
        assert orjson.loads(body) == orjson.loads(orjson.dumps(list(n.events)))
    elif kind == "pagerduty":
        doc = orjson.loads(text)
        assert doc["routing_key"] == "***" and doc["event_action"] == "trigger"
        assert doc["dedup_key"] == n.group_key and doc["payload"]["severity"] == "error"
        # shown in PagerDuty's UI: display-safe (issue 10 item 9), like every sink's text
        assert doc["payload"]["custom_details"]["events"][0]["displayName"] == safe_text(HOSTILE)
    elif kind == "email":
        msg = email.message_from_string(text, policy=email.policy.default)
        assert str(msg["Subject"]).startswith("[mde-monitor] <!channel>")
        assert msg["To"] == "secops@contoso.example" and msg["Message-ID"]
        plain = msg.get_body(("plain",))
        html = msg.get_body(("html",))
        assert plain is not None and html is not None
        assert "<!channel>" in plain.get_content()
        assert "&lt;!channel&gt;" in html.get_content()
    elif kind in ("file", "stdout"):
        assert orjson.loads(text) == orjson.loads(to_json_line(notification_document(n)))
        assert not (tmp_path / "out").exists()
    else:
        raise AssertionError(f"no check for sink type {kind}")


@pytest.mark.parametrize("kind", sink_types())
def test_render_shows_the_payload_without_secrets_and_sends_nothing(
    kind: str,
    rx: Receiver,
    smtp: SmtpReceiver,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sink = build_sink(f"{kind}-1", kind, sink_settings(kind, rx, smtp, tmp_path), SOURCE)
    n = hostile_notification()
    text = sink.render(n)
    assert isinstance(text, str) and text
    assert_no_secret(text)
    check_payload(kind, sink, n, text, tmp_path)
    # nothing sent, nothing written: no request, no mail, no file, no stdout, no secret logged
    assert rx.requests == [] and smtp.messages == []
    assert capsys.readouterr().out == ""
    assert_no_secret(caplog.text)


def test_stdout_human_render_is_the_text_it_writes(tmp_path: Path) -> None:
    sink = build_sink("out", "stdout", {"format": "human", "max_events": 2}, SOURCE)
    n = hostile_notification(5)
    text = sink.render(n)
    assert text == stdout.render_human(n, 2)
    assert "\x1b" not in text and "\u202e" not in text and "... and 3 more" in text


def test_webhook_render_follows_the_mode_and_signing(rx: Receiver) -> None:
    unsigned = build_sink("hook", "webhook", {"url": f"{rx.url}/x", "batch": False}, SOURCE)
    n = make_notification()
    head, _, body = unsigned.render(n).partition("\n\n")
    assert "webhook-signature" not in head and f"webhook-id: {n.id}" in head
    doc = orjson.loads(body)
    assert doc["type"] == "mde.alert.firing" and doc["data"]["events"] == n.events
    assert rx.requests == []


def test_pagerduty_render_of_a_resolve(rx: Receiver) -> None:
    sink = build_sink("pd", "pagerduty", {"routing_key": ROUTING_KEY, "url": rx.url}, SOURCE)
    resolved = make_notification(status="resolved", id="n-2")
    doc = orjson.loads(sink.render(resolved))
    assert doc == {
        "routing_key": "***",
        "event_action": "resolve",
        "dedup_key": resolved.group_key,
        "client": "mde-monitor",
    }
    held = dataclasses.replace(resolved, extra={"still_firing": 2})
    assert "nothing sent" in sink.render(held) and "2 subject(s)" in sink.render(held)
    assert rx.requests == []


def test_pagerduty_keeps_the_incident_open_while_subjects_still_fire(
    rx: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="monitor.alerts.sinks.pagerduty")
    sink = build_sink(
        "pd", "pagerduty", {"routing_key": ROUTING_KEY, "url": f"{rx.url}/v2/enqueue"}, SOURCE
    )
    firing = make_notification(id="n-1")
    sink.send(dataclasses.replace(firing, extra={"still_firing": 3}))
    assert len(rx.wait_for(1)) == 1
    partly = make_notification(status="resolved", id="n-2")
    sink.send(dataclasses.replace(partly, extra={"still_firing": 1}))  # returns normally
    assert len(rx.requests) == 1  # send is synchronous: nothing went out
    assert "still firing" in caplog.text and "stays open" in caplog.text
    assert_no_secret(caplog.text)
    last = make_notification(status="resolved", id="n-3")
    sink.send(dataclasses.replace(last, extra={"still_firing": 0}))
    trigger, resolve = (orjson.loads(r.body) for r in rx.wait_for(2))
    assert trigger["event_action"] == "trigger" and resolve["event_action"] == "resolve"
    assert resolve["dedup_key"] == trigger["dedup_key"] and resolve["routing_key"] == ROUTING_KEY
    # no still_firing (a rule that does not track firing subjects): resolve as before
    sink.send(make_notification(status="resolved", id="n-4"))
    assert orjson.loads(rx.wait_for(3)[2].body)["event_action"] == "resolve"
    assert len(rx.requests) == 3


SENSOR_RULE = """
rules:
  - name: sensor
    description: Sensor health degraded
    severity: medium
    match:
      type: mde.machine.health_degraded
    sinks: [pd]
    group_by: [tenant]
    group_wait: 30s
    group_interval: 1m
    repeat_interval: 4h
"""


def health(i: int, degraded: bool, gen: int) -> dict[str, Any]:
    old, new = ("Active", "Inactive") if degraded else ("Inactive", "Active")
    kind = "degraded" if degraded else "recovered"
    return change_event(f"mde.machine.health_{kind}", i, "healthStatus", old, new, generation=gen)


def test_pagerduty_resolves_through_the_dispatcher_only_when_the_last_subject_recovers(
    rx: Receiver, tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    sinks = f"""
        delivery: {{backoff_base: 10ms, backoff_max: 50ms, jitter: 0}}
        sinks:
          pd: {{type: pagerduty, routing_key: {ROUTING_KEY}, url: "{rx.url}/v2/enqueue"}}
        """
    write_alerts(tmp_path / "alerts", SENSOR_RULE, sinks)
    clock = FakeClock()
    d = Dispatcher(
        settings_for(redis_url, redis_prefix, tmp_path / "alerts"),
        redis_client,
        consumer="t1",
        clock=clock,
        sleep=clock.sleep,
    )
    assert d.errors == []
    publish(redis_client, redis_prefix, [health(i, True, 1) for i in range(3)])
    d.drain(5)
    assert [orjson.loads(r.body)["event_action"] for r in rx.wait_for(1)] == ["trigger"]
    clock.advance(120)
    publish(redis_client, redis_prefix, [health(0, False, 2), health(1, False, 2)])
    stats = d.drain(5)
    assert stats.resolving == 2 and stats.dead == 0
    assert len(rx.requests) == 1  # machine 2 still fires: the incident stays open
    clock.advance(120)
    publish(redis_client, redis_prefix, [health(2, False, 2)])
    d.drain(5)
    trigger, resolve = (orjson.loads(r.body) for r in rx.wait_for(2))
    assert resolve["event_action"] == "resolve" and resolve["dedup_key"] == trigger["dedup_key"]
    assert len(rx.requests) == 2


# ------------------------------------------------------------------------------------------ CLI

CLI_RULES = """
rules:
  - name: risk-high
    description: Risk raised to High
    severity: high
    match:
      type: mde.machine.risk_raised
      where:
        - {field: changes.riskScore.new, op: gte, value: High}
    sinks: [chat, hook, out]
    group_wait: 1m
"""
SLACK_URL = f"https://hooks.slack.com/services/T000/B000/{SLACK_TOKEN}"
HOOK_URL = f"https://hooks.example.com/in/{HOOK_PATH}"


@pytest.fixture
def alerts_dir(tmp_path: Path) -> Path:
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    (alerts / "rules.yaml").write_text(textwrap.dedent(CLI_RULES))
    (alerts / "sinks.yaml").write_text(
        textwrap.dedent(
            f"""
            sinks:
              chat: {{type: slack, url: "{SLACK_URL}"}}
              hook:
                type: webhook
                url: "{HOOK_URL}"
                secret: "{HOOK_SECRET}"
                headers: {{Authorization: "{HOOK_HEADER}"}}
              out: {{type: stdout, format: human}}
            """
        )
    )
    return alerts


RULES_TEST_ARGS = [
    "rules",
    "test",
    "--type",
    "mde.machine.risk_raised",
    "--field",
    "changes.riskScore.old=Low",
    "--field",
    "changes.riskScore.new=High",
    "--field",
    "displayName=<!channel> vm9",
]


def sections(output: str) -> dict[str, str]:
    """The per-sink previews of `rules test`, by sink name."""
    out: dict[str, str] = {}
    for chunk in output.split("--- sink ")[1:]:
        name, _, body = chunk.partition(" ---\n")
        out[name] = body
    return out


@pytest.mark.usefixtures("restore_logging")
def test_cli_rules_test_prints_each_sink_rendering_without_secrets(alerts_dir: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["--alerts-dir", str(alerts_dir), *RULES_TEST_ARGS])
    assert res.exit_code == 0, res.output
    assert "risk-high (firing)" in res.output
    for secret in (*SECRETS, SLACK_URL, HOOK_URL, "hooks.example.com/in"):
        assert secret not in res.output
    previews = sections(res.stdout)
    assert set(previews) == {"chat", "hook", "out"}
    blocks = json.loads(previews["chat"])["blocks"]
    assert blocks[0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": blocks[0]["text"]["text"]},
    }
    assert "&lt;!channel&gt; vm9" in json.dumps(blocks, ensure_ascii=False)
    head, _, body = previews["hook"].partition("\n\n")
    assert "webhook-signature: v1,<computed at send time>" in head
    assert "Authorization: ***" in head and "webhook-timestamp: " in head
    assert json.loads(body)["data"]["displayName"] == "<!channel> vm9"
    assert previews["out"].startswith("[HIGH] FIRING risk-high - ")

    as_json = runner.invoke(app, ["--alerts-dir", str(alerts_dir), *RULES_TEST_ARGS, "--json"])
    assert as_json.exit_code == 0, as_json.output
    for secret in (*SECRETS, SLACK_URL, HOOK_URL):
        assert secret not in as_json.output
    (match,) = json.loads(as_json.stdout)["matches"]
    assert json.loads(match["sinks"]["chat"])["blocks"][0]["type"] == "header"
