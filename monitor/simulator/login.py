"""The Entra ID (login.microsoftonline.com) endpoints MSAL uses for client credentials."""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import re
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode

from monitor.simulator.errors import (
    aad_error,
    aad_invalid_client_secret,
    aad_invalid_tenant,
    recorded,
)
from monitor.simulator.httpd import Request, Response, Route, json_response
from monitor.simulator.tenant import DEFENDER_ROLES, GRAPH_ROLES, SimTenant
from monitor.simulator.tokens import AssertionProblem, verify_client_assertion

if TYPE_CHECKING:
    from monitor.simulator.simulator import Simulator

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_DNS = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,63}$")
_RESERVED_SCOPES = {"openid", "profile", "offline_access"}
_NO_CACHE = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}

_ASSERTION_ERRORS: dict[AssertionProblem, tuple[int, str]] = {
    AssertionProblem.MALFORMED: (50027, "JWT token is invalid or malformed."),
    AssertionProblem.UNKNOWN_CERTIFICATE: (
        700027,
        "The certificate with identifier used to sign the client assertion is not registered"
        " on application. [Reason - The key was not found.]",
    ),
    AssertionProblem.SIGNATURE: (700027, "Client assertion failed signature validation."),
    AssertionProblem.EXPIRED: (700024, "Client assertion is not within its valid time range."),
    AssertionProblem.AUDIENCE: (
        700027,
        "Client assertion contains an invalid audience; it must be the token endpoint.",
    ),
    AssertionProblem.ISSUER: (
        700027,
        "Client assertion contains an invalid issuer or subject; both must be the client id.",
    ),
}


