"""The one entry point the sync calls: diff a fetched graph against the stored snapshot, then
replace the snapshot and append its events in ONE Redis transaction.

The transaction WATCHes the generation, the metadata, the snapshot version and the lock key,
re-checks the lock's value and the stored fencing number, then MULTI / (bodies, index, scopes,
guard counts, generation, metadata, history, events) / EXEC. A process that dies before EXEC
leaves the previous snapshot and no new events; after EXEC everything is there. Event ids are
deterministic (tenant, subject, change, new generation), so a re-run of the same diff produces
the same ids.

A big commit (`detect.commit_aside_min_items` bodies written plus deleted, default 100,000)
does not queue its bodies in that transaction: it builds the next snapshot version aside in
batches (`body:<v>`, `idx:<v>`, see store.py) and its transaction only switches `ver` to it,
with the same checks and the same guarantee (`_write_aside`). Redis then never holds a
queued copy of the snapshot, and no EXEC blocks other clients for seconds.

Fault hook for the crash tests: `MDE_MONITOR_CRASH_AT=after_diff|mid_queue|mid_aside|
before_switch|before_exec|after_exec` makes the process SIGKILL itself at that point
(`mid_queue` in place only; `mid_aside` - bodies written aside, index not - and
`before_switch` aside only).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time as time_mod
from collections import Counter
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import redis

from monitor.config import DetectSettings, EventSettings
from monitor.detect import diff
from monitor.detect.changes import bodies_needed, build_events
from monitor.detect.guard import DropDecision
from monitor.detect.plan import LOGON_PREFIX, MergePlan
from monitor.detect.plan import plan as merge_plan
from monitor.events import stream
from monitor.events.envelope import Event, make_event, utc_now_iso
from monitor.memory import gc_paused
from monitor.model.graph import Graph, ScopeState
from monitor.model.schema import LANE_FULL
from monitor.snapshot import aggregates
from monitor.snapshot.lock import LockLost, TenantLock
from monitor.snapshot.store import (
    HISTORY_LENGTH,
    Prints,
    SnapshotStore,
    StoreError,
    StreamingTransaction,
    batched,
    send_batch,
)

log = logging.getLogger(__name__)

CRASH_ENV = "MDE_MONITOR_CRASH_AT"
HSET_BATCH_ITEMS = 1_000
HDEL_BATCH_ITEMS = 5_000
# commits of at least `detect.commit_aside_min_items` bodies (this variable wins) go aside
ASIDE_ENV = "MDE_MONITOR_COMMIT_ASIDE_ITEMS"
ASIDE_BATCH_ITEMS = 5_000  # bodies per HSCAN / HSET while building aside
ASIDE_BATCH_BYTES = 8 << 20  # index parts per write while building aside (a part: ~4 MB)
ASIDE_TTL_SECONDS = 6 * 3600  # an abandoned aside build frees itself after this
RETIRE_SECONDS = 120  # a replaced version stays readable this long (readers mid-read)
# and is UNLINKed (freed by a Redis background thread) after this share of it by the process
# that replaced it, when that process still runs: Redis frees an expired key in its main thread
# (unless `lazyfree-lazy-expire yes`), which for a big version blocks every client for seconds
RETIRE_UNLINK_SHARE = 0.75

# UNLINK the KEYS that still expire (retired ones; never a current version's, which has no TTL)
_UNLINK_RETIRED = """
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('TTL', k) > 0 then n = n + redis.call('UNLINK', k) end
end
return n
"""


class CommitError(Exception):
    """The snapshot could not be committed; nothing was written."""


class ConcurrentCommit(CommitError):
    """Someone else committed this tenant's snapshot meanwhile; nothing was written."""


