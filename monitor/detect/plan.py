"""Merge: the effective new snapshot from the stored one and a fetch with scope statuses.

Nothing is invented and nothing is deleted on incomplete evidence:

- A COMPLETE scope is the truth: its stored items that were not fetched are deleted.
- A FAILED or SKIPPED scope keeps every stored item (no deletion); items fetched for it before
  the failure are taken as they are (added or updated).
- A scope without a status is SKIPPED when nothing was fetched for it; a non-logon-user scope
  without a status but with fetched items is treated as FAILED (kept, degraded).
- Logon users: scope `logon_users:<machine id>` per machine. A logon-user ENTITY exists while at
  least one machine HAS it after the merge (kept from the store when only kept relationships
  reference it; dropped when nothing does).
- Kept relationships whose source or target entity is gone after the merge (e.g. the machine was
  deleted by a complete machines fetch while its vulnerabilities or logon users were not fetched)
  are dropped silently.
- A scope never fetched completely before is a BASELINE scope: its items are stored without
  created/deleted events. The first sync of a tenant is a baseline for every scope.
- The deletion guard (monitor.detect.guard) may hold the deletions of a type.
- The sync is degraded when a scope FAILED, was SKIPPED with an error, or a drop was held.
  Budget skips of logon users (SKIPPED, no error) are normal: kept, not degraded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field

from monitor.config import DetectSettings
from monitor.detect import guard
from monitor.detect.diff import Comparison
from monitor.model import schema
from monitor.model.graph import Graph, ScopeState, ScopeStatus
from monitor.snapshot.store import Prints

LOGON_PREFIX = schema.SCOPE_LOGON_USERS + ":"
LOGON_USER_TYPE = schema.LOGON_USER.type
LOGON_REL_TYPE = schema.MACHINE_HAS_LOGON_USER.type
# relationships FROM a logon user (identity mapping): they follow the logon user's existence,
# which is only decided in step 4 (a kept logon user is not yet among the kept entities in step 3)
LOGON_SOURCED_TYPES = frozenset({schema.LOGON_USER_IS_USER.type})
_DIRECT_REL_TYPES = {r.type for r in schema.RELATIONSHIP_TYPES}
_MAPPED_REL_TYPES = {m.type for m in schema.MAPPED_RELATIONSHIP_TYPES}


def rel_endpoints(key: str, typ: str) -> tuple[str | None, str | None]:
    """(source key, target key) of a relationship from its `_key` (target None when mapped)."""
    if typ in _MAPPED_REL_TYPES:
        return key.split("|", 1)[0], None
    if typ in _DIRECT_REL_TYPES:
        parts = key.split("|")
        if len(parts) == 3:
            return parts[0], parts[2]
    return None, None


def logon_scope_machine(scope: str) -> str | None:
    """The machine id of a `logon_users:<machine id>` scope."""
    return scope[len(LOGON_PREFIX) :] if scope.startswith(LOGON_PREFIX) else None


@dataclass
class MergePlan:
    """What the commit writes, and what the events are built from."""

    index: Prints  # the effective new index (scope -> _type -> _key -> fingerprint)
    write: MutableMapping[str, bytes]  # bodies to (re)write
    delete: list[str]  # keys to remove from the store
    created: list[str]  # items new in the snapshot, outside baseline scopes
    updated: list[str]  # items whose significant content changed
    deleted: list[tuple[str, str]]  # (key, _type) removed, outside baseline scopes
    kept: dict[str, int]  # _type -> stored items carried over (not fetched)
    incomplete: dict[str, ScopeStatus]  # scope -> status of degrading scopes
    baseline: bool  # first sync of the tenant
    baseline_scopes: list[str]  # scopes seen complete for the first time, or new and incomplete
    baseline_counts: dict[str, int]  # _type -> items in baseline scopes
    known_scopes: set[str]  # after this sync
    drops: dict[str, guard.DropDecision]
    guard_counts: dict[str, int]
    scope_states: dict[str, ScopeStatus] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return bool(self.incomplete) or any(d.held for d in self.drops.values())

    def item_counts(self) -> dict[str, int]:
        """`_type` -> items in the new snapshot."""
        return _count_types(self.index)


def scope_state(graph: Graph, cmp: Comparison, scope: str) -> ScopeStatus:
    """The status of `scope` in this sync, filling in unreported ones (see module doc)."""
    status = graph.scopes.get(scope)
    if status is not None:
        return status
    if scope in cmp.fresh:
        return ScopeStatus(ScopeState.FAILED, 0, "scope status not reported by the collector")
    if scope.startswith(LOGON_PREFIX):
        return ScopeStatus(ScopeState.SKIPPED, 0, None)
    return ScopeStatus(ScopeState.SKIPPED, 0, "not fetched (no status reported by the collector)")


@dataclass
class _Merge:
    """The working state of one merge, shared by its steps."""

    graph: Graph
    cmp: Comparison
    previous: dict[str, dict[str, int]]  # the stored index's items by scope and _type
    first_sync: bool
    known: set[str]  # scopes known before this sync
    states: dict[str, ScopeStatus]
    index: Prints  # becomes the new index (fetched items, then the kept ones)
    write: MutableMapping[str, bytes]
    previous_fp: dict[str, bytes]  # stored prints of the items not fetched
    candidates: dict[str, list[tuple[str, str]]] = field(
        default_factory=dict
    )  # _type -> [(key, scope)]
    kept_items: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (scope, _type)
    missing_logon: list[tuple[str, str]] = field(default_factory=list)  # decided by references
    deletions: list[tuple[str, str, str]] = field(default_factory=list)  # (key, scope, _type)
    dropped: set[str] = field(default_factory=set)  # removed silently (dangling relationships)
    referenced: set[str] = field(default_factory=set)  # logon users some machine HAS after
    entity_keys: set[str] = field(default_factory=set)  # entities after the merge (logon aside)


def plan(
    graph: Graph,
    cmp: Comparison,
    *,
    known_scopes: set[str],
    guard_counts: dict[str, int],
    detect: DetectSettings,
    accept_drop: bool = False,
) -> MergePlan:
    """Decide, item by item, what the new snapshot holds and which changes are real.

    Consumes `cmp`: its fresh index becomes the new index.
    """
    w = _start(graph, cmp, known_scopes)
    first_sync = w.first_sync
    _sort_missing(w)
    drops, new_guard = _guard_deletions(w, guard_counts, detect, accept_drop)
    _drop_dangling(w)
    _logon_users_by_reference(w)
    fetched_counts = _add_kept(w)
    gone = {k for k, _s, _t in w.deletions} | w.dropped
    new_known, machine_gone = _known_scopes(w)
    baseline_scopes = sorted(s for s, c in fetched_counts.items() if s not in w.known and c)
    baseline_counts: Counter[str] = Counter()
    for s in baseline_scopes:
        baseline_counts.update(fetched_counts[s])
    kept = Counter(t for _s, t in w.kept_items.values())
    return MergePlan(
        index=w.index,
        write=w.write,
        delete=sorted(gone),
        created=_created(w, baseline_scopes, gone),
        updated=sorted(k for k in cmp.changed if k not in gone),
        deleted=sorted(
            (k, t)
            for k, s, t in w.deletions
            if not first_sync and (t == LOGON_USER_TYPE or s in w.known)
        ),
        kept=dict(sorted(kept.items())),
        incomplete=_incomplete(w, machine_gone),
        baseline=first_sync,
        baseline_scopes=baseline_scopes,
        baseline_counts=dict(sorted(baseline_counts.items())),
        known_scopes=new_known,
        drops=drops,
        guard_counts=new_guard,
        scope_states=w.states,
    )


def _start(graph: Graph, cmp: Comparison, known_scopes: set[str]) -> _Merge:
    """The merge's working state: the fresh index as the new one, every scope's status."""
    previous = cmp.previous_counts or {}
    first_sync = cmp.previous_counts is None
    return _Merge(
        graph=graph,
        cmp=cmp,
        previous=previous,
        first_sync=first_sync,
        known=set() if first_sync else known_scopes,
        states={
            s: scope_state(graph, cmp, s)
            for s in set(previous) | set(cmp.fresh) | set(graph.scopes)
        },
        index=cmp.fresh,
        write=cmp.bodies,
        previous_fp=cmp.previous_fp,
    )


def _incomplete(w: _Merge, machine_gone: Callable[[str], bool]) -> dict[str, ScopeStatus]:
    """Scopes not read whole this sync, but for budget skips (SKIPPED without an error: normal)
    and the logon-user scopes of machines that are gone."""
    return {
        s: st
        for s, st in sorted(w.states.items())
        if st.state is not ScopeState.COMPLETE
        and not machine_gone(s)
        and not (st.state is ScopeState.SKIPPED and st.error is None)
    }


def _sort_missing(w: _Merge) -> None:
    """1. Stored items not fetched: deletion candidates (complete scope) or kept."""
    for key, scope, typ in w.cmp.missing:
        if typ == LOGON_USER_TYPE:
            w.missing_logon.append((key, scope))
        elif w.states[scope].state is ScopeState.COMPLETE:
            w.candidates.setdefault(typ, []).append((key, scope))
        else:
            w.kept_items[key] = (scope, typ)


def _guard_deletions(
    w: _Merge, guard_counts: dict[str, int], detect: DetectSettings, accept_drop: bool
) -> tuple[dict[str, guard.DropDecision], dict[str, int]]:
    """2. The deletion guard: a held type's candidates are kept, with their relationships."""
    drops, new_guard = guard.evaluate(
        previous=_sum_types(w.previous),
        current=_count_types(w.index),
        deletions={t: len(v) for t, v in w.candidates.items()},
        counts=guard_counts,
        detect=detect,
        accept_drop=accept_drop,
    )
    held_types = {t for t, d in drops.items() if d.held}
    held_entities: set[str] = set()
    # entity types first: a relationship of a held entity is held with it (no phantom
    # `resolved` for a machine whose disappearance is itself in doubt)
    for typ in sorted(w.candidates, key=lambda t: t in schema.RELATIONSHIP_BY_TYPE):
        cands = w.candidates[typ]
        owner = guard.guarded_type(typ)
        if owner is not None and owner in held_types:
            for key, scope in cands:
                w.kept_items[key] = (scope, typ)
                if typ not in schema.RELATIONSHIP_BY_TYPE:
                    held_entities.add(key)
            continue
        for key, scope in cands:
            if held_entities and typ in schema.RELATIONSHIP_BY_TYPE:
                src, dst = rel_endpoints(key, typ)
                if src in held_entities or dst in held_entities:
                    w.kept_items[key] = (scope, typ)
                    continue
            w.deletions.append((key, scope, typ))
    if held_entities:
        _keep_held_targets(w)
    return drops, new_guard


