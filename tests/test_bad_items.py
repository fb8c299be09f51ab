"""One bad record is one bad record: the simulator serves an unconvertible item, the real sync
path (HTTPS, Redis) rejects only that item, degrades only its scope and commits the others.
Any other crash of a sync records a failed status and one `mde.sync.failed` event."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sync_helpers import sim_settings

from monitor.config import Settings
from monitor.events.stream import read_range
from monitor.simulator import SimTenant, Simulator, generate_tenant
from monitor.snapshot.store import SnapshotStore
from monitor.sync import run_sync


@pytest.fixture
def world(tmp_path: Path, redis_prefix: str) -> Iterator[tuple[SimTenant, Settings]]:
    tenant = generate_tenant(
        machines=12, users=8, vulns_per_machine=3, cves=15, logon_users_per_machine=1, seed=11
    )
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        # every machine's logon users each sync
        settings = sim_settings(sim, redis_prefix, logon_user_budget=1000)
        yield sim.tenant(tenant.tenant_id), settings


def events(client: redis.Redis, settings: Settings, generation: int | None) -> list[dict]:
    return [
        ev
        for _, ev in read_range(client, settings.redis_prefix, settings.tenants[0].name)
        if ev["data"]["generation"] == generation
    ]


# Each case: put one bad item where the simulator serves it, and remove one good item of the
# same scope (whose deletion must NOT be applied: the scope is degraded, previous data kept).
# Returns (scope, the rejected item's text, the removed item's `_key`).
Inject = Callable[[SimTenant], tuple[str, str, str]]


def _bad_user(t: SimTenant) -> tuple[str, str, str]:
    gone = next(iter(t.users))
    t.remove_user(gone)
    t.users["no-id"] = {"displayName": "Nobody", "userPrincipalName": "nobody@example.com"}
    t.changed(vulns=False)
    index = list(t.users).index("no-id")
    return "users", f"users item {index}: user: field 'id'", f"microsoft_defender_user:{gone}"


def _bad_machine(t: SimTenant) -> tuple[str, str, str]:
    gone = next(iter(t.machines))
    t.remove_machine(gone)
    t.machines["junk"] = {"computerDnsName": "no-id.example.com", "osPlatform": "Windows11"}
    t.changed()
    index = list(t.machines).index("junk")
    return (
        "machines",
        f"machines item {index}: machine: field 'id'",
        f"microsoft_defender_machine:{gone}",
    )


def _bad_logon_user(t: SimTenant) -> tuple[str, str, str]:
    machine = next(m for m, lus in t.logon_users.items() if lus)
    gone = t.logon_users[machine][0]["id"]
    t.logon_users[machine] = [{"accountName": "ghost", "accountDomain": "x"}]
    t.changed(vulns=False)
    rel = f"microsoft_defender_machine:{machine}|has|microsoft_defender_logon_user:{gone}"
    return f"logon_users:{machine}", "logonusers item 0: logon user: field 'id'", rel


def _bad_cve(t: SimTenant) -> tuple[str, str, str]:
    machine, cves = next((m, c) for m, c in t.machine_vulns.items() if len(c) >= 2)
    t.remove_machine_vuln(machine, cves[0])  # a pair removed: must not be applied
    bad = cves[1]
    t.cves[bad] = {k: v for k, v in t.cves[bad].items() if k != "id"}
    t.changed()
    rel = (
        f"microsoft_defender_machine:{machine}|identified|"
        f"microsoft_defender_vulnerability:{cves[0]}"
    )
    return "vulnerabilities", "vulnerabilities item ", rel


def _bad_pair(t: SimTenant) -> tuple[str, str, str]:
    machine, cves = next((m, c) for m, c in t.machine_vulns.items() if len(c) >= 2)
    t.remove_machine_vuln(machine, cves[0])
    t.machine_vulns[machine] = [*t.machine_vulns[machine], None]  # type: ignore[list-item]
    t.changed()
    rel = (
        f"microsoft_defender_machine:{machine}|identified|"
        f"microsoft_defender_vulnerability:{cves[0]}"
    )
    return "vulnerabilities", "machinesVulnerabilities item ", rel


@pytest.mark.parametrize(
    "inject",
    [_bad_user, _bad_machine, _bad_logon_user, _bad_cve, _bad_pair],
    ids=["user", "machine", "logon-user", "cve", "pair"],
)
def test_bad_item_degrades_its_scope_only(
    world: tuple[SimTenant, Settings], redis_client: redis.Redis, inject: Inject
) -> None:
    t, settings = world
    name = settings.tenants[0].name
    first = run_sync(settings, name, redis_client=redis_client)
    assert first.status == "ok", first.scopes_incomplete

    scope, rejected, kept_key = inject(t)
    # a change in another scope, which must commit: a user disabled
    other_user = next(
        u
        for u, doc in t.users.items()
        if isinstance(doc, dict) and doc.get("id") and doc.get("accountEnabled", True)
    )
    if scope != "users":
        t.set_user(other_user, accountEnabled=False)

    second = run_sync(settings, name, redis_client=redis_client)
    assert second.status == "degraded"
    incomplete = dict(second.scopes_incomplete)
    if scope == "users":
        # logon accounts are mapped to directory users: with the users incomplete, this sync's
        # logon users are set aside (kept as before) rather than mapped against a partial list
        # (monitor.collect.identity)
        for s in [s for s in incomplete if s.startswith("logon_users:")]:
            assert "directory users incomplete" in (incomplete.pop(s) or "")
        assert "directory users incomplete" in (incomplete.pop("employees", "") or "")
    assert list(incomplete) == [scope]
    error = second.scopes_incomplete[scope] or ""
    if scope == "vulnerabilities" and "the catalogue lacks" in error:
        # a catalogue entry without an id also leaves its CVE missing from the catalogue: the
        # pairs-vs-catalogue cross-check names that first (monitor.collect.vulnerabilities)
        rejected = "the catalogue lacks 1 of"
    assert rejected in error and "previous" in error and "kept" in error, error

    got = events(redis_client, settings, second.generation)
    types = [e["type"] for e in got]
    assert types.count("mde.sync.degraded") == 1
    degraded = next(e for e in got if e["type"] == "mde.sync.degraded")
    assert rejected in str(degraded["data"])
    assert "mde.sync.failed" not in types
    # the degraded scope kept its previous data: the removed item is not deleted
    store = SnapshotStore(redis_client, settings.redis_prefix)
    assert kept_key in store.load_bodies(name, [kept_key])
    assert not [e for e in got if e["subject"] == kept_key]
    if scope != "users":  # the other scopes committed
        assert ("mde.user.disabled", f"microsoft_defender_user:{other_user}") in {
            (e["type"], e["subject"]) for e in got
        }


def test_any_crash_records_a_failed_sync_and_one_event(
    world: tuple[SimTenant, Settings], redis_client: redis.Redis
) -> None:
    _t, settings = world
    name = settings.tenants[0].name
    first = run_sync(settings, name, redis_client=redis_client)
    assert first.status == "ok"
    # Corrupt a key the sync reads (the logon-user refresh ledger is a hash): Redis answers
    # WRONGTYPE in the middle of the collection - an unexpected error, not an API problem.
    ledger = f"{settings.redis_prefix}:logon_refresh:{name}"
    redis_client.delete(ledger)
    redis_client.set(ledger, "not a hash")

    crashed = run_sync(settings, name, redis_client=redis_client)
    assert crashed.status == "failed"
    assert crashed.error is not None and "WRONGTYPE" in crashed.error
    assert settings.tenants[0].secret() not in crashed.error
    got = events(redis_client, settings, crashed.generation)
    failed = [e for e in got if e["type"] == "mde.sync.failed"]
    assert len(failed) == 1 and failed[0]["data"]["stage"] == "crash"
    assert "WRONGTYPE" in failed[0]["data"]["error"]
    store = SnapshotStore(redis_client, settings.redis_prefix)
    meta: dict[str, Any] = store.meta(name) or {}
    assert meta["status"] == "failed" and meta["stage"] == "crash"
    assert crashed.generation == first.generation  # the snapshot is untouched

    redis_client.delete(ledger)
    again = run_sync(settings, name, redis_client=redis_client)
    assert again.status == "ok" and again.generation == (first.generation or 0) + 1
