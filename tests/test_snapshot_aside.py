"""Big commits built aside (`body:<v>`, `idx:<v>`) and switched to in one small transaction:
the same snapshot and events as an in-place commit, readers on the new version, legacy data
upgraded, and the crash guarantee (old snapshot, no events; a re-run reports every change once
and leaves no aside keys behind)."""

from __future__ import annotations

import signal
from typing import Any

import pydantic
import pytest
import redis
from detect_helpers import (
    MUTATION_EVENTS,
    TENANT,
    assert_mutation_once,
    build_graph,
    commit,
    kinds,
    machine_key,
    mutated_tenant,
    standard_tenant,
    stored_events,
)
from test_snapshot_crash import run_sync, snapshot_state

from monitor.config import DetectSettings
from monitor.query.graph import clear_cache, load_query_graph
from monitor.snapshot.commit import (
    ASIDE_ENV,
    ASIDE_TTL_SECONDS,
    RETIRE_SECONDS,
    CommitError,
    CommitResult,
    unlink_retired,
)
from monitor.snapshot.lock import LockLost, TenantLock, lock_key
from monitor.snapshot.store import SnapshotStore
from monitor.web.data import GraphCache

ASIDE = DetectSettings(commit_aside_min_items=1)  # every commit that writes anything
IN_PLACE = DetectSettings(commit_aside_min_items=10**9)
ASIDE_ENV_ON = {ASIDE_ENV: "1"}
LATER = "2024-05-01T11:00:00.000Z"


def sync_twice(store: SnapshotStore, detect: DetectSettings) -> list[CommitResult]:
    """The baseline of the standard tenant, then its mutated state an hour later."""
    first = commit(store, build_graph(standard_tenant()), detect=detect)
    second = commit(store, build_graph(mutated_tenant()), detect=detect, finished=LATER)
    return [first, second]


def visible(client: redis.Redis, store: SnapshotStore) -> dict[str, Any]:
    """What readers see, without the version number (it differs between the two ways)."""
    state = snapshot_state(client, store)
    state.pop("ver")
    return state


def versioned(client: redis.Redis, store: SnapshotStore) -> dict[str, int]:
    """Every `body:<v>` / `idx:<v>` key of the tenant (by SCAN) -> its TTL in seconds."""
    ttl: Any = {key: client.ttl(key) for key in store.versioned_keys(TENANT)}
    return {":".join(key.rsplit(":", 2)[-2:]): int(t) for key, t in ttl.items()}


def test_aside_commits_equal_in_place_commits(redis_client: redis.Redis, redis_prefix: str) -> None:
    ref = SnapshotStore(redis_client, redis_prefix + "-ref")
    store = SnapshotStore(redis_client, redis_prefix)
    try:
        want = sync_twice(ref, IN_PLACE)
        got = sync_twice(store, ASIDE)
        assert [r.events for r in got] == [r.events for r in want]
        assert kinds(got[1].events) == MUTATION_EVENTS
        assert visible(redis_client, store) == visible(redis_client, ref)
        assert ref.version(TENANT) == 0
        assert store.version(TENANT) == 2
        # the baseline's version is retired: readable for RETIRE_SECONDS, then gone
        ttls = versioned(redis_client, store)
        assert ttls.keys() == {"body:1", "idx:1", "body:2", "idx:2"}
        assert ttls["body:2"] == ttls["idx:2"] == -1
        assert 0 < ttls["body:1"] <= RETIRE_SECONDS and 0 < ttls["idx:1"] <= RETIRE_SECONDS
        assert not redis_client.exists(store.key(TENANT, "aside"))
        assert not redis_client.exists(store.key(TENANT, "body"), store.key(TENANT, "idx"))
        # a reader that read version 1 before the switch still reads version 1 whole
        old_index = store.load_index(TENANT, 1)
        assert old_index is not None and machine_key("m08") in str(old_index)
        # what the committing process does a little before the EXPIRE: only retired keys go
        keys = [store.key(TENANT, f"{part}:{v}") for v in (1, 2) for part in ("body", "idx")]
        assert unlink_retired(store, keys) == 2
        assert versioned(redis_client, store) == {"body:2": -1, "idx:2": -1}

        # a small commit on a versioned snapshot goes in place, into the current version
        t = mutated_tenant()
        t.machines["m04"]["riskScore"] = "High"
        small = [
            commit(s, build_graph(t), detect=IN_PLACE, finished="2024-05-01T12:00:00.000Z")
            for s in (ref, store)
        ]
        assert small[1].events == small[0].events and small[1].written > 0
        assert store.version(TENANT) == 2
        assert visible(redis_client, store) == visible(redis_client, ref)
    finally:
        ref.drop(TENANT)


