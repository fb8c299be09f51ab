"""Snapshot commit against the real Redis: baseline, real changes only, carry-over of
incomplete scopes, logon-user baselines, failed syncs."""

from __future__ import annotations

import orjson
import pytest
import redis
from detect_helpers import (
    MUTATION_EVENTS,
    TENANT,
    build_graph,
    commit,
    kinds,
    logon_key,
    logon_rel_key,
    machine_key,
    mutated_tenant,
    pair_key,
    standard_tenant,
    stored_events,
    user_key,
    vuln_key,
)

from monitor.events import stream
from monitor.events.envelope import event_id
from monitor.model import schema
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.snapshot.commit import record_failed_sync
from monitor.snapshot.store import SnapshotStore


@pytest.fixture
def store(redis_client: redis.Redis, redis_prefix: str) -> SnapshotStore:
    return SnapshotStore(redis_client, redis_prefix)


def test_first_sync_is_one_baseline_event(store: SnapshotStore, redis_client: redis.Redis) -> None:
    graph = build_graph(standard_tenant())
    res = commit(store, graph)
    assert res.baseline and res.status == "ok" and res.generation == 1
    assert [e["type"] for e in res.events] == ["mde.sync.baseline"]
    data = res.events[0]["data"]
    assert data["counts"] == graph.count_by_type()
    assert data["first"] is True
    assert stored_events(redis_client, store.prefix) == res.events
    assert stored_events(redis_client, store.prefix, None) == res.events  # all-tenants stream
    loaded = store.load_graph(TENANT)
    assert loaded is not None
    assert loaded.entities == graph.entities
    assert loaded.relationships == graph.relationships
    assert loaded.scope_of == graph.scope_of
    meta = store.meta(TENANT)
    assert meta is not None
    assert meta["status"] == "ok" and meta["generation"] == 1
    assert meta["requests"] == {"machines": 1}
    assert meta["scopes"]["machines"]["state"] == "complete"
    assert meta["logonUserScopes"] == {"complete": 10}
    assert store.generation(TENANT) == 1
    assert [h["generation"] for h in store.history(TENANT)] == [1]


def test_mutations_produce_exactly_the_real_changes(
    store: SnapshotStore, redis_client: redis.Redis
) -> None:
    commit(store, build_graph(standard_tenant()))
    t2 = mutated_tenant()
    t2.pairs.add(("m10", "CVE-2024-1000"))  # implied by m10's creation: no event
    finished = "2024-05-01T11:00:00.000Z"
    res = commit(store, build_graph(t2), finished=finished)

    assert kinds(res.events) == MUTATION_EVENTS
    assert res.status == "ok" and res.generation == 2
    assert stored_events(redis_client, store.prefix)[1:] == res.events

    by = {(e["type"], e["subject"]): e for e in res.events}
    risk = by[("mde.machine.risk_raised", machine_key("m01"))]
    assert risk["data"]["changes"] == {"riskScore": {"old": "Low", "new": "High"}}
    assert risk["time"] == finished
    assert risk["id"] == event_id(TENANT, machine_key("m01"), "mde.machine.risk_raised", 2)
    assert risk["source"] == f"mde-monitor/{TENANT}"
    upd = by[("mde.machine.updated", machine_key("m01"))]["data"]
    assert upd["changes"] == {"riskScore": {"old": "Low", "new": "High"}}  # lastSeenOn: volatile
    assert upd["entityType"] == schema.MACHINE.type and upd["entityClass"] == ["HostAgent"]
    assert upd["displayName"] == "m01.contoso.local"
    assert upd["before"]["riskScore"] == "Low" and upd["entity"]["riskScore"] == "High"
    assert "_rawData" not in upd["entity"] and "_rawData" not in upd["before"]
    gone = by[("mde.machine.deleted", machine_key("m08"))]["data"]
    assert gone["entity"]["id"] == "m08" and gone["before"]["id"] == "m08"
    ident = by[("mde.machine_vulnerability.identified", pair_key("m00", "CVE-2024-1003"))]["data"]
    assert ident["displayName"] == "m00.contoso.local IDENTIFIED CVE-2024-1003"
    assert ident["relationshipClass"] == "IDENTIFIED"
    assert ident["source"]["_key"] == machine_key("m00")
    assert ident["target"]["_key"] == vuln_key("CVE-2024-1003")
    resolved = by[("mde.machine_vulnerability.resolved", pair_key("m00", "CVE-2024-1000"))]
    assert resolved["data"]["entity"]["_toEntityKey"] == vuln_key("CVE-2024-1000")
    added = by[("mde.machine_logon_user.added", logon_rel_key("m03", "l0"))]["data"]
    assert added["target"]["_key"] == logon_key("l0")

    # the volatile change is stored even though it made no event
    loaded = store.load_graph(TENANT)
    assert loaded is not None
    assert loaded.entities[machine_key("m05")]["lastSeenOn"] == t2.machines["m05"]["lastSeenOn"]
    assert machine_key("m08") not in loaded.entities
    assert pair_key("m08", "CVE-2024-1002") not in loaded.relationships

    # the same fetch again: nothing changed
    again = commit(store, build_graph(t2), finished="2024-05-01T12:00:00.000Z")
    assert again.events == [] and again.generation == 3 and again.written == 0


