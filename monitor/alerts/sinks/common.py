"""Shared by sinks: settings base models, display-safe text, truncation, the JSON notification.

Text helpers returns *plain, unescaped* text with untrusted values (machine names, tags, ...)
made display-safe: control characters and bidirectional overrides (e.g. U+202E, which can make
"exe.pdf" look like "fdp.exe") are replaced by visible `<U+202E>` markers. Each sink then escapes
for its own markup (Slack mrkdwn, Adaptive Card Markdown, HTML).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from monitor.alerts.sinks.base import Notification
from monitor.alerts.sinks.http import check_url
from monitor.events.envelope import Event

ELLIPSIS = "..."


def _secret_url(value: SecretStr) -> SecretStr:
    check_url(value.get_secret_value())
    return value


def _existing_file(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"file not found: {value}")
    return value


SecretUrl = Annotated[SecretStr, AfterValidator(_secret_url)]
"""A URL that is itself a secret (webhook with a token): https://, or http:// on loopback."""
PlainUrl = Annotated[str, AfterValidator(check_url)]
"""A URL that is not a secret: https://, or http:// on loopback."""
CaBundle = Annotated[Path | None, AfterValidator(_existing_file)]
"""PEM file of CA certificates to trust instead of the default store (tests, private CAs)."""


class SinkSettings(BaseModel):
    """Base of every sink's settings: unknown keys are errors; inputs never echoed in errors."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, frozen=True)


class HttpSinkSettings(SinkSettings):
    """Settings shared by the HTTP sinks."""

    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    ca_bundle: CaBundle = None


# C0/C1 controls except \n and \t, bidi embeddings/overrides/isolates/marks, line/para separators,
# and the invisible ones: zero-width space/joiners, word joiner and invisible operators, BOM,
# soft hyphen, combining grapheme joiner, Mongolian vowel separator, Hangul fillers.
# A zero-width joiner inside an emoji sequence (👨‍👩) is kept; anywhere else it is made visible.
_EMOJI = "\U0001f000-\U0001faff\u2600-\u27bf"
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u034f\u061c\u115f\u1160\u180e\u200b\u200c"
    "\u200e\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\u3164\ufeff\uffa0]"
    f"|(?<![{_EMOJI}\ufe0f])\u200d|\u200d(?![{_EMOJI}])"
)


def safe_text(value: Any, *, single_line: bool = False) -> str:
    """`value` as text with control and bidi-override characters made visible (`<U+202E>`)."""
    text = value if isinstance(value, str) else _plain(value)
    text = _UNSAFE.sub(lambda m: f"<U+{ord(m.group()):04X}>", text)
    if single_line:
        text = " ".join(text.split()) if ("\n" in text or "\t" in text) else text
    return text


def safe_json(value: Any) -> Any:
    """A copy of a JSON-ready value with every string (keys too) made display-safe (`safe_text`),
    for payloads people read in a UI (PagerDuty `custom_details`)."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_text(str(k)): safe_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [safe_json(v) for v in value]
    return value


