"""Stdout sink: one JSON line per notification (like the file sink), or a compact human form.

`format: json` (default) writes the same document as the file sink. `format: human` writes
`[HIGH] FIRING rule - title (tenant, 3 events)` and one indented line per listed event and changed
field; untrusted text there has control characters (terminal escapes) and bidi overrides made
visible.
"""

from __future__ import annotations

import sys
from typing import Literal, TextIO

from pydantic import Field

from monitor.alerts.sinks.base import DeliveryError, Notification
from monitor.alerts.sinks.common import (
    SinkSettings,
    change_lines,
    event_kind,
    event_name,
    more_text,
    notification_document,
    pretty_json,
    safe_text,
    shorten,
    to_json_line,
)


class StdoutSettings(SinkSettings):
    """`type: stdout`."""

    format: Literal["json", "human"] = "json"
    max_events: int = Field(default=10, ge=0, le=1000)


def render_human(notification: Notification, max_events: int = 10) -> str:
    """The compact human form, ending with a newline."""
    n = notification
    count = max(n.total, len(n.events))
    where = safe_text(n.tenant or n.group_labels.get("tenant") or "-", single_line=True)
    head = (
        f"[{n.severity.upper()}] {n.status.upper()} {safe_text(n.rule, single_line=True)}"
        f" - {shorten(safe_text(n.title, single_line=True), 300)}"
        f" ({where}, {count} event{'s' if count != 1 else ''})"
    )
    lines = [head]
    shown = n.events[:max_events]
    for event in shown:
        lines.append(f"  {event_kind(event)}: {shorten(event_name(event), 300)}")
        lines.extend(f"      {shorten(line, 300)}" for line in change_lines(event))
    more = more_text(n, len(shown))
    if more:
        lines.append(f"  {more}")
    return "\n".join(lines) + "\n"


class StdoutSink:
    """Writes notifications to standard output (resolved at send time)."""

    type = "stdout"

    def __init__(self, name: str, settings: StdoutSettings, stream: TextIO | None = None) -> None:
        self.name = name
        self.settings = settings
        self._stream = stream

    def __repr__(self) -> str:
        return f"StdoutSink(name={self.name!r}, format={self.settings.format!r})"

    def describe(self) -> str:
        return f"stdout ({self.settings.format})"

    def render(self, notification: Notification) -> str:
        """The human text `send` writes, or (format json) its JSON document indented."""
        if self.settings.format == "human":
            return render_human(notification, self.settings.max_events)
        return pretty_json(notification_document(notification))

    def send(self, notification: Notification) -> None:
        """Write and flush one notification."""
        stream = self._stream or sys.stdout
        if self.settings.format == "human":
            text = render_human(notification, self.settings.max_events)
        else:
            text = to_json_line(notification_document(notification)).decode()
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError) as exc:
            raise DeliveryError(
                f"stdout sink {self.name!r}: {type(exc).__name__}", retryable=True
            ) from None

    def close(self) -> None:
        """Nothing to close (stdout is not ours)."""
