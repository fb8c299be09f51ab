"""The alert pipeline: stream -> match -> silence -> throttle -> group -> render -> deliver.

`Dispatcher.run_once` reads the all-tenants event stream through the consumer group `alerts`
(own pending entries first: a crashed run's unacknowledged events), evaluates every event,
and commits the group/firing/throttle writes and the XACK of the batch in one MULTI/EXEC: an
event is either fully accounted for or re-read. Due groups are then flushed: each flush renders
one notification and queues one delivery per sink in the same transaction that resets the group
(optimistic WATCH on the group). `deliver` makes one attempt; `drain` does everything now.

While the rule set cannot be loaded (no alerts directory, no rule file, or no rule compiled because
every rule file is broken) dispatch is *blocked*: it neither reads nor acknowledges the stream nor
flushes groups, so events wait in the stream until the rules load again; the reason is logged every
run and kept in Redis (`dispatch_blocked_key`) for `status` and the metrics. A broken file among
good ones does not block: the good rules keep alerting and the errors are reported (blocking all
alerting for one bad file would be the larger outage).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from monitor.alerts import group as groups
from monitor.alerts import quarantine, throttle
from monitor.alerts.deliver import CRASH_ENV, DeliveryOutcome, DeliveryQueue, crash_point
from monitor.alerts.links import notification_links, summary_lines
from monitor.alerts.match import parse_datetime
from monitor.alerts.render import headline, render_notification
from monitor.alerts.rules import (
    SINKS_FILE_NAMES,
    LoadError,
    Rule,
    RuleSet,
    build_sinks,
    load_rules,
)
from monitor.alerts.silences import Silence, SilenceStore, silenced_by
from monitor.alerts.sinks.base import Notification, Sink
from monitor.config import Settings
from monitor.events import stream
from monitor.events.envelope import Event
from monitor.metrics import record_delivery
from monitor.redact import scrub
from monitor.status import DISPATCH_BLOCKED

log = logging.getLogger(__name__)

GROUP = "alerts"


def firing_key(prefix: str, rule: str) -> str:
    """Hash of the rule's firing alerts: `<tenant>\\x1f<subject>` -> {group key, labels}."""
    return f"{prefix}:alerts:firing:{rule}"


def firing_count_key(prefix: str) -> str:
    """Hash: group key -> how many subjects of the group are firing."""
    return f"{prefix}:alerts:firing_count"


def dispatch_blocked_key(prefix: str) -> str:
    """JSON {reason, since, errors} while dispatch is blocked because no rule loads."""
    return f"{prefix}:alerts:dispatch:blocked"


BLOCKED_MESSAGE = DISPATCH_BLOCKED  # the words `status` and the CLI show too


def blocked_reason(ruleset: RuleSet) -> str | None:
    """Why no event may be read with this rule set (None: dispatch can run).

    Blocked when no rule compiled and either something failed to load or there is no rule file.
    A directory whose rule files load but declare no rule is a deliberate choice, not blocked.
    """
    if ruleset.rules:
        return None
    root = ruleset.directory
    if root is None:
        return None  # a rule set built in code (tests, replays)
    if not Path(root).is_dir():
        return f"alerts directory not found: {root}"
    problems = ruleset.problems
    files = [
        p
        for p in Path(root).iterdir()
        if p.suffix in (".yaml", ".yml") and p.is_file() and p.name not in SINKS_FILE_NAMES
    ]
    if not files:
        return f"no rule file (*.yaml) in {root}"
    if problems:
        first = problems[0]
        return f"no rule loaded from {root}: {len(problems)} error(s), first: {first}"
    return None


