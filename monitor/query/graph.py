"""The query index of one tenant's committed snapshot: entities by type and class, adjacency
lists, lazily built equality indexes, and (on demand) change facts from the tenant's events.

Built once per (tenant, snapshot generation) and cached in the process: a second query on the
same generation costs one Redis GET.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.events import stream
from monitor.model.graph import Item
from monitor.model.schema import epoch_ms
from monitor.snapshot.store import Index, SnapshotStore

_MISSING = object()
TENANT_PROP = "_tenant"
CHANGE_PROPS = ("_beginOn", "_createdOn")
_TIME_TYPES = (".created", ".updated")


def get_prop(item: Item, name: str) -> Any:
    """`item[name]`; a dotted name that is not a key of its own walks nested objects."""
    v = item.get(name, _MISSING)
    if v is not _MISSING:
        return v
    if "." not in name:
        return None
    cur: Any = item
    for part in name.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def rel_class(rel: Item) -> str:
    c = rel.get("_class")
    if isinstance(c, list):
        return str(c[0]).upper() if c else ""
    return str(c or "").upper()


def is_relationship(item: Item) -> bool:
    """A stored relationship (direct, or mapped to a target by `_mapping`), not an entity."""
    return "_fromEntityKey" in item or "_mapping" in item


def split_items(items: Iterable[Item]) -> tuple[list[Item], list[Item]]:
    """(entities, relationships): `from_items` wants every entity before the relationships."""
    entities: list[Item] = []
    rels: list[Item] = []
    for item in items:
        (rels if is_relationship(item) else entities).append(item)
    return entities, rels


def index_fingerprints(index: Index) -> dict[str, str]:
    """`_key -> fingerprint` of a stored snapshot index (scope -> _type -> _key -> fp)."""
    return {k: fp for types in index.values() for keys in types.values() for k, fp in keys.items()}


@dataclass
class ChangeFacts:
    """From the tenant's stored events: when each entity appeared and last changed."""

    created: dict[str, int] = field(default_factory=dict)  # _key -> ms
    begin: dict[str, int] = field(default_factory=dict)  # _key -> ms of the last change
    fields: dict[str, list[tuple[int, frozenset[str]]]] = field(default_factory=dict)
    baseline: int | None = None  # the tenant's first (baseline) sync, when still stored

    def add(self, ev: Mapping[str, Any]) -> None:
        """Fold one stored event into the facts."""
        typ = str(ev.get("type", ""))
        when = epoch_ms(ev.get("time"))
        if when is None:
            return
        if typ == "mde.sync.baseline":
            if self.baseline is None:
                self.baseline = when
            return
        if not typ.endswith(_TIME_TYPES):
            return
        key = str(ev.get("subject", ""))
        if typ.endswith(".created"):
            self.created[key] = when
        self.begin[key] = when
        data = ev.get("data")
        changes = data.get("changes") if isinstance(data, dict) else None
        if typ.endswith(".updated") and isinstance(changes, dict) and changes:
            self.fields.setdefault(key, []).append((when, frozenset(changes)))

    def stamp(self, key: str, e: Item) -> None:
        """Set `_createdOn` / `_beginOn` on an entity from the facts."""
        created = self.created.get(key, self.baseline)
        if created is not None:
            e["_createdOn"] = created
        begin = self.begin.get(key, created)
        if begin is not None:
            e["_beginOn"] = begin

    def changed_since(self, key: str, name: str, since: int) -> bool:
        for when, names in reversed(self.fields.get(key, ())):
            if when < since:
                return False
            if name in names or any(n.startswith(name + ".") for n in names):
                return True
        return False


def read_change_facts(client: redis.Redis, prefix: str, tenant: str) -> ChangeFacts:
    facts = ChangeFacts()
    for _sid, ev in stream.read_range(client, prefix, tenant, count=2000):
        facts.add(ev)
    return facts


