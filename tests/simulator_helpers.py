"""Helpers for the simulator tests: tokens and authenticated calls over real HTTPS."""

from __future__ import annotations

from typing import Any

import httpx

from monitor.simulator import SimTenant, Simulator


def token_response(
    sim: Simulator,
    client: httpx.Client,
    tenant: SimTenant,
    api: str = "graph",
    tenant_path: str | None = None,
    **form: str,
) -> httpx.Response:
    """POST the client-credentials token request (form fields override the defaults; a field
    given as "" is left out)."""
    origin = sim.graph_url if api == "graph" else sim.defender_url
    data = {
        "grant_type": "client_credentials",
        "client_id": tenant.client_id,
        "client_secret": tenant.client_secret,
        "scope": f"{origin}/.default",
        **form,
    }
    data = {k: v for k, v in data.items() if v != ""}
    where = tenant_path or tenant.tenant_id
    return client.post(f"{sim.authority_url}/{where}/oauth2/v2.0/token", data=data)


def token(sim: Simulator, client: httpx.Client, tenant: SimTenant, api: str = "graph") -> str:
    resp = token_response(sim, client, tenant, api)
    assert resp.status_code == 200, resp.text
    value: str = resp.json()["access_token"]
    return value


def get(
    sim: Simulator,
    client: httpx.Client,
    tenant: SimTenant,
    path: str,
    params: dict[str, Any] | None = None,
) -> httpx.Response:
    """GET a Graph (/v1.0/...) or Defender (/api/...) path with a fresh token for that API."""
    api = "graph" if path.startswith("/v1.0") else "defender"
    base = sim.graph_url if api == "graph" else sim.defender_url
    bearer = token(sim, client, tenant, api)
    return client.get(base + path, params=params, headers={"Authorization": f"Bearer {bearer}"})
