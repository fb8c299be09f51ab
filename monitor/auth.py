"""Sign-in: one MSAL confidential client per tenant, tokens reused from MSAL's cache until expiry.

MSAL gets the product's own httpx client, so the CA bundle, timeouts and proxy are the same as for
the API calls (REQUESTS_CA_BUNDLE, which this kind of machine sets, is never consulted).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msal
import msal.exceptions

from monitor.collect.errors import AuthError
from monitor.collect.http import parse_retry_after
from monitor.config import Cloud, HttpSettings, TenantConfig
from monitor.redact import register_secret, scrub

log = logging.getLogger(__name__)

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
    "b'...'", which Entra ID refuses (AADSTS50027), so form values are decoded first. The last
    answer's status and Retry-After are kept so a transient failure can be retried in time.
    """

    def __init__(self, client: httpx.Client) -> None:
        self._client = client
        self.last_status: int | None = None
        self.last_retry_after: float | None = None

    def _seen(self, resp: httpx.Response) -> httpx.Response:
        self.last_status = resp.status_code
        self.last_retry_after = parse_retry_after(resp)
        return resp

    def post(self, url: str, data: Any = None, **kwargs: Any) -> httpx.Response:
        if isinstance(data, dict):
            data = {k: v.decode() if isinstance(v, bytes) else v for k, v in data.items()}
        self.last_status = None
        return self._seen(self._client.post(url, data=data, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        self.last_status = None
        return self._seen(self._client.get(url, **kwargs))

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


_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})


def explain_auth_failure(result: dict[str, Any], scope: str | None = None) -> AuthError:
    """An AuthError from MSAL's error result, with the AADSTS code, what to do and the scope."""
    description = str(result.get("error_description") or result.get("error") or "sign-in failed")
    codes = result.get("error_codes") or []
    m = _AADSTS.search(description)
    code = m.group(1) if m else (str(codes[0]) if codes else None)
    first_line = scrub(description.split("\r\n")[0].split("\n")[0].split(" Trace ID:")[0])
    hint = _AADSTS_HINTS.get(code or "")
    aadsts = f"AADSTS{code}" if code else None
    for_scope = f" for scope {scope}" if scope else ""
    message = f"sign-in failed{for_scope} ({aadsts or result.get('error', 'error')}): {hint or first_line}"
    return AuthError(
        message,
        code=aadsts,
        hint=hint,
        scope=scope,
        transient=result.get("error") in _TRANSIENT_ERRORS,
    )


class TokenProvider:
    """Access tokens for one tenant, one per API scope, cached by MSAL until they expire.

    Transient sign-in failures (5xx, 429, timeouts, connection errors, from the token endpoint or
    the discovery documents) are retried with backoff like the API calls; anything else, or the
    last transient failure, is an AuthError naming the scope. A scope that failed is not asked
    again in this session (one sync, one `check`).
    """

    def __init__(
        self,
        tenant: TenantConfig,
        http_client: httpx.Client,
        settings: HttpSettings | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.tenant = tenant
        self._http = http_client
        self._msal_http = MsalHttpClient(http_client)
        self._settings = settings or HttpSettings()
        self._sleep = sleep
        self._lock = threading.Lock()
        self._msal: msal.ConfidentialClientApplication | None = None
        self._throttle_cache: dict[Any, Any] = {}  # MSAL's 429/5xx replay cache; we retry ourselves
        self._failed: dict[str, AuthError] = {}

    def _transient(self, what: str, scope: str | None) -> AuthError:
        status = self._msal_http.last_status
        where = f"HTTP {status}" if status else "no answer"
        for_scope = f" for scope {scope}" if scope else ""
        return AuthError(
            f"sign-in endpoint unavailable{for_scope} ({what}, {where})",
            scope=scope,
            transient=True,
        )

    def _app(self, scope: str | None = None) -> msal.ConfidentialClientApplication:
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
                http_client=self._msal_http,
                validate_authority=not custom,
                instance_discovery=False if custom else None,
                timeout=self._http.timeout.read,
                http_cache=self._throttle_cache,
            )
        except ValueError:
            # MSAL only says "Unable to get authority configuration"; ask Entra for its own words.
            raise self._authority_error(authority, scope) from None
        except (msal.exceptions.MsalServiceError, RuntimeError):  # discovery answered 5xx
            raise self._transient("metadata", scope) from None
        except (httpx.HTTPError, OSError) as exc:
            raise AuthError(
                f"cannot reach the sign-in endpoint: {type(exc).__name__}",
                scope=scope,
                transient=True,
            ) from None
        return self._msal

    def _authority_error(self, authority: str, scope: str | None) -> AuthError:
        url = f"{authority}/v2.0/.well-known/openid-configuration"
        try:
            resp = self._http.get(url)
            body = resp.json()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            return AuthError(
                f"sign-in endpoint metadata unavailable at {authority}: {type(exc).__name__}",
                scope=scope,
                transient=True,
            )
        if isinstance(body, dict) and ("error" in body or "error_codes" in body):
            return explain_auth_failure(body, scope)
        return AuthError(
            f"sign-in endpoint metadata at {authority} is not usable (HTTP {resp.status_code})",
            scope=scope,
            transient=resp.status_code >= 500,
        )

    def __repr__(self) -> str:
        return f"TokenProvider(tenant={self.tenant.name!r})"

    def token(self, scope: str) -> str:
        """A valid access token for `scope`; raises AuthError (AADSTS code, scope) on failure."""
        with self._lock:
            failed = self._failed.get(scope)
            if failed is not None:
                raise failed
            s = self._settings
            deadline = time.monotonic() + s.max_retry_seconds
            attempt = 0
            while True:
                attempt += 1
                try:
                    return self._token_once(scope)
                except AuthError as exc:
                    wait = s.backoff(attempt)
                    if self._msal_http.last_retry_after is not None:
                        wait = max(wait, self._msal_http.last_retry_after)
                    remaining = deadline - time.monotonic()
                    if not exc.transient or attempt >= s.max_attempts or wait > remaining:
                        self._failed[scope] = exc  # the rest of this session fails fast
                        raise
                    log.info(
                        "sign-in retry",
                        extra={"tenant": self.tenant.name, "scope": scope, "error": str(exc)},
                    )
                    self._throttle_cache.clear()  # else MSAL replays the 5xx without asking
                    self._sleep(wait)

    def _token_once(self, scope: str) -> str:
        app = self._app(scope)
        try:
            result = app.acquire_token_for_client(scopes=[scope])
        except msal.exceptions.MsalServiceError:  # msal >= 1.33: 5xx from the token endpoint
            raise self._transient("token", scope) from None
        except msal.exceptions.MsalError as exc:
            raise AuthError(
                f"sign-in failed for scope {scope}: {type(exc).__name__}", scope=scope
            ) from None
        except (httpx.HTTPError, OSError) as exc:
            raise AuthError(
                f"cannot reach the sign-in endpoint for scope {scope}: {type(exc).__name__}",
                scope=scope,
                transient=True,
            ) from None
        except ValueError as exc:  # MSAL raises on unparsable discovery or token documents
            status = self._msal_http.last_status
            raise AuthError(
                f"sign-in endpoint answered unexpectedly for scope {scope}:"
                f" {type(exc).__name__} (HTTP {status})",
                scope=scope,
                transient=status is not None and status >= 500,
            ) from None
        if not result or "access_token" not in result:
            err = explain_auth_failure(result or {}, scope)
            status = self._msal_http.last_status
            if status is not None and (status >= 500 or status == 429):
                err.transient = True
            raise err
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