class QueryGraph:
    """One tenant's entities and relationships, indexed for J1QL.

    Treat a built graph as read-only: `updated()` derives the next generation's graph by
    copy-on-write, so readers of the previous one are never disturbed.
    """

    def __init__(self, tenant: str, generation: int) -> None:
        self.tenant = tenant
        self.generation = generation
        self.entities: dict[str, Item] = {}
        self.relationships: dict[str, Item] = {}
        self.by_type: dict[str, dict[str, Item]] = {}
        self.by_class: dict[str, dict[str, Item]] = {}
        # adjacency by entity key, then by relationship class (verb): a traversal reads only
        # the lists of its verbs
        self.out: dict[str, dict[str, list[Item]]] = {}
        self.inn: dict[str, dict[str, list[Item]]] = {}
        self.changes: ChangeFacts | None = None
        self.fingerprints: dict[str, str] | None = None  # _key -> stored fingerprint
        self._eq: dict[tuple[tuple[str, ...], str], dict[Any, list[Item]]] = {}
        self._lock = threading.Lock()
        self._touched: set[tuple[int, str]] | None = None  # copy-on-write bookkeeping

    @classmethod
    def from_items(
        cls,
        tenant: str,
        generation: int,
        entities: Iterable[Item],
        relationships: Iterable[Item],
    ) -> QueryGraph:
        g = cls(tenant, generation)
        for e in entities:
            g._add_entity(e)
        for r in relationships:
            g._add_relationship(r)
        return g

    def _add_entity(self, e: Item) -> None:
        e[TENANT_PROP] = self.tenant
        key = e["_key"]
        self.entities[key] = e
        by_type = self.by_type.get(e.get("_type", ""))
        if by_type is None:
            by_type = self.by_type[e.get("_type", "")] = {}
        by_type[key] = e
        classes = e.get("_class")
        for c in classes if isinstance(classes, list) else [classes]:
            if isinstance(c, str):
                self.by_class.setdefault(c, {})[key] = e

    def _remove_entity(self, key: str) -> None:
        e = self.entities.pop(key, None)
        if e is None:
            return
        self.by_type.get(e.get("_type", ""), {}).pop(key, None)
        classes = e.get("_class")
        for c in classes if isinstance(classes, list) else [classes]:
            if isinstance(c, str):
                self.by_class.get(c, {}).pop(key, None)

    def _add_relationship(self, r: Item) -> None:
        mapping = r.get("_mapping")
        if isinstance(mapping, dict):
            target = mapping.get("targetEntity") or {}
            tkey = target.get("_key")
            source = mapping.get("sourceEntityKey")
            if not isinstance(tkey, str) or not isinstance(source, str):
                return
            if tkey not in self.entities:  # J1's placeholder for the mapped target
                placeholder = {"displayName": target.get("name") or tkey, **target}
                placeholder["_placeholder"] = True
                self._add_entity(placeholder)
            if mapping.get("relationshipDirection") == "REVERSE":
                r["_fromEntityKey"], r["_toEntityKey"] = tkey, source
            else:
                r["_fromEntityKey"], r["_toEntityKey"] = source, tkey
        src, dst = r.get("_fromEntityKey"), r.get("_toEntityKey")
        if not isinstance(src, str) or not isinstance(dst, str):
            return
        self.relationships[r["_key"]] = r
        verb = rel_class(r)
        for side, end in ((self.out, src), (self.inn, dst)):
            adj = self._adjacency(side, end)
            lst = adj.get(verb)
            if lst is None:
                adj[verb] = [r]
            elif self._touched is None:
                lst.append(r)
            else:  # the list may be shared with the previous generation's graph
                adj[verb] = [*lst, r]

    def _adjacency(self, side: dict[str, dict[str, list[Item]]], key: str) -> dict[str, list[Item]]:
        """The verb map of `key`; during `updated()`, a private copy (copy-on-write)."""
        adj = side.get(key)
        if self._touched is None:
            if adj is None:
                adj = side[key] = {}
            return adj
        mark = (id(side), key)
        if mark not in self._touched:
            side[key] = dict(adj) if adj is not None else {}
            self._touched.add(mark)
        return side[key]

    def _remove_relationship(self, key: str) -> None:
        r = self.relationships.pop(key, None)
        if r is None:
            return
        verb = rel_class(r)
        for side, end in ((self.out, r.get("_fromEntityKey")), (self.inn, r.get("_toEntityKey"))):
            if isinstance(end, str) and end in side:
                adj = self._adjacency(side, end)
                adj[verb] = [x for x in adj.get(verb, ()) if x is not r]

    def updated(
        self,
        generation: int,
        fingerprints: dict[str, str],
        items: dict[str, Item],
    ) -> QueryGraph:
        """The next generation: `items` (new and changed, by `_key`) replace or join this
        graph's, keys missing from `fingerprints` leave. This graph is left untouched."""
        g = QueryGraph(self.tenant, generation)
        g.entities = dict(self.entities)
        g.relationships = dict(self.relationships)
        g.by_type = {t: dict(v) for t, v in self.by_type.items()}
        g.by_class = {c: dict(v) for c, v in self.by_class.items()}
        g.out, g.inn = dict(self.out), dict(self.inn)
        g._touched = set()
        old = self.fingerprints or {}
        gone = [k for k in old if k not in fingerprints]
        for k in (*gone, *items):
            if k in g.relationships:
                g._remove_relationship(k)
            else:
                g._remove_entity(k)
        entities, rels = split_items(items.values())
        for item in entities:
            g._add_entity(item)
        for item in rels:
            g._add_relationship(item)
        g._touched = None
        g.fingerprints = fingerprints
        return g

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entities)

    def base(self, names: tuple[str, ...]) -> list[Item]:
        """Entities of these classes (TitleCase) or types; every entity when `names` is empty."""
        if not names:
            return list(self.entities.values())
        found: dict[str, Item] = {}
        for n in names:
            part = self.by_class.get(n) if n[:1].isupper() else self.by_type.get(n)
            if part:
                if len(names) == 1:
                    return list(part.values())
                found.update(part)
        return list(found.values())

    def lookup(self, names: tuple[str, ...], prop: str, values: Iterable[Any]) -> list[Item]:
        """Entities of `names` whose `prop` equals (or, for lists, contains) one of `values`."""
        key = (names, prop)
        index = self._eq.get(key)
        if index is None:
            with self._lock:
                index = self._eq.get(key)
                if index is None:
                    index = {}
                    for e in self.base(names):
                        v = get_prop(e, prop)
                        for member in v if isinstance(v, list) else (v,):
                            try:
                                index.setdefault((type(member) is bool, member), []).append(e)
                            except TypeError:  # unhashable (a nested object)
                                continue
                    self._eq[key] = index
        out: list[Item] = []
        seen: set[int] = set()
        for value in values:
            for e in index.get((type(value) is bool, value), ()):
                if id(e) not in seen:
                    seen.add(id(e))
                    out.append(e)
        return out

    def ensure_changes(self, client: redis.Redis, prefix: str) -> ChangeFacts:
        """Read the change facts once, and set `_beginOn` / `_createdOn` on every entity."""
        if self.changes is None:
            with self._lock:
                if self.changes is None:
                    facts = read_change_facts(client, prefix, self.tenant)
                    for key, e in self.entities.items():
                        facts.stamp(key, e)
                    self.changes = facts
        return self.changes