@dataclass
class CommitResult:
    """What one sync committed."""

    tenant: str
    generation: int
    status: str  # "ok" | "degraded" | "failed"
    events: list[Event]
    counts: dict[str, int] = field(default_factory=dict)  # _type -> items in the new snapshot
    event_counts: dict[str, int] = field(default_factory=dict)  # event type -> n
    carried_over: dict[str, int] = field(default_factory=dict)  # _type -> kept, not fetched
    baseline: bool = False  # first sync of the tenant
    held_drops: list[DropDecision] = field(default_factory=list)
    written: int = 0  # bodies written
    deleted: int = 0  # items removed from the store
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    # the committed index (scope -> _type -> _key -> fingerprint), for post-commit readers
    index: Prints | None = field(default=None, repr=False)
    # the change set against `previous_generation`: keys whose bodies were (re)written or
    # removed; with the previous generation's query graph, post-commit readers update it
    previous_generation: int = 0
    written_keys: list[str] = field(default_factory=list, repr=False)
    deleted_keys: list[str] = field(default_factory=list, repr=False)
    # written keys that changed in their `ignored` fields only (e.g. a machine's lastSeenOn)
    quiet_keys: frozenset[str] = field(default_factory=frozenset, repr=False)
    ignored: Mapping[str, frozenset[str]] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (for the CLI and logs)."""
        return {
            "tenant": self.tenant,
            "generation": self.generation,
            "status": self.status,
            "events": len(self.events),
            "counts": self.counts,
            "eventCounts": self.event_counts,
            "carriedOver": self.carried_over,
            "baseline": self.baseline,
            "heldDrops": [d.to_event_data() for d in self.held_drops],
            "written": self.written,
            "deleted": self.deleted,
            "timings": self.timings,
        }


def _crash_point(name: str) -> None:
    """Test fault hook: SIGKILL this process when MDE_MONITOR_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _event_time(meta: Mapping[str, Any] | None, now: str | datetime | None) -> str:
    if isinstance(now, datetime):
        now = now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if now:
        return now
    finished = (meta or {}).get("finished")
    return str(finished) if finished else utc_now_iso()


