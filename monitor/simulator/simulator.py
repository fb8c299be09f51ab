"""The Simulator: four loopback listeners (login, graph, defender over HTTPS; admin over HTTP)
sharing one set of tenants, counters, faults and rate limits."""

from __future__ import annotations

import logging
import shutil
import ssl
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx
import yaml

from monitor.simulator.certs import ServerTLS, write_private
from monitor.simulator.defender import HUNTING, DefenderApi
from monitor.simulator.errors import aad_error
from monitor.simulator.faults import DEFAULT_RATE_LIMITED, Fault, FaultBook, RateLimiter
from monitor.simulator.graph import GraphApi
from monitor.simulator.httpd import Request, Response, Route, SimHTTPServer, json_response
from monitor.simulator.hunting import CpuQuota
from monitor.simulator.login import LoginApi
from monitor.simulator.tenant import SimTenant
from monitor.simulator.tokens import TokenError, TokenIssuer, TokenProblem

log = logging.getLogger("monitor.simulator")

Credential = Literal["secret", "secret_file", "certificate"]

_GRAPH_401 = {
    TokenProblem.MISSING: "Access token is empty.",
    TokenProblem.MALFORMED: "IDX14100: JWT is not well formed, there are no dots (.).",
    TokenProblem.SIGNATURE: "Access token validation failure. Invalid signature.",
    TokenProblem.EXPIRED: "Access token has expired or is not yet valid.",
    TokenProblem.AUDIENCE: "Access token validation failure. Invalid audience.",
}
_DEFENDER_401 = {
    TokenProblem.MISSING: "Authorization header is missing or is not a Bearer token.",
    TokenProblem.MALFORMED: "The access token is malformed.",
    TokenProblem.SIGNATURE: "The access token signature is invalid.",
    TokenProblem.EXPIRED: "The access token has expired or is not yet valid.",
    TokenProblem.AUDIENCE: "The access token audience is not this API.",
}
_MALFORMED_BODY = (
    b'{"@odata.context": "simulated", "value": [{"id": "6dd3f7ce", "computerDnsName": '
)