_CACHE: dict[tuple[int, str, str], QueryGraph] = {}
_CACHE_LOCK = threading.Lock()


def _read(
    store: SnapshotStore, tenant: str
) -> tuple[list[Item], list[Item], dict[str, str]] | None:
    """Every stored item of the tenant (entities, relationships) and the fingerprints."""
    index = store.load_index(tenant)
    if index is None:
        return None
    fps = index_fingerprints(index)
    entities: list[Item] = []
    rels: list[Item] = []
    hkey = store.key(tenant, "body")
    cursor = 0
    while True:
        cursor, part = store.client.hscan(hkey, cursor, count=5_000)  # type: ignore[misc]
        for raw_key, raw in part.items():
            if raw_key.decode() not in fps:
                continue
            item = store.decode_body(raw)
            (rels if is_relationship(item) else entities).append(item)
        if cursor == 0:
            break
    return entities, rels, fps


def cached_query_graph(client: redis.Redis, prefix: str, tenant: str) -> QueryGraph | None:
    return _CACHE.get((id(client.connection_pool), prefix, tenant))


def load_query_graph(client: redis.Redis, prefix: str, tenant: str) -> QueryGraph | None:
    """The tenant's latest committed snapshot as a QueryGraph (cached per generation)."""
    store = SnapshotStore(client, prefix)
    for attempt in range(3):
        gen = store.generation(tenant)
        cached = cached_query_graph(client, prefix, tenant)
        if cached is not None and cached.generation == gen:
            return cached
        read = _read(store, tenant)
        if read is None:
            return None
        if store.generation(tenant) != gen and attempt < 2:  # a commit landed meanwhile
            continue
        qg = QueryGraph.from_items(tenant, gen, read[0], read[1])
        qg.fingerprints = read[2]
        store_query_graph(client, prefix, qg)
        return qg
    return None


def store_query_graph(client: redis.Redis, prefix: str, graph: QueryGraph) -> None:
    """Cache a graph built elsewhere (e.g. right after a commit) for later queries."""
    with _CACHE_LOCK:
        _CACHE[(id(client.connection_pool), prefix, graph.tenant)] = graph


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
