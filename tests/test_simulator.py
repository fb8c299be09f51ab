"""The Microsoft cloud simulator over real HTTPS: tokens, Graph, Defender, faults, admin API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msal
import orjson
import pytest
import yaml
from simulator_helpers import get, token, token_response

from monitor.auth import MsalHttpClient
from monitor.config import parse_settings
from monitor.simulator import (
    AdminError,
    Fault,
    SimTenant,
    Simulator,
    SimulatorAdminClient,
    generate_tenant,
    load_recorded_tenant,
)
from monitor.simulator.certs import b64url_decode
from monitor.simulator.recorded import RECORDED_VULN_MACHINE

CLI = ["-c", "from monitor.cli import main; main()"]
RECORDED = Path(__file__).resolve().parents[1] / "monitor" / "simulator" / "recorded"


def recorded(name: str) -> Any:
    return json.loads((RECORDED / name).read_text())


def claims(jwt: str) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(b64url_decode(jwt.split(".")[1]))
    return result


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """One simulator: the recorded tenant, a small generated one, an empty one."""
    tenants = [
        load_recorded_tenant(),
        generate_tenant(machines=6, users=250, vulns_per_machine=4, cves=20, seed=11),
        generate_tenant(machines=0, users=3, vulns_per_machine=0, cves=0, seed=12),
    ]
    with Simulator(
        tenants, tmp_path_factory.mktemp("sim"), rate_limit_per_minute=4, rate_limit_per_hour=6
    ) as s:
        yield s


@pytest.fixture
def client(sim: Simulator) -> Iterator[httpx.Client]:
    sim.clear_faults()
    sim.reset_counts()
    sim.set_rate_limits(False)
    with sim.http_client(timeout=10) as c:
        yield c
    sim.clear_faults()
    sim.set_rate_limits(False)


@pytest.fixture
def rec(sim: Simulator) -> SimTenant:
    return sim.tenants[0]


@pytest.fixture
def gen(sim: Simulator) -> SimTenant:
    return sim.tenants[1]


@pytest.fixture
def empty(sim: Simulator) -> SimTenant:
    return sim.tenants[2]


# ---- TLS and tokens ------------------------------------------------------------------------


def test_listeners_are_https_with_the_simulator_ca(sim: Simulator) -> None:
    assert Path(sim.ca_path) == sim.state_dir / "ca.pem"
    for url in (sim.authority_url, sim.graph_url, sim.defender_url):
        assert url.startswith("https://127.0.0.1:")
        with httpx.Client(trust_env=False) as untrusting, pytest.raises(httpx.ConnectError):
            untrusting.get(url + "/")
    assert sim.admin_url.startswith("http://127.0.0.1:")
    assert len({sim.authority_url, sim.graph_url, sim.defender_url, sim.admin_url}) == 4


def test_token_success_has_the_recorded_shape(
    sim: Simulator, client: httpx.Client, rec: SimTenant
) -> None:
    resp = token_response(sim, client, rec, "defender")
    assert resp.status_code == 200
    body = resp.json()
    assert list(body) == list(recorded("aad_token_success.json"))
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3599
    c = claims(body["access_token"])
    assert c["aud"] == sim.defender_url and c["tid"] == rec.tenant_id
    assert c["appid"] == rec.client_id
    assert set(c["roles"]) == {"Machine.Read.All", "User.Read.All", "Vulnerability.Read.All"}
    assert c["exp"] - c["iat"] == 3599


def test_wrong_secret_gives_the_recorded_401(
    sim: Simulator, client: httpx.Client, rec: SimTenant
) -> None:
    resp = token_response(sim, client, rec, client_secret="not-the-secret")
    want = recorded("aad_token_error_invalid_client.json")
    assert resp.status_code == want["status"] == 401
    body = resp.json()
    assert list(body) == list(want["body"])
    assert body["error"] == "invalid_client" and body["error_codes"] == [7000215]
    assert body["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert rec.client_id in body["error_description"]
    assert body["trace_id"] != want["body"]["trace_id"]  # fresh ids
    assert body["trace_id"] in body["error_description"]
    assert rec.client_secret not in resp.text and "not-the-secret" not in resp.text


@pytest.mark.parametrize("tenant_path", ["abc123testing", "00000000-0000-0000-0000-000000000000"])
def test_malformed_or_unknown_tenant_gives_the_recorded_400(
    sim: Simulator, client: httpx.Client, rec: SimTenant, tenant_path: str
) -> None:
    resp = token_response(sim, client, rec, tenant_path=tenant_path)
    want = recorded("aad_token_error_invalid_tenant.json")
    assert resp.status_code == want["status"] == 400
    body = resp.json()
    assert list(body) == list(want["body"])
    assert body["error"] == "invalid_request" and body["error_codes"] == [900023]
    assert f"'{tenant_path}'" in body["error_description"]


def test_tenant_may_be_named_by_its_verified_domain(
    sim: Simulator, client: httpx.Client, rec: SimTenant
) -> None:
    resp = token_response(sim, client, rec, tenant_path="j1AzureIntegrationDev.onmicrosoft.com")
    assert resp.status_code == 200
    assert claims(resp.json()["access_token"])["tid"] == rec.tenant_id


@pytest.mark.parametrize(
    ("form", "status", "error", "code"),
    [
        ({"client_id": "11111111-2222-3333-4444-555555555555"}, 400, "unauthorized_client", 700016),
        ({"client_secret": ""}, 401, "invalid_client", 7000218),
        ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
        ({"scope": ""}, 400, "invalid_request", 900144),
        ({"scope": "https://127.0.0.1:1/User.Read"}, 400, "invalid_scope", 1002012),
        ({"scope": "https://graph.microsoft.com/.default"}, 400, "invalid_resource", 500011),
    ],
)
def test_token_request_errors(
    sim: Simulator,
    client: httpx.Client,
    rec: SimTenant,
    form: dict[str, str],
    status: int,
    error: str,
    code: int,
) -> None:
    resp = token_response(sim, client, rec, **form)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == error and body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")


def test_msal_acquires_a_token_with_a_secret(sim: Simulator, rec: SimTenant) -> None:
    with httpx.Client(verify=sim.ssl_context(), trust_env=False) as http:
        app = msal.ConfidentialClientApplication(
            rec.client_id,
            client_credential=rec.client_secret,
            authority=f"{sim.authority_url}/{rec.tenant_id}",
            http_client=http,
            instance_discovery=False,
        )
        result = app.acquire_token_for_client(scopes=[f"{sim.graph_url}/.default"])
        assert "access_token" in result, result
        resp = http.get(
            f"{sim.graph_url}/v1.0/organization",
            headers={"Authorization": f"Bearer {result['access_token']}"},
        )
    assert resp.status_code == 200
    assert resp.json()["value"][0]["id"] == rec.tenant_id


def test_msal_acquires_a_token_with_a_certificate(
    sim: Simulator, client: httpx.Client, gen: SimTenant
) -> None:
    pem_path, thumbprint = gen.add_certificate()
    assert pem_path.parent == sim.state_dir and oct(pem_path.stat().st_mode)[-3:] == "600"
    pem = pem_path.read_text()
    authority = f"{sim.authority_url}/{gen.tenant_id}"
    with httpx.Client(verify=sim.ssl_context(), trust_env=False) as raw:
        # The bare httpx client sends MSAL's bytes assertion as "b'...'": refused as malformed.
        bare = msal.ConfidentialClientApplication(
            gen.client_id,
            client_credential={"private_key": pem, "thumbprint": thumbprint},
            authority=authority,
            http_client=raw,
            instance_discovery=False,
        )
        broken = bare.acquire_token_for_client(scopes=[f"{sim.defender_url}/.default"])
        assert broken.get("error_codes") == [50027]
        http = MsalHttpClient(raw)  # decodes MSAL's bytes assertion
        # RS256 + x5t (thumbprint given), as our config's pem_path/thumbprint form makes MSAL send
        app = msal.ConfidentialClientApplication(
            gen.client_id,
            client_credential={"private_key": pem, "thumbprint": thumbprint},
            authority=authority,
            http_client=http,
            instance_discovery=False,
        )
        result = app.acquire_token_for_client(scopes=[f"{sim.defender_url}/.default"])
        assert "access_token" in result, result
        assert claims(result["access_token"])["aud"] == sim.defender_url
        # PS256 + x5t#S256 (public certificate given)
        app2 = msal.ConfidentialClientApplication(
            gen.client_id,
            client_credential={"private_key": pem, "public_certificate": pem},
            authority=authority,
            http_client=http,
            instance_discovery=False,
        )
        assert "access_token" in app2.acquire_token_for_client(scopes=[f"{sim.graph_url}/.default"])
        # A certificate the app does not know
        other = generate_tenant(machines=0, users=0, cves=0, seed=99)
        other_pem, other_thumb = other.add_certificate(sim.state_dir / "other")
        app3 = msal.ConfidentialClientApplication(
            gen.client_id,
            client_credential={"private_key": other_pem.read_text(), "thumbprint": other_thumb},
            authority=authority,
            http_client=http,
            instance_discovery=False,
        )
        refused = app3.acquire_token_for_client(scopes=[f"{sim.graph_url}/.default"])
    assert refused.get("error") == "invalid_client"
    assert 700027 in refused.get("error_codes", [])
    doc = yaml.safe_load(sim.config_yaml(credential="certificate"))
    settings = parse_settings(doc, "sim-config")
    cert = settings.tenants[1].certificate
    assert cert is not None and cert.thumbprint == thumbprint


# ---- API authentication -----------------------------------------------------------------


def test_missing_invalid_and_expired_tokens_are_401(
    sim: Simulator, client: httpx.Client, rec: SimTenant
) -> None:
    r = client.get(f"{sim.graph_url}/v1.0/users")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "InvalidAuthenticationToken"
    r = client.get(f"{sim.defender_url}/api/machines", headers={"Authorization": "Bearer x.y.z"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "Unauthorized"
    graph_token = token(sim, client, rec, "graph")
    sim.expire_tokens()
    r = client.get(
        f"{sim.graph_url}/v1.0/users", headers={"Authorization": f"Bearer {graph_token}"}
    )
    assert r.status_code == 401
    assert r.json()["error"] == {
        "code": "InvalidAuthenticationToken",
        "message": "Access token has expired or is not yet valid.",
        "innerError": r.json()["error"]["innerError"],
    }
    assert get(sim, client, rec, "/v1.0/users").status_code == 200  # a new token works


def test_token_for_the_other_api_is_401(
    sim: Simulator, client: httpx.Client, rec: SimTenant
) -> None:
    graph_token = token(sim, client, rec, "graph")
    defender_token = token(sim, client, rec, "defender")
    r = client.get(
        f"{sim.defender_url}/api/machines", headers={"Authorization": f"Bearer {graph_token}"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "Unauthorized"
    r = client.get(
        f"{sim.graph_url}/v1.0/organization", headers={"Authorization": f"Bearer {defender_token}"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "InvalidAuthenticationToken"


def test_missing_role_is_403(sim: Simulator, client: httpx.Client, gen: SimTenant) -> None:
    gen.set_roles(["Directory.Read.All", "User.Read.All", "Vulnerability.Read.All"])
    try:
        r = get(sim, client, gen, "/api/machines")
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["code"] == "Forbidden"
        assert err["message"] == (
            "The application does not have any of the required application permissions"
            " (Machine.ReadWrite.All, Machine.Read.All) to access the resource."
        )
        assert len(err["target"]) == 36
        r = get(sim, client, gen, "/v1.0/organization")
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "Authorization_RequestDenied"
        assert r.json()["error"]["message"] == "Insufficient privileges to complete the operation."
        assert get(sim, client, gen, "/v1.0/users").status_code == 200
        assert get(sim, client, gen, "/api/vulnerabilities").status_code == 200
    finally:
        gen.set_roles(
            ["Organization.Read.All", "Directory.Read.All", "Machine.Read.All", "User.Read.All",
             "Vulnerability.Read.All"]
        )  # fmt: skip


# ---- Graph -----------------------------------------------------------------------------------


def test_graph_recorded_organization_and_users(
    sim: Simulator, client: httpx.Client, rec: SimTenant
) -> None:
    org = get(sim, client, rec, "/v1.0/organization").json()
    want = recorded("graph_organization.json")
    assert org["@odata.context"] == f"{sim.graph_url}/v1.0/$metadata#organization"
    assert org["value"] == want["value"]
    users = get(sim, client, rec, "/v1.0/users").json()
    assert "@odata.nextLink" not in users  # 38 < default page of 100
    assert users["value"] == recorded("graph_users.json")["value"]


def test_graph_users_paging_select_and_top_cap(
    sim: Simulator, client: httpx.Client, rec: SimTenant
) -> None:
    bearer = {"Authorization": f"Bearer {token(sim, client, rec, 'graph')}"}
    url: str | None = f"{sim.graph_url}/v1.0/users"
    params: dict[str, Any] | None = {"$top": 10, "$select": "id,displayName,accountEnabled"}
    sizes, ids = [], []
    while url:
        body = client.get(url, params=params, headers=bearer).json()
        params = None
        sizes.append(len(body["value"]))
        ids += [u["id"] for u in body["value"]]
        for u in body["value"]:
            assert set(u) == {"id", "displayName", "accountEnabled"}
            assert u["accountEnabled"] is True  # absent in the recording: defaults to true
        url = body.get("@odata.nextLink")
        if url:
            assert url.startswith(f"{sim.graph_url}/v1.0/users?") and "$skiptoken=" in url
            assert "$top=10" in url and "$select=id,displayName,accountEnabled" in url
    assert sizes == [10, 10, 10, 8]
    assert ids == list(rec.users)
    r = client.get(f"{sim.graph_url}/v1.0/users", params={"$top": 1000}, headers=bearer)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "Invalid page size specified: '1000'. Must be between 1 and 999 inclusive."
    )
    r = client.get(f"{sim.graph_url}/v1.0/users", params={"$select": "nope"}, headers=bearer)
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]


def test_graph_short_pages_still_have_next_links(
    sim: Simulator, client: httpx.Client, gen: SimTenant
) -> None:
    gen.set_graph_short_pages(True)
    try:
        bearer = {"Authorization": f"Bearer {token(sim, client, gen, 'graph')}"}
        url: str | None = f"{sim.graph_url}/v1.0/users?$top=100"
        sizes, ids = [], set()
        while url:
            body = client.get(url, headers=bearer).json()
            sizes.append(len(body["value"]))
            ids |= {u["id"] for u in body["value"]}
            url = body.get("@odata.nextLink")
        assert sizes == [50, 50, 50, 50, 50]
        assert ids == set(gen.users)
    finally:
        gen.set_graph_short_pages(None)


# ---- Defender --------------------------------------------------------------------------------


def test_defender_recorded_machines(sim: Simulator, client: httpx.Client, rec: SimTenant) -> None:
    body = get(sim, client, rec, "/api/machines").json()
    assert list(body) == ["@odata.context", "value"]
    assert body["@odata.context"] == f"{sim.defender_url}/api/$metadata#Machines"
    assert body["value"] == recorded("mde_machines.json")["value"]
    assert RECORDED_VULN_MACHINE in {m["id"] for m in body["value"]}
    walked = []
    for skip in range(10):
        page = get(sim, client, rec, "/api/machines", {"$top": 1, "$skip": skip}).json()
        assert "@odata.nextLink" not in page
        walked.append(len(page["value"]))
    assert walked == [1] * 9 + [0]  # the last page is empty, as recorded
    by_id = recorded("mde_machine_by_id.json")
    one = get(sim, client, rec, f"/api/machines/{by_id['id']}").json()
    assert one["@odata.context"] == f"{sim.defender_url}/api/$metadata#Machines/$entity"
    assert {k: v for k, v in one.items() if k != "@odata.context"} == {
        k: v for k, v in by_id.items() if k != "@odata.context"
    }
    missing = get(sim, client, rec, "/api/machines/0000")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "ResourceNotFound"


def test_defender_empty_tenant_is_404_resource_not_found(
    sim: Simulator, client: httpx.Client, empty: SimTenant
) -> None:
    r = get(sim, client, empty, "/api/machines")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "ResourceNotFound" and err["message"] == "No machines found"
    assert len(err["target"]) == 36


def test_defender_machine_paging_at_10000(tmp_path: Path) -> None:
    tenant = generate_tenant(
        machines=10_001, users=0, vulns_per_machine=0, cves=0, logon_users_per_machine=0, seed=5
    )
    with Simulator([tenant], tmp_path) as s, s.http_client() as c:
        bearer = {"Authorization": f"Bearer {token(s, c, tenant, 'defender')}"}

        def page(top: int, skip: int) -> httpx.Response:
            return c.get(
                f"{s.defender_url}/api/machines",
                params={"$top": top, "$skip": skip},
                headers=bearer,
            )

        first, second = page(10_000, 0).json()["value"], page(10_000, 10_000).json()["value"]
        assert len(first) == 10_000 and len(second) == 1
        assert [m["id"] for m in first + second] == list(tenant.machines)
        too_big = page(10_001, 0)
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "BadRequest"
        tenant.remove_machine(second[0]["id"])  # exactly 10,000 now
        assert len(page(10_000, 0).json()["value"]) == 10_000
        assert page(10_000, 10_000).json()["value"] == []


def test_defender_vulnerability_endpoints_from_the_recording(
    sim: Simulator, client: httpx.Client, rec: SimTenant
) -> None:
    per_machine = get(sim, client, rec, f"/api/machines/{RECORDED_VULN_MACHINE}/vulnerabilities")
    want = recorded(f"mde_machine_vulnerabilities_{RECORDED_VULN_MACHINE}.json")
    body = per_machine.json()
    assert list(body) == ["@odata.context", "@odata.count", "value"]
    assert body["@odata.count"] == 51 and body["value"] == want["value"]
    other = next(m for m in rec.machines if m != RECORDED_VULN_MACHINE)
    none = get(sim, client, rec, f"/api/machines/{other}/vulnerabilities").json()
    empty = recorded("mde_machine_vulnerabilities_empty.json")
    assert none["@odata.count"] == 0 and none["value"] == empty["value"] == []

    pairs = get(sim, client, rec, "/api/vulnerabilities/machinesVulnerabilities").json()["value"]
    assert len(pairs) == 51
    assert {p["machineId"] for p in pairs} == {RECORDED_VULN_MACHINE}
    assert {p["cveId"] for p in pairs} == {v["id"] for v in want["value"]}
    for p in pairs:
        assert set(p) == {"id", "cveId", "machineId", "fixingKbId", "productName",
                          "productVendor", "productVersion", "severity"}  # fmt: skip
        assert p["id"] == (
            f"{p['machineId']}-{p['cveId']}-{p['productName']}-{p['productVendor']}"
            f"-{p['productVersion']}"
        )
    vulns = get(sim, client, rec, "/api/vulnerabilities").json()["value"]
    assert len(vulns) == 51 and all(v["exposedMachines"] == 1 for v in vulns)
    assert all("@odata.type" not in v for v in vulns)
    paged = get(sim, client, rec, "/api/vulnerabilities", {"$top": 50, "$skip": 50}).json()
    assert len(paged["value"]) == 1
    too_big = get(sim, client, rec, "/api/vulnerabilities", {"$top": 8001})
    assert too_big.status_code == 400


def test_generated_bulk_vulnerabilities_and_logon_users(
    sim: Simulator, client: httpx.Client, gen: SimTenant
) -> None:
    items = get(sim, client, gen, "/api/vulnerabilities/machinesVulnerabilities").json()["value"]
    pairs = {(i["machineId"], i["cveId"]) for i in items}
    assert len(pairs) == 6 * 4 == gen.pair_count()
    assert len(items) == sum(len(gen.cve_products[c]) for _, c in pairs)
    assert len({i["id"] for i in items}) == len(items)
    vulns = get(sim, client, gen, "/api/vulnerabilities").json()["value"]
    exposed = {v["id"]: v["exposedMachines"] for v in vulns}
    # the whole catalogue: CVEs on no machine are listed too, with exposedMachines 0
    assert sum(exposed.values()) == len(pairs) and len(exposed) == len(gen.cves)
    assert {c for c, n in exposed.items() if n > 0} == {c for _, c in pairs}
    machine_id = next(m for m, d in gen.machines.items() if d["onboardingStatus"] == "Onboarded")
    logon = get(sim, client, gen, f"/api/machines/{machine_id}/logonusers").json()
    assert logon["@odata.context"] == f"{sim.defender_url}/api/$metadata#Users"
    assert len(logon["value"]) == 3
    for lu in logon["value"]:
        assert list(lu) == [
            "id", "accountName", "accountDomain", "accountSid", "firstSeen", "lastSeen",
            "mostPrevalentMachineId", "leastPrevalentMachineId", "logonTypes",
            "logOnMachinesCount", "isDomainAdmin", "isOnlyNetworkUser",
        ]  # fmt: skip
        assert lu["id"] == f"{lu['accountDomain'].lower()}\\{lu['accountName']}"


# ---- faults, rate limits, counts -------------------------------------------------------------


def test_status_faults_use_each_apis_error_shape(
    sim: Simulator, client: httpx.Client, rec: SimTenant
) -> None:
    sim.add_fault(Fault(endpoint="defender:/api/machines", kind="status", status=503, times=1))
    sim.add_fault(Fault(endpoint="graph:/users", status=429, retry_after=7, times=1))
    sim.add_fault(Fault(endpoint="login:/token", status=500, times=1, tenant_id=rec.tenant_id))
    r = token_response(sim, client, rec)
    assert r.status_code == 500 and r.json()["error"] == "server_error"
    r = get(sim, client, rec, "/api/machines")
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
    assert r.json()["error"]["code"] == "ServiceUnavailable" and "target" in r.json()["error"]
    r = get(sim, client, rec, "/v1.0/users")
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert r.json()["error"]["code"] == "TooManyRequests" and "innerError" in r.json()["error"]
    assert get(sim, client, rec, "/api/machines").status_code == 200  # times=1 used up
    assert sim.faults.active() == []


def test_fault_on_one_machine_only(sim: Simulator, client: httpx.Client, gen: SimTenant) -> None:
    first, second = list(gen.machines)[:2]
    sim.add_fault(
        Fault(endpoint="defender:/api/machines/{id}/logonusers", status=500, machine_id=first)
    )
    assert get(sim, client, gen, f"/api/machines/{first}/logonusers").status_code == 500
    assert get(sim, client, gen, f"/api/machines/{second}/logonusers").status_code == 200
    assert get(sim, client, gen, f"/api/machines/{first}/logonusers").status_code == 500


def test_malformed_truncated_and_dropped_answers(
    sim: Simulator, client: httpx.Client, rec: SimTenant
) -> None:
    path = "/api/vulnerabilities/machinesVulnerabilities"
    sim.add_fault(Fault(endpoint="defender:" + path, kind="malformed", times=1))
    r = get(sim, client, rec, path)
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r.json()
    sim.add_fault(Fault(endpoint="defender:" + path, kind="truncated", times=1))
    with pytest.raises(httpx.RemoteProtocolError):
        get(sim, client, rec, path)
    sim.add_fault(Fault(endpoint="defender:" + path, kind="drop", times=1))
    with pytest.raises(httpx.RemoteProtocolError):
        get(sim, client, rec, path)
    assert len(get(sim, client, rec, path).json()["value"]) == 51


def test_hang_times_out_the_client_and_blocks_nobody(tmp_path: Path) -> None:
    tenant = load_recorded_tenant()
    with Simulator([tenant], tmp_path) as s, s.http_client(timeout=30) as c:
        bearer = {"Authorization": f"Bearer {token(s, c, tenant, 'graph')}"}
        s.add_fault(Fault(endpoint="graph:/organization", kind="hang", seconds=60, times=2))
        with pytest.raises(httpx.ReadTimeout):
            c.get(f"{s.graph_url}/v1.0/organization", headers=bearer, timeout=0.5)
        done = threading.Event()

        def hanging() -> None:
            try:
                with s.http_client(timeout=120) as c2:
                    c2.get(f"{s.graph_url}/v1.0/organization", headers=bearer)
            except httpx.HTTPError:
                pass
            done.set()

        worker = threading.Thread(target=hanging, daemon=True)
        worker.start()
        arrived, deadline = threading.Event(), 200  # up to ~10 s for the request to arrive
        while not arrived.wait(0.05) and deadline:
            deadline -= 1
            if s.counts().get("graph:/organization") == 2:
                arrived.set()
        assert arrived.is_set()
        # while that request hangs, others are answered
        for _ in range(3):
            assert c.get(f"{s.graph_url}/v1.0/users", headers=bearer).status_code == 200
        assert not done.is_set()
    assert done.wait(10)  # stop() released the hanging request


def test_rate_limits_429_with_retry_after(
    sim: Simulator, client: httpx.Client, gen: SimTenant
) -> None:
    bearer = {"Authorization": f"Bearer {token(sim, client, gen, 'defender')}"}
    machines = f"{sim.defender_url}/api/machines"
    for _ in range(4):
        assert client.get(machines, headers=bearer).status_code == 200  # before: not enforced
    sim.set_rate_limits(True)
    codes = [client.get(machines, headers=bearer).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 200, 429]  # 4 per "minute" in this simulator
    r = client.get(machines, headers=bearer)
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.json()["error"]["code"] == "TooManyRequests"
    machine_id = next(m for m, d in gen.machines.items() if d["onboardingStatus"] == "Onboarded")
    # other endpoints have their own budget / none
    assert client.get(f"{machines}/{machine_id}/logonusers", headers=bearer).status_code == 200
    assert client.get(f"{machines}/{machine_id}", headers=bearer).status_code == 200
    sim.set_rate_limits(False)
    assert client.get(machines, headers=bearer).status_code == 200


def test_hourly_rate_limit(tmp_path: Path) -> None:
    tenant = generate_tenant(machines=1, users=1, cves=1, vulns_per_machine=1, seed=8)
    with (
        Simulator(
            [tenant], tmp_path, rate_limits=True, rate_limit_per_minute=100, rate_limit_per_hour=3
        ) as s,
        s.http_client() as c,
    ):
        bearer = {"Authorization": f"Bearer {token(s, c, tenant, 'defender')}"}
        codes = [
            c.get(f"{s.defender_url}/api/machines", headers=bearer).status_code for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]
        r = c.get(f"{s.defender_url}/api/machines", headers=bearer)
        assert 60 < int(r.headers["Retry-After"]) <= 3600


def test_counts_per_endpoint_and_tenant(
    sim: Simulator, client: httpx.Client, rec: SimTenant, gen: SimTenant
) -> None:
    get(sim, client, rec, "/api/machines")
    get(sim, client, rec, f"/api/machines/{RECORDED_VULN_MACHINE}/logonusers")
    get(sim, client, gen, "/v1.0/users")
    client.get(f"{sim.graph_url}/v1.0/users")  # unauthenticated: counted, no tenant
    assert sim.counts() == {
        "login:/token": 3,
        "defender:/api/machines": 1,
        "defender:/api/machines/{id}/logonusers": 1,
        "graph:/users": 2,
    }
    assert sim.counts(rec.tenant_id) == {
        "login:/token": 2,
        "defender:/api/machines": 1,
        "defender:/api/machines/{id}/logonusers": 1,
    }
    assert sim.counts(gen.tenant_id) == {"login:/token": 1, "graph:/users": 1}
    sim.reset_counts()
    assert sim.counts() == {}


# ---- admin API, config, generation -----------------------------------------------------------


def test_admin_api_drives_a_simulator_over_http(
    sim: Simulator, client: httpx.Client, gen: SimTenant
) -> None:
    with SimulatorAdminClient(sim.admin_url) as admin:
        assert admin.health()
        info = admin.info()
        assert info["graph_url"] == sim.graph_url and info["ca_path"] == sim.ca_path
        assert all("secret" not in json.dumps(t) for t in info["tenants"])
        machine_id = next(
            m for m, d in gen.machines.items() if d["onboardingStatus"] == "Onboarded"
        )
        admin.mutate(gen.tenant_id, "set_machine", machine_id=machine_id, healthStatus="Inactive")
        m = get(sim, client, gen, f"/api/machines/{machine_id}").json()
        assert m["healthStatus"] == "Inactive"
        added = admin.mutate(gen.tenant_id, "add_machine")
        admin.mutate(
            gen.tenant_id, "add_machine_vuln", machine_id=added["id"], cve_id="CVE-2099-0001"
        )
        pairs = get(sim, client, gen, "/api/vulnerabilities/machinesVulnerabilities").json()
        assert (added["id"], "CVE-2099-0001") in {
            (p["machineId"], p["cveId"]) for p in pairs["value"]
        }
        vulns = get(sim, client, gen, "/api/vulnerabilities").json()["value"]
        assert {"CVE-2099-0001": 1}.items() <= {
            v["id"]: v["exposedMachines"] for v in vulns
        }.items()
        admin.mutate(gen.tenant_id, "remove_machine", machine_id=added["id"])
        assert get(sim, client, gen, f"/api/machines/{added['id']}").status_code == 404
        user_id = next(iter(gen.users))
        admin.mutate(gen.tenant_id, "set_user", user_id=user_id, accountEnabled=False)
        assert gen.users[user_id]["accountEnabled"] is False
        admin.mutate(gen.tenant_id, "touch_all_machines", at="2030-01-01T00:00:00Z")
        assert all(m["lastSeen"].startswith("2030-01-01") for m in gen.machines.values())

        admin.reset_counts()
        admin.add_fault({"endpoint": "defender:/api/machines", "status": 502, "times": 1})
        assert len(admin.faults()) == 1
        assert get(sim, client, gen, "/api/machines").status_code == 502
        assert admin.counts() == {"login:/token": 1, "defender:/api/machines": 1}
        assert admin.counts(gen.tenant_id)["defender:/api/machines"] == 1
        admin.set_rate_limits(True)
        assert sim.rate_limiter.enabled
        admin.set_rate_limits(False)
        admin.clear_faults()

        with pytest.raises(AdminError) as bad_op:
            admin.mutate(gen.tenant_id, "drop_database")
        assert bad_op.value.status == 400
        with pytest.raises(AdminError) as no_tenant:
            admin.mutate("nope", "summary")
        assert no_tenant.value.status == 404
        with pytest.raises(AdminError) as no_machine:
            admin.mutate(gen.tenant_id, "set_machine", machine_id="nope", healthStatus="Active")
        assert no_machine.value.status == 404
        with pytest.raises(AdminError) as bad_fault:
            admin.add_fault({"endpoint": "defender:/api/machines", "kind": "explode"})
        assert bad_fault.value.status == 400 and "explode" in bad_fault.value.message


def test_config_yaml_is_a_valid_monitor_config(sim: Simulator, tmp_path: Path) -> None:
    settings = parse_settings(yaml.safe_load(sim.config_yaml()), "sim-config")
    assert [t.name for t in settings.tenants] == ["sim", "sim-2", "sim-3"]
    first = settings.tenants[0]
    assert (
        first.tenant_id == sim.tenants[0].tenant_id
        and first.secret() == sim.tenants[0].client_secret
    )
    ep = first.cloud_endpoints()
    assert ep.authority == sim.authority_url and ep.graph.scope == f"{sim.graph_url}/.default"
    assert ep.defender.scope == f"{sim.defender_url}/.default"
    assert str(settings.ca_bundle) == sim.ca_path
    path = sim.write_config(tmp_path / "monitor.yaml", credential="secret_file")
    assert oct(path.stat().st_mode)[-3:] == "600"
    from_file = parse_settings(yaml.safe_load(path.read_text()), str(path))
    assert from_file.tenants[0].secret() == sim.tenants[0].client_secret
    assert sim.tenants[0].client_secret not in path.read_text()


def test_secrets_stay_out_of_reprs(sim: Simulator) -> None:
    for t in sim.tenants:
        assert t.client_secret not in repr(t)
        assert t.client_secret not in repr(sim)


def test_generate_tenant_is_deterministic_by_seed() -> None:
    def dump(t: SimTenant) -> bytes:
        return orjson.dumps(
            [t.tenant_id, t.client_id, t.organization, t.users, t.machines, t.logon_users,
             t.machine_vulns, t.cves, t.cve_products]
        )  # fmt: skip

    kwargs: dict[str, Any] = {"machines": 40, "users": 60, "vulns_per_machine": 5, "cves": 50}
    a, b = generate_tenant(**kwargs, seed=3), generate_tenant(**kwargs, seed=3)
    assert dump(a) == dump(b)
    assert dump(generate_tenant(**kwargs, seed=4)) != dump(a)
    assert a.pair_count() == 40 * 5 and len(a.logon_users) == 40
    assert generate_tenant(**kwargs, seed=3, tenant_id="t-1").tenant_id == "t-1"


def test_generated_items_have_the_recorded_shapes() -> None:
    t = generate_tenant(machines=50, users=50, vulns_per_machine=3, cves=30, seed=1)
    machine_keys = list(recorded("mde_machines.json")["value"][0])
    cve_keys = list(
        recorded(f"mde_machine_vulnerabilities_{RECORDED_VULN_MACHINE}.json")["value"][0]
    )
    user_keys = set(recorded("graph_users.json")["value"][0])
    org_keys = list(recorded("graph_organization.json")["value"][0])
    assert all(list(m) == machine_keys for m in t.machines.values())
    assert all(list(c) == cve_keys for c in t.cves.values())
    assert all(
        user_keys <= set(u) and isinstance(u["accountEnabled"], bool) for u in t.users.values()
    )
    assert list(t.organization) == org_keys and t.organization["id"] == t.tenant_id
    platforms = {m["osPlatform"] for m in t.machines.values()}
    assert platforms <= {"Windows10", "Windows11", "WindowsServer2022", "WindowsServer2019",
                         "Ubuntu", "macOS"}  # fmt: skip
    assert all(
        {"127.0.0.1", "::1"} <= {ip["ipAddress"] for ip in m["ipAddresses"]}
        for m in t.machines.values()
    )
    severities = {c["severity"] for c in t.cves.values()}
    assert severities <= {"Low", "Medium", "High", "Critical"}


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_simulate_prints_urls_and_writes_the_config(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, *CLI, "simulate", "--tenants",
         "2", "--machines", "3", "--users", "4", "--cves", "5", "--vulns-per-machine", "2",
         "--state-dir", str(tmp_path), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # the JSON document ends with a lone "}"
            lines.append(line)
            if line.rstrip() == "}":
                break
        if not lines:
            proc.wait(timeout=20)
            pytest.fail(f"simulate exited early: {proc.stderr.read() if proc.stderr else ''}")
        info = json.loads("".join(lines))
        config = Path(info["config_path"])
        assert config == tmp_path / "config.yaml" and oct(config.stat().st_mode)[-3:] == "600"
        assert info["ca_path"] == str(tmp_path / "ca.pem")
        settings = parse_settings(yaml.safe_load(config.read_text()), str(config))
        assert len(settings.tenants) == 2
        secrets = [t.secret() for t in settings.tenants]
        assert all(secret and secret not in "".join(lines) for secret in secrets)
        with SimulatorAdminClient(info["admin_url"]) as admin:
            assert admin.health() and len(admin.tenants()) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
