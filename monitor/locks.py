"""Short Redis locks and leases: redis-py's `Lock` (a token per holder, release only by it).

The tenant sync lock (monitor/snapshot/lock.py) adds fencing and renewal on top; everything
else - the dispatch run lock, a delivery's lease - uses these helpers rather than its own
SET NX / Lua copies.
"""

from __future__ import annotations

import logging
import threading

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


def release(lock: Lock, token: str | None = None) -> bool:
    """Release if still ours; False (logged) when it expired or another holder has it now.

    `token`: the fixed holder name it was taken with (`try_acquire`), for a lock object built
    afresh to release it."""
    if token is not None:
        lock.local.token = token.encode()
    try:
        lock.release()
    except LockError as exc:
        log.warning(
            "lock was no longer ours at release", extra={"key": lock.name, "error": str(exc)}
        )
        return False
    return True


class Renewer:
    """Keeps a held lock alive: renews its TTL every third of it until `stop()`.

    A holder that dies (or loses Redis, so its release never arrives) leaves the lock for one
    short TTL instead of for its whole worst-case run time.
    """

    def __init__(self, lock: Lock, ttl_s: float) -> None:
        self.lock = lock
        self.every = max(0.2, ttl_s / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"renew {lock.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.lock.reacquire()
            except LockError as exc:  # expired and taken by another, or released
                log.warning(
                    "lock renewal stopped", extra={"key": self.lock.name, "error": str(exc)}
                )
                return
            except redis.RedisError:  # Redis away for a moment: try again next period
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
