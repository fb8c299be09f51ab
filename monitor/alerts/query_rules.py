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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import redis

from monitor.alerts import query_graphs
from monitor.alerts.query_graphs import save_change_set
from monitor.events import stream
from monitor.events.envelope import Event, make_event, utc_now_iso
from monitor.locks import Renewer, make_lock, release
from monitor.memory import LongLived, gc_paused
from monitor.model.graph import Graph, Item
from monitor.query import QueryError, compile_query, execute
from monitor.query.executor import DEFAULT_MAX_PATHS, match
from monitor.query.graph import QueryGraph
from monitor.query.incremental import GraphDelta, affected_starts, is_incremental, plan_fields
from monitor.query.planner import Plan, plan_types
from monitor.query.result import public
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
_HEAP = LongLived()  # the query evaluator's: see evaluate_latest


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
    entity: Item | None = None  # list results
    row: dict[str, Any] | None = None  # table results

    def body(self) -> dict[str, Any]:
        """What an event about this member carries: {"entity": ...} or {"row": ...}."""
        if self.entity is not None:
            return {"entity": public(self.entity)}
        return {"row": self.row}


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
    incremental: bool = False  # only the members the commit could reach were matched again
    skipped: bool = False  # already evaluated at this generation (or a newer one): not again

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
            "skipped": self.skipped,
        }


def _planned(text: str) -> Plan | QueryError:
    """The rule's plan, or why it cannot run."""
    try:
        return _plan(text)
    except QueryError as exc:
        return exc


def _plan(text: str) -> Plan:
    plan = _PLANS.get(text)
    if plan is None or plan.query.relative:  # date.now: re-plan each time
        plan = compile_query(text)
        _PLANS[text] = plan
    return plan


def _display(e: Item) -> str:
    return str(e.get("displayName") or e["_key"])[:MAX_LISTED]


def members(doc: Mapping[str, Any]) -> dict[str, Member]:
    """The result set as members: entities by `_key`, table rows by a hash of their values."""
    out: dict[str, Member] = {}
    if doc["type"] == "list":
        for e in doc["data"]:
            key = str(e["_key"])
            out[key] = Member(key, _display(e), entity=e)
        return out
    for row in doc["data"]:
        blob = orjson.dumps(row, option=orjson.OPT_SORT_KEYS, default=str)
        key = "row:" + hashlib.sha256(blob).hexdigest()[:24]
        display = ", ".join("" if v is None else str(v) for v in row.values())[:MAX_LISTED]
        out[key] = Member(key, display, row=row)
    return out


@dataclass
class _Answer:
    """A rule's answer on a graph: member -> display name, and what events about them carry."""

    displays: dict[str, str]
    source: Callable[[str], Member]
    truncated: bool


def _answer(plan: Plan, graph: QueryGraph, starts: set[str] | None) -> _Answer:
    """The plan's answer on `graph`; with `starts`, the part of it that begins at those.

    A list query without ORDER BY / SKIP / LIMIT is read straight from the matched entities;
    anything else goes through the result builder (J1's result document)."""
    q = plan.query
    if starts is not None or not (plan.table or q.order or q.skip is not None or q.limit):
        matched = match(plan, graph, DEFAULT_MAX_PATHS, False, starts)
        found = {str(e["_key"]): e for e in matched.items}
        displays = {k: _display(found[k]) for k in sorted(found)}
        return _Answer(
            displays, lambda k: Member(k, displays[k], entity=found[k]), matched.truncated
        )
    doc = execute(plan, [graph], max_rows=None)
    ms = members(doc)
    return _Answer({k: m.display for k, m in ms.items()}, ms.__getitem__, bool(doc["truncated"]))


def rules_for(rules: Iterable[Rule], tenant: str) -> list[Rule]:
    return [
        r
        for r in rules
        if getattr(r, "query", None) and (r._tenant_ok is None or r._tenant_ok(tenant))
    ]


@dataclass
class _Known:
    """A rule's stored set as this process last wrote it (saves reading it back)."""

    generation: int
    query: str
    members: dict[str, str]


_KNOWN: dict[tuple[int, str, str, str], _Known] = {}


def forget_known_sets() -> None:
    """Read every stored set back from Redis at the next evaluation."""
    _KNOWN.clear()


def _known_set(
    client: redis.Redis, prefix: str, tenant: str, rule: Rule, meta: Mapping[str, Any] | None
) -> dict[str, str] | None:
    """The stored set when this process wrote it last (per the stored metadata), else None."""
    known = _KNOWN.get((id(client.connection_pool), prefix, tenant, rule.name))
    if known is None or meta is None:
        return None
    if known.generation != meta.get("generation") or known.query != meta.get("query"):
        return None
    return known.members


