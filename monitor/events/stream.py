"""Redis Streams holding change events: one per tenant and one for all tenants.

Each stream entry has one field, `e`, the CloudEvent as JSON. Consumers (alert dispatch)
read the all-tenants stream through a consumer group and acknowledge after handling.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson
import redis

from monitor.events.envelope import Event
from monitor.redact import redact_bytes

ALL = "_all"


def stream_key(prefix: str, tenant: str | None = None) -> str:
    """`<prefix>:events:<tenant>`, or the all-tenants stream when tenant is None."""
    return f"{prefix}:events:{tenant or ALL}"


def encode(event: Event) -> bytes:
    return orjson.dumps(event)


def decode(raw: bytes | str) -> Event:
    data: Event = orjson.loads(raw)
    return data


def append(
    pipe: redis.client.Pipeline,
    prefix: str,
    tenant: str,
    events: Iterable[Event],
    maxlen: int,
    retention_days: float,
) -> int:
    """Queue XADDs of `events` to the tenant stream and the all-tenants stream on `pipe`.

    Retention is bounded by length (approximate MAXLEN) and by age (MINID); both trims are
    queued on the same pipeline so they commit with the events.
    """
    n = 0
    for ev in events:
        body = redact_bytes(encode(ev))  # a configured secret never enters the stream
        pipe.xadd(stream_key(prefix, tenant), {"e": body}, maxlen=maxlen, approximate=True)
        pipe.xadd(stream_key(prefix), {"e": body}, maxlen=maxlen, approximate=True)
        n += 1
    if n:
        min_ms = int((time.time() - retention_days * 86400) * 1000)
        pipe.xtrim(stream_key(prefix, tenant), minid=f"{min_ms}-0", approximate=True)
        pipe.xtrim(stream_key(prefix), minid=f"{min_ms}-0", approximate=True)
    return n


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def entry_event(fields: Mapping[Any, Any] | None) -> Event | None:
    """The event of one stream entry's fields (None: no `e` field, e.g. trimmed while pending)."""
    raw = fields.get(b"e", fields.get("e")) if fields else None
    return None if raw is None else decode(raw)


def entries(
    batch: Iterable[tuple[Any, Any]], type_glob: str | None = None
) -> Iterator[tuple[str, Event]]:
    """(stream id, event) of raw XRANGE/XREAD entries, skipping those without an event or whose
    type does not match `type_glob`."""
    for sid, fields in batch:
        ev = entry_event(fields)
        if ev is not None and (type_glob is None or fnmatch.fnmatchcase(ev["type"], type_glob)):
            yield _s(sid), ev


def read_range(
    client: redis.Redis,
    prefix: str,
    tenant: str | None = None,
    since_ms: int | None = None,
    type_glob: str | None = None,
    count: int = 1000,
) -> Iterator[tuple[str, Event]]:
    """Stored events (oldest first) as (stream id, event), filtered by time and type glob."""
    key = stream_key(prefix, tenant)
    start = f"{since_ms}-0" if since_ms else "-"
    while True:
        batch: Any = client.xrange(key, min=start, max="+", count=count)
        if not batch:
            return
        yield from entries(batch, type_glob)
        if len(batch) < count:
            return
        start = "(" + _s(batch[-1][0])


def ensure_group(client: redis.Redis, prefix: str, group: str, start: str = "0") -> None:
    """Create the consumer group on the all-tenants stream if it does not exist yet."""
    try:
        client.xgroup_create(stream_key(prefix), group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def read_group(
    client: redis.Redis,
    prefix: str,
    group: str,
    consumer: str,
    count: int = 500,
    block_ms: int | None = None,
    pending: bool = False,
) -> list[tuple[str, Event]]:
    """Next events for `consumer`; with pending=True, its delivered-but-unacknowledged ones."""
    resp: Any = client.xreadgroup(
        group, consumer, {stream_key(prefix): "0" if pending else ">"}, count=count, block=block_ms
    )
    return [pair for _stream, batch in resp or [] for pair in entries(batch)]


def ack(
    client: redis.Redis | redis.client.Pipeline, prefix: str, group: str, ids: list[str]
) -> None:
    if ids:
        client.xack(stream_key(prefix), group, *ids)
