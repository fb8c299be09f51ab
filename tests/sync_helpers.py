"""Helpers for the sync tests over the simulator: its config with fast retries, for one test."""

from __future__ import annotations

from typing import Any

import yaml

from monitor.config import Settings, parse_settings
from monitor.simulator import Simulator

FAST_HTTP = {
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "max_retry_seconds": 5,
    "max_attempts": 3,
    "timeout_seconds": 1.5,
}


def sim_settings(sim: Simulator, redis_prefix: str, **tenant: Any) -> Settings:
    """The simulator's config with FAST_HTTP and this test's Redis prefix; `tenant` sets fields
    of its first tenant (e.g. logon_user_budget)."""
    data = yaml.safe_load(sim.config_yaml())
    data.update(http=FAST_HTTP, redis_prefix=redis_prefix)
    data["tenants"][0].update(tenant)
    return parse_settings(data, "test")