def _evaluated_at(meta: Mapping[str, Any] | None) -> int:
    try:
        return int((meta or {}).get("generation") or 0)
    except (TypeError, ValueError):
        return 0


def _continues(meta: Mapping[str, Any] | None, rule: Rule, delta: GraphDelta | None) -> bool:
    """Is the stored set this rule's complete answer on the delta's previous generation?"""
    return (
        delta is not None
        and meta is not None
        and meta.get("query") == rule.query
        and meta.get("generation") == delta.before.generation
        and not meta.get("kept")
    )


@dataclass
class _Run:
    rule: Rule
    ev: Evaluation
    answer: _Answer
    starts: set[str] | None
    previous: dict[str, str] | None  # the stored set, when known without reading it


@gc_paused()
def evaluate(
    client: redis.Redis,
    prefix: str,
    tenant: str,
    rules: list[Rule],
    graph: QueryGraph,
    *,
    delta: GraphDelta | None = None,
    degraded: bool = False,
    write: bool = True,
    now_iso: str | None = None,
    stream_maxlen: int = 100_000,
    retention_days: float = 30.0,
) -> list[Evaluation]:
    """Run the query rules over `graph`; with `write`, store the sets and append the events.

    With `delta` (how `graph` differs from the previous generation), a rule whose stored set
    is its answer on that generation is evaluated incrementally: only the start entities the
    changes can reach are matched again. A set this process stored is not read back."""
    if not rules:
        return []
    if delta is not None and delta.after is not graph:
        delta = None
    metas: Any = client.mget([meta_key(prefix, tenant, r.name) for r in rules])
    plans = [_planned(str(r.query)) for r in rules]
    # every field an incremental rule reads: the changed entities are compared on these once
    watched = frozenset(
        f for p in plans if isinstance(p, Plan) and is_incremental(p) for f in plan_fields(p)
    )
    evaluations: list[Evaluation] = []
    runs: list[_Run] = []
    for rule, raw_meta, plan in zip(rules, metas, plans, strict=True):
        ev = Evaluation(rule.name, tenant)
        evaluations.append(ev)
        meta = orjson.loads(raw_meta) if raw_meta else None
        ev.baseline = meta is None or meta.get("query") != rule.query
        if write and not ev.baseline and _evaluated_at(meta) >= graph.generation:
            ev.skipped = True  # by another process meanwhile: its events are out already
            ev.current = int(meta.get("size") or 0) if meta else 0
            continue
        try:
            if isinstance(plan, QueryError):
                raise plan
            if plan.needs_changes:
                graph.ensure_changes(client, prefix)
            starts = None
            if _continues(meta, rule, delta) and is_incremental(plan):
                assert delta is not None
                starts = affected_starts(plan, delta, watched)
            answer = _answer(plan, graph, starts)
        except QueryError as exc:
            ev.error = str(exc)
            log.warning("query rule failed", extra={"rule": rule.name, "error": ev.error})
            continue
        ev.incremental = starts is not None
        ev.kept = degraded or answer.truncated
        previous = _known_set(client, prefix, tenant, rule, meta)
        runs.append(_Run(rule, ev, answer, starts, previous))
    reads = client.pipeline(transaction=False)
    for run in runs:
        if run.previous is None:
            reads.hgetall(state_key(prefix, tenant, run.rule.name))
    stored = iter(reads.execute() if reads.command_stack else [])
    time_ = now_iso or utc_now_iso()
    pipe = client.pipeline(transaction=True)
    events: list[Event] = []
    sets: dict[str, dict[str, str]] = {}
    for run in runs:
        previous = run.previous
        if previous is None:
            raw: Any = next(stored) or {}
            previous = {k.decode(): v.decode() for k, v in raw.items()}
        sets[run.rule.name] = _compare(run, previous)
        ev = run.ev
        for m in ev.entered:
            body = m.body()
            ev.events.append(
                _event(
                    tenant,
                    graph.generation,
                    run.rule,
                    QUERY_ENTERED,
                    m.key,
                    m.display,
                    body,
                    ev.current,
                    time_,
                )
            )
        for k, d in ev.left:
            ev.events.append(
                _event(tenant, graph.generation, run.rule, QUERY_LEFT, k, d, {}, ev.current, time_)
            )
        events += ev.events
        if write:
            _write_state(pipe, prefix, tenant, run, previous, sets[run.rule.name], graph, time_)
    if write:
        if events:
            stream.append(pipe, prefix, tenant, events, stream_maxlen, retention_days)
        pipe.execute()
        pool = id(client.connection_pool)
        for run in runs:
            assert run.rule.query is not None
            _KNOWN[(pool, prefix, tenant, run.rule.name)] = _Known(
                graph.generation, run.rule.query, sets[run.rule.name]
            )
    return evaluations


