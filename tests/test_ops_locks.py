"""The one lock helper (redis-py's Lock): token-checked release, a named holder's restart (9.12)."""

from __future__ import annotations

import time

import redis

from monitor.locks import Renewer, make_lock, release, try_acquire


def test_release_only_by_the_holder_and_restart_with_the_same_token(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:lock:x"
    first = make_lock(redis_client, key, 30)
    assert try_acquire(first)
    second = make_lock(redis_client, key, 30)
    assert not try_acquire(second)
    assert not release(second)  # never took it: nothing released
    assert redis_client.exists(key)
    # the first holder's lock expired and someone else holds it now: its release is refused
    redis_client.delete(key)
    assert try_acquire(second)
    assert not release(first)
    assert redis_client.get(key) == second.local.token
    assert release(second) and not redis_client.exists(key)

    # a named holder (a delivery lease: the consumer name) takes its own lock back and renews it
    lease = make_lock(redis_client, key, 30)
    assert try_acquire(lease, token="worker-1:42")
    redis_client.pexpire(key, 1000)
    again = make_lock(redis_client, key, 30)
    assert try_acquire(again, token="worker-1:42")
    assert int(redis_client.pttl(key)) > 1000  # type: ignore[arg-type]
    other = make_lock(redis_client, key, 30)
    assert not try_acquire(other, token="worker-2:7")
    assert redis_client.get(key) == b"worker-1:42"


def test_a_renewed_lock_outlives_its_ttl_and_lapses_once_renewal_stops(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:lock:renewed"
    ttl_s = 3.0  # renewed every second: a stall of 2 s would be needed to lose it
    lock = make_lock(redis_client, key, ttl_s)
    assert try_acquire(lock)
    renewer = Renewer(lock, ttl_s)
    try:
        # three renewals seen: the remaining TTL goes back up each time, the lock still ours
        renewals, last = 0, int(redis_client.pttl(key))
        deadline = time.monotonic() + 30
        while renewals < 3:
            assert time.monotonic() < deadline, f"{renewals} renewals seen"
            assert redis_client.get(key) == lock.local.token
            now = int(redis_client.pttl(key))
            renewals += now > last
            last = now
            time.sleep(0.05)
    finally:
        renewer.stop()
    # a holder that stops renewing (it died, or lost Redis) frees the lock after one TTL
    deadline = time.monotonic() + ttl_s + 10
    while redis_client.exists(key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not redis_client.exists(key)
