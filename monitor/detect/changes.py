"""Turn a merge plan into CloudEvents (the contract is docs/events.md).

Entity events `mde.<short>.created|deleted|updated` for account, machine, user, logon_user and
vulnerability, plus derived transitions (risk_raised, health_degraded, disabled, ...).
Relationship events only for machine IDENTIFIED vulnerability (identified/resolved) and machine
HAS logon user (added/removed), and not when the source entity is itself created or deleted in
the same sync. `user_endpoint` and the structural relationships never produce events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from monitor.detect import diff
from monitor.detect.plan import MergePlan, rel_endpoints
from monitor.events.envelope import EVENT_TYPES, Event, make_event
from monitor.model import schema
from monitor.model.graph import Graph, Item

SILENT_ENTITY_TYPES: frozenset[str] = frozenset({schema.DEVICE.type})
REL_EVENTS: dict[str, tuple[str, str, str]] = {  # _type -> (short, created, deleted)
    schema.MACHINE_IDENTIFIED_VULNERABILITY.type: (
        schema.MACHINE_IDENTIFIED_VULNERABILITY.short,
        "identified",
        "resolved",
    ),
    schema.MACHINE_HAS_LOGON_USER.type: (schema.MACHINE_HAS_LOGON_USER.short, "added", "removed"),
    # identity extensions: membership and privilege changes
    schema.GROUP_HAS_USER.type: ("group", "member_added", "member_removed"),
    schema.USER_ASSIGNED_DIRECTORY_ROLE.type: ("role", "assigned", "unassigned"),
}
# Relationship types whose `created` event is emitted even when the source entity is new in the
# same sync: a user created and made Global Administrator at once must not go unnoticed.
REL_EVENTS_WITH_NEW_SOURCE: frozenset[str] = frozenset({schema.USER_ASSIGNED_DIRECTORY_ROLE.type})
MAX_LISTED_SCOPES = 5
MAX_BASELINE_SCOPES = 20


def public_view(item: Item | None) -> Item | None:
    """The item as carried in events: without `_rawData`."""
    if item is None:
        return None
    return {k: v for k, v in item.items() if k != diff.RAW_DATA}


def display_name(item: Item | None, key: str) -> str:
    if not item:
        return key
    return str(item.get("displayName") or item.get("name") or key)


def entity_short(typ: str) -> str | None:
    """Event short name of an entity type, None when it produces no events."""
    ent = schema.ENTITY_BY_TYPE.get(typ)
    if ent is None or typ in SILENT_ENTITY_TYPES:
        return None
    return ent.short


@dataclass
class _Ctx:
    tenant: str
    generation: int
    time: str

    def event(
        self, type_: str, subject: str, data: dict[str, Any], change: str | None = None
    ) -> Event:
        return make_event(
            tenant=self.tenant,
            type=type_,
            subject=subject,
            generation=self.generation,
            data=data,
            time=self.time,
            change=change,
        )


def bodies_needed(plan: MergePlan, graph: Graph) -> set[str]:
    """Stored bodies the events need: before-images, deleted items, unfetched rel ends."""
    need: set[str] = set(plan.updated)
    for key, typ in plan.deleted:
        if entity_short(typ) is not None or typ in REL_EVENTS:
            need.add(key)
    for key, typ in _rel_changes(plan, graph):
        rel = graph.relationships.get(key)
        if rel is not None:
            ends = (rel.get("_fromEntityKey"), rel.get("_toEntityKey"))
        else:
            ends = rel_endpoints(key, typ)
        for end in ends:
            if end and end not in graph.entities:
                need.add(end)
    return need


def _rel_changes(plan: MergePlan, graph: Graph) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key in plan.created:
        rel = graph.relationships.get(key)
        if rel is not None and rel.get("_type") in REL_EVENTS:
            out.append((key, rel["_type"]))
    out.extend((k, t) for k, t in plan.deleted if t in REL_EVENTS)
    return out


def build_events(
    plan: MergePlan,
    graph: Graph,
    stored: Mapping[str, Item],
    *,
    tenant: str,
    generation: int,
    time: str,
    ignored: Mapping[str, frozenset[str]],
) -> list[Event]:
    """All events of one sync, in a stable order: sync events, entities (created, updated,
    inactive-account logons, deleted), relationships."""
    ctx = _Ctx(tenant, generation, time)
    events: list[Event] = list(sync_events(plan, ctx))
    made, created = _lifecycle_events(
        ctx,
        "created",
        (
            (k, e["_type"], None, e)
            for k in plan.created
            if (e := graph.entities.get(k)) is not None
        ),
    )
    events.extend(made)
    events.extend(_updated_entities(ctx, plan, graph, stored, ignored))
    events.extend(_inactive_account_logons(ctx, plan, graph, stored))
    gone, deleted = _lifecycle_events(  # with their last known state
        ctx,
        "deleted",
        (
            (k, t, old, old)
            for k, t in plan.deleted
            if t not in schema.RELATIONSHIP_BY_TYPE
            for old in (stored.get(k),)
        ),
    )
    events.extend(gone)
    events.extend(_relationship_events(ctx, plan, graph, stored, created, deleted))
    return events


def _lifecycle_events(
    ctx: _Ctx, change: str, entities: Iterable[tuple[str, str, Item | None, Item | None]]
) -> tuple[list[Event], set[str]]:
    """The `change` ("created" / "deleted") events of (key, `_type`, old, new) entities, and
    their keys."""
    events: list[Event] = []
    keys: set[str] = set()
    for key, typ, old, new in entities:
        keys.add(key)
        short = entity_short(typ)
        if short is not None:
            events.extend(_entity_events(ctx, short, change, key, old, new, {}))
    return events, keys


def _updated_entities(
    ctx: _Ctx,
    plan: MergePlan,
    graph: Graph,
    stored: Mapping[str, Item],
    ignored: Mapping[str, frozenset[str]],
) -> list[Event]:
    """Events of the entities whose significant fields changed (field by field)."""
    events: list[Event] = []
    for key in plan.updated:
        item = graph.entities.get(key)
        old = stored.get(key)
        if item is None or old is None:
            continue
        short = entity_short(item["_type"])
        if short is None:
            continue
        changes = diff.field_changes(
            old, item, ignored.get(item["_type"], frozenset({diff.RAW_DATA}))
        )
        if changes:
            events.extend(_entity_events(ctx, short, "updated", key, old, item, changes))
    return events


def _relationship_events(
    ctx: _Ctx,
    plan: MergePlan,
    graph: Graph,
    stored: Mapping[str, Item],
    created_entities: set[str],
    deleted_entities: set[str],
) -> list[Event]:
    """Events of created and deleted relationships, except those their source entity's own
    event implies."""

    def lookup(key: str | None) -> Item | None:
        if key is None:
            return None
        return graph.entities.get(key) or stored.get(key)

    events: list[Event] = []
    created_keys = set(plan.created)
    for key, typ in _rel_changes(plan, graph):
        short, on_create, on_delete = REL_EVENTS[typ]
        rel = graph.relationships.get(key)
        is_created = rel is not None and key in created_keys
        if not is_created:
            rel = stored.get(key)
        if rel is not None:
            src_key, dst_key = rel.get("_fromEntityKey"), rel.get("_toEntityKey")
        else:
            src_key, dst_key = rel_endpoints(key, typ)
        if src_key in deleted_entities or (
            src_key in created_entities and not (is_created and typ in REL_EVENTS_WITH_NEW_SOURCE)
        ):
            continue  # implied by the source entity's own event
        src, dst = lookup(src_key), lookup(dst_key)
        if src is None:
            continue
        rel_class = (rel or {}).get("_class")
        klass = rel_class[0] if isinstance(rel_class, list) and rel_class else str(rel_class or "")
        if not klass:
            klass = key.split("|")[1].upper() if key.count("|") == 2 else ""
        change = on_create if is_created else on_delete
        data = _rel_data(typ, klass, key, rel, (src_key, src), (dst_key, dst), {})
        events.append(ctx.event(f"mde.{short}.{change}", key, data))
    return events


def _rel_data(
    typ: str,
    klass: str,
    key: str,
    rel: Item | None,
    source: tuple[str | None, Item | None],
    target: tuple[str | None, Item | None],
    changes: dict[str, Any],
) -> dict[str, Any]:
    """The `data` of a relationship event: its ends as they are now (or were, when deleted)."""
    (src_key, src), (dst_key, dst) = source, target
    return {
        "relationshipType": typ,
        "relationshipClass": klass,
        "key": key,
        "displayName": f"{display_name(src, src_key or '')} {klass} {display_name(dst, dst_key or '')}",
        "changes": changes,
        "entity": public_view(rel) or {"_key": key, "_type": typ},
        "source": public_view(src),
        "target": public_view(dst),
    }


# identity: the logon user's mirrors of its directory account and employee (monitor.model.identity)
INACTIVE_ACCOUNT_STATES = frozenset({"disabled", "not_found"})


def _inactive_account_logons(
    ctx: _Ctx, plan: MergePlan, graph: Graph, stored: Mapping[str, Item]
) -> list[Event]:
    """`mde.machine_logon_user.logged_on`: an account whose directory user is disabled or gone
    (or whose employee is terminated) logged on again to a machine it had used before - the
    machine HAS logon_user relationship's `lastSeenOn` moved on (a first logon is `added`)."""
    out: list[Event] = []
    for key in plan.updated:
        rel = graph.relationships.get(key)
        if rel is None or rel.get("_type") != schema.MACHINE_HAS_LOGON_USER.type:
            continue
        old = stored.get(key) or {}
        before, after = old.get("lastSeenOn"), rel.get("lastSeenOn")
        if not isinstance(after, int | float) or (
            isinstance(before, int | float) and after <= before
        ):
            continue
        account = graph.entities.get(str(rel.get("_toEntityKey")))
        if account is None or not (
            account.get("directoryUserState") in INACTIVE_ACCOUNT_STATES
            or account.get("employeeStatus") == "terminated"
        ):
            continue
        machine = graph.entities.get(str(rel.get("_fromEntityKey"))) or stored.get(
            str(rel.get("_fromEntityKey"))
        )
        changes = {"lastSeenOn": {"old": before, "new": after}}
        data = _rel_data(rel["_type"], "HAS", key, rel, (None, machine), (None, account), changes)
        out.append(ctx.event("mde.machine_logon_user.logged_on", key, data))
    return out