class Simulator:
    """A fake Microsoft cloud on 127.0.0.1: Entra ID tokens, Graph and Defender over real HTTPS.

    Use as a context manager or call start()/stop(). Tenants may be added before or after start.
    """

    def __init__(
        self,
        tenants: Iterable[SimTenant] = (),
        state_dir: Path | str | None = None,
        *,
        token_lifetime: int = 3599,
        graph_short_pages: bool = False,
        rate_limits: bool = False,
        rate_limit_per_minute: int = 100,
        rate_limit_per_hour: int = 1500,
        rate_limit_minute_seconds: float = 60.0,
        rate_limit_hour_seconds: float = 3600.0,
        rate_limited_endpoints: Iterable[str] = DEFAULT_RATE_LIMITED,
        hunting_limits: bool = True,
        ports: tuple[int, int, int, int] = (0, 0, 0, 0),
    ) -> None:
        self._own_state_dir = state_dir is None
        self.state_dir = Path(
            tempfile.mkdtemp(prefix="mde-sim-") if state_dir is None else state_dir
        ).resolve()
        self.graph_short_pages = graph_short_pages
        # the Defender API's app ID URI at the token endpoint (None: its origin, as in tests)
        self.defender_resource: str | None = None
        self.issuer = TokenIssuer(token_lifetime)
        self.faults = FaultBook()
        self.rate_limiter = RateLimiter(
            rate_limit_per_minute,
            rate_limit_per_hour,
            minute_seconds=rate_limit_minute_seconds,
            hour_seconds=rate_limit_hour_seconds,
            endpoints=rate_limited_endpoints,
        )
        self.rate_limiter.enabled = rate_limits
        # advanced hunting's own documented limits: 45 calls/min, 1,500/hour, a CPU quota per hour
        self.hunting_limiter = RateLimiter(
            45,
            1500,
            minute_seconds=rate_limit_minute_seconds,
            hour_seconds=rate_limit_hour_seconds,
            endpoints=[HUNTING],
        )
        self.hunting_limiter.enabled = hunting_limits
        self.hunting_quota = CpuQuota(rate_limit_hour_seconds)
        self._ports = ports
        self._tenants: dict[str, SimTenant] = {}
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._tenant_counts: dict[str, Counter[str]] = {}
        self._stopping = threading.Event()
        self._servers: dict[str, SimHTTPServer] = {}
        self._tls: ServerTLS | None = None
        self.login = LoginApi(self)
        self.graph = GraphApi(self)
        self.defender = DefenderApi(self)
        for t in tenants:
            self.add_tenant(t)

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> Simulator:
        """Bind the four listeners on 127.0.0.1 and serve in daemon threads."""
        if self._servers:
            return self
        from monitor.simulator.admin import AdminApi

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._tls = ServerTLS(self.state_dir)
        ctx = self._tls.server_context()
        self._stopping.clear()
        admin = AdminApi(self)
        try:
            for (name, dispatch, tls), port in zip(
                (
                    ("login", self._dispatch, True),
                    ("graph", self._dispatch, True),
                    ("defender", self._dispatch, True),
                    ("admin", admin.dispatch, False),
                ),
                self._ports,
                strict=True,
            ):
                self._servers[name] = SimHTTPServer(name, port, dispatch, ctx if tls else None)
        except OSError:
            for server in self._servers.values():
                server.server_close()
            self._servers.clear()
            raise
        for server in self._servers.values():
            server.start()
        log.info("simulator started", extra={"urls": self.urls()})
        return self

    def stop(self) -> None:
        """Stop serving (hanging requests are released) and remove a temporary state dir."""
        self._stopping.set()
        for server in self._servers.values():
            server.stop()
        self._servers.clear()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._servers else "stopped"
        return f"Simulator({state}, tenants={list(self._tenants)})"

    # ---- URLs and TLS -----------------------------------------------------------------

    def _url(self, name: str) -> str:
        server = self._servers.get(name)
        if server is None:
            raise RuntimeError("the simulator is not started (call start() first)")
        return server.base_url

    @property
    def authority_url(self) -> str:
        """Entra ID login origin; MSAL's authority is f"{authority_url}/{tenant_id}"."""
        return self._url("login")

    @property
    def graph_url(self) -> str:
        """Graph origin; clients append /v1.0/..."""
        return self._url("graph")

    @property
    def defender_url(self) -> str:
        """Defender origin; clients append /api/..."""
        return self._url("defender")

    @property
    def admin_url(self) -> str:
        """Plain-HTTP admin JSON API."""
        return self._url("admin")

    @property
    def ca_path(self) -> str:
        """Path of the CA PEM (in state_dir) that signed the listeners' certificate."""
        if self._tls is None:
            raise RuntimeError("the simulator is not started (call start() first)")
        return str(self._tls.ca_path)

    def ssl_context(self) -> ssl.SSLContext:
        """A client SSL context trusting the simulator's CA (pass as httpx `verify=`)."""
        return ssl.create_default_context(cafile=self.ca_path)

    def http_client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client that trusts the simulator's CA and ignores proxy settings."""
        kwargs.setdefault("verify", self.ssl_context())
        kwargs.setdefault("trust_env", False)
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(**kwargs)

    def urls(self) -> dict[str, str]:
        return {
            "authority_url": self.authority_url,
            "graph_url": self.graph_url,
            "defender_url": self.defender_url,
            "admin_url": self.admin_url,
        }

    # ---- tenants ----------------------------------------------------------------------

    def add_tenant(self, tenant: SimTenant) -> SimTenant:
        """Serve another tenant (ids must be unique)."""
        with self._lock:
            if tenant.tenant_id in self._tenants:
                raise ValueError(f"tenant {tenant.tenant_id} is already simulated")
            tenant.state_dir = self.state_dir
            self._tenants[tenant.tenant_id] = tenant
        return tenant

    @property
    def tenants(self) -> list[SimTenant]:
        return list(self._tenants.values())

    def tenant(self, tenant_id: str) -> SimTenant:
        """The live tenant (mutate it with its methods)."""
        try:
            return self._tenants[tenant_id]
        except KeyError:
            raise KeyError(f"no simulated tenant {tenant_id!r}") from None

    def find_tenant(self, name: str) -> SimTenant | None:
        """A tenant by id (any case) or by one of its verified domain names."""
        low = name.lower()
        for t in self._tenants.values():
            if t.tenant_id.lower() == low or low in (d.lower() for d in t.domains()):
                return t
        return None

    # ---- knobs ------------------------------------------------------------------------

    @property
    def token_lifetime(self) -> int:
        return self.issuer.lifetime

    @token_lifetime.setter
    def token_lifetime(self, seconds: int) -> None:
        self.issuer.lifetime = int(seconds)

    def expire_tokens(self) -> None:
        """Every access token issued so far is now refused as expired (401)."""
        self.issuer.expire_all()

    def add_fault(self, fault: Fault) -> Fault:
        return self.faults.add(fault)

    def clear_faults(self) -> None:
        self.faults.clear()

    def set_rate_limits(self, enabled: bool) -> None:
        """Switch Defender's per-tenant rate limits on or off (windows restart)."""
        self.rate_limiter.enabled = enabled
        self.rate_limiter.reset()

    # ---- counts -----------------------------------------------------------------------

    def counts(self, tenant_id: str | None = None) -> dict[str, int]:
        """Requests per endpoint key (all tenants, or one tenant's)."""
        with self._lock:
            if tenant_id is None:
                return dict(self._counts)
            return dict(self._tenant_counts.get(tenant_id, {}))

    def counts_by_tenant(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {tid: dict(c) for tid, c in self._tenant_counts.items()}

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._tenant_counts.clear()

    def _count(self, key: str, tenant_id: str | None) -> None:
        with self._lock:
            self._counts[key] += 1
            if tenant_id is not None:
                self._tenant_counts.setdefault(tenant_id, Counter())[key] += 1

    # ---- config -----------------------------------------------------------------------

    def config_dict(
        self,
        name: str = "sim",
        polling_interval: str = "DISABLED",
        *,
        credential: Credential = "secret",
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The mde-monitor config for these tenants (first tenant `name`, then name-2, ...)."""
        entries = []
        for i, t in enumerate(self.tenants):
            entry: dict[str, Any] = {
                "name": t.name or (name if i == 0 else f"{name}-{i + 1}"),
                "description": f"simulated tenant {t.organization.get('displayName', '')}".strip(),
                "tenant_id": t.tenant_id,
                "client_id": t.client_id,
            }
            if credential == "certificate":
                if t.certificate is None:
                    t.add_certificate()
                assert t.certificate is not None
                entry["certificate"] = {
                    "pem_path": str(t.certificate.pem_path),
                    "thumbprint": t.certificate.thumbprint,
                }
            elif credential == "secret_file":
                path = self.state_dir / f"secret-{t.tenant_id}"
                write_private(path, t.client_secret.encode())
                entry["client_secret_file"] = str(path)
            else:
                entry["client_secret"] = t.client_secret
            entry["polling_interval"] = polling_interval
            entry["cloud"] = "custom"
            entry["endpoints"] = {
                "authority": self.authority_url,
                "graph": self.graph_url,
                "defender": self.defender_url,
            }
            entries.append(entry)
        doc: dict[str, Any] = {"ca_bundle": self.ca_path}
        doc.update(extra or {})
        doc["tenants"] = entries
        return doc

    def config_yaml(
        self,
        name: str = "sim",
        polling_interval: str = "DISABLED",
        *,
        credential: Credential = "secret",
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A ready mde-monitor config (custom cloud endpoints, ca_bundle, credentials)."""
        doc = self.config_dict(name, polling_interval, credential=credential, extra=extra)
        head = "# mde-monitor config for the local simulator (generated; holds credentials)\n"
        return head + yaml.safe_dump(doc, sort_keys=False)

    def write_config(
        self,
        path: Path | str,
        name: str = "sim",
        polling_interval: str = "DISABLED",
        *,
        credential: Credential = "secret",
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """config_yaml() written to `path` with mode 0600; returns the path."""
        target = Path(path)
        text = self.config_yaml(name, polling_interval, credential=credential, extra=extra)
        write_private(target, text.encode())
        return target

    # ---- request pipeline -------------------------------------------------------------

    def _token_tenant(self, req: Request) -> str | None:
        auth = req.header("authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            return None
        claims = self.issuer.claims_if_signed(token.strip())
        tid = claims.get("tid") if claims else None
        return tid if isinstance(tid, str) else None

    def _dispatch(self, req: Request) -> Response:
        route = (
            self.login.route(req)
            if req.api == "login"
            else self.graph.route(req)
            if req.api == "graph"
            else self.defender.route(req)
        )
        tenant_id = route.tenant_hint if req.api == "login" else self._token_tenant(req)
        self._count(route.key, tenant_id)
        fault = self.faults.take(route.key, tenant_id, route.params.get("id"))
        if fault is not None:
            if fault.kind == "hang":
                if self._stopping.wait(fault.seconds):
                    return Response(503, mode="drop")
            elif fault.kind == "drop":
                return Response(0, mode="drop")
            elif fault.kind == "malformed":
                return Response(200, _MALFORMED_BODY, {}, "application/json; charset=utf-8")
            elif fault.kind == "status":
                return self._fault_status(req.api, fault)
        if req.api == "login":
            assert route.handler is not None
            resp = route.handler(req, **route.params)
        else:
            resp = self._serve_api(req, route, self.graph if req.api == "graph" else self.defender)
        if fault is not None and fault.kind == "truncated":
            resp.mode = "truncate"
        return resp

    def _serve_api(self, req: Request, route: Route, api: GraphApi | DefenderApi) -> Response:
        texts = _GRAPH_401 if req.api == "graph" else _DEFENDER_401
        try:
            claims = self.issuer.validate(req.header("authorization"), req.base_url)
        except TokenError as exc:
            return api.unauthorized(texts[exc.problem])
        tenant = self._tenants.get(str(claims.get("tid")))
        if tenant is None or claims.get("appid") != tenant.client_id:
            return api.unauthorized(texts[TokenProblem.SIGNATURE])
        if route.role is not None:
            token_roles = claims.get("roles") or []
            if route.role not in token_roles or route.role not in tenant.roles:
                return api.forbidden(route.role)
        refused = api.check_request(req)
        if refused is not None:
            return refused
        if isinstance(api, DefenderApi):
            retry = self.rate_limiter.check(tenant.tenant_id, route.key)
            if retry is None and route.key == HUNTING:
                retry = self.hunting_limiter.check(tenant.tenant_id, route.key)
            if retry is not None:
                return api.too_many_requests(retry)
        assert route.handler is not None
        return route.handler(req, tenant, **route.params)

    def _fault_status(self, api_name: str, fault: Fault) -> Response:
        status = fault.status
        headers: dict[str, str] = {}
        if status in (429, 503) and fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        if api_name == "login":
            error = (
                "temporarily_unavailable"
                if status in (429, 503)
                else ("server_error" if status >= 500 else "invalid_request")
            )
            status, body = aad_error(
                status, error, 90033, "A transient error has occurred. Please try again."
            )
            return json_response(status, body, headers=headers)
        if fault.body == "none":
            return Response(status, b"", headers, "text/plain; charset=utf-8")
        api = self.graph if api_name == "graph" else self.defender
        resp = api.error(status, fault.message, fault.code)
        resp.headers.update(headers)
        return resp
