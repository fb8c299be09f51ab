"""The graph of one tenant as collected: items keyed by `_key`, each tagged with its scope."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from enum import StrEnum
from operator import itemgetter
from typing import Any

import orjson

from monitor.model import schema
from monitor.model.raw import canonical_json, export_value

Item = dict[str, Any]

_SCALARS = (str, int, float, bool, type(None))
_VALUES = 2  # a row: (shape, print, *values)


class Shape:
    """The layout every relationship row written the same way shares: its field names, its
    `_type` and `_class` (and a `displayName` equal to the class, as converters write it),
    held here rather than in each row, and where the other values sit in the row. A row whose
    `_key` is `{from}|{class, lower case}|{to}` (every converter's) does not hold it either: it
    is made again when the relationship is built."""

    __slots__ = (
        "_consts",
        "_pick",
        "cls",
        "dst",
        "keyless",
        "names",
        "src",
        "stored",
        "typ",
        "verb",
    )

    def __init__(
        self, names: tuple[str, ...], typ: Any, cls: Any, display: bool, keyless: bool
    ) -> None:
        self.names, self.typ, self.cls, self.keyless = names, typ, cls, keyless
        self.verb = cls.lower() if isinstance(cls, str) else ""
        consts: dict[str, Any] = {"_type": typ}
        if "_class" in names:
            consts["_class"] = cls
        if display:
            consts["displayName"] = cls
        # the names of the values a row holds, in order
        self.stored = tuple(n for n in names if n not in consts and not (keyless and n == "_key"))
        pos = {n: i + _VALUES for i, n in enumerate(self.stored)}
        self.src = pos.get("_fromEntityKey", 0)
        self.dst = pos.get("_toEntityKey", 0)
        # building: the fields picked, in order, from (key, *constants, *row)
        const_names = list(consts)
        base = 1 + len(const_names)
        self._consts = tuple(consts.values())
        picks = [
            0
            if keyless and n == "_key"
            else 1 + const_names.index(n)
            if n in consts
            else base + pos[n]
            for n in names
        ]
        self._pick: Callable[[tuple[Any, ...]], tuple[Any, ...]] = itemgetter(*picks)
        if len(picks) == 1:  # itemgetter of one index gives the value itself, not a 1-tuple
            only = picks[0]

            def pick_one(row: tuple[Any, ...]) -> tuple[Any, ...]:
                return (row[only],)

            self._pick = pick_one

    def item(self, row: tuple[Any, ...]) -> Item:
        """The relationship a row holds, as a new dict (fields in their stored order)."""
        key = f"{row[self.src]}|{self.verb}|{row[self.dst]}" if self.keyless else None
        return dict(zip(self.names, self._pick((key, *self._consts, *row)), strict=True))


# (names, _type, _class, displayName is the class, keyless) -> the shape, made once
_SHAPES: dict[tuple[Any, ...], Shape] = {}
# a stored relationship as `Relationships` holds it: a row (a tuple), or the dict as given
Entry = tuple[Any, ...] | Item


def print_of(body: bytes) -> bytes:
    """blake2b-64 of a canonical JSON body: the fingerprint the snapshot index stores (in hex;
    held as the 8-byte digest in memory, which costs 41 bytes instead of 65)."""
    return hashlib.blake2b(body, digest_size=8).digest()


def canonical_print(item: Item) -> bytes:
    """`print_of` the item's canonical JSON (orjson, sorted keys): its full-body fingerprint
    (see monitor.detect.diff)."""
    return print_of(canonical_json(item))


def _shape_of(key: str, rel: Item) -> Shape:
    typ, cls = rel["_type"], rel.get("_class")
    src, dst = rel.get("_fromEntityKey"), rel.get("_toEntityKey")
    keyless = (
        type(cls) is str
        and type(src) is str
        and type(dst) is str
        and rel.get("_key") == key == f"{src}|{cls.lower()}|{dst}"
    )
    display = type(cls) is str and rel.get("displayName", None) == cls
    names = tuple(rel)
    sig = (names, typ, cls, display, keyless)
    found = _SHAPES.get(sig)
    if found is None:
        found = _SHAPES[sig] = Shape(names, typ, cls, display, keyless)
    return found


def entry_item(entry: Entry) -> Item:
    """The relationship an entry holds, as a dict (a row builds a new one)."""
    if isinstance(entry, tuple):
        return entry[0].item(entry)
    return entry


def entry_ends(entry: Entry) -> tuple[Any, Any]:
    """(`_fromEntityKey`, `_toEntityKey`) of an entry, without building it."""
    if isinstance(entry, tuple):
        shape: Shape = entry[0]
        src, dst = shape.src, shape.dst
        return (entry[src] if src else None, entry[dst] if dst else None)
    return entry.get("_fromEntityKey"), entry.get("_toEntityKey")


def entry_class(entry: Entry) -> Any:
    """The `_class` of an entry, without building it."""
    if isinstance(entry, tuple):
        return entry[0].cls
    return entry.get("_class")


class Relationships(MutableMapping[str, Item]):
    """Relationships by `_key`, held compactly: a relationship of scalar fields only (a
    machine-CVE pair, a HAS) is one tuple - its `Shape` (field names, `_type`, `_class`,
    shared by every relationship written the same way) and its other values, strings interned
    so the endpoint keys and products repeated across millions of pairs are stored once - with
    its canonical print, made as it is stored (the diff reads it without building the
    relationship). Reading one builds a new dict (a change to it is not stored: assign it
    back); other relationships (mapped ones with their nested `_mapping`) are kept as they are.

    A pair costs about 310 bytes this way (its key string 175, its row 80, its print 41)
    instead of 750 as a dict: pairs are most of a big tenant's graph.
    """

    __slots__ = ("_flat", "_other", "_prints")

    def __init__(self, items: Mapping[str, Item] | None = None, *, prints: bool = True) -> None:
        """`prints=False`: rows leave the canonical print out (b"") - for readers that never
        diff, like the query graph."""
        self._flat: dict[str, tuple[Any, ...]] = {}
        self._other: dict[str, Item] = {}
        self._prints = prints
        if items:
            self.update(items)

    def __setitem__(self, key: str, rel: Item) -> None:
        self.put(key, rel)

    def put(self, key: str, rel: Item) -> Entry:
        """Store `rel` under `key`; the stored entry (see `entry`)."""
        if type(rel) is dict and "_type" in rel and all(type(v) in _SCALARS for v in rel.values()):
            try:
                fp = canonical_print(rel) if self._prints else b""
            except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits: the diff names it
                self.put_entry(key, rel)
                return rel
            shape = _shape_of(key, rel)
            intern = sys.intern
            get = rel.get
            row = (
                shape,
                fp,
                *(
                    (key if v == key else v) if n == "_key" else intern(v) if type(v) is str else v
                    for n in shape.stored
                    for v in (get(n),)
                ),
            )
            self.put_entry(key, row)
            return row
        self.put_entry(key, rel)
        return rel

    def __getitem__(self, key: str) -> Item:
        entry = self.entry(key)
        if entry is None:
            raise KeyError(key)
        return entry_item(entry)

    def __delitem__(self, key: str) -> None:
        if self._flat.pop(key, None) is None:
            del self._other[key]

    def __contains__(self, key: object) -> bool:
        return key in self._flat or key in self._other

    def __iter__(self) -> Iterator[str]:
        yield from self._flat
        yield from self._other

    def __len__(self) -> int:
        return len(self._flat) + len(self._other)

    def __repr__(self) -> str:
        return f"Relationships({len(self)} items)"

    def copy(self) -> Relationships:
        """A shallow copy (the stored rows are immutable)."""
        out = Relationships(prints=self._prints)
        out._flat, out._other = dict(self._flat), dict(self._other)
        return out

    def entry(self, key: str) -> Entry | None:
        """The stored row or dict of `key` (None when absent), not a copy: the same object
        every time, so lists of entries can be searched by identity."""
        row = self._flat.get(key)
        return row if row is not None else self._other.get(key)

    def entries(self) -> Iterator[tuple[str, Entry]]:
        yield from self._flat.items()
        yield from self._other.items()

    def put_entry(self, key: str, entry: Entry) -> None:
        """Store an entry as it is (a row made by `put`, or taken from another
        `Relationships`)."""
        if isinstance(entry, tuple):
            self._flat[key] = entry
            self._other.pop(key, None)
        else:
            self._other[key] = entry
            self._flat.pop(key, None)

    def absorb(self, other: Relationships) -> None:
        """Move every relationship of `other` in (replacing equal keys); `other` is emptied."""
        for key in other._flat.keys() & self._other.keys():
            del self._other[key]
        for key in other._other.keys() & self._flat.keys():
            del self._flat[key]
        self._flat.update(other._flat)
        self._other.update(other._other)
        other._flat, other._other = {}, {}

    def rows(self, keys: list[str]) -> list[tuple[str, bytes, tuple[str, ...]] | None]:
        """(`_type`, canonical print, field names) of each of `keys` kept as a row, without
        building them; None for the others."""
        get = self._flat.get
        out: list[tuple[str, bytes, tuple[str, ...]] | None] = []
        for key in keys:
            row = get(key)
            out.append(None if row is None else (row[0].typ, row[1], row[0].names))
        return out

    def type_of(self, key: str) -> str | None:
        """The `_type` of a stored relationship without building it (None when absent)."""
        row = self._flat.get(key)
        if row is None:
            rel = self._other.get(key)
            return rel.get("_type") if isinstance(rel, dict) else None
        typ: str = row[0].typ
        return typ

    def endpoints(self, key: str) -> tuple[Any, Any] | None:
        """(`_fromEntityKey`, `_toEntityKey`) of a stored relationship without building it
        (None when absent)."""
        entry = self.entry(key)
        return None if entry is None else entry_ends(entry)

    def of_type(self, typ: str) -> Iterator[Item]:
        """The relationships of one `_type` (only those are built)."""
        for row in self._flat.values():
            if row[0].typ == typ:
                yield row[0].item(row)
        for rel in self._other.values():
            if rel.get("_type") == typ:
                yield rel


class ScopeState(StrEnum):
    COMPLETE = "complete"  # every page fetched and parsed: absence means deletion
    FAILED = "failed"  # error after retries, 401/403, malformed or truncated page
    SKIPPED = "skipped"  # not fetched this sync (budget cut): previous items are kept


@dataclass
class ScopeStatus:
    state: ScopeState
    count: int = 0
    error: str | None = None  # short, secret-free; names the endpoint and the code

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "count": self.count, "error": self.error}


def default_scope(typ: object) -> str:
    """The scope the schema gives items of `_type` `typ` ("unknown" for other types)."""
    if isinstance(typ, str):
        ent = schema.ENTITY_BY_TYPE.get(typ)
        if ent is not None:
            return ent.scope
        rel = schema.RELATIONSHIP_BY_TYPE.get(typ)
        if rel is not None:
            return rel.scope
    return "unknown"


class ScopeOf(MutableMapping[str, str]):
    """`_key` -> scope of every item of a graph. Only a scope other than the default of the
    item's type is stored (`explicit`): most items are in their type's scope, and a big
    tenant's graph would otherwise spend a dict entry per item on it."""

    __slots__ = ("_graph", "explicit")

    def __init__(self, graph: Graph, items: Mapping[str, str] | None = None) -> None:
        self._graph = graph
        self.explicit: dict[str, str] = {}
        if items:
            self.update(items)

    def _default(self, key: str) -> str | None:
        g = self._graph
        ent = g.entities.get(key)
        if ent is not None:
            return default_scope(ent.get("_type") if isinstance(ent, dict) else None)
        if key in g.relationships:
            return default_scope(g.relationships.type_of(key))
        return None  # no such item

    def __getitem__(self, key: str) -> str:
        scope = self.explicit.get(key)
        if scope is not None:
            return scope
        default = self._default(key)
        if default is None:
            raise KeyError(key)
        return default

    def __setitem__(self, key: str, scope: str) -> None:
        self._put(key, scope, self._default(key))

    def _put(self, key: str, scope: str, default: str | None) -> None:
        if scope == default:
            self.explicit.pop(key, None)
        else:
            self.explicit[key] = sys.intern(scope)

    def assign(self, keys_and_types: Iterable[tuple[str, str | None]], scope: str) -> None:
        """`scope` for many items at once, given their `_type`s (a default per type)."""
        defaults: dict[str | None, str] = {}
        for key, typ in keys_and_types:
            default = defaults.get(typ) or defaults.setdefault(typ, default_scope(typ))
            self._put(key, scope, default)

    def __delitem__(self, key: str) -> None:
        """Forget an explicit scope (an item in its type's scope has nothing to forget)."""
        self.explicit.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        g = self._graph
        yield from g.entities
        yield from g.relationships
        yield from (k for k in self.explicit if k not in g.entities and k not in g.relationships)

    def __len__(self) -> int:
        g = self._graph
        return sum(1 for _ in self) if self.explicit else len(g.entities) + len(g.relationships)

    def __repr__(self) -> str:
        return f"ScopeOf({len(self.explicit)} outside their type's scope)"


@dataclass
class Graph:
    """Entities and relationships (direct and mapped) by `_key`, with the scope of each."""

    entities: dict[str, Item] = field(default_factory=dict)
    relationships: Relationships = field(default_factory=Relationships)  # mapped: `_mapping`
    scope_of: ScopeOf = field(default=None)  # type: ignore[assignment]  # _key -> scope
    scopes: dict[str, ScopeStatus] = field(default_factory=dict)  # scope -> status

    def __post_init__(self) -> None:
        if not isinstance(self.relationships, Relationships):
            self.relationships = Relationships(self.relationships)
        given = self.scope_of
        self.scope_of = ScopeOf(self)
        if isinstance(given, ScopeOf):
            self.scope_of.explicit = dict(given.explicit)
        elif given:
            self.scope_of.update(given)

    def add_entity(self, entity: Item, scope: str) -> None:
        key = entity["_key"]
        self.entities[key] = entity
        self.scope_of[key] = scope

    def add_relationship(self, rel: Item, scope: str) -> None:
        key = rel["_key"]
        self.relationships[key] = rel
        self.scope_of[key] = scope

    def absorb(self, relationships: Relationships, scope: str) -> None:
        """Add every relationship of `relationships` (emptied) to `scope`."""
        self.scope_of.assign(((k, relationships.type_of(k)) for k in relationships), scope)
        self.relationships.absorb(relationships)

    def count_by_type(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in (*self.entities.values(), *self.relationships.values()):
            counts[item["_type"]] = counts.get(item["_type"], 0) + 1
        return dict(sorted(counts.items()))

    def export(self) -> dict[str, list[Item]]:
        """`{"entities", "relationships", "mappedRelationships"}` as JupiterOne writes them
        (relationships in `_key` order)."""
        rels = self.relationships
        ordered = [rels[k] for k in sorted(rels)]  # by `_key`: whatever order pages came in
        direct = [r for r in ordered if "_mapping" not in r]
        mapped = [r for r in ordered if "_mapping" in r]
        return {
            "entities": [export_value(e) for e in self.entities.values()],
            "relationships": direct,
            "mappedRelationships": mapped,
        }
