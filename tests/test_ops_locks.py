"""The one lock helper (redis-py's Lock): token-checked release, a named holder's restart (9.12)."""

from __future__ import annotations

import redis

from monitor.locks import make_lock, release, try_acquire


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
