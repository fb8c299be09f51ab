"""Grouping: many events of one rule group become one digest notification.

A group is (rule, the values of the rule's `group_by` fields). Its state lives in Redis so that
`group_wait` spans dispatch runs:

- `<prefix>:alerts:group:<key>:<status>` hash: rule, status, labels, seq (flushes so far),
  last_flush, pending (events since the last flush), `h:<value>` headline counters;
- `...:ev` list: the first `max_events` pending events (the digest's listed events);
- `<prefix>:alerts:groups:due` sorted set: `<key>:<status>` -> when to flush.

Timing (Alertmanager's): a new group flushes `group_wait` after its first event; after a flush,
new events wait until `group_interval` after that flush. Firing and resolved notifications of a
group are separate digests with the same group key (PagerDuty's dedup_key).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import redis

from monitor.alerts.match import MISSING
from monitor.events.envelope import Event

if TYPE_CHECKING:
    from monitor.alerts.rules import Rule

# a group's state outlives its last flush by this much (so group_interval holds), then expires
STATE_GRACE_SECONDS = 3600
# pending events wait at most this long beyond group_wait + group_interval before expiring
PENDING_TTL_SECONDS = 7 * 86400


def _label(value: Any) -> str:
    if value is MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return str(value)


def group_labels(rule: Rule, event: Event) -> dict[str, str]:
    """The rule's group_by fields of this event, as strings ("" when absent)."""
    return {p.raw: _label(p.get(event)) for p in rule.group_by}


def group_key(rule: str, labels: dict[str, str]) -> str:
    """Stable id of a rule group (same for its firing and resolved digests)."""
    body = orjson.dumps([rule, sorted(labels.items())])
    return hashlib.sha256(body).hexdigest()[:24]


def deployment_key(prefix: str) -> str:
    """String: this deployment's random id (set once, never expires)."""
    return f"{prefix}:deployment_id"


def notification_counter_key(prefix: str) -> str:
    """Counter of every notification this deployment ever flushed (never expires)."""
    return f"{prefix}:alerts:notification_counter"


def deployment_id(client: redis.Redis, prefix: str) -> str:
    """This deployment's id: 12 random hex digits, created on first use and kept forever.

    Two deployments that watch the same tenant (even with the same Redis prefix on different
    Redis servers) get different ids, so their notification ids never collide.
    """
    key = deployment_key(prefix)
    client.set(key, secrets.token_hex(6), nx=True)
    value: Any = client.get(key)
    return _s(value)


def notification_id(deployment: str, counter: int) -> str:
    """Idempotency key of one group flush, unique forever: deployment, counter, random part.

    `<deployment>-<counter, hex>-<8 random hex>`: the counter never expires (unlike a group's
    state), the random part covers a Redis restored from an old backup. The id is stored with
    the queued delivery, so every retry of that delivery carries the same id. Not to be confused
    with the group key (PagerDuty's `dedup_key`), which is *meant* to repeat across flushes.
    """
    return f"{deployment}-{counter:x}-{secrets.token_hex(4)}"


def state_key(prefix: str, key: str, status: str) -> str:
    return f"{prefix}:alerts:group:{key}:{status}"


def events_key(prefix: str, key: str, status: str) -> str:
    return f"{prefix}:alerts:group:{key}:{status}:ev"


def due_key(prefix: str) -> str:
    return f"{prefix}:alerts:groups:due"


def due_member(key: str, status: str) -> str:
    return f"{key}:{status}"


def parse_due_member(member: str) -> tuple[str, str]:
    key, _, status = member.rpartition(":")
    return key, status


def add_events(
    pipe: redis.client.Pipeline,
    prefix: str,
    rule: Rule,
    key: str,
    status: str,
    labels: dict[str, str],
    count: int,
    bodies: list[bytes],
    headlines: dict[str, int],
    now: float,
) -> None:
    """Queue the writes that add `count` events to a group (and schedule its flush) on `pipe`.

    `bodies` are the first of those events (at most `max_events`: the list keeps the first N).
    """
    skey, ekey = state_key(prefix, key, status), events_key(prefix, key, status)
    pipe.hset(
        skey,
        mapping={
            "rule": rule.name,
            "status": status,
            "group_key": key,
            "labels": orjson.dumps(labels),
        },
    )
    pipe.hincrby(skey, "pending", count)
    for value, n in headlines.items():
        pipe.hincrby(skey, f"h:{value}", n)
    if bodies:
        pipe.rpush(ekey, *bodies[: rule.max_events])
        pipe.ltrim(ekey, 0, rule.max_events - 1)
    ttl = int(rule.group_wait + rule.group_interval) + PENDING_TTL_SECONDS
    pipe.expire(skey, ttl)
    pipe.expire(ekey, ttl)
    pipe.zadd(due_key(prefix), {due_member(key, status): now + rule.group_wait}, nx=True)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


@dataclass
class GroupState:
    """A group's state as read at flush time."""

    key: str
    status: str
    rule: str | None
    labels: dict[str, str]
    seq: int
    last_flush: float | None
    pending: int
    events: list[Event] = field(default_factory=list)
    headlines: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_redis(
        cls, key: str, status: str, raw: dict[Any, Any], events: list[Any]
    ) -> GroupState:
        h = {_s(k): _s(v) for k, v in raw.items()}
        return cls(
            key=key,
            status=status,
            rule=h.get("rule"),
            labels=orjson.loads(h["labels"]) if h.get("labels") else {},
            seq=int(h.get("seq") or 0),
            last_flush=float(h["last_flush"]) if h.get("last_flush") else None,
            pending=int(h.get("pending") or 0),
            events=[orjson.loads(e) for e in events],
            headlines={k[2:]: int(v) for k, v in h.items() if k.startswith("h:") and int(v) > 0},
        )

    def due_at(self, rule: Rule, now: float) -> float:
        """When this group may flush: group_interval after the last flush (or now)."""
        if self.last_flush is None:
            return now
        return max(now, self.last_flush + rule.group_interval)


def mark_flushed(
    pipe: redis.client.Pipeline, prefix: str, state: GroupState, rule: Rule, now: float
) -> None:
    """Queue the writes that close a flush: seq+1, counters reset, events cleared, unscheduled."""
    skey = state_key(prefix, state.key, state.status)
    pipe.hset(skey, mapping={"seq": state.seq + 1, "last_flush": now, "pending": 0})
    if state.headlines:
        pipe.hdel(skey, *[f"h:{h}" for h in state.headlines])
    pipe.delete(events_key(prefix, state.key, state.status))
    pipe.zrem(due_key(prefix), due_member(state.key, state.status))
    pipe.expire(skey, int(rule.group_interval) + STATE_GRACE_SECONDS)
