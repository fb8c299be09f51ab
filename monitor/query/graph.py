"""The query index of one tenant's committed snapshot: entities by type and class, adjacency
lists, lazily built equality indexes, and (on demand) change facts from the tenant's events.

Built once per (tenant, snapshot generation) and cached in the process: a second query on the
same generation costs one Redis GET.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.events import stream
from monitor.model.graph import (
    Entry,
    Item,
    Relationships,
    entry_class,
    entry_ends,
    entry_item,
)
from monitor.model.schema import epoch_ms
from monitor.snapshot.store import Index, SnapshotStore

_MISSING = object()
TENANT_PROP = "_tenant"
RAW_DATA = "_rawData"
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
    return verb_of(rel.get("_class"))


def verb_of(c: Any) -> str:
    """The verb (upper-case class) a relationship of `_class` `c` is indexed by."""
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

    Relationships are held compactly (`Relationships` rows, no prints); the adjacency lists
    hold the same entries, so a traversal reads the other end without building the
    relationship (`monitor.model.graph.entry_item` builds it when a filter or a path needs it).

    Treat a built graph as read-only: `updated()` derives the next generation's graph by
    copy-on-write, so readers of the previous one are never disturbed.
    """

    def __init__(self, tenant: str, generation: int) -> None:
        self.tenant = tenant
        self.generation = generation
        self.entities: dict[str, Item] = {}
        self.relationships = Relationships(prints=False)
        self.by_type: dict[str, dict[str, Item]] = {}
        self.by_class: dict[str, dict[str, Item]] = {}
        # adjacency by relationship class (verb), then by entity key: a traversal reads only
        # the lists of its verbs (verb first: one map per verb, not one per entity)
        self.out: dict[str, dict[str, list[Entry]]] = {}
        self.inn: dict[str, dict[str, list[Entry]]] = {}
        self.changes: ChangeFacts | None = None
        # types whose volatile-only changes were not applied (no rule of the process that keeps
        # this graph reads them): a reader of these types needs the graph read whole
        self.stale_types: frozenset[str] = frozenset()
        self.raw = True  # items carry `_rawData` (False: left out, for query rules only)
        # equality indexes: (names, prop) -> value -> entity keys (keys, not entities: an entity
        # whose indexed value did not change keeps its place across generations)
        self._eq: dict[tuple[tuple[str, ...], str], dict[Any, list[str]]] = {}
        self._lock = threading.Lock()
        self._touched: set[tuple[int, str]] | None = None  # copy-on-write bookkeeping
        self._moved: set[str] = set()  # entities added or removed during `updated()`

    @classmethod
    def from_items(
        cls,
        tenant: str,
        generation: int,
        entities: Iterable[Item],
        relationships: Iterable[Item] | Relationships,
    ) -> QueryGraph:
        """A graph of these items. Given as `Relationships`, the relationships are taken over
        as they are (the object becomes the graph's: mapped ones get their ends set, and ones
        without two entity keys are dropped), so a caller's rows are not copied."""
        g = cls(tenant, generation)
        for e in entities:
            g._add_entity(e)
        if isinstance(relationships, Relationships):
            g.relationships = relationships
            others = g._index_rows(relationships.entries())
        else:
            store = g.relationships
            others = g._index_rows((r["_key"], store.put(r["_key"], r)) for r in relationships)
        for key in others:  # mapped ones, and any without two entity keys
            entry = g.relationships.entry(key)
            if entry is not None:
                del g.relationships[key]
                g._add_relationship(entry_item(entry))
        return g

    def _index_rows(self, entries: Iterable[tuple[str, Entry]]) -> list[str]:
        """Index stored relationships for a fresh graph: the rows with two entity keys and a
        class (building the index is mostly this loop); the keys of the others, left for
        `_add_relationship`."""
        out, inn = self.out, self.inn
        verbs: dict[str, str] = {}  # _class -> verb
        others: list[str] = []
        for key, entry in entries:
            if entry.__class__ is not tuple:
                others.append(key)
                continue
            src, dst = entry_ends(entry)
            c = entry_class(entry)
            if src.__class__ is not str or dst.__class__ is not str or c.__class__ is not str:
                others.append(key)
                continue
            verb = verbs.get(c)
            if verb is None:
                verb = verbs[c] = verb_of(c)
                out.setdefault(verb, {})
                inn.setdefault(verb, {})
            ends = out[verb]
            if (lst := ends.get(src)) is None:
                ends[src] = [entry]
            else:
                lst.append(entry)
            ends = inn[verb]
            if (lst := ends.get(dst)) is None:
                ends[dst] = [entry]
            else:
                lst.append(entry)
        return others

    def _add_entity(self, e: Item) -> None:
        e[TENANT_PROP] = self.tenant
        key = e["_key"]
        if self._touched is not None:
            self._moved.add(key)
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
        if self._touched is not None:
            self._moved.add(key)
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
        entry = self.relationships.put(r["_key"], r)
        verb = rel_class(r)
        for side, end in ((self.out, src), (self.inn, dst)):
            ends = self._ends(side, verb)
            lst = ends.get(end)
            if lst is None:
                ends[end] = [entry]
            elif self._touched is None:
                lst.append(entry)
            else:  # the list may be shared with the previous generation's graph
                ends[end] = [*lst, entry]

    def _ends(self, side: dict[str, dict[str, list[Entry]]], verb: str) -> dict[str, list[Entry]]:
        """The entity -> relationships map of `verb`; during `updated()`, a private copy
        (copy-on-write)."""
        ends = side.get(verb)
        if self._touched is None:
            if ends is None:
                ends = side[verb] = {}
            return ends
        mark = (id(side), verb)
        if mark not in self._touched:
            side[verb] = dict(ends) if ends is not None else {}
            self._touched.add(mark)
        return side[verb]

    def _remove_relationship(self, key: str) -> None:
        r = self.relationships.entry(key)
        if r is None:
            return
        del self.relationships[key]
        verb = verb_of(entry_class(r))
        ends = entry_ends(r)
        for side, end in ((self.out, ends[0]), (self.inn, ends[1])):
            if isinstance(end, str) and end in side.get(verb, ()):
                by_end = self._ends(side, verb)
                rest = [x for x in by_end[end] if x is not r]
                if rest:
                    by_end[end] = rest
                else:
                    del by_end[end]
        for end in ends:  # a mapped target's placeholder goes with its last relationship
            e = self.entities.get(end) if isinstance(end, str) else None
            if e is not None and e.get("_placeholder") and not self._linked(e["_key"]):
                self._remove_entity(e["_key"])

    def _linked(self, key: str) -> bool:
        return any(by_end.get(key) for side in (self.out, self.inn) for by_end in side.values())

    def updated(
        self,
        generation: int,
        items: dict[str, Item],
        removed: Iterable[str],
        quiet: Collection[str] = (),
        ignored: Mapping[str, frozenset[str]] | None = None,
        stale: Collection[str] = (),
    ) -> QueryGraph:
        """The next generation: `items` (new and changed, by `_key`) replace or join this
        graph's, `removed` keys leave. This graph is left untouched. `stale`: types whose
        volatile-only changes were left out (see `stale_types`).

        `quiet` items changed only in their type's `ignored` fields: the equality indexes of
        other fields keep their entries without looking at them."""
        g = QueryGraph(self.tenant, generation)
        g.entities = dict(self.entities)
        g.relationships = self.relationships.copy()
        g.by_type = {t: dict(v) for t, v in self.by_type.items()}
        g.by_class = {c: dict(v) for c, v in self.by_class.items()}
        g.out, g.inn = dict(self.out), dict(self.inn)
        g._touched = set()
        g.stale_types = self.stale_types.union(stale)
        g.raw = self.raw
        moved: dict[tuple[Any, ...], tuple[list[str], list[str]]] = {}  # by kind: loud, quiet
        for k in removed:
            if k in g.relationships:
                g._remove_relationship(k)
            else:
                g._remove_entity(k)
        entities, rels = split_items(items.values())
        for r in rels:
            g._remove_relationship(r["_key"])
        for e in entities:
            key = e["_key"]
            old = g.entities.get(key)
            kind = _kind(e)
            if old is not None and _kind(old) == kind:
                g._replace_entity(old, e)
                moved.setdefault((kind, kind), ([], []))[key in quiet].append(key)
            else:
                g._remove_entity(key)
                g._add_entity(e)
        for r in rels:
            g._add_relationship(r)
        g._touched = None
        for k in g._moved:  # joined, left, or changed kind (placeholders included)
            old, new = self.entities.get(k), g.entities.get(k)
            moved.setdefault((_kind(old), _kind(new)), ([], []))[0].append(k)
        g._moved = set()
        with self._lock:  # a reader may be building an index of this graph meanwhile
            built = list(self._eq.items())
        g._eq = {
            key: self._index_update(g, key, index, moved, ignored or {}) for key, index in built
        }
        return g

    def _replace_entity(self, old: Item, e: Item) -> None:
        """A new version of an entity of the same type and classes."""
        e[TENANT_PROP] = self.tenant
        key = e["_key"]
        self.entities[key] = e
        self.by_type[e.get("_type", "")][key] = e
        classes = e.get("_class")
        for c in classes if isinstance(classes, list) else [classes]:
            if isinstance(c, str):
                self.by_class[c][key] = e

    def _index_update(
        self,
        g: QueryGraph,
        key: tuple[tuple[str, ...], str],
        index: dict[Any, list[str]],
        moved: dict[tuple[Any, ...], tuple[list[str], list[str]]],
        ignored: Mapping[str, frozenset[str]],
    ) -> dict[Any, list[str]]:
        """This graph's equality index `key` brought to `g`: the lists of the values that
        `moved` entities left or joined are copied; the others are shared."""
        names, prop = key
        top = prop.split(".", 1)[0]
        drop: dict[Any, set[str]] = {}
        add: dict[Any, list[str]] = {}
        for (was, now), (loud, quiet) in moved.items():
            in_before, in_after = _kind_is(was, names), _kind_is(now, names)
            if not in_before and not in_after:
                continue
            keys = loud
            if quiet and (now is None or top in ignored.get(now[0], (top,))):
                keys = [*loud, *quiet]  # the indexed field is one a quiet change may touch
            for k in keys:
                old, new = self.entities.get(k), g.entities.get(k)
                if in_before and in_after and old is not None and new is not None:
                    a, b = get_prop(old, prop), get_prop(new, prop)
                    if a.__class__ is b.__class__ and not isinstance(a, list) and a == b:
                        continue  # the same scalar: the same place in the index
                before = _index_values(prop, old) if in_before and old is not None else []
                after = _index_values(prop, new) if in_after and new is not None else []
                if before == after:
                    continue  # same values: same place in the index
                for value in before:
                    drop.setdefault(value, set()).add(k)
                for value in after:
                    add.setdefault(value, []).append(k)
        out = dict(index)
        for value in drop.keys() | add.keys():
            gone = drop.get(value, set())
            lst = [x for x in out.get(value, ()) if x not in gone]
            lst += add.get(value, ())
            if lst:
                out[value] = lst
            else:
                out.pop(value, None)
        return out

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entities)

    def size(self) -> int:
        """Entities and relationships."""
        return len(self.entities) + len(self.relationships)

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

    def is_a(self, names: tuple[str, ...], key: str) -> bool:
        """Is `key` an entity of these classes or types (any entity when `names` is empty)?"""
        if not names:
            return key in self.entities
        for n in names:
            part = self.by_class.get(n) if n[:1].isupper() else self.by_type.get(n)
            if part is not None and key in part:
                return True
        return False

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
                        for value in _index_values(prop, e):
                            index.setdefault(value, []).append(e["_key"])
                    self._eq[key] = index
        ents = self.entities
        out: list[Item] = []
        seen: set[str] = set()
        for value in values:
            for k in index.get((type(value) is bool, value), ()):
                if k not in seen:
                    seen.add(k)
                    out.append(ents[k])
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


