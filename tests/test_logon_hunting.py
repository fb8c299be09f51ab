"""`logon_users: hunting` (issue 14) over real HTTPS and real Redis: the simulator's advanced
hunting endpoint and its limits, the collector's ranges, splits, fallbacks, and that hunting and
the per-machine API give the very same logon-user entities and relationships."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from simulator_helpers import token
from sync_helpers import sim_settings

from monitor.collect.check import check_tenant
from monitor.collect.collector import collect_tenant
from monitor.collect.hunting import logon_query
from monitor.config import ConfigError, Settings, parse_settings
from monitor.events.stream import read_range
from monitor.model.graph import Graph, ScopeState
from monitor.simulator import Fault, SimTenant, Simulator, generate_tenant
from monitor.snapshot.store import SnapshotStore
from monitor.sync import SyncSummary, run_sync

HUNTING = "defender:/api/advancedqueries/run"
LOGON = "defender:/api/machines/{id}/logonusers"
ROLE = "AdvancedQuery.Read.All"
REL = "microsoft_defender_machine_has_logon_user"
LOGON_USER = "microsoft_defender_logon_user"


class Hunt:
    """One simulated tenant with the hunting permission, synced with per-sync tenant settings."""

    def __init__(self, sim: Simulator, t: SimTenant, prefix: str, client: redis.Redis) -> None:
        self.sim, self.t, self.prefix, self.client = sim, t, prefix, client

    def settings(self, **tenant: Any) -> Settings:
        return sim_settings(self.sim, self.prefix, **{"logon_users": "hunting", **tenant})

    def sync(self, progress: Any = None, **tenant: Any) -> SyncSummary:
        kwargs = {"progress": progress} if progress is not None else {}
        return run_sync(self.settings(**tenant), "sim", redis_client=self.client, **kwargs)

    def events(self, summary: SyncSummary) -> Counter[tuple[str, str]]:
        return Counter(
            (ev["type"], ev["subject"])
            for _, ev in read_range(self.client, self.prefix, "sim")
            if ev["data"].get("generation") == summary.generation
            and not ev["type"].startswith("mde.query.")
        )

    def graph(self) -> Graph:
        graph = SnapshotStore(self.client, self.prefix).load_graph("sim")
        assert graph is not None
        return graph

    def onboarded(self) -> list[str]:
        return sorted(
            m for m, doc in self.t.machines.items() if doc.get("onboardingStatus") == "Onboarded"
        )

    def pairs(self) -> set[str]:
        """machine HAS logon_user keys the tenant holds now (onboarded machines)."""
        return {
            f"microsoft_defender_machine:{mid}|has|{LOGON_USER}:{lu['id']}"
            for mid in self.onboarded()
            for lu in self.t.logon_users.get(mid, [])
        }


@pytest.fixture
def hunt(tmp_path: Path, redis_prefix: str, redis_client: redis.Redis) -> Iterator[Hunt]:
    tenant = generate_tenant(
        machines=40, users=30, vulns_per_machine=1, cves=5, logon_users_per_machine=3, seed=11
    )
    tenant.roles.add(ROLE)
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        yield Hunt(sim, sim.tenant(tenant.tenant_id), redis_prefix, redis_client)


def logon_items(graph: Graph) -> dict[str, dict[str, Any]]:
    """Logon-user entities and machine HAS logon_user relationships, without `_rawData`."""
    items = {**graph.entities, **graph.relationships}
    return {
        k: {f: v for f, v in item.items() if f != "_rawData"}
        for k, item in items.items()
        if item.get("_type") in (LOGON_USER, REL)
    }


# ---- the collector -----------------------------------------------------------------------------


def test_hunting_covers_every_machine_in_one_sync(hunt: Hunt, redis_client: redis.Redis) -> None:
    settings = hunt.settings(logon_user_budget=2)
    result = collect_tenant(settings, settings.tenants[0], redis_client=redis_client)
    assert result.graph is not None and result.logon is not None
    onboarded = hunt.onboarded()
    assert 0 < len(onboarded) < len(hunt.t.machines)  # discovered devices are listed too
    scopes = {k.split(":", 1)[1]: s for k, s in result.graph.scopes.items() if ":" in k}
    assert {m for m, s in scopes.items() if s.state is ScopeState.COMPLETE} == set(onboarded)
    assert all(s.state is ScopeState.SKIPPED and s.error is None
               for m, s in scopes.items() if m not in onboarded)  # fmt: skip
    rels = {k for k, r in result.graph.relationships.items() if r["_type"] == REL}
    assert rels == hunt.pairs()
    assert result.stats.requests[HUNTING] == 1  # 120 rows: one query
    assert result.stats.requests[LOGON] == 2  # the budget, spent on account facts
    report = result.logon.hunting
    assert report is not None and report.machines == len(onboarded) and report.fallback is None
    assert result.notes == []


def test_switching_modes_makes_no_change_events(hunt: Hunt) -> None:
    # rotation with a budget that reaches every machine: the per-machine API's truth
    rotation = hunt.sync(logon_users="rotation", logon_user_budget=1000)
    assert rotation.status == "ok" and rotation.baseline
    by_api = logon_items(hunt.graph())
    assert len(by_api) > 100
    # hunting, without a single /logonusers call: the account facts come from the snapshot
    hunt.sim.reset_counts()
    hunted = hunt.sync(logon_user_budget=0)
    assert hunted.status == "ok" and hunted.notes == []
    assert hunt.events(hunted) == Counter()
    counts = hunt.sim.counts()
    assert counts[HUNTING] == 1 and LOGON not in counts
    assert logon_items(hunt.graph()) == by_api  # same keys, same bodies
    # and back
    back = hunt.sync(logon_users="rotation", logon_user_budget=1000)
    assert hunt.events(back) == Counter()
    assert logon_items(hunt.graph()) == by_api


def test_hunting_reads_the_same_entities_as_the_per_machine_api(hunt: Hunt) -> None:
    # no snapshot at all: the facts of every account are read per machine, new accounts first
    hunting = hunt.settings(logon_user_budget=1000)
    rotation = hunt.settings(logon_users="rotation", logon_user_budget=1000)
    got = collect_tenant(hunting, hunting.tenants[0])
    want = collect_tenant(rotation, rotation.tenants[0])
    assert got.graph is not None and want.graph is not None
    assert logon_items(got.graph) == logon_items(want.graph)
    assert got.logon is not None and got.logon.hunting is not None
    assert got.logon.hunting.details_pending == 0


def test_a_new_logon_user_is_the_usual_added_event(hunt: Hunt) -> None:
    first = hunt.sync(logon_user_budget=1000)
    assert first.status == "ok"
    machines = hunt.onboarded()
    seen = Counter(lu["id"] for m in machines for lu in hunt.t.logon_users[m])
    target, other = (
        machines[3],
        next(m for m in machines[4:] if any(seen[lu["id"]] > 1 for lu in hunt.t.logon_users[m])),
    )
    template = hunt.t.logon_users[target][0]
    admin = hunt.t.add_logon_user(
        target,
        {
            **template,
            "id": "hunt\\new.admin",
            "accountName": "new.admin",
            "accountDomain": "HUNT",
            "accountSid": "S-1-5-21-1-2-3-4242",
            "isDomainAdmin": True,
            "logOnMachinesCount": 1,
        },
    )
    shared = next(lu for lu in hunt.t.logon_users[other] if seen[lu["id"]] > 1)
    hunt.t.remove_logon_user(other, shared["id"])

    second = hunt.sync(logon_user_budget=1)  # one read: the machine of the one new account
    assert second.status == "ok"
    mkey = "microsoft_defender_machine:{}".format
    admin_key = f"{LOGON_USER}:{admin['id']}"
    assert hunt.events(second) == Counter(
        {
            ("mde.machine_logon_user.added", f"{mkey(target)}|has|{admin_key}"): 1,
            ("mde.logon_user.created", admin_key): 1,
            ("mde.machine_logon_user.removed", f"{mkey(other)}|has|{LOGON_USER}:{shared['id']}"): 1,
        }
    )
    created = next(
        ev
        for _, ev in read_range(hunt.client, hunt.prefix, "sim")
        if ev["type"] == "mde.machine_logon_user.added"
    )
    assert created["data"]["target"]["isDomainAdmin"] is True  # the domain-admin rules see it


def test_a_range_over_the_row_limit_is_split(hunt: Hunt) -> None:
    hunt.sync(logon_user_budget=1000)  # 3 rows per machine: remembered for planning
    machines = hunt.onboarded()
    for mid in machines[:2]:  # two neighbours, 18 rows each: the first range of six comes back cut
        for i in range(15):
            hunt.t.add_logon_user(mid, {**hunt.t.logon_users[mid][0], "id": f"x\\u{i}",
                                         "accountName": f"u{i}", "accountDomain": "X"})  # fmt: skip
    hunt.t.set_behaviour(hunting_max_rows=40)
    hunt.sim.reset_counts()
    second = hunt.sync(logon_user_budget=1000, hunting_max_rows=40)
    assert second.status == "ok" and second.notes == []
    meta = SnapshotStore(hunt.client, hunt.prefix).meta("sim")
    assert meta is not None
    report = meta["logon_users"]["hunting"]
    assert report["splits"] >= 1 and report["uncovered"] == 0
    assert report["machines"] == len(machines)
    assert hunt.sim.counts()[HUNTING] == report["calls"] >= 3
    added = [k for (typ, k), n in hunt.events(second).items() if typ.endswith(".added")]
    assert len(added) == 30
    rels = {k for k, r in hunt.graph().relationships.items() if r["_type"] == REL}
    assert rels == hunt.pairs()


def test_a_query_too_heavy_for_microsoft_is_split(hunt: Hunt) -> None:
    # one event per logon, at most 10 scanned per query: about three machines per query
    hunt.t.set_behaviour(hunting_events_per_logon=1, hunting_max_query_events=10)
    summary = hunt.sync(logon_user_budget=1000)
    assert summary.status == "ok" and summary.notes == []
    meta = SnapshotStore(hunt.client, hunt.prefix).meta("sim")
    assert meta is not None
    report = meta["logon_users"]["hunting"]
    assert report["splits"] >= 3 and report["uncovered"] == 0
    rels = {k for k, r in hunt.graph().relationships.items() if r["_type"] == REL}
    assert rels == hunt.pairs()


def test_a_429_is_waited_out_through_the_budget(hunt: Hunt) -> None:
    hunt.sim.add_fault(Fault(endpoint=HUNTING, status=429, retry_after=2, times=1))
    blocked = f"{hunt.prefix}:budget:sim:{HUNTING}:blocked"
    seen: list[int] = []
    done: list[SyncSummary] = []
    worker = threading.Thread(target=lambda: done.append(hunt.sync(logon_user_budget=1000)))
    worker.start()
    while worker.is_alive():  # what every other worker of the tenant would see meanwhile
        ttl = hunt.client.pttl(blocked)
        if isinstance(ttl, int) and ttl > 0:
            seen.append(ttl)
        time.sleep(0.05)
    worker.join()
    summary = done[0]
    assert summary.status == "ok" and summary.notes == []
    assert seen and max(seen) <= 2000  # Retry-After held the endpoint in the shared budget
    assert summary.requests["throttled"][HUNTING] == 1
    assert summary.requests["retries"][HUNTING] == 1
    assert summary.duration_seconds >= 2.0  # and was waited out
    rels = {k for k, r in hunt.graph().relationships.items() if r["_type"] == REL}
    assert rels == hunt.pairs()


def test_missing_permission_falls_back_to_the_rotation_and_says_so(
    hunt: Hunt, caplog: pytest.LogCaptureFixture
) -> None:
    # the first sync reads no account facts (budget 0): the rotation's reads fill them in later
    first = hunt.sync(logon_user_budget=0)
    assert first.status == "ok"
    before = logon_items(hunt.graph())
    machines = hunt.onboarded()
    gone = hunt.t.logon_users[machines[-1]][0]
    hunt.t.remove_logon_user(machines[-1], gone["id"])  # not among the rotation's first three
    hunt.t.set_roles(sorted(hunt.t.roles - {ROLE}))

    stages: list[str] = []
    with caplog.at_level("WARNING", logger="monitor.collect.collector"):
        second = hunt.sync(
            progress=lambda stage, done, total: stages.append(stage), logon_user_budget=3
        )
    assert second.status == "ok"
    # no deletion; the only events are the account facts the rotation's three reads learnt
    # (unknown -> known, e.g. isDomainAdmin: null -> true, which an alert must see)
    learnt = [
        ev
        for _, ev in read_range(hunt.client, hunt.prefix, "sim")
        if ev["data"].get("generation") == second.generation
        and not ev["type"].startswith("mde.query.")
    ]
    assert {ev["type"] for ev in learnt} <= {"mde.logon_user.updated"}
    for ev in learnt:
        changes = ev["data"]["changes"]
        assert set(changes) <= {"isDomainAdmin", "isOnlyNetworkUser", "logOnMachinesCount"}
        assert all(c["old"] is None and c["new"] is not None for c in changes.values())
    assert len(second.notes) == 1
    assert ROLE in second.notes[0] and "rotation" in second.notes[0]
    assert any("rotation" in s for s in stages)
    assert any("fell back to the rotation" in r.getMessage() for r in caplog.records)
    after = logon_items(hunt.graph())
    assert set(after) == set(before)  # the removed logon user is kept until its machine's turn
    meta = SnapshotStore(hunt.client, hunt.prefix).meta("sim")
    assert meta is not None and meta["logon_users"]["refreshed"] == 3
    assert meta["notes"] == second.notes

    settings = hunt.settings()
    probes = {p.permission: p for p in check_tenant(settings, settings.tenants[0])}
    assert probes[ROLE].ok is False and probes[ROLE].reason == "permission"
    hunt.t.roles.add(ROLE)
    probes = {p.permission: p for p in check_tenant(settings, settings.tenants[0])}
    assert probes[ROLE].ok is True
    rotation = hunt.settings(logon_users="rotation")
    assert ROLE not in {p.permission for p in check_tenant(rotation, rotation.tenants[0])}


def test_a_failed_query_keeps_its_machines_logon_users(hunt: Hunt) -> None:
    hunt.sync(logon_user_budget=1000)
    machines = hunt.onboarded()
    covered, failed = machines[0], machines[-1]
    removed = {m: hunt.t.logon_users[m][0]["id"] for m in (covered, failed)}
    for mid, lid in removed.items():
        hunt.t.remove_logon_user(mid, lid)
    # 3 rows per machine and 40 rows per answer: ranges of six machines; all but the first fail
    hunt.t.set_behaviour(hunting_max_rows=40)
    hunt.sim.add_fault(Fault(endpoint=HUNTING, status=500, times=None, after=1))
    second = hunt.sync(logon_user_budget=0, hunting_max_rows=40)
    assert second.status == "ok"
    assert len(second.notes) == 1 and "HTTP 500" in second.notes[0]
    rel = f"microsoft_defender_machine:{{}}|has|{LOGON_USER}:{{}}".format
    removed_events = {k for (t, k) in hunt.events(second) if t == "mde.machine_logon_user.removed"}
    assert removed_events == {rel(covered, removed[covered])}
    kept = hunt.graph().relationships
    assert rel(failed, removed[failed]) in kept  # its query failed: nothing deleted
    assert rel(covered, removed[covered]) not in kept


def test_an_exhausted_cpu_quota_stops_the_queries(hunt: Hunt) -> None:
    hunt.sync(logon_user_budget=1000)
    # the first query spends the hour's quota; the next answer 429 for longer than we wait
    hunt.t.set_behaviour(hunting_max_rows=12, hunting_cpu_events_per_hour=1)
    hunt.sim.hunting_quota.reset()
    hunt.sim.reset_counts()
    second = hunt.sync(logon_user_budget=0, hunting_max_rows=12)
    assert second.status == "ok"
    assert "exceeded processing resources" in second.notes[0]
    assert hunt.sim.counts()[HUNTING] == 2  # the one that spent it, the one refused: then stop
    assert hunt.events(second) == Counter()


# ---- the simulator's endpoint ------------------------------------------------------------------


def _run(sim: Simulator, client: httpx.Client, t: SimTenant, body: Any) -> httpx.Response:
    bearer = token(sim, client, t, "defender")
    return client.post(
        f"{sim.defender_url}/api/advancedqueries/run",
        json=body,
        headers={"Authorization": f"Bearer {bearer}"},
    )


def test_simulator_answers_the_documented_envelope(hunt: Hunt) -> None:
    sim, t = hunt.sim, hunt.t
    ids = hunt.onboarded()
    with sim.http_client() as client:
        r = _run(sim, client, t, {"Query": logon_query(ids[0], ids[1], "30d")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert list(body) == ["Schema", "Results"]
        assert [c["Name"] for c in body["Schema"]] == [
            "DeviceId", "AccountDomain", "AccountName",
            "FirstSeen", "LastSeen", "LogonTypes", "AccountSid",
        ]  # fmt: skip
        rows = body["Results"]
        want = {(m, lu["accountName"]) for m in ids[:2] for lu in t.logon_users[m]}
        assert {(r["DeviceId"], r["AccountName"]) for r in rows} == want
        row = rows[0]
        lu = next(
            x for x in t.logon_users[row["DeviceId"]] if x["accountName"] == row["AccountName"]
        )
        assert row["AccountSid"] == lu["accountSid"] and row["AccountDomain"] == lu["accountDomain"]
        assert row["FirstSeen"].startswith(lu["firstSeen"].rstrip("Z"))
        assert row["LastSeen"].endswith("0Z") and len(row["LastSeen"]) == 28  # 7 digits
        assert ", ".join(row["LogonTypes"]) == lu["logonTypes"]
        # the same with single quotes, a comment and other spacing
        q = logon_query(ids[0], ids[1], "30d").replace('"', "'").replace("\n|", " // x\n  |  ")
        assert _run(sim, client, t, {"Query": q}).json()["Results"] == rows
        # anything else: an honest 400
        for query in (
            "DeviceProcessEvents | take 10",
            "DeviceLogonEvents | take 10",
            "DeviceLogonEvents | where RemoteIP == '1.2.3.4' | summarize count() by DeviceId",
            'DeviceLogonEvents | where ActionType == "LogonFailed" | summarize count() by DeviceId',
            "DeviceLogonEvents | summarize dcount(DeviceId) by AccountName",
        ):
            r = _run(sim, client, t, {"Query": query})
            assert r.status_code == 400 and r.json()["error"]["code"] == "BadRequest", query
        assert _run(sim, client, t, {}).status_code == 400
        bearer = token(sim, client, t, "defender")
        r = client.get(
            f"{sim.defender_url}/api/advancedqueries/run",
            headers={"Authorization": f"Bearer {bearer}"},
        )
        assert r.status_code == 405
        # the permission
        t.set_roles(sorted(t.roles - {ROLE}))
        r = _run(sim, client, t, {"Query": logon_query(ids[0], ids[1], "30d")})
        assert r.status_code == 403 and ROLE in r.json()["error"]["message"]


def test_simulator_plays_the_documented_limits(hunt: Hunt) -> None:
    sim, t = hunt.sim, hunt.t
    whole = logon_query("0", "g", "30d")
    with sim.http_client() as client:
        t.set_behaviour(hunting_max_rows=5)
        assert len(_run(sim, client, t, {"Query": whole}).json()["Results"]) == 5  # cut, silently
        t.set_behaviour(hunting_max_rows=100_000, hunting_max_query_events=10)
        r = _run(sim, client, t, {"Query": whole})
        assert r.status_code == 400
        assert r.json()["error"]["message"].startswith("Query execution has exceeded the allowed")
        t.set_behaviour(hunting_max_query_events=200_000_000, hunting_cpu_events_per_hour=1)
        r = _run(sim, client, t, {"Query": whole})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0  # the preempted query
        assert "exceeded processing resources" in r.json()["error"]["message"]
        t.set_behaviour(hunting_cpu_events_per_hour=600_000_000)
        sim.hunting_quota.reset()
        codes = Counter(
            _run(sim, client, t, {"Query": whole}).status_code for _ in range(50)
        )  # 45 calls per minute, 3 already made this minute
        assert codes == Counter({200: 42, 429: 8})


def test_window_and_mode_are_validated() -> None:
    base = {
        "tenants": [
            {"name": "a", "tenant_id": "t", "client_id": "c", "client_secret": "s",
             "logon_users": "hunting", "logon_users_window": "7d"}
        ]
    }  # fmt: skip
    assert parse_settings(base, "t").tenants[0].logon_users_window == "7d"
    spaced = {"tenants": [{**base["tenants"][0], "logon_users_window": " 12 h"}]}
    assert parse_settings(spaced, "t").tenants[0].logon_users_window == "12h"
    for field, value in (
        ("logon_users_window", "45d"),
        ("logon_users_window", "30 days"),
        ("logon_users", "graph"),
    ):
        bad = {"tenants": [{**base["tenants"][0], field: value}]}
        with pytest.raises(ConfigError, match=field):
            parse_settings(bad, "t")
