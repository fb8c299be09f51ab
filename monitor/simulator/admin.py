"""The simulator's admin JSON API (plain HTTP on 127.0.0.1) and a small Python client for it.

GET    /admin/health                      {"status": "ok"}
GET    /admin/info                        URLs, CA path, tenants (ids and sizes, no secrets)
GET    /admin/tenants                     [tenant summary, ...]
GET    /admin/tenants/{tid}               one tenant's summary
POST   /admin/tenants/{tid}/mutate        {"op": "set_machine", "args": {"machine_id": ..., ...}}
GET    /admin/counts                      {"total": {key: n}, "tenants": {tid: {key: n}}}
POST   /admin/counts/reset
GET    /admin/faults                      [fault, ...]
POST   /admin/faults                      a Fault as JSON -> the fault with its id
DELETE /admin/faults
POST   /admin/rate-limits                 {"enabled": true}
POST   /admin/tokens/expire               every issued access token now fails (401)
POST   /admin/settings                    {"token_lifetime": 60, "graph_short_pages": true,
                                           "defender_resource": "https://x/windowsatpservice"}
POST   /admin/tenants/{tid}/mutate        {"op": "set_behaviour", "args": {"defender_page_size":
                                           500, "catalogue_extra": 250000, ...}} (tenant.py)
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from monitor.simulator.faults import Fault
from monitor.simulator.httpd import Request, Response, json_response
from monitor.simulator.tenant import MUTATION_OPS, parse_iso

if TYPE_CHECKING:
    from monitor.simulator.simulator import Simulator


class AdminError(Exception):
    """The admin API refused a call (status and message from the server)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"simulator admin API: {status}: {message}")
        self.status = status
        self.message = message


