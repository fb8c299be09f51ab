"""Crash safety: a sync commit SIGKILLed at any point leaves the old snapshot and no events;
a re-run then reports every real change exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from detect_helpers import (
    MUTATION_EVENTS,
    TENANT,
    assert_mutation_once,
    build_graph,
    commit,
    kinds,
    standard_tenant,
    stored_events,
)

from monitor.snapshot.commit import CRASH_ENV
from monitor.snapshot.lock import lock_key, read_holder
from monitor.snapshot.store import SnapshotStore

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

SCRIPT = """
import sys
sys.path.insert(0, sys.argv[3])
import redis
from detect_helpers import TENANT, build_graph, commit, mutated_tenant
from monitor.snapshot.lock import TenantLock
from monitor.snapshot.store import SnapshotStore

client = redis.Redis.from_url(sys.argv[1])
store = SnapshotStore(client, sys.argv[2])
with TenantLock(client, sys.argv[2], TENANT, ttl_seconds=120) as lock:
    res = commit(store, build_graph(mutated_tenant()), lock=lock,
                 finished="2024-05-01T11:00:00.000Z")
print(len(res.events))
"""


def run_sync(
    redis_url: str, prefix: str, crash_at: str | None, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The mutated tenant's sync in a subprocess (SIGKILLed at `crash_at`)."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env.update(extra_env or {})
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, redis_url, prefix, str(TESTS)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def snapshot_state(client: redis.Redis, store: SnapshotStore) -> dict[str, object]:
    """Everything a reader can see of the tenant (the current version's index and bodies)."""
    return {
        "gen": client.get(store.key(TENANT, "gen")),
        "ver": client.get(store.key(TENANT, "ver")),
        "idx": client.hgetall(store.index_key(TENANT)),
        "body": client.hgetall(store.body_key(TENANT)),
        "meta": client.get(store.key(TENANT, "meta")),
        "scopes": client.get(store.key(TENANT, "scopes")),
        "history": client.lrange(store.key(TENANT, "history"), 0, -1),
        "events": stored_events(client, store.prefix),
        "all": stored_events(client, store.prefix, None),
    }


@pytest.mark.parametrize("point", ["after_diff", "mid_queue", "before_exec"])
def test_crash_before_exec_leaves_old_snapshot_and_no_events(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis, point: str
) -> None:
    store = SnapshotStore(redis_client, redis_prefix)
    commit(store, build_graph(standard_tenant()))
    before = snapshot_state(redis_client, store)

    proc = run_sync(redis_url, redis_prefix, point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert snapshot_state(redis_client, store) == before
    holder = read_holder(redis_client, redis_prefix, TENANT)  # the dead holder's lock remains
    assert holder is not None and "token" not in holder
    redis_client.delete(lock_key(redis_prefix, TENANT))  # as its TTL would

    proc = run_sync(redis_url, redis_prefix, None)
    assert proc.returncode == 0, proc.stderr
    assert_mutation_once(redis_client, redis_prefix)
    assert store.generation(TENANT) == 2


def test_crash_after_exec_then_rerun_gives_no_duplicates(
    redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    store = SnapshotStore(redis_client, redis_prefix)
    commit(store, build_graph(standard_tenant()))
    proc = run_sync(redis_url, redis_prefix, "after_exec")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    events = stored_events(redis_client, redis_prefix)[1:]
    assert kinds(events) == MUTATION_EVENTS  # committed whole
    redis_client.delete(lock_key(redis_prefix, TENANT))

    proc = run_sync(redis_url, redis_prefix, None)  # the orchestrator retries the same sync
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"
    after = stored_events(redis_client, redis_prefix)[1:]
    assert after == events
    assert store.generation(TENANT) == 3
