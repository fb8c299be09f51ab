"""Collect against the simulator over real HTTPS: counts, paging edges, retries, auth, permissions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from monitor.collect.check import check_tenant
from monitor.collect.collector import collect_tenant, open_session
from monitor.collect.defender_api import MACHINES
from monitor.collect.errors import ApiError
from monitor.collect.graph_api import ORGANIZATION
from monitor.collect.logon_users import RefreshLedger
from monitor.config import Settings, parse_settings
from monitor.model.graph import ScopeState
from monitor.simulator import Fault, Simulator, generate_tenant, load_recorded_tenant

FAST_HTTP = {
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "max_retry_seconds": 10,
    "max_attempts": 4,
    "timeout_seconds": 2,
}


def settings_for(
    sim: Simulator, tenant_overrides: dict[str, Any] | None = None, **http: Any
) -> Settings:
    data = yaml.safe_load(sim.config_yaml())
    data["http"] = {**FAST_HTTP, **http}
    for t in data["tenants"]:
        t.update(tenant_overrides or {})
    return parse_settings(data, "test-config")


@pytest.fixture(scope="module")
def recorded_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    with Simulator(
        tenants=[load_recorded_tenant()], state_dir=tmp_path_factory.mktemp("sim")
    ) as sim:
        yield sim


@pytest.fixture
def sim(recorded_sim: Simulator) -> Iterator[Simulator]:
    recorded_sim.clear_faults()
    recorded_sim.reset_counts()
    yield recorded_sim
    recorded_sim.clear_faults()


def test_recorded_tenant_builds_the_seed_graph(sim: Simulator) -> None:
    settings = settings_for(sim)
    result = collect_tenant(settings, settings.tenants[0])
    assert result.graph is not None and result.auth_error is None
    counts = result.graph.count_by_type()
    assert counts == {
        "microsoft_defender_account": 1,
        "microsoft_defender_account_has_machine": 9,
        "microsoft_defender_account_has_user": 38,
        "microsoft_defender_machine": 9,
        "microsoft_defender_machine_identified_vulnerability": 51,
        "microsoft_defender_machine_manages_user_endpoint": 9,
        "microsoft_defender_user": 38,
        "microsoft_defender_vulnerability": 51,
        "microsoft_defender_vulnerability_is_cve": 51,
        "user_endpoint": 9,
    }
    assert all(st.state is ScopeState.COMPLETE for st in result.graph.scopes.values())
    # One bulk call per Defender list plus the request confirming its short last page, one per
    # machine for logon users, nothing else.
    req = result.stats.requests
    assert req["defender:/api/machines"] == 2
    assert req["defender:/api/vulnerabilities/machinesVulnerabilities"] == 2
    assert req["defender:/api/vulnerabilities"] == 2
    assert req["defender:/api/machines/{id}/logonusers"] == 9
    assert req["graph:/users"] == 1 and req["graph:/organization"] == 1
    assert "defender:/api/machines/{id}/vulnerabilities" not in req
    assert result.stats.to_dict()["retries_total"] == 0


def test_property_values_follow_the_recorded_data(sim: Simulator) -> None:
    settings = settings_for(sim, {"tag_with_account_name": True})
    graph = collect_tenant(settings, settings.tenants[0]).graph
    assert graph is not None
    machine = graph.entities["microsoft_defender_machine:241056b69203a660e7521c8c3bfc2476f8cf2ae0"]
    assert machine["healthStatus"] == "Inactive"
    assert machine["riskScore"] == "None"
    assert "127.0.0.1" not in machine["ipAddress"] and "::1" not in machine["ipAddress"]
    assert "10.6.0.6" in machine["ipAddress"]
    assert machine["tag.AccountName"] == settings.tenants[0].name
    vuln = graph.entities["microsoft_defender_vulnerability:CVE-2023-5517"]
    assert vuln["severity"] == "High" and vuln["score"] == 7.5 and vuln["public"] is False
    mapped = [r for r in graph.relationships.values() if "_mapping" in r]
    assert {r["_mapping"]["targetEntity"]["_key"] for r in mapped} >= {"cve-2023-5517"}
    users = [e for e in graph.entities.values() if e["_type"] == "microsoft_defender_user"]
    assert all(u["active"] is True for u in users)  # accountEnabled, not hard-coded


@pytest.mark.parametrize(("machines", "expected_calls"), [(10_000, 2), (10_001, 3), (9_999, 2)])
def test_machine_paging_edges(tmp_path: Path, machines: int, expected_calls: int) -> None:
    tenant = generate_tenant(machines=machines, users=1, vulns_per_machine=0, cves=1, seed=7)
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        settings = settings_for(sim)
        with open_session(settings, settings.tenants[0]) as s:
            pages = list(s.defender.iter_machine_pages())
            ids = [m["id"] for page in pages for m in page]
            assert len(ids) == machines == len(set(ids))
            assert s.stats.requests[MACHINES] == expected_calls


def test_graph_pages_shorter_than_top_with_next_link(tmp_path: Path) -> None:
    tenant = generate_tenant(machines=1, users=2_500, vulns_per_machine=0, cves=1, seed=3)
    with Simulator(tenants=[tenant], state_dir=tmp_path, graph_short_pages=True) as sim:
        settings = settings_for(sim)
        with open_session(settings, settings.tenants[0]) as s:
            pages = list(s.graph.iter_user_pages())
        assert sum(len(p) for p in pages) == 2_500
        assert any(0 < len(p) < 999 for p in pages[:-1])  # short page that still had a nextLink
        assert len({u["id"] for p in pages for u in p}) == 2_500


def test_429_honours_retry_after(sim: Simulator) -> None:
    sim.add_fault(Fault(endpoint=ORGANIZATION, kind="status", status=429, retry_after=7, times=1))
    waits: list[float] = []
    settings = settings_for(sim)
    with open_session(settings, settings.tenants[0], sleep=waits.append) as s:
        org = s.graph.organization()
    assert org["id"]
    assert waits == [7.0]
    assert s.stats.throttled[ORGANIZATION] == 1 and s.stats.retries[ORGANIZATION] == 1


def test_5xx_then_success(sim: Simulator) -> None:
    sim.add_fault(Fault(endpoint=MACHINES, kind="status", status=503, times=2))
    settings = settings_for(sim)
    with open_session(settings, settings.tenants[0]) as s:
        machines = [m for page in s.defender.iter_machine_pages() for m in page]
    assert len(machines) == 9
    # two failed attempts, the page, and the request confirming that short page ended the list
    assert s.stats.retries[MACHINES] == 2 and s.stats.requests[MACHINES] == 4


def test_5xx_forever_fails_only_that_resource(sim: Simulator) -> None:
    sim.add_fault(Fault(endpoint=MACHINES, kind="status", status=503, times=None))
    settings = settings_for(sim)
    result = collect_tenant(settings, settings.tenants[0])
    assert result.graph is not None
    machines = result.graph.scopes["machines"]
    assert machines.state is ScopeState.FAILED
    assert (
        machines.error is not None
        and "defender:/api/machines" in machines.error
        and "503" in machines.error
    )
    assert result.graph.scopes["users"].state is ScopeState.COMPLETE
    assert not any(
        k.startswith("logon_users:") for k in result.graph.scopes
    )  # unknown machines: untouched
    assert result.stats.requests[MACHINES] == FAST_HTTP["max_attempts"]


@pytest.mark.parametrize("kind", ["malformed", "truncated"])
def test_bad_pages_fail_the_resource(sim: Simulator, kind: str) -> None:
    sim.add_fault(
        Fault(
            endpoint="defender:/api/vulnerabilities/machinesVulnerabilities", kind=kind, times=None
        )
    )
    settings = settings_for(sim)
    graph = collect_tenant(settings, settings.tenants[0]).graph
    assert graph is not None
    status = graph.scopes["vulnerabilities"]
    assert status.state is ScopeState.FAILED
    assert status.error is not None and "machinesVulnerabilities" in status.error


def test_hang_past_timeout_fails_the_resource(sim: Simulator) -> None:
    sim.add_fault(Fault(endpoint="graph:/users", kind="hang", seconds=3, times=None))
    settings = settings_for(sim, timeout_seconds=0.5, max_attempts=2)
    graph = collect_tenant(settings, settings.tenants[0]).graph
    assert graph is not None
    assert graph.scopes["users"].state is ScopeState.FAILED
    assert "timed out" in (graph.scopes["users"].error or "")


def test_token_expiry_mid_sync_refreshes_once(sim: Simulator) -> None:
    settings = settings_for(sim)
    with open_session(settings, settings.tenants[0]) as s:
        s.graph.organization()
        logins = sim.counts().get("login:/token", 0)
        sim.expire_tokens()
        s.graph.organization()  # 401 -> new token -> success
        assert sim.counts().get("login:/token", 0) == logins + 1


def test_wrong_audience_is_rejected(sim: Simulator) -> None:
    settings = settings_for(sim)
    with open_session(settings, settings.tenants[0]) as s:
        graph_scope = settings.tenants[0].cloud_endpoints().graph.scope
        s.defender.api.scope = graph_scope  # a Graph token sent to Defender
        with pytest.raises(ApiError) as err:
            s.defender.api.get_json(MACHINES, "/api/machines", permission="Machine.Read.All")
    assert err.value.status == 401


def test_wrong_secret_is_explained(sim: Simulator) -> None:
    settings = settings_for(sim, {"client_secret": "not-the-secret"})
    result = collect_tenant(settings, settings.tenants[0])
    assert result.graph is None and result.auth_error is not None
    assert result.auth_error.code == "AADSTS7000215"
    assert "not-the-secret" not in str(result.auth_error)
    assert "secret" in str(result.auth_error)


def test_unknown_tenant_is_explained(sim: Simulator) -> None:
    settings = settings_for(sim, {"tenant_id": "abc123testing"})
    result = collect_tenant(settings, settings.tenants[0])
    assert result.auth_error is not None and result.auth_error.code == "AADSTS900023"


def test_certificate_credentials(tmp_path: Path) -> None:
    tenant = generate_tenant(machines=3, users=4, vulns_per_machine=2, cves=5, seed=11)
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        pem_path, thumbprint = sim.tenant(tenant.tenant_id).add_certificate()
        data = yaml.safe_load(sim.config_yaml())
        data["http"] = FAST_HTTP
        t = data["tenants"][0]
        t.pop("client_secret", None)
        t["certificate"] = {"pem_path": str(pem_path), "thumbprint": thumbprint}
        settings = parse_settings(data, "test")
        result = collect_tenant(settings, settings.tenants[0])
        assert result.auth_error is None and result.graph is not None
        assert result.graph.count_by_type()["microsoft_defender_machine"] == 3


def test_missing_permission_names_it(tmp_path: Path) -> None:
    tenant = generate_tenant(machines=2, users=2, vulns_per_machine=1, cves=2, seed=5)
    tenant.roles.discard("Vulnerability.Read.All")
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        settings = settings_for(sim)
        graph = collect_tenant(settings, settings.tenants[0]).graph
        assert graph is not None
        assert graph.scopes["vulnerabilities"].state is ScopeState.FAILED
        assert "Vulnerability.Read.All" in (graph.scopes["vulnerabilities"].error or "")
        probes = {p.permission: p for p in check_tenant(settings, settings.tenants[0])}
        assert probes["Vulnerability.Read.All"].ok is False
        assert "403" in probes["Vulnerability.Read.All"].detail
        assert all(
            probes[p].ok
            for p in (
                "Organization.Read.All",
                "Directory.Read.All",
                "Machine.Read.All",
                "User.Read.All",
            )
        )


def test_tenant_without_machines_is_empty_not_failed(tmp_path: Path) -> None:
    tenant = generate_tenant(machines=0, users=2, vulns_per_machine=0, cves=1, seed=2)
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        settings = settings_for(sim)
        graph = collect_tenant(settings, settings.tenants[0]).graph
        assert graph is not None
        assert graph.scopes["machines"].state is ScopeState.COMPLETE
        assert graph.scopes["machines"].count == 0


def test_logon_user_budget_rotates_through_machines(
    tmp_path: Path, redis_client: redis.Redis, redis_prefix: str
) -> None:
    tenant = generate_tenant(
        machines=12, users=2, vulns_per_machine=0, cves=1, logon_users_per_machine=2, seed=9
    )
    for m in tenant.machines.values():  # every one has logon users to rotate through
        m["onboardingStatus"] = "Onboarded"
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        data = yaml.safe_load(sim.config_yaml())
        data["http"] = FAST_HTTP
        data["redis_prefix"] = redis_prefix
        data["tenants"][0]["logon_user_budget"] = 5
        settings = parse_settings(data, "test")
        t = settings.tenants[0]
        first = collect_tenant(settings, t, redis_client=redis_client)
        assert first.logon is not None and len(first.logon.refreshed) == 5
        assert first.stats.requests["defender:/api/machines/{id}/logonusers"] == 5
        assert first.graph is not None
        states = [s.state for k, s in first.graph.scopes.items() if k.startswith("logon_users:")]
        assert states.count(ScopeState.COMPLETE) == 5 and states.count(ScopeState.SKIPPED) == 7
        RefreshLedger(redis_client, redis_prefix, t.name).record(first.logon.refreshed, [])
        second = collect_tenant(settings, t, redis_client=redis_client)
        assert second.logon is not None
        assert not set(second.logon.refreshed) & set(first.logon.refreshed)
        # a machine whose lastSeen moved jumps the queue
        moved = next(iter(first.logon.refreshed))
        RefreshLedger(redis_client, redis_prefix, t.name).record(second.logon.refreshed, [])
        sim.tenant(tenant.tenant_id).set_machine(moved, lastSeen="2030-01-01T00:00:00Z")
        third = collect_tenant(settings, t, redis_client=redis_client)
        assert third.logon is not None and moved in third.logon.refreshed


def test_pfx_certificate_credentials(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    tenant = generate_tenant(machines=2, users=2, vulns_per_machine=1, cves=2, seed=12)
    with Simulator(tenants=[tenant], state_dir=tmp_path) as sim:
        pem_path, _ = sim.tenant(tenant.tenant_id).add_certificate()
        pem = pem_path.read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
        cert = x509.load_pem_x509_certificate(pem)
        pfx = tmp_path / "client.pfx"
        pfx.write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"client",
                key,
                cert,
                None,  # type: ignore[arg-type]
                serialization.BestAvailableEncryption(b"pfx-pass"),
            )
        )
        data = yaml.safe_load(sim.config_yaml())
        data["http"] = FAST_HTTP
        t = data["tenants"][0]
        t.pop("client_secret", None)
        t["certificate"] = {"pfx_path": str(pfx), "pfx_password": "pfx-pass"}
        settings = parse_settings(data, "test")
        assert "pfx-pass" not in repr(settings)
        result = collect_tenant(settings, settings.tenants[0])
        assert result.auth_error is None, result.auth_error
        assert (
            result.graph is not None
            and result.graph.count_by_type()["microsoft_defender_machine"] == 2
        )
