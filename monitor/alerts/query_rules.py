"""Query alert rules: a rule with `query:` (J1QL) instead of `match:`.

After each committed sync of a tenant, every query rule for that tenant runs over the new
snapshot. Its result set (entities by `_key`, or RETURN rows by a hash of their values) is
compared with the set stored at the previous evaluation: members that entered become
`mde.query.entered` events, members that left `mde.query.left` events. The events go to the
tenant's stream like any change event, so the normal pipeline (silences, grouping,
throttling, sinks, resolved notifications) handles them; the rule fires on `entered` and is
resolved by `left` (the subject is the member).

- The first evaluation of a rule on a tenant (or after its query text changed) records the set
  silently, unless the rule says `alert_on_baseline: true`.
- A degraded sync (a scope kept its previous data) or a truncated result never makes members
  leave: the stored set only grows until a complete evaluation.
- State and events are written in one MULTI/EXEC, so a crash repeats an evaluation at worst.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import redis

from monitor.events import stream
from monitor.events.envelope import Event, make_event, utc_now_iso
from monitor.model.graph import Graph, Item
from monitor.query import QueryError, compile_query, execute
from monitor.query.graph import (
    QueryGraph,
    cached_query_graph,
    index_fingerprints,
    load_query_graph,
    split_items,
    store_query_graph,
)
from monitor.query.planner import Plan
from monitor.snapshot.store import SnapshotStore

if TYPE_CHECKING:
    from monitor.alerts.rules import Rule
    from monitor.config import Settings
    from monitor.snapshot.commit import CommitResult

log = logging.getLogger(__name__)

QUERY_ENTERED = "mde.query.entered"
QUERY_LEFT = "mde.query.left"
MAX_LISTED = 200  # display names kept per member in the state hash are cut to this length
_PLANS: dict[str, Plan] = {}


def check_query(text: str) -> str | None:
    """Why a rule's query cannot run (syntax or semantics), or None."""
    try:
        compile_query(text)
    except QueryError as exc:
        return str(exc)
    return None


def rule_predicate(name: str) -> Any:
    """Events of this query rule only (several query rules share the two event types)."""

    def pred(event: Event) -> bool:
        data = event.get("data")
        return isinstance(data, dict) and data.get("rule") == name

    return pred


def state_key(prefix: str, tenant: str, rule: str) -> str:
    """Hash: member -> display name (the rule's last result set on the tenant)."""
    return f"{prefix}:qrules:{tenant}:{rule}:set"


def meta_key(prefix: str, tenant: str, rule: str) -> str:
    """JSON: the query text, generation and size of the last evaluation."""
    return f"{prefix}:qrules:{tenant}:{rule}:meta"


@dataclass
class Member:
    key: str
    display: str
    body: dict[str, Any]  # {"entity": ...} or {"row": ...}


@dataclass
class Evaluation:
    """One rule on one tenant."""

    rule: str
    tenant: str
    current: int = 0
    entered: list[Member] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)  # (member, display name)
    baseline: bool = False
    kept: bool = False  # degraded or truncated: nothing was allowed to leave
    error: str | None = None
    events: list[Event] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "tenant": self.tenant,
            "current": self.current,
            "entered": [{"key": m.key, "displayName": m.display} for m in self.entered],
            "left": [{"key": k, "displayName": d} for k, d in self.left],
            "baseline": self.baseline,
            "kept": self.kept,
            "error": self.error,
        }


def _plan(text: str) -> Plan:
    plan = _PLANS.get(text)
    if plan is None or plan.query.relative:  # date.now: re-plan each time
        plan = compile_query(text)
        _PLANS[text] = plan
    return plan


def members(doc: Mapping[str, Any]) -> dict[str, Member]:
    """The result set as members: entities by `_key`, table rows by a hash of their values."""
    out: dict[str, Member] = {}
    if doc["type"] == "list":
        for e in doc["data"]:
            key = str(e["_key"])
            out[key] = Member(key, str(e.get("displayName") or key)[:MAX_LISTED], {"entity": e})
        return out
    for row in doc["data"]:
        blob = orjson.dumps(row, option=orjson.OPT_SORT_KEYS, default=str)
        key = "row:" + hashlib.sha256(blob).hexdigest()[:24]
        display = ", ".join("" if v is None else str(v) for v in row.values())[:MAX_LISTED]
        out[key] = Member(key, display, {"row": row})
    return out


