"""Redis Streams holding change events: one per tenant and one for all tenants.

Each stream entry has one field, `e`, the CloudEvent as JSON. Consumers (alert dispatch)
read the all-tenants stream through a consumer group and acknowledge after handling.

Trimming never loses an unread event silently. Both retention bounds (`maxlen` entries,
`retention_days` of age) stop at the slowest consumer group: what a group has not read or not
acknowledged stays, even beyond `maxlen`. Only past the memory cap (`HARD_FACTOR` x `maxlen`)
are unread events trimmed, and then the trim says so: an `mde.events.lost` event with the count
(added after the trim, so it is read first thing), the `mde_events_lost_total` counter, and each
overtaken group moved to the first surviving entry so its lag metric stays true.
"""

from __future__ import annotations

import fnmatch
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson
import redis

from monitor.events.envelope import SCHEMA_VERSION, Event, utc_now_iso
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


HARD_FACTOR = 10  # unread events are kept up to this many times `maxlen`, then trimmed (lost)
LOST_TYPE = "mde.events.lost"

# KEYS: stream, lost counter hash. ARGV: maxlen, hard cap, age MINID, lost-event template (JSON
# with a "count" placeholder), counter field prefix. Returns the number of unread entries trimmed.
_SAFE_TRIM = """
local key, counter = KEYS[1], KEYS[2]
local maxlen, hard = tonumber(ARGV[1]), tonumber(ARGV[2])
local age_ms = tonumber(ARGV[3])
local function parse(id)
  local ms, seq = string.match(id, "^(%d+)-(%d+)$")
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local len = redis.call("XLEN", key)
local groups = redis.call("XINFO", "GROUPS", key)
local needed, safe = 0, nil
local info = {}
for _, g in ipairs(groups) do
  local h = {}
  for i = 1, #g, 2 do h[g[i]] = g[i + 1] end
  local pending = tonumber(h["pending"]) or 0
  local need_from = h["last-delivered-id"]
  if pending > 0 then
    need_from = redis.call("XPENDING", key, h["name"])[2]
  end
  local lag = tonumber(h["lag"])  -- nil on Redis < 7 or when Redis cannot tell: assume all
  local n = math.min(len, (lag or len) + pending)
  if n > needed then needed = n end
  if safe == nil or less(need_from, safe) then safe = need_from end
  info[#info + 1] = {h["name"], n}
end
local age_id = string.format("%d", age_ms) .. "-0"
if safe ~= nil and less(safe, age_id) then age_id = safe end
redis.call("XTRIM", key, "MINID", "~", age_id)  -- by age, never what a group still needs
len = redis.call("XLEN", key)
if needed > len then needed = len end
local keep = maxlen
local lost = 0
if needed > keep then keep = needed end
if keep > hard then
  lost = needed - hard
  keep = hard
end
if len > keep then
  if lost > 0 then
    redis.call("XTRIM", key, "MAXLEN", keep)
  else
    redis.call("XTRIM", key, "MAXLEN", "~", keep)  -- whole nodes only: never more than asked
  end
end
if lost > 0 then
  local first = redis.call("XRANGE", key, "-", "+", "COUNT", 1)[1]
  local added = nil
  local s = redis.call("XINFO", "STREAM", key)
  for i = 1, #s, 2 do if s[i] == "entries-added" then added = tonumber(s[i + 1]) end end
  local remaining = redis.call("XLEN", key)
  for _, gi in ipairs(info) do
    if gi[2] > keep and first ~= nil then
      -- the group now starts at the first surviving entry; its lag counts what is left
      local ms, seq = parse(first[1])
      local before = (seq > 0) and (string.format("%d", ms) .. "-" .. string.format("%d", seq - 1))
        or (string.format("%d", ms - 1) .. "-18446744073709551615")
      local ok = false
      if added ~= nil then
        ok = pcall(redis.call, "XGROUP", "SETID", key, gi[1], before, "ENTRIESREAD",
                   added - remaining)
      end
      if not ok then redis.call("XGROUP", "SETID", key, gi[1], before) end
      redis.call("HINCRBY", counter, ARGV[5] .. gi[1] .. '"]', gi[2] - keep)
    end
  end
  local body = string.gsub(ARGV[4], '"count":0', '"count":' .. lost, 1)
  redis.call("XADD", key, "*", "e", body)
end
return lost
"""


def lost_counter_key(prefix: str) -> str:
    """Counter hash of unread events trimmed for memory (metric `mde_events_lost_total`)."""
    return f"{prefix}:metrics:events_lost"


def _lost_event(prefix: str, tenant: str, maxlen: int, hard: int) -> bytes:
    return encode(
        {
            "specversion": "1.0",
            "id": f"lost-{uuid.uuid4().hex}",
            "source": f"mde-monitor/{tenant}",
            "type": LOST_TYPE,
            "subject": stream_key(prefix),
            "time": utc_now_iso(),
            "datacontenttype": "application/json",
            "mdeschemaversion": SCHEMA_VERSION,
            "data": {
                "tenant": tenant,
                "count": 0,
                "stream": stream_key(prefix),
                "maxlen": maxlen,
                "hardLimit": hard,
                "reason": "unread events trimmed: the stream reached its memory cap"
                " (a consumer group fell too far behind)",
            },
        }
    )


def append(
    pipe: redis.client.Pipeline,
    prefix: str,
    tenant: str,
    events: Iterable[Event],
    maxlen: int,
    retention_days: float,
    hard_factor: int = HARD_FACTOR,
) -> int:
    """Queue XADDs of `events` to the tenant stream and the all-tenants stream on `pipe`.

    Then one safe trim per stream on the same pipeline (committed with the events): by length
    and by age, never past what a consumer group still needs, except beyond the memory cap
    `hard_factor * maxlen`, which emits `mde.events.lost` (see the module doc).
    """
    n = 0
    for ev in events:
        body = redact_bytes(encode(ev))  # a configured secret never enters the stream
        pipe.xadd(stream_key(prefix, tenant), {"e": body})
        pipe.xadd(stream_key(prefix), {"e": body})
        n += 1
    if n:
        min_ms = int((time.time() - retention_days * 86400) * 1000)
        hard = max(maxlen, maxlen * hard_factor)
        lost = _lost_event(prefix, tenant, maxlen, hard)
        for key in (stream_key(prefix, tenant), stream_key(prefix)):
            args: list[Any] = [maxlen, hard, min_ms, lost, '["']
            pipe.eval(_SAFE_TRIM, 2, key, lost_counter_key(prefix), *args)
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
) -> list[tuple[str, Event]]:
    """Next new events for `consumer` (its unacknowledged ones: `Dispatcher._recover`)."""
    resp: Any = client.xreadgroup(
        group, consumer, {stream_key(prefix): ">"}, count=count, block=block_ms
    )
    return [pair for _stream, batch in resp or [] for pair in entries(batch)]


def ack(
    client: redis.Redis | redis.client.Pipeline, prefix: str, group: str, ids: list[str]
) -> None:
    if ids:
        client.xack(stream_key(prefix), group, *ids)
