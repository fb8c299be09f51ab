"""The query evaluator: the worker process that evaluates query alert rules for every tenant.

A sync that commits leaves its change set in Redis and enqueues `evaluate_queries(tenant)` on
queue `query`. One worker process consumes that queue (`mde-monitor worker --queues query
--concurrency 1`) and keeps each tenant's query graph in memory, so it only applies the change
set and re-matches what it can reach, wherever the sync ran. It says it is there with a
heartbeat key; while none is fresh, syncs evaluate their query rules themselves, as before.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import suppress
from typing import Any

import redis

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 10.0
HEARTBEAT_TTL_S = 35.0  # three missed beats: syncs evaluate their query rules themselves


def heartbeat_key(prefix: str) -> str:
    """Set (with a TTL) while a query evaluator is consuming queue `query`."""
    return f"{prefix}:run:query-evaluator"


def evaluator_alive(client: redis.Redis, prefix: str) -> bool:
    """Is a query evaluator consuming queue `query` (per its heartbeat)?"""
    return bool(client.exists(heartbeat_key(prefix)))


def evaluator_name(client: redis.Redis, prefix: str) -> str | None:
    """The live evaluator's `host:pid`, or None."""
    raw: Any = client.get(heartbeat_key(prefix))
    return raw.decode() if isinstance(raw, bytes) else raw


class Heartbeat:
    """A daemon thread that keeps the heartbeat key fresh until `stop()`."""

    def __init__(self, client: redis.Redis, prefix: str, every: float = HEARTBEAT_EVERY_S):
        self.client = client
        self.key = heartbeat_key(prefix)
        self.every = every
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="query-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        try:
            self.client.set(self.key, self.me, px=int(HEARTBEAT_TTL_S * 1000))
        except redis.RedisError as exc:  # Redis away: the key expires, syncs evaluate inline
            log.warning("query evaluator heartbeat failed", extra={"error": str(exc)})

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()

    def stop(self) -> None:
        """Stop beating and withdraw the key (if it is still ours): syncs evaluate inline."""
        self._stop.set()
        with suppress(redis.RedisError):
            raw: Any = self.client.get(self.key)
            if raw is not None and raw.decode() == self.me:
                self.client.delete(self.key)