def _sid(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def subject_of(event: Event) -> str:
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    assert isinstance(data, dict)
    return f"{data.get('tenant', '')}\x1f{event.get('subject', '')}"


@dataclass
class DispatchStats:
    """Counts of one run (or of a drain)."""

    read: int = 0
    stale: int = 0
    matched: int = 0
    resolving: int = 0
    silenced: int = 0
    throttled: int = 0
    eval_errors: int = 0
    quarantined: int = 0
    groups_flushed: int = 0
    notifications: int = 0
    queued: int = 0
    sent: int = 0
    retrying: int = 0
    dead: int = 0
    held: int = 0
    skipped: int = 0
    waiting: int = 0  # deliveries still queued (retries scheduled beyond the drain)
    load_errors: int = 0
    blocked: int = 0  # 1: no rule loaded, the stream was left untouched

    def add_outcome(self, outcome: DeliveryOutcome) -> None:
        if outcome.status in ("sent", "retrying", "dead", "held", "skipped"):
            setattr(self, outcome.status, getattr(self, outcome.status) + 1)

    def merge(self, other: DispatchStats) -> None:
        for k, v in asdict(other).items():
            if k not in ("waiting", "load_errors", "blocked"):
                setattr(self, k, getattr(self, k) + v)
        self.waiting = other.waiting
        self.load_errors = other.load_errors
        self.blocked = other.blocked

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Admission:
    rule: Rule
    status: str
    event: Event
    sid: str
    subject: str
    token: str | None = None  # throttle token
    ttl_s: float = 0.0
    key: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    silence: Silence | None = None


@dataclass
class _BatchGroup:
    """What one batch adds to one group."""

    rule: Rule
    labels: dict[str, str]
    count: int = 0
    bodies: list[bytes] = field(default_factory=list)
    headlines: dict[str, int] = field(default_factory=dict)


class Dispatcher:
    """Alert dispatch for one Redis prefix: rules and sinks from `settings.alerts_dir`."""

    def __init__(
        self,
        settings: Settings,
        redis_client: redis.Redis,
        consumer: str = "dispatch",
        *,
        ruleset: RuleSet | None = None,
        sinks: Mapping[str, Sink] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        group: str = GROUP,
        batch_size: int = 2000,
        claim_idle_s: float = 600.0,
    ) -> None:
        self.settings = settings
        self.client = redis_client
        self.prefix = settings.redis_prefix
        self.consumer = consumer
        self.group = group
        self.batch_size = batch_size
        self.claim_idle_s = claim_idle_s
        self._reported_at: float | None = None
        self._deployment_id: str | None = None
        self.clock = clock
        self.sleep = sleep
        injected = dict(sinks or {})
        self.ruleset = ruleset or load_rules(settings.alerts_dir, extra_sinks=injected)
        to_build = RuleSet(
            sinks={n: c for n, c in self.ruleset.sinks.items() if n not in injected},
        )
        built, sink_errors = build_sinks(
            to_build,
            redis_client=redis_client,
            redis_prefix=self.prefix,
            ca_bundle=settings.ca_bundle,
        )
        self.sinks: dict[str, Sink] = {**built, **injected}
        self.errors: list[LoadError] = [*self.ruleset.errors, *sink_errors]
        self.blocked: str | None = blocked_reason(self.ruleset)
        self.queue = DeliveryQueue(
            redis_client, self.prefix, self.ruleset.delivery, consumer=consumer, clock=clock
        )
        self.silences = SilenceStore(redis_client, self.prefix)
        stream.ensure_group(redis_client, self.prefix, group, start="0")

    # reporting ---------------------------------------------------------------------------------

    def report_errors(self, every_s: float = 600.0) -> None:
        """Log every rule/sink load problem (each run; at most every `every_s` in a loop)."""
        now = self.clock()
        if self._reported_at is not None and now - self._reported_at < every_s:
            return
        self._reported_at = now
        for e in self.errors:
            (log.error if e.level == "error" else log.warning)(
                "alert config: %s", e, extra={"file": e.file, "line": e.line, "rule": e.rule}
            )

    # ingestion ---------------------------------------------------------------------------------

    def run_once(self, flush_all: bool = False, block_ms: int | None = None) -> DispatchStats:
        """Read own pending then new events, match, group, and queue due deliveries."""
        stats = DispatchStats(load_errors=len([e for e in self.errors if e.level == "error"]))
        self.report_errors(every_s=0 if block_ms is None else 600.0)
        if self._check_blocked():
            stats.blocked = 1
            if block_ms:  # a loop: do not spin while blocked
                self.sleep(min(block_ms / 1000, 5.0))
            stats.waiting = self.queue.queued_count()
            return stats
        silences = self.silences.active(self.clock())
        self._claim_abandoned()
        self._recover(silences, stats)
        block = block_ms
        while True:
            batch = stream.read_group(
                self.client, self.prefix, self.group, self.consumer, self.batch_size, block
            )
            block = None
            if not batch:
                break
            self._ingest(batch, silences, stats)
        self._flush(flush_all, stats)
        stats.waiting = self.queue.queued_count()
        return stats

    def _check_blocked(self) -> bool:
        """Record (or clear) the blocked state in Redis; log it on every blocked run."""
        key = dispatch_blocked_key(self.prefix)
        if self.blocked is None:
            self.client.delete(key)
            return False
        log.error(
            "%s: events stay in the stream until the rules load (%s)",
            BLOCKED_MESSAGE,
            self.blocked,
            extra={"alerts_dir": str(self.ruleset.directory)},
        )
        previous: Any = self.client.get(key)
        since = self.clock()
        if previous:
            with contextlib.suppress(ValueError, AttributeError):
                since = float(orjson.loads(previous).get("since", since))
        doc = {
            "reason": self.blocked,
            "since": since,
            "checked": self.clock(),
            "errors": [str(e) for e in self.ruleset.problems[:20]],
        }
        self.client.set(key, orjson.dumps(doc))
        return True

    def _recover(self, silences: list[Silence], stats: DispatchStats) -> None:
        """Entries this consumer read but did not acknowledge (its previous run died mid-batch).

        Delivered once before: re-read as a batch. Delivered twice or more: one at a time, so a
        poison event is isolated and the others commit. Delivered `MAX_EVAL_TRIES` times:
        quarantined with the reason (see monitor.alerts.quarantine) and acknowledged.
        """
        key = stream.stream_key(self.prefix)
        last: list[str] | None = None
        for _ in range(10_000):
            pend: Any = self.client.xpending_range(
                key, self.group, "-", "+", self.batch_size, consumername=self.consumer
            )
            ids = [_sid(p["message_id"]) for p in pend]
            if not ids or ids == last:
                return
            last = ids
            fresh: list[str] = []
            for p in pend:
                sid, tries = _sid(p["message_id"]), int(p["times_delivered"])
                if tries >= quarantine.MAX_EVAL_TRIES:
                    self._quarantine_pending(sid, tries, stats)
                elif tries >= 2:
                    self._ingest_claimed([sid], silences, stats)
                else:
                    fresh.append(sid)
            if fresh:
                self._ingest_claimed(fresh, silences, stats)

    def _ingest_claimed(
        self, ids: list[str], silences: list[Silence], stats: DispatchStats
    ) -> None:
        """Claim own pending `ids` again (counts a delivery) and ingest them as one batch."""
        key = stream.stream_key(self.prefix)
        claimed: Any = self.client.xclaim(key, self.group, self.consumer, 0, list[Any](ids))
        batch = list(stream.entries(claimed))
        present = {sid for sid, _ in batch}
        gone = [sid for sid in ids if sid not in present]  # trimmed, or no event in the entry
        if gone:
            stream.ack(self.client, self.prefix, self.group, gone)
        if batch:
            self._ingest(batch, silences, stats)

    def _quarantine_pending(self, sid: str, tries: int, stats: DispatchStats) -> None:
        rows: Any = self.client.xrange(stream.stream_key(self.prefix), min=sid, max=sid)
        event = stream.entry_event(rows[0][1]) if rows else None
        pipe = self.client.pipeline(transaction=True)
        if event is not None:
            quarantine.record(
                pipe,
                self.prefix,
                sid,
                event,
                f"evaluation did not complete after {tries} deliveries (the dispatcher crashed"
                " or was stopped while handling this event)",
                tries,
            )
            stats.quarantined += 1
        stream.ack(pipe, self.prefix, self.group, [sid])
        pipe.execute()

    def _claim_abandoned(self) -> None:
        """Take over events another consumer read but never acknowledged (it died)."""
        if self.claim_idle_s <= 0:
            return
        start = "0-0"
        key = stream.stream_key(self.prefix)
        for _ in range(1000):
            resp: Any = self.client.xautoclaim(
                key,
                self.group,
                self.consumer,
                int(self.claim_idle_s * 1000),
                start_id=start,
                count=self.batch_size,
            )
            nxt = resp[0].decode() if isinstance(resp[0], bytes) else str(resp[0])
            if resp[1]:
                log.warning("claimed %d abandoned events", len(resp[1]))
            if nxt in ("0-0", "0"):
                return
            start = nxt

    def _is_stale(self, event: Event, now: float) -> bool:
        age = self.ruleset.delivery.max_event_age
        if not age:
            return False
        when = parse_datetime(event.get("time"))
        return when is not None and when.timestamp() < now - age

    def _admissions(
        self,
        batch: list[tuple[str, Event]],
        silences: list[Silence],
        stats: DispatchStats,
        quarantined: list[tuple[str, Event, str]],
    ) -> list[_Admission]:
        """The rule hits of `batch`; events whose evaluation raised go to `quarantined`."""
        now = self.clock()
        out: list[_Admission] = []
        keys: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        crash_each = bool(os.environ.get(CRASH_ENV, "").startswith("evaluate_"))
        for sid, event in batch:
            if crash_each:  # test hook: a poison event that kills the dispatcher
                crash_point(f"evaluate_{event.get('id')}")
            if self._is_stale(event, now):
                stats.stale += 1
                continue
            try:
                hits = self.ruleset.evaluate(event)
            except Exception as exc:  # deterministic: quarantined now, acked with the batch
                stats.eval_errors += 1
                stats.quarantined += 1
                reason = f"evaluation failed: {type(exc).__name__}: {scrub(str(exc))}"
                quarantined.append((sid, event, reason))
                continue
            for rule, status in hits:
                adm = _Admission(rule, status, event, sid, subject_of(event))
                if status == "firing":
                    stats.matched += 1
                    adm.labels = groups.group_labels(rule, event)
                    ck = (rule.name, tuple(adm.labels.items()))
                    key = keys.get(ck)
                    if key is None:
                        key = keys[ck] = groups.group_key(rule.name, adm.labels)
                    adm.key = key
                else:
                    stats.resolving += 1
                adm.silence = silenced_by(event, silences, rule.name) if silences else None
                out.append(adm)
        return out

    def _tracks_firing(self, rule: Rule) -> bool:
        return rule.send_resolved and bool(rule.resolve_types)

    def _ingest(
        self, batch: list[tuple[str, Event]], silences: list[Silence], stats: DispatchStats
    ) -> None:
        stats.read += len(batch)
        quarantined: list[tuple[str, Event, str]] = []
        adms = self._admissions(batch, silences, stats, quarantined)
        now = self.clock()
        # read 1: firing state of the subjects involved, one HMGET per rule
        subjects: dict[str, list[str]] = {}
        for a in adms:
            if self._tracks_firing(a.rule):
                subjects.setdefault(a.rule.name, []).append(a.subject)
        subjects = {r: list(dict.fromkeys(subs)) for r, subs in subjects.items()}
        firing_now: dict[tuple[str, str], Any] = {}
        if subjects:
            reads = self.client.pipeline(transaction=False)
            for rule_name, subs in subjects.items():
                reads.hmget(firing_key(self.prefix, rule_name), subs)
            for (rule_name, subs), values in zip(subjects.items(), reads.execute(), strict=True):
                for subject, raw in zip(subs, values, strict=True):
                    firing_now[(rule_name, subject)] = orjson.loads(raw) if raw else None
        # read 2: throttle windows of what may notify (a resolve only matters if something fires)
        fired_here = {(a.rule.name, a.subject) for a in adms if a.status == "firing"}
        by_rule: dict[str, tuple[Rule, list[str]]] = {}
        for a in adms:
            if a.silence is not None:
                continue
            fkey = (a.rule.name, a.subject)
            if a.status == "resolved" and firing_now.get(fkey) is None and fkey not in fired_here:
                continue
            a.token, a.ttl_s = throttle.window(
                a.rule.repeat_interval, a.status, a.event, a.rule.name
            )
            by_rule.setdefault(a.rule.name, (a.rule, []))[1].append(a.token)
        windows: dict[tuple[str, str], float] = {}
        if by_rule:
            reads = self.client.pipeline(transaction=False)
            for rule_name, (rule, toks) in by_rule.items():
                cur, prev, _ttl = throttle.bucket_keys(
                    self.prefix, rule_name, rule.repeat_interval, now
                )
                reads.hmget(cur, toks)
                reads.hmget(prev, toks)
            results = reads.execute()
            for i, (rule_name, (_rule, toks)) in enumerate(by_rule.items()):
                for tok, a_end, b_end in zip(toks, results[2 * i], results[2 * i + 1], strict=True):
                    end = max(float(a_end or 0), float(b_end or 0))
                    if end:
                        windows[(rule_name, tok)] = end

        opened: dict[str, tuple[Rule, dict[str, float]]] = {}  # windows this batch opens
        pending: dict[tuple[str, str], _BatchGroup] = {}
        firing_changed: set[tuple[str, str]] = set()
        firing_delta: dict[str, int] = {}
        silenced: list[_Admission] = []
        for a in adms:
            fkey = (a.rule.name, a.subject)
            firing = firing_now.get(fkey)
            if a.status == "resolved":
                if firing is None:
                    continue  # nothing of ours is firing for this subject: nothing to resolve
                a.key, a.labels = firing["g"], firing["l"]
                firing_delta[a.key] = firing_delta.get(a.key, 0) - 1
                firing_now[fkey] = None
                firing_changed.add(fkey)
            elif (
                self._tracks_firing(a.rule)
                and a.silence is None
                and (firing is None or firing.get("g") != a.key)
            ):
                firing_delta[a.key] = firing_delta.get(a.key, 0) + 1
                if firing is not None:
                    firing_delta[firing["g"]] = firing_delta.get(firing["g"], 0) - 1
                firing_now[fkey] = {"g": a.key, "l": a.labels}
                firing_changed.add(fkey)
            if a.silence is not None:
                stats.silenced += 1
                silenced.append(a)
                continue
            token = a.token or ""
            if (
                windows.get((a.rule.name, token), 0.0) > now
                or token in opened.get(a.rule.name, (a.rule, {}))[1]
            ):
                stats.throttled += 1
                continue
            opened.setdefault(a.rule.name, (a.rule, {}))[1][token] = now + a.ttl_s
            g = pending.get((a.key, a.status))
            if g is None:
                g = pending[(a.key, a.status)] = _BatchGroup(a.rule, a.labels)
            g.count += 1
            if len(g.bodies) < a.rule.max_events:
                g.bodies.append(orjson.dumps(a.event))
            hl = headline(a.event)
            if hl is not None:
                g.headlines[hl] = g.headlines.get(hl, 0) + 1

        pipe = self.client.pipeline(transaction=True)
        for rule_name, (rule, ends) in opened.items():
            cur, _prev, ttl = throttle.bucket_keys(
                self.prefix, rule_name, rule.repeat_interval, now
            )
            pipe.hset(cur, mapping={t: f"{end:.3f}" for t, end in ends.items()})
            pipe.expire(cur, ttl)
        by_rule_set: dict[str, dict[str, bytes]] = {}
        by_rule_del: dict[str, list[str]] = {}
        for rule_name, subject in firing_changed:
            value = firing_now[(rule_name, subject)]
            if value is None:
                by_rule_del.setdefault(rule_name, []).append(subject)
            else:
                by_rule_set.setdefault(rule_name, {})[subject] = orjson.dumps(value)
        for rule_name, mapping in by_rule_set.items():
            pipe.hset(firing_key(self.prefix, rule_name), mapping=mapping)
        for rule_name, subs in by_rule_del.items():
            pipe.hdel(firing_key(self.prefix, rule_name), *subs)
        for key, delta in firing_delta.items():
            if delta:
                pipe.hincrby(firing_count_key(self.prefix), key, delta)
        for a in silenced:
            assert a.silence is not None
            self.queue.record_silenced(
                pipe, str(a.event.get("id")), a.rule.name, a.silence.id, a.status
            )
        for (key, status), g in pending.items():
            groups.add_events(
                pipe,
                self.prefix,
                g.rule,
                key,
                status,
                g.labels,
                g.count,
                g.bodies,
                g.headlines,
                now,
            )
        for sid, event, reason in quarantined:
            quarantine.record(pipe, self.prefix, sid, event, reason, 1)
        stream.ack(pipe, self.prefix, self.group, [sid for sid, _ in batch])
        crash_point("before_ingest_commit")
        pipe.execute()
        crash_point("after_ingest_commit")

    # flushing ----------------------------------------------------------------------------------

    def _flush(self, flush_all: bool, stats: DispatchStats) -> None:
        now = self.clock()
        top = "+inf" if flush_all else now
        members: Any = self.client.zrangebyscore(groups.due_key(self.prefix), "-inf", top)
        for m in members:
            key, status = groups.parse_due_member(m.decode() if isinstance(m, bytes) else m)
            self._flush_group(key, status, now, flush_all, stats)

    def _flush_group(
        self, key: str, status: str, now: float, flush_all: bool, stats: DispatchStats
    ) -> None:
        skey = groups.state_key(self.prefix, key, status)
        ekey = groups.events_key(self.prefix, key, status)
        member = groups.due_member(key, status)
        due = groups.due_key(self.prefix)
        with self.client.pipeline(transaction=True) as pipe:
            for _ in range(20):
                try:
                    pipe.watch(skey)
                    raw: Any = pipe.hgetall(skey)
                    evs: Any = pipe.lrange(ekey, 0, -1)
                    state = groups.GroupState.from_redis(key, status, raw, evs)
                    rule = self.ruleset.rule(state.rule) if state.rule else None
                    pipe.multi()
                    if state.pending <= 0 or rule is None:
                        if rule is None and state.pending > 0:
                            log.warning(
                                "dropping a group of a rule that no longer exists",
                                extra={"rule": state.rule, "events": state.pending},
                            )
                            pipe.delete(skey, ekey)
                        pipe.zrem(due, member)
                        pipe.execute()
                        return
                    if not flush_all and state.due_at(rule, now) > now:
                        pipe.zadd(due, {member: state.due_at(rule, now)}, xx=True)
                        pipe.execute()
                        return
                    notification = self._notification(rule, state)
                    groups.mark_flushed(pipe, self.prefix, state, rule, now)
                    for sink in rule.sinks:
                        self.queue.enqueue(pipe, notification, sink, now)
                    crash_point("before_flush_commit")
                    pipe.execute()
                    crash_point("after_flush_commit")
                    stats.groups_flushed += 1
                    stats.notifications += 1
                    stats.queued += len(rule.sinks)
                    return
                except redis.WatchError:
                    continue
        log.warning("group %s:%s kept changing; will flush on the next run", key, status)

    def _deployment(self) -> str:
        if self._deployment_id is None:
            self._deployment_id = groups.deployment_id(self.client, self.prefix)
        return self._deployment_id

    def _next_counter(self) -> int:
        return int(self.client.incr(groups.notification_counter_key(self.prefix)))  # type: ignore[arg-type]

    def _notification(self, rule: Rule, state: groups.GroupState) -> Notification:
        seq = state.seq + 1
        title, summary = render_notification(
            rule, state.status, state.labels, state.events, state.pending, state.headlines
        )
        tenants = {str(e.get("data", {}).get("tenant", "")) for e in state.events}
        tenant = state.labels.get("tenant") or (next(iter(tenants)) if len(tenants) == 1 else None)
        extra: dict[str, Any] = {"seq": seq}
        if self._tracks_firing(rule):
            count: Any = self.client.hget(firing_count_key(self.prefix), state.key)
            extra["still_firing"] = max(0, int(count or 0))
        if state.headlines:
            extra["headlines"] = state.headlines
        links = notification_links(self.settings, rule.name, state.events)  # web.public_url
        if links:
            extra["links"] = links
            summary = f"{summary}\n{summary_lines(links)}".strip()
        return Notification(
            id=groups.notification_id(self._deployment(), self._next_counter()),
            rule=rule.name,
            description=rule.description,
            severity=rule.severity,
            status="resolved" if state.status == "resolved" else "firing",
            group_key=state.key,
            group_labels=state.labels,
            title=title,
            summary=summary,
            events=state.events,
            total=state.pending,
            tenant=tenant or None,
            extra=extra,
        )

    # delivering --------------------------------------------------------------------------------

    def due_deliveries(self) -> list[str]:
        """Ids of queued deliveries whose time has come."""
        return self.queue.due(self.clock())

    def deliver(self, delivery_id: str) -> DeliveryOutcome:
        """One attempt; schedules the retry or dead-letters (see DeliveryQueue.attempt).

        Every attempt is counted in `mde_deliveries_total`, whoever makes it (task or CLI).
        """
        outcome = self.queue.attempt(delivery_id, self.sinks)
        if outcome.status != "busy":
            try:
                record_delivery(self.client, self.prefix, outcome.sink or "unknown", outcome.status)
            except redis.RedisError as exc:
                log.warning("could not count the delivery", extra={"error": str(exc)})
        return outcome

    def deliver_due(self, stats: DispatchStats | None = None) -> DispatchStats:
        """One attempt for every due delivery."""
        stats = stats or DispatchStats()
        for did in self.due_deliveries():
            stats.add_outcome(self.deliver(did))
        return stats

    def drain(self, timeout_s: float) -> DispatchStats:
        """Evaluate everything now, flush every open group, deliver with retries until done.

        Retries scheduled later than `timeout_s` from now stay queued (`waiting`).
        """
        deadline = self.clock() + timeout_s
        stats = self.run_once(flush_all=True)
        while True:
            ids = self.due_deliveries()
            for did in ids:
                stats.add_outcome(self.deliver(did))
            if ids:
                continue
            nxt = self.queue.next_due_at()
            now = self.clock()
            if nxt is None or nxt > deadline or now >= deadline:
                break
            self.sleep(max(0.0, min(nxt, deadline) - now))
        stats.waiting = self.queue.queued_count()
        return stats

    def close(self) -> None:
        """Close the sinks' connections (HTTP clients)."""
        for sink in self.sinks.values():
            close = getattr(sink, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # closing must not fail the caller
                    log.warning("could not close sink %s", getattr(sink, "name", "?"))

    def run_forever(self, stop: threading.Event | None = None, idle_s: float = 5.0) -> None:
        """Loop: block on the stream (at most until something is due), flush, deliver."""
        stop = stop or threading.Event()
        while not stop.is_set():
            now = self.clock()
            nexts = [idle_s]
            nd = self.queue.next_due_at()
            if nd is not None:
                nexts.append(nd - now)
            first: Any = self.client.zrange(groups.due_key(self.prefix), 0, 0, withscores=True)
            if first:
                nexts.append(float(first[0][1]) - now)
            block_ms = max(1, int(min(nexts) * 1000))
            stats = self.run_once(block_ms=block_ms)
            self.deliver_due(stats)
            if stats.read or stats.notifications:
                log.info("dispatch", extra=stats.to_dict())
