"""What the console shows, read from the same Redis as everything else (no second database).

- `GraphCache`: per tenant and snapshot generation, the stored index turned into a type map and
  an adjacency list (relationship keys name both ends), built once per generation.
- `EventIndex`: a derived, rebuildable index `<prefix>:web:hist:<tenant>:<key>` (stream ids of the
  events about an entity, relationship ends included), caught up incrementally from the tenant's
  stream; an entity page then reads its history with one ZREVRANGE and one pipelined XRANGE.
- `changes_page`: the timeline newest first with a cursor (a stream id), scanning a bounded number
  of entries per request so a rare filter over 100k+ events still answers quickly.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.events import stream
from monitor.events.envelope import Event
from monitor.events.history import display_name, summarize, tenant_of
from monitor.model.schema import ENTITY_BY_TYPE, RELATIONSHIP_BY_TYPE, MappedRelationshipType
from monitor.snapshot.store import SnapshotStore

SCAN_CHUNK = 500
MAX_SCAN = 20_000  # stream entries one timeline request may look at
HISTORY_LIMIT = 200


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# ------------------------------------------------------------------------------ graph cache


@dataclass
class Edge:
    key: str  # relationship _key
    type: str  # relationship _type
    rel_class: str
    source: str
    target: str


@dataclass
class TenantGraph:
    """The stored snapshot's shape (keys and edges, no bodies) at one generation."""

    tenant: str
    generation: int
    type_of: dict[str, str] = field(default_factory=dict)  # entity and relationship keys
    by_type: dict[str, list[str]] = field(default_factory=dict)
    edges: dict[str, list[Edge]] = field(default_factory=dict)  # entity key -> its edges

    def counts(self) -> dict[str, int]:
        return {t: len(v) for t, v in sorted(self.by_type.items())}


def split_relationship(key: str, rtype: str) -> Edge | None:
    """The two ends of a relationship from its key (`from|class|to`, or a mapped key)."""
    spec = RELATIONSHIP_BY_TYPE.get(rtype)
    if spec is None:
        return None
    cls = spec.rel_class.lower()
    if isinstance(spec, MappedRelationshipType):
        head, sep, tail = key.partition(f"|{cls}|")
        if not sep:
            return None
        _direction, _, target = tail.partition(":")
        target_key = target.rpartition(":_key=")[2]
        return Edge(key, rtype, spec.rel_class, head, f"{spec.target_type}:{target_key}")
    head, sep, tail = key.partition(f"|{cls}|")
    if not sep:
        return None
    return Edge(key, rtype, spec.rel_class, head, tail)


class GraphCache:
    """TenantGraph per tenant, rebuilt when the snapshot generation changes."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.store = SnapshotStore(client, prefix)
        self._graphs: dict[str, TenantGraph] = {}
        self._lock = threading.Lock()

    def get(self, tenant: str) -> TenantGraph | None:
        gen = self.store.generation(tenant)
        cached = self._graphs.get(tenant)
        if cached is not None and cached.generation == gen:
            return cached
        with self._lock:
            cached = self._graphs.get(tenant)
            if cached is not None and cached.generation == gen:
                return cached
            built = self._build(tenant, gen)
            if built is not None:
                self._graphs[tenant] = built
            return built

    def _build(self, tenant: str, gen: int) -> TenantGraph | None:
        index = self.store.load_index(tenant)
        if index is None:
            return None
        g = TenantGraph(tenant, gen)
        for types in index.values():
            for typ, items in types.items():
                g.by_type.setdefault(typ, []).extend(items)
                for k in items:
                    g.type_of[k] = typ
        for typ, keys in g.by_type.items():
            if typ in ENTITY_BY_TYPE:
                continue
            for k in keys:
                e = split_relationship(k, typ)
                if e is not None:
                    g.edges.setdefault(e.source, []).append(e)
                    g.edges.setdefault(e.target, []).append(e)
        for keys in g.by_type.values():
            keys.sort()
        return g

    def find_tenant(self, key: str, tenants: Iterable[str]) -> str | None:
        for t in tenants:
            g = self.get(t)
            if g is not None and key in g.type_of:
                return t
        return None


# ------------------------------------------------------------------------------ event index


def _subjects(ev: Event) -> list[str]:
    out = [str(ev.get("subject") or "")]
    data = ev.get("data") or {}
    ent = data.get("entity") or {}
    if data.get("relationshipType") is not None:
        for k in (ent.get("_fromEntityKey"), ent.get("_toEntityKey")):
            if k:
                out.append(str(k))
    return [s for s in out if s]


class EventIndex:
    """Stream ids of each entity's events, per tenant (derived; safe to delete)."""

    def __init__(self, client: redis.Redis, prefix: str, retention_days: float) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = int(retention_days * 86400) + 3600
        self._lock = threading.Lock()

    def key(self, tenant: str, subject: str) -> str:
        return f"{self.prefix}:web:hist:{tenant}:{subject}"

    def pos_key(self, tenant: str) -> str:
        return f"{self.prefix}:web:histpos:{tenant}"

    def catch_up(self, tenant: str, batch: int = 2_000) -> int:
        """Index the tenant's events appended since the last call; the number indexed."""
        with self._lock:
            raw: Any = self.client.get(self.pos_key(tenant))
            pos = _s(raw) if raw else None
            skey = stream.stream_key(self.prefix, tenant)
            n = 0
            while True:
                start = f"({pos}" if pos else "-"
                entries: Any = self.client.xrange(skey, min=start, max="+", count=batch)
                if not entries:
                    break
                pipe = self.client.pipeline(transaction=False)
                touched: set[str] = set()
                for sid, fields in entries:
                    sid = _s(sid)
                    ev = stream.entry_event(fields)
                    if ev is None:
                        continue
                    score = int(sid.split("-", 1)[0])
                    for subject in _subjects(ev):
                        k = self.key(tenant, subject)
                        pipe.zadd(k, {sid: score})
                        touched.add(k)
                for k in touched:
                    pipe.expire(k, self.ttl)
                pos = _s(entries[-1][0])
                pipe.set(self.pos_key(tenant), pos)
                pipe.execute()
                n += len(entries)
                if len(entries) < batch:
                    break
            return n

    def history(self, tenant: str, subject: str, limit: int = HISTORY_LIMIT) -> list[Event]:
        """The newest `limit` events about `subject`, newest first."""
        self.catch_up(tenant)
        ids: Any = self.client.zrevrange(self.key(tenant, subject), 0, limit - 1)
        if not ids:
            return []
        skey = stream.stream_key(self.prefix, tenant)
        pipe = self.client.pipeline(transaction=False)
        for sid in ids:
            pipe.xrange(skey, min=sid, max=sid, count=1)
        out = []
        for sid, entries in zip(ids, pipe.execute(), strict=True):
            for _id, fields in entries or []:
                ev = stream.entry_event(fields)
                if ev is not None:
                    ev = {**ev, "_sid": _s(sid)}
                    out.append(ev)
        return out


