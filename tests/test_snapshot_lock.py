"""Tenant lock: one sync at a time, renewal, and fencing of a holder whose lock expired."""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis
from detect_helpers import (
    TENANT,
    build_graph,
    commit,
    mutated_tenant,
    standard_tenant,
    stored_events,
)

from monitor.snapshot.lock import LockLost, TenantBusy, TenantLock
from monitor.snapshot.store import BIG_ARGUMENT, SnapshotStore, StreamingTransaction, send_batch


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    """Poll a condition until it holds (fails the test at the deadline)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        threading.Event().wait(0.01)


def test_second_holder_gets_tenant_busy_naming_the_holder(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    with TenantLock(redis_client, redis_prefix, TENANT, ttl_seconds=30) as lock:
        assert lock.fence >= 1
        with pytest.raises(TenantBusy) as err:
            TenantLock(redis_client, redis_prefix, TENANT).acquire()
        assert err.value.holder["pid"] == os.getpid()
        assert err.value.holder["fence"] == lock.fence
        assert "token" not in err.value.holder
        assert f"pid {os.getpid()}" in str(err.value) and lock.token not in str(err.value)
    # released: free again
    with TenantLock(redis_client, redis_prefix, TENANT, ttl_seconds=30):
        pass


def test_two_concurrent_syncs_one_is_busy(redis_client: redis.Redis, redis_prefix: str) -> None:
    store = SnapshotStore(redis_client, redis_prefix)
    holding = threading.Event()
    tried = threading.Event()
    outcome: dict[str, object] = {}

    def first() -> None:
        with TenantLock(redis_client, redis_prefix, TENANT, ttl_seconds=30) as lock:
            holding.set()
            tried.wait(10)
            outcome["first"] = commit(store, build_graph(standard_tenant()), lock=lock).status

    def second() -> None:
        holding.wait(10)
        try:
            with TenantLock(redis_client, redis_prefix, TENANT, ttl_seconds=30) as lock:
                outcome["second"] = commit(store, build_graph(standard_tenant()), lock=lock).status
        except TenantBusy as exc:
            outcome["second"] = exc
        finally:
            tried.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert outcome["first"] == "ok"
    assert isinstance(outcome["second"], TenantBusy)
    assert store.generation(TENANT) == 1


def test_lock_is_renewed_while_held(redis_client: redis.Redis, redis_prefix: str) -> None:
    with TenantLock(
        redis_client, redis_prefix, TENANT, ttl_seconds=1.0, renew_every_seconds=0.05
    ) as lock:
        redis_client.pexpire(lock.key, 300)  # as if time had passed
        wait_for(lambda: int(redis_client.pttl(lock.key)) > 500)  # type: ignore[arg-type]
        assert redis_client.get(lock.key) == lock.value


def test_stolen_lock_refuses_the_old_holders_commit(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    store = SnapshotStore(redis_client, redis_prefix)
    commit(store, build_graph(standard_tenant()))
    old = TenantLock(redis_client, redis_prefix, TENANT, ttl_seconds=30, renew=False).acquire()
    redis_client.pexpire(old.key, 1)  # the old holder stalled past its TTL
    wait_for(lambda: not redis_client.exists(old.key))
    with TenantLock(redis_client, redis_prefix, TENANT, ttl_seconds=30) as new:
        assert new.fence > old.fence
        with pytest.raises(LockLost):
            commit(store, build_graph(mutated_tenant()), lock=old)
        assert store.generation(TENANT) == 1
        assert [e["type"] for e in stored_events(redis_client, redis_prefix)] == [
            "mde.sync.baseline"
        ]
        assert redis_client.get(new.key) == new.value  # the new holder's lock is untouched
        assert commit(store, build_graph(mutated_tenant()), lock=new).generation == 2
    old.release()  # not ours any more: leaves nothing behind, raises nothing


def test_watch_aborts_when_a_watched_key_changes(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:w"
    redis_client.set(key, "a")
    with StreamingTransaction(redis_client, [key]) as tx:
        assert tx.get(key) == b"a"
        tx.multi()
        tx.queue("SET", f"{redis_prefix}:other", "x")
        redis_client.set(key, "b")  # someone else writes between WATCH and EXEC
        assert tx.execute() is None
    assert not redis_client.exists(f"{redis_prefix}:other")


def test_big_arguments_are_sent_whole_beside_small_commands(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    """An index part (an argument of BIG_ARGUMENT bytes or more) goes as a piece of its own,
    between small commands packed as usual: every value arrives byte for byte."""
    big = bytes(range(256)) * (BIG_ARGUMENT // 256 + 7)
    view = memoryview(bytearray(big[:BIG_ARGUMENT]))
    with StreamingTransaction(redis_client, []) as tx:
        tx.multi()
        tx.queue("SET", f"{redis_prefix}:small", "x")
        tx.queue("HSET", f"{redis_prefix}:idx", "p0", big, "p1", view, "n", 7)
        tx.queue("SET", f"{redis_prefix}:after", b"\r\n")
        assert tx.execute() is not None
    replies = send_batch(redis_client, [("SET", f"{redis_prefix}:batched", big), ("GET", "x")])
    assert replies[0] in (b"OK", "OK", True)
    assert redis_client.hgetall(f"{redis_prefix}:idx") == {
        b"p0": big,
        b"p1": bytes(view),
        b"n": b"7",
    }
    assert redis_client.get(f"{redis_prefix}:small") == b"x"
    assert redis_client.get(f"{redis_prefix}:after") == b"\r\n"
    assert redis_client.get(f"{redis_prefix}:batched") == big
