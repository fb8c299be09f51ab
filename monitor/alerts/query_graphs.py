"""The query graph a query-rule evaluation runs on, and the change sets that keep it current.

Two ways to the committed snapshot's graph:
- `after_commit`: in the process that just committed (the fetched items are in memory); it
  updates this process's graph of the previous generation, when it has it.
- `latest`: in the query evaluator (queue `query`, one long-lived process that keeps every
  tenant's graph warm, wherever the syncs ran). The graph it holds is advanced to the committed
  generation with the change sets the syncs stored (`save_change_set`), one or several in a row;
  without them (expired, too big to store, a restart) it is read whole from Redis.

Either way the caller also gets a `GraphDelta` (how the graph differs from the generation
before) when the update was incremental, so rules can re-match only what changed.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import redis

from monitor.memory import gc_paused
from monitor.model.graph import Graph, Item, Relationships
from monitor.query import QueryError
from monitor.query.graph import (
    RAW_DATA,
    QueryGraph,
    cached_query_graph,
    drop_query_graph,
    load_query_graph,
    split_items,
    store_query_graph,
)
from monitor.query.incremental import GraphDelta
from monitor.snapshot.store import Prints, SnapshotStore

if TYPE_CHECKING:
    from monitor.snapshot.commit import CommitResult

CHANGES_TTL_S = 2 * 86_400  # an evaluator away for longer rebuilds from the snapshot
MAX_CHAIN = 16  # change sets applied in a row before a whole rebuild is cheaper
CHANGE_SET_VERSION = 3
# a commit that rewrote more than this share of the snapshot is cheaper to rebuild than to apply
MAX_CHANGED_SHARE = 4
# a quiet item's new values of its volatile fields, and the volatile fields it no longer has
Patch = tuple[dict[str, Any], list[str]]


def changes_key(prefix: str, tenant: str, generation: int) -> str:
    """The change set that took the tenant's snapshot to `generation` (compressed JSON)."""
    return f"{prefix}:qrules:{tenant}:changes:{generation}"


@dataclass
class ChangeSet:
    """What one commit (or several in a row, combined) changed, by item key."""

    previous: int  # the generation the set applies to
    generation: int  # the generation it leads to
    written: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    quiet: set[str] = field(default_factory=set)  # written, changed in `ignored` fields only
    ignored: dict[str, frozenset[str]] = field(default_factory=dict)  # _type -> fields
    # the events the query graph's change facts fold in (`_beginOn`, CHANGED ... SINCE)
    facts: list[dict[str, Any]] = field(default_factory=list)
    # quiet keys' new `ignored` field values ({field: value}, [fields now absent]): applied to
    # the kept item instead of reading its whole body back
    patches: dict[str, Patch] = field(default_factory=dict)
    # types whose volatile-only changes the set leaves out (no rule reads those types)
    stale: set[str] = field(default_factory=set)

    def then(self, nxt: ChangeSet) -> ChangeSet:
        """This set followed by `nxt` (which must start where this one ends), as one set."""
        if nxt.previous != self.generation:
            raise ValueError(f"change set {nxt.generation} does not follow {self.generation}")
        written = (self.written - nxt.deleted) | nxt.written
        # quiet only if every write in the chain was quiet
        quiet = (self.quiet - nxt.deleted - (nxt.written - nxt.quiet)) | (
            nxt.quiet - (self.written - self.quiet)
        )
        quiet &= written
        patches: dict[str, Patch] = {}
        for k in quiet:
            first, then = self.patches.get(k), nxt.patches.get(k)
            if k in self.quiet and k in nxt.quiet and first is not None and then is not None:
                values = {**first[0], **then[0]}
                for name in then[1]:
                    values.pop(name, None)
                patches[k] = (values, sorted(set(first[1]) - then[0].keys() | set(then[1])))
            elif k in nxt.quiet and k not in self.written and then is not None:
                patches[k] = then
            elif k in self.quiet and k not in nxt.written and first is not None:
                patches[k] = first
        return ChangeSet(
            previous=self.previous,
            generation=nxt.generation,
            written=written,
            deleted=(self.deleted - nxt.written) | nxt.deleted,
            quiet=quiet,
            ignored=nxt.ignored,
            facts=self.facts + nxt.facts,
            patches=patches,
            stale=self.stale | nxt.stale,
        )

    def items(self, store: SnapshotStore, tenant: str, graph: QueryGraph) -> dict[str, Item]:
        """The written items at the set's generation: quiet ones patched from `graph`'s, the
        others read from the store."""
        out: dict[str, Item] = {}
        ents, rels = graph.entities, graph.relationships
        read = [k for k in self.written if k not in self.patches]
        for k, (values, absent) in self.patches.items():
            kept = ents.get(k) or rels.get(k)
            if kept is None:
                read.append(k)
                continue
            item = {**kept, **values}
            for name in absent:
                item.pop(name, None)
            out[k] = item
        bodies = store.load_bodies(tenant, read)
        if not graph.raw:
            for body in bodies.values():
                body.pop(RAW_DATA, None)
        out.update(bodies)
        return out


