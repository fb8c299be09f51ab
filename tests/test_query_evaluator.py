"""The query evaluator's graph follows commits made in other processes, by their change sets.

The committing side here only commits and stores change sets (as a sync in another worker does);
the evaluating side only calls `latest` / `evaluate_latest`, which keep this process's graph.
Every evaluation is compared with a whole one on the same graph and with a graph read fresh
from Redis; and no evaluation happens twice, whoever runs it.
"""

from __future__ import annotations

import random
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml
from query_helpers import TENANT, build, commit_graph, mutable_tenant, mutate, paired_rules

from monitor.alerts.query_graphs import (
    CHANGE_SET_VERSION,
    MAX_CHAIN,
    ChangeSet,
    change_chain,
    changes_key,
    latest,
    save_change_set,
)
from monitor.alerts.query_rules import (
    EvaluationBusy,
    committed_status,
    evaluate,
    evaluate_after_commit,
    evaluate_latest,
    forget_known_sets,
    lock_key,
    meta_key,
)
from monitor.config import Settings
from monitor.events import stream
from monitor.query import compile_query, execute
from monitor.query.graph import clear_cache, load_query_graph, store_query_graph
from monitor.simulator.generate import generate_tenant
from monitor.snapshot.store import SnapshotStore


def _rows(doc: dict[str, Any]) -> list[bytes]:
    return sorted(orjson.dumps(row, option=orjson.OPT_SORT_KEYS) for row in doc["data"])


def test_change_sets_combine_in_order() -> None:
    a = ChangeSet(1, 2, written={"w", "q", "loud-then-quiet", "gone"}, quiet={"q"}, deleted={"d"})
    a.written.add("loud-then-quiet")
    b = ChangeSet(
        2,
        3,
        written={"d", "loud-then-quiet", "q2", "q"},
        quiet={"loud-then-quiet", "q2", "q"},
        deleted={"gone"},
        ignored={"t": frozenset({"lastSeenOn"})},
    )
    a.patches = {"q": ({"lastSeenOn": 1, "y": 0}, ["x"])}
    b.patches = {
        "q": ({"lastSeenOn": 2, "x": 5}, ["y"]),
        "q2": ({"lastSeenOn": 3}, []),
        "loud-then-quiet": ({"lastSeenOn": 4}, []),
    }
    ab = a.then(b)
    assert ab.patches == {"q": ({"lastSeenOn": 2, "x": 5}, ["y"]), "q2": b.patches["q2"]}
    assert (ab.previous, ab.generation) == (1, 3)
    assert ab.written == {"w", "q", "loud-then-quiet", "d", "q2"}
    assert ab.deleted == {"gone"}  # "d" came back
    assert ab.quiet == {"q", "q2"}  # quiet in every write of the chain
    assert ab.ignored == b.ignored
    with pytest.raises(ValueError, match="does not follow"):
        b.then(a)


