"""Short Redis locks and leases: redis-py's `Lock` (a token per holder, release only by it).

The tenant sync lock (monitor/snapshot/lock.py) adds fencing and renewal on top; everything
else - the dispatch run lock, a delivery's lease - uses these helpers rather than its own
SET NX / Lua copies.
"""

from __future__ import annotations

import logging

import redis
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

log = logging.getLogger(__name__)


def make_lock(client: redis.Redis, key: str, ttl_s: float) -> Lock:
    """A non-blocking lock on `key` that expires after `ttl_s` unless released or renewed."""
    return client.lock(key, timeout=ttl_s, blocking=False, thread_local=False)


def try_acquire(lock: Lock, token: str | None = None) -> bool:
    """Take the lock now (False when someone holds it). A fixed `token` names the holder:
    a holder that restarts with the same token takes its own lock back and renews it."""
    if lock.acquire(blocking=False, token=token):
        return True
    if token is None:
        return False
    lock.local.token = token.encode()
    try:
        lock.reacquire()  # ours already (e.g. a restarted worker): renew it
    except LockNotOwnedError:
        lock.local.token = None
        return False
    return True


def release(lock: Lock) -> bool:
    """Release if still ours; False (logged) when it expired or another holder has it now."""
    try:
        lock.release()
    except LockError as exc:
        log.warning(
            "lock was no longer ours at release", extra={"key": lock.name, "error": str(exc)}
        )
        return False
    return True
