"""The query index of one tenant's committed snapshot: entities by type and class, adjacency
lists, lazily built equality indexes, and (on demand) change facts from the tenant's events.

Built once per (tenant, snapshot generation) and cached in the process: a second query on the
same generation costs one Redis GET.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from monitor.events import stream
from monitor.model.graph import Graph, Item
from monitor.snapshot.store import SnapshotStore

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


def _time_ms(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


@dataclass
class ChangeFacts:
    """From the tenant's stored events: when each entity appeared and last changed."""

    created: dict[str, int] = field(default_factory=dict)  # _key -> ms
    begin: dict[str, int] = field(default_factory=dict)  # _key -> ms of the last change
    fields: dict[str, list[tuple[int, frozenset[str]]]] = field(default_factory=dict)
    baseline: int | None = None  # the tenant's first (baseline) sync, when still stored

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
        typ = str(ev.get("type", ""))
        when = _time_ms(ev.get("time"))
        if when is None:
            continue
        if typ == "mde.sync.baseline":
            if facts.baseline is None:
                facts.baseline = when
            continue
        if not typ.endswith(_TIME_TYPES):
            continue
        key = str(ev.get("subject", ""))
        if typ.endswith(".created"):
            facts.created[key] = when
        facts.begin[key] = when
        data = ev.get("data")
        changes = data.get("changes") if isinstance(data, dict) else None
        if typ.endswith(".updated") and isinstance(changes, dict) and changes:
            facts.fields.setdefault(key, []).append((when, frozenset(changes)))
    return facts


class QueryGraph:
    """One tenant's entities and relationships, indexed for J1QL."""

    def __init__(self, tenant: str, generation: int) -> None:
        self.tenant = tenant
        self.generation = generation
        self.entities: dict[str, Item] = {}
        self.relationships: dict[str, Item] = {}
        self.by_type: dict[str, list[Item]] = {}
        self.by_class: dict[str, list[Item]] = {}
        self.out: dict[str, list[Item]] = {}
        self.inn: dict[str, list[Item]] = {}
        self.changes: ChangeFacts | None = None
        self._eq: dict[tuple[tuple[str, ...], str], dict[Any, list[Item]]] = {}
        self._lock = threading.Lock()

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

    @classmethod
    def from_graph(cls, tenant: str, generation: int, graph: Graph) -> QueryGraph:
        return cls.from_items(
            tenant, generation, graph.entities.values(), graph.relationships.values()
        )

    def _add_entity(self, e: Item) -> None:
        e[TENANT_PROP] = self.tenant
        key = e["_key"]
        self.entities[key] = e
        self.by_type.setdefault(e.get("_type", ""), []).append(e)
        classes = e.get("_class")
        for c in classes if isinstance(classes, list) else [classes]:
            if isinstance(c, str):
                self.by_class.setdefault(c, []).append(e)

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
        self.out.setdefault(src, []).append(r)
        self.inn.setdefault(dst, []).append(r)

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entities)

    def base(self, names: tuple[str, ...]) -> list[Item]:
        """Entities of these classes (TitleCase) or types; every entity when `names` is empty."""
        if not names:
            return list(self.entities.values())
        out: list[Item] = []
        seen: set[int] = set()
        for n in names:
            part = self.by_class.get(n, []) if n[:1].isupper() else self.by_type.get(n, [])
            if len(names) == 1:
                return part
            for e in part:
                if id(e) not in seen:
                    seen.add(id(e))
                    out.append(e)
        return out

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
                        created = facts.created.get(key, facts.baseline)
                        if created is not None:
                            e["_createdOn"] = created
                        begin = facts.begin.get(key, created)
                        if begin is not None:
                            e["_beginOn"] = begin
                    self.changes = facts
        return self.changes


_CACHE: dict[tuple[int, str, str], QueryGraph] = {}
_CACHE_LOCK = threading.Lock()


def load_query_graph(client: redis.Redis, prefix: str, tenant: str) -> QueryGraph | None:
    """The tenant's latest committed snapshot as a QueryGraph (cached per generation)."""
    store = SnapshotStore(client, prefix)
    ckey = (id(client.connection_pool), prefix, tenant)
    for _ in range(3):
        gen = store.generation(tenant)
        cached = _CACHE.get(ckey)
        if cached is not None and cached.generation == gen:
            return cached
        graph = store.load_graph(tenant)
        if graph is None:
            return None
        if store.generation(tenant) != gen:  # a commit landed while reading: read again
            continue
        qg = QueryGraph.from_graph(tenant, gen, graph)
        with _CACHE_LOCK:
            _CACHE[ckey] = qg
        return qg
    graph = store.load_graph(tenant)
    return None if graph is None else QueryGraph.from_graph(tenant, store.generation(tenant), graph)


def store_query_graph(client: redis.Redis, prefix: str, graph: QueryGraph) -> None:
    """Cache a graph built elsewhere (e.g. right after a commit) for later queries."""
    with _CACHE_LOCK:
        _CACHE[(id(client.connection_pool), prefix, graph.tenant)] = graph


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