def test_evaluator_graph_follows_commits_made_elsewhere(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    clear_cache()
    forget_known_sets()
    rng = random.Random(9)
    now = datetime.now(UTC)
    sim = mutable_tenant(4, now)
    store = SnapshotStore(redis_client, redis_prefix)
    base, inc, whole = paired_rules()
    # sync 2 is not evaluated (the evaluator lags: sync 3 applies two change sets); sync 4
    # stores no change set (expired): the evaluator reads the snapshot whole
    lagging, no_change_set = 2, 4
    incremental_runs = 0
    for sync in range(7):
        if sync:
            mutate(sim, rng)
        graph = build(sim)
        result = commit_graph(store, graph, now - timedelta(hours=2, minutes=-sync))
        if sync != no_change_set:  # (sync 5 without the fetched items: no patches, all read)
            fetched = graph if sync != 5 else None
            assert save_change_set(redis_client, redis_prefix, result, fetched) == (sync > 0)
        if sync == lagging:
            continue
        before = store.generation(TENANT)
        qg, delta = latest(store, TENANT)
        assert qg.generation == before == result.generation
        assert (delta is not None) == (sync not in (0, no_change_set)), sync
        if delta is not None and sync == lagging + 1:
            assert delta.before.generation == result.generation - 2  # two sets, combined
        a = evaluate(redis_client, redis_prefix, TENANT, inc, qg, delta=delta)
        b = evaluate(redis_client, redis_prefix, TENANT, whole, qg)
        for rule, x, y in zip(base, a, b, strict=True):
            assert (x.error, x.current, sorted(m.key for m in x.entered)) == (
                y.error,
                y.current,
                sorted(m.key for m in y.entered),
            ), (sync, rule.query)
            assert sorted(k for k, _ in x.left) == sorted(k for k, _ in y.left), rule.query
            incremental_runs += x.incremental
        # the advanced graph answers like one read fresh from Redis
        clear_cache()
        fresh = load_query_graph(redis_client, redis_prefix, TENANT)
        assert fresh is not None and qg.changes is not None  # a rule reads _beginOn
        fresh.ensure_changes(redis_client, redis_prefix)  # the facts folded in = read fresh
        assert fresh.entities.keys() == qg.entities.keys()
        assert fresh.relationships.keys() == qg.relationships.keys()
        for rule in base[:12]:
            plan = compile_query(str(rule.query))
            got = execute(plan, [qg], max_rows=None)
            want = execute(plan, [fresh], max_rows=None)
            assert _rows(got) == _rows(want), (sync, rule.query)  # order aside (no ORDER BY)
        store_query_graph(redis_client, redis_prefix, qg)  # the evaluator's graph again
    assert incremental_runs > 3 * 20


def test_change_chain_stops_at_gaps_and_length(
    redis_prefix: str, redis_client: redis.Redis
) -> None:
    for gen in range(2, 2 + MAX_CHAIN + 2):
        cs = ChangeSet(gen - 1, gen, written={f"k{gen}"})
        doc = {
            "v": CHANGE_SET_VERSION,
            "previous": cs.previous,
            "generation": gen,
            "loud": sorted(cs.written),
            "quiet": {},
            "stale": [],
            "deleted": [],
            "ignored": {},
            "facts": [],
        }
        redis_client.set(changes_key(redis_prefix, TENANT, gen), zlib.compress(orjson.dumps(doc)))
    chain = change_chain(redis_client, redis_prefix, TENANT, 1, 4)
    assert chain is not None and chain.written == {"k2", "k3", "k4"}
    assert change_chain(redis_client, redis_prefix, TENANT, 1, 2 + MAX_CHAIN) is None  # too long
    redis_client.set(changes_key(redis_prefix, TENANT, 3), b"not zlib")
    assert change_chain(redis_client, redis_prefix, TENANT, 1, 4) is None  # unreadable: a gap
    assert change_chain(redis_client, redis_prefix, TENANT, 4, 4) is None


RULES = {
    "rules": [
        {
            "name": "high-risk-machines",
            "query": "FIND HostAgent WITH riskScore = 'High'",
            "alert_on_baseline": True,
            "sinks": ["log"],
        }
    ]
}
SINKS = {"sinks": {"log": {"type": "stdout"}}}


def _settings(tmp_path: Path, redis_url: str, prefix: str) -> Settings:
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    (alerts / "rules.yaml").write_text(yaml.safe_dump(RULES))
    (alerts / "sinks.yaml").write_text(yaml.safe_dump(SINKS))
    return Settings(redis_url=redis_url, redis_prefix=prefix, alerts_dir=alerts)


def _entered(client: redis.Redis, prefix: str) -> list[str]:
    return [
        str(ev["subject"])
        for _sid, ev in stream.read_range(client, prefix, TENANT, count=1000)
        if ev.get("type") == "mde.query.entered"
    ]


def test_each_generation_is_evaluated_once_whoever_runs_it(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    clear_cache()
    forget_known_sets()
    settings = _settings(tmp_path, redis_url, redis_prefix)
    store = SnapshotStore(redis_client, redis_prefix)
    now = datetime.now(UTC)
    sim = generate_tenant(machines=40, users=10, vulns_per_machine=1, cves=5, seed=2)
    ids = sorted(sim.machines)
    for mid in ids:
        sim.set_machine(mid, riskScore="Low")
    sim.set_machine(ids[0], riskScore="High")

    # sync 1 evaluates inline; the evaluator, asked too, finds nothing left to do
    r1 = commit_graph(store, build(sim), now - timedelta(minutes=30))
    assert evaluate_after_commit(redis_client, settings, TENANT, r1).counts == {
        "mde.query.entered": 1
    }
    evs = evaluate_latest(redis_client, settings, TENANT)
    assert [e.skipped for e in evs] == [True] and not evs[0].events

    # sync 2 defers to the evaluator; the sync's own (late) inline evaluation then skips
    sim.set_machine(ids[1], riskScore="High")
    g2 = build(sim)
    r2 = commit_graph(store, g2, now - timedelta(minutes=20))
    deferred = evaluate_after_commit(redis_client, settings, TENANT, r2, g2, defer=True)
    assert deferred.deferred and deferred.rules == 1 and not deferred.counts
    (ev2,) = evaluate_latest(redis_client, settings, TENANT)
    assert not ev2.skipped and [m.key for m in ev2.entered] and len(ev2.events) == 1
    assert evaluate_after_commit(redis_client, settings, TENANT, r2, g2).counts == {}

    # sync 3 is committed and evaluated; a stale evaluation of sync 2 cannot rewind the set
    sim.set_machine(ids[2], riskScore="High")
    sim.set_machine(ids[0], riskScore="Low")
    g3 = build(sim)
    r3 = commit_graph(store, g3, now - timedelta(minutes=10))
    save_change_set(redis_client, redis_prefix, r3, g3)
    (ev3,) = evaluate_latest(redis_client, settings, TENANT)
    assert len(ev3.entered) == 1 and len(ev3.left) == 1
    clear_cache()
    forget_known_sets()
    assert evaluate_after_commit(redis_client, settings, TENANT, r2, g2).counts == {}
    meta = redis_client.get(meta_key(redis_prefix, TENANT, "high-risk-machines"))
    assert meta is not None and b'"generation":3' in meta

    entered = _entered(redis_client, redis_prefix)
    assert len(entered) == len(set(entered)) == 3  # one per machine that entered, no repeats


def test_a_held_lock_makes_the_evaluator_wait_then_give_up(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    settings = _settings(tmp_path, redis_url, redis_prefix)
    store = SnapshotStore(redis_client, redis_prefix)
    sim = generate_tenant(machines=5, users=3, vulns_per_machine=1, cves=3, seed=1)
    commit_graph(store, build(sim), datetime.now(UTC))
    held = redis_client.lock(lock_key(redis_prefix, TENANT), timeout=30)
    assert held.acquire(blocking=False)
    with pytest.raises(EvaluationBusy, match="busy"):
        evaluate_latest(redis_client, settings, TENANT, wait=0.2)
    held.release()
    (ev,) = evaluate_latest(redis_client, settings, TENANT, wait=0.2)
    assert ev.baseline and not ev.skipped


def test_committed_status_reads_through_a_failed_sync(
    redis_prefix: str, redis_client: redis.Redis
) -> None:
    store = SnapshotStore(redis_client, redis_prefix)
    key = store.key(TENANT, "meta")
    redis_client.set(key, orjson.dumps({"status": "ok", "generation": 4}))
    assert committed_status(store, TENANT, 4) == "ok"
    assert committed_status(store, TENANT, 5) == "degraded"  # not the commit asked about
    redis_client.set(key, orjson.dumps({"status": "degraded", "generation": 4}))
    assert committed_status(store, TENANT, 4) == "degraded"
    failed = {
        "status": "failed",
        "generation": 4,
        "lastCommitted": {"status": "ok", "generation": 4},
    }
    redis_client.set(key, orjson.dumps(failed))
    assert committed_status(store, TENANT, 4) == "ok"


def test_kept_graphs_are_bounded_by_their_items(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitor.query import graph as query_graph
    from monitor.query.graph import QueryGraph, cached_query_graph

    clear_cache()
    monkeypatch.setattr(query_graph, "CACHE_ITEMS", 5)

    def graph(tenant: str, n: int) -> QueryGraph:
        ents = [{"_key": f"{tenant}:{i}", "_type": "t", "_class": "C"} for i in range(n)]
        return QueryGraph.from_items(tenant, 1, ents, [])

    for tenant in ("a", "b"):
        store_query_graph(redis_client, "p", graph(tenant, 2))
    assert cached_query_graph(redis_client, "p", "a") is not None  # a is now the most recent
    store_query_graph(redis_client, "p", graph("c", 2))  # 6 items: the least recent goes
    assert cached_query_graph(redis_client, "p", "b") is None
    assert cached_query_graph(redis_client, "p", "a") is not None
    store_query_graph(redis_client, "p", graph("big", 9))  # over the bound alone: kept alone
    assert cached_query_graph(redis_client, "p", "big") is not None
    assert cached_query_graph(redis_client, "p", "a") is None
    assert cached_query_graph(redis_client, "p", "c") is None
    clear_cache()


def test_volatile_changes_of_types_no_rule_reads_are_left_out(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """Rules on machines only: the devices' lastSeen moves are not carried; a rule that reads
    devices later gets the graph read whole, not stale values."""
    from monitor.alerts.query_rules import rules_types
    from monitor.alerts.rules import compile_rule

    clear_cache()
    now = datetime.now(UTC)
    sim = generate_tenant(machines=60, users=20, vulns_per_machine=2, cves=10, seed=6)
    store = SnapshotStore(redis_client, redis_prefix)

    def rule(name: str, query: str) -> Any:
        compiled, errors = compile_rule(
            {"name": name, "query": query, "sinks": ["s"]}, "t", 0, ["s"]
        )
        assert compiled is not None, errors
        return compiled

    machines = [rule("seen", "FIND HostAgent WITH lastSeenOn > date(2000-01-01)")]
    devices = [rule("devices", "FIND user_endpoint WITH lastSeenOn > date(2000-01-01)")]
    types = rules_types(machines)
    assert types == {"microsoft_defender_machine"} and rules_types(devices) == {"user_endpoint"}
    commit_graph(store, build(sim), now - timedelta(minutes=10))
    latest(store, TENANT, types)  # the graph this process keeps
    sim.touch_all_machines()  # every machine and device: a quiet (volatile-only) change
    graph = build(sim)
    result = commit_graph(store, graph, now)
    assert result.quiet_keys
    assert save_change_set(redis_client, redis_prefix, result, graph, types)
    advanced, delta = latest(store, TENANT, types)
    assert delta is not None and advanced.stale_types == {"user_endpoint"}
    for key, e in advanced.by_type["microsoft_defender_machine"].items():  # carried
        assert e["lastSeenOn"] == graph.entities[key]["lastSeenOn"]
    stale = [  # left as they were: no rule of this process reads them
        k
        for k, e in advanced.by_type["user_endpoint"].items()
        if e["lastSeenOn"] != graph.entities[k]["lastSeenOn"]
    ]
    assert stale
    fresh, delta = latest(store, TENANT, rules_types(devices))  # read whole, then current
    assert delta is None and not fresh.stale_types
    for key, e in fresh.by_type["user_endpoint"].items():
        assert e["lastSeenOn"] == graph.entities[key]["lastSeenOn"]
    clear_cache()
