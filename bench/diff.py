"""Benchmark: diff-and-commit of a large synthetic tenant against its snapshot in Redis.

    .venv/bin/python bench/diff.py                 # 100k machines, 100k users, 2M pairs
    .venv/bin/python bench/diff.py --scale 0.1     # a tenth of that
    .venv/bin/python bench/diff.py --json

Prints: the second sync's diff-and-commit time (snapshot already stored), the floor (orjson.loads
of the same items as one JSON array), a naive single DeepDiff over a 10k-machine slice, peak
memory and Redis bytes per item. Uses its own key prefix and removes its keys at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import redis
from deepdiff import DeepDiff

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.config import DetectSettings, EventSettings
from monitor.detect import diff as snapdiff
from monitor.memory import pin_mmap_threshold
from monitor.model import schema
from monitor.model.graph import Graph, Item, ScopeState, ScopeStatus
from monitor.model.raw import RawData, json_default
from monitor.model.vulnerabilities import machine_vulnerability_relationship
from monitor.redis_conn import delete_prefix
from monitor.snapshot.commit import detect_and_commit
from monitor.snapshot.store import SnapshotStore

TENANT = "bench"
T0 = 1_700_000_000_000
LEVELS = ("None", "Low", "Medium", "High")


def _machine(i: int, rnd: random.Random) -> Item:
    mid = f"{i:040x}"
    name = f"host{i}.corp.contoso.com"
    raw = {
        "id": mid,
        "computerDnsName": name,
        "osPlatform": "Windows11",
        "healthStatus": "Active",
        "riskScore": rnd.choice(LEVELS),
        "lastIpAddress": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
        "agentVersion": "10.8760.22621.1",
        "machineTags": ["corp"],
    }
    return {
        "_key": schema.MACHINE.key(mid),
        "_type": schema.MACHINE.type,
        "_class": ["HostAgent"],
        "id": mid,
        "name": name,
        "displayName": name,
        "computerDnsName": name,
        "riskScore": raw["riskScore"],
        "exposureLevel": rnd.choice(LEVELS),
        "healthStatus": "Active",
        "onboardingStatus": "Onboarded",
        "defenderAvStatus": "Updated",
        "osPlatform": "Windows11",
        "osVersion": "22H2",
        "agentVersion": "10.8760.22621.1",
        "machineTags": ["corp"],
        "ipAddress": [raw["lastIpAddress"]],
        "macAddress": [f"00:0D:3A:{i >> 16 & 255:02X}:{i >> 8 & 255:02X}:{i & 255:02X}"],
        "firstSeenOn": T0 - 86_400_000,
        "lastSeenOn": T0,
        "rbacGroupName": "Servers",
        "_rawData": RawData.default(raw),  # as the model holds it
    }


def _user(i: int) -> Item:
    uid = f"{i:08x}-0000-4000-8000-{i:012x}"
    return {
        "_key": schema.USER.key(uid),
        "_type": schema.USER.type,
        "_class": ["User"],
        "id": uid,
        "name": f"User {i}",
        "displayName": f"User {i}",
        "username": f"user{i}@contoso.com",
        "userPrincipalName": f"user{i}@contoso.com",
        "accountEnabled": True,
        "active": True,
        "jobTitle": "Engineer",
        "department": "R&D",
        "_rawData": RawData.default({"id": uid, "accountEnabled": True}),
    }


def _vuln(i: int) -> Item:
    cve = f"CVE-20{20 + i % 5}-{10000 + i}"
    return {
        "_key": schema.VULNERABILITY.key(cve),
        "_type": schema.VULNERABILITY.type,
        "_class": ["Finding"],
        "id": cve,
        "name": cve,
        "displayName": cve,
        "severity": "High",
        "score": 7.5,
        "publicExploit": False,
        "public": False,
        "exposedMachines": 100,
        "updatedOn": T0,
        "webLink": f"https://nvd.nist.gov/vuln/detail/{cve}",
    }


def _pair(mkey: str, vkey: str) -> Item:
    """A machine IDENTIFIED vulnerability relationship as the converter makes it."""
    return machine_vulnerability_relationship(
        mkey, vkey, ["microsoft windows_11 10.0.22621"], ["5034123"]
    )


def generate(machines: int, users: int, pairs: int, vulns: int, seed: int = 7) -> Graph:
    rnd = random.Random(seed)
    g = Graph()
    for i in range(machines):
        g.add_entity(_machine(i, rnd), schema.SCOPE_MACHINES)
    for i in range(users):
        g.add_entity(_user(i), schema.SCOPE_USERS)
    vkeys = []
    for i in range(vulns):
        v = _vuln(i)
        vkeys.append(v["_key"])
        g.add_entity(v, schema.SCOPE_VULNERABILITIES)
    mkeys = [k for k in g.entities if k.startswith(schema.MACHINE.type + ":")]
    per = max(1, pairs // max(1, machines))
    n = 0
    for mi, mkey in enumerate(mkeys):
        for j in range(per):
            if n >= pairs:
                break
            g.add_relationship(
                _pair(mkey, vkeys[(mi * 7 + j * 13) % len(vkeys)]), schema.SCOPE_VULNERABILITIES
            )
            n += 1
    for s in (schema.SCOPE_MACHINES, schema.SCOPE_USERS, schema.SCOPE_VULNERABILITIES):
        g.scopes[s] = ScopeStatus(ScopeState.COMPLETE)
    return g


def mutate(g: Graph, share: float, seed: int = 11) -> tuple[Graph, dict[str, int]]:
    """A new graph: `share` of every kind changed, every machine's lastSeenOn moved."""
    rnd = random.Random(seed)
    new = Graph(
        entities=dict(g.entities), relationships=g.relationships.copy(), scope_of=g.scope_of
    )
    new.scopes = {k: ScopeStatus(v.state, v.count, v.error) for k, v in g.scopes.items()}
    stats = {"machines": 0, "users": 0, "vulns": 0, "pairs_removed": 0, "pairs_added": 0}
    for key, item in g.entities.items():
        typ = item["_type"]
        if typ == schema.MACHINE.type:
            m = dict(item)
            m["lastSeenOn"] = item["lastSeenOn"] + 3_600_000
            if rnd.random() < share:
                m["riskScore"] = "Critical" if item["riskScore"] != "Critical" else "Low"
                stats["machines"] += 1
            new.entities[key] = m
        elif rnd.random() < share:
            if typ == schema.USER.type:
                new.entities[key] = {**item, "accountEnabled": False, "active": False}
                stats["users"] += 1
            elif typ == schema.VULNERABILITY.type:
                new.entities[key] = {**item, "publicExploit": True, "public": True}
                stats["vulns"] += 1
    vkeys = [k for k, v in g.entities.items() if v["_type"] == schema.VULNERABILITY.type]
    for key, rel in g.relationships.items():
        if rnd.random() < share / 2:
            del new.relationships[key]
            del new.scope_of[key]
            stats["pairs_removed"] += 1
            alt = _pair(rel["_fromEntityKey"], rnd.choice(vkeys))
            if alt["_key"] not in new.relationships and alt["_key"] not in g.relationships:
                new.add_relationship(alt, schema.SCOPE_VULNERABILITIES)
                stats["pairs_added"] += 1
    return new, stats


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _used_memory(client: redis.Redis) -> int:
    info: Any = client.info("memory")
    return int(info["used_memory"])