class LoginApi:
    """OpenID discovery, instance discovery and the v2.0 token endpoint."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self._codes: dict[str, dict[str, Any]] = {}  # authorization codes, one use each

    def route(self, req: Request) -> Route:
        parts = [p for p in req.path.split("/") if p]
        if parts[:3] == ["common", "discovery", "instance"]:
            return Route("login:/common/discovery/instance", self.instance_discovery)
        if len(parts) >= 2:
            tenant = parts[0]
            rest = "/".join(parts[1:])
            if rest == "v2.0/.well-known/openid-configuration":
                return Route(
                    "login:/openid-configuration",
                    self.openid_configuration,
                    {"tenant": tenant},
                    tenant_hint=self._tenant_id_hint(tenant),
                )
            if rest == "oauth2/v2.0/token":
                return Route(
                    "login:/token",
                    self.token,
                    {"tenant": tenant},
                    tenant_hint=self._tenant_id_hint(tenant),
                )
            if rest == "oauth2/v2.0/authorize":
                return Route(
                    "login:/authorize",
                    self.authorize,
                    {"tenant": tenant},
                    tenant_hint=self._tenant_id_hint(tenant),
                )
            if rest == "discovery/v2.0/keys":
                return Route("login:/keys", self.keys, {"tenant": tenant})
        return Route("login:unknown", self.not_found)

    def _tenant_id_hint(self, name: str) -> str:
        tenant = self.sim.find_tenant(name)
        return tenant.tenant_id if tenant else name

    # ---- handlers ---------------------------------------------------------------------

    def not_found(self, req: Request) -> Response:
        status, body = aad_error(
            404, "invalid_request", 900561, f"The endpoint {req.path} does not exist."
        )
        return json_response(status, body)

    def instance_discovery(self, req: Request) -> Response:
        doc = copy.deepcopy(recorded("aad_instance_discovery.json"))
        host = req.base_url.split("://", 1)[1]
        tenant = "common"
        auth = req.query.get("authorization_endpoint", "")
        m = re.match(r"^https://[^/]+/([^/]+)/", auth)
        if m:
            tenant = m.group(1)
        doc["tenant_discovery_endpoint"] = (
            f"{req.base_url}/{tenant}/v2.0/.well-known/openid-configuration"
        )
        doc["metadata"].insert(
            0, {"preferred_network": host, "preferred_cache": host, "aliases": [host]}
        )
        return json_response(200, doc)

    def openid_configuration(self, req: Request, tenant: str) -> Response:
        sim_tenant = self.sim.find_tenant(tenant)
        if sim_tenant is None:
            status, body = aad_invalid_tenant(tenant)
            body["error"] = "invalid_tenant"
            return json_response(status, body)
        doc: dict[str, Any] = copy.deepcopy(recorded("aad_openid_configuration.json"))
        base = f"{req.base_url}/{sim_tenant.tenant_id}"
        recorded_tenant = doc_tenant(doc)
        for key, value in list(doc.items()):
            if isinstance(value, str) and value.startswith("https://login.microsoftonline.com/"):
                doc[key] = base + value.split(recorded_tenant, 1)[1]
        doc["userinfo_endpoint"] = f"{self.sim.graph_url}/oidc/userinfo"
        doc["msgraph_host"] = self.sim.graph_url.split("://", 1)[1]
        doc["cloud_instance_name"] = "simulator.local"
        return json_response(200, doc)

    def keys(self, req: Request, tenant: str) -> Response:
        return json_response(200, {"keys": []})

    def token(self, req: Request, tenant: str) -> Response:
        sim_tenant = self.sim.find_tenant(tenant)
        if sim_tenant is None or not (_GUID.match(tenant) or _DNS.match(tenant)):
            status, body = aad_invalid_tenant(tenant)
            return json_response(status, body, headers=_NO_CACHE)
        if req.method != "POST":
            return self._error(
                400, "invalid_request", 900561, "The endpoint only accepts POST requests."
            )
        form = req.form()
        grant = form.get("grant_type", "")
        if not grant:
            return self._missing("grant_type")
        if grant == "authorization_code":
            return self._redeem_code(req, form, sim_tenant)
        if grant != "client_credentials":
            return self._error(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant}'.",
            )
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        basic = _basic_auth(req.header("authorization"))
        if basic is not None:
            client_id, secret = client_id or basic[0], basic[1]
        if not client_id:
            return self._missing("client_id")
        if client_id.lower() != sim_tenant.client_id.lower():
            return self._error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory"
                f" '{sim_tenant.organization.get('displayName') or sim_tenant.tenant_id}'."
                " This can happen if the application has not been installed by the"
                " administrator of the tenant or consented to by any user in the tenant. You"
                " may have sent your authentication request to the wrong tenant.",
            )
        refused = self._check_credential(req, form, secret, sim_tenant)
        if refused is not None:
            return refused
        scope = form.get("scope", "").strip()
        if not scope:
            return self._missing("scope")
        api, refused = self._resource(scope, sim_tenant)
        if refused is not None:
            return refused
        roles = GRAPH_ROLES if api == "graph" else DEFENDER_ROLES
        audience = self.sim.graph_url if api == "graph" else self.sim.defender_url
        token, lifetime = self.sim.issuer.issue(
            tenant_id=sim_tenant.tenant_id,
            client_id=sim_tenant.client_id,
            audience=audience,
            issuer=f"{self.sim.authority_url}/{sim_tenant.tenant_id}/v2.0",
            roles=sorted(r for r in sim_tenant.roles if r in roles),
        )
        body = {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }
        return json_response(200, body, headers=_NO_CACHE)

    # ---- interactive sign-in (authorization code + PKCE), for the console ----------------

    def authorize(self, req: Request, tenant: str) -> Response:
        """Signs in `login_hint` (default: the tenant's first user) without a login page and
        redirects to `redirect_uri` with a one-time code (query response mode)."""
        sim_tenant = self.sim.find_tenant(tenant)
        q = req.query
        redirect = q.get("redirect_uri", "")
        if sim_tenant is None or q.get("client_id", "").lower() != sim_tenant.client_id.lower():
            return self._error(400, "unauthorized_client", 700016, "Unknown application.")
        if q.get("response_type") != "code" or not redirect.startswith(("http://", "https://")):
            return self._error(400, "invalid_request", 900144, "response_type or redirect_uri.")
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return self._error(400, "invalid_request", 9002325, "PKCE (S256) is required.")
        upn = q.get("login_hint") or next(
            (str(u.get("userPrincipalName")) for u in sim_tenant.users.values()), "user@sim"
        )
        code = secrets.token_urlsafe(24)
        self._codes[code] = {
            "tenant": sim_tenant.tenant_id,
            "client_id": sim_tenant.client_id,
            "redirect_uri": redirect,
            "challenge": q.get("code_challenge", ""),
            "nonce": q.get("nonce"),
            "upn": upn,
        }
        sep = "&" if "?" in redirect else "?"
        query = urlencode({"code": code, "state": q.get("state", ""), "session_state": "sim"})
        return Response(302, b"", {"Location": f"{redirect}{sep}{query}"}, "text/plain")

    def _redeem_code(self, req: Request, form: dict[str, str], sim_tenant: SimTenant) -> Response:
        grant = self._codes.pop(form.get("code", ""), None)
        if grant is None or grant["tenant"] != sim_tenant.tenant_id:
            return self._error(
                400,
                "invalid_grant",
                70008,
                "The provided authorization code is invalid or has expired.",
            )
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        basic = _basic_auth(req.header("authorization"))
        if basic is not None:
            client_id, secret = client_id or basic[0], basic[1]
        if client_id.lower() != grant["client_id"].lower():
            return self._error(400, "invalid_grant", 70000, "The code was issued to another app.")
        refused = self._check_credential(req, form, secret, sim_tenant)
        if refused is not None:
            return refused
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return self._error(400, "invalid_grant", 50011, "The redirect URI does not match.")
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
        if not hmac.compare_digest(digest.decode(), grant["challenge"]):
            return self._error(400, "invalid_grant", 501481, "The code_verifier does not match.")
        upn = grant["upn"]
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": grant["client_id"],
            "iss": f"{self.sim.authority_url}/{sim_tenant.tenant_id}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "tid": sim_tenant.tenant_id,
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"user:{sim_tenant.tenant_id}:{upn}")),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sub:{sim_tenant.tenant_id}:{upn}")),
            "preferred_username": upn,
            "name": upn.split("@", 1)[0],
            "ver": "2.0",
        }
        if grant.get("nonce"):
            claims["nonce"] = grant["nonce"]
        if sim_tenant.sign_in_groups.get(upn):
            claims["groups"] = sim_tenant.sign_in_groups[upn]
        if sim_tenant.sign_in_roles.get(upn):
            claims["roles"] = sim_tenant.sign_in_roles[upn]
        id_token = self.sim.issuer.sign(claims)
        body = {
            "token_type": "Bearer",
            "scope": form.get("scope", "openid profile"),
            "expires_in": 3600,
            "ext_expires_in": 3600,
            "access_token": id_token,
            "id_token": id_token,
        }
        return json_response(200, body, headers=_NO_CACHE)

    # ---- helpers ----------------------------------------------------------------------

    def _error(self, status: int, error: str, code: int, description: str) -> Response:
        status, body = aad_error(status, error, code, description)
        return json_response(status, body, headers=_NO_CACHE)

    def _missing(self, name: str) -> Response:
        return self._error(
            400,
            "invalid_request",
            900144,
            f"The request body must contain the following parameter: '{name}'.",
        )

    def _check_credential(
        self, req: Request, form: dict[str, str], secret: str | None, tenant: SimTenant
    ) -> Response | None:
        assertion = form.get("client_assertion")
        if assertion:
            if form.get("client_assertion_type") != ASSERTION_TYPE:
                return self._error(
                    400,
                    "invalid_request",
                    50027,
                    "client_assertion_type must be"
                    f" '{ASSERTION_TYPE}' when client_assertion is given.",
                )
            result = verify_client_assertion(
                assertion,
                tenant.certificate,
                tenant.client_id,
                req.path,
            )
            if not result.ok:
                assert result.problem is not None
                code, text = _ASSERTION_ERRORS[result.problem]
                return self._error(401, "invalid_client", code, text)
            return None
        if secret is None or secret == "":
            return self._error(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion'"
                " or 'client_secret'.",
            )
        if not hmac.compare_digest(secret.encode(), tenant.client_secret.encode()):
            status, body = aad_invalid_client_secret(tenant.client_id)
            return json_response(status, body, headers=_NO_CACHE)
        return None

    def _resource(self, scope: str, tenant: SimTenant) -> tuple[str, Response | None]:
        scopes = [s for s in scope.split() if s not in _RESERVED_SCOPES]
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            return "", self._error(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows"
                " must have a scope value with /.default suffixed to the resource identifier"
                " (application ID URI).",
            )
        resource = scopes[0].removesuffix("/.default").rstrip("/")
        if resource == self.sim.graph_url:
            return "graph", None
        alias = self.sim.defender_resource
        if alias is not None:
            # like GCC High / DoD: the API's app ID URI is not its host, and only it is known
            if resource == alias.removesuffix("/.default").rstrip("/"):
                return "defender", None
        elif resource == self.sim.defender_url:
            return "defender", None
        return "", self._error(
            400,
            "invalid_resource",
            500011,
            f"The resource principal named {resource} was not found in the tenant named"
            f" {tenant.organization.get('displayName') or tenant.tenant_id}. This can happen"
            " if the application has not been installed by the administrator of the tenant"
            " or consented to by any user in the tenant. You might have sent your"
            " authentication request to the wrong tenant.",
        )


def doc_tenant(doc: dict[str, Any]) -> str:
    """The tenant id the recorded OpenID document was fetched for (from its issuer)."""
    issuer = str(doc["issuer"])
    return issuer.removeprefix("https://login.microsoftonline.com/").split("/", 1)[0]


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    """client_secret_basic: (client_id, secret) from an Authorization: Basic header."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(header[6:].strip()).decode("utf-8")
    except (ValueError, binascii.Error):
        return None
    user, sep, password = raw.partition(":")
    return (unquote(user), unquote(password)) if sep else None