def _fact(ev: Mapping[str, Any]) -> dict[str, Any] | None:
    """The part of an event the change facts read (type, time, subject, changed fields)."""
    typ = str(ev.get("type", ""))
    if typ != "mde.sync.baseline" and not typ.endswith((".created", ".updated")):
        return None
    data = ev.get("data")
    changes = data.get("changes") if isinstance(data, dict) else None
    names = sorted(changes) if isinstance(changes, dict) else []
    return {
        "type": typ,
        "time": ev.get("time"),
        "subject": ev.get("subject"),
        "data": {"changes": dict.fromkeys(names, True)},
    }


def _quiet(
    result: CommitResult, fetched: Graph | None, types: frozenset[str] | None
) -> tuple[dict[str, Patch | None], set[str]]:
    """The quiet writes to carry - key -> the new values of its type's `ignored` fields (None:
    read its body back) - and the types whose quiet writes are left out (not in `types`, the
    entity types the rules read; None: all are read).

    `_rawData` (the whole source object, as big as the item) is not carried: a patched item
    drops it. Queries cannot read it (the planner refuses it) and rule events leave it out."""
    if fetched is None:
        return dict.fromkeys(result.quiet_keys), set()
    fields = {  # _type -> (fields with a value to carry, all of them)
        t: (tuple(sorted(names - {RAW_DATA})), tuple(sorted(names)))
        for t, names in result.ignored.items()
    }
    ents, rels = fetched.entities, fetched.relationships
    out: dict[str, Patch | None] = {}
    stale: set[str] = set()
    for k in result.quiet_keys:
        item = ents.get(k) or rels.get(k)
        if item is None:
            out[k] = None
            continue
        typ = item.get("_type", "")
        if types is not None and typ not in types:
            stale.add(typ)
            continue
        spec = fields.get(typ)
        if spec is None:
            out[k] = None
            continue
        values = {n: item[n] for n in spec[0] if n in item}
        out[k] = (values, [n for n in spec[1] if n not in values])
    return out, stale


def save_change_set(
    client: redis.Redis,
    prefix: str,
    result: CommitResult,
    fetched: Graph | None = None,
    types: frozenset[str] | None = None,
) -> bool:
    """Store the commit's change set for the query evaluator; False when there is none worth
    storing (a baseline, a failed sync, or a commit that rewrote much of the snapshot).

    With the `fetched` graph, quiet items are stored as patches of their volatile fields, and
    those of types outside `types` (the entity types the tenant's rules read) are left out."""
    if result.status == "failed" or result.baseline or not result.previous_generation:
        return False
    total = sum(result.counts.values())
    if (len(result.written_keys) + len(result.deleted_keys)) * MAX_CHANGED_SHARE > total:
        return False
    quiet, stale = _quiet(result, fetched, types)
    doc = {  # each key once: loud writes, quiet writes (with their patch, or null), deletions
        "v": CHANGE_SET_VERSION,
        "previous": result.previous_generation,
        "generation": result.generation,
        "loud": list(set(result.written_keys) - result.quiet_keys),
        "quiet": quiet,
        "stale": sorted(stale),
        "deleted": result.deleted_keys,
        "ignored": {t: sorted(f) for t, f in result.ignored.items()},
        "facts": [f for f in map(_fact, result.events) if f is not None],
    }
    blob = zlib.compress(orjson.dumps(doc), 1)
    client.set(changes_key(prefix, result.tenant, result.generation), blob, ex=CHANGES_TTL_S)
    return True


