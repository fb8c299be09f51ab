"""Webhook sink: CloudEvents bodies, Standard Webhooks signatures (library-verified), errors."""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from sink_receivers import (
    HOSTILE,
    Receiver,
    Reply,
    hostile_notification,
    machine_event,
    make_notification,
    write_ca_bundle,
)
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from monitor.alerts.sinks.base import DeliveryError
from monitor.alerts.sinks.registry import SinkConfigError, build_sink
from monitor.alerts.sinks.webhook import WebhookSettings, WebhookSink

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
PATH_TOKEN = "hookPATHsecret"


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver().start() as receiver:
        yield receiver


def sink(url: str, **kw: Any) -> WebhookSink:
    return WebhookSink("siem", WebhookSettings.model_validate({"url": url, "secret": SECRET, **kw}))


def verify(headers: dict[str, str], body: bytes) -> Any:
    return Webhook(SECRET).verify(body, headers)


def test_single_event_structured_and_signed(rx: Receiver) -> None:
    n = make_notification()
    sink(f"{rx.url}/in/{PATH_TOKEN}").send(n)
    path, headers, body = rx.wait_for(1)[0]
    assert path == f"/in/{PATH_TOKEN}"
    assert headers["content-type"].startswith("application/cloudevents+json")
    assert verify(headers, body) == n.events[0]
    assert headers["webhook-id"] == n.id
    assert headers["mde-rule"] == n.rule and headers["mde-status"] == "firing"
    assert headers["mde-severity"] == "high" and headers["mde-total"] == "1"
    with pytest.raises(WebhookVerificationError):
        verify(headers, body.replace(b"High", b"Low!"))


def test_digest_is_a_batch_array(rx: Receiver) -> None:
    n = make_notification([machine_event("a"), machine_event("b"), machine_event("c")], total=10)
    sink(rx.url).send(n)
    _, headers, body = rx.wait_for(1)[0]
    assert headers["content-type"].startswith("application/cloudevents-batch+json")
    events = verify(headers, body)
    assert [e["data"]["displayName"] for e in events] == ["a", "b", "c"]
    assert all(e["specversion"] == "1.0" for e in events)
    assert headers["mde-total"] == "10"


def test_batch_false_sends_one_alert_event(rx: Receiver) -> None:
    n = make_notification([machine_event("a"), machine_event("b")], status="resolved")
    sink(rx.url, batch=False).send(n)
    _, headers, body = rx.wait_for(1)[0]
    assert headers["content-type"].startswith("application/cloudevents+json")
    doc = verify(headers, body)
    assert doc["type"] == "mde.alert.resolved" and doc["id"] == n.id
    assert doc["data"]["rule"] == n.rule and doc["data"]["status"] == "resolved"
    assert [e["data"]["displayName"] for e in doc["data"]["events"]] == ["a", "b"]


def test_webhook_id_is_stable_across_retries(rx: Receiver) -> None:
    s = sink(rx.url)
    rx.reply(503)
    n = make_notification()
    with pytest.raises(DeliveryError) as info:
        s.send(n)
    assert info.value.retryable
    s.send(n)
    first, second = rx.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == n.id
    verify(second.headers, second.body)


def test_hostile_text_round_trips_in_json(rx: Receiver) -> None:
    n = hostile_notification()
    sink(rx.url).send(n)
    _, headers, body = rx.wait_for(1)[0]
    events = verify(headers, body)
    assert events[0]["data"]["displayName"] == HOSTILE  # data is data: exact, JSON-escaped
    assert orjson.loads(body) == n.events
    assert all(v.isascii() for v in headers.values())  # header values sanitised


def test_extra_headers_and_secrets(rx: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"{rx.url}/in/{PATH_TOKEN}"
    s = sink(url, headers={"Authorization": "Bearer HEADERsecretTOKEN"})
    rx.reply(Reply(500, "oops"), 410, 400, Reply(429, headers={"Retry-After": "12"}))
    errs = []
    for _ in range(4):
        with pytest.raises(DeliveryError) as info:
            s.send(make_notification())
        errs.append(info.value)
    assert [(e.status, e.retryable, e.disable) for e in errs] == [
        (500, True, False),
        (410, False, True),
        (400, False, False),
        (429, True, False),
    ]
    assert errs[3].retry_after == 12.0
    assert rx.wait_for(1)[0].headers["authorization"] == "Bearer HEADERsecretTOKEN"
    for text in [*map(str, errs), repr(s), s.describe(), caplog.text]:
        for secret in (PATH_TOKEN, "HEADERsecretTOKEN", SECRET, SECRET[6:]):
            assert secret not in text


def test_timeout_is_retryable(rx: Receiver) -> None:
    rx.reply(Reply(delay=30))
    with pytest.raises(DeliveryError) as info:
        sink(rx.url, timeout_seconds=0.3).send(make_notification())
    assert info.value.retryable


def test_over_https_with_ca_bundle(tmp_path: Path) -> None:
    ca = trustme.CA()
    with Receiver(tls=ca).start() as rx:
        s = build_sink(
            "siem",
            "webhook",
            {"url": f"{rx.url}/in", "secret": SECRET},
            "alerts/sinks.yaml",
            ca_bundle=write_ca_bundle(ca, tmp_path),
        )
        s.send(make_notification())
        _, headers, body = rx.wait_for(1)[0]
        verify(headers, body)


@pytest.mark.parametrize(
    ("settings", "field", "message"),
    [
        ({"secret": "whsec_not base64!"}, "secret", "base64"),
        ({"secret": "whsec_" + base64.b64encode(b"short").decode()}, "secret", "at least 24"),
        ({"headers": {"webhook-signature": "x"}}, "headers", "cannot be set"),
        ({"headers": {"X-A": "a\r\nX-Injected: 1"}}, "headers", "line break"),
        ({"batch": "sometimes"}, "batch", "boolean"),
    ],
)
def test_config_errors(settings: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SinkConfigError) as info:
        build_sink("siem", "webhook", {"url": "https://example.com/x", **settings}, "s.yaml")
    text = str(info.value)
    assert text.startswith("s.yaml: sink 'siem' (webhook): field ") and field in text
    assert message in text
    assert "a\r\n" not in text
