"""Reading stored change events back: time filters, one-line summaries, an entity's history,
and following the stream as events arrive."""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from monitor.events import stream
from monitor.events.envelope import Event

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_VALUE_CHARS = 40


def parse_since(text: str, now: datetime | None = None) -> int:
    """Epoch ms of `24h`, `7d`, `30m`, `90s`, `2w` ago, or of an ISO date/time (UTC if naive)."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(text)
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        return int((now - timedelta(seconds=seconds)).timestamp() * 1000)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected a duration like 24h, 7d, 30m or an ISO date/time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _fmt(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def summarize_changes(changes: dict[str, Any]) -> str:
    """`riskScore Low -> High; machineTags +prod -old`."""
    parts = []
    for path, c in changes.items():
        if "added" in c or "removed" in c:
            members = [f"+{_fmt(x)}" for x in c.get("added", [])]
            members += [f"-{_fmt(x)}" for x in c.get("removed", [])]
            parts.append(f"{path} {' '.join(members)}")
        else:
            parts.append(f"{path} {_fmt(c.get('old'))} -> {_fmt(c.get('new'))}")
    return "; ".join(parts)


def summarize(event: Event) -> str:
    """A short human summary of what changed."""
    data = event.get("data") or {}
    typ = str(event.get("type", ""))
    if typ == "mde.sync.baseline":
        counts = " ".join(
            f"{k.removeprefix('microsoft_defender_')}={v}"
            for k, v in data.get("counts", {}).items()
        )
        return f"baseline ({data.get('scopeCount', 0)} scopes): {counts}"
    if typ == "mde.sync.degraded":
        scopes = [
            f"{s} ({(st or {}).get('error') or (st or {}).get('state')})"
            for s, st in data.get("scopes", {}).items()
        ]
        logon = (data.get("logonUserScopes") or {}).get("count", 0)
        if logon:
            scopes.append(f"{logon} logon-user scopes")
        return "incomplete, previous data kept: " + ", ".join(scopes)
    if typ == "mde.sync.failed":
        return f"{data.get('stage')}: {data.get('error')}"
    if typ == "mde.sync.suspicious_drop":
        return (
            f"{data.get('entityType')} {data.get('previous')} -> {data.get('current')}"
            f" ({float(data.get('share', 0)):.0%} would be deleted), held {data.get('heldSyncs')} sync(s)"
        )
    changes = data.get("changes") or {}
    if changes:
        return summarize_changes(changes)
    return ""


def display_name(event: Event) -> str:
    data = event.get("data") or {}
    return str(data.get("displayName") or event.get("subject") or "")


def tenant_of(event: Event) -> str:
    data = event.get("data") or {}
    return str(data.get("tenant") or "")


def recent(
    client: redis.Redis,
    prefix: str,
    *,
    tenant: str | None = None,
    since_ms: int | None = None,
    type_glob: str | None = None,
    limit: int | None = 100,
) -> list[tuple[str, Event]]:
    """The last `limit` matching events (oldest first) as (stream id, event)."""
    found: deque[tuple[str, Event]] = deque(maxlen=limit if limit and limit > 0 else None)
    found.extend(stream.read_range(client, prefix, tenant, since_ms=since_ms, type_glob=type_glob))
    return list(found)


def follow(
    client: redis.Redis,
    prefix: str,
    *,
    tenant: str | None = None,
    after_id: str = "$",
    type_glob: str | None = None,
    block_ms: int = 1000,
    stop: threading.Event | None = None,
) -> Iterator[tuple[str, Event]]:
    """Events appended after `after_id` ("$": from now on), until `stop` is set."""
    key = stream.stream_key(prefix, tenant)
    last = after_id
    while stop is None or not stop.is_set():
        resp: Any = client.xread({key: last}, block=block_ms, count=500)
        for _key, batch in resp or []:
            if batch:
                sid = batch[-1][0]
                last = sid.decode() if isinstance(sid, bytes) else str(sid)
            yield from stream.entries(batch, type_glob)


def involves(event: Event, key: str) -> bool:
    """True when the event is about `key`: its subject, or an end of its relationship."""
    if event.get("subject") == key:
        return True
    data = event.get("data") or {}
    rel = data.get("entity") or {}
    return data.get("relationshipType") is not None and key in (
        rel.get("_fromEntityKey"),
        rel.get("_toEntityKey"),
    )


def entity_history(
    client: redis.Redis,
    prefix: str,
    key: str,
    *,
    tenant: str | None = None,
    since_ms: int | None = None,
) -> list[Event]:
    """Stored events about one entity (or relationship), oldest first."""
    return [
        ev
        for _sid, ev in stream.read_range(client, prefix, tenant, since_ms=since_ms)
        if involves(ev, key)
    ]