def test_entity_updates_of_every_event_type(store: SnapshotStore) -> None:
    t = standard_tenant()
    commit(store, build_graph(t))
    t2 = t.copy()
    t2.machines["m04"].update(
        healthStatus="Inactive",
        exposureLevel="High",
        onboardingStatus="Offboarded",
        defenderAvStatus="NotUpdated",
        machineTags=["prod"],
        vmMetadata={"cloudProvider": "Azure", "vmId": None},
    )
    t2.vulns["CVE-2024-1002"]["publicExploit"] = True
    t2.logon_users["l3"]["isDomainAdmin"] = True
    t2.org_name = "Contoso Ltd"
    res = commit(store, build_graph(t2))
    m = machine_key("m04")
    assert kinds(res.events) == sorted(
        [
            ("mde.account.updated", schema.ACCOUNT.key("11111111-2222-3333-4444-555555555555")),
            ("mde.logon_user.updated", logon_key("l3")),
            ("mde.machine.av_status_changed", m),
            ("mde.machine.exposure_raised", m),
            ("mde.machine.health_degraded", m),
            ("mde.machine.onboarding_changed", m),
            ("mde.machine.tags_changed", m),
            ("mde.machine.updated", m),
            ("mde.vulnerability.exploit_published", vuln_key("CVE-2024-1002")),
            ("mde.vulnerability.updated", vuln_key("CVE-2024-1002")),
        ]
    )
    upd = next(e for e in res.events if e["type"] == "mde.machine.updated")
    assert upd["data"]["changes"]["machineTags"] == {
        "old": [],
        "new": ["prod"],
        "added": ["prod"],
        "removed": [],
    }
    assert upd["data"]["changes"]["vmMetadata.cloudProvider"] == {"old": None, "new": "Azure"}
    tags = next(e for e in res.events if e["type"] == "mde.machine.tags_changed")
    assert list(tags["data"]["changes"]) == ["machineTags"]


FAILED_SCOPES = [
    (schema.SCOPE_USERS, schema.USER.type),
    (schema.SCOPE_MACHINES, schema.MACHINE.type),
    (schema.SCOPE_VULNERABILITIES, schema.MACHINE_IDENTIFIED_VULNERABILITY.type),
    (schema.SCOPE_ACCOUNT, schema.ACCOUNT.type),
]


