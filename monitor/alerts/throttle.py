"""Throttle and dedup: the same change to the same subject notifies at most once per window.

Definition (per rule and notification status): an event's fingerprint is (rule, status, tenant,
subject, type, the new values of its changes). The first event with a fingerprint is admitted and
opens a window of `repeat_interval` (alias `realert`); further events with that fingerprint
inside the window are absorbed (counted as throttled, never notified). So a group does not
notify again within repeat_interval unless events with new content arrive: a machine that flaps
Inactive -> Active -> Inactive notifies "went Inactive" and "recovered" once per window, while
another machine going Inactive, or the same one going NoSensorData, notifies as usual.
With `repeat_interval: 0` only exact duplicates (the same event id) are absorbed, for
DEDUP_SECONDS. Throttled events still update the firing/resolved bookkeeping.

Storage: per rule, one Redis hash per time bucket of the window's length (`token -> window end`).
A window opened now lives in the current bucket and ends within the next one, so a lookup reads
the current and the previous bucket; a bucket expires two lengths after it starts (no per-key
TTLs, no garbage).
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from monitor.events.envelope import Event

DEDUP_SECONDS = 3600


def _canonical_changes(changes: Any) -> Any:
    if not isinstance(changes, dict):
        return None
    out = {}
    for key in sorted(changes):
        ch = changes[key]
        if isinstance(ch, dict):
            out[key] = [ch.get("new"), ch.get("added"), ch.get("removed")]
        else:
            out[key] = ch
    return out


def fingerprint(rule: str, status: str, event: Event) -> str:
    """What makes two events "the same notification" for throttling (see module doc)."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    assert isinstance(data, dict)
    body = orjson.dumps(
        [
            rule,
            status,
            data.get("tenant"),
            event.get("subject"),
            event.get("type"),
            _canonical_changes(data.get("changes")),
        ],
        option=orjson.OPT_SORT_KEYS,
        default=str,
    )
    return hashlib.sha256(body).hexdigest()[:32]


def window(repeat_interval: float, status: str, event: Event, rule: str) -> tuple[str, float]:
    """(token, seconds the window lasts): the fingerprint for repeat_interval, else the event id."""
    if repeat_interval > 0:
        return fingerprint(rule, status, event), repeat_interval
    return f"id:{status}:{event.get('id')}", float(DEDUP_SECONDS)


def bucket_length(repeat_interval: float) -> float:
    return max(60.0, repeat_interval if repeat_interval > 0 else float(DEDUP_SECONDS))


def bucket_keys(prefix: str, rule: str, repeat_interval: float, now: float) -> tuple[str, str, int]:
    """(current bucket key, previous bucket key, seconds the current one must live)."""
    length = bucket_length(repeat_interval)
    n = int(now // length)
    base = f"{prefix}:alerts:throttle:{rule}"
    return f"{base}:{n}", f"{base}:{n - 1}", int(2 * length) + 60