def _kind(e: Item | None) -> tuple[Any, ...] | None:
    """(type, classes) of an entity, None for none: what `is_a` looks at."""
    if e is None:
        return None
    classes = e.get("_class")
    return (e.get("_type", ""), tuple(classes) if isinstance(classes, list) else (classes,))


def _kind_is(kind: tuple[Any, ...] | None, names: tuple[str, ...]) -> bool:
    """`is_a` for an entity of this kind."""
    if kind is None:
        return False
    if not names:
        return True
    type_, classes = kind
    return any(n in classes if n[:1].isupper() else n == type_ for n in names)


def _index_values(prop: str, e: Item) -> list[tuple[bool, Any]]:
    """The equality-index keys of an entity's property (each member of a list)."""
    v = get_prop(e, prop)
    out = []
    for member in v if isinstance(v, list) else (v,):
        try:
            hash(member)
        except TypeError:  # unhashable (a nested object)
            continue
        out.append((type(member) is bool, member))
    return out


# the graphs kept, least recently stored or read first; bounded by their items in all
CACHE_ITEMS = int(os.environ.get("MDE_MONITOR_QUERY_CACHE_ITEMS", "1000000"))
_CACHE: OrderedDict[tuple[int, str, str], QueryGraph] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _read(
    store: SnapshotStore, tenant: str, keep_raw: bool = True
) -> tuple[list[Item], Relationships] | None:
    """Every item of the tenant's committed index: (entities, relationships held as rows as
    they are read); without `_rawData` unless `keep_raw`."""
    version, index = store.load_versioned_index(tenant)  # index and bodies of one version
    if index is None:
        return None
    fps = index_fingerprints(index)
    entities: list[Item] = []
    rels = Relationships(prints=False)
    for key, raw in store.scan_bodies(tenant, version):
        if key not in fps:
            continue
        item = store.decode_body(raw)
        if not keep_raw:
            item.pop(RAW_DATA, None)
        if is_relationship(item):
            rels[item["_key"]] = item
        else:
            entities.append(item)
    return entities, rels