# ------------------------------------------------------------------------------ timeline


@dataclass
class ChangeFilter:
    tenant: str | None = None
    type_glob: str | None = None
    field: str | None = None
    text: str | None = None

    def matches_raw(self, raw: bytes) -> bool:
        """A cheap pre-test on the stored JSON before decoding it."""
        if self.text and self.text.lower().encode() not in raw.lower():
            return False
        return not (self.field and self.field.encode() not in raw)

    def matches(self, ev: Event) -> bool:
        if self.type_glob and not fnmatch.fnmatchcase(str(ev.get("type", "")), self.type_glob):
            return False
        if self.field:
            changes = (ev.get("data") or {}).get("changes") or {}
            if not any(p == self.field or p.startswith(self.field + ".") for p in changes):
                return False
        if self.text:
            needle = self.text.lower()
            hay = " ".join((str(ev.get("subject", "")), display_name(ev), summarize(ev)))
            if needle not in hay.lower():
                return False
        return True

    def query(self) -> dict[str, str]:
        out = {
            "tenant": self.tenant,
            "type": self.type_glob,
            "field": self.field,
            "q": self.text,
        }
        return {k: v for k, v in out.items() if v}


def row(sid: str, ev: Event) -> dict[str, Any]:
    """One timeline row: what the page and its JSON twin show."""
    return {
        "id": sid,
        "event_id": ev.get("id"),
        "time": ev.get("time"),
        "type": ev.get("type"),
        "tenant": tenant_of(ev),
        "subject": ev.get("subject"),
        "name": display_name(ev),
        "summary": summarize(ev),
    }


def changes_page(
    client: redis.Redis,
    prefix: str,
    flt: ChangeFilter,
    *,
    before: str | None = None,
    limit: int = 50,
    max_scan: int = MAX_SCAN,
) -> dict[str, Any]:
    """Matching events newest first, older than `before`; `next` continues the scan."""
    key = stream.stream_key(prefix, flt.tenant)
    rows: list[dict[str, Any]] = []
    scanned = 0
    cursor = f"({before}" if before else "+"
    last: str | None = None
    exhausted = False
    while scanned < max_scan:
        batch: Any = client.xrevrange(key, max=cursor, min="-", count=SCAN_CHUNK)
        if not batch:
            exhausted = True
            break
        full = False
        for sid, fields in batch:
            sid = _s(sid)
            scanned += 1
            last = sid
            raw = fields.get(b"e", fields.get("e")) if fields else None
            if raw is None or not flt.matches_raw(raw if isinstance(raw, bytes) else raw.encode()):
                continue
            ev = stream.decode(raw)
            if flt.matches(ev):
                rows.append(row(sid, ev))
                if len(rows) >= limit:
                    full = True
                    break
        if full:
            break
        if len(batch) < SCAN_CHUNK:
            exhausted = True
            break
        cursor = f"({last}"
    return {
        "filters": flt.query(),
        "events": rows,
        "scanned": scanned,
        "next": None if exhausted else last,
    }
