"""Incremental query-rule evaluation answers exactly like a whole evaluation.

A generated tenant goes through a series of real commits with every kind of change (machines
changed, added and removed, CVEs re-rated, pairs fixed and found, logon users coming and going,
directory users disabled). After each, every query rule is evaluated twice on the same graph:
once incrementally (with the commit's delta) and once whole; their events and stored sets must
be equal, and both must equal the plan's answer on a graph read fresh from Redis.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from query_helpers import TENANT, build, commit_graph, mutable_tenant, mutate, paired_rules

from monitor.alerts.query_graphs import after_commit as graph_after_commit
from monitor.alerts.query_rules import (
    Evaluation,
    evaluate,
    forget_known_sets,
    state_key,
)
from monitor.query import compile_query, execute
from monitor.query.graph import QueryGraph, clear_cache, load_query_graph, store_query_graph
from monitor.query.incremental import is_incremental
from monitor.snapshot.store import SnapshotStore


def _summary(ev: Evaluation) -> tuple[object, ...]:
    return (
        ev.error,
        ev.current,
        sorted(m.key for m in ev.entered),
        sorted(k for k, _d in ev.left),
        ev.kept,
    )


def test_incremental_equals_whole_evaluation(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    clear_cache()
    forget_known_sets()
    rng = random.Random(5)
    now = datetime.now(UTC)
    sim = mutable_tenant(3, now)
    store = SnapshotStore(redis_client, redis_prefix)
    base, inc, whole = paired_rules()
    incremental_runs = events = 0
    for sync in range(6):
        if sync:
            mutate(sim, rng)
        graph = build(sim)
        result = commit_graph(store, graph, now - timedelta(hours=2) + timedelta(minutes=sync))
        qg, delta = graph_after_commit(store, TENANT, result, graph)
        assert (delta is not None) == (sync > 0), "the cached graph was not updated in place"
        if sync == 3:  # the stored sets read back from Redis instead of this process's memory
            forget_known_sets()
        a = evaluate(redis_client, redis_prefix, TENANT, inc, qg, delta=delta)
        b = evaluate(redis_client, redis_prefix, TENANT, whole, qg)
        assert not any(e.incremental for e in b)
        for rule, x, y in zip(base, a, b, strict=True):
            assert _summary(x) == _summary(y), (sync, rule.query)
            if sync:
                plan = compile_query(str(rule.query))
                assert x.incremental == is_incremental(plan), rule.query
            incremental_runs += x.incremental
            events += len(x.events)
        # the stored sets are each rule's answer on a graph read fresh from Redis
        clear_cache()
        fresh = load_query_graph(redis_client, redis_prefix, TENANT)
        assert fresh is not None and fresh.generation == qg.generation
        store_query_graph(redis_client, redis_prefix, qg)  # the next sync's base again
        for rule, ra, rb in zip(base, inc, whole, strict=True):
            plan = compile_query(str(rule.query))
            if not is_incremental(plan):
                continue
            doc = execute(plan, [fresh], max_rows=None)
            want = sorted(str(e["_key"]).encode() for e in doc["data"])
            for r in (ra, rb):
                got = sorted(redis_client.hkeys(state_key(redis_prefix, TENANT, r.name)))
                assert got == want, (sync, rule.query)
    assert incremental_runs > 5 * 20  # most rules ran incrementally on every later sync
    assert events > 50  # and the changes moved their answers


def test_whole_build_after_a_degraded_sync_reads_the_carried_items(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """Without the previous generation in the process, the index is built from the fetched
    items plus the carried-over ones read from Redis: it answers like a fresh load."""
    from detect_helpers import build_graph, commit, standard_tenant

    from monitor.model import schema
    from monitor.model.graph import ScopeState, ScopeStatus

    clear_cache()
    store = SnapshotStore(redis_client, redis_prefix)
    t = standard_tenant()
    commit(store, build_graph(t))
    clear_cache()  # as in another worker process
    degraded = build_graph(
        t,
        omit_scopes={schema.SCOPE_VULNERABILITIES},
        states={schema.SCOPE_VULNERABILITIES: ScopeStatus(ScopeState.FAILED, 0, "HTTP 500")},
    )
    result = commit(store, degraded)
    fetched_rels = degraded.relationships
    built, delta = graph_after_commit(store, "contoso", result, degraded)
    assert delta is None and result.carried_over  # a whole build, with carried-over items
    assert built.relationships is fetched_rels  # the fetched rows, taken over, not copied
    got, want = _built_and_fresh(
        redis_client, redis_prefix, built, "FIND HostAgent THAT IDENTIFIED Finding"
    )
    assert got and [e["_key"] for e in got] == [e["_key"] for e in want]


def test_whole_build_leaves_out_what_the_commit_did_not_store(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """A fetched relationship missing from the committed index is not in the query graph (its
    rows are copied instead of taken over), and the graph answers like a fresh load."""
    from detect_helpers import build_graph, commit, standard_tenant

    from monitor.model import schema

    clear_cache()
    store = SnapshotStore(redis_client, redis_prefix)
    graph = build_graph(standard_tenant())
    result = commit(store, graph)
    extra = dict(next(iter(graph.relationships.values())), _key="not-committed")
    graph.add_relationship(extra, schema.SCOPE_VULNERABILITIES)
    clear_cache()
    built, _delta = graph_after_commit(store, "contoso", result, graph)
    assert "not-committed" not in built.relationships
    assert built.relationships is not graph.relationships
    assert "not-committed" in graph.relationships  # the caller's graph is left as it was
    query = "FIND HostAgent AS m THAT IDENTIFIED AS r Finding RETURN m._key, r._key"
    got, want = _built_and_fresh(redis_client, redis_prefix, built, query)
    assert got and sorted(map(str, got)) == sorted(map(str, want))


def _built_and_fresh(
    client: redis.Redis, prefix: str, built: QueryGraph, query: str
) -> tuple[list[Any], list[Any]]:
    """`query`'s rows on `built` and on the tenant's graph read fresh from Redis, which must
    hold the same entities and relationships."""
    clear_cache()
    fresh = load_query_graph(client, prefix, "contoso")
    assert fresh is not None
    assert built.entities.keys() == fresh.entities.keys()
    assert built.relationships.keys() == fresh.relationships.keys()
    plan = compile_query(query)
    got = execute(plan, [built], max_rows=None)["data"]
    return got, execute(plan, [fresh], max_rows=None)["data"]
