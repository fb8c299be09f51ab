"""Slack incoming-webhook sink: a Block Kit message per notification.

Layout: header (plain_text, <= 150 chars, `&`, `<`, `>` as entities like every other block), a section of fields (severity, status, tenant, rule,
events), the summary, one mrkdwn section per listed event (<= 3,000 chars each), and a context
block (source, time, "... and N more"); never more than 50 blocks. A top-level `text` is the
notification fallback.

Untrusted values (machine names, tags, rule labels) are escaped for mrkdwn: `&`, `<`, `>` become
`&amp;`, `&lt;`, `&gt;` (so `<!channel>` or `<https://evil|click>` are shown, never acted on), and
each formatting marker `*`, `_`, `~` and the backtick gets a ZERO WIDTH SPACE (U+200B) on both
sides: whether Slack treats U+200B as a word character (then the marker is intraword) or as space
(then it is not followed by text), the marker can no longer open or close bold, italic, strike or
code. The text still reads the same; a copy-paste carries the invisible U+200B. mrkdwn objects are
sent with `verbatim: true` so Slack does not auto-link channel names, mentions or URLs, and link
unfurling is off. Lengths are measured in UTF-16 units and cuts never split an escape.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import Field

from monitor.alerts.sinks.base import DeliveryError, Notification
from monitor.alerts.sinks.common import (
    HttpSinkSettings,
    SecretUrl,
    change_lines,
    event_kind,
    event_name,
    fit,
    more_text,
    pretty_json,
    safe_text,
)
from monitor.alerts.sinks.http import HttpSink, RateLimiter

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

MAX_BLOCKS = 50
HEADER_LIMIT = 150
SECTION_LIMIT = 3000
FIELD_LIMIT = 2000
FALLBACK_LIMIT = 3000
_ZWSP = "\u200b"
_MRKDWN_ESCAPES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    "*": f"{_ZWSP}*{_ZWSP}",
    "_": f"{_ZWSP}_{_ZWSP}",
    "~": f"{_ZWSP}~{_ZWSP}",
    "`": f"{_ZWSP}`{_ZWSP}",
}
_MRKDWN_TABLE = str.maketrans(_MRKDWN_ESCAPES)


class SlackSettings(HttpSinkSettings):
    """`type: slack` - an incoming webhook."""

    url: SecretUrl
    max_events: int = Field(default=10, ge=0, le=MAX_BLOCKS - 4)
    min_interval_seconds: float = Field(default=1.0, ge=0)
    max_wait_seconds: float = Field(default=5.0, ge=0)


_PLAIN_TABLE = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def escape_mrkdwn(text: str) -> str:
    """Untrusted text made inert in Slack mrkdwn (see the module docstring)."""
    return safe_text(text).translate(_MRKDWN_TABLE)


def escape_plain(text: str) -> str:
    """Untrusted text made inert in a Slack plain_text object (the header): `&`, `<`, `>` as
    entities, so mention syntax (`<!channel>`, `<@U123>`, `<#C1>`) is shown, never acted on.
    (A bare `@here` is plain text in Block Kit webhooks: Slack links it only with link_names.)"""
    return safe_text(text).translate(_PLAIN_TABLE)


def _mrkdwn(text: str) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def _field(label: str, value: str) -> dict[str, Any]:
    prefix = f"*{label}*\n"
    return _mrkdwn(prefix + fit(safe_text(value), FIELD_LIMIT - len(prefix), escape_mrkdwn))


def _event_section(event: dict[str, Any]) -> dict[str, Any]:
    head = f"*{fit(event_kind(event), 200, escape_mrkdwn)}*  "
    body = event_name(event)
    lines = change_lines(event)
    raw = body + "".join(f"\n• {line}" for line in lines)
    text = head + fit(raw, SECTION_LIMIT - len(head), escape_mrkdwn)
    return {"type": "section", "text": _mrkdwn(text)}


def build_payload(notification: Notification, *, max_events: int = 10) -> dict[str, Any]:
    """The webhook JSON body: Block Kit blocks plus the `text` fallback."""
    n = notification
    status = "[RESOLVED] " if n.status == "resolved" else ""
    header = fit(status + safe_text(n.title, single_line=True), HEADER_LIMIT, escape_plain)
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header or "mde-monitor"}},
    ]
    fields = [
        _field("Severity", n.severity.upper()),
        _field("Status", n.status),
        _field("Tenant", n.tenant or n.group_labels.get("tenant") or "-"),
        _field("Rule", n.rule),
        _field("Events", str(max(n.total, len(n.events)))),
    ]
    blocks.append({"type": "section", "fields": fields})
    if n.summary.strip():
        blocks.append(
            {"type": "section", "text": _mrkdwn(fit(n.summary, SECTION_LIMIT, escape_mrkdwn))}
        )
    room = MAX_BLOCKS - len(blocks) - 1  # keep one for the context block
    shown = n.events[: max(0, min(max_events, room))]
    blocks.extend(_event_section(e) for e in shown)
    first = n.events[0] if n.events else {}
    source = str(first.get("source") or "mde-monitor")
    when = str(first.get("time") or datetime.now(UTC).isoformat(timespec="seconds"))
    context = [fit(source, 300, escape_mrkdwn), fit(when, 100, escape_mrkdwn)]
    more = more_text(n, len(shown))
    if more:
        context.append(more)
    blocks.append({"type": "context", "elements": [_mrkdwn(" · ".join(context))]})
    fallback = fit(
        f"[{n.severity.upper()}] {status}{safe_text(n.title, single_line=True)}",
        FALLBACK_LIMIT,
        escape_mrkdwn,
    )
    return {"text": fallback, "blocks": blocks, "unfurl_links": False, "unfurl_media": False}


class SlackSink(HttpSink):
    """Posts one Block Kit message per notification to a Slack incoming webhook."""

    type = "slack"

    def __init__(
        self,
        name: str,
        settings: SlackSettings,
        *,
        redis_client: redis.Redis | None = None,
        redis_prefix: str = "mde",
    ) -> None:
        url = settings.url.get_secret_value()
        super().__init__(name, url, settings)
        self.settings = settings
        self._limiter = RateLimiter(
            url,
            settings.min_interval_seconds,
            where=self._poster.where,
            redis_client=redis_client,
            redis_prefix=redis_prefix,
            max_wait=settings.max_wait_seconds,
        )

    def describe(self) -> str:
        return f"slack webhook {self._target}"

    def payload(self, notification: Notification) -> dict[str, Any]:
        """The JSON body `send` posts (and `render` shows)."""
        return build_payload(notification, max_events=self.settings.max_events)

    def render(self, notification: Notification) -> str:
        """The Block Kit body, indented; the webhook URL (the secret) is not part of it."""
        return pretty_json(self.payload(notification))

    def send(self, notification: Notification) -> None:
        """One POST; 429 holds the per-webhook limiter for Retry-After and raises retryable."""
        body = orjson.dumps(self.payload(notification))
        self._limiter.acquire()
        try:
            self._poster.post(body, {"content-type": "application/json; charset=utf-8"})
        except DeliveryError as exc:
            if exc.status == 429:
                self._limiter.hold(exc.retry_after if exc.retry_after is not None else 1.0)
            raise