def _items(g: Graph) -> list[Item]:
    return [*g.entities.values(), *g.relationships.values()]


def _machines_graph(machines: dict[str, Item]) -> Graph:
    g = Graph()
    for item in machines.values():
        g.add_entity(item, schema.SCOPE_MACHINES)
    return g


def run(ns: argparse.Namespace) -> dict[str, Any]:
    scale = ns.scale
    machines = int(ns.machines * scale)
    users = int(ns.users * scale)
    pairs = int(ns.pairs * scale)
    vulns = max(10, int(ns.vulns * scale))
    client = redis.Redis.from_url(ns.redis_url)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    store = (
        SnapshotStore(client, prefix)
        if ns.compress_min_bytes is None
        else SnapshotStore(client, prefix, compress_min_bytes=ns.compress_min_bytes or None)
    )
    out_compress = store.compress_min_bytes
    detect, events = DetectSettings(), EventSettings()
    out: dict[str, Any] = {
        "machines": machines,
        "users": users,
        "pairs": pairs,
        "vulnerabilities": vulns,
        "compress_min_bytes": out_compress,
    }
    try:
        t = time.perf_counter()
        g1 = generate(machines, users, pairs, vulns)
        out["items"] = len(g1.entities) + len(g1.relationships)
        out["generate_s"] = time.perf_counter() - t

        mem0 = _used_memory(client)
        t = time.perf_counter()
        r1 = detect_and_commit(
            store, tenant=TENANT, graph=g1, meta={}, detect=detect, events=events, lock=None
        )
        out["baseline_commit_s"] = time.perf_counter() - t
        assert r1.baseline
        used = _used_memory(client) - mem0
        out["redis_bytes_per_item"] = round(used / out["items"], 1)
        body_usage: Any = client.memory_usage(store.body_key(TENANT), samples=0)
        idx_usage: Any = client.memory_usage(store.index_key(TENANT), samples=0)
        out["redis_body_bytes"] = int(body_usage or 0)
        out["redis_index_bytes"] = int(idx_usage or 0)

        g2, stats = mutate(g1, ns.change)
        out["mutations"] = stats
        rss_before = _rss_mb()
        t = time.perf_counter()
        r2 = detect_and_commit(
            store, tenant=TENANT, graph=g2, meta={}, detect=detect, events=events, lock=None
        )
        out["diff_commit_s"] = time.perf_counter() - t
        out["events"] = len(r2.events)
        out["event_counts"] = r2.event_counts
        out["written"] = r2.written
        out["deleted"] = r2.deleted
        out["phases_s"] = r2.timings
        out["peak_rss_mb"] = round(_rss_mb(), 1)
        out["rss_before_diff_mb"] = round(rss_before, 1)
        del r1, r2

        # the floor: merely parse the new graph's items as JSON
        blob = orjson.dumps(_items(g2), default=json_default)
        out["json_bytes"] = len(blob)
        t = time.perf_counter()
        parsed = orjson.loads(blob)
        out["json_parse_floor_s"] = time.perf_counter() - t
        del parsed
        gc.disable()
        t = time.perf_counter()
        parsed = orjson.loads(blob)
        out["json_parse_floor_nogc_s"] = time.perf_counter() - t
        del parsed
        gc.enable()
        del blob
        out["ratio_to_floor"] = round(out["diff_commit_s"] / out["json_parse_floor_s"], 2)
        out["ratio_to_floor_nogc"] = round(out["diff_commit_s"] / out["json_parse_floor_nogc_s"], 2)

        # naive: one DeepDiff over both whole snapshots, on a slice of machines
        n = min(ns.naive_slice, machines)
        mkeys = [k for k, v in g1.entities.items() if v["_type"] == schema.MACHINE.type][:n]
        old = {k: g1.entities[k] for k in mkeys}
        new = {k: g2.entities[k] for k in mkeys}
        t = time.perf_counter()
        DeepDiff(old, new, ignore_order=True, exclude_regex_paths=[r".*\['_rawData'\]"])
        out["naive_deepdiff_slice"] = n
        out["naive_deepdiff_s"] = time.perf_counter() - t
        ign = snapdiff.ignored_fields(detect)
        prev = snapdiff.compare(_machines_graph(old), None, ign).fresh
        prev_index = {  # as the store holds it: prints in hex
            s: {t: {k: fp.hex() for k, fp in items.items()} for t, items in types.items()}
            for s, types in prev.items()
        }
        sub = _machines_graph(new)
        t = time.perf_counter()
        cmp = snapdiff.compare(sub, prev_index, ign)
        for k in cmp.changed:
            snapdiff.field_changes(old[k], new[k], ign[schema.MACHINE.type])
        out["our_diff_slice_s"] = time.perf_counter() - t
    finally:
        delete_prefix(client, prefix)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--machines", type=int, default=100_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--pairs", type=int, default=2_000_000)
    p.add_argument("--vulns", type=int, default=20_000)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every count")
    p.add_argument("--change", type=float, default=0.01, help="share of items changed")
    p.add_argument("--naive-slice", type=int, default=10_000)
    p.add_argument(
        "--compress-min-bytes",
        type=int,
        default=None,
        help="zlib bodies from this size (default: the store's; 0 = never)",
    )
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ns = p.parse_args(argv)
    pin_mmap_threshold()  # as the CLI and the Celery workers run
    out = run(ns)
    if ns.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    rows = [
        (
            "items",
            f"{out['items']:,} ({out['machines']:,} machines, {out['users']:,} users, "
            f"{out['pairs']:,} pairs, {out['vulnerabilities']:,} CVEs)",
        ),
        ("changed", ", ".join(f"{k}={v:,}" for k, v in out["mutations"].items())),
        ("baseline commit", f"{out['baseline_commit_s']:.2f} s"),
        (
            "diff+commit (2nd sync)",
            f"{out['diff_commit_s']:.2f} s  ({out['events']:,} events, "
            f"{out['written']:,} bodies written, {out['deleted']:,} deleted)",
        ),
        ("  phases (s)", ", ".join(f"{k} {v:.2f}" for k, v in out["phases_s"].items())),
        (
            "JSON parse floor",
            f"{out['json_parse_floor_s']:.2f} s (gc off: "
            f"{out['json_parse_floor_nogc_s']:.2f} s) of {out['json_bytes'] / 1e6:,.0f} MB",
        ),
        (
            "ratio to floor",
            f"{out['ratio_to_floor']}x (gc off floor: {out['ratio_to_floor_nogc']}x)  target <= 2x",
        ),
        (
            f"naive DeepDiff ({out['naive_deepdiff_slice']:,} machines)",
            f"{out['naive_deepdiff_s']:.2f} s vs ours {out['our_diff_slice_s']:.3f} s",
        ),
        (
            "peak RSS",
            f"{out['peak_rss_mb']:,.0f} MB (before 2nd sync {out['rss_before_diff_mb']:,.0f} MB)",
        ),
        (
            "Redis bytes/item",
            f"{out['redis_bytes_per_item']} (bodies {out['redis_body_bytes'] / 1e6:,.0f} MB,"
            f" index {out['redis_index_bytes'] / 1e6:,.0f} MB; zlib bodies from"
            f" {out['compress_min_bytes'] or 'never'} bytes)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
