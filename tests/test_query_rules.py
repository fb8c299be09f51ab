"""Query alert rules: evaluated after real commits, delivered through the real dispatcher."""

from __future__ import annotations

from pathlib import Path

import orjson
import redis
from alert_helpers import FakeClock, RecordingSink, settings_for, write_alerts
from detect_helpers import TENANT, build_graph, commit, machine_key, standard_tenant
from typer.testing import CliRunner

from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.query_rules import evaluate_after_commit, meta_key, state_key
from monitor.alerts.rules import load_rules
from monitor.alerts.silences import SilenceStore
from monitor.cli import app
from monitor.config import Settings
from monitor.model import schema
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.query.graph import clear_cache
from monitor.snapshot.store import SnapshotStore

RULES = """
rules:
  - name: high-risk-machines
    severity: high
    query: "FIND HostAgent WITH riskScore = 'High'"
    sinks: [rec]
    group_wait: 0s
    repeat_interval: 0s
  - name: vulnerable-pairs
    query: >-
      FIND HostAgent AS m THAT IDENTIFIED Finding WITH severity = 'Critical' AS v
      RETURN m.displayName, v.id
    alert_on_baseline: true
    sinks: [rec]
    group_wait: 0s
    repeat_interval: 0s
"""


def sync(store: SnapshotStore, settings: Settings, graph: object) -> dict[str, int]:
    result = commit(store, graph)  # type: ignore[arg-type]
    return evaluate_after_commit(store.client, settings, TENANT, result, graph).counts  # type: ignore[arg-type]


