"""Quarantine: events alert dispatch could not evaluate, set aside with the reason.

One event must never stall alerting for everyone. An event whose evaluation raises is
quarantined at once (evaluation is deterministic: trying again cannot help). An event whose
batch never committed (the dispatcher crashed or was killed while handling it) is retried on
its own from its second delivery, and quarantined once it has been delivered
`MAX_EVAL_TRIES` times, so the events and rules around it keep flowing.

`<prefix>:alerts:quarantine` stream: stream id, event id, type, subject, tenant, tries, reason,
ts and the event itself (JSON, cut at `MAX_EVENT_BYTES`). Re-publish an event to evaluate it again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from monitor.events.envelope import Event

log = logging.getLogger(__name__)

MAX_EVAL_TRIES = 3
QUARANTINE_MAXLEN = 10_000
MAX_EVENT_BYTES = 64 * 1024


def quarantine_key(prefix: str) -> str:
    return f"{prefix}:alerts:quarantine"


def record(pipe: Any, prefix: str, sid: str, event: Event | None, reason: str, tries: int) -> None:
    """Queue the quarantine entry of one stream entry on `pipe` (the caller acks it there too)."""
    event = event if isinstance(event, dict) else {}
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    assert isinstance(data, dict)
    body = orjson.dumps(event, default=str)
    pipe.xadd(
        quarantine_key(prefix),
        {
            "stream_id": sid,
            "event": body if len(body) <= MAX_EVENT_BYTES else body[:MAX_EVENT_BYTES],
            "event_id": str(event.get("id", "")),
            "type": str(event.get("type", "")),
            "subject": str(event.get("subject", ""))[:500],
            "tenant": str(data.get("tenant", ""))[:200],
            "tries": tries,
            "reason": reason[:1000],
            "ts": f"{time.time():.3f}",
        },
        maxlen=QUARANTINE_MAXLEN,
        approximate=True,
    )
    log.error(
        "event quarantined: alert dispatch could not evaluate it (%s)",
        reason,
        extra={"stream_id": sid, "event": event.get("id"), "type": event.get("type")},
    )


def entries(client: Any, prefix: str, count: int = 100) -> list[dict[str, str]]:
    """Newest quarantined events first (without the event body)."""
    raw: Any = client.xrevrange(quarantine_key(prefix), count=count)
    out: list[dict[str, str]] = []
    for sid, fields in raw:
        rec = {
            (k.decode() if isinstance(k, bytes) else k): (
                v.decode(errors="replace") if isinstance(v, bytes) else v
            )
            for k, v in fields.items()
        }
        rec.pop("event", None)
        rec["id"] = sid.decode() if isinstance(sid, bytes) else sid
        out.append(rec)
    return out
