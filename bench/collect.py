"""Collect benchmark: our bulk client vs the one-call-per-machine approach, on one generated tenant.

Prints requests per endpoint for our client (measured at the simulator) and for the
per-machine approach (computed from the same tenant), the time each would need under Microsoft's
documented rate limits, and our wall time and peak memory.

Then the same collect once more with Microsoft's CVE catalogue served in full (`--catalogue`
entries on no machine of the tenant, 250,000 by default): requests and peak RSS of both runs;
the catalogue may not grow the peak RSS by more than 10%. Each collect runs in its own process,
so each peak RSS is its own.

    .venv/bin/python bench/collect.py                  # 10,000 machines, 20,000 users, 300,000 pairs
    .venv/bin/python bench/collect.py --scale 0.1      # a tenth of that
    .venv/bin/python bench/collect.py --catalogue 0    # without the catalogue run
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import yaml

from monitor.collect.budget import ENDPOINT_LIMITS, Limit, UnmeteredBudget
from monitor.collect.collector import collect_tenant
from monitor.config import parse_settings

GRAPH_DEFAULT_PAGE = 100  # Graph's page size when no $top is given (what SDK defaults fetch)


def seconds_under_limit(calls: int, limit: Limit | None) -> float:
    """Least time to issue `calls` requests within a per-minute and per-hour sliding window."""
    if limit is None or calls <= 0:
        return 0.0
    times: list[float] = []
    for i in range(calls):
        t = 0.0
        if i >= limit.per_minute:
            t = max(t, times[i - limit.per_minute] + 60)
        if i >= limit.per_hour:
            t = max(t, times[i - limit.per_hour] + 3600)
        times.append(t)
    return times[-1]


def _serve(
    args: dict[str, Any], roles: tuple[str, ...], state_dir: str, ready: MpEvent, stop: MpEvent
) -> None:
    from monitor.simulator import Simulator, generate_tenant

    tenant = generate_tenant(**args)
    tenant.roles.update(roles)
    with Simulator(tenants=[tenant], state_dir=Path(state_dir)) as sim:
        sim.write_config(Path(state_dir) / "config.yaml")
        (Path(state_dir) / "admin_url").write_text(sim.admin_url)
        ready.set()
        stop.wait()


@contextmanager
def simulator_process(gen: dict[str, Any], roles: tuple[str, ...] = ()) -> Iterator[Path]:
    """A simulator serving `generate_tenant(**gen)` (granted `roles` too) in its own process, so
    the bench measures the client alone; yields its state dir (config.yaml, admin_url)."""
    with tempfile.TemporaryDirectory() as state_dir:
        ready, stop = mp.Event(), mp.Event()
        server = mp.Process(target=_serve, args=(gen, roles, state_dir, ready, stop), daemon=True)
        server.start()
        if not ready.wait(600):
            raise RuntimeError("simulator did not start")
        try:
            yield Path(state_dir)
        finally:
            stop.set()
            server.join(10)


def _collect(data: dict[str, Any], results: Any) -> None:
    """One collect in a fresh process: its stats, graph counts, wall time and peak RSS."""
    settings = parse_settings(data, "bench")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    # Pacing to Microsoft's limits is computed by the parent; the wall time is the client's own.
    result = collect_tenant(settings, settings.tenants[0], budget=UnmeteredBudget())
    wall = time.perf_counter() - t0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert result.graph is not None
    results.put(
        {
            "requests": dict(result.stats.requests),
            "counts": result.graph.count_by_type(),
            "scopes_failed": {
                k: v.error for k, v in result.graph.scopes.items() if v.state.value == "failed"
            },
            "wall": wall,
            "rss_before_kb": rss_before,
            "rss_after_kb": rss_after,
        }
    )


def _run_collect(data: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_collect, args=(data, results))
    child.start()
    out: dict[str, Any] = results.get(timeout=1800)
    child.join(60)
    return out


def _fmt_duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--logon-budget", type=int, default=500)
    p.add_argument(
        "--catalogue", type=int, default=250_000, help="CVEs on no machine (0: no such run)"
    )
    p.add_argument("--json", action="store_true")
    ns = p.parse_args()
    machines = int(10_000 * ns.scale)
    users = int(20_000 * ns.scale)
    cves = max(1, int(8_000 * ns.scale))
    gen = {
        "machines": machines,
        "users": users,
        "vulns_per_machine": 30,
        "cves": cves,
        "logon_users_per_machine": 2,
        "seed": 1,
    }

    with simulator_process(gen) as state_dir:
        from monitor.simulator import SimulatorAdminClient

        admin = SimulatorAdminClient((Path(state_dir) / "admin_url").read_text())
        data = yaml.safe_load((Path(state_dir) / "config.yaml").read_text())
        data["tenants"][0]["logon_user_budget"] = ns.logon_budget
        tenant_id = data["tenants"][0]["tenant_id"]
        admin.reset_counts()
        base = _run_collect(data)
        sim_counts = {k: v for k, v in admin.counts().items() if not k.startswith("login:")}
        with_catalogue: dict[str, Any] | None = None
        if ns.catalogue:
            admin.mutate(tenant_id, "set_behaviour", catalogue_extra=ns.catalogue)
            with_catalogue = _run_collect(data)
    wall = base["wall"]
    rss_before, rss_after = base["rss_before_kb"], base["rss_after_kb"]
    pairs = base["counts"].get("microsoft_defender_machine_identified_vulnerability", 0)

    ours = dict(base["requests"])
    naive = {
        "graph:/organization": 1,
        "graph:/users": math.ceil(users / GRAPH_DEFAULT_PAGE),
        "defender:/api/machines": max(1, math.ceil(machines / 10_000)),
        "defender:/api/machines/{id}/vulnerabilities": machines,
        "defender:/api/machines/{id}/logonusers": machines,
    }

    def limit_time(counts: dict[str, int]) -> float:
        # independent budgets per endpoint: the slowest endpoint bounds the sync
        return max(
            (seconds_under_limit(n, ENDPOINT_LIMITS.get(ep)) for ep, n in counts.items()),
            default=0.0,
        )

    full_logon_syncs = math.ceil(machines / max(1, ns.logon_budget))
    report = {
        "tenant": {
            "machines": machines,
            "users": users,
            "cves": cves,
            "machine_vulnerability_pairs": pairs,
        },
        "ours": {
            "requests": ours,
            "requests_total": sum(ours.values()),
            "seconds_under_rate_limits": limit_time(ours),
            "logon_users_full_refresh_syncs": full_logon_syncs,
        },
        "per_machine_approach": {
            "requests": naive,
            "requests_total": sum(naive.values()),
            "seconds_under_rate_limits": limit_time(naive),
        },
        "simulator_counted": sim_counts,
        "wall_seconds": round(wall, 2),
        "peak_rss_mb_delta": round((rss_after - rss_before) / 1024, 1),
        "peak_rss_mb": round(rss_after / 1024, 1),
    }
    catalogue_ok = True
    if with_catalogue is not None:
        growth = with_catalogue["rss_after_kb"] / max(1, rss_after) - 1
        catalogue_ok = growth <= 0.10 and not with_catalogue["scopes_failed"]
        report["catalogue"] = {
            "extra_cves": ns.catalogue,
            "requests": with_catalogue["requests"],
            "requests_total": sum(with_catalogue["requests"].values()),
            "vulnerabilities_kept": with_catalogue["counts"].get(
                "microsoft_defender_vulnerability", 0
            ),
            "vulnerabilities_without_catalogue": base["counts"].get(
                "microsoft_defender_vulnerability", 0
            ),
            "wall_seconds": round(with_catalogue["wall"], 2),
            "peak_rss_mb": round(with_catalogue["rss_after_kb"] / 1024, 1),
            "peak_rss_mb_without": round(rss_after / 1024, 1),
            "peak_rss_growth": round(growth, 4),
            "within_10_percent": catalogue_ok,
            "scopes_failed": with_catalogue["scopes_failed"],
        }
    if ns.json:
        print(json.dumps(report, indent=2))
        return 0 if catalogue_ok else 1
    print(
        f"tenant: {machines:,} machines, {users:,} users, {pairs:,} machine-CVE pairs, {cves:,} CVEs"
    )
    print(f"{'endpoint':<52}{'ours':>8}{'per-machine':>13}")
    for ep in sorted(set(ours) | set(naive)):
        print(f"{ep:<52}{ours.get(ep, 0):>8,}{naive.get(ep, 0):>13,}")
    print(f"{'total requests':<52}{sum(ours.values()):>8,}{sum(naive.values()):>13,}")
    print(
        f"{'time under documented rate limits':<52}{_fmt_duration(limit_time(ours)):>8}"
        f"{_fmt_duration(limit_time(naive)):>13}"
    )
    print(
        f"logon users: {ns.logon_budget} machines per sync; every machine refreshed within {full_logon_syncs} syncs"
    )
    print(
        f"our wall time (without rate-limit pacing) {wall:.1f} s, peak RSS {rss_after / 1024:.0f} MB (+{(rss_after - rss_before) / 1024:.0f} MB during collect)"
    )
    counted_ok = all(sim_counts.get(ep, 0) == n for ep, n in ours.items())
    print(f"simulator's own request counts agree with the client's: {counted_ok}")
    if with_catalogue is not None:
        c = report["catalogue"]
        print(
            f"with a {ns.catalogue:,}-CVE catalogue: {c['requests']['defender:/api/vulnerabilities']}"
            f" catalogue requests, {c['requests_total']:,} requests in all,"
            f" {c['vulnerabilities_kept']:,} vulnerabilities kept"
            f" ({c['vulnerabilities_without_catalogue']:,} without the catalogue),"
            f" wall {c['wall_seconds']:.1f} s"
        )
        print(
            f"peak RSS {c['peak_rss_mb']:.0f} MB with the catalogue vs {c['peak_rss_mb_without']:.0f}"
            f" MB without: {c['peak_rss_growth']:+.1%} (limit +10%):"
            f" {'ok' if catalogue_ok else 'EXCEEDED'}"
        )
    return 0 if catalogue_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