def test_readers_read_the_current_version(redis_client: redis.Redis, redis_prefix: str) -> None:
    ref = SnapshotStore(redis_client, redis_prefix + "-ref")
    store = SnapshotStore(redis_client, redis_prefix)
    try:
        sync_twice(ref, IN_PLACE)
        sync_twice(store, ASIDE)
        for name in ("body:1", "idx:1"):  # as if RETIRE_SECONDS had passed
            redis_client.delete(store.key(TENANT, name))

        want, got = ref.load_graph(TENANT), store.load_graph(TENANT)
        assert want is not None and got is not None
        assert got.entities == want.entities and got.relationships == want.relationships
        assert got.scope_of == want.scope_of
        assert store.load_index(TENANT) == ref.load_index(TENANT)
        keys = [machine_key("m01"), machine_key("m10"), machine_key("m08")]
        assert store.load_bodies(TENANT, keys) == ref.load_bodies(TENANT, keys)
        assert machine_key("m08") not in store.load_bodies(TENANT, keys)

        clear_cache()
        qg_want = load_query_graph(redis_client, ref.prefix, TENANT)
        qg_got = load_query_graph(redis_client, store.prefix, TENANT)
        assert qg_want is not None and qg_got is not None
        assert qg_got.generation == qg_want.generation == 2
        assert qg_got.entities == qg_want.entities
        assert qg_got.relationships == qg_want.relationships

        web_want = GraphCache(redis_client, ref.prefix).get(TENANT)
        web_got = GraphCache(redis_client, store.prefix).get(TENANT)
        assert web_want is not None and web_got is not None
        assert web_got.type_of == web_want.type_of and web_got.by_type == web_want.by_type
    finally:
        ref.drop(TENANT)
        clear_cache()