def rules_for(rules: Iterable[Rule], tenant: str) -> list[Rule]:
    return [
        r
        for r in rules
        if getattr(r, "query", None) and (r._tenant_ok is None or r._tenant_ok(tenant))
    ]


def evaluate(
    client: redis.Redis,
    prefix: str,
    tenant: str,
    rules: list[Rule],
    graph: QueryGraph,
    *,
    degraded: bool = False,
    write: bool = True,
    now_iso: str | None = None,
    stream_maxlen: int = 100_000,
    retention_days: float = 30.0,
) -> list[Evaluation]:
    """Run the query rules over `graph`; with `write`, store the sets and append the events."""
    if not rules:
        return []
    reads = client.pipeline(transaction=False)
    for r in rules:
        reads.get(meta_key(prefix, tenant, r.name))
        reads.hgetall(state_key(prefix, tenant, r.name))
    stored: list[Any] = reads.execute()
    time_ = now_iso or utc_now_iso()
    evaluations: list[Evaluation] = []
    pipe = client.pipeline(transaction=True)
    events: list[Event] = []
    for i, rule in enumerate(rules):
        ev = Evaluation(rule.name, tenant)
        evaluations.append(ev)
        raw_meta, raw_set = stored[2 * i], stored[2 * i + 1]
        meta = orjson.loads(raw_meta) if raw_meta else None
        previous = {k.decode(): v.decode() for k, v in (raw_set or {}).items()}
        assert rule.query is not None
        try:
            plan = _plan(rule.query)
            if plan.needs_changes:
                graph.ensure_changes(client, prefix)
            doc = execute(plan, [graph], max_rows=None)
        except QueryError as exc:
            ev.error = str(exc)
            log.warning("query rule failed", extra={"rule": rule.name, "error": ev.error})
            continue
        current = members(doc)
        ev.current = len(current)
        ev.baseline = meta is None or meta.get("query") != rule.query
        ev.kept = degraded or bool(doc.get("truncated"))
        if not ev.baseline or rule.alert_on_baseline:
            ev.entered = [m for k, m in current.items() if k not in previous]
        if not ev.kept:
            ev.left = [(k, d) for k, d in previous.items() if k not in current]
        for m in ev.entered:
            ev.events.append(
                _event(
                    tenant,
                    graph.generation,
                    rule,
                    QUERY_ENTERED,
                    m.key,
                    m.display,
                    m.body,
                    len(current),
                    time_,
                )
            )
        for k, d in ev.left:
            ev.events.append(
                _event(tenant, graph.generation, rule, QUERY_LEFT, k, d, {}, len(current), time_)
            )
        events += ev.events
        if not write:
            continue
        skey = state_key(prefix, tenant, rule.name)
        added = {k: m.display for k, m in current.items() if previous.get(k) != m.display}
        if ev.baseline and not ev.kept:
            pipe.delete(skey)
            added = {k: m.display for k, m in current.items()}
        elif ev.left:
            keys = [k for k, _d in ev.left]
            for j in range(0, len(keys), 5000):
                pipe.hdel(skey, *keys[j : j + 5000])
        items = list(added.items())
        for j in range(0, len(items), 5000):
            pipe.hset(skey, mapping=dict(items[j : j + 5000]))
        doc_meta = {
            "query": rule.query,
            "generation": graph.generation,
            "size": len(current),
            "time": time_,
            "kept": ev.kept,
        }
        pipe.set(meta_key(prefix, tenant, rule.name), orjson.dumps(doc_meta))
    if write:
        if events:
            stream.append(pipe, prefix, tenant, events, stream_maxlen, retention_days)
        pipe.execute()
    return evaluations


