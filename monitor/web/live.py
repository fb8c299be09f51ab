"""Server-Sent Events for the live timeline: ONE blocking XREAD per console process on the
all-tenants stream, fanned out to every connected browser (50 clients cost one Redis reader)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis

from monitor.events import stream
from monitor.redis_conn import tls_options
from monitor.web.data import ChangeFilter, row

log = logging.getLogger(__name__)
QUEUE_SIZE = 200  # batches of up to 500 events


class Broadcaster:
    """Reads new events once and hands them to each subscriber's queue."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.redis_url = redis_url
        self.key = stream.stream_key(prefix)
        self.subscribers: set[asyncio.Queue[list[dict[str, Any]] | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def subscribe(self) -> asyncio.Queue[list[dict[str, Any]] | None]:
        """A queue of new events; returns once the reader knows where it starts, so a replay
        read after this call overlaps the live feed (no gap; callers drop duplicates by id)."""
        q: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue(QUEUE_SIZE)
        self.subscribers.add(q)
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), timeout=10)
        return q

    def unsubscribe(self, q: asyncio.Queue[list[dict[str, Any]] | None]) -> None:
        self.subscribers.discard(q)

    async def _run(self) -> None:
        clean, tls = tls_options(self.redis_url)  # the same TLS settings as every other client
        client = aioredis.Redis.from_url(clean, **(tls or {}))
        try:
            newest: Any = await client.xrevrange(self.key, count=1)
            last = newest[0][0].decode() if newest else "0-0"
        finally:
            self._ready.set()
        try:
            while True:
                if not self.subscribers:
                    # let go before the awaits below: a browser subscribing while this reader
                    # closes starts a new one instead of waiting on a reader that is leaving
                    self._task = None
                    break
                try:
                    resp: Any = await client.xread({self.key: last}, block=5_000, count=500)
                except (OSError, aioredis.RedisError) as exc:
                    log.warning("live timeline: redis read failed: %s", exc)
                    await asyncio.sleep(1)
                    continue
                for _key, batch in resp or []:
                    items: list[dict[str, Any]] = []
                    for sid, ev in stream.entries(batch):
                        r = row(sid, ev)
                        # encoded once here, not once per connected browser
                        items.append({"row": r, "event": ev, "frame": frame(r)})
                    if batch:
                        sid = batch[-1][0]
                        last = sid.decode() if isinstance(sid, bytes) else str(sid)
                    if not items:
                        continue
                    # one queue entry per read (up to 500 events), not one per event; the
                    # frames pre-joined for browsers that filter nothing
                    items[0]["joined"] = "".join(it["frame"] for it in items)
                    for q in list(self.subscribers):
                        with contextlib.suppress(asyncio.QueueFull):
                            q.put_nowait(items)
        finally:
            await client.aclose()

    async def close(self) -> None:
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def frame(r: dict[str, Any]) -> str:
    """One SSE message for a timeline row."""
    return f"id: {r['id']}\nevent: change\ndata: {orjson.dumps(r, default=str).decode()}\n\n"


def sid_key(sid: str) -> tuple[int, int]:
    """A stream id as a comparable pair."""
    ms, _, seq = sid.partition("-")
    return int(ms or 0), int(seq or 0)


def wanted(flt: ChangeFilter, item: dict[str, Any]) -> bool:
    ev = item["event"]
    if flt.tenant and item["row"]["tenant"] != flt.tenant:
        return False
    return flt.matches(ev)