def _keep_held_targets(w: _Merge) -> None:
    """The other ends of held relationships stay too (a CVE only on held machines)."""
    held_targets = {
        dst
        for key, (_s, typ) in w.kept_items.items()
        if typ in schema.RELATIONSHIP_BY_TYPE
        for dst in (rel_endpoints(key, typ)[1],)
        if dst is not None
    }
    still: list[tuple[str, str, str]] = []
    for key, scope, typ in w.deletions:
        if typ in schema.RELATIONSHIP_BY_TYPE:
            keep = rel_endpoints(key, typ)[0] in held_targets  # e.g. the CVE's IS cve
        else:
            keep = key in held_targets
        if keep:
            w.kept_items[key] = (scope, typ)
        else:
            still.append((key, scope, typ))
    w.deletions = still


def _drop_dangling(w: _Merge) -> None:
    """3. Entities after the merge (logon users aside); relationships need both ends."""
    fetched_entities = w.graph.entities
    kept_entities = {
        k for k, (_s, t) in w.kept_items.items() if t not in schema.RELATIONSHIP_BY_TYPE
    }

    def exists(key: str | None) -> bool:
        return key is None or key in fetched_entities or key in kept_entities

    for key, (_scope, typ) in list(w.kept_items.items()):
        if typ in schema.RELATIONSHIP_BY_TYPE:
            src, dst = rel_endpoints(key, typ)
            if (typ not in LOGON_SOURCED_TYPES and not exists(src)) or (
                typ != LOGON_REL_TYPE and not exists(dst)
            ):
                del w.kept_items[key]
                w.dropped.add(key)
    endpoints = w.graph.relationships.endpoints
    w.entity_keys = fetched_entities.keys() | kept_entities
    entity_keys = w.entity_keys
    for types in w.index.values():
        for typ, items in types.items():
            if typ not in _DIRECT_REL_TYPES:
                continue
            both = typ != LOGON_REL_TYPE  # a logon user exists through its HAS
            bad: list[str] = []
            for key in items:  # endpoints read once each, none held (pairs: millions)
                ends = endpoints(key)
                if ends is None:
                    continue
                if ends[0] not in entity_keys or (both and ends[1] not in entity_keys):
                    bad.append(key)
                elif not both:
                    w.referenced.add(ends[1] or "")
            for key in bad:  # a relationship to nothing: not stored
                del items[key]
                w.write.pop(key, None)
                if key not in w.cmp.added:  # it was stored
                    w.dropped.add(key)
    for key, (_scope, typ) in w.kept_items.items():
        if typ == LOGON_REL_TYPE:
            dst = rel_endpoints(key, typ)[1]
            if dst is not None:
                w.referenced.add(dst)


