"""One sync per tenant at a time: a Redis lock with a random token and a fencing counter.

`SET <prefix>:lock:<tenant> <value> NX PX ttl` where the value names the holder (host, pid,
since), a random token and a fencing number from `INCR <prefix>:lockfence:<tenant>`. The lock
is renewed by a background thread while held (and by `extend()`); a commit pauses renewal,
WATCHes the lock key and checks the value inside its transaction, so a holder whose lock
expired and was taken by someone else cannot write anything.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
import redis

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class TenantBusy(Exception):
    """Another sync holds the tenant's lock; `holder` says who (host, pid, since)."""

    def __init__(self, tenant: str, holder: dict[str, Any] | None) -> None:
        self.tenant = tenant
        self.holder = holder or {}
        who = (
            f"{self.holder.get('host', '?')} pid {self.holder.get('pid', '?')}"
            f" since {self.holder.get('since', '?')}"
            if holder
            else "another process (lock released meanwhile)"
        )
        super().__init__(f"tenant {tenant!r} is being synced by {who}")


class LockLost(Exception):
    """The lock expired or was taken over: this holder must not write anything."""


def lock_key(prefix: str, tenant: str) -> str:
    return f"{prefix}:lock:{tenant}"


def fence_key(prefix: str, tenant: str) -> str:
    return f"{prefix}:lockfence:{tenant}"


def read_holder(client: redis.Redis, prefix: str, tenant: str) -> dict[str, Any] | None:
    """Who holds the tenant's lock now (without the token), or None."""
    raw: Any = client.get(lock_key(prefix, tenant))
    if not raw:
        return None
    try:
        data: dict[str, Any] = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"raw": "unreadable"}
    data.pop("token", None)
    return data


class TenantLock:
    """Context manager: exclusive right to sync one tenant (raises TenantBusy)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        tenant: str,
        ttl_seconds: float = 3600,
        *,
        renew: bool = True,
        renew_every_seconds: float | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.tenant = tenant
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.renew = renew
        self.renew_every = renew_every_seconds or max(0.05, ttl_seconds / 3)
        self.key = lock_key(prefix, tenant)
        self.token = ""
        self.fence = 0
        self.value = b""
        self.lost = False
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._extend = client.register_script(_EXTEND)
        self._release = client.register_script(_RELEASE)

    def __repr__(self) -> str:
        return f"TenantLock(tenant={self.tenant!r}, fence={self.fence}, held={bool(self.value)})"

    def acquire(self) -> TenantLock:
        """Take the lock or raise TenantBusy naming the holder."""
        fence = int(self.client.incr(fence_key(self.prefix, self.tenant)))  # type: ignore[arg-type]
        token = secrets.token_hex(16)
        value = orjson.dumps(
            {
                "token": token,
                "fence": fence,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            }
        )
        if not self.client.set(self.key, value, nx=True, px=self.ttl_ms):
            raise TenantBusy(self.tenant, read_holder(self.client, self.prefix, self.tenant))
        self.token, self.fence, self.value, self.lost = token, fence, value, False
        if self.renew:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._renew_loop, name=f"lock-renew-{self.tenant}", daemon=True
            )
            self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self.extend()
            except LockLost:
                return
            except (redis.RedisError, OSError):
                continue  # transient: the next round or the commit check decides

    def extend(self) -> None:
        """Reset the TTL; LockLost when the lock is no longer ours."""
        with self._mutex:
            self._extend_held()

    def _extend_held(self) -> None:
        if not self.value or self.lost:
            raise LockLost(f"lock of tenant {self.tenant!r} is not held")
        if not self._extend(keys=[self.key], args=[self.value, self.ttl_ms]):
            self.lost = True
            raise LockLost(
                f"lock of tenant {self.tenant!r} expired or was taken over (fence {self.fence})"
            )

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Extend the lock now, then hold off renewals until the block ends.

        A commit runs inside: a renewal's PEXPIRE would invalidate its WATCH on the lock key.
        """
        with self._mutex:
            self._extend_held()
            yield

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.value:
            try:
                self._release(keys=[self.key], args=[self.value])
            finally:
                self.value = b""

    def __enter__(self) -> TenantLock:
        return self.acquire()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.release()