@pytest.mark.parametrize("state", [ScopeState.FAILED, ScopeState.SKIPPED])
@pytest.mark.parametrize(("scope", "typ"), FAILED_SCOPES)
def test_incomplete_scope_keeps_previous_items(
    store: SnapshotStore, scope: str, typ: str, state: ScopeState
) -> None:
    t = standard_tenant()
    first = build_graph(t)
    commit(store, first)
    before = store.load_graph(TENANT)
    assert before is not None
    error = f"HTTP 503 from /{scope} after 6 attempts"
    graph = build_graph(t, omit_scopes={scope}, states={scope: ScopeStatus(state, 0, error)})
    res = commit(store, graph)
    assert res.status == "degraded"
    assert not [e for e in res.events if e["type"].endswith((".deleted", ".resolved", ".removed"))]
    degraded = [e for e in res.events if e["type"] == "mde.sync.degraded"]
    assert len(degraded) == 1 and len(res.events) == 1
    assert degraded[0]["data"]["scopes"] == {
        scope: {"state": state.value, "error": error, "count": 0}
    }
    assert degraded[0]["data"]["kept"][typ] >= 1
    after = store.load_graph(TENANT)
    assert after is not None
    assert after.entities == before.entities
    assert after.relationships == before.relationships
    meta = store.meta(TENANT)
    assert meta is not None and meta["status"] == "degraded"
    assert meta["scopes"][scope]["error"] == error


def test_failed_scope_takes_fresh_items_but_deletes_nothing(store: SnapshotStore) -> None:
    t = standard_tenant()
    commit(store, build_graph(t))
    t2 = t.copy()
    t2.users["u02"]["jobTitle"] = "CISO"
    t2.add_user("u50")
    partial = t2.copy()
    partial.users = {k: v for k, v in t2.users.items() if k in ("u02", "u50")}
    status = ScopeStatus(ScopeState.FAILED, 2, "page 2 of /users: HTTP 500")
    res = commit(store, build_graph(partial, states={schema.SCOPE_USERS: status}))
    assert kinds(res.events) == [
        ("mde.sync.degraded", TENANT),
        ("mde.user.created", user_key("u50")),
        ("mde.user.updated", user_key("u02")),
    ]
    loaded = store.load_graph(TENANT)
    assert loaded is not None
    assert {k for k in loaded.entities if k.startswith(schema.USER.type + ":")} == {
        user_key(u) for u in t2.users
    }
    # once the scope is complete again the remaining real state is already stored: no events
    assert commit(store, build_graph(t2)).events == []


def test_budget_skipped_logon_users_are_kept_and_not_degraded(store: SnapshotStore) -> None:
    t = standard_tenant()
    commit(store, build_graph(t))
    t2 = t.copy()
    t2.logons["m00"] = set()  # would be removals, but m00 is not fetched this time
    res = commit(store, build_graph(t2, logon_machines={"m05", "m06"}))
    assert res.events == [] and res.status == "ok"
    assert res.carried_over[schema.MACHINE_HAS_LOGON_USER.type] == 6
    loaded = store.load_graph(TENANT)
    assert loaded is not None
    assert logon_rel_key("m00", "l1") in loaded.relationships
    assert logon_key("l1") in loaded.entities


def test_failed_logon_scopes_are_grouped_in_one_degraded_event(store: SnapshotStore) -> None:
    t = standard_tenant(machines=12)
    commit(store, build_graph(t))
    failing = {schema.logon_users_scope(f"m{i:02d}") for i in range(9)}
    res = commit(store, build_graph(t, omit_scopes=failing))
    assert [e["type"] for e in res.events] == ["mde.sync.degraded"]
    data = res.events[0]["data"]
    assert data["logonUserScopes"] == {"count": 9, "listed": 5}
    assert len(data["scopes"]) == 5
    assert all(v["error"] == "HTTP 500 logonusers" for v in data["scopes"].values())


