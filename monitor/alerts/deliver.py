"""Delivery: a durable queue of (notification, sink) in Redis, retries with backoff, dead letters.

Keys under `<prefix>:alerts:`
- `delivery:<id>` hash: the notification (JSON), sink, status, attempts, next_at, last error;
- `queue` sorted set: delivery id -> when it is due;
- `deliveries` sorted set: every delivery id -> created (for listing);
- `log` stream: every attempt (sink, status, latency, attempt, error) and every silenced event;
- `dead` stream: deliveries that are dead now (ran out of retries or failed for good); a retried
  one leaves it (`requeue`), so its length is the dead-letter count;
- `sinks:disabled` hash: sinks the receiver told us are gone (HTTP 410), until `sinks enable`;
- `held:<sink>` set: deliveries parked while their sink is disabled.

Statuses: queued -> sending -> sent | retrying | dead | held. A delivery marked `sent` is never
sent again. The window that remains: a crash after the receiver accepted a message and before
`sent` is recorded re-sends it on restart with the same notification id (the idempotency key:
webhook-id, Message-ID, dedup_key), so receivers can drop the duplicate (at-least-once).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis
from redis.lock import Lock

from monitor.alerts.rules import DeliveryPolicy
from monitor.alerts.sinks.base import DeliveryError, Notification, Sink
from monitor.locks import make_lock, release, try_acquire
from monitor.redact import scrub

log = logging.getLogger(__name__)

CRASH_ENV = "MDE_MONITOR_CRASH_AT"
LOG_MAXLEN = 100_000
DEAD_MAXLEN = 10_000
FAILED_STATUSES = ("retrying", "dead", "held")

_crash_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at a named point when $MDE_MONITOR_CRASH_AT says so.

    `MDE_MONITOR_CRASH_AT=after_send_before_mark` dies at the first pass, `...:3` at the third.
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def backoff_delay(attempt: int, policy: DeliveryPolicy, rng: random.Random | None = None) -> float:
    """Exponential backoff for the attempt that just failed (1-based), with +-jitter share."""
    base = min(policy.backoff_max, policy.backoff_base * (2 ** max(0, attempt - 1)))
    if policy.jitter:
        r = (rng or random).uniform(-policy.jitter, policy.jitter)
        base *= 1 + r
    return max(0.0, min(base, policy.backoff_max))


def retry_delay(
    attempt: int,
    policy: DeliveryPolicy,
    retry_after: float | None,
    rng: random.Random | None = None,
) -> float:
    """Seconds until the next attempt: the receiver's Retry-After when given (capped), else backoff."""
    if retry_after is not None and retry_after >= 0:
        return min(float(retry_after), policy.retry_after_max)
    return backoff_delay(attempt, policy, rng)


def notification_to_json(n: Notification) -> bytes:
    return orjson.dumps(n, default=str)  # orjson serialises dataclasses natively


def notification_from_json(raw: bytes | str) -> Notification:
    d = orjson.loads(raw)
    return Notification(**d)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def delivery_id(notification_id: str, sink: str) -> str:
    return f"{notification_id}-{sink}"


