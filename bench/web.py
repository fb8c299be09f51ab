"""Benchmark: the console's page times on a big tenant, and live-timeline clients vs sync time.

    .venv/bin/python bench/web.py                   # 10,000 machines, 100,000 events
    .venv/bin/python bench/web.py --machines 2000 --events 20000 --json

Stores a 10,000-machine tenant (users, CVEs, machine->CVE pairs) with bench/diff.py's generator,
appends 100,000 change events to its streams, serves the console in its own process
(`mde-monitor web`) and measures, over 50 requests each (p50/p95, client-side on loopback, so an
upper bound of server time): overview, entity, timeline page and JSON, neighbourhood graph, with
a static file as the same-run baseline. Then the duration of a sync (diff + commit, ~5% of the
machines changing) with and without 50 connected SSE clients (in another process).
Targets (issue 12): overview and entity <= 300 ms, timeline <= 200 ms, graph <= 500 ms,
50 SSE clients add <= 10% to a sync. Uses its own key prefix and removes its keys at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diff import generate, mutate  # type: ignore[import-not-found]

from monitor.config import DetectSettings, EventSettings
from monitor.events import stream
from monitor.events.envelope import make_event
from monitor.model import schema
from monitor.redis_conn import delete_prefix
from monitor.snapshot.commit import detect_and_commit
from monitor.snapshot.store import SnapshotStore

TENANT = "bench"
TARGETS_MS = {"overview": 300, "entity": 300, "timeline": 200, "timeline_json": 200, "graph": 500}
LEVELS = ("Low", "Medium", "High", "Critical")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def append_events(client: redis.Redis, prefix: str, keys: list[str], n: int) -> None:
    """`n` realistic machine change events (risk and tag changes) on both streams."""
    rnd = random.Random(5)
    settings = EventSettings(stream_maxlen=max(100_000, n), retention_days=30)
    done = 0
    while done < n:
        pipe = client.pipeline(transaction=False)
        batch = []
        for i in range(done, min(n, done + 2_000)):
            key = rnd.choice(keys)
            old, new = rnd.sample(LEVELS, 2)
            batch.append(
                make_event(
                    tenant=TENANT,
                    type="mde.machine.updated",
                    subject=key,
                    generation=2 + i // 1000,
                    data={
                        "entityType": schema.MACHINE.type,
                        "displayName": f"host-{key[-6:]}.corp.example",
                        "changes": {"riskScore": {"old": old, "new": new}},
                    },
                )
            )
        stream.append(pipe, prefix, TENANT, batch, settings.stream_maxlen, settings.retention_days)
        pipe.execute()
        done += len(batch)


def start_console(config: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from monitor.cli import main; main()", "web", "--port", "0"],
        env={**os.environ, "MDE_MONITOR_CONFIG": str(config)},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    m = re.search(r"http://\S+", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"console did not start: {line!r}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, m.group(0).rstrip("/")


def timed(http: httpx.Client, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = http.get(path)
        out.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
    return out


def sse_clients(url: str, n: int, ready: Any, stop: Any, counts: Any) -> None:
    """`n` SSE clients in this (separate) process: plain sockets on one selector, each counting
    the rows it receives (a browser's work happens elsewhere; this keeps the client cheap)."""
    host, port = url.removeprefix("http://").split(":")
    sel = selectors.DefaultSelector()
    for i in range(n):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            f"GET /changes/stream HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        sel.register(sock, selectors.EVENT_READ, i)
        ready.release()
    tails = [b""] * n
    while not stop.is_set():
        for key, _ in sel.select(timeout=0.5):
            chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
            i = key.data
            data = tails[i] + chunk
            counts[i] += data.count(b"\ndata: ")
            tails[i] = data[-8:]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sync_once(store: SnapshotStore, graph: Any) -> float:
    t0 = time.perf_counter()
    detect_and_commit(
        store,
        tenant=TENANT,
        graph=graph,
        meta=None,
        detect=DetectSettings(drop_min_items=10**9),
        events=EventSettings(stream_maxlen=200_000),
        lock=None,
    )
    return time.perf_counter() - t0


def run(ns: argparse.Namespace) -> dict[str, Any]:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"webbench-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(url)
    store = SnapshotStore(client, prefix)
    result: dict[str, Any] = {"machines": ns.machines, "events": ns.events}
    proc = None
    try:
        t0 = time.perf_counter()
        g = generate(ns.machines, ns.machines, ns.machines * 10, 2_000)
        sync_once(store, g)
        mkeys = sorted(k for k in g.entities if k.startswith(schema.MACHINE.type + ":"))
        append_events(client, prefix, mkeys, ns.events)
        result["setup_s"] = round(time.perf_counter() - t0, 1)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "monitor.yaml"
            alerts = Path(tmp) / "alerts"
            alerts.mkdir()
            config.write_text(
                yaml.safe_dump(
                    {
                        "redis_url": url,
                        "redis_prefix": prefix,
                        "alerts_dir": str(alerts),
                        "tenants": [
                            {
                                "name": TENANT,
                                "tenant_id": "11111111-2222-3333-4444-555555555555",
                                "client_id": "c",
                                "client_secret": "s",
                            }
                        ],
                    }
                )
            )
            proc, base = start_console(config)
            key = mkeys[len(mkeys) // 2]
            paths = {
                "baseline_static": "/static/app.css",
                "overview": "/",
                "entity": f"/entities/{quote(key, safe='')}?tenant={TENANT}",
                "timeline": "/changes",
                "timeline_json": "/api/changes?limit=50",
                "timeline_filtered": "/changes?q=host-ffffff",
                "graph": f"/api/graph?key={quote(key, safe='')}&tenant={TENANT}",
            }
            pages: dict[str, Any] = {}
            with httpx.Client(base_url=base, timeout=120) as http:
                t0 = time.perf_counter()
                # the first entity page waits for the console's warm-up (graph cache + event
                # index), which must not overlap the sync timings below either
                http.get(paths["entity"]).raise_for_status()
                if ns.sse_only:
                    paths = {}
                result["first_entity_ms"] = round((time.perf_counter() - t0) * 1000)
                for name, path in paths.items():
                    http.get(path)  # warm
                    ms = timed(http, path, ns.requests)
                    pages[name] = {
                        "p50_ms": round(statistics.median(ms), 1),
                        "p95_ms": round(p95(ms), 1),
                        "target_ms": TARGETS_MS.get(name),
                    }
                    if name in TARGETS_MS:
                        pages[name]["ok"] = pages[name]["p95_ms"] <= TARGETS_MS[name]
            result["pages"] = pages

            # syncs with and without 50 SSE clients (each sync changes ~5% of the machines)
            graphs = [mutate(g, 0.05, seed=s)[0] for s in (21, 22)]
            graphs.append(g)
            base_runs = [sync_once(store, graphs[i % 3]) for i in range(ns.syncs)]
            ctx = mp.get_context("spawn")
            ready, stop = ctx.Semaphore(0), ctx.Event()
            counts = ctx.Array("i", ns.clients)
            clients = ctx.Process(target=sse_clients, args=(base, ns.clients, ready, stop, counts))
            clients.start()
            for _ in range(ns.clients):
                if not ready.acquire(timeout=60):
                    raise RuntimeError("SSE clients did not connect")
            cpu0 = (cpu_seconds(proc.pid), cpu_seconds(clients.pid or 0), time.process_time())
            wall0 = time.perf_counter()
            with_runs = [sync_once(store, graphs[(i + ns.syncs) % 3]) for i in range(ns.syncs)]
            wall = time.perf_counter() - wall0
            cpu1 = (cpu_seconds(proc.pid), cpu_seconds(clients.pid or 0), time.process_time())
            deadline = time.monotonic() + 30
            while min(counts[:]) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            stop.set()
            clients.terminate()
            clients.join(10)
            b, w = statistics.median(base_runs), statistics.median(with_runs)
            result["sse"] = {
                "clients": ns.clients,
                "sync_s_without": round(b, 3),
                "sync_s_with": round(w, 3),
                "increase_pct": round((w / b - 1) * 100, 1),
                "rows_per_client_min": min(counts[:]),
                "cpu_s_during_syncs": {
                    "wall": round(wall, 1),
                    "console": round(cpu1[0] - cpu0[0], 1),
                    "sse_clients": round(cpu1[1] - cpu0[1], 1),
                    "sync": round(cpu1[2] - cpu0[2], 1),
                },
                "load_avg": os.getloadavg()[0],
                "ok": w <= b * 1.10,
            }
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        delete_prefix(client, prefix)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--machines", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--sse-only", action="store_true", help="Skip the page timings.")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args(argv)
    res = run(ns)
    if ns.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"tenant: {res['machines']} machines, {res['events']} events (setup {res['setup_s']}s)")
    print(f"first entity page (builds graph cache + event index): {res['first_entity_ms']} ms")
    print(f"{'page':<20}{'p50 ms':>9}{'p95 ms':>9}{'target':>9}  ok")
    for name, p in res["pages"].items():
        target = p["target_ms"] or "-"
        ok = "" if p["target_ms"] is None else ("yes" if p["ok"] else "NO")
        print(f"{name:<20}{p['p50_ms']:>9}{p['p95_ms']:>9}{target!s:>9}  {ok}")
    s = res["sse"]
    print(
        f"sync with {s['clients']} SSE clients: {s['sync_s_with']}s vs {s['sync_s_without']}s"
        f" without ({s['increase_pct']:+}%, target <= +10%: {'yes' if s['ok'] else 'NO'});"
        f" every client got >= {s['rows_per_client_min']} rows"
    )
    c = s["cpu_s_during_syncs"]
    print(
        f"CPU seconds during those syncs ({c['wall']}s wall, 1-min load {s['load_avg']:.1f}):"
        f" sync {c['sync']}, console {c['console']}, SSE clients {c['sse_clients']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