def test_first_time_logon_scopes_are_a_baseline(store: SnapshotStore) -> None:
    t = standard_tenant()
    commit(store, build_graph(t, logon_machines=set()))  # budget: no logon users at all
    res = commit(store, build_graph(t))  # now every machine's logon users are fetched
    assert [e["type"] for e in res.events] == ["mde.sync.baseline"]
    data = res.events[0]["data"]
    assert data["first"] is False
    assert data["scopeCount"] == 5  # machines m00..m04 have logon users
    assert data["counts"] == {
        schema.LOGON_USER.type: 5,
        schema.MACHINE_HAS_LOGON_USER.type: 6,
    }
    t2 = t.copy()
    t2.add_logon("m06", "l9")  # m06's scope was complete (empty) last time: a real change
    t2.add_logon("m01", "l0")
    res = commit(store, build_graph(t2))
    assert kinds(res.events) == [
        ("mde.logon_user.created", logon_key("l9")),
        ("mde.machine_logon_user.added", logon_rel_key("m01", "l0")),
        ("mde.machine_logon_user.added", logon_rel_key("m06", "l9")),
    ]


def test_new_machine_logon_users_are_a_baseline_not_a_flood(store: SnapshotStore) -> None:
    t = standard_tenant()
    commit(store, build_graph(t))
    t2 = t.copy()
    t2.add_machine("m20")
    for i in range(30):
        t2.add_logon("m20", f"svc{i}")
    res = commit(store, build_graph(t2))
    assert kinds(res.events) == [
        ("mde.machine.created", machine_key("m20")),
        ("mde.sync.baseline", TENANT),
    ]
    assert res.events[0]["data"]["scopes"] == [schema.logon_users_scope("m20")]


def test_logon_user_entity_lives_while_a_machine_has_it(store: SnapshotStore) -> None:
    t = standard_tenant()  # l1 is on m00 and m01
    commit(store, build_graph(t))
    t2 = t.copy()
    t2.logons["m01"].discard("l1")
    # m00 not fetched: its HAS l1 is kept, so l1 stays
    res = commit(store, build_graph(t2, logon_machines=set(t2.machines) - {"m00"}))
    assert kinds(res.events) == [("mde.machine_logon_user.removed", logon_rel_key("m01", "l1"))]
    loaded = store.load_graph(TENANT)
    assert loaded is not None and logon_key("l1") in loaded.entities
    # now m00 is fetched without l1 either: the account is gone from every machine
    t2.logons["m00"].discard("l1")
    res = commit(store, build_graph(t2))
    assert kinds(res.events) == [
        ("mde.logon_user.deleted", logon_key("l1")),
        ("mde.machine_logon_user.removed", logon_rel_key("m00", "l1")),
    ]


def test_deleted_machine_drops_kept_relationships_silently(store: SnapshotStore) -> None:
    t = standard_tenant()
    commit(store, build_graph(t))
    t2 = t.copy()
    t2.remove_machine("m02")  # has logon user l2 (only there) and two CVEs
    status = ScopeStatus(ScopeState.FAILED, 0, "HTTP 500 machinesVulnerabilities")
    graph = build_graph(
        t2,
        omit_scopes={schema.SCOPE_VULNERABILITIES},
        states={schema.SCOPE_VULNERABILITIES: status},
        logon_machines=set(),
    )
    res = commit(store, graph)
    assert kinds(res.events) == [
        ("mde.logon_user.deleted", logon_key("l2")),
        ("mde.machine.deleted", machine_key("m02")),
        ("mde.sync.degraded", TENANT),
    ]
    loaded = store.load_graph(TENANT)
    assert loaded is not None
    assert not [k for k in loaded.relationships if machine_key("m02") in k]
    assert pair_key("m03", "CVE-2024-1003") in loaded.relationships  # kept
    meta = store.meta(TENANT)
    assert meta is not None and schema.logon_users_scope("m02") not in store.known_scopes(TENANT)