def _logon_users_by_reference(w: _Merge) -> None:
    """4. Logon-user entities exist while some machine HAS them (and so do their mappings)."""
    for scope, types in w.index.items():
        logon_items = types.get(LOGON_USER_TYPE)
        if not logon_items:
            continue
        for key in [k for k in logon_items if k not in w.referenced]:
            del logon_items[key]
            w.write.pop(key, None)
            if key not in w.cmp.added:  # it was stored
                w.deletions.append((key, scope, LOGON_USER_TYPE))
    for key, scope in w.missing_logon:
        if key in w.referenced:
            w.kept_items[key] = (scope, LOGON_USER_TYPE)
        else:
            w.deletions.append((key, scope, LOGON_USER_TYPE))
    logon_gone = {k for k, _s, t in w.deletions if t == LOGON_USER_TYPE}
    if not logon_gone:
        return
    for key, (_scope, typ) in list(w.kept_items.items()):  # mappings of logon users no machine
        if typ in LOGON_SOURCED_TYPES and rel_endpoints(key, typ)[0] in logon_gone:  # has
            del w.kept_items[key]
            w.dropped.add(key)
    for types in w.index.values():
        for typ in LOGON_SOURCED_TYPES & types.keys():
            items = types[typ]
            for key in [k for k in items if rel_endpoints(k, typ)[0] in logon_gone]:
                del items[key]
                w.write.pop(key, None)
                if key not in w.cmp.added:  # it was stored
                    w.dropped.add(key)


