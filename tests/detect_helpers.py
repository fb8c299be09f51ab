"""Synthetic tenants for the detect tests: a mutable description, and a Graph built from it in
the item shape the converters produce (schema keys, `_fromEntityKey`/`_toEntityKey`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.config import DetectSettings, EventSettings
from monitor.events import stream
from monitor.events.envelope import Event, event_id
from monitor.model import schema
from monitor.model.graph import Graph, Item, ScopeState, ScopeStatus
from monitor.snapshot.commit import CommitResult, detect_and_commit
from monitor.snapshot.lock import TenantLock
from monitor.snapshot.store import SnapshotStore

TENANT = "contoso"
TENANT_ID = "11111111-2222-3333-4444-555555555555"
T0 = 1_700_000_000_000  # epoch ms


def _rel(rtype: schema.RelationshipType, src: str, dst: str, **props: Any) -> Item:
    return {
        "_key": rtype.key(src, dst),
        "_type": rtype.type,
        "_class": [rtype.rel_class],
        "_fromEntityKey": src,
        "_toEntityKey": dst,
        "displayName": rtype.rel_class,
        **props,
    }


def machine_key(mid: str) -> str:
    return schema.MACHINE.key(mid)


def user_key(uid: str) -> str:
    return schema.USER.key(uid)


def logon_key(lid: str) -> str:
    return schema.LOGON_USER.key(lid)


def vuln_key(cve: str) -> str:
    return schema.VULNERABILITY.key(cve)


def pair_key(mid: str, cve: str) -> str:
    return schema.MACHINE_IDENTIFIED_VULNERABILITY.key(machine_key(mid), vuln_key(cve))


def logon_rel_key(mid: str, lid: str) -> str:
    return schema.MACHINE_HAS_LOGON_USER.key(machine_key(mid), logon_key(lid))


@dataclass
class Tenant:
    """What the Microsoft side holds; mutate it between syncs."""

    machines: dict[str, dict[str, Any]] = field(default_factory=dict)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    logon_users: dict[str, dict[str, Any]] = field(default_factory=dict)
    logons: dict[str, set[str]] = field(default_factory=dict)  # machine id -> logon user ids
    vulns: dict[str, dict[str, Any]] = field(default_factory=dict)
    pairs: set[tuple[str, str]] = field(default_factory=set)  # (machine id, CVE)
    org_name: str = "Contoso"

    def copy(self) -> Tenant:
        return copy.deepcopy(self)

    def add_machine(self, mid: str, **props: Any) -> None:
        self.machines[mid] = {
            "computerDnsName": f"{mid}.contoso.local",
            "riskScore": "Low",
            "exposureLevel": "Low",
            "healthStatus": "Active",
            "onboardingStatus": "Onboarded",
            "defenderAvStatus": "Updated",
            "machineTags": [],
            "lastSeenOn": T0,
            "osPlatform": "Windows11",
            "vmMetadata": {"cloudProvider": None, "vmId": None},
            **props,
        }

    def add_user(self, uid: str, **props: Any) -> None:
        self.users[uid] = {
            "displayName": f"User {uid}",
            "userPrincipalName": f"{uid}@contoso.com",
            "accountEnabled": True,
            "active": True,
            "jobTitle": "Engineer",
            **props,
        }

    def add_logon(self, mid: str, lid: str, **props: Any) -> None:
        self.logon_users.setdefault(
            lid, {"accountName": lid, "accountDomain": "CONTOSO", "isDomainAdmin": False, **props}
        )
        self.logons.setdefault(mid, set()).add(lid)

    def add_vuln(self, cve: str, **props: Any) -> None:
        self.vulns[cve] = {
            "severity": "High",
            "cvssV3": 7.5,
            "publicExploit": False,
            "updatedOn": T0,
            **props,
        }

    def remove_machine(self, mid: str) -> None:
        del self.machines[mid]
        self.logons.pop(mid, None)
        self.pairs = {p for p in self.pairs if p[0] != mid}


def standard_tenant(machines: int = 10, users: int = 8, vulns: int = 6) -> Tenant:
    """m0.. with two CVEs each, u0.., logon users l0..l4 spread over the first machines."""
    t = Tenant()
    for i in range(machines):
        t.add_machine(f"m{i:02d}", machineTags=["corp"] if i % 2 else [])
    for i in range(users):
        t.add_user(f"u{i:02d}")
    for i in range(vulns):
        t.add_vuln(f"CVE-2024-{1000 + i}")
    cves = sorted(t.vulns)
    for i, mid in enumerate(sorted(t.machines)):
        t.pairs.add((mid, cves[i % len(cves)]))
        t.pairs.add((mid, cves[(i + 1) % len(cves)]))
    for i in range(min(5, machines)):
        t.add_logon(f"m{i:02d}", f"l{i}")
    t.add_logon("m00", "l1")
    return t


def build_graph(
    t: Tenant,
    *,
    states: dict[str, ScopeStatus] | None = None,
    omit_scopes: set[str] = frozenset(),  # type: ignore[assignment]
    logon_machines: set[str] | None = None,
) -> Graph:
    """The Graph a sync would produce. `omit_scopes`: scopes whose items are not fetched
    (give them a FAILED/SKIPPED status in `states`). `logon_machines`: machines whose logon
    users were fetched (default: all); the others get a budget-skip status."""
    g = Graph()
    acct = schema.ACCOUNT.key(TENANT_ID)
    fetch = {
        s: s not in omit_scopes
        for s in (
            schema.SCOPE_ACCOUNT,
            schema.SCOPE_USERS,
            schema.SCOPE_MACHINES,
            schema.SCOPE_VULNERABILITIES,
        )
    }
    if fetch[schema.SCOPE_ACCOUNT]:
        g.add_entity(
            {
                "_key": acct,
                "_type": schema.ACCOUNT.type,
                "_class": list(schema.ACCOUNT.classes),
                "id": TENANT_ID,
                "name": TENANT,
                "displayName": TENANT,
                "organizationName": t.org_name,
            },
            schema.SCOPE_ACCOUNT,
        )
    if fetch[schema.SCOPE_USERS]:
        for uid, props in sorted(t.users.items()):
            key = user_key(uid)
            g.add_entity(
                {
                    "_key": key,
                    "_type": schema.USER.type,
                    "_class": list(schema.USER.classes),
                    "id": uid,
                    "name": props["displayName"],
                    **props,
                    "_rawData": [{"name": "default", "rawData": {"id": uid, **props}}],
                },
                schema.SCOPE_USERS,
            )
            g.add_relationship(_rel(schema.ACCOUNT_HAS_USER, acct, key), schema.SCOPE_USERS)
    if fetch[schema.SCOPE_MACHINES]:
        for mid, props in sorted(t.machines.items()):
            key = machine_key(mid)
            name = props["computerDnsName"]
            g.add_entity(
                {
                    "_key": key,
                    "_type": schema.MACHINE.type,
                    "_class": list(schema.MACHINE.classes),
                    "id": mid,
                    "name": name,
                    "displayName": name,
                    **copy.deepcopy(props),
                    "_rawData": [{"name": "default", "rawData": {"id": mid, **props}}],
                },
                schema.SCOPE_MACHINES,
            )
            dev = schema.DEVICE.key(mid)
            g.add_entity(
                {
                    "_key": dev,
                    "_type": schema.DEVICE.type,
                    "_class": list(schema.DEVICE.classes),
                    "displayName": name,
                    "hostname": name,
                    "lastSeenOn": props["lastSeenOn"],
                    "osPlatform": props.get("osPlatform"),
                },
                schema.SCOPE_MACHINES,
            )
            g.add_relationship(_rel(schema.ACCOUNT_HAS_MACHINE, acct, key), schema.SCOPE_MACHINES)
            g.add_relationship(_rel(schema.MACHINE_MANAGES_DEVICE, key, dev), schema.SCOPE_MACHINES)
    if fetch[schema.SCOPE_VULNERABILITIES]:
        used = {cve for _m, cve in t.pairs}
        for cve in sorted(used):
            props = t.vulns[cve]
            key = vuln_key(cve)
            g.add_entity(
                {
                    "_key": key,
                    "_type": schema.VULNERABILITY.type,
                    "_class": list(schema.VULNERABILITY.classes),
                    "id": cve,
                    "name": cve,
                    "displayName": cve,
                    **props,
                },
                schema.SCOPE_VULNERABILITIES,
            )
            mapped = schema.VULNERABILITY_IS_CVE
            g.add_relationship(
                {
                    "_key": mapped.key(key, cve.lower()),
                    "_type": mapped.type,
                    "_class": [mapped.rel_class],
                    "displayName": mapped.rel_class,
                    "_mapping": {
                        "sourceEntityKey": key,
                        "relationshipDirection": mapped.direction,
                        "targetFilterKeys": [["_type", "_key"]],
                        "skipTargetCreation": False,
                        "targetEntity": {"_type": "cve", "_key": cve.lower(), "name": cve},
                    },
                },
                schema.SCOPE_VULNERABILITIES,
            )
        for mid, cve in sorted(t.pairs):
            g.add_relationship(
                _rel(
                    schema.MACHINE_IDENTIFIED_VULNERABILITY,
                    machine_key(mid),
                    vuln_key(cve),
                    products=["microsoft windows_11 10.0"],
                ),
                schema.SCOPE_VULNERABILITIES,
            )
    statuses: dict[str, ScopeStatus] = {}
    for scope, fetched in fetch.items():
        statuses[scope] = ScopeStatus(ScopeState.COMPLETE if fetched else ScopeState.FAILED)
    if fetch[schema.SCOPE_MACHINES]:
        for mid in sorted(t.machines):
            scope = schema.logon_users_scope(mid)
            if logon_machines is not None and mid not in logon_machines:
                statuses[scope] = ScopeStatus(ScopeState.SKIPPED)
                continue
            if scope in omit_scopes:
                statuses[scope] = ScopeStatus(ScopeState.FAILED, 0, "HTTP 500 logonusers")
                continue
            for lid in sorted(t.logons.get(mid, ())):
                props = t.logon_users[lid]
                lkey = logon_key(lid)
                g.add_entity(
                    {
                        "_key": lkey,
                        "_type": schema.LOGON_USER.type,
                        "_class": list(schema.LOGON_USER.classes),
                        "id": lid,
                        "name": lid,
                        "displayName": lid,
                        "lastSeenOn": T0,
                        **props,
                    },
                    scope,
                )
                g.add_relationship(
                    _rel(schema.MACHINE_HAS_LOGON_USER, machine_key(mid), lkey), scope
                )
            statuses[scope] = ScopeStatus(ScopeState.COMPLETE, len(t.logons.get(mid, ())))
    for scope, status in statuses.items():
        if status.state is ScopeState.COMPLETE and status.count == 0:
            status.count = sum(1 for k, s in g.scope_of.items() if s == scope)
    statuses.update(states or {})
    g.scopes = statuses
    return g


def commit(
    store: SnapshotStore,
    graph: Graph,
    *,
    tenant: str = TENANT,
    detect: DetectSettings | None = None,
    lock: TenantLock | None = None,
    accept_drop: bool = False,
    finished: str = "2024-05-01T10:00:00.000Z",
) -> CommitResult:
    return detect_and_commit(
        store,
        tenant=tenant,
        graph=graph,
        meta={"started": finished, "finished": finished, "requests": {"machines": 1}},
        detect=detect or DetectSettings(),
        events=EventSettings(),
        lock=lock,
        accept_drop=accept_drop,
    )


def stored_events(client: redis.Redis, prefix: str, tenant: str | None = TENANT) -> list[Event]:
    return [ev for _sid, ev in stream.read_range(client, prefix, tenant)]


def kinds(events: list[Event]) -> list[tuple[str, str]]:
    """(type, subject) pairs, sorted, for exact comparisons."""
    return sorted((e["type"], e["subject"]) for e in events)


def mutated_tenant() -> Tenant:
    """standard_tenant() after a realistic hour: risk changes, machines gone and added, a user
    disabled and one added, a logon, a CVE pair moved, every machine's lastSeenOn moved."""
    t = standard_tenant()
    for mid in ("m01", "m02", "m03"):
        t.machines[mid]["riskScore"] = "High"
    t.remove_machine("m08")
    t.remove_machine("m09")
    t.add_machine("m10")
    t.users["u01"]["accountEnabled"] = False
    t.add_user("u99")
    t.add_logon("m03", "l0")
    t.pairs.discard(("m00", "CVE-2024-1000"))
    t.pairs.add(("m00", "CVE-2024-1003"))
    for m in t.machines.values():
        m["lastSeenOn"] += 3_600_000
    return t