def _entity_events(
    ctx: _Ctx,
    short: str,
    change: str,
    key: str,
    before: Item | None,
    after: Item | None,
    changes: diff.Changes,
) -> list[Event]:
    item = after or before or {}
    base: dict[str, Any] = {
        "entityType": item.get("_type"),
        "entityClass": item.get("_class"),
        "key": key,
        "displayName": display_name(item, key),
    }
    tail: dict[str, Any] = {"entity": public_view(after)}
    if change in ("updated", "deleted"):
        tail["before"] = public_view(before)
    out: list[Event] = []
    type_ = f"mde.{short}.{change}"
    if type_ in EVENT_TYPES:
        out.append(ctx.event(type_, key, {**base, "changes": changes, **tail}))
    if change == "updated":
        for t in diff.transitions(short, changes):
            derived = f"mde.{short}.{t.change}"
            if derived in EVENT_TYPES:
                subset = {f: changes[f] for f in t.fields}
                out.append(ctx.event(derived, key, {**base, "changes": subset, **tail}))
    return out


def _group_scopes(
    statuses: Mapping[str, Any], fmt: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """Non-logon-user scopes in full, logon-user scopes as a count plus the first few."""
    scopes: dict[str, Any] = {}
    logon = [s for s in statuses if s.startswith(schema.SCOPE_LOGON_USERS + ":")]
    for s, st in statuses.items():
        if s not in logon:
            scopes[s] = fmt(st)
    for s in logon[:MAX_LISTED_SCOPES]:
        scopes[s] = fmt(statuses[s])
    return {
        "scopes": scopes,
        "logonUserScopes": {"count": len(logon), "listed": min(len(logon), MAX_LISTED_SCOPES)},
    }


def sync_events(plan: MergePlan, ctx: _Ctx) -> list[Event]:
    """baseline, degraded, suspicious_drop and drop_applied events of a sync (subject: tenant)."""
    out: list[Event] = []
    if plan.baseline or plan.baseline_scopes:
        listed = plan.baseline_scopes[:MAX_BASELINE_SCOPES]
        out.append(
            ctx.event(
                "mde.sync.baseline",
                ctx.tenant,
                {
                    "first": plan.baseline,
                    "scopes": listed,
                    "scopeCount": len(plan.baseline_scopes),
                    "counts": plan.baseline_counts,
                },
            )
        )
    if plan.incomplete:
        grouped = _group_scopes(plan.incomplete, lambda st: st.to_dict())
        out.append(
            ctx.event(
                "mde.sync.degraded",
                ctx.tenant,
                {
                    **grouped,
                    "kept": plan.kept,
                    "heldDrops": sorted(t for t, d in plan.drops.items() if d.held),
                },
            )
        )
    for typ, decision in sorted(plan.drops.items()):
        if decision.held:
            out.append(
                ctx.event(
                    "mde.sync.suspicious_drop",
                    ctx.tenant,
                    decision.to_event_data(),
                    change=f"mde.sync.suspicious_drop:{typ}",
                )
            )
        else:  # the guard let a large drop through: persisted long enough, or accepted
            out.append(
                ctx.event(
                    "mde.sync.drop_applied",
                    ctx.tenant,
                    {
                        **decision.to_event_data(),
                        "accepted": decision.accepted,
                        "reason": "accepted" if decision.accepted else "persisted",
                    },
                    change=f"mde.sync.drop_applied:{typ}",
                )
            )
    return out
