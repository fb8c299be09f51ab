"""PagerDuty sink: Events API v2 (`trigger` when firing, `resolve` when resolved).

`dedup_key` is notification.group_key (stable across flushes of one group, so a `resolve` closes
the incident the `trigger` opened; hashed when longer than PagerDuty's 255 characters). The
routing key is a secret: it is sent in the body only, never logged or shown. Severity mapping:
critical -> critical, high -> error, medium -> warning, low/info -> info. PagerDuty answers 202.

Groups share one incident: a `resolved` notification whose `extra["still_firing"]` (set by the
dispatcher: subjects of the group still firing after this flush) is above zero sends nothing, so
the incident stays open until the last subject of the group resolves.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Literal

import orjson
from pydantic import Field, SecretStr

from monitor.alerts.sinks.base import Notification
from monitor.alerts.sinks.common import (
    HttpSinkSettings,
    PlainUrl,
    compact_event,
    more_text,
    pretty_json,
    safe_json,
    safe_text,
    shorten,
)
from monitor.alerts.sinks.http import HttpSink

log = logging.getLogger(__name__)

EVENTS_V2_URL = "https://events.pagerduty.com/v2/enqueue"
SUMMARY_LIMIT = 1024
DEDUP_KEY_LIMIT = 255
MASK = "***"

SEVERITY_MAP: dict[str, Literal["critical", "error", "warning", "info"]] = {
    "critical": "critical",
    "high": "error",
    "medium": "warning",
    "low": "info",
    "info": "info",
}


class PagerDutySettings(HttpSinkSettings):
    """`type: pagerduty` - an Events API v2 integration (service routing key)."""

    routing_key: SecretStr = Field(min_length=1)
    url: PlainUrl = EVENTS_V2_URL
    max_events: int = Field(default=20, ge=0, le=200)
    component: str | None = None
    group: str | None = None


def dedup_key(group_key: str) -> str:
    """group_key, or its SHA-256 when longer than PagerDuty allows."""
    if len(group_key) <= DEDUP_KEY_LIMIT:
        return group_key
    return "sha256:" + hashlib.sha256(group_key.encode()).hexdigest()


def still_firing(notification: Notification) -> int:
    """`extra["still_firing"]` as set by the dispatcher; 0 when absent or not a number."""
    value = notification.extra.get("still_firing")
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 0


def keeps_incident_open(notification: Notification) -> bool:
    """True for a `resolved` notification while other subjects of its group still fire."""
    return notification.status == "resolved" and still_firing(notification) > 0


def build_body(
    notification: Notification, routing_key: str, settings: PagerDutySettings | None = None
) -> dict[str, Any]:
    """The Events API v2 request body."""
    n = notification
    body: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "resolve" if n.status == "resolved" else "trigger",
        "dedup_key": dedup_key(n.group_key),
        "client": "mde-monitor",
    }
    if n.status == "resolved":
        return body
    max_events = settings.max_events if settings else 20
    shown = n.events[:max_events]
    details: dict[str, Any] = {
        "rule": n.rule,
        "description": n.description,
        "severity": n.severity,
        "tenant": n.tenant,
        "group_labels": dict(n.group_labels),
        "total": max(n.total, len(n.events)),
        "summary": shorten(n.summary, 4000),
        "events": [compact_event(e) for e in shown],
    }
    more = more_text(n, len(shown))
    if more:
        details["more"] = more
    payload: dict[str, Any] = {
        "summary": shorten(safe_text(n.title, single_line=True), SUMMARY_LIMIT) or n.rule,
        "source": shorten(safe_text(n.tenant or "mde-monitor", single_line=True), 255),
        "severity": SEVERITY_MAP.get(n.severity, "warning"),
        "class": n.rule,
        "custom_details": safe_json(details),  # shown in PagerDuty's UI: display-safe
    }
    if n.events and n.events[0].get("time"):
        payload["timestamp"] = n.events[0]["time"]
    if settings and settings.component:
        payload["component"] = settings.component
    if settings and settings.group:
        payload["group"] = settings.group
    body["payload"] = payload
    return body


class PagerDutySink(HttpSink):
    """Triggers and resolves PagerDuty alerts through Events API v2."""

    type = "pagerduty"

    def __init__(self, name: str, settings: PagerDutySettings) -> None:
        super().__init__(
            name,
            settings.url,
            settings,
            secret_url=False,
            secrets=[settings.routing_key.get_secret_value()],
        )
        self.settings = settings

    def describe(self) -> str:
        return f"pagerduty events v2 {self._target}"

    def render(self, notification: Notification) -> str:
        """The Events API v2 body, indented, with the routing key shown as `***`."""
        if keeps_incident_open(notification):
            return (
                f"(nothing sent: {still_firing(notification)} subject(s) of the group still"
                " firing; the PagerDuty incident stays open)"
            )
        body = build_body(notification, MASK, self.settings)
        return pretty_json(body)

    def send(self, notification: Notification) -> None:
        """One POST to the enqueue endpoint; nothing for a resolve while the group still fires."""
        if keeps_incident_open(notification):
            log.info(
                "pagerduty sink %r: not resolving dedup_key %s: %d subject(s) of the group"
                " still firing, the incident stays open",
                self.name,
                safe_text(dedup_key(notification.group_key), single_line=True),
                still_firing(notification),
            )
            return
        body = build_body(notification, self.settings.routing_key.get_secret_value(), self.settings)
        self._poster.post(orjson.dumps(body, default=str), {"content-type": "application/json"})
