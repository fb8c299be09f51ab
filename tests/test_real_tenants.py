"""What real Microsoft tenants do (issue 8, issue 10 item 7), played by the simulator over HTTPS
through the real sync path: simulator -> collect -> model -> snapshot -> events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from monitor.cli.app import ExitCode
from monitor.collect.check import check_tenant
from monitor.collect.logon_users import RefreshLedger
from monitor.config import Settings, parse_settings
from monitor.events.stream import read_range
from monitor.simulator import Fault, SimTenant, Simulator, generate_tenant
from monitor.snapshot.store import SnapshotStore
from monitor.sync import SyncSummary, run_sync

FAST_HTTP = {
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "max_retry_seconds": 5,
    "max_attempts": 3,
    "timeout_seconds": 2,
}
MACHINES = "defender:/api/machines"
PAIRS = "defender:/api/vulnerabilities/machinesVulnerabilities"
CATALOGUE = "defender:/api/vulnerabilities"
LOGON = "defender:/api/machines/{id}/logonusers"
GOV_RESOURCE = "https://securitycenter.onmicrosoft.us/windowsatpservice"


class World:
    """One simulated tenant, its config, and helpers to sync and read what the sync wrote."""

    def __init__(self, sim: Simulator, tenant: SimTenant, prefix: str, client: redis.Redis):
        self.sim, self.t, self.prefix, self.client = sim, tenant, prefix, client
        self.tenant_overrides: dict[str, Any] = {}
        self.detect: dict[str, Any] = {}

    def settings(self) -> Settings:
        data = yaml.safe_load(self.sim.config_yaml())
        data["http"] = FAST_HTTP
        data["redis_prefix"] = self.prefix
        data["detect"] = self.detect
        data["tenants"][0].update(self.tenant_overrides)
        return parse_settings(data, "test")

    def sync(self) -> SyncSummary:
        settings = self.settings()
        return run_sync(settings, settings.tenants[0].name, redis_client=self.client)

    def events(self, generation: int | None) -> list[dict[str, Any]]:
        return [
            ev
            for _, ev in read_range(self.client, self.prefix, "sim")
            if ev["data"].get("generation") == generation
        ]

    def types(self, generation: int | None) -> list[str]:
        return sorted(e["type"] for e in self.events(generation))

    def meta(self) -> dict[str, Any]:
        meta = SnapshotStore(self.client, self.prefix).meta("sim")
        assert meta is not None
        return meta

    def distinct_pair_cves(self) -> set[str]:
        return {
            c for mid, cves in self.t.machine_vulns.items() if mid in self.t.machines for c in cves
        }


@pytest.fixture
def world(tmp_path: Path, redis_prefix: str, redis_client: redis.Redis) -> Iterator[World]:
    tenant = generate_tenant(
        machines=20, users=12, vulns_per_machine=3, cves=30, logon_users_per_machine=1, seed=11
    )
    for m in tenant.machines.values():
        m["onboardingStatus"] = "Onboarded"
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        yield World(sim, sim.tenant(tenant.tenant_id), redis_prefix, redis_client)


# ---- 1. paging ---------------------------------------------------------------------------------


def test_every_defender_list_follows_same_host_next_links(world: World) -> None:
    # pages of 7 items with a nextLink: 20 machines, 60 pairs (+products), the whole catalogue
    world.t.set_behaviour(defender_page_size=7, catalogue_extra=40)
    first = world.sync()
    assert first.status == "ok", first.scopes_incomplete
    assert first.counts["microsoft_defender_machine"] == 20
    assert first.counts["microsoft_defender_vulnerability"] == len(world.distinct_pair_cves())
    assert first.counts["microsoft_defender_machine_identified_vulnerability"] == 60
    req = first.requests["requests"]
    assert req[MACHINES] == 3 and req[CATALOGUE] == -(-(30 + 40) // 7)
    # a server that cuts pages below $top WITHOUT a link: the confirming request finds the rest
    world.t.set_behaviour(defender_next_link=False)
    second = world.sync()
    assert second.status == "ok" and second.events == {}  # nothing lost, nothing "resolved"
    assert second.counts == first.counts


def test_a_next_link_to_another_host_is_an_error_not_followed(world: World) -> None:
    assert world.sync().status == "ok"
    world.t.set_behaviour(defender_page_size=7, next_link_origin="https://127.0.0.2:1")
    second = world.sync()
    assert second.status == "degraded"
    assert "another host" in (second.scopes_incomplete["machines"] or "")
    assert "mde.machine.deleted" not in second.events  # the previous machines are kept


# ---- 2. the CVE catalogue ----------------------------------------------------------------------


def test_only_the_tenants_cves_are_kept_from_a_large_catalogue(world: World) -> None:
    world.t.set_behaviour(catalogue_extra=9_000)  # 2 pages of 8,000, almost all on no machine
    first = world.sync()
    assert first.status == "ok"
    on_machines = world.distinct_pair_cves()
    assert len(on_machines) < len(world.t.cves)  # some of the tenant's own CVEs are on none
    assert first.counts["microsoft_defender_vulnerability"] == len(on_machines)
    assert first.requests["requests"][CATALOGUE] == 2 + 1  # and the confirming request
    index = SnapshotStore(world.client, world.prefix).load_index("sim") or {}
    stored = index["vulnerabilities"]["microsoft_defender_vulnerability"]
    assert {k.split(":", 1)[1] for k in stored} == on_machines


# ---- 3. sign-in failures -----------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["login:/token", "login:/openid-configuration"])
def test_sign_in_5xx_is_retried_then_fails_the_sync_cleanly(world: World, endpoint: str) -> None:
    world.sim.add_fault(Fault(endpoint=endpoint, status=503, retry_after=None, times=1))
    assert world.sync().status == "ok"  # one transient 503: retried
    world.sim.add_fault(Fault(endpoint=endpoint, status=503, retry_after=None, times=None))
    failed = world.sync()
    assert failed.status == "failed" and failed.events == {"mde.sync.failed": 1}
    assert "sign-in endpoint unavailable" in (failed.error or "")
    assert "Traceback" not in (failed.error or "")
    evs = [e for e in world.events(failed.generation) if e["type"] == "mde.sync.failed"]
    assert len(evs) == 1 and evs[0]["data"]["stage"] == "auth"
    probes = check_tenant(world.settings(), world.settings().tenants[0])  # does not raise
    assert probes and all(p.ok is False and p.reason == "sign_in" for p in probes)


def test_a_sign_in_timeout_is_retried(world: World) -> None:
    world.sim.add_fault(Fault(endpoint="login:/token", kind="hang", seconds=4, times=1))
    summary = world.sync()
    assert summary.status == "ok"
    assert world.sim.counts()["login:/token"] >= 3  # the timed-out one, then a token per API


# ---- 4. token scopes per cloud -----------------------------------------------------------------


def test_defender_audience_problem_does_not_fail_graph(world: World) -> None:
    world.sim.defender_resource = GOV_RESOURCE  # like GCC High: the app ID URI is not the host
    first = world.sync()
    assert first.status == "degraded"
    assert first.counts["microsoft_defender_user"] == 12  # the Graph part was collected
    error = first.scopes_incomplete["machines"] or ""
    assert "AADSTS500011" in error and world.sim.defender_url in error  # names the scope
    probes = check_tenant(world.settings(), world.settings().tenants[0])
    failing = [p for p in probes if p.ok is False]
    assert [p.reason for p in failing] == ["sign_in"]
    assert f"{world.sim.defender_url}/.default" in failing[0].permission
    assert all(p.ok for p in probes if p.api == "Microsoft Graph")
    world.tenant_overrides = {"defender_scope": f"{GOV_RESOURCE}/.default"}
    second = world.sync()
    assert second.status == "ok" and second.counts["microsoft_defender_machine"] == 20


# ---- 5. 403 DisabledFeature / DisallowedOperation ----------------------------------------------


def test_feature_not_enabled_keeps_previous_data(world: World) -> None:
    assert world.sync().status == "ok"
    code = "DisabledFeature"
    message = "Tenant feature is not enabled"
    world.sim.add_fault(Fault(endpoint=PAIRS, status=403, code=code, message=message))
    second = world.sync()
    assert second.status == "degraded"
    error = second.scopes_incomplete["vulnerabilities"] or ""
    assert "not enabled/licensed" in error and message in error and code in error
    assert not any("resolved" in e or "deleted" in e for e in second.events)
    probes = {p.permission: p for p in check_tenant(world.settings(), world.settings().tenants[0])}
    vuln = probes["Vulnerability.Read.All"]
    assert vuln.ok is True  # /api/vulnerabilities itself answers
    code = "DisallowedOperation"
    world.sim.add_fault(Fault(endpoint=CATALOGUE, status=403, code=code, message=message))
    world.t.set_roles(["Organization.Read.All", "Directory.Read.All", "Vulnerability.Read.All"])
    probes = {p.permission: p for p in check_tenant(world.settings(), world.settings().tenants[0])}
    assert probes["Vulnerability.Read.All"].reason == "not_enabled"
    assert message in probes["Vulnerability.Read.All"].detail
    assert probes["Machine.Read.All"].reason == "permission"  # distinct from a missing role


# ---- 6. discovered devices, per-machine 404 ----------------------------------------------------


def test_logon_users_only_for_onboarded_machines_and_404_is_skipped(world: World) -> None:
    ids = list(world.t.machines)
    discovered = ids[:3]
    statuses = ("CanBeOnboarded", "Unsupported", "InsufficientInfo")
    for mid, status in zip(discovered, statuses, strict=True):
        world.t.set_machine(mid, onboardingStatus=status)
    transient, gone = ids[3], ids[4]
    world.sim.add_fault(
        Fault(endpoint=LOGON, status=404, code="ResourceNotFound", machine_id=transient, times=1)
    )
    world.sim.add_fault(Fault(endpoint=LOGON, status=404, code="ResourceNotFound", machine_id=gone))
    first = world.sync()
    assert first.status == "ok", first.scopes_incomplete  # a 404 machine does not degrade
    counts = world.sim.counts()
    assert counts[LOGON] == 17 - 2 + 2 + 2  # onboarded ones, the two 404 machines asked twice
    ledger = RefreshLedger(world.client, world.prefix, "sim")
    assert ledger.not_found() == {gone}
    meta = world.meta()
    assert meta["logon_users"]["not_found"] == 1 and meta["logon_users"]["refreshed"] == 16
    # the 404 machine went to the back of the rotation: a new machine (never fetched) comes first,
    # and with a budget of one the 404 machine is not asked again (before, a machine that never
    # answered stayed "never fetched" and took the budget every sync)
    world.tenant_overrides = {"logon_user_budget": 1}
    world.sim.reset_counts()
    world.sim.clear_faults()
    new = world.t.add_machine({**world.t.machines[ids[5]], "id": "f" * 40})
    second = world.sync()
    assert second.status == "ok"
    assert world.sim.counts()[LOGON] == 1
    assert ledger.not_found() == {gone}
    assert new["id"] in RefreshLedger(world.client, world.prefix, "sim").load()


# ---- 7. 429 stops the batch --------------------------------------------------------------------


def test_a_429_during_logon_refresh_stops_the_batch_and_holds_the_budget(world: World) -> None:
    world.tenant_overrides = {"logon_user_concurrency": 1}
    world.sim.add_fault(Fault(endpoint=LOGON, status=429, retry_after=30))
    first = world.sync()
    assert world.sim.counts()[LOGON] == 1  # the rest of the batch was not fired
    assert first.status == "degraded"
    assert any("429" in (e or "") for e in first.scopes_incomplete.values())
    meta = world.meta()
    assert meta["logon_users"]["failed"] == 0 and meta["logon_users"]["throttled"] is True
    ttl = world.client.pttl(f"{world.prefix}:budget:sim:{LOGON}:blocked")
    assert isinstance(ttl, int) and 20_000 < ttl <= 30_000  # Retry-After shared with every worker


# ---- 9. empty tenants --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        {"code": "NotFound"},
        {"code": "ResourceNotFound"},
        {"body": "none"},
    ],
)
def test_no_machines_404_in_every_shape_is_an_empty_list(
    tmp_path: Path, redis_prefix: str, redis_client: redis.Redis, fault: dict[str, Any]
) -> None:
    tenant = generate_tenant(machines=0, users=3, vulns_per_machine=0, cves=1, seed=4)
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        sim.add_fault(Fault(endpoint=MACHINES, status=404, **fault))
        w = World(sim, sim.tenant(tenant.tenant_id), redis_prefix, redis_client)
        summary = w.sync()
        assert summary.status == "ok", summary.scopes_incomplete
        assert summary.counts.get("microsoft_defender_machine", 0) == 0
        assert w.meta()["scopes"]["machines"]["state"] == "complete"


# ---- 11. support details -----------------------------------------------------------------------


def test_errors_keep_defender_target_and_graph_request_id(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.sim.add_fault(Fault(endpoint=MACHINES, status=500))
    world.sim.add_fault(Fault(endpoint="graph:/users/delta", status=500))
    with caplog.at_level("INFO", logger="monitor.collect.http"):
        summary = world.sync()
    assert "(target " in (summary.scopes_incomplete["machines"] or "")
    users_error = summary.scopes_incomplete["users"] or ""
    assert "request-id " in users_error and "date " in users_error
    logged = [r for r in caplog.records if r.getMessage() == "api error"]
    assert any("request-id" in str(getattr(r, "support", "")) for r in logged)
    assert any("target" in str(getattr(r, "support", "")) for r in logged)


# ---- issue 10 item 7: short lists ---------------------------------------------------------------


@pytest.mark.parametrize(("key", "scope"), [("graph:/users", "users"), (MACHINES, "machines")])
def test_a_list_shorter_than_its_count_degrades(world: World, key: str, scope: str) -> None:
    if key == "graph:/users":  # the user list (users by delta carry no @odata.count)
        world.tenant_overrides["users_delta"] = False
    world.t.set_behaviour(odata_count=True)
    assert world.sync().status == "ok"
    world.t.set_behaviour(short_lists={key: 3})  # the last 3 missing, no nextLink
    second = world.sync()
    assert second.status == "degraded"
    assert "short list" in (second.scopes_incomplete[scope] or "")
    assert not any(t.endswith(".deleted") for t in second.events)


def test_an_empty_catalogue_while_pairs_name_cves_degrades(world: World) -> None:
    assert world.sync().status == "ok"
    world.t.set_behaviour(short_lists={CATALOGUE: 10_000})  # the catalogue comes back empty
    second = world.sync()
    assert second.status == "degraded"
    assert "catalogue lacks" in (second.scopes_incomplete["vulnerabilities"] or "")
    assert second.events == {"mde.sync.degraded": 1}  # no field nulled, nothing resolved


def test_pairs_shorter_than_the_catalogues_exposure_degrade(world: World) -> None:
    assert world.sync().status == "ok"
    world.t.set_behaviour(short_lists={PAIRS: 40})  # most pairs missing, no link, no count
    second = world.sync()
    assert second.status == "degraded"
    assert "exposedMachines" in (second.scopes_incomplete["vulnerabilities"] or "")
    assert not any("resolved" in t or "deleted" in t for t in second.events)


def test_a_held_drop_applied_after_persisting_says_so(world: World) -> None:
    world.detect = {"drop_persist_syncs": 2, "drop_min_items": 1, "drop_threshold": 0.5}
    assert world.sync().status == "ok"
    for mid in list(world.t.machines)[:15]:
        world.t.remove_machine(mid)
    held = world.sync()
    assert held.status == "degraded" and "mde.sync.suspicious_drop" in held.events
    applied = world.sync()
    assert applied.events.get("mde.sync.drop_applied", 0) >= 1
    assert applied.events.get("mde.machine.deleted") == 15
    ev = next(
        e
        for e in world.events(applied.generation)
        if e["type"] == "mde.sync.drop_applied"
        and e["data"]["entityType"] == "microsoft_defender_machine"
    )
    assert ev["data"]["reason"] == "persisted" and ev["data"]["held"] is False
    assert ev["data"]["deleted"] == 15 and ev["data"]["heldSyncs"] == 2


# ---- the CLI: exit codes of a sign-in failure --------------------------------------------------


def _cli(world: World, redis_url: str, *args: str) -> Any:
    """The mde-monitor command in this process (typer's runner), on this world's config."""
    from typer.testing import CliRunner

    from monitor.cli.app import app

    config = world.sim.state_dir / "monitor.yaml"
    data = yaml.safe_load(world.sim.config_yaml())
    data.update({"http": FAST_HTTP, "redis_prefix": world.prefix, "redis_url": redis_url})
    data["alerts_dir"] = str(world.sim.state_dir / "no-alerts")  # alerting is not under test
    config.write_text(yaml.safe_dump(data))
    return CliRunner().invoke(app, ["--config", str(config), *args])


def test_cli_exit_codes_of_sign_in_failures_and_unlicensed_features(
    world: World, redis_url: str
) -> None:
    world.sim.add_fault(Fault(endpoint="login:/token", status=500, retry_after=None))
    done = _cli(world, redis_url, "sync", "--tenant", "sim", "--json")
    assert done.exit_code == ExitCode.FAILED, done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)  # no traceback
    summary = json.loads(done.stdout)
    assert summary["status"] == "failed" and summary["events"] == {"mde.sync.failed": 1}
    checked = _cli(world, redis_url, "check", "--json")
    assert checked.exit_code == ExitCode.MISSING_PERMISSION, checked.output
    rows = json.loads(checked.stdout)["tenants"]["sim"]
    assert rows and all(r["reason"] == "sign_in" and "/.default" in r["permission"] for r in rows)
    # granted, but not licensed: shown apart from a missing permission, exit 3 not 5
    world.sim.clear_faults()
    world.sim.add_fault(Fault(endpoint=CATALOGUE, status=403, code="DisabledFeature"))
    checked = _cli(world, redis_url, "check")
    assert checked.exit_code == ExitCode.DEGRADED, checked.output
    assert "not enabled/licensed" in checked.stdout


# ---- config: regions and clouds ----------------------------------------------------------------


def _tenant(**extra: Any) -> Any:
    base = {"name": "t", "tenant_id": "x", "client_id": "y", "client_secret": "s", **extra}
    return parse_settings({"tenants": [base]}, "test").tenants[0]


@pytest.mark.parametrize("region", ["swa", "ina"])
def test_regions_swa_and_ina(region: str) -> None:
    ep = _tenant(region=region).cloud_endpoints()
    assert ep.defender.base_url == f"https://{region}.api.security.microsoft.com"


def test_government_defender_scopes_and_the_override() -> None:
    gov = "https://securitycenter.onmicrosoft.us/windowsatpservice/.default"
    assert _tenant(cloud="gcc-high").cloud_endpoints().defender.scope == gov
    assert _tenant(cloud="dod").cloud_endpoints().defender.scope == gov
    gcc = _tenant(cloud="gcc").cloud_endpoints()
    assert gcc.defender.base_url == "https://api-gcc.securitycenter.microsoft.us"
    assert gcc.defender.scope.endswith("/windowsatpservice/.default")
    own = "https://example.invalid/windowsatpservice/.default"
    assert _tenant(cloud="gcc-high", defender_scope=own).cloud_endpoints().defender.scope == own
    from monitor.config import ConfigError

    with pytest.raises(ConfigError, match=r"defender_scope.*/\.default"):
        _tenant(defender_scope="https://securitycenter.onmicrosoft.us/windowsatpservice")


def test_a_404_after_the_first_page_is_an_error_not_an_empty_list(world: World) -> None:
    assert world.sync().status == "ok"
    world.t.set_behaviour(defender_page_size=7)
    world.sim.add_fault(Fault(endpoint=MACHINES, status=404, code="NotFound", after=1, times=1))
    second = world.sync()
    assert second.status == "degraded"
    assert "HTTP 404 NotFound" in (second.scopes_incomplete["machines"] or "")
    assert "mde.machine.deleted" not in second.events
