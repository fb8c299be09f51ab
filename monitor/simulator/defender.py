"""Defender for Endpoint API (/api): machines, logon users, vulnerabilities and their bulk lists."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import TYPE_CHECKING, Any

import orjson

from monitor.simulator.errors import defender_error
from monitor.simulator.httpd import Request, Response, Route, json_response
from monitor.simulator.hunting import QueryError, run_query
from monitor.simulator.tenant import HUNTING_ROLE, ODATA_VULN_TYPE, SimTenant

if TYPE_CHECKING:
    from monitor.simulator.simulator import Simulator

CONTENT_TYPE = "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8"
MAX_MACHINES_TOP = 10_000
MAX_VULNERABILITIES_TOP = 8_000
MAX_MACHINE_VULNERABILITIES_TOP = 10_000
HUNTING = "defender:/api/advancedqueries/run"

_UNSUPPORTED = ("$filter", "$orderby", "$expand", "$select", "$search")

# role -> the permissions Defender names in its 403 message
_REQUIRED = {
    "Machine.Read.All": "Machine.ReadWrite.All, Machine.Read.All",
    "User.Read.All": "User.Read.All",
    "Vulnerability.Read.All": "Vulnerability.Read.All",
    HUNTING_ROLE: HUNTING_ROLE,
}


def _err(status: int, message: str | None = None, code: str | None = None) -> Response:
    return json_response(status, defender_error(status, message, code), CONTENT_TYPE)


def _paging(req: Request, max_top: int) -> tuple[int, int] | Response:
    """($top, $skip) with Defender's limits; $top defaults to the maximum."""
    values = []
    for name, default in (("$top", max_top), ("$skip", 0)):
        raw = req.query.get(name)
        if raw is None:
            values.append(default)
            continue
        try:
            value = int(raw)
        except ValueError:
            return _err(400, f"Invalid ODATA query: {name}={raw!r} is not an integer.",
                        "InvalidRequestBody")  # fmt: skip
        if value < 0:
            return _err(400, f"Invalid ODATA query: {name} must not be negative.", "BadRequest")
        values.append(value)
    top, skip = values
    if top > max_top:
        return _err(
            400,
            f"Invalid ODATA query: the value of $top ({top}) exceeds the maximum allowed"
            f" ({max_top}).",
            "BadRequest",
        )
    return top, skip


def _page(items: Iterable[Any], top: int, skip: int) -> list[Any]:
    if isinstance(items, list):
        return items[skip : skip + top]
    return list(islice(items, skip, skip + top))


def _collection(
    context: str, items: list[Any], count: int | None = None, next_link: str | None = None
) -> Response:
    doc: dict[str, Any] = {"@odata.context": context}
    if count is not None:
        doc["@odata.count"] = count
    doc["value"] = items
    if next_link is not None:
        doc["@odata.nextLink"] = next_link
    return Response(200, orjson.dumps(doc), {}, CONTENT_TYPE)


def _list_page(
    req: Request,
    tenant: SimTenant,
    key: str,
    context: str,
    total: int,
    page: Callable[[int, int], list[Any]],
    top: int,
    skip: int,
) -> Response:
    """One page of a Defender list, with the tenant's real-world behaviours:
    `defender_page_size` (+ nextLink unless `defender_next_link` is off), `short_lists`
    (items missing at the end, no link), `odata_count` (the true total), `next_link_origin`."""
    served = total - min(total, tenant.short_lists.get(key, 0))
    size = min(top, tenant.defender_page_size or top)
    items = page(skip, max(0, min(size, served - skip)))
    link = None
    end = skip + len(items)
    if tenant.defender_page_size is not None and tenant.defender_next_link and end < served:
        origin = tenant.next_link_origin or req.base_url
        link = f"{origin}{req.path}?$top={top}&$skip={end}"
    return _collection(context, items, total if tenant.odata_count else None, link)


