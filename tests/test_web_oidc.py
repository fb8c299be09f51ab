"""Console sign-in with Entra ID: the authorization-code flow through MSAL against the
simulator's authorize/token endpoints (HTTPS), roles from group and app-role claims."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from starlette.testclient import TestClient

from monitor.config import parse_settings
from monitor.redis_conn import delete_prefix
from monitor.simulator import Simulator, generate_tenant
from monitor.web import create_app

OPS_GROUP = "6f1c2c5e-0000-4000-8000-00000000000a"


@pytest.fixture(scope="module")
def sim_world(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[dict]:
    tenant = generate_tenant(machines=2, users=3, vulns_per_machine=1, cves=3, seed=3, name="sim")
    tenant.sign_in_groups["olga@contoso.example"] = [OPS_GROUP, "other"]
    tenant.sign_in_roles["alice@contoso.example"] = ["Console.Read"]
    tmp = tmp_path_factory.mktemp("oidc")
    with Simulator([tenant], tmp / "sim") as sim:
        doc = sim.config_dict(
            "sim",
            extra={
                "redis_url": redis_url,
                "redis_prefix": f"mdetest-oidc-{tmp.name}",
                "alerts_dir": str(tmp),
                "web": {
                    "oidc": {
                        "tenant": "sim",
                        "client_id": tenant.client_id,
                        "client_secret": tenant.client_secret,
                        "operator_groups": [OPS_GROUP],
                        "viewer_roles": ["Console.Read"],
                    }
                },
            },
        )
        settings = parse_settings(doc, "test")
        try:
            yield {"sim": sim, "settings": settings, "tenant": tenant}
        finally:
            delete_prefix(redis.Redis.from_url(redis_url), settings.redis_prefix)


def sign_in(world: dict, upn: str, nxt: str = "/alerts") -> tuple[TestClient, object]:
    client = TestClient(
        create_app(world["settings"], host="0.0.0.0"), base_url="https://console.example"
    )
    start = client.get("/login/entra", params={"next": nxt}, follow_redirects=False)
    assert start.status_code == 303
    auth_url = start.headers["location"]
    assert auth_url.startswith(world["sim"].authority_url)
    q = parse_qs(urlsplit(auth_url).query)
    assert q["code_challenge_method"] == ["S256"] and q["nonce"] and q["state"]
    assert "client_secret" not in auth_url
    with world["sim"].http_client() as idp:
        back = idp.get(auth_url + f"&login_hint={upn}", follow_redirects=False)
    assert back.status_code == 302
    cb = urlsplit(back.headers["location"])
    assert cb.path == "/auth/callback"
    return client, client.get(f"{cb.path}?{cb.query}", follow_redirects=False)


def test_operator_by_group_viewer_by_app_role(sim_world: dict) -> None:
    client, r = sign_in(sim_world, "olga@contoso.example")
    assert r.status_code == 303 and r.headers["location"] == "/alerts"
    me = client.get("/api/me").json()
    assert me["name"] == "olga@contoso.example" and me["role"] == "operator"
    assert me["via"] == "session:entra"
    client, r = sign_in(sim_world, "alice@contoso.example", "/")
    assert r.status_code == 303
    assert client.get("/api/me").json()["role"] == "viewer"
    audit = client.get("/api/audit").json()
    assert {(a["user"], a["action"]) for a in audit} >= {
        ("olga@contoso.example", "login"),
        ("alice@contoso.example", "login"),
    }


def test_users_without_an_allowed_group_are_refused(sim_world: dict) -> None:
    client, r = sign_in(sim_world, "mallory@contoso.example")
    assert r.status_code == 403 and "not in a group or app role" in r.text
    assert client.get("/api/me").status_code == 401


def test_a_code_for_another_browser_is_refused(sim_world: dict) -> None:
    victim, _ = sign_in(sim_world, "olga@contoso.example")
    attacker = TestClient(
        create_app(sim_world["settings"], host="0.0.0.0"), base_url="https://console.example"
    )
    start = attacker.get("/login/entra", follow_redirects=False).headers["location"]
    with sim_world["sim"].http_client() as idp:
        back = urlsplit(idp.get(start, follow_redirects=False).headers["location"])
    # the victim's browser is lured to the attacker's callback URL: its state does not match
    r = victim.get(f"{back.path}?{back.query}", follow_redirects=False)
    assert r.status_code in (400, 403)
    assert victim.get("/api/me").json()["name"] == "olga@contoso.example"  # unchanged


def test_login_page_offers_entra(sim_world: dict, tmp_path: Path) -> None:
    client = TestClient(
        create_app(sim_world["settings"], host="0.0.0.0"), base_url="https://console.example"
    )
    html = client.get("/login").text
    assert 'id="login-entra"' in html
    assert sim_world["tenant"].client_secret not in html