def cached_query_graph(client: redis.Redis, prefix: str, tenant: str) -> QueryGraph | None:
    key = (id(client.connection_pool), prefix, tenant)
    with _CACHE_LOCK:
        graph = _CACHE.get(key)
        if graph is not None:
            _CACHE.move_to_end(key)
        return graph


def load_query_graph(
    client: redis.Redis, prefix: str, tenant: str, keep_raw: bool = True
) -> QueryGraph | None:
    """The tenant's latest committed snapshot as a QueryGraph (cached per generation).

    Without `keep_raw` the items leave `_rawData` out (query rules never read it): a fraction
    of the memory for machines and users."""
    store = SnapshotStore(client, prefix)
    for attempt in range(3):
        gen = store.generation(tenant)
        cached = cached_query_graph(client, prefix, tenant)
        if cached is not None and cached.generation == gen and (cached.raw or not keep_raw):
            return cached
        read = _read(store, tenant, keep_raw)
        if read is None:
            return None
        if store.generation(tenant) != gen and attempt < 2:  # a commit landed meanwhile
            continue
        qg = QueryGraph.from_items(tenant, gen, read[0], read[1])
        qg.raw = keep_raw
        store_query_graph(client, prefix, qg)
        return qg
    return None


def store_query_graph(client: redis.Redis, prefix: str, graph: QueryGraph) -> None:
    """Cache a graph built elsewhere (e.g. right after a commit) for later queries."""
    key = (id(client.connection_pool), prefix, graph.tenant)
    with _CACHE_LOCK:
        _CACHE[key] = graph
        _CACHE.move_to_end(key)
        total = sum(g.size() for g in _CACHE.values())
        while total > CACHE_ITEMS and len(_CACHE) > 1:  # the newest one stays, whatever its size
            _old_key, old = _CACHE.popitem(last=False)
            total -= old.size()


def drop_query_graph(client: redis.Redis, prefix: str, tenant: str) -> None:
    """Forget this process's graph of the tenant (the next load reads it whole)."""
    with _CACHE_LOCK:
        _CACHE.pop((id(client.connection_pool), prefix, tenant), None)


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