class DefenderApi:
    """Routes and handlers of the Defender listener (paths are case-insensitive, as Defender's)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def route(self, req: Request) -> Route:
        parts = [p for p in req.path.split("/") if p]
        low = [p.lower() for p in parts]
        if not low or low[0] != "api":
            return Route("defender:unknown", self.not_found)
        if low[1:] == ["machines"]:
            return Route("defender:/api/machines", self.machines, role="Machine.Read.All")
        if len(low) == 3 and low[1] == "machines":
            return Route("defender:/api/machines/{id}", self.machine, {"id": parts[2]},
                         role="Machine.Read.All")  # fmt: skip
        if len(low) == 4 and low[1] == "machines" and low[3] == "logonusers":
            return Route("defender:/api/machines/{id}/logonusers", self.logon_users,
                         {"id": parts[2]}, role="User.Read.All")  # fmt: skip
        if len(low) == 4 and low[1] == "machines" and low[3] == "vulnerabilities":
            return Route("defender:/api/machines/{id}/vulnerabilities", self.machine_vulns,
                         {"id": parts[2]}, role="Vulnerability.Read.All")  # fmt: skip
        if low[1:] == ["vulnerabilities"]:
            return Route("defender:/api/vulnerabilities", self.vulnerabilities,
                         role="Vulnerability.Read.All")  # fmt: skip
        if low[1:] == ["vulnerabilities", "machinesvulnerabilities"]:
            return Route("defender:/api/vulnerabilities/machinesVulnerabilities",
                         self.machines_vulnerabilities, role="Vulnerability.Read.All")  # fmt: skip
        if low[1:] == ["advancedqueries", "run"]:
            return Route(HUNTING, self.advanced_query, role=HUNTING_ROLE)
        if len(low) == 3 and low[1] == "vulnerabilities":
            return Route("defender:/api/vulnerabilities/{id}", self.vulnerability,
                         {"id": parts[2]}, role="Vulnerability.Read.All")  # fmt: skip
        return Route("defender:unknown", self.not_found)

    # ---- errors used by the simulator's auth and rate-limit steps ----------------------

    def unauthorized(self, message: str) -> Response:
        return _err(401, message, "Unauthorized")

    def forbidden(self, role: str) -> Response:
        return _err(
            403,
            "The application does not have any of the required application permissions"
            f" ({_REQUIRED.get(role, role)}) to access the resource.",
            "Forbidden",
        )

    def too_many_requests(self, retry_after: int) -> Response:
        resp = _err(429, f"Rate limit is exceeded. Try again in {retry_after} seconds.",
                    "TooManyRequests")  # fmt: skip
        resp.headers["Retry-After"] = str(retry_after)
        return resp

    def error(self, status: int, message: str | None = None, code: str | None = None) -> Response:
        return _err(status, message, code)

    # ---- handlers ---------------------------------------------------------------------

    def not_found(self, req: Request, tenant: SimTenant | None = None) -> Response:
        return _err(404, f"Resource {req.path} was not found.", "ResourceNotFound")

    def check_request(self, req: Request) -> Response | None:
        """405 for anything but GET (POST for advanced hunting); 400 for query options the
        simulator does not implement."""
        if [p.lower() for p in req.path.split("/") if p] == ["api", "advancedqueries", "run"]:
            if req.method != "POST":
                return _err(405, f"The requested resource does not support http method"
                            f" '{req.method}'.", "MethodNotAllowed")  # fmt: skip
            return None
        if req.method not in ("GET", "HEAD"):
            return _err(405, f"The requested resource does not support http method '{req.method}'.",
                        "MethodNotAllowed")  # fmt: skip
        for option in _UNSUPPORTED:
            if option in req.query:
                return _err(400, f"The simulator does not support {option}.", "BadRequest")
        return None

    def machines(self, req: Request, tenant: SimTenant) -> Response:
        paging = _paging(req, MAX_MACHINES_TOP)
        if isinstance(paging, Response):
            return paging
        top, skip = paging
        with tenant.lock:
            if not tenant.machines:
                return _err(404, "No machines found", "ResourceNotFound")
            machines = list(tenant.machines.values())
        return _list_page(
            req,
            tenant,
            "defender:/api/machines",
            f"{req.base_url}/api/$metadata#Machines",
            len(machines),
            lambda skip, top: _page(machines, top, skip),
            top,
            skip,
        )

    def machine(self, req: Request, tenant: SimTenant, id: str) -> Response:
        found = tenant.machines.get(id)
        if found is None:
            return _err(404, f"Machine {id} was not found", "ResourceNotFound")
        doc = {"@odata.context": f"{req.base_url}/api/$metadata#Machines/$entity", **found}
        return Response(200, orjson.dumps(doc), {}, CONTENT_TYPE)

    def logon_users(self, req: Request, tenant: SimTenant, id: str) -> Response:
        machine = tenant.machines.get(id)
        # discovered devices (not onboarded) are listed, but have no logon users to ask for
        if machine is None or machine.get("onboardingStatus", "Onboarded") != "Onboarded":
            return _err(404, f"Machine {id} was not found", "ResourceNotFound")
        items = list(tenant.logon_users.get(id, []))
        return _collection(f"{req.base_url}/api/$metadata#Users", items)

    def machine_vulns(self, req: Request, tenant: SimTenant, id: str) -> Response:
        if id not in tenant.machines:
            return _err(404, f"Machine {id} was not found", "ResourceNotFound")
        paging = _paging(req, MAX_VULNERABILITIES_TOP)
        if isinstance(paging, Response):
            return paging
        top, skip = paging
        items = tenant.machine_vulnerabilities(id)
        return _collection(
            f"{req.base_url}/api/$metadata#Vulnerabilities/{ODATA_VULN_TYPE.lstrip('#')}",
            _page(items, top, skip),
            count=len(items),
        )

    def vulnerabilities(self, req: Request, tenant: SimTenant) -> Response:
        paging = _paging(req, MAX_VULNERABILITIES_TOP)
        if isinstance(paging, Response):
            return paging
        top, skip = paging
        return _list_page(
            req,
            tenant,
            "defender:/api/vulnerabilities",
            f"{req.base_url}/api/$metadata#Vulnerabilities",
            tenant.catalogue_size(),
            tenant.catalogue_page,
            top,
            skip,
        )

    def vulnerability(self, req: Request, tenant: SimTenant, id: str) -> Response:
        cve = tenant.cves.get(id) or tenant.cves.get(id.upper())
        if cve is None:
            return _err(404, f"Vulnerability {id} was not found", "ResourceNotFound")
        doc: dict[str, Any] = {
            "@odata.context": f"{req.base_url}/api/$metadata#Vulnerabilities/$entity"
        }
        doc.update({k: v for k, v in cve.items() if k != "@odata.type"})
        doc["exposedMachines"] = tenant.exposure().get(cve["id"], 0)
        return Response(200, orjson.dumps(doc), {}, CONTENT_TYPE)

    def machines_vulnerabilities(self, req: Request, tenant: SimTenant) -> Response:
        paging = _paging(req, MAX_MACHINE_VULNERABILITIES_TOP)
        if isinstance(paging, Response):
            return paging
        top, skip = paging
        items = tenant.machine_vulnerability_list()
        return _list_page(
            req,
            tenant,
            "defender:/api/vulnerabilities/machinesVulnerabilities",
            f"{req.base_url}/api/$metadata#MachineVulnerabilities",
            len(items),
            lambda skip, top: _page(items, top, skip),
            top,
            skip,
        )

    def advanced_query(self, req: Request, tenant: SimTenant) -> Response:
        """POST {"Query": "..."}: DeviceLogonEvents summarised (see monitor.simulator.hunting)."""
        try:
            body = req.json()
        except ValueError as exc:
            return _err(400, str(exc), "InvalidRequestBody")
        text = body.get("Query", body.get("query")) if isinstance(body, dict) else None
        try:
            answer = run_query(tenant, text, self.sim.hunting_quota)
        except QueryError as exc:
            resp = _err(exc.status, str(exc), exc.code)
            if exc.retry_after is not None:
                resp.headers["Retry-After"] = str(exc.retry_after)
            return resp
        return Response(200, orjson.dumps(answer), {}, "application/json; charset=utf-8")