def _event(
    tenant: str,
    generation: int,
    rule: Rule,
    type_: str,
    key: str,
    display: str,
    body: dict[str, Any],
    size: int,
    when: str,
) -> Event:
    return make_event(
        tenant=tenant,
        type=type_,
        subject=key,
        generation=generation,
        time=when,
        change=f"{rule.name}:{type_}",
        data={
            "rule": rule.name,
            "query": rule.query,
            "key": key,
            "displayName": display,
            "resultCount": size,
            "changes": {},
            **body,
        },
    )


def graph_after_commit(
    store: SnapshotStore, tenant: str, result: CommitResult, fetched: Graph | None
) -> QueryGraph:
    """The committed snapshot as a QueryGraph, without re-reading what is in memory.

    With the previous generation's graph cached in this process, only the items whose
    fingerprint changed are swapped in (copy-on-write); otherwise the graph is built from the
    fetched items plus the carried-over ones read from Redis.
    """
    index = result.index
    if index is None or fetched is None:
        qg = load_query_graph(store.client, store.prefix, tenant)
        if qg is None:
            raise QueryError(f"tenant {tenant!r} has no snapshot", 0, 0)
        return qg
    fps = index_fingerprints(index)
    have: dict[str, Item] = {**fetched.entities, **fetched.relationships}
    cached = cached_query_graph(store.client, store.prefix, tenant)
    if (
        cached is not None
        and cached.fingerprints is not None
        and cached.generation < result.generation
    ):
        old = cached.fingerprints
        changed = [k for k, fp in fps.items() if old.get(k) != fp]
        if len(changed) <= len(fps) // 4:
            items = _bodies(store, tenant, changed, have)
            qg = cached.updated(result.generation, fps, items)
            if cached.changes is not None:  # fold this sync's events into the known facts
                facts = cached.changes
                for ev in result.events:
                    facts.add(ev)
                for k, item in items.items():
                    if k in qg.entities:
                        facts.stamp(k, item)
                qg.changes = facts
            store_query_graph(store.client, store.prefix, qg)
            return qg
    items = _bodies(store, tenant, list(fps), have)
    entities, rels = split_items(items.values())
    qg = QueryGraph.from_items(tenant, result.generation, entities, rels)
    qg.fingerprints = fps
    store_query_graph(store.client, store.prefix, qg)
    return qg


def _bodies(
    store: SnapshotStore, tenant: str, keys: list[str], have: dict[str, Item]
) -> dict[str, Item]:
    """Items by key: the fetched ones, the rest (carried over) read from the store."""
    missing = [k for k in keys if k not in have]
    loaded = store.load_bodies(tenant, missing) if missing else {}
    out: dict[str, Item] = {}
    for k in keys:
        item = have.get(k) or loaded.get(k)
        if item is not None:
            out[k] = item
    return out


def evaluate_after_commit(
    client: redis.Redis,
    settings: Settings,
    tenant: str,
    result: CommitResult,
    fetched: Graph | None = None,
) -> dict[str, int]:
    """The post-commit hook of a sync: event counts by type ({} when nothing to do).

    Never raises: a broken rule or query is logged and the sync goes on.
    """
    try:
        from monitor.alerts.rules import load_rules

        if result.status == "failed" or not settings.alerts_dir.is_dir():
            return {}
        rules = rules_for(load_rules(settings.alerts_dir).rules, tenant)
        if not rules:
            return {}
        t0 = time.perf_counter()
        store = SnapshotStore(client, settings.redis_prefix)
        graph = graph_after_commit(store, tenant, result, fetched)
        evs = evaluate(
            client,
            settings.redis_prefix,
            tenant,
            rules,
            graph,
            degraded=result.status == "degraded",
            stream_maxlen=settings.events.stream_maxlen,
            retention_days=settings.events.retention_days,
        )
        counts: dict[str, int] = {}
        for ev in evs:
            for e in ev.events:
                counts[e["type"]] = counts.get(e["type"], 0) + 1
        log.info(
            "query rules evaluated",
            extra={
                "tenant": tenant,
                "rules": len(rules),
                "seconds": round(time.perf_counter() - t0, 3),
                "events": counts,
            },
        )
        return counts
    except Exception:
        log.exception("query rules could not be evaluated", extra={"tenant": tenant})
        return {}