def _add_kept(w: _Merge) -> dict[str, dict[str, int]]:
    """5. The new index: fetched items plus kept ones. Returns the fetched counts per scope."""
    fetched_counts = {
        s: {t: len(items) for t, items in types.items() if items} for s, types in w.index.items()
    }
    for key, (scope, typ) in w.kept_items.items():
        w.index.setdefault(scope, {}).setdefault(typ, {})[key] = w.previous_fp[key]
    return fetched_counts


def _known_scopes(w: _Merge) -> tuple[set[str], Callable[[str], bool]]:
    """6. Scopes known after this sync (a gone machine's logon-user scope is forgotten); empty
    types and unknown empty scopes leave the index. Returns them and the gone-machine test."""
    machines_after = {
        k.split(":", 1)[1] for types in w.index.values() for k in types.get(schema.MACHINE.type, ())
    }

    def machine_gone(scope: str) -> bool:
        mid = logon_scope_machine(scope)
        return mid is not None and mid not in machines_after

    completed = {s for s, st in w.states.items() if st.state is ScopeState.COMPLETE}
    new_known = {s for s in w.known | completed if not machine_gone(s)}
    index = w.index
    for s in list(index):
        for t in [t for t, items in index[s].items() if not items]:
            del index[s][t]
        if not index[s] and s not in new_known:
            del index[s]
    for s in new_known:
        index.setdefault(s, {})  # an empty scope stays known
    return new_known, machine_gone


def _created(w: _Merge, baseline_scopes: list[str], gone: set[str]) -> list[str]:
    """7. Items new in the snapshot that become `created` events: not in baseline scopes; a
    logon user only once a machine of a known scope HAS it."""
    if w.first_sync:
        return []
    baseline = set(baseline_scopes)
    fresh_scope = {k for s in baseline_scopes for items in w.index[s].values() for k in items}
    rels = w.graph.relationships
    logon_seen_in_known_scope: set[str] = set()
    for scope, types in w.index.items():
        if scope in baseline:
            continue
        for key in types.get(LOGON_REL_TYPE, ()):
            rel = rels.get(key)
            if rel is not None and rel.get("_fromEntityKey") in w.entity_keys:
                logon_seen_in_known_scope.add(rel.get("_toEntityKey") or "")
    created: list[str] = []
    for key in w.cmp.added:
        if key in gone:
            continue
        if _is_logon_user(w.graph, key):
            if key in w.referenced and key in logon_seen_in_known_scope:
                created.append(key)
        elif key not in fresh_scope:
            created.append(key)
    return sorted(created)


def _sum_types(counts: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for types in counts.values():
        out.update(types)
    return dict(sorted(out.items()))


def _count_types(index: Prints) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for types in index.values():
        for typ, items in types.items():
            counts[typ] += len(items)
    return dict(sorted(counts.items()))


def _is_logon_user(graph: Graph, key: str) -> bool:
    item = graph.entities.get(key)
    return item is not None and item.get("_type") == LOGON_USER_TYPE
