"""Logon-user bench: `logon_users: hunting` vs the per-machine rotation, on one generated tenant.

The simulator (its own process) serves a generated tenant (10,000 machines, 20,000 users, 3 logon
users per machine) with AdvancedQuery.Read.All granted; Redis is the machine's ($REDIS_URL, a key
prefix of this run, removed at the end). The syncs, each collected and committed like
`mde-monitor sync` does, the client unpaced (the time under Microsoft's documented limits is
computed from the calls):

1. rotation (today): `logon_user_budget` /logonusers calls, machines refreshed;
2. the first hunting sync after it: hunting calls, machines covered, /logonusers reads for
   account facts (new accounts first, then the rotation), accounts whose facts are still pending;
   then hunting syncs until every account's facts are known (how many);
3. a hunting sync with `logon_user_budget: 0`: hunting alone (account facts from the snapshot).

    .venv/bin/python bench/hunting.py                 # 10,000 machines
    .venv/bin/python bench/hunting.py --scale 0.1     # 1,000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import redis
import yaml
from collect import seconds_under_limit, simulator_process

from monitor.collect.budget import ENDPOINT_LIMITS, UnmeteredBudget
from monitor.collect.defender_api import HUNTING, LOGON_USERS
from monitor.config import Settings, parse_settings
from monitor.model.graph import ScopeState
from monitor.redis_conn import delete_prefix
from monitor.snapshot.store import SnapshotStore
from monitor.sync import run_sync

TARGET_CALLS = 10


def _sync(settings: Settings, client: redis.Redis) -> dict[str, Any]:
    """One real sync (`run_sync`, unpaced); what the logon-user stage did."""
    tenant = settings.tenants[0].name
    summary = run_sync(settings, tenant, redis_client=client, budget=UnmeteredBudget())
    meta = SnapshotStore(client, settings.redis_prefix).meta(tenant)
    assert summary.status == "ok" and meta is not None, summary.error
    logon = meta["logon_users"]
    requests = summary.requests["requests"]
    return {
        "mode": logon["mode"],
        "hunting_calls": requests.get(HUNTING, 0),
        "logonusers_calls": requests.get(LOGON_USERS, 0),
        "machines_refreshed": meta["logonUserScopes"].get(ScopeState.COMPLETE.value, 0),
        "hunting": logon["hunting"],
        "logon_users_seconds": round(meta["timings"].get("logon_users", 0.0), 2),
        "collect_seconds": round(meta["duration_seconds"], 2),
        "notes": summary.notes,
        # the tenant does not change between the syncs: any event but a baseline is invented
        "change_events": sum(
            n for typ, n in summary.events.items() if not typ.startswith("mde.sync.baseline")
        ),
    }


def _limit_seconds(run: dict[str, Any]) -> dict[str, float]:
    return {
        "hunting": seconds_under_limit(run["hunting_calls"], ENDPOINT_LIMITS[HUNTING]),
        "logonusers": seconds_under_limit(run["logonusers_calls"], ENDPOINT_LIMITS[LOGON_USERS]),
    }


def _fmt(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--logon-budget", type=int, default=500)
    p.add_argument("--json", action="store_true")
    ns = p.parse_args()
    machines, users = int(10_000 * ns.scale), int(20_000 * ns.scale)
    gen = {
        "machines": machines,
        "users": users,
        "vulns_per_machine": 1,
        "cves": 100,
        "logon_users_per_machine": 3,
        "seed": 1,
    }
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"bench-hunting-{uuid.uuid4().hex[:8]}"
    with simulator_process(gen, ("AdvancedQuery.Read.All",)) as state_dir:
        try:
            data = yaml.safe_load((Path(state_dir) / "config.yaml").read_text())
            data["redis_prefix"] = prefix

            def settings(**tenant: Any) -> Settings:
                doc = json.loads(json.dumps(data))
                doc["tenants"][0].update(tenant)
                return parse_settings(doc, "bench")

            rotation = _sync(settings(logon_user_budget=ns.logon_budget), client)
            hunting = _sync(
                settings(logon_users="hunting", logon_user_budget=ns.logon_budget), client
            )
            learning, last, invented = 1, hunting, hunting["change_events"]
            while last["hunting"]["details_pending"] and learning < 50:
                last = _sync(
                    settings(logon_users="hunting", logon_user_budget=ns.logon_budget), client
                )
                learning += 1
                invented += last["change_events"]
            alone = _sync(settings(logon_users="hunting", logon_user_budget=0), client)
            invented += alone["change_events"]
            onboarded = hunting["hunting"]["machines"] + hunting["hunting"]["uncovered"]
        finally:
            delete_prefix(client, prefix)
    full_syncs = math.ceil(onboarded / max(1, ns.logon_budget))
    ok = (
        hunting["machines_refreshed"] == onboarded == alone["machines_refreshed"]
        and max(hunting["hunting_calls"], alone["hunting_calls"]) <= TARGET_CALLS
        and invented == 0
    )
    report = {
        "tenant": {"machines": machines, "onboarded": onboarded, "users": users},
        "rotation": {**rotation, "syncs_to_refresh_all": full_syncs, **_limit(rotation)},
        "hunting_first": {**hunting, **_limit(hunting)},
        "hunting_syncs_until_every_account_has_its_facts": learning,
        "change_events_after_switching_to_hunting": invented,
        "hunting_alone": {**alone, **_limit(alone)},
        "target_hunting_calls": TARGET_CALLS,
        "ok": ok,
    }
    if ns.json:
        print(json.dumps(report, indent=2))
        return 0 if ok else 1
    h, a = hunting["hunting"], alone["hunting"]
    print(
        f"tenant: {machines:,} machines ({onboarded:,} onboarded), {users:,} users,"
        f" 3 logon users per machine ({h['rows']:,} machine-account rows)"
    )
    print(
        f"rotation (logon_user_budget {ns.logon_budget}): {rotation['logonusers_calls']:,}"
        f" /logonusers calls, {rotation['machines_refreshed']:,} machines refreshed;"
        f" every machine within {full_syncs} syncs;"
        f" {_fmt(_limit_seconds(rotation)['logonusers'])} under the documented 100/min;"
        f" logon-user stage {rotation['logon_users_seconds']:.1f} s unpaced"
    )
    print(
        f"hunting, first sync: {hunting['hunting_calls']} hunting calls ({h['splits']} splits),"
        f" {hunting['machines_refreshed']:,} machines refreshed (all onboarded), queries"
        f" {h['seconds']:.1f} s; + {hunting['logonusers_calls']:,} /logonusers reads for account"
        f" facts ({h['details_read']:,} accounts read, {h['details_pending']:,} pending);"
        f" logon-user stage {hunting['logon_users_seconds']:.1f} s unpaced,"
        f" {_fmt(max(_limit_seconds(hunting).values()))} under the documented limits"
    )
    print(
        f"account facts (isDomainAdmin, ...) known for every account after {learning} hunting"
        f" sync(s) at logon_user_budget {ns.logon_budget} (new accounts' machines read first);"
        f" change events from switching to hunting and learning them: {invented}"
    )
    print(
        f"hunting alone (logon_user_budget 0, facts from the snapshot): {alone['hunting_calls']}"
        f" hunting calls, {alone['machines_refreshed']:,} machines refreshed, queries"
        f" {a['seconds']:.1f} s, logon-user stage {alone['logon_users_seconds']:.1f} s,"
        f" {_fmt(_limit_seconds(alone)['hunting'])} under the documented 45/min"
    )
    print(f"target <= {TARGET_CALLS} hunting calls, every onboarded machine in one sync: {ok}")
    return 0 if ok else 1


def _limit(run: dict[str, Any]) -> dict[str, Any]:
    return {"seconds_under_rate_limits": _limit_seconds(run)}


if __name__ == "__main__":
    raise SystemExit(main())
