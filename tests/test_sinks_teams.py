"""Teams sink: the Workflows message shape, Adaptive Card escaping, the payload size cap."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from sink_receivers import (
    Receiver,
    Reply,
    hostile_notification,
    machine_event,
    make_notification,
)

from monitor.alerts.sinks.base import DeliveryError
from monitor.alerts.sinks.teams import TeamsSettings, TeamsSink, build_payload, escape_markdown

SIG = "sigTEAMSsecret123"


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver(default=Reply(202, b"")).start() as receiver:
        yield receiver


def card_texts(card: dict[str, Any]) -> list[str]:
    out = []
    for item in card["body"]:
        if item["type"] == "TextBlock":
            out.append(item["text"])
        if item["type"] == "FactSet":
            out += [f["title"] for f in item["facts"]] + [f["value"] for f in item["facts"]]
    return out


def test_message_shape_and_send(rx: Receiver) -> None:
    url = f"{rx.url}/workflows/abc/triggers/manual/paths/invoke?api-version=1&sig={SIG}"
    s = TeamsSink("ops-teams", TeamsSettings.model_validate({"url": url}))
    s.send(make_notification([machine_event(), machine_event("vm2")], total=4))
    _, headers, body = rx.wait_for(1)[0]
    assert headers["content-type"] == "application/json"
    msg = orjson.loads(body)
    assert msg["type"] == "message"
    (att,) = msg["attachments"]
    assert att["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert att["contentUrl"] is None
    card = att["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    kinds = [b["type"] for b in card["body"]]
    assert kinds[:3] == ["TextBlock", "TextBlock", "FactSet"]
    facts = {f["title"]: f["value"] for f in card["body"][2]["facts"]}
    assert facts["Severity"] == "HIGH" and facts["Tenant"] == "contoso" and facts["Events"] == "4"
    texts = card_texts(card)
    assert "Low -\\> High" in texts  # `>` escaped
    assert texts[-1] == "... and 2 more"
    assert SIG not in repr(s) and SIG not in s.describe()


def test_hostile_text_is_escaped() -> None:
    card = build_payload(hostile_notification())["attachments"][0]["content"]
    for text in card_texts(card):
        assert "[click](" not in text and "<b>" not in text and "\u202e" not in text
        assert "*bold*" not in text and "_it_" not in text and "\x1b" not in text
    joined = "\n".join(card_texts(card))
    assert "\\[click\\](https://evil.example)" in joined
    assert "\\*bold\\*" in joined and "\U0001f6a8" in joined
    assert escape_markdown("- item\n1. x\n10.0.0.1 ok") == "\\- item\n1\\. x\n10.0.0.1 ok"


def test_payload_stays_under_the_size_cap() -> None:
    events = [machine_event(f"vm{i}-" + "x" * 3000) for i in range(40)]
    payload = build_payload(make_notification(events, summary="s" * 5000), max_events=40)
    size = len(orjson.dumps(payload))
    assert size <= 28_000
    texts = card_texts(payload["attachments"][0]["content"])
    assert texts[-1].startswith("... and ") and texts[-1].endswith(" more")


def test_errors_do_not_leak_the_signature(rx: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = TeamsSink("t", TeamsSettings.model_validate({"url": f"{rx.url}/x?sig={SIG}"}))
    rx.reply(Reply(400, "BadRequest"), 502)
    with pytest.raises(DeliveryError) as bad:
        s.send(make_notification())
    with pytest.raises(DeliveryError) as gateway:
        s.send(make_notification())
    assert not bad.value.retryable and gateway.value.retryable
    for text in (str(bad.value), str(gateway.value), caplog.text):
        assert SIG not in text
