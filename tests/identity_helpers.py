"""Helpers for the identity tests: a generated tenant behind the simulator, syncs, their events."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from monitor.config import Settings, parse_settings
from monitor.events.stream import read_range
from monitor.simulator import SimTenant, Simulator, generate_tenant
from monitor.sync import SyncSummary, run_sync

FAST_HTTP = {
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "max_retry_seconds": 3,
    "max_attempts": 2,
    "timeout_seconds": 5,
}


@dataclass
class Env:
    sim: Simulator
    tenant: SimTenant  # the simulator's live tenant
    settings: Settings
    client: redis.Redis
    prefix: str
    seen: int = 0
    syncs: list[SyncSummary] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.settings.tenants[0].name

    def sync(self, lane: str = "full") -> tuple[SyncSummary, list[dict[str, Any]]]:
        """One sync (of `lane`); (summary, the events it appended)."""
        summary = run_sync(self.settings, self.name, redis_client=self.client, lane=lane)
        events = [ev for _, ev in read_range(self.client, self.prefix, self.name)]
        new, self.seen = events[self.seen :], len(events)
        self.syncs.append(summary)
        return summary, new

    def graph_requests(self, endpoint: str) -> int:
        return int(self.syncs[-1].requests["requests"].get(endpoint, 0))


@contextmanager
def identity_env(
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
    *,
    identity: dict[str, Any] | None = None,
    tenant_options: dict[str, Any] | None = None,
    **generate: Any,
) -> Iterator[Env]:
    args: dict[str, Any] = {
        "machines": 6,
        "users": 60,
        "vulns_per_machine": 2,
        "cves": 10,
        "logon_users_per_machine": 2,
        "seed": 13,
    }
    args.update(generate)
    tenant = generate_tenant(**args)
    with Simulator(tenants=[tenant], state_dir=tmp_path / "sim") as sim:
        data = sim.config_dict(
            extra={"redis_url": redis_url, "redis_prefix": redis_prefix, "http": FAST_HTTP}
        )
        if identity is not None:
            data["tenants"][0]["identity"] = identity
        data["tenants"][0].update(tenant_options or {})
        settings = parse_settings(data, "test config")
        client = redis.Redis.from_url(redis_url)
        yield Env(sim, sim.tenant(tenant.tenant_id), settings, client, redis_prefix)


def of_type(events: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_]
