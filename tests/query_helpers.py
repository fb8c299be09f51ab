"""A generated tenant in the real model shape (simulator data -> GraphBuilder), committed twice.

`build` and `commit_graph` are also what bench/query.py measures with."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from monitor import safe_yaml
from monitor.alerts.rules import Rule, compile_rule
from monitor.config import DetectSettings, EventSettings, IdentitySettings, TenantConfig
from monitor.model import schema
from monitor.model.builder import GraphBuilder
from monitor.model.graph import Graph, ScopeState, ScopeStatus
from monitor.model.identity import map_logon_users
from monitor.questions import load_questions
from monitor.simulator.generate import generate_tenant
from monitor.simulator.tenant import SimTenant
from monitor.snapshot.commit import CommitResult, detect_and_commit
from monitor.snapshot.store import SnapshotStore

TENANT = "contoso"


def build(sim: SimTenant, name: str = TENANT, *, identities: bool = True) -> Graph:
    """The Graph a complete sync of `sim` produces (without the identity mapping when not
    `identities`: no logon user IS user relationships, no directoryUserState)."""
    cfg = TenantConfig(
        name=name, tenant_id=sim.tenant_id, client_id=sim.client_id, client_secret="unused"
    )
    b = GraphBuilder(cfg)
    b.add_account(sim.organization)
    b.add_users(sim.users.values())
    b.add_machines(sim.machines.values())
    b.add_machine_vulnerabilities(sim.machine_vulnerability_list(), sim.vulnerability_list())
    for mid, entries in sim.logon_users.items():
        b.add_logon_users(mid, entries)
    for scope in (
        schema.SCOPE_ACCOUNT,
        schema.SCOPE_USERS,
        schema.SCOPE_MACHINES,
        schema.SCOPE_VULNERABILITIES,
    ):
        b.set_scope(scope, ScopeStatus(ScopeState.COMPLETE, b.count(scope)))
    for mid in sim.machines:
        b.set_scope(schema.logon_users_scope(mid), ScopeStatus(ScopeState.COMPLETE))
    graph = b.graph()
    if identities:
        map_logon_users(graph, IdentitySettings())  # logon user IS user, directoryUserState
    return graph


def commit_graph(
    store: SnapshotStore, graph: Graph, when: datetime, name: str = TENANT
) -> CommitResult:
    """Diff and commit `graph` as a sync that started and finished at `when`."""
    stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return detect_and_commit(
        store,
        tenant=name,
        graph=graph,
        meta={"started": stamp, "finished": stamp},
        detect=DetectSettings(),
        events=EventSettings(),
        lock=None,
    )


@dataclass
class Generated:
    graph: Graph
    new_machines: set[str] = field(default_factory=set)  # machine _keys added in sync 2
    risk_changed: set[str] = field(default_factory=set)  # machine _keys whose risk moved


def generated_tenant(store: SnapshotStore, seed: int = 11) -> Generated:
    """Sync 1 ten days ago; sync 2 an hour ago with 3 new machines and 2 risk changes."""
    now = datetime.now(UTC)
    sim = generate_tenant(
        machines=150,
        users=160,
        vulns_per_machine=6,
        cves=80,
        logon_users_per_machine=2,
        seed=seed,
        base_time=now - timedelta(hours=2),
    )
    ids = sorted(sim.machines)
    # facts some questions need, whatever the seed gives
    sim.set_machine(ids[0], machineTags=["VIP"], healthStatus="Inactive")
    sim.set_machine(ids[1], machineTags=["VIP", "Finance"])
    account = sim.logon_users[ids[2]][0].get("accountName")
    for u in sim.users.values():  # a disabled directory user who still logs on
        upn = str(u.get("userPrincipalName"))
        if isinstance(account, str) and upn.lower().startswith(account + "@"):
            domain = upn.split("@", 1)[1]
            sim.set_user(u["id"], accountEnabled=False, userPrincipalName=f"{account}@{domain}")
            break
    commit_graph(store, build(sim), now - timedelta(days=10))
    out = Generated(graph=Graph())
    for _ in range(3):
        m = sim.add_machine()
        out.new_machines.add(schema.MACHINE.key(m["id"]))
    for mid in ids[5:7]:
        old = sim.machines[mid]["riskScore"]
        sim.set_machine(mid, riskScore="Medium" if old == "High" else "High")
        out.risk_changed.add(schema.MACHINE.key(mid))
    out.graph = build(sim)
    commit_graph(store, out.graph, now - timedelta(hours=1))
    return out


# beyond the shipped rules and questions: negations with filtered targets, three hops,
# relationship filters, mapped targets, either-direction and alternative verbs
EXTRA = [
    "FIND HostAgent THAT !HAS microsoft_defender_logon_user WITH isDomainAdmin = true",
    "FIND HostAgent WITH riskScore = 'High' THAT !IDENTIFIED Finding WITH severity = 'Critical'",
    "FIND microsoft_defender_user THAT IS << microsoft_defender_logon_user THAT HAS << HostAgent"
    " WITH riskScore = ('High' OR 'Medium')",
    "FIND Finding WITH severity = 'Critical' THAT IDENTIFIED << HostAgent"
    " THAT HAS microsoft_defender_logon_user WITH isDomainAdmin = true",
    "FIND HostAgent AS m THAT IDENTIFIED AS r Finding AS v"
    " WHERE v.severity = 'High' AND m.exposureLevel != 'Low'",
    "FIND cve THAT IS << Finding WITH severity = ('Critical' OR 'High')",
    "FIND HostAgent THAT RELATES TO Finding WITH exploitVerified = true",
    "FIND HostAgent THAT (HAS|IDENTIFIED) (microsoft_defender_logon_user|Finding)",
    "FIND microsoft_defender_user WITH accountEnabled = false"
    " THAT IS << microsoft_defender_logon_user",
]


def rules_under_test() -> list[Rule]:
    pack = Path(__file__).resolve().parents[1] / "alerts" / "queries.yaml"
    texts = [r["query"] for r in safe_yaml.load_file(pack)["rules"]]
    texts += [q.query for qu in load_questions() for q in qu.queries]
    texts += EXTRA
    rules = []
    for i, text in enumerate(dict.fromkeys(texts)):
        rule, errors = compile_rule({"name": f"r{i}", "query": text, "sinks": ["s"]}, "t", i, ["s"])
        assert rule is not None, errors
        rules.append(rule)
    return rules


def renamed(rules: list[Rule], prefix: str) -> list[Rule]:
    out = []
    for i, r in enumerate(rules):
        raw = {"name": f"{prefix}-{r.name}", "query": r.query, "sinks": ["s"]}
        rule, _errors = compile_rule(raw, "t", i, ["s"])
        assert rule is not None
        out.append(rule)
    return out


def mutate(sim: SimTenant, rng: random.Random) -> None:
    """One sync's worth of changes of every kind (to a tenant of 100 machines or more)."""
    sim.touch_all_machines()  # lastSeen moves on every machine, as in a real tenant
    ids = sorted(sim.machines)
    for mid in rng.sample(ids, 6):
        sim.set_machine(
            mid,
            riskScore=rng.choice(["Low", "Medium", "High", "Critical"]),
            healthStatus=rng.choice(["Active", "Inactive", "ImpairedCommunication"]),
            exposureLevel=rng.choice(["Low", "Medium", "High"]),
        )
    for mid in rng.sample(ids, 2):
        sim.remove_machine(mid)
    for _ in range(2):
        m = sim.add_machine()
        for cve in rng.sample(sorted(sim.cves), 3):
            sim.add_machine_vuln(m["id"], cve)
        sim.add_logon_user(m["id"])
    for cve in rng.sample(sorted(sim.cves), 3):
        sim.set_cve(
            cve,
            severity=rng.choice(["Low", "Medium", "High", "Critical"]),
            publicExploit=rng.random() < 0.5,
            exploitVerified=rng.random() < 0.5,
        )
    ids = sorted(sim.machines)
    for mid in rng.sample(ids, 4):
        vulns = sim.machine_vulns.get(mid) or []
        if vulns:
            sim.remove_machine_vuln(mid, rng.choice(vulns))
        sim.add_machine_vuln(mid, rng.choice(sorted(sim.cves)))
    for mid in rng.sample(ids, 4):
        users = sim.logon_users.get(mid) or []
        if users and rng.random() < 0.5:
            sim.remove_logon_user(mid, users[0]["id"])
        else:
            try:
                lu = sim.add_logon_user(mid)
            except ValueError:  # the generated account already logs on there
                continue
            if rng.random() < 0.5:
                sim.logon_users[mid][-1] = {**lu, "isDomainAdmin": True}
    for uid in rng.sample(sorted(sim.users), 3):
        sim.set_user(uid, accountEnabled=rng.random() < 0.5)


def mutable_tenant(seed: int, now: datetime) -> SimTenant:
    """A tenant of 120 machines that `mutate` can change sync after sync."""
    return generate_tenant(
        machines=120,
        users=140,
        vulns_per_machine=5,
        cves=60,
        logon_users_per_machine=2,
        seed=seed,
        base_time=now - timedelta(hours=3),
    )


def paired_rules() -> tuple[list[Rule], list[Rule], list[Rule]]:
    """`rules_under_test()`, and two renamed copies of it (incremental and whole runs keep
    their own stored sets)."""
    base = rules_under_test()
    return base, renamed(base, "inc"), renamed(base, "whole")