def _error(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


class AdminApi:
    """Dispatches admin requests onto the Simulator and its tenants."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def dispatch(self, req: Request) -> Response:
        parts = [p for p in req.path.split("/") if p]
        if not parts or parts[0] != "admin":
            return _error(404, f"unknown admin path {req.path}")
        try:
            return self._route(req, req.method, parts[1:])
        except KeyError as exc:
            return _error(404, str(exc.args[0]) if exc.args else "not found")
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))

    def _route(self, req: Request, method: str, p: list[str]) -> Response:
        sim = self.sim
        if p == ["health"] and method == "GET":
            return json_response(200, {"status": "ok"})
        if p == ["info"] and method == "GET":
            return json_response(200, self.info())
        if p == ["tenants"] and method == "GET":
            return json_response(200, [t.summary() for t in sim.tenants])
        if len(p) == 2 and p[0] == "tenants" and method == "GET":
            return json_response(200, sim.tenant(p[1]).summary())
        if len(p) == 3 and p[0] == "tenants" and p[2] == "mutate" and method == "POST":
            return self._mutate(p[1], req.json())
        if p == ["counts"] and method == "GET":
            return json_response(200, {"total": sim.counts(), "tenants": sim.counts_by_tenant()})
        if p == ["counts", "reset"] and method == "POST":
            sim.reset_counts()
            return json_response(200, {"status": "ok"})
        if p == ["faults"]:
            if method == "GET":
                return json_response(200, [f.to_json() for f in sim.faults.active()])
            if method == "POST":
                body = req.json()
                if not isinstance(body, dict):
                    raise ValueError("a fault must be a JSON object")
                return json_response(200, sim.add_fault(Fault.from_json(body)).to_json())
            if method == "DELETE":
                sim.clear_faults()
                return json_response(200, {"status": "ok"})
        if p == ["rate-limits"] and method == "POST":
            body = req.json()
            enabled = body.get("enabled") if isinstance(body, dict) else None
            if not isinstance(enabled, bool):
                raise ValueError("rate-limits: 'enabled' must be true or false")
            sim.set_rate_limits(enabled)
            return json_response(200, {"enabled": enabled})
        if p == ["tokens", "expire"] and method == "POST":
            sim.expire_tokens()
            return json_response(200, {"status": "ok"})
        if p == ["settings"] and method == "POST":
            return self._settings(req.json())
        return _error(404, f"unknown admin call {method} {req.path}")

    def info(self) -> dict[str, Any]:
        sim = self.sim
        return {
            **sim.urls(),
            "ca_path": sim.ca_path,
            "state_dir": str(sim.state_dir),
            "token_lifetime": sim.token_lifetime,
            "rate_limits": sim.rate_limiter.enabled,
            "graph_short_pages": sim.graph_short_pages,
            "defender_resource": sim.defender_resource,
            "tenants": [t.summary() for t in sim.tenants],
        }

    def _mutate(self, tenant_id: str, body: Any) -> Response:
        if not isinstance(body, dict):
            raise ValueError("mutate: body must be a JSON object {op, args}")
        op, args = body.get("op"), body.get("args") or {}
        if op not in MUTATION_OPS:
            raise ValueError(f"mutate: unknown op {op!r}; known: {', '.join(MUTATION_OPS)}")
        if not isinstance(args, dict):
            raise ValueError("mutate: 'args' must be a JSON object")
        tenant = self.sim.tenant(tenant_id)
        if op == "touch_all_machines" and isinstance(args.get("at"), str):
            args = {**args, "at": parse_iso(args["at"])}
        try:
            result = getattr(tenant, op)(**args)
        except TypeError as exc:
            raise ValueError(f"mutate {op}: {exc}") from None
        return json_response(200, {"result": result})

    def _settings(self, body: Any) -> Response:
        if not isinstance(body, dict):
            raise ValueError("settings: body must be a JSON object")
        unknown = set(body) - {"token_lifetime", "graph_short_pages", "defender_resource"}
        if unknown:
            raise ValueError(f"settings: unknown field(s) {', '.join(sorted(unknown))}")
        if "token_lifetime" in body:
            value = body["token_lifetime"]
            if not isinstance(value, int) or value < 1:
                raise ValueError("settings: token_lifetime must be a positive integer")
            self.sim.token_lifetime = value
        if "graph_short_pages" in body:
            if not isinstance(body["graph_short_pages"], bool):
                raise ValueError("settings: graph_short_pages must be true or false")
            self.sim.graph_short_pages = body["graph_short_pages"]
        if "defender_resource" in body:
            value = body["defender_resource"]
            if value is not None and not (isinstance(value, str) and value.startswith("https://")):
                raise ValueError("settings: defender_resource must be an https URI or null")
            self.sim.defender_resource = value
        return json_response(200, self.info())


class SimulatorAdminClient:
    """Drive a simulator running in another process through its admin URL."""

    def __init__(self, admin_url: str, timeout: float = 10.0) -> None:
        self.admin_url = admin_url.rstrip("/")
        self._http = httpx.Client(base_url=self.admin_url, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SimulatorAdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        resp = self._http.request(method, f"/admin{path}", json=body)
        data = resp.json() if resp.content else None
        if resp.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else resp.text
            raise AdminError(resp.status_code, str(message))
        return data

    def health(self) -> bool:
        try:
            return bool(self._call("GET", "/health").get("status") == "ok")
        except (httpx.HTTPError, AdminError):
            return False

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/info")
        return result

    def tenants(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/tenants")
        return result

    def mutate(self, tenant_id: str, op: str, **args: Any) -> Any:
        """Call a SimTenant mutation by name, e.g. mutate(tid, "set_machine", machine_id=..., healthStatus="Inactive")."""
        return self._call("POST", f"/tenants/{tenant_id}/mutate", {"op": op, "args": args})[
            "result"
        ]

    def counts(self, tenant_id: str | None = None) -> dict[str, int]:
        data = self._call("GET", "/counts")
        result: dict[str, int] = (
            data["total"] if tenant_id is None else data["tenants"].get(tenant_id, {})
        )
        return result

    def reset_counts(self) -> None:
        self._call("POST", "/counts/reset")

    def add_fault(self, fault: Fault | dict[str, Any]) -> dict[str, Any]:
        body = fault.to_json() if isinstance(fault, Fault) else dict(fault)
        body.pop("id", None)
        result: dict[str, Any] = self._call("POST", "/faults", body)
        return result

    def faults(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/faults")
        return result

    def clear_faults(self) -> None:
        self._call("DELETE", "/faults")

    def set_rate_limits(self, enabled: bool) -> None:
        self._call("POST", "/rate-limits", {"enabled": enabled})

    def expire_tokens(self) -> None:
        self._call("POST", "/tokens/expire")

    def settings(self, **values: Any) -> dict[str, Any]:
        """token_lifetime=..., graph_short_pages=..., defender_resource=..."""
        result: dict[str, Any] = self._call("POST", "/settings", values)
        return result
