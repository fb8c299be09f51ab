"""A generated tenant in the real model shape (simulator data -> GraphBuilder), committed twice.

`build` and `commit_graph` are also what bench/query.py measures with."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from monitor.config import DetectSettings, EventSettings, IdentitySettings, TenantConfig
from monitor.model import schema
from monitor.model.builder import GraphBuilder
from monitor.model.graph import Graph, ScopeState, ScopeStatus
from monitor.model.identity import map_logon_users
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
