"""Microsoft Teams sink: an Adaptive Card (1.4) posted to a Workflows (Power Automate) webhook.

Body: `{"type": "message", "attachments": [{"contentType":
"application/vnd.microsoft.card.adaptive", "contentUrl": null, "content": <AdaptiveCard>}]}`.
The card has a title TextBlock, the summary, a FactSet (severity, status, tenant, rule, events)
and, per listed event, a TextBlock and a FactSet of its changed fields, then "... and N more".

TextBlock and FactSet text is Markdown in Adaptive Cards, so untrusted values are escaped with
CommonMark backslash escapes (`\\*`, `\\_`, `\\[`, `\\<`, ...; list markers `-`, `+`, `1.` at a
line start too): links, emphasis and lists from a machine name are shown literally. Control
characters and bidi overrides are made visible. The payload is kept under `max_payload_bytes`
(28 KB by default; Teams rejects larger messages) by listing fewer events, then shortening the
summary.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydantic import Field

from monitor.alerts.sinks.base import Notification
from monitor.alerts.sinks.common import (
    HttpSinkSettings,
    SecretUrl,
    change_pairs,
    event_kind,
    event_name,
    more_text,
    pretty_json,
    safe_text,
    shorten,
)
from monitor.alerts.sinks.http import HttpSink

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
_MD_SPECIAL = re.compile(r"([\\`*_~\[\]<>#|{}!])")
_LINE_START = re.compile(r"^(\s*)([-+]|\d+)([.)]?)(?=\s|$)", re.MULTILINE)


class TeamsSettings(HttpSinkSettings):
    """`type: teams` - a Teams Workflows webhook URL (it carries a signature: a secret)."""

    url: SecretUrl
    max_events: int = Field(default=10, ge=0, le=50)
    max_payload_bytes: int = Field(default=28_000, ge=4_000, le=100_000)


def escape_markdown(text: str) -> str:
    """Untrusted text made literal in Adaptive Card Markdown (backslash escapes)."""
    text = _MD_SPECIAL.sub(r"\\\1", safe_text(text))
    return _LINE_START.sub(_escape_list_marker, text)


def _escape_list_marker(m: re.Match[str]) -> str:
    indent, marker, dot = m.groups()
    if marker in "-+":
        return f"{indent}\\{marker}{dot}"
    return f"{indent}{marker}\\{dot}" if dot else m.group()


def _md(text: str, limit: int) -> str:
    return escape_markdown(shorten(text, limit))


def _card(notification: Notification, shown: int, summary_limit: int) -> dict[str, Any]:
    n = notification
    prefix = "RESOLVED: " if n.status == "resolved" else ""
    color = (
        "Good"
        if n.status == "resolved"
        else ("Attention" if n.severity in ("high", "critical") else "Warning")
    )
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": prefix + _md(safe_text(n.title, single_line=True), 500),
            "size": "Large",
            "weight": "Bolder",
            "color": color,
            "wrap": True,
        }
    ]
    if n.summary.strip() and summary_limit > 0:
        body.append({"type": "TextBlock", "text": _md(n.summary, summary_limit), "wrap": True})
    facts = [
        ("Severity", n.severity.upper()),
        ("Status", n.status),
        ("Tenant", n.tenant or n.group_labels.get("tenant") or "-"),
        ("Rule", n.rule),
        ("Events", str(max(n.total, len(n.events)))),
    ]
    body.append(
        {
            "type": "FactSet",
            "facts": [
                {"title": t, "value": _md(safe_text(v, single_line=True), 300)} for t, v in facts
            ],
        }
    )
    for event in n.events[:shown]:
        body.append(
            {
                "type": "TextBlock",
                "text": f"**{_md(event_kind(event), 100)}**: {_md(event_name(event), 1000)}",
                "wrap": True,
                "separator": True,
            }
        )
        pairs = change_pairs(event)
        if pairs:
            body.append(
                {
                    "type": "FactSet",
                    "facts": [{"title": _md(f, 100), "value": _md(v, 500)} for f, v in pairs],
                }
            )
    more = more_text(n, shown)
    if more:
        body.append(
            {"type": "TextBlock", "text": escape_markdown(more), "isSubtle": True, "wrap": True}
        )
    return {
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.4",
        "msteams": {"width": "Full"},
        "body": body,
    }


def _message(card: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "message",
        "attachments": [{"contentType": CARD_CONTENT_TYPE, "contentUrl": None, "content": card}],
    }


def build_payload(
    notification: Notification, *, max_events: int = 10, max_bytes: int = 28_000
) -> dict[str, Any]:
    """The message body, listing as many events as fit in `max_bytes`."""
    shown = min(max_events, len(notification.events))
    summary_limit = 2_000
    while True:
        payload = _message(_card(notification, shown, summary_limit))
        if len(orjson.dumps(payload)) <= max_bytes:
            return payload
        if shown > 0:
            shown = shown - 1 if shown <= 4 else shown // 2
        elif summary_limit > 0:
            summary_limit = summary_limit // 2 if summary_limit > 100 else 0
        else:
            return payload  # nothing left to drop: title and facts are bounded


class TeamsSink(HttpSink):
    """Posts one Adaptive Card per notification to a Teams Workflows webhook."""

    type = "teams"

    def __init__(self, name: str, settings: TeamsSettings) -> None:
        super().__init__(name, settings.url.get_secret_value(), settings)
        self.settings = settings

    def describe(self) -> str:
        return f"teams workflow webhook {self._target}"

    def payload(self, notification: Notification) -> dict[str, Any]:
        """The JSON body `send` posts (and `render` shows)."""
        return build_payload(
            notification,
            max_events=self.settings.max_events,
            max_bytes=self.settings.max_payload_bytes,
        )

    def render(self, notification: Notification) -> str:
        """The message with its Adaptive Card, indented; the workflow URL is not part of it."""
        return pretty_json(self.payload(notification))

    def send(self, notification: Notification) -> None:
        """One POST of the card (Workflows answers 202 Accepted)."""
        body = orjson.dumps(self.payload(notification))
        self._poster.post(body, {"content-type": "application/json"})
