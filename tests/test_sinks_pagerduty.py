"""PagerDuty sink: Events API v2 trigger/resolve bodies, dedup key, severity map, errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest
from sink_receivers import HOSTILE, Receiver, Reply, hostile_notification, make_notification

from monitor.alerts.sinks.base import DeliveryError
from monitor.alerts.sinks.common import safe_text
from monitor.alerts.sinks.pagerduty import PagerDutySettings, PagerDutySink, dedup_key

ROUTING_KEY = "R0UTINGkeySECRET0123456789abcdef"


@pytest.fixture
def rx() -> Iterator[Receiver]:
    default = Reply(202, b'{"status":"success","message":"Event processed","dedup_key":"x"}')
    with Receiver(default=default).start() as receiver:
        yield receiver


def sink(rx: Receiver) -> PagerDutySink:
    settings = PagerDutySettings.model_validate(
        {"routing_key": ROUTING_KEY, "url": f"{rx.url}/v2/enqueue", "component": "defender"}
    )
    return PagerDutySink("pd", settings)


@pytest.mark.parametrize(
    ("severity", "expected"),
    [("critical", "critical"), ("high", "error"), ("medium", "warning"), ("low", "info"),
     ("info", "info")],
)  # fmt: skip
def test_trigger_body(rx: Receiver, severity: str, expected: str) -> None:
    n = make_notification(severity=severity)  # type: ignore[arg-type]
    sink(rx).send(n)
    path, headers, body = rx.wait_for(1)[0]
    doc = orjson.loads(body)
    assert path == "/v2/enqueue" and headers["content-type"] == "application/json"
    assert doc["routing_key"] == ROUTING_KEY and doc["event_action"] == "trigger"
    assert doc["dedup_key"] == n.group_key
    p = doc["payload"]
    assert p["severity"] == expected and p["summary"] == n.title and p["source"] == "contoso"
    assert p["component"] == "defender" and p["timestamp"] == n.events[0]["time"]
    details = p["custom_details"]
    assert details["rule"] == n.rule and details["total"] == 1
    assert details["events"][0]["changes"]["riskScore"] == {"old": "Low", "new": "High"}


def test_resolve_uses_the_same_dedup_key(rx: Receiver) -> None:
    s = sink(rx)
    s.send(make_notification())
    s.send(make_notification(status="resolved", id="n-2"))
    trigger, resolve = (orjson.loads(r.body) for r in rx.wait_for(2))
    assert resolve["event_action"] == "resolve" and "payload" not in resolve
    assert resolve["dedup_key"] == trigger["dedup_key"]


def test_long_and_hostile_values(rx: Receiver) -> None:
    sink(rx).send(hostile_notification())
    doc = orjson.loads(rx.wait_for(1)[0].body)
    summary = doc["payload"]["summary"]
    assert len(summary) <= 1024 and "\u202e" not in summary and "\x1b" not in summary
    # shown in PagerDuty's UI: display-safe (issue 10 item 9), like every sink's text
    assert doc["payload"]["custom_details"]["events"][0]["displayName"] == safe_text(HOSTILE)
    assert len(dedup_key("k" * 300)) <= 255 and dedup_key("k" * 300) == dedup_key("k" * 300)


def test_errors(rx: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = sink(rx)
    rx.reply(
        Reply(400, '{"status":"invalid event","errors":["routing_key invalid"]}'),
        Reply(429, headers={"Retry-After": "4"}),
        500,
    )
    errs = []
    for _ in range(3):
        with pytest.raises(DeliveryError) as info:
            s.send(make_notification())
        errs.append(info.value)
    assert [(e.status, e.retryable) for e in errs] == [(400, False), (429, True), (500, True)]
    assert errs[1].retry_after == 4.0
    for text in [*map(str, errs), repr(s), s.describe(), caplog.text]:
        assert ROUTING_KEY not in text