def _compare(run: _Run, previous: dict[str, str]) -> dict[str, str]:
    """Fill the evaluation's entered / left / current from the stored set; the new set."""
    ev, answer = run.ev, run.answer
    now = answer.displays
    joined = [k for k in now if k not in previous]
    if not ev.baseline or run.rule.alert_on_baseline:
        ev.entered = [answer.source(k) for k in joined]
    scope = previous if run.starts is None else (k for k in run.starts if k in previous)
    gone = [(k, previous[k]) for k in scope if k not in now]
    if not ev.kept:
        ev.left = gone
    # the answer's size: incrementally, the previous answer (the stored set) moved by the
    # members that joined and went
    ev.current = len(now) if run.starts is None else len(previous) + len(joined) - len(gone)
    if ev.baseline and not ev.kept:
        return dict(now)
    new = dict(previous)
    for k, _d in ev.left:
        del new[k]
    new.update(now)
    return new


def _write_state(
    pipe: Any,
    prefix: str,
    tenant: str,
    run: _Run,
    previous: dict[str, str],
    new: dict[str, str],
    graph: QueryGraph,
    time_: str,
) -> None:
    """Queue the changes to the rule's stored set and its metadata."""
    ev, rule = run.ev, run.rule
    skey = state_key(prefix, tenant, rule.name)
    if ev.baseline and not ev.kept:
        pipe.delete(skey)
        added = new
    else:
        keys = [k for k, _d in ev.left]
        for j in range(0, len(keys), 5000):
            pipe.hdel(skey, *keys[j : j + 5000])
        added = {k: d for k, d in run.answer.displays.items() if previous.get(k) != d}
    items = list(added.items())
    for j in range(0, len(items), 5000):
        pipe.hset(skey, mapping=dict(items[j : j + 5000]))
    doc_meta = {
        "query": rule.query,
        "generation": graph.generation,
        "size": ev.current,
        "time": time_,
        "kept": ev.kept,
        "incremental": ev.incremental,
    }
    pipe.set(meta_key(prefix, tenant, rule.name), orjson.dumps(doc_meta))


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


@dataclass
class AfterCommit:
    """What a sync's post-commit step did about the tenant's query rules."""

    rules: int = 0  # query rules for the tenant
    counts: dict[str, int] = field(default_factory=dict)  # events by type
    deferred: bool = False  # left to the query evaluator (the change set is stored)


class EvaluationBusy(Exception):
    """Another process held the tenant's query-rule lock for too long."""


LOCK_TTL_S = 30.0  # renewed while held: a dead evaluator's lock frees itself after this
LOCK_WAIT_S = 120.0


def lock_key(prefix: str, tenant: str) -> str:
    return f"{prefix}:qrules:{tenant}:lock"


@contextmanager
def tenant_lock(
    client: redis.Redis, prefix: str, tenant: str, wait: float = LOCK_WAIT_S
) -> Iterator[None]:
    """One evaluation of a tenant's query rules at a time (sync process or query evaluator):
    with `evaluate` skipping rules already evaluated at the generation, none is done twice.
    Held with a short TTL renewed while the evaluation runs (monitor.locks)."""
    lock = make_lock(client, lock_key(prefix, tenant), LOCK_TTL_S)
    if not lock.acquire(blocking=True, blocking_timeout=wait):
        raise EvaluationBusy(f"tenant {tenant!r}: query rules busy for over {wait:g}s")
    renewer = Renewer(lock, LOCK_TTL_S)
    try:
        yield
    finally:
        renewer.stop()
        release(lock)  # expired meanwhile: logged; the next evaluation repeats the work


def rules_types(rules: Iterable[Rule]) -> frozenset[str] | None:
    """The entity types whose properties the rules can read (None: any); a rule whose query
    does not plan reads nothing."""
    out: set[str] = set()
    for rule in rules:
        plan = _planned(str(rule.query))
        if isinstance(plan, QueryError):
            continue
        types = plan_types(plan)
        if types is None:
            return None
        out |= types
    return frozenset(out)


def _tenant_rules(settings: Settings, tenant: str) -> list[Rule]:
    from monitor.alerts.rules import load_rules

    if not settings.alerts_dir.is_dir():
        return []
    return rules_for(load_rules(settings.alerts_dir).rules, tenant)


