"""Alert bench: 100,000 change events through 50 rules.

Measures events/second for matching alone (in memory: type index + compiled conditions) and end
to end: the events in the Redis stream -> dispatch (consumer group read, match, silence check,
throttle, grouping, ack in one MULTI/EXEC per batch) -> flush and render -> deliveries to a local
webhook receiver (real HTTP, the webhook sink). Prints a compact table; --json for scripts.

    .venv/bin/python bench/alerts.py                    # 100,000 events, 50 rules
    .venv/bin/python bench/alerts.py --events 10000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.rules import load_rules
from monitor.config import Settings
from monitor.events import stream
from monitor.events.envelope import Event, make_event
from monitor.redis_conn import connect, delete_prefix, ensure_redis

TENANTS = ("contoso", "fabrikam", "northwind", "tailspin", "woodgrove")
LEVELS = ("None", "Informational", "Low", "Medium", "High", "Critical")
HEALTH_BAD = ("Inactive", "NoSensorData", "ImpairedCommunication")
AV = ("Updated", "NotUpdated", "Disabled", "NotReporting", "NotSupported", "Unknown")
TAGS = ("production", "lab", "eu", "us", "pci", "kiosk", "server")


# ------------------------------------------------------------------------------------- rules


def make_rules(n: int) -> list[dict[str, Any]]:
    """`n` rules over a realistic mix of types and every operator family."""
    shapes: list[tuple[Any, list[dict[str, Any]]]] = [
        (
            "mde.machine.risk_raised",
            [{"field": "changes.riskScore.new", "op": "gte", "value": "High"}],
        ),
        (
            "mde.machine.risk_raised",
            [{"field": "riskScore", "op": "to", "value": ["Medium", "High"]}],
        ),
        (
            "mde.machine.risk_lowered",
            [{"field": "changes.riskScore.new", "op": "lt", "value": "Medium"}],
        ),
        (
            "mde.machine.health_degraded",
            [{"field": "changes.healthStatus.new", "op": "in", "value": list(HEALTH_BAD)}],
        ),
        (
            "mde.machine.health_degraded",
            [{"field": "entity.machineTags", "op": "contains", "value": "production"}],
        ),
        ("mde.machine.health_recovered", []),
        (
            "mde.machine.exposure_raised",
            [{"field": "changes.exposureLevel.new", "op": "eq", "value": "High"}],
        ),
        (
            "mde.machine.av_status_changed",
            [
                {
                    "field": "defenderAvStatus",
                    "op": "to",
                    "value": ["NotUpdated", "Disabled", "NotReporting"],
                }
            ],
        ),
        ("mde.machine.updated", [{"field": "osPlatform", "op": "changed"}]),
        (
            "mde.machine.updated",
            [{"field": "entity.displayName", "op": "regex", "value": r"^srv-\d+\.contoso"}],
        ),
        (
            "mde.machine.created",
            [{"field": "entity.osPlatform", "op": "eq", "value": "WindowsServer2022"}],
        ),
        ("mde.machine.deleted", []),
        (
            "mde.machine.tags_changed",
            [{"field": "changes.machineTags.added", "op": "contains", "value": "pci"}],
        ),
        (
            "mde.machine_vulnerability.identified",
            [
                {
                    "any": [
                        {"field": "target.severity", "op": "eq", "value": "Critical"},
                        {"field": "target.public", "op": "eq", "value": True},
                    ]
                }
            ],
        ),
        (
            "mde.machine_vulnerability.identified",
            [{"field": "target.score", "op": "gte", "value": 9.0}],
        ),
        (
            "mde.machine_logon_user.added",
            [{"field": "target.isDomainAdmin", "op": "eq", "value": True}],
        ),
        ("mde.user.disabled", []),
        (
            "mde.machine.*",
            [
                {"field": "entity.machineTags", "op": "contains", "value": "kiosk"},
                {"field": "tenant", "op": "ne", "value": "woodgrove"},
            ],
        ),
        (
            ["mde.machine.health_degraded", "mde.machine.risk_raised"],
            [{"field": "entity.lastSeen", "op": "gte", "value": "2024-01-01"}],
        ),
        (
            "mde.machine.*",
            [
                {"not": {"field": "entity.osPlatform", "op": "regex", "value": "^Windows"}},
                {"field": "changes", "op": "exists"},
            ],
        ),
    ]
    rules = []
    for i in range(n):
        types, where = shapes[i % len(shapes)]
        tenant = [TENANTS[i % len(TENANTS)]] if i >= len(shapes) * 2 else None
        rule: dict[str, Any] = {
            "name": f"bench-{i:02d}",
            "description": f"bench rule {i}",
            "severity": ("info", "low", "medium", "high", "critical")[i % 5],
            "match": {"type": types, "where": where, **({"tenant": tenant} if tenant else {})},
            "sinks": ["hook"],
            "group_by": ["tenant"] if i % 3 else ["tenant", "type"],
            "group_wait": "30s",
            "repeat_interval": "4h",
        }
        rules.append(rule)
    return rules


# ------------------------------------------------------------------------------------- events


def _machine(i: int, rng: random.Random, **over: Any) -> dict[str, Any]:
    platform = rng.choice(("Windows11", "Windows10", "WindowsServer2022", "Linux", "macOS"))
    name = f"{'srv' if platform.startswith('WindowsServer') else 'ws'}-{i}.contoso.local"
    m = {
        "_key": f"microsoft_defender_machine:{i:040x}",
        "_type": "microsoft_defender_machine",
        "_class": ["HostAgent"],
        "id": f"{i:040x}",
        "displayName": name,
        "name": name,
        "computerDnsName": name,
        "osPlatform": platform,
        "osVersion": "10.0.22631",
        "agentVersion": "10.8750.22621.1000",
        "healthStatus": "Active",
        "riskScore": "Low",
        "exposureLevel": "Medium",
        "defenderAvStatus": "Updated",
        "onboardingStatus": "Onboarded",
        "machineTags": rng.sample(TAGS, rng.randint(0, 3)),
        "rbacGroupName": "Servers" if platform.startswith("WindowsServer") else "Workstations",
        "lastIpAddress": f"10.{i % 250}.{(i // 250) % 250}.{i % 200 + 1}",
        "lastExternalIpAddress": "203.0.113.7",
        "firstSeen": "2023-06-01T08:00:00Z",
        "lastSeen": "2024-05-01T08:00:00Z",
        "managedBy": "Intune",
        "isAadJoined": True,
        "aadDeviceId": str(uuid.UUID(int=i)),
    }
    m.update(over)
    return m


def _change(
    kind: str, m: dict[str, Any], field: str, old: Any, new: Any, tenant: str, gen: int
) -> Event:
    after = dict(m, **{field: new})
    return make_event(
        tenant=tenant,
        type=f"mde.machine.{kind}",
        subject=m["_key"],
        generation=gen,
        data={
            "entityType": m["_type"],
            "entityClass": m["_class"],
            "key": m["_key"],
            "displayName": m["displayName"],
            "changes": {field: {"old": old, "new": new}},
            "entity": after,
            "before": dict(m, **{field: old}),
        },
    )


def _pair(
    kind: str, verb: str, m: dict[str, Any], target: dict[str, Any], tenant: str, gen: int
) -> Event:
    """A relationship event `mde.<kind>` of machine `m` and `target` (e.g. `m|has|user`)."""
    key = f"{m['_key']}|{verb}|{target['_key']}"
    return make_event(
        tenant=tenant,
        type=f"mde.{kind}",
        subject=key,
        generation=gen,
        data={
            "key": key,
            "displayName": f"{m['displayName']} {verb.upper()} {target['displayName']}",
            "changes": {},
            "entity": {"_key": key},
            "source": m,
            "target": target,
        },
    )


def make_events(n: int, seed: int = 7) -> list[Event]:
    """`n` events of a realistic mix (machines, vulnerabilities, logons, users) over 5 tenants."""
    rng = random.Random(seed)
    out: list[Event] = []
    for k in range(n):
        tenant = TENANTS[k % len(TENANTS)]
        i = rng.randrange(20_000)
        m = _machine(i, rng)
        gen = 1 + k // 20_000
        r = rng.random()
        if r < 0.25:
            old, new = sorted(rng.sample(range(len(LEVELS)), 2))
            out.append(
                _change("risk_raised", m, "riskScore", LEVELS[old], LEVELS[new], tenant, gen)
            )
        elif r < 0.35:
            new, old = sorted(rng.sample(range(len(LEVELS)), 2))
            out.append(
                _change("risk_lowered", m, "riskScore", LEVELS[old], LEVELS[new], tenant, gen)
            )
        elif r < 0.50:
            out.append(
                _change(
                    "health_degraded",
                    m,
                    "healthStatus",
                    "Active",
                    rng.choice(HEALTH_BAD),
                    tenant,
                    gen,
                )
            )
        elif r < 0.55:
            out.append(
                _change("health_recovered", m, "healthStatus", "Inactive", "Active", tenant, gen)
            )
        elif r < 0.60:
            out.append(
                _change("exposure_raised", m, "exposureLevel", "Medium", "High", tenant, gen)
            )
        elif r < 0.65:
            out.append(
                _change(
                    "av_status_changed",
                    m,
                    "defenderAvStatus",
                    "Updated",
                    rng.choice(AV),
                    tenant,
                    gen,
                )
            )
        elif r < 0.75:
            out.append(_change("updated", m, "osVersion", "10.0.22631", "10.0.26100", tenant, gen))
        elif r < 0.85:
            cve = f"CVE-2024-{rng.randrange(1000, 9999)}"
            sev = rng.choice(("Low", "Medium", "High", "Critical"))
            target = {
                "_key": f"microsoft_defender_vulnerability:{cve}",
                "_type": "microsoft_defender_vulnerability",
                "displayName": cve,
                "severity": sev,
                "score": round(rng.uniform(2, 10), 1),
                "public": rng.random() < 0.1,
            }
            out.append(
                _pair("machine_vulnerability.identified", "identified", m, target, tenant, gen)
            )
        elif r < 0.92:
            user = f"user{rng.randrange(5000)}"
            target = {
                "_key": f"microsoft_defender_logon_user:{user}",
                "displayName": user,
                "isDomainAdmin": rng.random() < 0.05,
            }
            out.append(_pair("machine_logon_user.added", "has", m, target, tenant, gen))
        elif r < 0.97:
            kind = rng.choice(("created", "deleted"))
            out.append(
                make_event(
                    tenant=tenant,
                    type=f"mde.machine.{kind}",
                    subject=m["_key"],
                    generation=gen,
                    data={
                        "key": m["_key"],
                        "displayName": m["displayName"],
                        "changes": {},
                        "entity": m,
                    },
                )
            )
        else:
            uid = f"{rng.randrange(10_000):05d}"
            out.append(
                make_event(
                    tenant=tenant,
                    type="mde.user.disabled",
                    subject=f"microsoft_defender_user:{uid}",
                    generation=gen,
                    data={
                        "displayName": f"User {uid}",
                        "changes": {"accountEnabled": {"old": True, "new": False}},
                        "entity": {"accountEnabled": False},
                    },
                )
            )
    return out


# ------------------------------------------------------------------------------------- receiver


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True
    requests = 0
    events = 0
    ids: set[str]


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.requests += 1
        self.server.ids.add(self.headers.get("webhook-id", ""))
        self.server.events += int(self.headers.get("mde-total") or 0)
        del body
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()


# ------------------------------------------------------------------------------------- bench


def run(n_events: int, n_rules: int, redis_url: str) -> dict[str, Any]:
    events = make_events(n_events)
    with tempfile.TemporaryDirectory(prefix="mde-alert-bench-") as tmp:
        alerts = Path(tmp)
        server = _Receiver(("127.0.0.1", 0), _Handler)
        server.ids = set()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        (alerts / "sinks.yaml").write_text(
            yaml.safe_dump({"sinks": {"hook": {"type": "webhook", "url": url, "batch": True}}})
        )
        (alerts / "rules.yaml").write_text(
            yaml.safe_dump({"rules": make_rules(n_rules)}, sort_keys=False)
        )
        ruleset = load_rules(alerts)
        if ruleset.problems:
            raise SystemExit("\n".join(map(str, ruleset.problems)))

        t0 = time.perf_counter()
        hits = sum(len(ruleset.evaluate(ev)) for ev in events)
        match_s = time.perf_counter() - t0

        client = connect(redis_url)
        prefix = f"mdebench-{uuid.uuid4().hex[:8]}"
        try:
            t0 = time.perf_counter()
            for start in range(0, len(events), 1000):
                pipe = client.pipeline(transaction=False)
                stream.append(
                    pipe,
                    prefix,
                    "_bench",
                    events[start : start + 1000],
                    maxlen=10 * n_events,
                    retention_days=3650,
                )
                pipe.execute()
            append_s = time.perf_counter() - t0
            # the per-tenant stream of this bench is not read; only the all-tenants stream is
            client.unlink(stream.stream_key(prefix, "_bench"))

            settings = Settings(redis_url=redis_url, redis_prefix=prefix, alerts_dir=alerts)
            d = Dispatcher(settings, client, consumer="bench", ruleset=ruleset)
            t0 = time.perf_counter()
            stats = d.run_once(flush_all=True)
            ingest_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            d.drain(60)  # nothing new to read: delivers what was queued, with retries
            deliver_s = time.perf_counter() - t1
            final = d.queue.records(limit=100_000)
            sent = sum(1 for r in final if r.get("status") == "sent")
        finally:
            delete_prefix(client, prefix)
            server.shutdown()
            server.server_close()
    e2e_s = ingest_s + deliver_s
    return {
        "events": n_events,
        "rules": n_rules,
        "rule_matches": hits,
        "match_seconds": round(match_s, 3),
        "match_events_per_s": round(n_events / match_s),
        "append_seconds": round(append_s, 3),
        "dispatch_seconds": round(ingest_s, 3),
        "deliver_seconds": round(deliver_s, 3),
        "end_to_end_seconds": round(e2e_s, 3),
        "end_to_end_events_per_s": round(n_events / e2e_s),
        "matched": stats.matched,
        "throttled": stats.throttled,
        "notifications": stats.notifications,
        "deliveries_sent": sent,
        "receiver_requests": server.requests,
        "receiver_unique_ids": len(server.ids),
        "events_in_notifications": server.events,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rules", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    ns = parser.parse_args(argv)
    url, _ = ensure_redis(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    r = run(ns.events, ns.rules, url)
    if ns.json:
        print(json.dumps(r, indent=2))
        return 0
    rows = [
        (
            "matching only (in memory)",
            f"{r['match_events_per_s']:,} events/s",
            f"{r['match_seconds']:.2f}s, {r['rule_matches']:,} rule matches",
        ),
        ("append to stream", "", f"{r['append_seconds']:.2f}s (not in end-to-end)"),
        (
            "dispatch: read/match/throttle/group/flush",
            "",
            f"{r['dispatch_seconds']:.2f}s, {r['matched']:,} matched, {r['throttled']:,} throttled",
        ),
        (
            "deliver to local webhook",
            "",
            f"{r['deliver_seconds']:.2f}s, {r['deliveries_sent']:,} sent ({r['receiver_requests']:,} requests)",
        ),
        (
            "end to end (stream -> deliveries)",
            f"{r['end_to_end_events_per_s']:,} events/s",
            f"{r['end_to_end_seconds']:.2f}s, {r['notifications']:,} notifications",
        ),
    ]
    print(f"alerts bench: {r['events']:,} events through {r['rules']} rules")
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    for a, b, c in rows:
        print(f"  {a:<{w0}}  {b:>{w1}}  {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