def test_enter_fires_leave_resolves_degraded_keeps(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    clear_cache()
    alerts = write_alerts(tmp_path / "alerts", RULES)
    settings = settings_for(redis_url, redis_prefix, alerts)
    store = SnapshotStore(redis_client, redis_prefix)
    sink = RecordingSink("rec")
    clock = FakeClock()
    d = Dispatcher(
        settings, redis_client, consumer="t", sinks={"rec": sink}, clock=clock, sleep=clock.sleep
    )
    assert d.errors == []
    t = standard_tenant()
    t.machines["m01"]["riskScore"] = "High"
    t.vulns["CVE-2024-1000"]["severity"] = "Critical"

    # 1: baseline. high-risk records {m01} silently; vulnerable-pairs alerts on its baseline
    counts = sync(store, settings, build_graph(t))
    assert counts == {"mde.query.entered": 3}  # m00, m05, m06 x CVE-2024-1000
    assert redis_client.hkeys(state_key(redis_prefix, TENANT, "high-risk-machines")) == [
        machine_key("m01").encode()
    ]
    d.drain(5)
    assert [(n.rule, n.status, n.total) for n in sink.sent] == [("vulnerable-pairs", "firing", 3)]
    sink.sent.clear()

    # 2: m04 becomes High -> enters -> one firing notification naming it
    t.machines["m04"]["riskScore"] = "High"
    assert sync(store, settings, build_graph(t)) == {"mde.query.entered": 1}
    d.drain(5)
    (n,) = sink.sent
    assert (n.rule, n.status, n.severity) == ("high-risk-machines", "firing", "high")
    assert n.events[0]["subject"] == machine_key("m04")
    assert n.events[0]["data"]["entity"]["riskScore"] == "High"
    assert "m04.contoso.local" in n.title + n.summary
    sink.sent.clear()

    # 3: m04 back to Low, but the sync is degraded (vulnerabilities failed): nothing leaves
    t.machines["m04"]["riskScore"] = "Low"
    degraded = build_graph(
        t,
        omit_scopes={schema.SCOPE_VULNERABILITIES},
        states={schema.SCOPE_VULNERABILITIES: ScopeStatus(ScopeState.FAILED, 0, "HTTP 500")},
    )
    assert sync(store, settings, degraded) == {}
    members = redis_client.hkeys(state_key(redis_prefix, TENANT, "high-risk-machines"))
    assert machine_key("m04").encode() in members
    meta = orjson.loads(redis_client.get(meta_key(redis_prefix, TENANT, "high-risk-machines")))
    assert meta["kept"] is True and meta["size"] == 1
    d.drain(5)
    assert sink.sent == []

    # 4: a complete sync: m04 leaves -> resolved notification
    assert sync(store, settings, build_graph(t)) == {"mde.query.left": 1}
    d.drain(5)
    (n,) = sink.sent
    assert (n.rule, n.status) == ("high-risk-machines", "resolved")
    assert n.events[0]["subject"] == machine_key("m04")
    sink.sent.clear()

    # 5: a silence on the subject mutes the next entry
    SilenceStore(redis_client, redis_prefix).add(
        ["displayName=m07.contoso.local", "rule=high-risk-machines"], 3600, "maint", now=clock.now
    )
    t.machines["m07"]["riskScore"] = "High"
    t.machines["m08"]["riskScore"] = "High"
    assert sync(store, settings, build_graph(t)) == {"mde.query.entered": 2}
    d.drain(5)
    (n,) = sink.sent
    assert n.total == 1 and n.status == "firing"
    assert n.events[0]["subject"] == machine_key("m08")
    d.close()


def test_rules_check_and_rules_test_query(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    clear_cache()
    bad = (
        RULES
        + """
  - name: broken
    query: "FIND HostAgent WITH riskScore = "
    sinks: [rec]
  - name: both
    query: "FIND HostAgent"
    match: {type: mde.machine.created}
    sinks: [rec]
"""
    )
    alerts = write_alerts(tmp_path / "alerts", bad)
    ruleset = load_rules(alerts)
    problems = {e.rule: e.message for e in ruleset.problems}
    assert "line 1, column" in problems["broken"] and "expected a value" in problems["broken"]
    assert "not both" in problems["both"]
    assert {r.name for r in ruleset.rules} == {"high-risk-machines", "vulnerable-pairs"}
    config = tmp_path / "monitor.yaml"
    config.write_text(
        f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\nalerts_dir: {alerts}\n"
    )
    runner = CliRunner()
    res = runner.invoke(app, ["--config", str(config), "rules", "check"])
    assert res.exit_code == 2 and "broken" in res.output
    write_alerts(tmp_path / "alerts", RULES)
    store = SnapshotStore(redis_client, redis_prefix)
    t = standard_tenant()
    t.machines["m01"]["riskScore"] = "High"
    settings = settings_for(redis_url, redis_prefix, alerts)
    sync(store, settings, build_graph(t))
    t.machines["m02"]["riskScore"] = "High"
    commit(store, build_graph(t))  # committed, not yet evaluated
    clear_cache()
    res = runner.invoke(app, ["--config", str(config), "rules", "test", "--query", "--json"])
    assert res.exit_code == 0, res.output
    doc = orjson.loads(res.stdout)
    by_rule = {e["rule"]: e for e in doc["evaluations"]}
    high = by_rule["high-risk-machines"]
    assert [m["key"] for m in high["entered"]] == [machine_key("m02")]
    assert high["current"] == 2 and not high["baseline"]
    # nothing was written: a real evaluation still sees m02 entering
    assert sync(store, settings, build_graph(t)) == {"mde.query.entered": 1}


def test_shipped_query_rules_run_on_a_generated_tenant(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    from query_helpers import generated_tenant

    from monitor.alerts.query_rules import evaluate, rules_for
    from monitor.query.graph import load_query_graph

    clear_cache()
    pack = load_rules(Path(__file__).resolve().parent.parent / "alerts")
    assert pack.problems == []
    rules = rules_for(pack.rules, TENANT)
    assert len(rules) >= 4
    generated_tenant(SnapshotStore(redis_client, redis_prefix))
    graph = load_query_graph(redis_client, redis_prefix, TENANT)
    assert graph is not None
    first = evaluate(redis_client, redis_prefix, TENANT, rules, graph)
    assert all(e.error is None and e.baseline and not e.entered for e in first)
    assert sum(e.current for e in first) > 0
    again = evaluate(redis_client, redis_prefix, TENANT, rules, graph)
    assert all(not e.baseline and not e.entered and not e.left for e in again)


def test_incremental_index_equals_a_fresh_load(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """The copy-on-write update after a commit answers exactly like a graph read from Redis."""
    from detect_helpers import mutated_tenant

    from monitor.alerts.query_graphs import after_commit as graph_after_commit
    from monitor.query import compile_query, execute
    from monitor.query.graph import load_query_graph, store_query_graph

    clear_cache()
    store = SnapshotStore(redis_client, redis_prefix)
    queries = [
        "FIND HostAgent AS m RETURN m._key, m.riskScore",
        "FIND HostAgent AS m THAT IDENTIFIED Finding AS v RETURN m._key, v._key",
        "FIND HostAgent AS m THAT HAS User AS u RETURN m._key, u._key",
        "FIND cve THAT IS << Finding",
        "FIND * WITH _type = 'microsoft_defender_user' AND accountEnabled = false",
        "FIND HostAgent WITH CHANGED riskScore SINCE date(2020-01-01)",
    ]
    assert load_query_graph(redis_client, redis_prefix, TENANT) is None
    # mutated_tenant() also moves every machine's lastSeenOn, which changes more than a quarter
    # of this small tenant's items and makes graph_after_commit rebuild instead of update: put
    # those back so sync 2 really takes the copy-on-write path this test is about
    small = mutated_tenant()
    for m in small.machines.values():
        m["lastSeenOn"] -= 3_600_000
    previous = None
    for graph in (build_graph(standard_tenant()), build_graph(small)):
        result = commit(store, graph)
        incremental, _delta = graph_after_commit(store, TENANT, result, graph)
        incremental.ensure_changes(redis_client, redis_prefix)
        if previous is not None:  # unchanged entities are shared, not re-read: an update
            shared = [k for k, e in previous.entities.items() if incremental.entities.get(k) is e]
            assert shared, "graph_after_commit rebuilt the index instead of updating it"
        clear_cache()
        fresh = load_query_graph(redis_client, redis_prefix, TENANT)
        assert fresh is not None
        fresh.ensure_changes(redis_client, redis_prefix)
        for text in queries:
            plan = compile_query(text)
            a = execute(plan, [incremental], max_rows=None)["data"]
            b = execute(plan, [fresh], max_rows=None)["data"]
            opt = orjson.OPT_SORT_KEYS
            assert sorted(orjson.dumps(r, option=opt) for r in a) == sorted(
                orjson.dumps(r, option=opt) for r in b
            ), text
        store_query_graph(redis_client, redis_prefix, incremental)  # the next sync's base
        previous = incremental
    assert incremental.generation == 2 and len(incremental.entities) == len(fresh.entities)