def committed_status(store: SnapshotStore, tenant: str, generation: int) -> str:
    """ "ok" or "degraded": how the commit of `generation` went ("degraded" when not known)."""
    meta = store.meta(tenant) or {}
    if meta.get("status") == "failed":  # a failed sync after it: its commit's own status
        meta = meta.get("lastCommitted") or {}
    if meta.get("generation") == generation and meta.get("status") == "ok":
        return "ok"
    return "degraded"


def _log_evaluated(tenant: str, evs: list[Evaluation], seconds: float, where: str) -> None:
    log.info(
        "query rules evaluated",
        extra={
            "tenant": tenant,
            "where": where,
            "rules": len(evs),
            "incremental": sum(e.incremental for e in evs),
            "skipped": sum(e.skipped for e in evs),
            "seconds": round(seconds, 3),
            "events": _counts(evs),
        },
    )


def _counts(evs: list[Evaluation]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ev in evs:
        for e in ev.events:
            counts[e["type"]] = counts.get(e["type"], 0) + 1
    return counts


def evaluate_after_commit(
    client: redis.Redis,
    settings: Settings,
    tenant: str,
    result: CommitResult,
    fetched: Graph | None = None,
    *,
    defer: bool = False,
) -> AfterCommit:
    """The post-commit step of a sync: evaluate the tenant's query rules now, or with `defer`
    store the commit's change set for the query evaluator (the caller enqueues it).

    Never raises: a broken rule or query is logged and the sync goes on.
    """
    try:
        if result.status == "failed":
            return AfterCommit()
        rules = _tenant_rules(settings, tenant)
        if not rules:
            return AfterCommit()
        types = rules_types(rules)
        if defer:
            save_change_set(client, settings.redis_prefix, result, fetched, types)
            return AfterCommit(len(rules), deferred=True)
        t0 = time.perf_counter()
        store = SnapshotStore(client, settings.redis_prefix)
        with tenant_lock(client, settings.redis_prefix, tenant):
            graph, delta = query_graphs.after_commit(store, tenant, result, fetched, types)
            evs = evaluate(
                client,
                settings.redis_prefix,
                tenant,
                rules,
                graph,
                delta=delta,
                degraded=result.status == "degraded",
                stream_maxlen=settings.events.stream_maxlen,
                retention_days=settings.events.retention_days,
            )
        _log_evaluated(tenant, evs, time.perf_counter() - t0, "sync")
        return AfterCommit(len(rules), _counts(evs))
    except Exception:
        log.exception("query rules could not be evaluated", extra={"tenant": tenant})
        return AfterCommit()


def evaluate_latest(
    client: redis.Redis,
    settings: Settings,
    tenant: str,
    wait: float = LOCK_WAIT_S,
    *,
    long_lived: bool = False,
) -> list[Evaluation]:
    """The query evaluator's step (`long_lived`: in the evaluator itself; also a sync's fallback
    when the evaluator cannot be reached): the tenant's query rules over its latest committed
    snapshot (rules already evaluated at that generation are skipped).

    Raises EvaluationBusy and Redis errors (the task retries); a broken rule is logged."""
    rules = _tenant_rules(settings, tenant)
    if not rules:
        return []
    t0 = time.perf_counter()
    evs = evaluate_on_latest(
        client,
        settings.redis_prefix,
        tenant,
        rules,
        wait=wait,
        stream_maxlen=settings.events.stream_maxlen,
        retention_days=settings.events.retention_days,
        long_lived=long_lived,
    )
    _log_evaluated(tenant, evs, time.perf_counter() - t0, "evaluator" if long_lived else "sync")
    return evs


def evaluate_on_latest(
    client: redis.Redis,
    prefix: str,
    tenant: str,
    rules: list[Rule],
    *,
    wait: float = LOCK_WAIT_S,
    stream_maxlen: int = 100_000,
    retention_days: float = 30.0,
    long_lived: bool = False,
) -> list[Evaluation]:
    """`rules` over the tenant's latest committed snapshot, from the graph this process keeps
    (`long_lived`: the process is the query evaluator, its graphs kept out of the cyclic GC)."""
    store = SnapshotStore(client, prefix)
    with tenant_lock(client, prefix, tenant, wait):
        if store.generation(tenant) == 0:
            return []
        graph, delta = query_graphs.latest(store, tenant, rules_types(rules))
        if long_lived:
            _HEAP.settle()
        return evaluate(
            client,
            prefix,
            tenant,
            rules,
            graph,
            delta=delta,
            degraded=committed_status(store, tenant, graph.generation) != "ok",
            stream_maxlen=stream_maxlen,
            retention_days=retention_days,
        )