def test_record_failed_sync_leaves_the_snapshot(
    store: SnapshotStore, redis_client: redis.Redis
) -> None:
    commit(store, build_graph(standard_tenant()))
    body_before = redis_client.hgetall(store.key(TENANT, "body"))
    idx_before = redis_client.hgetall(store.key(TENANT, "idx"))
    ev = record_failed_sync(
        store,
        tenant=TENANT,
        error="AADSTS7000215: Invalid client secret provided",
        stage="auth",
        meta={"started": "2024-05-01T13:00:00Z"},
        lock=None,
    )
    assert ev["type"] == "mde.sync.failed" and ev["data"]["stage"] == "auth"
    assert ev["data"]["generation"] == 1
    assert [e["type"] for e in stored_events(redis_client, store.prefix)] == [
        "mde.sync.baseline",
        "mde.sync.failed",
    ]
    assert store.generation(TENANT) == 1
    assert redis_client.hgetall(store.key(TENANT, "body")) == body_before
    assert redis_client.hgetall(store.key(TENANT, "idx")) == idx_before
    meta = store.meta(TENANT)
    assert meta is not None and meta["status"] == "failed" and meta["stage"] == "auth"
    assert meta["lastCommitted"]["generation"] == 1
    assert [h["status"] for h in store.history(TENANT)] == ["failed", "ok"]


def test_every_scope_failed_is_a_failed_sync(store: SnapshotStore) -> None:
    t = standard_tenant()
    commit(store, build_graph(t))
    all_scopes = {
        schema.SCOPE_ACCOUNT,
        schema.SCOPE_USERS,
        schema.SCOPE_MACHINES,
        schema.SCOPE_VULNERABILITIES,
    }
    graph = build_graph(t, omit_scopes=all_scopes)
    res = commit(store, graph)
    assert res.status == "failed" and [e["type"] for e in res.events] == ["mde.sync.failed"]
    assert res.counts == build_graph(t).count_by_type()  # the snapshot kept
    assert store.generation(TENANT) == 1


def test_history_is_bounded(store: SnapshotStore, redis_client: redis.Redis) -> None:
    graph = build_graph(standard_tenant(machines=2, users=1, vulns=2))
    for _ in range(3):
        commit(store, graph)
    assert [h["generation"] for h in store.history(TENANT)] == [3, 2, 1]
    assert redis_client.xlen(stream.stream_key(store.prefix, TENANT)) == 1


def test_lost_snapshot_is_a_new_baseline_with_fresh_ids(
    store: SnapshotStore, redis_client: redis.Redis
) -> None:
    first = commit(store, build_graph(standard_tenant()))
    commit(store, build_graph(mutated_tenant()))
    store.drop(TENANT)  # e.g. snapshot keys lost, the streams kept
    res = commit(store, build_graph(mutated_tenant()))
    assert [e["type"] for e in res.events] == ["mde.sync.baseline"]
    assert res.generation == 3 and res.events[0]["id"] != first.events[0]["id"]
    ids = [e["id"] for e in stored_events(redis_client, store.prefix)]
    assert len(ids) == len(set(ids))


def test_index_in_many_parts(redis_client: redis.Redis, redis_prefix: str) -> None:
    store = SnapshotStore(redis_client, redis_prefix, index_part_keys=3)
    graph = build_graph(standard_tenant())
    commit(store, graph)
    assert redis_client.hlen(store.key(TENANT, "idx")) > 10
    res = commit(store, build_graph(mutated_tenant()))
    assert kinds(res.events) == MUTATION_EVENTS


def test_index_stored_before_parts_is_read(redis_client: redis.Redis, redis_prefix: str) -> None:
    """An index written as byte pieces of one document (before parts) still diffs right."""
    store = SnapshotStore(redis_client, redis_prefix)
    commit(store, build_graph(standard_tenant()))
    index = store.load_index(TENANT)
    blob = orjson.dumps(index)
    idx_key = store.index_key(TENANT)
    redis_client.delete(idx_key)
    redis_client.hset(
        idx_key, mapping={str(n): blob[i : i + 200] for n, i in enumerate(range(0, len(blob), 200))}
    )
    assert redis_client.hlen(idx_key) > 10
    assert store.load_index(TENANT) == index
    res = commit(store, build_graph(mutated_tenant()))
    assert kinds(res.events) == MUTATION_EVENTS
    assert all(f.startswith(b"p") for f in redis_client.hkeys(idx_key))  # rewritten in parts