def _scope_summary(states: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """(non-logon scopes by name, logon-user scopes counted by state)."""
    scopes: dict[str, Any] = {}
    logon: Counter[str] = Counter()
    for s, st in sorted(states.items()):
        if s.startswith(LOGON_PREFIX):
            logon[st.state.value] += 1
        else:
            scopes[s] = st.to_dict()
    return scopes, dict(sorted(logon.items()))


def detect_and_commit(
    store: SnapshotStore,
    *,
    tenant: str,
    graph: Graph,
    meta: Mapping[str, Any] | None,
    detect: DetectSettings,
    events: EventSettings,
    lock: TenantLock | None,
    accept_drop: bool = False,
    now: str | datetime | None = None,
) -> CommitResult:
    """Diff `graph` against the stored snapshot, then commit snapshot + events atomically.

    `meta` is what the collector measured (started/finished, requests per endpoint, retries,
    throttled, durations); it is stored with the status and per-scope counts. `lock` must be
    held (None only in tools that own the tenant otherwise). Raises LockLost or
    ConcurrentCommit (nothing written) when the lock or the snapshot changed hands.
    """
    meta = dict(meta or {})
    time = _event_time(meta, now)
    statuses = list(graph.scopes.values())
    fetched = bool(graph.entities or graph.relationships)
    if statuses and not fetched and all(s.state is ScopeState.FAILED for s in statuses):
        errors = sorted({s.error or "failed" for s in statuses})
        event = record_failed_sync(
            store,
            tenant=tenant,
            error="every resource failed: " + "; ".join(errors[:5]),
            stage="collect",
            meta=meta,
            lock=lock,
            events=events,
            now=time,
        )
        prev_meta = store.meta(tenant) or {}
        return CommitResult(
            tenant,
            event["data"]["generation"],
            "failed",
            [event],
            counts=dict(prev_meta.get("counts") or {}),
            event_counts={event["type"]: 1},
        )

    timings: dict[str, float] = {}
    clock = time_mod.perf_counter
    t0 = clock()

    def lap(name: str) -> None:
        nonlocal t0
        now_ = clock()
        timings[name] = round(now_ - t0, 4)
        t0 = now_

    with gc_paused():
        if lock is not None:
            lock.extend()
        gen0 = store.generation(tenant)
        # a lost snapshot restarts numbering after its last event, so ids never repeat
        base = gen0 or store.last_event_generation(tenant)
        previous = store.index_parts(tenant)  # read part by part by the comparison
        known = store.known_scopes(tenant)
        guard_counts = store.guard_counts(tenant)
        lap("load_index")
        ignored = diff.ignored_fields(detect)
        cmp = diff.compare(graph, previous, ignored, store.encode_body)
        lap("fingerprint_compare")
        plan = merge_plan(
            graph,
            cmp,
            known_scopes=known,
            guard_counts=guard_counts,
            detect=detect,
            accept_drop=accept_drop,
        )
        lap("merge")
        stored = store.load_bodies(tenant, bodies_needed(plan, graph))
        lap("load_bodies")
        generation = base + 1
        evs = build_events(
            plan, graph, stored, tenant=tenant, generation=generation, time=time, ignored=ignored
        )
        lap("events")
        status = "degraded" if plan.degraded else "ok"
        item_counts = plan.item_counts()
        counts = dict(sorted(Counter(e["type"] for e in evs).items()))
        scopes, logon = _scope_summary(plan.scope_states)
        meta_doc = {
            **meta,
            "tenant": tenant,
            "status": status,
            "generation": generation,
            "finished": meta.get("finished") or time,
            "scopes": scopes,
            "logonUserScopes": logon,
            "counts": item_counts,
            "eventCounts": counts,
            "carriedOver": plan.kept,
            "baseline": plan.baseline,
            "drops": {t: d.to_event_data() for t, d in plan.drops.items()},
            "fence": lock.fence if lock is not None else None,
            "aggregates": aggregates.compute(graph, plan.scope_states),
        }
        unchanged_index = (
            cmp.previous_counts is not None
            and not plan.write
            and not plan.delete
            and set(plan.index) == set(cmp.previous_counts)
        )
        _crash_point("after_diff")
        _write(
            store,
            tenant,
            plan,
            evs,
            meta_doc,
            gen0=gen0,
            generation=generation,
            lock=lock,
            settings=events,
            rewrite_index=not unchanged_index,
            aside_min_items=detect.commit_aside_min_items,
        )
        lap("commit")
        _crash_point("after_exec")
        log.info(
            "snapshot committed",
            extra={
                "tenant": tenant,
                "generation": generation,
                "status": status,
                "events": len(evs),
                "written": len(plan.write),
                "deleted": len(plan.delete),
                "timings": timings,
            },
        )
        return CommitResult(
            tenant=tenant,
            generation=generation,
            status=status,
            events=evs,
            counts=item_counts,
            event_counts=counts,
            carried_over=plan.kept,
            baseline=plan.baseline,
            held_drops=[d for d in plan.drops.values() if d.held],
            written=len(plan.write),
            deleted=len(plan.delete),
            timings=timings,
            index=plan.index,
            previous_generation=gen0 or 0,
            written_keys=list(plan.write),
            deleted_keys=plan.delete,
            quiet_keys=frozenset(
                k for k in plan.write if k not in cmp.changed and k not in cmp.added
            ),
            ignored=ignored,
        )


def _open_checked(
    store: SnapshotStore,
    tenant: str,
    gen0: int | None,
    lock: TenantLock | None,
    *,
    version: int | None = None,
    aside: int = 0,
) -> StreamingTransaction:
    """WATCH generation, metadata and lock; verify they are as we left them (else raise).

    With `version` (a snapshot write) also WATCH the version keys: the current version must
    still be `version`, and the `aside` marker must name `aside` (our build) when given. Without
    `aside`, a dead attempt's aside keys named by the marker are removed in this transaction.
    """
    gen_key, meta_key = store.key(tenant, "gen"), store.key(tenant, "meta")
    ver_key, aside_key = store.key(tenant, "ver"), store.key(tenant, "aside")
    watch = [gen_key, meta_key] + ([lock.key] if lock is not None else [])
    if version is not None:
        watch += [ver_key, aside_key]
    tx = StreamingTransaction(store.client, watch)
    try:
        if gen0 is not None:
            raw = tx.get(gen_key)
            if (int(raw) if raw else 0) != gen0:
                raise ConcurrentCommit(
                    f"tenant {tenant!r}: snapshot generation moved from {gen0} while diffing"
                )
        if lock is not None:
            if tx.get(lock.key) != lock.value:
                lock.lost = True
                raise LockLost(
                    f"tenant {tenant!r}: the sync lock (fence {lock.fence}) expired or was taken"
                    " over; nothing was written"
                )
            raw_meta = tx.get(meta_key)
            stored_fence = orjson.loads(raw_meta).get("fence") if raw_meta else None
            if isinstance(stored_fence, int) and stored_fence > lock.fence:
                raise LockLost(
                    f"tenant {tenant!r}: a newer lock holder (fence {stored_fence}) committed;"
                    f" this one (fence {lock.fence}) must not write"
                )
        marker = 0
        if version is not None:
            raw_ver = tx.get(ver_key)
            if (int(raw_ver) if raw_ver else 0) != version:
                raise ConcurrentCommit(
                    f"tenant {tenant!r}: snapshot version moved from {version} while diffing"
                )
            raw_marker = tx.get(aside_key)
            marker = int(raw_marker) if raw_marker else 0
            if aside and (marker != aside or not tx.exists(store.index_key(tenant, aside))):
                raise ConcurrentCommit(
                    f"tenant {tenant!r}: the snapshot version built aside ({aside}) is gone;"
                    " nothing was written"
                )
        tx.multi()
        if version is not None and not aside and marker and marker != version:
            tx.queue(  # what a dead aside attempt left (it would expire anyway)
                "UNLINK",
                store.body_key(tenant, marker),
                store.index_key(tenant, marker),
                aside_key,
            )
    except BaseException:
        tx.close(broken=True)
        raise
    return tx


def _queue_meta(tx: StreamingTransaction, store: SnapshotStore, tenant: str, meta: Any) -> None:
    """The sync's metadata as the latest; a full sync's also into the history (the console's
    plots: an identity-lane sync every minute would crowd the full ones out)."""
    doc = orjson.dumps(meta, option=orjson.OPT_NON_STR_KEYS)
    tx.queue("SET", store.key(tenant, "meta"), doc)
    if meta.get("lane", LANE_FULL) == LANE_FULL:
        tx.queue("LPUSH", store.key(tenant, "history"), doc)
        tx.queue("LTRIM", store.key(tenant, "history"), 0, HISTORY_LENGTH - 1)


def _queue_events(
    tx: StreamingTransaction,
    store: SnapshotStore,
    tenant: str,
    evs: list[Event],
    settings: EventSettings,
) -> None:
    if not evs:
        return
    pipe = store.client.pipeline(transaction=False)
    stream.append(pipe, store.prefix, tenant, evs, settings.stream_maxlen, settings.retention_days)
    for args, _options in pipe.command_stack:
        tx.queue(*args)


def _aside_min_items(configured: int) -> int:
    """The commit size from which a commit is built aside: $MDE_MONITOR_COMMIT_ASIDE_ITEMS
    (tests, benches) or `detect.commit_aside_min_items`."""
    raw = os.environ.get(ASIDE_ENV, "").strip()
    if not raw:
        return configured
    try:
        value = int(raw)
    except ValueError:
        raise CommitError(f"${ASIDE_ENV} must be a whole number, not {raw!r}") from None
    if value < 1:
        raise CommitError(f"${ASIDE_ENV} must be at least 1, not {value}")
    return value


def _write(
    store: SnapshotStore,
    tenant: str,
    plan: MergePlan,
    evs: list[Event],
    meta_doc: dict[str, Any],
    *,
    gen0: int,
    generation: int,
    lock: TenantLock | None,
    settings: EventSettings,
    rewrite_index: bool,
    aside_min_items: int = 100_000,
) -> None:
    """Commit the plan: in place in one MULTI/EXEC, or - from `aside_min_items` bodies written
    plus deleted - as a new version built aside and switched to in a small MULTI/EXEC."""
    version = store.version(tenant)
    if len(plan.write) + len(plan.delete) >= _aside_min_items(aside_min_items):
        _write_aside(
            store,
            tenant,
            plan,
            evs,
            meta_doc,
            gen0=gen0,
            generation=generation,
            lock=lock,
            settings=settings,
            version=version,
        )
        return
    body_key, idx_key = store.body_key(tenant, version), store.index_key(tenant, version)
    with lock.paused() if lock is not None else nullcontext():
        tx = _open_checked(store, tenant, gen0, lock, version=version)
        with tx:
            args: list[Any] = []
            size = 0
            for k, stored in plan.write.items():  # in stored form already (diff.compare)
                args.append(k)
                args.append(stored)
                size += len(k) + len(stored)
                if len(args) >= 2 * HSET_BATCH_ITEMS:
                    tx.queue("HSET", body_key, *args, size=size)
                    args, size = [], 0
            if args:
                tx.queue("HSET", body_key, *args, size=size)
            for i in range(0, len(plan.delete), HDEL_BATCH_ITEMS):
                tx.queue("HDEL", body_key, *plan.delete[i : i + HDEL_BATCH_ITEMS])
            tx.flush()
            _crash_point("mid_queue")
            if rewrite_index:
                tx.queue("DEL", idx_key)
                for name, blob in store.dump_index_parts(plan.index):
                    tx.queue("HSET", idx_key, name, blob)
            _queue_tail(tx, store, tenant, plan, evs, meta_doc, generation, settings)
            _execute(tx, tenant)


def _queue_tail(
    tx: StreamingTransaction,
    store: SnapshotStore,
    tenant: str,
    plan: MergePlan,
    evs: list[Event],
    meta_doc: dict[str, Any],
    generation: int,
    settings: EventSettings,
) -> None:
    """What every snapshot commit ends with: scopes, guard counts, generation, meta, events."""
    tx.queue("SET", store.key(tenant, "scopes"), orjson.dumps(sorted(plan.known_scopes)))
    tx.queue("SET", store.key(tenant, "guard"), orjson.dumps(plan.guard_counts))
    tx.queue("SET", store.key(tenant, "gen"), generation)
    _queue_meta(tx, store, tenant, meta_doc)
    _queue_events(tx, store, tenant, evs, settings)


def _execute(tx: StreamingTransaction, tenant: str) -> None:
    """EXEC a snapshot commit; ConcurrentCommit when a WATCHed key moved (nothing applied)."""
    tx.flush()
    _crash_point("before_exec")
    result = tx.execute()
    if result is None:
        raise ConcurrentCommit(
            f"tenant {tenant!r}: the lock or the snapshot changed during the commit;"
            " nothing was written"
        )
    errors = [r for r in result if isinstance(r, Exception)]
    if errors:
        raise StoreError(f"tenant {tenant!r}: commit reported {errors[0]}")


def _write_aside(
    store: SnapshotStore,
    tenant: str,
    plan: MergePlan,
    evs: list[Event],
    meta_doc: dict[str, Any],
    *,
    gen0: int,
    generation: int,
    lock: TenantLock | None,
    settings: EventSettings,
    version: int,
) -> None:
    """Build the next version outside any transaction, then switch to it in a small one.

    1. A lock-checked transaction claims a fresh version number (`verseq`), removes a dead
       attempt's keys and sets the `aside` marker (expiring with the aside keys).
    2. Outside any transaction, in batches (the lock checked after each): the current version's
       bodies that stay as they are (HSCAN), the new and changed bodies, the index; every aside
       key carries ASIDE_TTL_SECONDS, so an abandoned build frees itself.
    3. One MULTI/EXEC, WATCHing what the in-place commit watches plus `ver` and `aside`: `ver`
       names the new version, its keys lose their TTL, the old version's keys expire after
       RETIRE_SECONDS (readers mid-read finish), then scopes, guard, gen, meta, events. A timer
       UNLINKs them a little earlier if this process still runs (see RETIRE_UNLINK_SHARE).

    A failure removes the aside keys; a killed process leaves them to the next commit or their
    TTL. Until the switch nothing a reader sees has changed.
    """
    aside_key = store.key(tenant, "aside")
    new = _claim_version(store, tenant, gen0, lock, version)
    try:
        _build_aside(store, tenant, plan, source=version, target=new, lock=lock)
        _crash_point("before_switch")
        with lock.paused() if lock is not None else nullcontext():
            tx = _open_checked(store, tenant, gen0, lock, version=version, aside=new)
            with tx:
                tx.queue("SET", store.key(tenant, "ver"), new)
                tx.queue("PERSIST", store.body_key(tenant, new))
                tx.queue("PERSIST", store.index_key(tenant, new))
                tx.queue("DEL", aside_key)
                tx.queue("EXPIRE", store.body_key(tenant, version), RETIRE_SECONDS)
                tx.queue("EXPIRE", store.index_key(tenant, version), RETIRE_SECONDS)
                _queue_tail(tx, store, tenant, plan, evs, meta_doc, generation, settings)
                _execute(tx, tenant)
    except BaseException:
        _abandon_aside(store, tenant, new)
        raise
    retired = [store.body_key(tenant, version), store.index_key(tenant, version)]
    timer = threading.Timer(RETIRE_SECONDS * RETIRE_UNLINK_SHARE, unlink_retired, (store, retired))
    timer.daemon = True  # a process that exits leaves it to the EXPIRE
    timer.start()


def unlink_retired(store: SnapshotStore, keys: list[str]) -> int:
    """UNLINK those of `keys` that still carry a TTL (a retired version): Redis frees them in
    a background thread. How many were removed; 0 when Redis cannot be reached."""
    try:
        removed: Any = store.client.eval(_UNLINK_RETIRED, len(keys), *keys)
    except (redis.RedisError, OSError) as exc:
        log.warning("could not unlink a retired snapshot version: %s", exc, extra={"keys": keys})
        return 0
    return int(removed)


def _claim_version(
    store: SnapshotStore, tenant: str, gen0: int, lock: TenantLock | None, version: int
) -> int:
    """A fresh version number for an aside build, its marker set and its names cleared."""
    client = store.client
    seq_key = store.key(tenant, "verseq")
    new = int(client.incr(seq_key))  # type: ignore[arg-type]
    if new <= version:  # the counter was lost (e.g. a dropped tenant): move it past `version`
        new = version + 1
        client.set(seq_key, new)
    with lock.paused() if lock is not None else nullcontext():
        tx = _open_checked(store, tenant, gen0, lock, version=version)
        with tx:
            body_key, idx_key = store.body_key(tenant, new), store.index_key(tenant, new)
            tx.queue("UNLINK", body_key, idx_key)  # leftovers of an attempt at this name
            tx.queue("SET", store.key(tenant, "aside"), new, "EX", ASIDE_TTL_SECONDS)
            if tx.execute() is None:
                raise ConcurrentCommit(
                    f"tenant {tenant!r}: the lock or the snapshot changed before the commit;"
                    " nothing was written"
                )
    return new


def _build_aside(
    store: SnapshotStore,
    tenant: str,
    plan: MergePlan,
    *,
    source: int,
    target: int,
    lock: TenantLock | None,
) -> None:
    """Write version `target`: `source`'s bodies minus the rewritten and deleted ones, the
    plan's bodies and the index; batched writes, each key given ASIDE_TTL_SECONDS."""
    body_key, idx_key = store.body_key(tenant, target), store.index_key(tenant, target)
    ttl = ASIDE_TTL_SECONDS

    def put(commands: list[tuple[Any, ...]], key: str) -> None:
        send_batch(store.client, [*commands, ("EXPIRE", key, ttl)])
        if lock is not None:
            lock.extend()  # LockLost once another holder may be writing: stop here

    rewritten = plan.write
    deleted = set(plan.delete)
    for part in batched(store.scan_bodies(tenant, source), ASIDE_BATCH_ITEMS):
        args: list[Any] = []
        for k, raw in part:
            if k not in rewritten and k not in deleted:
                args += (k, raw)
        if args:
            put([("HSET", body_key, *args)], body_key)
    for part in batched(rewritten.items(), ASIDE_BATCH_ITEMS):
        put([("HSET", body_key, *(a for kv in part for a in kv))], body_key)
    _crash_point("mid_aside")
    commands: list[tuple[Any, ...]] = []
    size = 0
    for name, blob in store.dump_index_parts(plan.index):
        commands.append(("HSET", idx_key, name, blob))
        size += len(blob)
        if size >= ASIDE_BATCH_BYTES:
            put(commands, idx_key)
            commands, size = [], 0
    if commands:
        put(commands, idx_key)


def _abandon_aside(store: SnapshotStore, tenant: str, new: int) -> None:
    """Remove a failed build's keys (its own numbered names: safe without the lock), and its
    marker unless another build replaced it meanwhile. Best effort: the TTL is the fallback."""
    aside_key = store.key(tenant, "aside")
    try:
        store.client.unlink(store.body_key(tenant, new), store.index_key(tenant, new))
        with store.client.pipeline(transaction=True) as pipe:
            pipe.watch(aside_key)
            raw: Any = pipe.get(aside_key)
            if raw is not None and int(raw) == new:
                pipe.multi()
                pipe.delete(aside_key)
                pipe.execute()
    except (redis.RedisError, OSError, ValueError):
        log.warning("could not remove an abandoned aside build", extra={"tenant": tenant})


def record_failed_sync(
    store: SnapshotStore,
    *,
    tenant: str,
    error: str,
    stage: str,
    meta: Mapping[str, Any] | None = None,
    lock: TenantLock | None = None,
    events: EventSettings | None = None,
    now: str | datetime | None = None,
) -> Event:
    """Record a sync that failed before anything could be diffed: one `mde.sync.failed` event
    and the sync metadata; the snapshot is untouched. `error` must be secret-free."""
    meta = dict(meta or {})
    time = _event_time(meta, now)
    settings = events or EventSettings()
    generation = store.generation(tenant)
    attempt = str(meta.get("started") or time)
    event = make_event(
        tenant=tenant,
        type="mde.sync.failed",
        subject=tenant,
        generation=generation,
        data={"error": error, "stage": stage},
        time=time,
        change=f"mde.sync.failed:{attempt}",
    )
    previous = store.meta(tenant) or {}
    meta_doc = {
        **meta,
        "tenant": tenant,
        "status": "failed",
        "error": error,
        "stage": stage,
        "generation": generation,
        "finished": meta.get("finished") or time,
        "counts": previous.get("counts", {}),
        "lastCommitted": {
            k: previous.get(k) for k in ("generation", "status", "finished") if k in previous
        },
        "fence": lock.fence if lock is not None else previous.get("fence"),
    }
    with lock.paused() if lock is not None else nullcontext():
        tx = _open_checked(store, tenant, None, lock)
        with tx:
            _queue_meta(tx, store, tenant, meta_doc)
            _queue_events(tx, store, tenant, [event], settings)
            if tx.execute() is None:
                raise ConcurrentCommit(
                    f"tenant {tenant!r}: the lock changed while recording the failure"
                )
    return event


__all__ = [
    "CRASH_ENV",
    "CommitError",
    "CommitResult",
    "ConcurrentCommit",
    "LockLost",
    "detect_and_commit",
    "record_failed_sync",
]
