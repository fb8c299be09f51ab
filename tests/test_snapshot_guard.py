"""The deletion guard rail: a large drop is held, persists, then applies (or is accepted)."""

from __future__ import annotations

import pytest
import redis
from detect_helpers import TENANT, Tenant, build_graph, commit, machine_key, standard_tenant

from monitor.config import DetectSettings
from monitor.model import schema
from monitor.snapshot.store import SnapshotStore


@pytest.fixture
def store(redis_client: redis.Redis, redis_prefix: str) -> SnapshotStore:
    return SnapshotStore(redis_client, redis_prefix)


def _drop_60_percent(t: Tenant) -> Tenant:
    t2 = t.copy()
    for i in range(12):  # of 20
        t2.remove_machine(f"m{i:02d}")
    return t2


def _machine_keys(store: SnapshotStore) -> set[str]:
    g = store.load_graph(TENANT)
    assert g is not None
    return {k for k, v in g.entities.items() if v["_type"] == schema.MACHINE.type}


def test_large_drop_is_held_then_applied_after_persisting(store: SnapshotStore) -> None:
    detect = DetectSettings(drop_threshold=0.5, drop_min_items=10, drop_persist_syncs=3)
    t = standard_tenant(machines=20)
    commit(store, build_graph(t), detect=detect)
    t2 = _drop_60_percent(t)
    for n in (1, 2):
        res = commit(store, build_graph(t2), detect=detect)
        assert res.status == "degraded"
        assert [e["type"] for e in res.events] == ["mde.sync.suspicious_drop"] * len(res.events)
        drops = {e["data"]["entityType"]: e["data"] for e in res.events}
        # the machine drop, and the pairs of those machines (their own guarded type)
        assert set(drops) == {
            schema.MACHINE.type,
            schema.MACHINE_IDENTIFIED_VULNERABILITY.type,
        }
        m = drops[schema.MACHINE.type]
        assert (m["previous"], m["current"], m["deleted"], m["heldSyncs"]) == (20, 8, 12, n)
        assert m["share"] == 0.6 and m["threshold"] == 0.5 and m["held"] is True
        assert len(_machine_keys(store)) == 20  # nothing deleted
        meta = store.meta(TENANT)
        assert meta is not None and meta["status"] == "degraded"
    res = commit(store, build_graph(t2), detect=detect)  # third consecutive sync: applied
    deleted = sorted(e["subject"] for e in res.events if e["type"] == "mde.machine.deleted")
    assert deleted == sorted(machine_key(f"m{i:02d}") for i in range(12))
    assert not [e for e in res.events if e["type"] == "mde.sync.suspicious_drop"]
    assert res.status == "ok"
    assert len(_machine_keys(store)) == 8
    assert store.guard_counts(TENANT) == {}


def test_accept_drop_applies_at_once(store: SnapshotStore) -> None:
    t = standard_tenant(machines=20)
    commit(store, build_graph(t))
    res = commit(store, build_graph(_drop_60_percent(t)), accept_drop=True)
    assert sum(e["type"] == "mde.machine.deleted" for e in res.events) == 12
    assert res.status == "ok" and res.held_drops == []
    assert len(_machine_keys(store)) == 8


def test_drop_that_goes_away_resets_the_count(store: SnapshotStore) -> None:
    t = standard_tenant(machines=20)
    commit(store, build_graph(t))
    res = commit(store, build_graph(_drop_60_percent(t)))
    assert res.held_drops and res.held_drops[0].held_syncs == 1
    assert store.guard_counts(TENANT)[schema.MACHINE.type] == 1
    assert commit(store, build_graph(t)).events == []  # everything back: no change at all
    assert store.guard_counts(TENANT) == {}
    res = commit(store, build_graph(_drop_60_percent(t)))
    assert res.held_drops[0].held_syncs == 1


def test_small_drops_are_not_held(store: SnapshotStore) -> None:
    t = standard_tenant(machines=20)
    commit(store, build_graph(t))
    t2 = t.copy()
    for i in range(9):  # 45%: below the threshold
        t2.remove_machine(f"m{i:02d}")
    res = commit(store, build_graph(t2))
    assert sum(e["type"] == "mde.machine.deleted" for e in res.events) == 9
    small = standard_tenant(machines=20)
    detect = DetectSettings(drop_min_items=50)
    commit(store, build_graph(small), tenant="small", detect=detect)
    res = commit(store, build_graph(_drop_60_percent(small)), tenant="small", detect=detect)
    assert sum(e["type"] == "mde.machine.deleted" for e in res.events) == 12  # < min items


def test_relationships_of_held_machines_are_held_too(store: SnapshotStore) -> None:
    t = standard_tenant(machines=20)
    for i in range(20, 60):  # many more pairs on machines that stay
        t.pairs.add((f"m{i % 8 + 12:02d}", f"CVE-2024-{1000 + i % 6}"))
    t.pairs = {p for p in t.pairs if not p[0] < "m12" or p[1] == "CVE-2024-1000"}
    commit(store, build_graph(t))
    res = commit(store, build_graph(_drop_60_percent(t)))
    # the pairs' own share stays below the threshold: only the machine drop is suspicious
    assert [e["type"] for e in res.events] == ["mde.sync.suspicious_drop"]
    assert res.events[0]["data"]["entityType"] == schema.MACHINE.type
    g = store.load_graph(TENANT)
    assert g is not None
    assert {k for k in g.relationships if k.startswith(machine_key("m00") + "|")}


def test_cve_only_on_held_machines_is_kept(store: SnapshotStore) -> None:
    t = standard_tenant(machines=20)
    t.add_vuln("CVE-2024-9999")
    t.pairs.add(("m00", "CVE-2024-9999"))
    commit(store, build_graph(t))
    res = commit(store, build_graph(_drop_60_percent(t)))
    assert {e["type"] for e in res.events} == {"mde.sync.suspicious_drop"}
    g = store.load_graph(TENANT)
    assert g is not None
    assert schema.VULNERABILITY.key("CVE-2024-9999") in g.entities
    assert any(k.endswith("CVE-2024-9999") for k in g.relationships)
    assert any(
        k.startswith(schema.VULNERABILITY.key("CVE-2024-9999") + "|is|") for k in g.relationships
    )
