"""Identity benchmark: groups + memberships over `/groups/delta`, roles, and logon-user mapping.

On a generated tenant (default 20,000 users, 5,000 groups of which 3 have 10,000+ members,
20 activated roles) it prints the Graph requests of the first groups sync, of a quiet later
sync (delta) and of a sync after a few membership changes, against the per-group approach
(list the groups, then `/groups/{id}/members` per group) computed from the same tenant; then
the time to map 50,000 logon users to directory users (and users to employees) against a
naive scan measured on a sample and extrapolated.

    .venv/bin/python bench/identity.py                # full size
    .venv/bin/python bench/identity.py --scale 0.1    # a tenth of the users and groups
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
import uuid
from pathlib import Path

import redis

from monitor.collect.budget import UnmeteredBudget
from monitor.collect.collector import open_session
from monitor.collect.directory_roles import collect_directory_roles
from monitor.collect.groups import GROUPS_DELTA, GroupsStateStore, collect_groups
from monitor.collect.progress import no_progress
from monitor.config import IdentitySettings, parse_settings
from monitor.model.builder import GraphBuilder
from monitor.model.graph import Graph
from monitor.model.identity import build_employees, map_logon_users
from monitor.model.users import GRAPH_USER_FIELDS
from monitor.redis_conn import delete_prefix
from monitor.simulator import Simulator, generate_tenant
from monitor.simulator.directory import account_for

GROUP_LIST_PAGE = 999  # /groups?$top=999, then one /members call (999 per page) per group


def requests(stats: dict[str, int], prefix: str) -> int:
    return sum(v for k, v in stats.items() if k.startswith(prefix))


def bench_requests(users: int, groups: int, large: int, roles: int, redis_url: str) -> None:
    t0 = time.monotonic()
    tenant = generate_tenant(
        machines=0, users=users, vulns_per_machine=0, cves=0, logon_users_per_machine=0,
        groups=groups, large_groups=large, roles=roles, seed=7,
    )  # fmt: skip
    sizes = [len(m) for m in tenant.directory.members.values()]
    print(
        f"tenant: {users:,} users, {groups:,} groups ({sum(s >= 10_000 for s in sizes)} with"
        f" 10,000+ members, {sum(sizes):,} memberships), {len(tenant.directory.roles)} roles"
        f" (generated in {time.monotonic() - t0:.1f}s)"
    )
    per_group = math.ceil(groups / GROUP_LIST_PAGE) + sum(max(1, math.ceil(s / 999)) for s in sizes)
    client = redis.Redis.from_url(redis_url)
    prefix = f"mdebench-identity-{uuid.uuid4().hex[:6]}"
    with (
        tempfile.TemporaryDirectory() as tmp,
        Simulator(tenants=[tenant], state_dir=Path(tmp)) as sim,
    ):
        settings = parse_settings(sim.config_dict(extra={"redis_prefix": prefix}), "bench")
        cfg = settings.tenants[0]
        store = GroupsStateStore(client, prefix, cfg.name)
        live = sim.tenant(tenant.tenant_id)

        def one_sync(label: str) -> None:
            with open_session(settings, cfg, budget=UnmeteredBudget()) as s:
                start = time.monotonic()
                graph = Graph()
                result = collect_groups(s.graph, graph, store, no_progress)
                collect_directory_roles(s.graph, graph, no_progress)
                took = time.monotonic() - start
                if result.state is not None:
                    store.save(result.state)
                stats = s.stats.to_dict()["requests"]
            rels = sum(
                1 for r in graph.relationships.values() if r["_type"].startswith("entra_group")
            )
            print(
                f"  {label:<34} groups delta {stats.get(GROUPS_DELTA, 0):>3} requests,"
                f" roles {requests(stats, 'graph:/directoryRoles'):>2}"
                f" ({result.status.state.value}, {result.status.count:,} groups,"
                f" {rels:,} memberships, {took:.1f}s)"
            )

        print("groups and memberships (requests per sync):")
        one_sync("first sync (full read)")
        one_sync("quiet later sync (delta)")
        gids = sorted(live.directory.groups)
        uids = list(live.users)
        for i in range(10):
            live.add_group_member(gids[i], uids[-1 - i])
        live.remove_group(gids[-1])
        one_sync("after 10 adds + 1 group deleted")
        print(
            f"  baseline, per group (/groups + /groups/{{id}}/members): {per_group:,} requests"
            " on every sync"
        )
    delete_prefix(client, prefix)


def bench_mapping(n_logon: int, users: int) -> None:
    tenant = generate_tenant(
        machines=0, users=users, vulns_per_machine=0, cves=0, logon_users_per_machine=0,
        groups=0, roles=0, seed=11,
    )  # fmt: skip
    domain = next(iter(tenant.users.values()))["userPrincipalName"].split("@")[1]
    from monitor.config import TenantConfig

    cfg = TenantConfig(name="bench", tenant_id="t", client_id="c", client_secret="x")
    builder = GraphBuilder(cfg)
    builder.add_users([{f: u.get(f) for f in GRAPH_USER_FIELDS} for u in tenant.users.values()])
    rng = random.Random(5)
    members = [u for u in tenant.users.values() if u.get("userType") == "Member"]
    netbios = domain.split(".")[0].upper()
    machines = max(1, n_logon // 5)
    builder.add_machines(
        [{"id": f"{i:040x}", "computerDnsName": f"pc{i}.{domain}"} for i in range(machines)]
    )
    made = 0
    for i in range(machines):
        items = []
        for j in range(5):
            u = rng.choice(members)
            name, sid = account_for(u, domain)
            roll = rng.random()
            if roll < 0.1:
                name, dom, sid = f"local{j}", f"PC{i}", f"S-1-5-21-1-1-1-{1000 + j}"
            elif roll < 0.15:
                name, dom, sid = "SYSTEM", "NT AUTHORITY", "S-1-5-18"
            elif roll < 0.2:
                name, dom, sid = f"x{made}", "OTHER", f"S-1-5-21-2-2-2-{made}"
            else:
                dom = netbios
            items.append(
                {"id": f"{dom.lower()}\\{name}-{made}", "accountName": name, "accountDomain": dom,
                 "accountSid": sid, "lastSeen": "2024-06-01T00:00:00Z", "logonTypes": "Interactive"}
            )  # fmt: skip
            made += 1
        builder.add_logon_users(f"{i:040x}", items)
    graph = builder.graph()
    settings = IdentitySettings()
    users_list = [e for e in graph.entities.values() if e["_type"] == "microsoft_defender_user"]
    keys = [k for k, e in graph.entities.items() if e["_type"] == "microsoft_defender_logon_user"]
    t = time.perf_counter()
    emp = build_employees(graph, settings, None, users=users_list)
    t_emp = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    out = map_logon_users(
        graph,
        settings,
        emp.user_employee,
        keys,
        users=users_list,
        machines_of=builder.logon_user_machines(),
    )
    t_map, cpu_map = time.perf_counter() - t, time.process_time() - cpu
    print(f"mapping {made:,} logon users to {users:,} directory users:")
    print(
        f"  users -> employees: {t_emp * 1000:.0f} ms ({emp.employees:,} employees,"
        f" {emp.unmapped_users:,} users unmapped)"
    )
    print(
        f"  logon users -> users: {t_map * 1000:.0f} ms wall, {cpu_map * 1000:.0f} ms CPU"
        f" (kinds {dict(sorted(out.kinds.items()))}; load average {_load()})"
    )
    # baseline: a scan of every user per logon account, measured on a sample
    sample = [e for e in graph.entities.values() if e["_type"] == "microsoft_defender_logon_user"][
        :200
    ]
    user_list = [e for e in graph.entities.values() if e["_type"] == "microsoft_defender_user"]
    t = time.perf_counter()
    for lu in sample:
        sid = lu.get("accountSid")
        next((u for u in user_list if u.get("onPremisesSecurityIdentifier") == sid), None)
    naive = (time.perf_counter() - t) / max(1, len(sample)) * made
    print(f"  baseline, scan per account: ~{naive:.1f} s (measured on {len(sample)}, extrapolated)")


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    users = max(100, int(20_000 * args.scale))
    groups = max(10, int(5_000 * args.scale))
    large = 3 if users >= 12_000 else 0
    bench_requests(users, groups, large, 20, args.redis_url)
    bench_mapping(max(100, int(50_000 * args.scale)), users)


if __name__ == "__main__":
    main()
