"""The `mde-monitor` sync, check and export commands as real processes: output, exit codes, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from monitor.cli.app import ExitCode
from monitor.events.stream import read_range
from monitor.metrics import counter_key
from monitor.simulator import SimTenant, Simulator, generate_tenant, load_recorded_tenant
from monitor.snapshot.commit import CRASH_ENV
from monitor.snapshot.lock import TenantLock

FAST_HTTP = {
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "max_retry_seconds": 5,
    "max_attempts": 3,
    "timeout_seconds": 2,
}


def run_cli(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "MDE_MONITOR_CONFIG": str(config), **(env or {})}
    full_env.pop("REDIS_URL", None)  # the config names the Redis to use
    return subprocess.run(
        [sys.executable, "-c", "from monitor.cli import main; main()", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def recorded(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> Iterator[tuple[Simulator, SimTenant, Path]]:
    tenant = load_recorded_tenant()
    with Simulator(tenants=[tenant], state_dir=tmp_path / "sim") as sim:
        data = sim.config_dict(
            extra={"redis_url": redis_url, "redis_prefix": redis_prefix, "http": FAST_HTTP}
        )
        config = tmp_path / "monitor.yaml"
        config.write_text(yaml.safe_dump(data))
        yield sim, sim.tenant(tenant.tenant_id), config


def test_sync_json_summary_and_export(recorded: tuple[Simulator, SimTenant, Path]) -> None:
    _sim, tenant, config = recorded
    done = run_cli(config, "sync", "--tenant", "sim", "--json")
    assert done.returncode == ExitCode.OK, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "ok" and summary["baseline"] is True
    assert summary["counts"]["microsoft_defender_machine"] == 9
    assert (
        summary["requests"]["requests"]["defender:/api/vulnerabilities/machinesVulnerabilities"]
        == 2  # the page and the request confirming that short page ended the list
    )
    assert summary["events"] == {"mde.sync.baseline": 1}
    exported = run_cli(config, "export", "--tenant", "sim")
    assert exported.returncode == 0, exported.stderr
    graph = json.loads(exported.stdout)
    assert len(graph["entities"]) == 1 + 38 + 9 + 9 + 51
    assert len(graph["relationships"]) == 9 + 38 + 9 + 51
    assert len(graph["mappedRelationships"]) == 51
    # secrets and tokens never reach the output, even at DEBUG
    secret = tenant.client_secret
    debug = run_cli(config, "--log-level", "DEBUG", "sync", "--tenant", "sim")
    for text in (done.stdout, done.stderr, debug.stdout, debug.stderr, exported.stdout):
        assert secret not in text
        assert "Bearer " not in text and "eyJ" not in text


def test_human_summary_degraded_exit_code(recorded: tuple[Simulator, SimTenant, Path]) -> None:
    sim, _, config = recorded
    assert run_cli(config, "sync", "-t", "sim").returncode == 0
    from monitor.simulator import Fault

    sim.add_fault(Fault(endpoint="graph:/users/delta", kind="status", status=503, times=None))
    done = run_cli(config, "sync", "-t", "sim")
    assert done.returncode == ExitCode.DEGRADED
    assert "degraded" in done.stdout and "kept previous data for users" in done.stdout
    assert "graph:/users/delta" in done.stdout


def test_busy_tenant_exit_code(
    recorded: tuple[Simulator, SimTenant, Path], redis_client: redis.Redis, redis_prefix: str
) -> None:
    _, _, config = recorded
    first = run_cli(config, "sync", "-t", "sim")  # an identity lane waits for a full sync
    assert first.returncode == 0, first.stdout + first.stderr
    with TenantLock(redis_client, redis_prefix, "sim", ttl_seconds=60):
        done = run_cli(config, "sync", "-t", "sim")
        lane = run_cli(config, "sync", "-t", "sim", "--lane", "identity", "--json")
    assert done.returncode == ExitCode.BUSY
    assert "busy" in done.stderr
    assert lane.returncode == ExitCode.BUSY and json.loads(lane.stdout)["lane"] == "identity"
    syncs = redis_client.hgetall(counter_key(redis_prefix, "syncs"))
    assert syncs == {
        b'["sim","ok","full"]': b"1",
        b'["sim","busy","full"]': b"1",
        b'["sim","busy","identity"]': b"1",  # counted in its lane
    }


def test_check_prints_each_permission(recorded: tuple[Simulator, SimTenant, Path]) -> None:
    _, tenant, config = recorded
    ok = run_cli(config, "check", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    probes = json.loads(ok.stdout)["tenants"]["sim"]
    assert [p["permission"] for p in probes] == [
        "Organization.Read.All",
        "Directory.Read.All",
        "Machine.Read.All",
        "User.Read.All",
        "Vulnerability.Read.All",
    ]
    assert all(p["ok"] for p in probes)
    tenant.set_roles([r for r in tenant.roles if r != "Machine.Read.All"])
    missing = run_cli(config, "check")
    assert missing.returncode == ExitCode.MISSING_PERMISSION
    assert "Machine.Read.All" in missing.stdout and "403" in missing.stdout


def test_check_explains_a_wrong_secret(recorded: tuple[Simulator, SimTenant, Path]) -> None:
    _, tenant, config = recorded
    tenant.set_client_secret("rotated")
    done = run_cli(config, "check")
    assert done.returncode == ExitCode.MISSING_PERMISSION
    assert "AADSTS7000215" in done.stdout


def test_config_error_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "tenants:\n  - {name: a, tenant_id: t, client_id: c, client_secret: x, polling_interval: HOURLY}\n"
    )
    done = run_cli(bad, "sync", "-t", "a")
    assert done.returncode == ExitCode.USAGE
    assert str(bad) in done.stderr and "tenants[0].polling_interval" in done.stderr


@pytest.mark.parametrize("point", ["after_diff", "mid_queue", "before_exec"])
def test_killed_sync_loses_and_duplicates_nothing(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis, point: str
) -> None:
    tenant = generate_tenant(
        machines=15, users=5, vulns_per_machine=2, cves=10, logon_users_per_machine=1, seed=21
    )
    with Simulator(tenants=[tenant], state_dir=tmp_path / "sim") as sim:
        data = sim.config_dict(
            extra={"redis_url": redis_url, "redis_prefix": redis_prefix, "http": FAST_HTTP}
        )
        config = tmp_path / "monitor.yaml"
        config.write_text(yaml.safe_dump(data))
        t = sim.tenant(tenant.tenant_id)
        assert run_cli(config, "sync", "-t", "sim").returncode == 0
        changed = list(t.machines)[:4]
        for mid in changed:
            t.set_machine(
                mid,
                healthStatus="Inactive"
                if t.machines[mid]["healthStatus"] != "Inactive"
                else "Active",
            )
        crashed = run_cli(config, "sync", "-t", "sim", env={CRASH_ENV: point})
        assert crashed.returncode == -signal.SIGKILL
        # the lock of the killed process is still held until its TTL: the operator would wait;
        # the test removes it to go on (the fencing check makes that safe).
        for key in redis_client.scan_iter(match=f"{redis_prefix}:lock:*"):
            redis_client.delete(key)
        assert run_cli(config, "sync", "-t", "sim").returncode == 0
        assert run_cli(config, "sync", "-t", "sim").returncode == 0
    events = [ev for _, ev in read_range(redis_client, redis_prefix, "sim")]
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids))
    updated = sorted(e["subject"] for e in events if e["type"] == "mde.machine.updated")
    assert updated == sorted(f"microsoft_defender_machine:{m}" for m in changed)
