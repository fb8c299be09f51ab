"""Silences: time-boxed mutes by matcher, stored in Redis, applied before grouping and delivery.

A matcher is `field=glob`, `field!=glob`, `field=~regex` or `field!~regex`; `field` is a dotted
path into the event (as in rules) or `rule` (the rule's name). A list field matches when any
member does (`entity.machineTags=lab`). Every matcher of a silence must match.
"""

from __future__ import annotations

import fnmatch
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis

from monitor.alerts.match import MAX_REGEX_INPUT, MISSING, ConditionError, FieldPath, compile_regex
from monitor.events.envelope import Event

KEEP_EXPIRED_SECONDS = 7 * 86400
_MATCHER = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(!=|=~|!~|=)(.*)$")


def silences_key(prefix: str) -> str:
    return f"{prefix}:alerts:silences"


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


@dataclass(frozen=True)
class Matcher:
    """One `field op value` test."""

    raw: str
    name: str
    op: str
    value: str
    _path: FieldPath | None = field(default=None, repr=False, compare=False)
    _rx: Any = field(default=None, repr=False, compare=False)  # RE2 (linear time)

    @classmethod
    def parse(cls, raw: str) -> Matcher:
        m = _MATCHER.match(raw)
        if not m:
            raise ValueError(
                f"bad matcher {raw!r}: use field=glob, field!=glob, field=~regex or field!~regex"
            )
        name, op, value = m.group(1), m.group(2), m.group(3).strip()
        rx = None
        if op in ("=~", "!~"):
            try:
                rx = compile_regex(value)
            except ConditionError as exc:
                raise ValueError(f"bad matcher {raw!r}: {exc}") from None
        path = None if name == "rule" else FieldPath.parse(name)
        return cls(raw.strip(), name, op, value, path, rx)

    def matches(self, event: Event, rule: str | None = None) -> bool:
        if self._path is None:
            found: Any = rule if rule is not None else MISSING
        else:
            found = self._path.get(event)
        values = found if isinstance(found, list) else [found]
        if self.op in ("=", "!="):
            hit = any(
                v is not MISSING and fnmatch.fnmatchcase(_text(v), self.value) for v in values
            )
        else:
            assert self._rx is not None
            hit = any(
                v is not MISSING and self._rx.search(_text(v)[:MAX_REGEX_INPUT]) for v in values
            )
        return hit if self.op in ("=", "=~") else not hit


@dataclass
class Silence:
    """A mute: while active, events matching every matcher are not notified."""

    id: str
    matchers: list[str]
    starts_at: float
    ends_at: float
    comment: str = ""
    created_by: str = ""
    created_at: float = 0.0
    _compiled: list[Matcher] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self._compiled:
            self._compiled = [Matcher.parse(m) for m in self.matchers]

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, event: Event, rule: str | None = None) -> bool:
        return all(m.matches(event, rule) for m in self._compiled)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_compiled", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Silence:
        return cls(
            id=str(d["id"]),
            matchers=list(d["matchers"]),
            starts_at=float(d["starts_at"]),
            ends_at=float(d["ends_at"]),
            comment=str(d.get("comment", "")),
            created_by=str(d.get("created_by", "")),
            created_at=float(d.get("created_at", 0.0)),
        )


def silenced_by(
    event: Event, silences: Sequence[Silence], rule: str | None = None
) -> Silence | None:
    """The first of `silences` (assumed active) that mutes this event for this rule."""
    for s in silences:
        if s.matches(event, rule):
            return s
    return None


class SilenceStore:
    """Silences in one Redis hash: id -> JSON."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.key = silences_key(prefix)

    def add(
        self,
        matchers: Sequence[str],
        duration_s: float,
        comment: str = "",
        created_by: str = "",
        now: float | None = None,
    ) -> Silence:
        """Create a silence active from now for `duration_s` seconds."""
        if not matchers:
            raise ValueError("a silence needs at least one --match")
        if duration_s <= 0:
            raise ValueError("a silence needs a positive duration (--for)")
        now = time.time() if now is None else now
        silence = Silence(
            id=secrets.token_hex(4),
            matchers=[m.strip() for m in matchers],
            starts_at=now,
            ends_at=now + duration_s,
            comment=comment,
            created_by=created_by,
            created_at=now,
        )
        self.client.hset(self.key, silence.id, orjson.dumps(silence.to_dict()).decode())
        return silence

    def get(self, silence_id: str) -> Silence | None:
        raw: Any = self.client.hget(self.key, silence_id)
        return Silence.from_dict(orjson.loads(raw)) if raw else None

    def all(self, now: float | None = None) -> list[Silence]:
        """Every stored silence, oldest first; long-expired ones are removed on the way."""
        now = time.time() if now is None else now
        raw: Any = self.client.hgetall(self.key)
        out: list[Silence] = []
        stale: list[str] = []
        for body in raw.values():
            try:
                s = Silence.from_dict(orjson.loads(body))
            except (ValueError, KeyError, TypeError):
                continue
            if s.ends_at < now - KEEP_EXPIRED_SECONDS:
                stale.append(s.id)
                continue
            out.append(s)
        if stale:
            self.client.hdel(self.key, *stale)
        return sorted(out, key=lambda s: s.created_at)

    def active(self, now: float | None = None) -> list[Silence]:
        now = time.time() if now is None else now
        return [s for s in self.all(now) if s.active(now)]

    def expire(self, silence_id: str, now: float | None = None) -> Silence | None:
        """End a silence now; None when there is no such silence."""
        now = time.time() if now is None else now
        silence = self.get(silence_id)
        if silence is None:
            return None
        if silence.ends_at > now:
            silence.ends_at = now
            self.client.hset(self.key, silence.id, orjson.dumps(silence.to_dict()).decode())
        return silence
