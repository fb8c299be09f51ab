"""Query benchmark: J1QL over a generated tenant's committed snapshot, and query rules after a sync.

    .venv/bin/python bench/query.py                 # 10,000 machines, 20,000 users, 300,000 pairs
    .venv/bin/python bench/query.py --scale 0.1     # a tenth of that
    .venv/bin/python bench/query.py --json

Prints: the load time of the snapshot into the query index and its ratio to the JSON-parse floor
(orjson.loads of the same items as one array); single-hop and two-hop (WHERE) query times once
loaded (best of 3); for the next two syncs (every active machine's lastSeen moves, 2% change
risk), the diff-and-commit time and what evaluating 20 query rules after it adds: in the syncing
process (incrementally when the previous generation's graph is in that process, whole when it is
not) and in the query evaluator (a separate process that keeps the graph and applies each sync's
stored change set, as `worker --queues query` does); the query index's memory per item
(tracemalloc: the index and the relationships as held, the entity dicts excluded) and the evaluator's peak RSS per item.
Uses its own key prefix and removes its keys at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import sys
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from query_helpers import build, commit_graph  # type: ignore[import-not-found]

from monitor import safe_yaml
from monitor.alerts.query_graphs import after_commit as graph_after_commit
from monitor.alerts.query_graphs import changes_key, save_change_set
from monitor.alerts.query_rules import (
    evaluate,
    evaluate_on_latest,
    forget_known_sets,
    rules_types,
)
from monitor.alerts.rules import Rule, compile_rule
from monitor.model.graph import Graph
from monitor.query import compile_query, execute
from monitor.query.graph import QueryGraph, clear_cache, load_query_graph
from monitor.questions import load_questions
from monitor.redis_conn import delete_prefix
from monitor.simulator.generate import generate_tenant
from monitor.snapshot.commit import CommitResult
from monitor.snapshot.store import SnapshotStore

TENANT = "bench"

SINGLE_HOP = {
    "machines with an exploitable critical CVE": (
        "FIND HostAgent THAT IDENTIFIED Finding WITH severity = 'Critical' AND exploitVerified = true"
    ),
    "critical CVEs on high-risk machines": (
        "FIND Finding WITH severity = 'Critical' THAT IDENTIFIED << HostAgent WITH riskScore = 'High'"
    ),
    "machines without a logon user": "FIND HostAgent THAT !HAS microsoft_defender_logon_user",
    "inactive machines (no hop)": "FIND HostAgent WITH healthStatus != 'Active'",
}
TWO_HOP = {
    "admins on high-exposure machines with critical CVEs (WHERE, COUNT)": (
        "FIND microsoft_defender_logon_user AS u THAT HAS << HostAgent AS m "
        "THAT IDENTIFIED AS r Finding AS v "
        "WHERE v.severity = 'Critical' AND m.exposureLevel = 'High' AND u.isDomainAdmin = true "
        "RETURN u.displayName, COUNT(v)"
    ),
    "critical CVEs -> machines -> logon users (WHERE across aliases)": (
        "FIND Finding WITH severity = 'Critical' AS v THAT IDENTIFIED << HostAgent AS m "
        "THAT HAS microsoft_defender_logon_user AS u "
        "WHERE m.riskScore = 'High' AND u.lastSeenOn >= m.firstSeenOn "
        "RETURN v.displayName, COUNT(m) ORDER BY COUNT(m) DESC LIMIT 10"
    ),
}


def commit(store: SnapshotStore, graph: Graph) -> tuple[CommitResult, float]:
    t = time.perf_counter()
    result = commit_graph(store, graph, datetime.now(UTC), TENANT)
    return result, time.perf_counter() - t


def best(fn: Any, n: int = 3) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def twenty_rules(name: str = "bench-rule") -> list[Rule]:
    """The four shipped query rules and 16 questions that return entities (alert-like)."""
    pack = Path(__file__).resolve().parents[1] / "alerts" / "queries.yaml"
    texts = [r["query"] for r in safe_yaml.load_file(pack)["rules"]]
    texts += [
        q.query
        for qu in load_questions()
        for q in qu.queries
        if "RETURN" not in q.query and q.query not in texts
    ]
    texts.append(
        "FIND HostAgent WITH riskScore = 'High' "
        "THAT HAS microsoft_defender_logon_user WITH isDomainAdmin = true"
    )
    texts = texts[:20]
    rules = []
    for i, text in enumerate(texts):
        raw = {"name": f"{name}-{i}", "query": text, "sinks": ["s"]}
        rule, errors = compile_rule(raw, "bench", i, ["s"])
        assert rule is not None, errors
        rules.append(rule)
    return rules


def evaluator_process(conn: Any, url: str, prefix: str) -> None:
    """The query evaluator in its own process: on "evaluate", 20 rules of its own over the
    latest generation (the kept graph advanced by the stored change sets when it can), timed."""
    client = redis.Redis.from_url(url)
    rules = twenty_rules("bench-evaluator")
    while (msg := conn.recv()) != "stop":
        assert msg == "evaluate"
        t = time.perf_counter()
        evals = evaluate_on_latest(client, prefix, TENANT, rules, long_lived=True)
        conn.send(
            {
                "seconds": round(time.perf_counter() - t, 3),
                "incremental_rules": sum(e.incremental for e in evals),
                "events": sum(len(e.events) for e in evals),
                "errors": [e.error for e in evals if e.error],
            }
        )
    conn.send(round(peak_rss_mb(), 1))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (getrusage's ru_maxrss would count the parent's memory
    at the fork that preceded spawn's exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run(scale: float, url: str) -> dict[str, Any]:
    out: dict[str, Any] = {"scale": scale}
    client = redis.Redis.from_url(url)
    prefix = f"mdebench-query-{uuid.uuid4().hex[:8]}"
    store = SnapshotStore(client, prefix)
    try:
        t = time.perf_counter()
        sim = generate_tenant(
            machines=int(10_000 * scale),
            users=int(20_000 * scale),
            vulns_per_machine=30,
            cves=3_000,
            logon_users_per_machine=3,
            seed=7,
            base_time=datetime.now(UTC) - timedelta(hours=1),
        )
        graph = build(sim, TENANT, identities=False)
        out["items"] = len(graph.entities) + len(graph.relationships)
        out["pairs"] = sim.pair_count()
        out["generate_s"] = round(time.perf_counter() - t, 2)
        commit(store, graph)

        # load: Redis -> Graph -> QueryGraph, and the floor
        clear_cache()
        gc.collect()
        load_s, qg = best(lambda: (clear_cache(), load_query_graph(client, prefix, TENANT))[1], 1)
        assert qg is not None
        out["load_s"] = round(load_s, 3)
        blob = orjson.dumps([*graph.entities.values(), *graph.relationships.values()])
        gc.collect()
        t = time.perf_counter()
        orjson.loads(blob)
        out["json_parse_floor_s"] = round(time.perf_counter() - t, 3)
        out["load_ratio_to_floor"] = round(out["load_s"] / out["json_parse_floor_s"], 2)
        del blob

        # queries once loaded
        for label, group in (("single_hop", SINGLE_HOP), ("two_hop_where", TWO_HOP)):
            res = {}
            for name, text in group.items():
                plan = compile_query(text)
                s, doc = best(lambda p=plan: execute(p, [qg], max_rows=None))
                res[name] = {"seconds": round(s, 4), "rows": doc["count"]}
            out[label] = res

        # query graph memory per item: the index and the relationships as the graph holds them
        # (they are read from Redis as dicts); the entity dicts are not counted
        ents = [dict(e) for e in qg.entities.values()]
        bodies = [orjson.dumps(r) for r in qg.relationships.values()]
        n_items = len(ents) + len(bodies)
        gc.collect()
        tracemalloc.start()
        rels = [orjson.loads(b) for b in bodies]
        index = QueryGraph.from_items(TENANT, 1, ents, rels)
        del rels
        gc.collect()
        size, _peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del index
        out["index_bytes_per_item"] = round(size / n_items, 1)
        del ents, bodies

        # syncs 2 and 3, as a real tenant's next syncs: every active machine's lastSeen moves
        # and 2% of the machines change risk; diff-and-commit vs 20 query rules after it.
        # Evaluated in the syncing process: sync 2 finds the previous generation there
        # (incremental), sync 3 does not (as when another worker ran the previous sync): whole.
        # Evaluated by the query evaluator (another process that keeps the graph): the sync
        # stores its change set, the evaluator applies it, whichever process synced.
        rules = twenty_rules()
        evaluate(client, prefix, TENANT, rules, qg)  # baselines
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        evaluator = ctx.Process(target=evaluator_process, args=(child, url, prefix), daemon=True)
        evaluator.start()
        parent.send("evaluate")  # loads generation 1 and records the baselines
        out["evaluator_first"] = parent.recv()
        for sync, warm in ((2, True), (3, False)):
            seen = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            for mid, m in sim.machines.items():  # active machines report in; others stay quiet
                if m.get("healthStatus") == "Active":
                    sim.set_machine(mid, lastSeen=seen)
            for mid in sorted(sim.machines)[sync::50]:
                old = sim.machines[mid]["riskScore"]
                sim.set_machine(mid, riskScore="High" if old != "High" else "Low")
            graph2 = build(sim, TENANT, identities=False)
            if not warm:
                clear_cache()
                forget_known_sets()
            gc.collect()
            result, commit_s = commit(store, graph2)
            t = time.perf_counter()
            save_change_set(client, prefix, result, graph2, rules_types(rules))
            save_s = time.perf_counter() - t
            t = time.perf_counter()
            qg2, delta = graph_after_commit(store, TENANT, result, graph2)
            built_s = time.perf_counter() - t
            evals = evaluate(client, prefix, TENANT, rules, qg2, delta=delta)
            rules_s = time.perf_counter() - t
            parent.send("evaluate")
            ev = parent.recv()
            out[f"sync{sync}"] = {
                "previous_generation_in_process": warm,
                "diff_commit_s": round(commit_s, 3),
                "query_rules_s": round(rules_s, 3),
                "index_update_s": round(built_s, 3),
                "share": round(rules_s / commit_s, 3),
                "incremental_rules": sum(e.incremental for e in evals),
                "events": sum(len(e.events) for e in evals),
                "errors": [e.error for e in evals if e.error],
                "save_change_set_s": round(save_s, 4),
                "change_set_bytes": len(
                    client.get(changes_key(prefix, TENANT, result.generation)) or b""
                ),
                "evaluator": {**ev, "share": round(ev["seconds"] / commit_s, 3)},
            }
            del graph2, qg2, delta
        parent.send("stop")
        out["evaluator_rss_mb"] = parent.recv()
        out["evaluator_rss_bytes_per_item"] = round(out["evaluator_rss_mb"] * 2**20 / out["items"])
        evaluator.join(timeout=30)
    finally:
        delete_prefix(client, prefix)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = run(args.scale, args.redis_url)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"tenant: {out['items']:,} items ({out['pairs']:,} machine-CVE pairs), scale {out['scale']}"
    )
    print(
        f"load into the query index: {out['load_s']:.2f} s; JSON-parse floor"
        f" {out['json_parse_floor_s']:.2f} s; ratio {out['load_ratio_to_floor']}"
    )
    for label, target in (("single_hop", 0.2), ("two_hop_where", 1.0)):
        for name, r in out[label].items():
            ok = "ok" if r["seconds"] <= target else "OVER"
            print(
                f"  {label:14} {r['seconds']:.3f} s (<= {target} s {ok})  {r['rows']:>6} rows  {name}"
            )
    for sync in ("sync2", "sync3"):
        r = out[sync]
        how = (
            "previous generation in this process: incremental"
            if r["previous_generation_in_process"]
            else "previous generation not in this process: whole"
        )
        print(
            f"{sync[:4]} {sync[4:]}: diff-and-commit {r['diff_commit_s']:.2f} s"
            f" (+ {r['save_change_set_s'] * 1000:.0f} ms to store its change set,"
            f" {r['change_set_bytes']:,} bytes)"
        )
        print(
            f"  evaluated in the syncing process ({how}): {r['query_rules_s']:.2f} s"
            f" (index {r['index_update_s']:.2f} s, {r['incremental_rules']} rules incremental,"
            f" {r['events']} events) = {r['share'] * 100:.1f}%"
        )
        e = r["evaluator"]
        added = r["save_change_set_s"] + e["seconds"]
        print(
            f"  evaluated by the query evaluator (another process, graph kept): {e['seconds']:.2f} s"
            f" ({e['incremental_rules']} rules incremental, {e['events']} events);"
            f" with storing the change set {added:.2f} s = {added / r['diff_commit_s'] * 100:.1f}%"
            " (target <= 10%)"
        )
    print(
        f"query graph memory: {out['index_bytes_per_item']} bytes per item"
        " (index and relationships, entity dicts excluded)"
    )
    print(
        f"query evaluator: first load {out['evaluator_first']['seconds']:.2f} s; peak RSS"
        f" {out['evaluator_rss_mb']:,.0f} MB = {out['evaluator_rss_bytes_per_item']:,} bytes per"
        " item (items included)"
    )


if __name__ == "__main__":
    main()
