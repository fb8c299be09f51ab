"""Sign-in: one MSAL confidential client per tenant, tokens reused from MSAL's cache until expiry.

MSAL gets the product's own httpx client, so the CA bundle, timeouts and proxy are the same as for
the API calls (REQUESTS_CA_BUNDLE, which this kind of machine sets, is never consulted).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import httpx
import msal

from monitor.collect.errors import AuthError
from monitor.config import Cloud, TenantConfig
from monitor.redact import register_secret, scrub

# AADSTS codes we explain; anything else is shown with Entra's own first sentence.
_AADSTS_HINTS: dict[str, str] = {
    "7000215": "wrong client secret: use the secret's Value (not its ID), or create a new secret",
    "7000222": "the client secret has expired: create a new one in the app registration",
    "700016": "unknown client id in this tenant: check client_id, or the app is not consented here",
    "90002": "unknown tenant: check tenant_id",
    "900023": "tenant id is neither a valid GUID nor a verified domain: check tenant_id",
    "900021": "tenant id missing in the request: check tenant_id",
    "700027": "the certificate assertion was rejected: check the certificate and its thumbprint",
    "700024": "the client assertion is not within its valid time range: check the clock",
    "65001": "admin consent is missing: grant admin consent for the API permissions",
    "500011": "the API resource is not found in this tenant: check the cloud/endpoints",
}

_AADSTS = re.compile(r"AADSTS(\d+)")


class MsalHttpClient:
    """Our httpx client in the shape MSAL expects (requests-like `get`/`post`).

    MSAL passes the certificate's client assertion as bytes; httpx would form-encode bytes as
    "b'...'", which Entra ID refuses (AADSTS50027), so form values are decoded first.
    """

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def post(self, url: str, data: Any = None, **kwargs: Any) -> httpx.Response:
        if isinstance(data, dict):
            data = {k: v.decode() if isinstance(v, bytes) else v for k, v in data.items()}
        return self._client.post(url, data=data, **kwargs)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self._client.get(url, **kwargs)

    def close(self) -> None:
        """The httpx client belongs to the caller; nothing to close here."""


def _credential(tenant: TenantConfig) -> str | dict[str, Any]:
    secret = tenant.secret()
    register_secret(secret)  # masked in every error, event and log from now on
    if secret is not None:
        return secret
    cert = tenant.certificate
    assert cert is not None  # validated by the config model
    if cert.pfx_path is not None:
        cred: dict[str, Any] = {"private_key_pfx_path": str(cert.pfx_path)}
        if cert.pfx_password is not None:
            cred["passphrase"] = cert.pfx_password.get_secret_value()
            register_secret(cred["passphrase"])
        return cred
    assert cert.pem_path is not None and cert.thumbprint
    return {"private_key": Path(cert.pem_path).read_text(), "thumbprint": cert.thumbprint}


def explain_auth_failure(result: dict[str, Any]) -> AuthError:
    """An AuthError from MSAL's error result, with the AADSTS code and what to do."""
    description = str(result.get("error_description") or result.get("error") or "sign-in failed")
    codes = result.get("error_codes") or []
    m = _AADSTS.search(description)
    code = m.group(1) if m else (str(codes[0]) if codes else None)
    first_line = scrub(description.split("\r\n")[0].split("\n")[0].split(" Trace ID:")[0])
    hint = _AADSTS_HINTS.get(code or "")
    aadsts = f"AADSTS{code}" if code else None
    message = f"sign-in failed ({aadsts or result.get('error', 'error')}): {hint or first_line}"
    return AuthError(message, code=aadsts, hint=hint)


class TokenProvider:
    """Access tokens for one tenant, one per API scope, cached by MSAL until they expire."""

    def __init__(self, tenant: TenantConfig, http_client: httpx.Client) -> None:
        self.tenant = tenant
        self._http = http_client
        self._lock = threading.Lock()
        self._msal: msal.ConfidentialClientApplication | None = None

    def _app(self) -> msal.ConfidentialClientApplication:
        """The MSAL client, created on first use (MSAL fetches the authority's metadata then)."""
        if self._msal is not None:
            return self._msal
        endpoints = self.tenant.cloud_endpoints()
        custom = self.tenant.cloud is Cloud.CUSTOM
        authority = f"{endpoints.authority}/{self.tenant.tenant_id}"
        try:
            self._msal = msal.ConfidentialClientApplication(
                self.tenant.client_id,
                client_credential=_credential(self.tenant),
                authority=authority,
                http_client=MsalHttpClient(self._http),
                validate_authority=not custom,
                instance_discovery=False if custom else None,
                timeout=self._http.timeout.read,
            )
        except ValueError:
            # MSAL only says "Unable to get authority configuration"; ask Entra for its own words.
            raise self._authority_error(authority) from None
        except (httpx.HTTPError, OSError) as exc:
            raise AuthError(
                f"cannot reach the sign-in endpoint: {type(exc).__name__}: {exc}"
            ) from None
        return self._msal

    def _authority_error(self, authority: str) -> AuthError:
        url = f"{authority}/v2.0/.well-known/openid-configuration"
        try:
            body = self._http.get(url).json()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            return AuthError(
                f"sign-in endpoint metadata unavailable at {authority}: {type(exc).__name__}"
            )
        if isinstance(body, dict) and ("error" in body or "error_codes" in body):
            return explain_auth_failure(body)
        return AuthError(f"sign-in endpoint metadata at {authority} is not usable")

    def __repr__(self) -> str:
        return f"TokenProvider(tenant={self.tenant.name!r})"

    def token(self, scope: str) -> str:
        """A valid access token for `scope`; raises AuthError with the AADSTS code on failure."""
        with self._lock:
            app = self._app()
            try:
                result = app.acquire_token_for_client(scopes=[scope])
            except (httpx.HTTPError, OSError) as exc:
                raise AuthError(
                    f"cannot reach the sign-in endpoint: {type(exc).__name__}: {exc}"
                ) from None
            except ValueError as exc:  # MSAL raises on unparsable discovery documents
                raise AuthError(f"sign-in endpoint answered unexpectedly: {exc}") from None
        if not result or "access_token" not in result:
            raise explain_auth_failure(result or {})
        return str(result["access_token"])

    def invalidate(self, scope: str) -> None:
        """Drop cached tokens for `scope` (the API said the token is no longer valid)."""
        with self._lock:
            if self._msal is None:
                return
            cache = self._msal.token_cache
            for at in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
                if scope.lower() in str(at.get("target", "")).lower().split():
                    cache.remove_at(at)
