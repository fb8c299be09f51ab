"""Slack sink: Block Kit payloads that validate, inert untrusted text, 429 and the rate limiter."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from sink_receivers import (
    HOSTILE,
    Receiver,
    Reply,
    hostile_notification,
    machine_event,
    make_notification,
)
from slack_sdk.models.blocks import Block

from monitor.alerts.sinks.base import DeliveryError
from monitor.alerts.sinks.http import RateLimiter
from monitor.alerts.sinks.slack import SlackSettings, SlackSink, build_payload, escape_mrkdwn

TOKEN = "T0000/B0000/slackSECRETtoken"


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver().start() as receiver:
        yield receiver


def sink(rx: Receiver, **kw: Any) -> SlackSink:
    settings = SlackSettings.model_validate(
        {"url": f"{rx.url}/services/{TOKEN}", "min_interval_seconds": 0, **kw}
    )
    return SlackSink("ops-slack", settings)


def validate_blocks(payload: dict[str, Any]) -> list[Block]:
    """Every block parses into slack_sdk's models and passes their limit checks."""
    assert isinstance(payload["text"], str) and payload["text"]
    blocks = payload["blocks"]
    assert 1 <= len(blocks) <= 50
    parsed = []
    for raw in blocks:
        block = Block.parse(raw)
        assert block is not None, raw["type"]
        block.validate_json()
        assert block.to_dict()["type"] == raw["type"]
        parsed.append(block)
    return parsed


def mrkdwn_texts(payload: dict[str, Any]) -> list[str]:
    out = []
    for b in payload["blocks"]:
        if b["type"] == "section":
            out += [b["text"]["text"]] if "text" in b else []
            out += [f["text"] for f in b.get("fields", [])]
        if b["type"] == "context":
            out += [e["text"] for e in b["elements"]]
    return out


def test_payload_layout_validates() -> None:
    n = make_notification([machine_event(), machine_event("vm2")], total=5)
    payload = build_payload(n)
    validate_blocks(payload)
    types = [b["type"] for b in payload["blocks"]]
    assert types == ["header", "section", "section", "section", "section", "context"]
    fields = " ".join(f["text"] for f in payload["blocks"][1]["fields"])
    for expected in ("HIGH", "contoso", "machine-risk-high", "5"):
        assert expected in fields
    assert "riskScore: Low -&gt; High" in payload["blocks"][3]["text"]["text"]
    assert "... and 3 more" in payload["blocks"][-1]["elements"][0]["text"]
    assert payload["unfurl_links"] is False


def test_hostile_text_is_inert_and_within_limits() -> None:
    payload = build_payload(hostile_notification(count=4, total=9))
    validate_blocks(payload)
    header = payload["blocks"][0]["text"]["text"]
    assert len(header) <= 150 and header.endswith("...")
    for text in [*mrkdwn_texts(payload), payload["text"]]:
        assert len(text) <= 3000
        assert "<!channel>" not in text and "<@U123>" not in text and "<https" not in text
        assert "*bold*" not in text and "_it_" not in text and "~strike~" not in text
        assert "`code`" not in text
        assert "\u202e" not in text and "\x1b" not in text
    joined = "\n".join(mrkdwn_texts(payload))
    assert "&lt;!channel&gt;" in joined
    assert "&lt;U+202E&gt;exe.pdf" in joined  # shown as <U+202E>exe.pdf
    assert "\U0001f6a8" in joined  # emoji kept
    assert "... and 5 more" in joined
    for b in payload["blocks"]:
        for obj in [b.get("text"), *b.get("fields", []), *b.get("elements", [])]:
            if obj and obj["type"] == "mrkdwn":
                assert obj["verbatim"] is True


def test_escape_never_splits_an_entity() -> None:
    from monitor.alerts.sinks.common import fit

    cut = fit("&" * 5000, 3000, escape_mrkdwn)
    assert cut.endswith("&amp;...") and len(cut) <= 3000
    assert escape_mrkdwn("a*b") == "a\u200b*\u200bb"


def test_block_cap_with_many_events() -> None:
    events = [machine_event(f"vm{i}") for i in range(80)]
    payload = build_payload(make_notification(events), max_events=46)
    validate_blocks(payload)
    assert len(payload["blocks"]) == 50
    assert "... and 34 more" in payload["blocks"][-1]["elements"][0]["text"]


def test_resolved_header() -> None:
    payload = build_payload(make_notification(status="resolved", summary=""))
    assert payload["blocks"][0]["text"]["text"].startswith("[RESOLVED] ")
    validate_blocks(payload)


def test_send_posts_json(rx: Receiver) -> None:
    s = sink(rx)
    s.send(hostile_notification())
    path, headers, body = rx.wait_for(1)[0]
    assert path == f"/services/{TOKEN}"
    assert headers["content-type"].startswith("application/json")
    validate_blocks(orjson.loads(body))


def test_errors_and_secrets(rx: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = sink(rx, max_wait_seconds=0.5)
    rx.reply(Reply(500, "internal_error"), 410, Reply(400, "invalid_blocks"))
    errs = []
    for _ in range(3):
        with pytest.raises(DeliveryError) as info:
            s.send(make_notification())
        errs.append(info.value)
    assert [(e.retryable, e.disable) for e in errs] == [
        (True, False),
        (False, True),
        (False, False),
    ]
    assert "invalid_blocks" in str(errs[2])
    for text in [*map(str, errs), repr(s), s.describe(), caplog.text]:
        assert TOKEN not in text and "slackSECRETtoken" not in text
    assert "127.0.0.1" in s.describe()


def test_429_holds_the_webhook(rx: Receiver) -> None:
    s = sink(rx, max_wait_seconds=0.5)
    rx.reply(Reply(429, "rate_limited", headers={"Retry-After": "30"}))
    with pytest.raises(DeliveryError) as info:
        s.send(make_notification())
    assert info.value.retryable and info.value.retry_after == 30.0
    with pytest.raises(DeliveryError) as info:  # held: not even sent
        s.send(make_notification())
    assert info.value.retryable and info.value.retry_after is not None
    assert info.value.retry_after > 1
    assert len(rx.requests) == 1


def test_redis_limiter_spans_processes(
    rx: Receiver, redis_client: redis.Redis, redis_prefix: str
) -> None:
    url = f"{rx.url}/services/{TOKEN}"
    settings = SlackSettings.model_validate(
        {"url": url, "min_interval_seconds": 60, "max_wait_seconds": 0}
    )
    first = SlackSink("a", settings, redis_client=redis_client, redis_prefix=redis_prefix)
    first.send(make_notification())
    keys = [k.decode() for k in redis_client.scan_iter(match=f"{redis_prefix}:*")]
    assert len(keys) == 1 and TOKEN not in keys[0] and "ratelimit" in keys[0]
    assert 0 < int(redis_client.pttl(keys[0])) <= 60_000  # type: ignore[arg-type]
    RateLimiter._next_at.clear()  # another process: no in-process memory, only Redis
    second = SlackSink("b", settings, redis_client=redis_client, redis_prefix=redis_prefix)
    with pytest.raises(DeliveryError) as info:
        second.send(make_notification())
    assert info.value.retryable and info.value.retry_after and info.value.retry_after > 1
    assert len(rx.requests) == 1
    RateLimiter._next_at.clear()


def test_untrusted_title_in_fallback_text() -> None:
    payload = build_payload(make_notification(title=HOSTILE))
    assert "&lt;!channel&gt;" in payload["text"]
    assert payload["blocks"][0]["text"]["type"] == "plain_text"
