"""Diff: fingerprints by `_key` against the stored index, then field-level changes of the few
items whose significant content changed.

Fingerprints (see monitor.snapshot.store) are blake2b-64 of the canonical JSON (orjson,
sorted keys). The significant fingerprint leaves out `_rawData` and the type's volatile fields,
so a machine whose only change is `lastSeenOn` is rewritten in the store but never diffed or
reported. Field-level changes use DeepDiff with list order ignored.
"""

from __future__ import annotations

from collections.abc import (
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from itertools import groupby, islice
from typing import Any

import orjson
from deepdiff import DeepDiff

from monitor.config import DetectSettings
from monitor.model import schema
from monitor.model.graph import (
    Graph,
    Item,
    Relationships,
    canonical_print,
    default_scope,
    print_of,
)
from monitor.model.raw import canonical_json
from monitor.snapshot.store import Index, Prints

RAW_DATA = "_rawData"
_RAW_ONLY: frozenset[str] = frozenset({RAW_DATA})
COMPARE_CHUNK = 50_000  # items fingerprinted at a time
_NO_PRINTS: dict[str, bytes] = {}  # (never written: the table of a type not fetched)

Changes = dict[str, dict[str, Any]]  # dotted field path -> {old, new[, added, removed]}


def volatile_fields(detect: DetectSettings | None) -> dict[str, frozenset[str]]:
    """`_type` -> volatile fields: the schema's, replaced per type by `detect.volatile_fields`."""
    out = {e.type: frozenset(e.volatile) for e in schema.ENTITY_TYPES}
    if detect is not None and detect.volatile_fields:
        for typ, fields in detect.volatile_fields.items():
            out[typ] = frozenset(fields)
    return out


def ignored_fields(detect: DetectSettings | None) -> dict[str, frozenset[str]]:
    """`_type` -> fields left out of the significant fingerprint and the field diff."""
    return {t: v | _RAW_ONLY for t, v in volatile_fields(detect).items()}


def _significant(item: Item, ignored: Collection[str]) -> bytes:
    """The hash of the item without its ignored fields (the first half of a 16-byte print)."""
    kept = item.copy()
    for name in ignored:
        kept.pop(name, None)
    return print_of(canonical_json(kept))


def fingerprint(item: Item, ignored: Collection[str] = _RAW_ONLY) -> tuple[bytes, bytes]:
    """(fingerprint, canonical JSON) of one item; see monitor.snapshot.store for the format.

    `compare` computes the same prints in bulk."""
    body = canonical_json(item)
    full = print_of(body)
    if any(name in item for name in ignored):
        return _significant(item, ignored) + full, body
    return full, body


class Bodies(MutableMapping[str, bytes]):
    """`_key` -> stored form of the bodies a commit writes, made from the graph's item when
    read (canonical JSON, then `encode`): a first sync writes every item, and holding all their
    bodies until the commit was the sync's largest allocation. `every`: keys written without
    a table of their own (a first sync's: every fetched key). Values set explicitly are kept
    as given."""

    def __init__(
        self,
        graph: Graph,
        encode: Callable[[bytes], bytes] | None = None,
        every: AbstractSet[str] = frozenset(),
    ) -> None:
        self._graph = graph
        self._encode = encode
        self._every = every
        self._dropped: set[str] = set()  # of `every`
        self._keys: dict[str, bytes | None] = {}  # besides `every`

    def add(self, keys: Iterable[str]) -> None:
        """Write these items' bodies (made when read)."""
        self._keys.update(dict.fromkeys(k for k in keys if k not in self))

    def __getitem__(self, key: str) -> bytes:
        given = self._keys.get(key)
        if given is not None:
            return given
        if key not in self:
            raise KeyError(key)
        g = self._graph
        item = g.entities.get(key)
        body = canonical_json(item if item is not None else g.relationships[key])
        return self._encode(body) if self._encode is not None else body

    def __setitem__(self, key: str, body: bytes) -> None:
        if key in self._every:
            self._dropped.add(key)
        self._keys[key] = body

    def __delitem__(self, key: str) -> None:
        if key in self._keys:
            del self._keys[key]
        elif key in self._every and key not in self._dropped:
            self._dropped.add(key)
        else:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys or (key in self._every and key not in self._dropped)

    def __iter__(self) -> Iterator[str]:
        dropped = self._dropped
        yield from (k for k in self._every if k not in dropped)
        yield from self._keys

    def __len__(self) -> int:
        return len(self._every) - len(self._dropped) + len(self._keys)


@dataclass
class Comparison:
    """Fresh items compared with the stored index, by `_key`."""

    fresh: Prints  # scope -> _type -> _key -> fingerprint, for every fetched item
    # bodies of fetched items that are new or whose body changed: canonical JSON, or its stored
    # form when compare() was given the store's encoder (made when read)
    bodies: Bodies
    added: AbstractSet[str]  # fetched, not in the stored snapshot
    changed: set[str]  # stored and fetched, significant content differs
    missing: list[tuple[str, str, str]]  # (key, stored scope, _type): stored, not fetched
    # the stored index's items by scope and _type (None: no snapshot yet)
    previous_counts: dict[str, dict[str, int]] | None
    previous_fp: dict[str, bytes] = field(default_factory=dict)  # missing _key -> stored print


def _check_items(keys: list[str], items: list[Item]) -> None:
    """Every item is a dict with a string `_type` and its own `_key` that JSON can hold (else:
    ValueError naming the first bad one)."""
    bad = [(i, w) for i, it in enumerate(items) if (w := _wrong(keys[i], it)) is not None]
    if bad:
        i, what = bad[0]
        raise ValueError(f"graph item {keys[i]!r} {what} ({len(bad)} bad item(s))")


def _wrong(key: str, it: object) -> str | None:
    """What is wrong with one item (None: nothing)."""
    if not isinstance(it, dict):
        return f"is a {type(it).__name__}, not an object"
    if not isinstance(it.get("_type"), str):
        return "has no string _type"
    if it.get("_key") != key:
        return f"has _key {it.get('_key')!r}"
    try:
        canonical_json(it)
    except TypeError as exc:  # orjson.JSONEncodeError: e.g. an integer beyond 64 bits
        return f"cannot be stored as JSON: {exc}"
    return None


def _fingerprints(items: list[Item]) -> list[bytes]:
    """Full-body fingerprints (the JSON is not kept: bodies are made again when written)."""
    return list(map(canonical_print, items))


def _runs(labels: Iterable[Any]) -> Iterator[tuple[Any, int, int]]:
    """(label, start, end) of each run of equal labels: items come in runs of one scope and
    type (collectors add them resource by resource), so work is done a run at a time."""
    start = 0
    for label, group in groupby(labels):
        end = start + sum(1 for _ in group)
        yield label, start, end
        start = end


def _prefix_significant(
    types: list[str],
    fps: list[bytes],
    ignored: Mapping[str, frozenset[str]],
    fields: Callable[[int], Collection[str]],
    item: Callable[[int], Item],
) -> None:
    """Prefix each item's significant fingerprint when it carries ignored fields (`fps` is
    updated in place), a run of one type at a time. `fields(i)` names item i's fields,
    `item(i)` is the item (built only when its significant print is needed)."""
    for typ, start, end in _runs(types):
        ign = ignored.get(typ, _RAW_ONLY)
        need: set[int] = set()
        for name in ign:
            need.update(i for i in range(start, end) if name in fields(i))
        for i in need:  # significant hash first, then the full one
            fps[i] = _significant(item(i), ign) + fps[i]


def _chunk(
    collection: Mapping[str, Item], keys: list[str], ignored: Mapping[str, frozenset[str]]
) -> tuple[list[bytes], list[str], list[tuple[str, bytes]]]:
    """The prints and `_type`s of one chunk of a collection, and (key, print) of those whose
    print is not their row's. Relationships kept as rows give their type, print and fields
    without being built; other items are built and fingerprinted (a malformed one raises
    ValueError naming it)."""
    rows = collection.rows(keys) if isinstance(collection, Relationships) else None
    built = {i: collection[keys[i]] for i in range(len(keys)) if rows is None or rows[i] is None}
    items = list(built.values())
    try:
        made = iter(_fingerprints(items))
        typed = iter([it["_type"] for it in items])
    except (KeyError, TypeError, AttributeError, orjson.JSONEncodeError):
        _check_items([keys[i] for i in built], items)  # raises a clear ValueError naming it
        raise
    fps: list[bytes] = []
    types: list[str] = []
    for i in range(len(keys)):
        row = None if rows is None else rows[i]
        fps.append(next(made) if row is None else row[1])
        types.append(next(typed) if row is None else row[0])

    def fields(i: int) -> Collection[str]:
        row = None if rows is None else rows[i]
        return built[i] if row is None else row[2]

    def item(i: int) -> Item:
        return built[i] if i in built else collection[keys[i]]

    _prefix_significant(types, fps, ignored, fields, item)
    if rows is None:
        return fps, types, list(zip(keys, fps, strict=True))
    return (
        fps,
        types,
        [
            (k, fp)
            for k, fp, row in zip(keys, fps, rows, strict=True)
            if row is None or fp is not row[1]
        ],
    )


def _index_all(graph: Graph, own: Mapping[str, bytes], fresh: Prints) -> None:
    """`fresh[scope][_type][_key]` = print of every fetched item: the print in `own`, else its
    row's. A chunk of keys at a time, in graph order."""
    explicit = graph.scope_of.explicit  # the rest are in their type's scope
    defaults: dict[str, str] = {}

    def put(keys: list[str], types: list[str], fps: list[bytes]) -> None:
        """One C-level update per run of one scope and type, not an insert per item."""
        for t in set(types) - defaults.keys():
            defaults[t] = default_scope(t)
        scopes = [explicit.get(k) or defaults[t] for k, t in zip(keys, types, strict=True)]
        for (scope, typ), start, end in _runs(zip(scopes, types, strict=True)):
            bucket = fresh.setdefault(scope, {}).setdefault(typ, {})
            bucket.update(zip(keys[start:end], fps[start:end], strict=True))

    pending_entities = iter(graph.entities.items())
    while chunk := list(islice(pending_entities, COMPARE_CHUNK)):
        keys = [k for k, _ in chunk]
        put(keys, [e["_type"] for _, e in chunk], list(map(own.__getitem__, keys)))
    pending = graph.relationships.entries()
    get = own.get
    while entries := list(islice(pending, COMPARE_CHUNK)):
        keys = [k for k, _ in entries]
        types = [e[0].typ if isinstance(e, tuple) else e["_type"] for _, e in entries]
        fps = [get(k) or e[1] if isinstance(e, tuple) else own[k] for k, e in entries]
        put(keys, types, fps)


class _Fetched(AbstractSet[str]):
    """The key of every fetched item, read from the graph: a first sync's `added`, and the
    bodies its commit writes (all of them, with no table of their own)."""

    def __init__(self, graph: Graph) -> None:
        self._graph = graph

    def __contains__(self, key: object) -> bool:
        return key in self._graph.entities or key in self._graph.relationships

    def __iter__(self) -> Iterator[str]:
        yield from self._graph.entities
        yield from self._graph.relationships

    def __len__(self) -> int:
        return len(self._graph.entities) + len(self._graph.relationships)


def compare(
    graph: Graph,
    previous: Index | Iterable[Index] | None,
    ignored: Mapping[str, frozenset[str]],
    encode: Callable[[bytes], bytes] | None = None,
) -> Comparison:
    """Fingerprint every fetched item and classify it against the stored index.

    `previous` is the stored index, whole or as a sequence of parts (each a partial index, read
    one at a time: the stored keys and prints are never all in memory at once); None when
    there is no snapshot yet. `encode` turns the canonical JSON of a body to write into its
    stored form (the snapshot store's compression); bodies are made when the commit reads
    them (see Bodies).

    Written as comprehensions and tight loops over whole collections: this runs over millions
    of items and its per-item cost is the diff's cost. A malformed item (no `_type`, not an
    object) raises ValueError naming it.
    """
    # Every print by key, met against the stored index, then the new index: the key -> print
    # tables and the index are never both whole (the tables shrink to the items the stored
    # index did not have before the index is built; a first sync has no table at all). A
    # table per `_type`: one table of every key grows by doubling, and its last doubling held
    # the old and the new table at once (~250 MB at 3.3M items; per type, the pairs' ~85 MB).
    fresh_fp: dict[str, dict[str, bytes]] = {}  # _type -> fetched _key -> print; met ones leave
    own: dict[str, bytes] = {}  # prints not held by a row (entities, mapped relationships)
    for collection in (graph.entities, graph.relationships):
        pending = iter(collection)  # a chunk of keys at a time, not a list of them all
        while keys := list(islice(pending, COMPARE_CHUNK)):
            fps, types, not_rows = _chunk(collection, keys, ignored)
            own.update(not_rows)
            if previous is not None:
                _by_type(fresh_fp, keys, types, fps)
    fresh: Prints = {}
    if previous is None:  # a first sync: every fetched item is new, and written
        _index_all(graph, own, fresh)
        fetched = _Fetched(graph)
        return Comparison(fresh, Bodies(graph, encode, fetched), fetched, set(), [], None)
    cmp = Comparison(fresh, Bodies(graph, encode), set(), set(), [], {})
    rewrite: list[str] = []
    for part in [previous] if isinstance(previous, dict) else previous:
        _compare_part(graph, part, fresh_fp, cmp, rewrite)
    added: dict[str, bytes] = {}  # fetched, never met in the stored index (a table of their own)
    for unmet in fresh_fp.values():
        added.update(unmet)
    del fresh_fp
    _index_all(graph, own, fresh)
    cmp.added = added.keys()
    cmp.bodies.add(rewrite)
    cmp.bodies.add(added)
    return cmp


def _by_type(
    fresh_fp: dict[str, dict[str, bytes]], keys: list[str], types: list[str], fps: list[bytes]
) -> None:
    """Add (key, print) pairs to the table of their `_type`, a run of one type at a time."""
    for typ, start, end in _runs(types):
        table = fresh_fp.setdefault(typ, {})
        table.update(zip(keys[start:end], fps[start:end], strict=True))


def _pop_moved(fresh_fp: dict[str, dict[str, bytes]], key: str) -> bytes | None:
    """The fresh print of a key fetched as another `_type` than it was stored as (taken out)."""
    for table in fresh_fp.values():
        fp = table.pop(key, None)
        if fp is not None:
            return fp
    return None


def _compare_part(
    graph: Graph,
    part: Index,
    fresh_fp: dict[str, dict[str, bytes]],
    cmp: Comparison,
    rewrite: list[str],
) -> None:
    """Classify one part of the stored index: changed, rewritten (any print differs), or
    missing (stored, not fetched: kept with its print); met keys leave `fresh_fp`. Stored
    prints are hex: the first 16 characters are the significant hash when there are 32."""
    ents, rels = graph.entities, graph.relationships
    counts = cmp.previous_counts
    assert counts is not None
    changed, missing, missing_fp = cmp.changed, cmp.missing, cmp.previous_fp
    for scope, types in part.items():
        by_type = counts.setdefault(scope, {})
        for typ, items_by_key in types.items():
            by_type[typ] = by_type.get(typ, 0) + len(items_by_key)
            pop = fresh_fp.get(typ, _NO_PRINTS).pop
            for key, old in items_by_key.items():
                new = pop(key, None)
                if new is None:
                    if key not in ents and key not in rels:
                        missing.append((key, scope, typ))
                        missing_fp[key] = bytes.fromhex(old)  # as the new index holds it
                        continue
                    new = _pop_moved(fresh_fp, key)  # fetched as another `_type`
                    if new is None:
                        continue
                hexed = new.hex()
                if hexed != old:
                    rewrite.append(key)
                    if old[:16] != hexed[:16]:
                        changed.add(key)


# -- field-level changes ---------------------------------------------------------------------


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _get(obj: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _list_membership(old: Any, new: Any) -> dict[str, Any] | None:
    """added/removed members when both sides are (absent or) lists of scalars."""
    if not (isinstance(old, list) or isinstance(new, list)):
        return None
    o = old if isinstance(old, list) else ([] if old is None else None)
    n = new if isinstance(new, list) else ([] if new is None else None)
    if o is None or n is None or not all(_is_scalar(x) for x in (*o, *n)):
        return None
    try:
        o_set, n_set = set(o), set(n)
    except TypeError:
        return None
    return {
        "added": [x for x in dict.fromkeys(n) if x not in o_set],
        "removed": [x for x in dict.fromkeys(o) if x not in n_set],
    }


def field_changes(old: Item, new: Item, ignored: Collection[str] = _RAW_ONLY) -> Changes:
    """Changed fields by dotted path: `{old, new}`, plus `added`/`removed` for scalar lists.

    Ignored fields (`_rawData`, volatile ones) and the order of list members are left out;
    nested objects are compared with DeepDiff and reported per leaf (`vmMetadata.vmId`); a
    change inside a list of objects is reported on the list as a whole. A field that is
    absent counts as null.
    """
    changes: Changes = {}
    for name in sorted((old.keys() | new.keys()) - set(ignored)):
        ov, nv = old.get(name), new.get(name)
        if ov == nv:
            continue
        if _is_scalar(ov) and _is_scalar(nv):
            changes[name] = {"old": ov, "new": nv}
            continue
        members = _list_membership(ov, nv)
        if members is not None:
            if members["added"] or members["removed"]:
                changes[name] = {"old": ov, "new": nv, **members}
            continue
        changes.update(_nested_changes(name, ov, nv))
    return changes


def _nested_changes(name: str, ov: Any, nv: Any) -> Changes:
    """DeepDiff of one non-scalar field, as dotted leaf paths under `name`."""
    dd = DeepDiff({name: ov}, {name: nv}, ignore_order=True, view="tree", verbose_level=0)
    paths: dict[str, list[str]] = {}
    for report in dd.values():
        for level in report:
            parts: list[str] = []
            for p in level.path(output_format="list"):
                if not isinstance(p, str):
                    break  # a list position: report the list as a whole
                parts.append(p)
            if parts:
                paths.setdefault(".".join(parts), parts)
    out: Changes = {}
    root = {name: ov}, {name: nv}
    for dotted in sorted(paths):
        if any(dotted.startswith(p + ".") for p in paths if p != dotted):
            continue  # a parent path already covers it
        parts = paths[dotted]
        out[dotted] = {"old": _get(root[0], parts), "new": _get(root[1], parts)}
    return out


# -- derived transitions ---------------------------------------------------------------------

HEALTH_BAD = frozenset({"Inactive", "NoSensorData", "ImpairedCommunication"})
EXPLOIT_FIELDS = ("publicExploit", "public")


@dataclass(frozen=True)
class Transition:
    """A derived event: its type suffix (`risk_raised`) and the fields that made it."""

    change: str
    fields: tuple[str, ...]


def _level_move(changes: Changes, name: str, up: str, down: str) -> Transition | None:
    c = changes.get(name)
    if c is None:
        return None
    a, b = schema.level_rank(c["old"]), schema.level_rank(c["new"])
    if a is None or b is None or a == b:
        return None
    return Transition(up if b > a else down, (name,))


def transitions(short: str, changes: Changes) -> list[Transition]:
    """Derived events for an updated entity of schema short name `short`."""
    out: list[Transition] = []
    if short == schema.MACHINE.short:
        h = changes.get("healthStatus")
        if h is not None:
            if h["new"] in HEALTH_BAD:
                out.append(Transition("health_degraded", ("healthStatus",)))
            elif h["new"] == "Active" and h["old"] is not None:
                out.append(Transition("health_recovered", ("healthStatus",)))
        for name, up, down in (
            ("riskScore", "risk_raised", "risk_lowered"),
            ("exposureLevel", "exposure_raised", "exposure_lowered"),
        ):
            t = _level_move(changes, name, up, down)
            if t is not None:
                out.append(t)
        if "onboardingStatus" in changes:
            out.append(Transition("onboarding_changed", ("onboardingStatus",)))
        if "defenderAvStatus" in changes:
            out.append(Transition("av_status_changed", ("defenderAvStatus",)))
        if "machineTags" in changes:
            out.append(Transition("tags_changed", ("machineTags",)))
    elif short == schema.USER.short:
        c = changes.get("accountEnabled")
        if c is not None and c["old"] is True and c["new"] is False:
            out.append(Transition("disabled", ("accountEnabled",)))
        elif c is not None and c["old"] is False and c["new"] is True:
            out.append(Transition("enabled", ("accountEnabled",)))
    elif short == schema.VULNERABILITY.short:
        for name in EXPLOIT_FIELDS:
            c = changes.get(name)
            if c is not None and c["old"] is False and c["new"] is True:
                out.append(Transition("exploit_published", (name,)))
                break
    return out