MUTATION_EVENTS: list[tuple[str, str]] = sorted(
    [
        ("mde.machine.created", machine_key("m10")),
        ("mde.machine.deleted", machine_key("m08")),
        ("mde.machine.deleted", machine_key("m09")),
        ("mde.machine_logon_user.added", logon_rel_key("m03", "l0")),
        ("mde.machine_vulnerability.identified", pair_key("m00", "CVE-2024-1003")),
        ("mde.machine_vulnerability.resolved", pair_key("m00", "CVE-2024-1000")),
        ("mde.user.created", user_key("u99")),
        ("mde.user.disabled", user_key("u01")),
        ("mde.user.updated", user_key("u01")),
    ]
    + [
        (t, machine_key(m))
        for m in ("m01", "m02", "m03")
        for t in ("mde.machine.risk_raised", "mde.machine.updated")
    ]
)


def assert_mutation_once(client: redis.Redis, prefix: str, generation: int = 2) -> None:
    """After the baseline event, the mutation's events, each once, with ids of `generation`."""
    events = stored_events(client, prefix)[1:]
    assert kinds(events) == MUTATION_EVENTS
    assert len({e["id"] for e in events}) == len(events)
    for e in events:
        assert e["id"] == event_id(TENANT, e["subject"], e["type"], generation)