def _plain(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    if isinstance(value, dict):
        return orjson.dumps(value, default=str).decode()
    return str(value)


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units (how JavaScript-based limits count; emoji count 2)."""
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def fit(
    text: str,
    limit: int,
    escape: Callable[[str], str] | None = None,
    *,
    measure: Callable[[str], int] = utf16_len,
) -> str:
    """`escape(text)` cut to at most `limit` units, ending with "..." when cut.

    Escaping is applied character by character before measuring, so an entity such as `&amp;`
    is never split. Lengths are measured in UTF-16 units by default (conservative for emoji).
    """
    full = escape(text) if escape else text
    if measure(full) <= limit:
        return full
    budget = limit - measure(ELLIPSIS)
    out: list[str] = []
    used = 0
    for ch in text:
        piece = escape(ch) if escape else ch
        size = measure(piece)
        if used + size > budget:
            break
        out.append(piece)
        used += size
    return "".join(out) + ELLIPSIS


def shorten(text: str, limit: int) -> str:
    """Plain `text` cut to `limit` code points with "..." when longer."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(ELLIPSIS))] + ELLIPSIS


def event_name(event: Event) -> str:
    """What the event is about: data.displayName, else the subject (display-safe)."""
    data = event.get("data") or {}
    name = data.get("displayName") or event.get("subject") or "?"
    return safe_text(str(name), single_line=True)


def event_kind(event: Event) -> str:
    """The event type without the `mde.` prefix, e.g. `machine.risk_raised`."""
    return str(event.get("type", "?")).removeprefix("mde.")


def _value(value: Any, limit: int) -> str:
    return shorten(safe_text(value, single_line=True), limit)


def change_pairs(
    event: Event, *, max_changes: int = 10, value_limit: int = 200
) -> list[tuple[str, str]]:
    """(field, change) per changed field: ("riskScore", "Low -> High"), ("machineTags", "+prod")."""
    data = event.get("data") or {}
    changes = data.get("changes") or {}
    pairs: list[tuple[str, str]] = []
    if isinstance(changes, dict):
        for path, change in list(changes.items())[:max_changes]:
            field = _value(path, 100)
            if not isinstance(change, dict):
                pairs.append((field, _value(change, value_limit)))
            elif "added" in change or "removed" in change:
                added = [f"+{_value(v, value_limit)}" for v in change.get("added") or []]
                removed = [f"-{_value(v, value_limit)}" for v in change.get("removed") or []]
                pairs.append((field, " ".join(added + removed) or "reordered"))
            else:
                old = _value(change.get("old"), value_limit)
                new = _value(change.get("new"), value_limit)
                pairs.append((field, f"{old} -> {new}"))
        if len(changes) > max_changes:
            pairs.append(("...", f"and {len(changes) - max_changes} more fields"))
    if not changes:
        for key in ("error", "stage", "entityType", "previous", "current", "share", "threshold"):
            if key in data:
                pairs.append((key, _value(data[key], value_limit)))
    return pairs


def change_lines(event: Event, *, max_changes: int = 10, value_limit: int = 200) -> list[str]:
    """One line per changed field: `riskScore: Low -> High`, `machineTags: +prod -old`."""
    pairs = change_pairs(event, max_changes=max_changes, value_limit=value_limit)
    return [f"{field}: {change}" for field, change in pairs]


def event_text(event: Event, *, max_changes: int = 10) -> str:
    """`machine.risk_raised: vm1.contoso.local` then one `- field: old -> new` line per change."""
    head = f"{event_kind(event)}: {event_name(event)}"
    lines = change_lines(event, max_changes=max_changes)
    return "\n".join([head, *(f"- {line}" for line in lines)])


def more_text(notification: Notification, shown: int) -> str:
    """'... and N more' for the events of the group not listed, or ''."""
    rest = max(notification.total, len(notification.events)) - shown
    return f"... and {rest} more" if rest > 0 else ""


def notification_fields(notification: Notification) -> dict[str, Any]:
    """The notification's metadata (no events) as a JSON-ready dict; the texts people read
    (title, summary, labels, tenant, description) are display-safe, the events stay verbatim."""
    return {
        "id": notification.id,
        "rule": notification.rule,
        "description": safe_text(notification.description),
        "severity": notification.severity,
        "status": notification.status,
        "group_key": notification.group_key,
        "group_labels": safe_json(dict(notification.group_labels)),
        "tenant": safe_text(notification.tenant) if notification.tenant else notification.tenant,
        "title": safe_text(notification.title),
        "summary": safe_text(notification.summary),
        "total": notification.total,
        **({"extra": notification.extra} if notification.extra else {}),
    }


def notification_document(notification: Notification) -> dict[str, Any]:
    """The notification with its events (full CloudEvents): one JSON line in file/stdout sinks."""
    return {**notification_fields(notification), "events": list(notification.events)}


def to_json_line(document: Any) -> bytes:
    """Compact JSON, UTF-8, one line, ending with a newline."""
    return orjson.dumps(document, default=str, option=orjson.OPT_APPEND_NEWLINE)


def pretty_json(document: Any) -> str:
    """Indented JSON for reading (the `render` previews)."""
    return orjson.dumps(document, default=str, option=orjson.OPT_INDENT_2).decode()


def compact_event(event: Event) -> dict[str, Any]:
    """A small view of an event (id, type, subject, name, changes) for size-limited payloads."""
    data = event.get("data") or {}
    return {
        "id": event.get("id"),
        "type": event.get("type"),
        "subject": event.get("subject"),
        "time": event.get("time"),
        "displayName": data.get("displayName"),
        "changes": data.get("changes") or {},
    }


def labels_text(labels: dict[str, str], keys: Iterable[str] = ()) -> str:
    """`k=v, k=v` of the group labels, skipping `keys` (display-safe)."""
    skip = set(keys)
    return ", ".join(
        f"{safe_text(k, single_line=True)}={safe_text(v, single_line=True)}"
        for k, v in labels.items()
        if k not in skip
    )