def load_change_set(
    client: redis.Redis, prefix: str, tenant: str, generation: int
) -> ChangeSet | None:
    """The stored change set that led to `generation`, or None (none stored, or unreadable)."""
    raw: Any = client.get(changes_key(prefix, tenant, generation))
    if not raw:
        return None
    try:
        doc = orjson.loads(zlib.decompress(raw))
        if doc.get("v") != CHANGE_SET_VERSION or doc.get("generation") != generation:
            return None
        quiet: dict[str, Any] = doc["quiet"]
        return ChangeSet(
            previous=int(doc["previous"]),
            generation=generation,
            written={*doc["loud"], *quiet},
            deleted=set(doc["deleted"]),
            quiet=set(quiet),
            ignored={t: frozenset(f) for t, f in doc["ignored"].items()},
            facts=list(doc["facts"]),
            patches={k: (p[0], p[1]) for k, p in quiet.items() if p is not None},
            stale=set(doc["stale"]),
        )
    except (zlib.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def change_chain(
    client: redis.Redis, prefix: str, tenant: str, since: int, until: int
) -> ChangeSet | None:
    """The stored change sets from generation `since` to `until`, combined; None when one is
    missing or the chain is longer than MAX_CHAIN."""
    if until <= since:
        return None
    found: list[ChangeSet] = []
    gen = until
    while gen != since:
        if len(found) >= MAX_CHAIN:
            return None
        cs = load_change_set(client, prefix, tenant, gen)
        if cs is None or cs.previous >= gen or cs.previous < since:
            return None
        found.append(cs)
        gen = cs.previous
    combined = found.pop()
    while found:
        combined = combined.then(found.pop())
    return combined


def _bodies(
    store: SnapshotStore, tenant: str, keys: Iterable[str], fetched: Graph
) -> dict[str, Item]:
    """Items by key: the fetched ones, the rest (carried over) read from the store."""
    ents, rels = fetched.entities, fetched.relationships
    out: dict[str, Item] = {}
    missing: list[str] = []
    for k in keys:
        item = ents.get(k) or rels.get(k)
        if item is None:
            missing.append(k)
        else:
            out[k] = item
    if missing:
        out.update(store.load_bodies(tenant, missing))
    return out


def _advance(
    store: SnapshotStore, cached: QueryGraph, cs: ChangeSet, items: dict[str, Item]
) -> tuple[QueryGraph, GraphDelta]:
    """`cached` moved to the change set's generation (copy-on-write), with its change facts."""
    ignored: Mapping[str, frozenset[str]] = cs.ignored
    quiet = frozenset(cs.quiet)
    qg = cached.updated(cs.generation, items, cs.deleted, quiet, ignored, cs.stale)
    if cached.changes is not None:  # fold the new events into the known facts
        facts = cached.changes
        for ev in cs.facts:
            facts.add(ev)
        for k, item in items.items():
            if k in qg.entities:
                facts.stamp(k, item)
        qg.changes = facts
    store_query_graph(store.client, store.prefix, qg)
    return qg, GraphDelta(cached, qg, frozenset(cs.written | cs.deleted), quiet, ignored)


def reads_stale(types: frozenset[str] | None, stale: Collection[str]) -> bool:
    """Do rules reading `types` (None: any) read one of the `stale` types, whose volatile-only
    changes were left out of a graph or change set?"""
    return bool(stale) and (types is None or not types.isdisjoint(stale))


def _small(cs: ChangeSet, graph: QueryGraph) -> bool:
    n = len(cs.written) + len(cs.deleted)
    return n * MAX_CHANGED_SHARE <= len(graph.entities) + len(graph.relationships)


@gc_paused()
def after_commit(
    store: SnapshotStore,
    tenant: str,
    result: CommitResult,
    fetched: Graph | None,
    types: frozenset[str] | None = None,
) -> tuple[QueryGraph, GraphDelta | None]:
    """The committed snapshot as a QueryGraph, without re-reading what is in memory, and how it
    differs from the previous generation's (None when that is not known).

    With the previous generation's graph cached in this process, only the items the commit
    wrote or deleted are swapped in (copy-on-write); otherwise (or when that graph is stale in
    `types`, the entity types the rules read) the graph is built from the fetched items plus
    the carried-over ones read from Redis.

    Takes `result.index` (it is None afterwards): a big tenant's index is let go once the
    committed items are picked, before the graph's adjacency is built (at 3.3M items, ~150 MB
    that would otherwise peak with it).
    """
    index, result.index = result.index, None
    if index is None or fetched is None:
        qg = load_query_graph(store.client, store.prefix, tenant)
        if qg is None:
            raise QueryError(f"tenant {tenant!r} has no snapshot", 0, 0)
        return qg, None
    cached = cached_query_graph(store.client, store.prefix, tenant)
    if cached is not None and reads_stale(types, cached.stale_types):
        cached = None
    if (
        cached is not None
        and result.previous_generation
        and cached.generation == result.previous_generation
    ):
        cs = ChangeSet(
            previous=result.previous_generation,
            generation=result.generation,
            written=set(result.written_keys),
            deleted=set(result.deleted_keys),
            quiet=set(result.quiet_keys),
            ignored=dict(result.ignored),
            facts=[f for f in map(_fact, result.events) if f is not None],
        )
        if _small(cs, cached):
            return _advance(store, cached, cs, _bodies(store, tenant, result.written_keys, fetched))
        del cs  # (a big tenant's baseline writes every key: not held while the graph is built)
    entities, relationships = _committed(store, tenant, index, fetched)
    del index
    qg = QueryGraph.from_items(tenant, result.generation, entities, relationships)
    store_query_graph(store.client, store.prefix, qg)
    return qg, None


def _committed(
    store: SnapshotStore, tenant: str, index: Prints, fetched: Graph
) -> tuple[list[Item], Relationships]:
    """The committed items: the fetched ones the index holds, and the ones it kept without
    fetching them read from Redis. The fetched graph's relationships are taken over (see
    `QueryGraph.from_items`) when the index holds them all - the usual case - so a big tenant's
    rows are not copied; otherwise the held ones are copied."""
    ents, rels, scope_of = fetched.entities, fetched.relationships, fetched.scope_of
    total = 0
    carried: list[str] = []  # kept, not fetched
    for types in index.values():
        for by_key in types.values():
            total += len(by_key)
            carried += [k for k in by_key if k not in ents and k not in rels]

    def held(key: str, typ: Any) -> bool:  # (a tenant has a logon-user scope per machine)
        return key in index.get(scope_of.get(key, ""), {}).get(typ, {})

    entities = [e for k, e in ents.items() if held(k, e.get("_type"))]
    if total - len(carried) - len(entities) == len(rels):
        relationships = rels
    else:
        relationships = Relationships(prints=False)
        for k, entry in rels.entries():
            if held(k, rels.type_of(k)):
                relationships.put_entry(k, entry)
    if carried:
        more_ents, more_rels = split_items(store.load_bodies(tenant, carried).values())
        entities += more_ents
        for r in more_rels:
            relationships[r["_key"]] = r
    return entities, relationships


@gc_paused()
def latest(
    store: SnapshotStore, tenant: str, types: frozenset[str] | None = None
) -> tuple[QueryGraph, GraphDelta | None]:
    """The tenant's committed snapshot as a QueryGraph, good for rules reading `types` (the
    entity types; None: any): this process's graph advanced by the stored change sets when it
    holds an earlier generation and they are all there, else read whole. The delta is None
    unless the graph was advanced."""
    client, prefix = store.client, store.prefix
    for _attempt in range(3):
        gen = store.generation(tenant)
        if not gen:
            break
        cached = cached_query_graph(client, prefix, tenant)
        if cached is None or reads_stale(types, cached.stale_types) or cached.generation > gen:
            break
        if cached.generation == gen:
            return cached, None
        cs = change_chain(client, prefix, tenant, cached.generation, gen)
        if cs is None or not _small(cs, cached) or reads_stale(types, cs.stale):
            break  # (stale: a set stored for other rules, which changed since)
        items = cs.items(store, tenant, cached)
        if store.generation(tenant) != gen:  # a commit landed while the bodies were read
            continue
        if len(items) != len(cs.written):
            break  # not the snapshot the change set describes: read it whole
        return _advance(store, cached, cs, items)
    drop_query_graph(client, prefix, tenant)
    qg = load_query_graph(client, prefix, tenant, keep_raw=False)
    if qg is None:
        raise QueryError(f"tenant {tenant!r} has no snapshot", 0, 0)
    return qg, None