@dataclass
class DeliveryOutcome:
    """What one `attempt` did."""

    id: str
    sink: str
    status: str  # sent | retrying | dead | held | skipped | busy | missing
    attempt: int = 0
    latency_ms: float | None = None
    error: str | None = None
    http_status: int | None = None
    retry_after: float | None = None
    next_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DeliveryQueue:
    """The delivery records, their queue, the delivery log and the dead letters of one prefix."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        policy: DeliveryPolicy | None = None,
        *,
        consumer: str = "dispatch",
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.policy = policy or DeliveryPolicy()
        self.consumer = consumer
        self.clock = clock
        self.rng = rng or random.Random()
        base = f"{prefix}:alerts"
        self.queue_key = f"{base}:queue"
        self.index_key = f"{base}:deliveries"
        self.log_key = f"{base}:log"
        self.dead_key = f"{base}:dead"
        self.disabled_key = f"{base}:sinks:disabled"

    # keys -------------------------------------------------------------------------------------

    def record_key(self, did: str) -> str:
        return f"{self.prefix}:alerts:delivery:{did}"

    def lease_key(self, did: str) -> str:
        return f"{self.prefix}:alerts:lease:{did}"

    def held_key(self, sink: str) -> str:
        return f"{self.prefix}:alerts:held:{sink}"

    # writes on a caller's transaction ---------------------------------------------------------

    def log_entry(self, pipe: Any, kind: str, **fields: Any) -> None:
        """Queue one delivery-log entry (no secrets: callers pass scrubbed text only)."""
        body = {"ts": f"{self.clock():.3f}", "kind": kind}
        body.update({k: str(v) for k, v in fields.items() if v is not None})
        pipe.xadd(self.log_key, body, maxlen=LOG_MAXLEN, approximate=True)

    def enqueue(self, pipe: Any, notification: Notification, sink: str, now: float) -> str:
        """Queue a delivery of `notification` to `sink` on `pipe` (part of the flush transaction)."""
        did = delivery_id(notification.id, sink)
        pipe.hset(
            self.record_key(did),
            mapping={
                "id": did,
                "sink": sink,
                "rule": notification.rule,
                "notification_id": notification.id,
                "group_key": notification.group_key,
                "severity": notification.severity,
                "state": notification.status,
                "title": notification.title,
                "total": notification.total,
                "tenant": notification.tenant or "",
                "status": "queued",
                "attempts": 0,
                "created_at": now,
                "next_at": now,
                "notification": notification_to_json(notification),
            },
        )
        pipe.zadd(self.queue_key, {did: now})
        pipe.zadd(self.index_key, {did: now})
        self.log_entry(pipe, "queued", delivery=did, sink=sink, rule=notification.rule)
        return did

    def record_silenced(
        self, pipe: Any, event_id: str, rule: str, silence_id: str, status: str
    ) -> None:
        self.log_entry(
            pipe, "silenced", event=event_id, rule=rule, silence=silence_id, state=status
        )

    # reads ------------------------------------------------------------------------------------

    def get(self, did: str) -> dict[str, str] | None:
        raw: Any = self.client.hgetall(self.record_key(did))
        if not raw:
            return None
        return {_s(k): _s(v) for k, v in raw.items()}

    def due(self, now: float | None = None, limit: int = 1000) -> list[str]:
        now = self.clock() if now is None else now
        ids: Any = self.client.zrangebyscore(self.queue_key, "-inf", now, start=0, num=limit)
        return [_s(i) for i in ids]

    def next_due_at(self) -> float | None:
        first: Any = self.client.zrange(self.queue_key, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def queued_count(self) -> int:
        return int(self.client.zcard(self.queue_key))  # type: ignore[arg-type]

    def disabled_sinks(self) -> dict[str, dict[str, Any]]:
        raw: Any = self.client.hgetall(self.disabled_key)
        return {_s(k): orjson.loads(v) for k, v in raw.items()}

    def records(self, failed_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        """Newest deliveries first (without the notification body)."""
        ids: Any = self.client.zrevrange(self.index_key, 0, -1 if failed_only else limit - 1)
        out: list[dict[str, Any]] = []
        gone: list[str] = []
        chunk = 500
        ids = [_s(i) for i in ids]
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            pipe = self.client.pipeline(transaction=False)
            for did in part:
                pipe.hgetall(self.record_key(did))
            for did, raw in zip(part, pipe.execute(), strict=True):
                if not raw:
                    gone.append(did)
                    continue
                rec = {_s(k): _s(v) for k, v in raw.items()}
                rec.pop("notification", None)
                if failed_only and rec.get("status") not in FAILED_STATUSES:
                    continue
                out.append(rec)
                if len(out) >= limit:
                    break
            if len(out) >= limit:
                break
        if gone:
            self.client.zrem(self.index_key, *gone)
        return out

    def _newest(self, key: str, count: int) -> list[dict[str, str]]:
        raw: Any = self.client.xrevrange(key, count=count)
        return [{"id": _s(i), **{_s(k): _s(v) for k, v in f.items()}} for i, f in raw]

    def log_entries(self, count: int = 100) -> list[dict[str, str]]:
        """Newest delivery-log entries first."""
        return self._newest(self.log_key, count)

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        return self._newest(self.dead_key, count)

    # one attempt ------------------------------------------------------------------------------

    def _lease_lock(self, did: str) -> Lock:
        return make_lock(self.client, self.lease_key(did), max(1.0, self.policy.lease))

    def _lease(self, did: str) -> bool:
        """Take the delivery's lease (the consumer name is the token: a restart of this worker
        takes its own lease back)."""
        return try_acquire(self._lease_lock(did), token=self.consumer)

    def _settle(
        self,
        did: str,
        rec: dict[str, str],
        sink: str,
        status: str,
        attempt: int,
        latency_ms: float | None,
        record: dict[str, Any],
        *,
        due_at: float | None = None,
        **log_fields: Any,
    ) -> Any:
        """A transaction recording an attempt's outcome: the record, the queue (due again at
        `due_at`, else off it), the lease released, the log entry. The caller adds its own
        writes and executes it."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.record_key(did), mapping={"status": status, **record})
        if due_at is None:
            pipe.zrem(self.queue_key, did)
        else:
            pipe.zadd(self.queue_key, {did: due_at})
        pipe.delete(self.lease_key(did))
        self.log_entry(
            pipe,
            "attempt",
            delivery=did,
            sink=sink,
            rule=rec.get("rule"),
            status=status,
            attempt=attempt,
            latency_ms=latency_ms,
            **log_fields,
        )
        return pipe

    def attempt(self, did: str, sinks: Mapping[str, Sink]) -> DeliveryOutcome:
        """Try one delivery once; on failure schedule the retry, dead-letter it or hold it."""
        rec = self.get(did)
        if rec is None:
            self.client.zrem(self.queue_key, did)
            return DeliveryOutcome(did, "", "missing", error="no such delivery")
        sink_name = rec.get("sink", "")
        if rec.get("status") in ("sent", "dead", "held"):
            self.client.zrem(self.queue_key, did)
            return DeliveryOutcome(did, sink_name, "skipped", int(rec.get("attempts") or 0))
        if not self._lease(did):
            return DeliveryOutcome(did, sink_name, "busy", error="another worker holds the lease")
        try:
            return self._attempt(did, rec, sink_name, sinks)  # every outcome releases the lease
        except BaseException:
            release(self._lease_lock(did), token=self.consumer)  # only if still ours
            raise

    def _attempt(
        self, did: str, rec: dict[str, str], sink_name: str, sinks: Mapping[str, Sink]
    ) -> DeliveryOutcome:
        now = self.clock()
        attempt = int(rec.get("attempts") or 0) + 1
        disabled = self.disabled_sinks()
        if sink_name in disabled:
            return self._hold(did, sink_name, rec, attempt - 1, disabled[sink_name])
        sink = sinks.get(sink_name)
        if sink is None:
            return self._dead(
                did,
                rec,
                attempt - 1,
                f"sink {sink_name!r} is not available (not declared, or it failed to build:"
                " see `mde-monitor rules check`)",
                None,
                now,
            )
        notification = notification_from_json(rec["notification"])
        self.client.hset(
            self.record_key(did),
            mapping={"status": "sending", "attempts": attempt, "last_attempt_at": now},
        )
        crash_point("before_send")
        started = time.perf_counter()
        error: DeliveryError | None = None
        try:
            sink.send(notification)
        except DeliveryError as exc:
            error = exc
        except Exception as exc:  # a sink bug: retry, but never log its text (may hold secrets)
            error = DeliveryError(f"{type(exc).__name__} in sink", retryable=True)
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        crash_point("after_send_before_mark")
        now = self.clock()
        if error is None:
            return self._sent(did, rec, sink_name, attempt, latency_ms, now)
        message = scrub(str(error))
        if error.disable:
            self._disable(sink_name, message, now)
            out = self._hold(did, sink_name, rec, attempt, {"reason": message}, latency_ms)
            out.http_status = error.status
            return out
        if error.retryable and attempt < self.policy.max_attempts:
            delay = retry_delay(attempt, self.policy, error.retry_after, self.rng)
            next_at = now + delay
            self._settle(
                did,
                rec,
                sink_name,
                "retrying",
                attempt,
                latency_ms,
                {
                    "next_at": next_at,
                    "last_error": message,
                    "last_http_status": error.status or "",
                    "retry_after": "" if error.retry_after is None else error.retry_after,
                },
                due_at=next_at,
                http_status=error.status,
                error=message,
                retry_after=error.retry_after,
                next_at=f"{next_at:.3f}",
            ).execute()
            log.warning(
                "delivery failed, will retry",
                extra={
                    "delivery": did,
                    "sink": sink_name,
                    "attempt": attempt,
                    "error": message,
                    "retry_in_s": round(delay, 3),
                },
            )
            return DeliveryOutcome(
                did,
                sink_name,
                "retrying",
                attempt,
                latency_ms,
                message,
                error.status,
                error.retry_after,
                next_at,
            )
        reason = message if not error.retryable else f"{message} (gave up after {attempt} attempts)"
        out = self._dead(did, rec, attempt, reason, latency_ms, now, error.status)
        return out

    def _sent(
        self, did: str, rec: dict[str, str], sink: str, attempt: int, latency_ms: float, now: float
    ) -> DeliveryOutcome:
        pipe = self._settle(
            did,
            rec,
            sink,
            "sent",
            attempt,
            latency_ms,
            {"sent_at": now, "latency_ms": latency_ms, "last_error": ""},
        )
        pipe.expire(self.record_key(did), int(self.policy.keep_sent))
        pipe.execute()
        log.info(
            "delivered",
            extra={"delivery": did, "sink": sink, "attempt": attempt, "latency_ms": latency_ms},
        )
        return DeliveryOutcome(did, sink, "sent", attempt, latency_ms)

    def _dead(
        self,
        did: str,
        rec: dict[str, str],
        attempt: int,
        reason: str,
        latency_ms: float | None,
        now: float,
        http_status: int | None = None,
    ) -> DeliveryOutcome:
        sink = rec.get("sink", "")
        pipe = self._settle(
            did,
            rec,
            sink,
            "dead",
            attempt,
            latency_ms,
            {"last_error": reason, "last_http_status": http_status or "", "dead_at": now},
            http_status=http_status,
            error=reason,
        )
        pipe.xadd(
            self.dead_key,
            {
                "delivery": did,
                "sink": sink,
                "rule": rec.get("rule", ""),
                "attempts": attempt,
                "error": reason,
                "ts": f"{now:.3f}",
            },
            maxlen=DEAD_MAXLEN,
            approximate=True,
        )
        pipe.execute()
        log.error(
            "delivery dead-lettered (mde-monitor deliveries retry %s)",
            did,
            extra={"delivery": did, "sink": sink, "attempts": attempt, "error": reason},
        )
        return DeliveryOutcome(did, sink, "dead", attempt, latency_ms, reason, http_status)

    def _hold(
        self,
        did: str,
        sink: str,
        rec: dict[str, str],
        attempt: int,
        why: dict[str, Any],
        latency_ms: float | None = None,
    ) -> DeliveryOutcome:
        reason = f"sink {sink} is disabled: {why.get('reason', '')}".strip()
        pipe = self._settle(
            did, rec, sink, "held", attempt, latency_ms, {"last_error": reason}, error=reason
        )
        pipe.sadd(self.held_key(sink), did)
        pipe.execute()
        return DeliveryOutcome(did, sink, "held", attempt, latency_ms, reason)

    # sinks disabled by their receiver ----------------------------------------------------------

    def _disable(self, sink: str, reason: str, now: float) -> None:
        self.client.hset(
            self.disabled_key, sink, orjson.dumps({"reason": reason, "since": now}).decode()
        )
        log.error(
            "SINK DISABLED: %s said it is gone; its deliveries are held until"
            " `mde-monitor sinks enable %s`",
            sink,
            sink,
            extra={"sink": sink, "error": reason},
        )

    def disable_sink(self, sink: str, reason: str) -> None:
        self._disable(sink, scrub(reason), self.clock())

    def enable_sink(self, sink: str) -> int:
        """Re-enable a sink; its held deliveries are queued again. Returns how many."""
        held: Any = self.client.smembers(self.held_key(sink))
        now = self.clock()
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.disabled_key, sink)
        for did in held:
            self._queue_now(pipe, _s(did), now)
        pipe.delete(self.held_key(sink))
        self.log_entry(pipe, "sink_enabled", sink=sink, requeued=len(held))
        pipe.execute()
        return len(held)

    # manual retry -----------------------------------------------------------------------------

    def _queue_now(self, pipe: Any, did: str, now: float) -> None:
        """Queue a delivery again at `now` with a fresh retry budget (on the caller's `pipe`)."""
        pipe.hset(self.record_key(did), mapping={"status": "queued", "attempts": 0, "next_at": now})
        pipe.zadd(self.queue_key, {did: now})

    def _dead_entries(self, dids: set[str]) -> list[str]:
        """Ids of the dead-letter stream entries of these deliveries."""
        found: list[str] = []
        start = "-"
        while dids:
            batch: Any = self.client.xrange(self.dead_key, min=start, max="+", count=1000)
            for eid, fields in batch:
                if _s(fields.get(b"delivery", fields.get("delivery", b""))) in dids:
                    found.append(_s(eid))
            if len(batch) < 1000:
                break
            start = "(" + _s(batch[-1][0])
        return found

    def _requeue(self, pipe: Any, rec: dict[str, Any], now: float) -> None:
        did = rec["id"]
        self._queue_now(pipe, did, now)
        pipe.srem(self.held_key(rec.get("sink", "")), did)
        self.log_entry(pipe, "requeued", delivery=did, sink=rec.get("sink"), rule=rec.get("rule"))

    def requeue(self, did: str) -> bool:
        """Queue a failed (dead/held/retrying) delivery again now, with a fresh retry budget."""
        rec = self.get(did)
        if rec is None or rec.get("status") == "sent":
            return False
        dead = self._dead_entries({did})
        pipe = self.client.pipeline(transaction=True)
        self._requeue(pipe, {**rec, "id": did}, self.clock())
        if dead:  # no longer a dead letter; if it fails for good again it is re-added
            pipe.xdel(self.dead_key, *dead)
        pipe.execute()
        return True

    def requeue_failed(self) -> list[str]:
        """Queue every dead or held delivery again (of sinks that are not disabled)."""
        disabled = self.disabled_sinks()
        recs = [
            rec
            for rec in self.records(failed_only=True, limit=100_000)
            if rec.get("status") in ("dead", "held") and rec.get("sink") not in disabled
        ]
        now = self.clock()
        dead = self._dead_entries({rec["id"] for rec in recs})
        for start in range(0, len(recs), 500):  # one transaction per 500, not per delivery
            pipe = self.client.pipeline(transaction=True)
            for rec in recs[start : start + 500]:
                self._requeue(pipe, rec, now)
            if start == 0 and dead:
                pipe.xdel(self.dead_key, *dead)
            pipe.execute()
        return [rec["id"] for rec in recs]
