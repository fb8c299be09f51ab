"""Sign-in with Entra ID: the OIDC authorization-code flow (PKCE, state, nonce) through MSAL.

The flow MSAL starts is kept server-side (Redis, 10 minutes) under the browser's session id.
The ID token arrives straight from the token endpoint over verified TLS, which OpenID Connect
accepts in place of a signature check (Core 1.0, 3.1.3.7 step 6); its issuer, audience, expiry
and nonce are checked here. The role comes from the token's `groups` / `roles` claims matched
against `web.oidc.operator_*` and `viewer_*`.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

import httpx
import msal
from starlette.requests import Request

from monitor.auth import MsalHttpClient
from monitor.collect.http import build_http_client
from monitor.config import Cloud
from monitor.web.security import User

if TYPE_CHECKING:
    from monitor.web.app import Console

CALLBACK = "/auth/callback"


class SignInError(Exception):
    """Sign-in did not complete; the message is safe to show."""


def _app(console: Console, http: httpx.Client) -> tuple[msal.ConfidentialClientApplication, str]:
    oidc = console.guard.oidc
    assert oidc is not None
    tenant = console.settings.tenant(oidc.tenant)
    endpoints = tenant.cloud_endpoints()
    authority = f"{endpoints.authority}/{tenant.tenant_id}"
    app = msal.ConfidentialClientApplication(
        oidc.client_id,
        client_credential=oidc.client_secret.get_secret_value(),
        authority=authority,
        http_client=MsalHttpClient(http),
        validate_authority=tenant.cloud is not Cloud.CUSTOM,
    )
    return app, f"{authority}/v2.0"


def redirect_uri(console: Console, request: Request) -> str:
    base = console.settings.web.public_url or f"{request.url.scheme}://{request.url.netloc}"
    return base.rstrip("/") + CALLBACK


def start(console: Console, request: Request, sid: str, nxt: str) -> str:
    """The authorize URL to send the browser to (the flow is stored under `sid`)."""
    with build_http_client(console.settings) as http:
        app, _issuer = _app(console, http)
        flow = app.initiate_auth_code_flow(
            scopes=[], redirect_uri=redirect_uri(console, request), response_mode="query"
        )
    console.guard.put_flow(sid, {"flow": flow, "next": nxt})
    return str(flow["auth_uri"])


def role_of(claims: dict[str, Any], console: Console) -> str | None:
    oidc = console.guard.oidc
    assert oidc is not None
    groups = set(claims.get("groups") or [])
    roles = set(claims.get("roles") or [])
    if groups & set(oidc.operator_groups) or roles & set(oidc.operator_roles):
        return "operator"
    if groups & set(oidc.viewer_groups) or roles & set(oidc.viewer_roles):
        return "viewer"
    return None


def finish(console: Console, sid: str, params: dict[str, str]) -> tuple[User, str]:
    """Redeem the code; the signed-in user and where to go next."""
    stored = console.guard.pop_flow(sid)
    if stored is None:
        raise SignInError("the sign-in expired or was started in another browser; try again")
    if params.get("error"):
        raise SignInError(f"Entra ID refused the sign-in: {params.get('error')}")
    with build_http_client(console.settings) as http:
        app, issuer = _app(console, http)
        try:
            result = app.acquire_token_by_auth_code_flow(stored["flow"], params)
        except (ValueError, RuntimeError):  # state or nonce mismatch
            raise SignInError(
                "the sign-in response does not match this browser's request"
            ) from None
    if "error" in result:
        raise SignInError(f"Entra ID refused the code: {result.get('error')}")
    claims: dict[str, Any] = result.get("id_token_claims") or {}
    oidc = console.guard.oidc
    assert oidc is not None
    aud = claims.get("aud")
    if (
        claims.get("iss") != issuer
        or (aud != oidc.client_id and not (isinstance(aud, list) and oidc.client_id in aud))
        or float(claims.get("exp") or 0) < time.time() - 60
        or claims.get("nonce") != hashlib.sha256(str(stored["flow"]["nonce"]).encode()).hexdigest()
    ):
        raise SignInError(
            "the ID token is not for this console (issuer, audience, nonce or expiry)"
        )
    role = role_of(claims, console)
    name = str(claims.get("preferred_username") or claims.get("name") or claims.get("oid") or "?")
    if role is None:
        raise SignInError(f"{name} is not in a group or app role allowed to use this console")
    return User(name, role, "entra"), str(stored.get("next") or "/")
