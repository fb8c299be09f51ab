"""Users benchmark: Graph requests per sync by `/users/delta` against the full user list.

On a generated tenant (default 100,000 users) it reads the users the way a sync does, the state
in Redis saved after each read as after a commit: the full list (the baseline, `$top=999`), the
first delta read (everyone, 200 a page), a quiet delta read, a delta read after 1% of the users
changed (updates, a few disabled, added and deleted), and the full list again after the same
changes. Each read's users are compared with the list's, field for field. Times include building
the user entities (as a sync does) and, for delta, loading the state; saving it is shown apart.

    .venv/bin/python bench/users_delta.py                 # 100,000 users
    .venv/bin/python bench/users_delta.py --users 10000   # smaller
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import redis

from monitor.collect.budget import UnmeteredBudget
from monitor.collect.collector import open_session
from monitor.collect.graph_api import USERS
from monitor.collect.progress import no_progress
from monitor.collect.users import USERS_DELTA, UsersStateStore, collect_users
from monitor.config import parse_settings
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState
from monitor.model.schema import USER
from monitor.redis_conn import delete_prefix
from monitor.simulator import SimTenant, Simulator, generate_tenant

Users = dict[str, dict[str, object]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--changed", type=float, default=0.01, help="share of users changed")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()

    t0 = time.monotonic()
    tenant = generate_tenant(
        machines=0, users=args.users, vulns_per_machine=0, cves=0, logon_users_per_machine=0,
        groups=0, roles=0, seed=17,
    )  # fmt: skip
    print(f"tenant: {args.users:,} users (generated in {time.monotonic() - t0:.1f}s)")
    client = redis.Redis.from_url(args.redis_url)
    prefix = f"mdebench-users-{uuid.uuid4().hex[:6]}"
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            Simulator(tenants=[tenant], state_dir=Path(tmp)) as sim,
        ):
            settings = parse_settings(sim.config_dict(extra={"redis_prefix": prefix}), "bench")
            cfg = settings.tenants[0]
            store = UsersStateStore(client, prefix, cfg.name)
            live = sim.tenant(tenant.tenant_id)

            def read(label: str, delta: bool) -> Users:
                with open_session(settings, cfg, budget=UnmeteredBudget()) as s:
                    builder = GraphBuilder(cfg)
                    start = time.monotonic()
                    result = collect_users(
                        s.graph, builder, no_progress, store=store if delta else None
                    )
                    took = time.monotonic() - start
                    assert result.status.state is ScopeState.COMPLETE, result.status
                    saved = ""
                    if result.state is not None:
                        start = time.monotonic()
                        written = result.state.changed
                        store.save(result.state)  # as after the snapshot commit
                        what = "state and link" if written else "link only"
                        saved = f"  (saved {what}: {time.monotonic() - start:.2f}s)"
                    requests = s.stats.to_dict()["requests"]
                n = requests.get(USERS_DELTA if delta else USERS, 0)
                users = {
                    k: e for k, e in builder.graph().entities.items() if e["_type"] == USER.type
                }
                print(f"  {label:<38} {n:>4} requests  {len(users):>7,} users  {took:5.1f}s{saved}")
                return users

            print("users read (Graph requests per sync):")
            listed = read("full list (baseline)", delta=False)
            first = read("delta, first sync (full read)", delta=True)
            assert first == listed, "the delta read differs from the list"
            read("delta, quiet sync", delta=True)
            changed = _change(live, args.changed)
            after = read(f"delta, after {changed:,} users changed", delta=True)
            listed = read("full list after the same changes", delta=False)
            assert after == listed, "the delta read differs from the list"
            blob = client.get(store.key)
            start = time.monotonic()
            store.load()
            print(
                f"  stored state: {len(blob or b''):,} bytes (zlib), all users' selected fields;"
                f" loaded in {time.monotonic() - start:.2f}s"
            )
    finally:
        delete_prefix(client, prefix)


def _change(tenant: SimTenant, share: float) -> int:
    """Change `share` of the users: 80% a property, 10% disabled, 5% deleted, 5% added."""
    ids = sorted(tenant.users)
    n = max(1, int(len(ids) * share))
    picked = ids[:: max(1, len(ids) // n)][:n]
    for i, uid in enumerate(picked):
        kind = i % 20
        if kind < 16:
            tenant.set_user(uid, jobTitle=f"Benchmark title {i}")
        elif kind < 18:
            tenant.set_user(uid, accountEnabled=False)
        elif kind < 19:
            tenant.remove_user(uid)
        else:
            tenant.add_user()
    return n


if __name__ == "__main__":
    main()