def test_compressed_bodies_round_trip(redis_client: redis.Redis, redis_prefix: str) -> None:
    store = SnapshotStore(redis_client, redis_prefix, compress_min_bytes=200)
    graph = build_graph(standard_tenant())
    commit(store, graph)
    raw = redis_client.hget(store.key(TENANT, "body"), machine_key("m00"))
    assert raw is not None and raw[:1] == b"z"
    loaded = store.load_graph(TENANT)
    assert loaded is not None and loaded.entities == graph.entities
    assert kinds(commit(store, build_graph(mutated_tenant())).events) == MUTATION_EVENTS


def test_malformed_item_is_a_clear_error(store: SnapshotStore) -> None:
    graph = build_graph(standard_tenant())
    del graph.entities[machine_key("m03")]["_type"]
    with pytest.raises(ValueError, match=r"microsoft_defender_machine:m03.*no string _type"):
        commit(store, graph)
    assert store.generation(TENANT) == 0


def test_first_time_scope_that_failed_stays_a_baseline(store: SnapshotStore) -> None:
    t = standard_tenant()
    commit(store, build_graph(t, logon_machines=set()))
    scope = schema.logon_users_scope("m00")
    failed = ScopeStatus(ScopeState.FAILED, 1, "page 2: HTTP 500")
    t_partial = t.copy()
    t_partial.logons["m00"] = {"l0"}  # l1 was on the page that failed
    res = commit(
        store,
        build_graph(t_partial, logon_machines={"m00"}, states={scope: failed}),
    )
    assert kinds(res.events) == [("mde.sync.baseline", TENANT), ("mde.sync.degraded", TENANT)]
    assert res.events[0]["data"]["counts"] == {
        schema.LOGON_USER.type: 1,
        schema.MACHINE_HAS_LOGON_USER.type: 1,
    }
    # skipped next time: kept, no second baseline for the kept items
    assert commit(store, build_graph(t, logon_machines=set())).events == []
    # complete at last: still a baseline (never seen whole), no `added` for l1
    res = commit(store, build_graph(t, logon_machines={"m00"}))
    assert [e["type"] for e in res.events] == ["mde.sync.baseline"]
    assert scope in store.known_scopes(TENANT)


def test_result_and_meta_counts(store: SnapshotStore) -> None:
    graph = build_graph(standard_tenant())
    res = commit(store, graph)
    assert res.counts == graph.count_by_type()
    assert res.event_counts == {"mde.sync.baseline": 1}
    meta = store.meta(TENANT)
    assert meta is not None and meta["counts"] == graph.count_by_type()
    assert set(res.timings) >= {"fingerprint_compare", "merge", "commit"}


def test_bodies_read_over_several_round_trips_are_each_stored_one_once(
    store: SnapshotStore, redis_client: redis.Redis
) -> None:
    """iter_bodies over more keys than one round trip asks for gives every stored body once,
    in the order asked, and skips missing keys; load_bodies gives the same."""
    from monitor.snapshot.store import BODY_BATCH, BODY_BATCHES_PER_TRIP

    n = BODY_BATCH * BODY_BATCHES_PER_TRIP + 7  # one round trip and a bit
    keys = [f"k{i:06d}" for i in range(n)]
    stored = keys[::2]
    pipe = redis_client.pipeline(transaction=False)
    for k in stored:
        pipe.hset(store.body_key(TENANT), k, store.encode_body(orjson.dumps({"_key": k})))
    pipe.execute()
    asked = [*reversed(keys), "missing"]
    got = list(store.iter_bodies(TENANT, asked))
    assert [k for k, _ in got] == [k for k in asked if k in set(stored)]
    assert all(body == {"_key": k} for k, body in got)
    assert store.load_bodies(TENANT, asked) == dict(got)
