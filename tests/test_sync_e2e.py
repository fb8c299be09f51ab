"""End to end over real HTTPS and real Redis: simulator mutations -> exactly the expected events."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sync_helpers import sim_settings

from monitor.config import Settings
from monitor.events.stream import read_range
from monitor.model.schema import level_rank
from monitor.simulator import Fault, SimTenant, Simulator, generate_tenant
from monitor.snapshot.store import SnapshotStore
from monitor.sync import run_sync


@pytest.fixture
def world(tmp_path: Path, redis_prefix: str) -> Iterator[tuple[Simulator, SimTenant, Settings]]:
    tenant = generate_tenant(
        machines=20, users=10, vulns_per_machine=3, cves=25, logon_users_per_machine=1, seed=5
    )
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        yield sim, sim.tenant(tenant.tenant_id), sim_settings(sim, redis_prefix)


def events_of(client: redis.Redis, settings: Settings, generation: int) -> list[dict[str, Any]]:
    """The change events of one generation (the shipped query rules' mde.query.* events, which
    follow the simulator's lastSeen moves, are tested in test_query_rules.py)."""
    return [
        ev
        for _, ev in read_range(client, settings.redis_prefix, settings.tenants[0].name)
        if ev["data"]["generation"] == generation and not ev["type"].startswith("mde.query.")
    ]


def pairs(t: SimTenant) -> set[tuple[str, str]]:
    return {(mid, cve) for mid, cves in t.machine_vulns.items() for cve in cves}


def test_mutations_give_exactly_the_expected_events(
    world: tuple[Simulator, SimTenant, Settings], redis_client: redis.Redis
) -> None:
    _sim, t, settings = world
    name = settings.tenants[0].name
    first = run_sync(settings, name, redis_client=redis_client)
    assert first.status == "ok" and first.baseline
    assert [e["type"] for e in events_of(redis_client, settings, first.generation or 0)] == [
        "mde.sync.baseline"
    ]

    machine_ids = list(t.machines)
    risky = [m for m in machine_ids if (level_rank(t.machines[m]["riskScore"]) or 0) < 4][:3]
    rest = [m for m in machine_ids if m not in risky]
    removed, logon_target, pair_machine, new_pair_machine = rest[0:2], rest[2], rest[3], rest[4]
    before_pairs = pairs(t)
    before_logon = {lu["id"]: mid for mid, lus in t.logon_users.items() for lu in lus}
    user_id = next(u for u, doc in t.users.items() if doc.get("accountEnabled", True))
    # identity: disabling an account changes only volatile mirrors on its employee and mapped
    # logon accounts (directoryAccountEnabled, directoryUserState): no extra events
    for m in risky:
        t.set_machine(m, riskScore="High")
    for m in removed:
        t.remove_machine(m)
    added = t.add_machine()
    t.set_user(user_id, accountEnabled=False)
    new_user = t.add_user()
    template = next(lu for lus in t.logon_users.values() for lu in lus)
    new_logon = t.add_logon_user(
        logon_target,
        {
            **template,
            "id": "e2e\\new.admin",
            "accountName": "new.admin",
            "accountDomain": "E2E",
            "isDomainAdmin": True,
        },
    )
    dropped_cve = t.machine_vulns[pair_machine][0]
    t.remove_machine_vuln(pair_machine, dropped_cve)
    new_cve = next(
        c
        for c in sorted({c for _, c in before_pairs})
        if c not in t.machine_vulns[new_pair_machine]
    )
    t.add_machine_vuln(new_pair_machine, new_cve)
    t.touch_all_machines()

    second = run_sync(settings, name, redis_client=redis_client)
    assert second.status == "ok", second.scopes_incomplete
    got = Counter(
        (e["type"], e["subject"]) for e in events_of(redis_client, settings, second.generation or 0)
    )

    mkey = "microsoft_defender_machine:{}".format
    vkey = "microsoft_defender_vulnerability:{}".format
    expected: Counter[tuple[str, str]] = Counter()
    for m in risky:
        expected[("mde.machine.updated", mkey(m))] += 1
        expected[("mde.machine.risk_raised", mkey(m))] += 1
    for m in removed:
        expected[("mde.machine.deleted", mkey(m))] += 1
    expected[("mde.machine.created", mkey(added["id"]))] += 1
    expected[("mde.user.updated", f"microsoft_defender_user:{user_id}")] += 1
    expected[("mde.user.disabled", f"microsoft_defender_user:{user_id}")] += 1
    expected[("mde.user.created", f"microsoft_defender_user:{new_user['id']}")] += 1
    lu_key = f"microsoft_defender_logon_user:{new_logon['id']}"
    expected[("mde.machine_logon_user.added", f"{mkey(logon_target)}|has|{lu_key}")] += 1
    if new_logon["id"] not in before_logon:
        expected[("mde.logon_user.created", lu_key)] += 1
    expected[
        (
            "mde.machine_vulnerability.resolved",
            f"{mkey(pair_machine)}|identified|{vkey(dropped_cve)}",
        )
    ] += 1
    expected[
        (
            "mde.machine_vulnerability.identified",
            f"{mkey(new_pair_machine)}|identified|{vkey(new_cve)}",
        )
    ] += 1
    # Side effects that are real changes too: CVEs and logon accounts that only the removed
    # machines (or the dropped pair) carried are gone from the tenant.
    after = pairs(t)
    for cve in {c for _, c in before_pairs} - {c for _, c in after}:
        expected[("mde.vulnerability.deleted", vkey(cve))] += 1
    remaining_logon = {lu["id"] for lus in t.logon_users.values() for lu in lus}
    for lu_id in set(before_logon) - remaining_logon:
        expected[("mde.logon_user.deleted", f"microsoft_defender_logon_user:{lu_id}")] += 1
    # The new machine's logon users come with its `created` event: no separate baseline.
    assert got == expected

    # A third sync with no change at all produces no event.
    third = run_sync(settings, name, redis_client=redis_client)
    assert events_of(redis_client, settings, third.generation or 0) == []


@pytest.mark.parametrize(
    ("endpoint", "kind", "status", "scope"),
    [
        ("defender:/api/machines", "status", 503, "machines"),
        ("defender:/api/machines", "status", 401, "machines"),
        ("graph:/users/delta", "status", 403, "users"),
        (
            "defender:/api/vulnerabilities/machinesVulnerabilities",
            "truncated",
            None,
            "vulnerabilities",
        ),
        ("defender:/api/vulnerabilities", "malformed", None, "vulnerabilities"),
        ("graph:/organization", "hang", None, "account"),
        ("defender:/api/machines/{id}/logonusers", "status", 500, "logon_users"),
    ],
)
def test_fault_on_a_resource_keeps_its_items_and_says_so(
    world: tuple[Simulator, SimTenant, Settings],
    redis_client: redis.Redis,
    endpoint: str,
    kind: str,
    status: int | None,
    scope: str,
) -> None:
    sim, _t, settings = world
    name = settings.tenants[0].name
    run_sync(settings, name, redis_client=redis_client)
    store = SnapshotStore(redis_client, settings.redis_prefix)
    before = store.load_graph(name)
    assert before is not None
    fault = Fault(endpoint=endpoint, kind=kind, times=None, seconds=3)
    if status is not None:
        fault = Fault(endpoint=endpoint, kind="status", status=status, times=None)
    sim.add_fault(fault)
    summary = run_sync(settings, name, redis_client=redis_client)
    assert summary.status == "degraded"
    evs = events_of(redis_client, settings, summary.generation or 0)
    types = [e["type"] for e in evs]
    assert types == ["mde.sync.degraded"], types
    assert scope in str(evs[0]["data"]["scopes"])
    after = store.load_graph(name)
    assert after is not None
    assert set(after.entities) == set(before.entities)
    assert set(after.relationships) == set(before.relationships)


def test_sign_in_failure_is_one_failed_event(
    world: tuple[Simulator, SimTenant, Settings], redis_client: redis.Redis
) -> None:
    _sim, t, settings = world
    name = settings.tenants[0].name
    ok = run_sync(settings, name, redis_client=redis_client)
    t.set_client_secret("rotated-by-someone-else")
    failed = run_sync(settings, name, redis_client=redis_client)
    assert failed.status == "failed" and "AADSTS7000215" in (failed.error or "")
    evs = [ev for _, ev in read_range(redis_client, settings.redis_prefix, name)]
    assert [e["type"] for e in evs] == ["mde.sync.baseline", "mde.sync.failed"]
    assert "rotated-by-someone-else" not in str(evs)
    store = SnapshotStore(redis_client, settings.redis_prefix)
    assert store.generation(name) == ok.generation


def test_logon_user_rotation_invents_no_updates(
    tmp_path: Path, redis_client: redis.Redis, redis_prefix: str
) -> None:
    # Accounts seen on several machines, a budget that refreshes a few machines per sync: the
    # per-machine facts of a shared account (first seen, logon types) differ between machines,
    # and must not read as changes of the account when other machines are refreshed.
    tenant = generate_tenant(
        machines=30, users=8, vulns_per_machine=1, cves=5, logon_users_per_machine=2, seed=3
    )
    reports: dict[str, int] = Counter(lu["id"] for lus in tenant.logon_users.values() for lu in lus)
    assert any(n > 1 for n in reports.values())
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        settings = sim_settings(sim, redis_prefix, logon_user_budget=7)
        for _ in range(5):
            summary = run_sync(settings, "sim", redis_client=redis_client)
            assert summary.status == "ok"
            # only the machines fetched for the first time: one baseline event, nothing else
            assert set(summary.events) <= {"mde.sync.baseline"}, summary.events
        graph = SnapshotStore(redis_client, redis_prefix).load_graph("sim")
        assert graph is not None
        rels = [
            r
            for r in graph.relationships.values()
            if r["_type"] == "microsoft_defender_machine_has_logon_user"
        ]
        assert len(rels) == sum(len(v) for v in tenant.logon_users.values())
        assert all("logonTypes" in r and r["firstSeenOn"] for r in rels)