def test_legacy_unversioned_snapshot_is_read_then_upgraded(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    ref = SnapshotStore(redis_client, redis_prefix + "-ref")
    store = SnapshotStore(redis_client, redis_prefix)
    try:
        commit(store, build_graph(standard_tenant()), detect=IN_PLACE)  # today's layout
        assert not redis_client.exists(store.key(TENANT, "ver"))
        assert redis_client.exists(store.key(TENANT, "body"), store.key(TENANT, "idx")) == 2
        assert store.version(TENANT) == 0 and store.body_key(TENANT) == store.key(TENANT, "body")
        legacy = store.load_graph(TENANT)
        assert legacy is not None and machine_key("m08") in legacy.entities

        result = commit(store, build_graph(mutated_tenant()), detect=ASIDE, finished=LATER)
        sync_twice(ref, IN_PLACE)
        assert kinds(result.events) == MUTATION_EVENTS
        assert store.version(TENANT) == 1
        for name in ("body", "idx"):  # the legacy keys are retired like any old version
            ttl: Any = redis_client.ttl(store.key(TENANT, name))
            assert 0 < ttl <= RETIRE_SECONDS
        redis_client.delete(store.key(TENANT, "body"), store.key(TENANT, "idx"))
        assert visible(redis_client, store) == visible(redis_client, ref)
        got, want = store.load_graph(TENANT), ref.load_graph(TENANT)
        assert got is not None and want is not None and got.entities == want.entities
    finally:
        ref.drop(TENANT)


@pytest.mark.parametrize("point", ["mid_aside", "before_switch", "before_exec"])
@pytest.mark.parametrize("rerun", ["aside", "in_place"])
def test_crash_during_aside_commit_leaves_old_snapshot_and_no_events(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis, point: str, rerun: str
) -> None:
    store = SnapshotStore(redis_client, redis_prefix)
    commit(store, build_graph(standard_tenant()), detect=ASIDE)  # version 1
    before = snapshot_state(redis_client, store)

    proc = run_sync(redis_url, redis_prefix, point, ASIDE_ENV_ON)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert snapshot_state(redis_client, store) == before
    left = versioned(redis_client, store)  # the dead attempt's keys: they would expire
    assert {"body:1", "idx:1", "body:2"} <= left.keys()
    assert 0 < left["body:2"] <= ASIDE_TTL_SECONDS
    marker: Any = redis_client.get(store.key(TENANT, "aside"))
    assert marker == b"2"
    redis_client.delete(lock_key(redis_prefix, TENANT))  # as its TTL would

    proc = run_sync(redis_url, redis_prefix, None, ASIDE_ENV_ON if rerun == "aside" else {})
    assert proc.returncode == 0, proc.stderr
    assert_mutation_once(redis_client, redis_prefix)
    assert store.generation(TENANT) == 2
    assert not redis_client.exists(store.key(TENANT, "aside"))
    left = versioned(redis_client, store)
    if rerun == "aside":  # version 3; version 1 retired; the dead version 2 removed
        assert store.version(TENANT) == 3
        assert left.keys() == {"body:1", "idx:1", "body:3", "idx:3"}
        assert left["body:1"] <= RETIRE_SECONDS and left["body:3"] == -1
    else:
        assert store.version(TENANT) == 1
        assert left == {"body:1": -1, "idx:1": -1}


class TakenOverLock(TenantLock):
    """A lock that another sync takes over (as after an expiry) at its `at`-th extend()."""

    def __init__(self, client: redis.Redis, prefix: str, tenant: str, at: int) -> None:
        super().__init__(client, prefix, tenant, ttl_seconds=120, renew=False)
        self.at = at
        self.calls = 0

    def extend(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.client.set(self.key, b'{"token": "the other sync"}', px=120_000)
        super().extend()


def test_lost_lock_during_aside_build_writes_nothing_visible(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    store = SnapshotStore(redis_client, redis_prefix)
    commit(store, build_graph(standard_tenant()), detect=ASIDE)
    before = snapshot_state(redis_client, store)
    # extend() 1 is the commit's own check before diffing; 2 follows the first batch written
    # aside (the copied bodies), 3 the new bodies: taken over in the middle of the build
    lock = TakenOverLock(redis_client, redis_prefix, TENANT, at=3)
    with lock, pytest.raises(LockLost):
        commit(store, build_graph(mutated_tenant()), detect=ASIDE, lock=lock, finished=LATER)
    assert lock.calls == 3 and lock.lost
    assert snapshot_state(redis_client, store) == before
    assert versioned(redis_client, store) == {"body:1": -1, "idx:1": -1}  # its keys removed
    assert not redis_client.exists(store.key(TENANT, "aside"))

    redis_client.delete(lock_key(redis_prefix, TENANT))
    with TenantLock(redis_client, redis_prefix, TENANT, ttl_seconds=120) as fresh:
        result = commit(
            store, build_graph(mutated_tenant()), detect=ASIDE, lock=fresh, finished=LATER
        )
    assert kinds(result.events) == MUTATION_EVENTS
    assert kinds(stored_events(redis_client, redis_prefix)[1:]) == MUTATION_EVENTS


def test_drop_removes_every_version(redis_client: redis.Redis, redis_prefix: str) -> None:
    store = SnapshotStore(redis_client, redis_prefix)
    sync_twice(store, ASIDE)
    store.drop(TENANT)
    left = [k.decode() for k in redis_client.scan_iter(match=store.key(TENANT, "*"))]
    assert left == []
    assert store.load_graph(TENANT) is None and store.version(TENANT) == 0


def test_aside_threshold_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(pydantic.ValidationError):
        DetectSettings(commit_aside_min_items=0)
    assert DetectSettings().commit_aside_min_items == 100_000
    from monitor.snapshot.commit import _aside_min_items

    monkeypatch.delenv(ASIDE_ENV, raising=False)
    assert _aside_min_items(7) == 7
    monkeypatch.setenv(ASIDE_ENV, "3")
    assert _aside_min_items(7) == 3
    for bad in ("0", "many"):
        monkeypatch.setenv(ASIDE_ENV, bad)
        with pytest.raises(CommitError):
            _aside_min_items(7)
