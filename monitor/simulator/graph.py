"""Microsoft Graph v1.0: /organization, /users (with $select, $top and $skiptoken paging),
/users/delta, /groups/delta and /directoryRoles."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from monitor.simulator import directory, users_delta
from monitor.simulator.certs import b64url, b64url_decode
from monitor.simulator.errors import graph_error
from monitor.simulator.httpd import Request, Response, Route, json_response
from monitor.simulator.tenant import SimTenant

if TYPE_CHECKING:
    from monitor.simulator.simulator import Simulator

CONTENT_TYPE = (
    "application/json;odata.metadata=minimal;odata.streaming=true;"
    "IEEE754Compatible=false;charset=utf-8"
)
MAX_TOP = 999
DEFAULT_TOP = 100

# The properties Graph returns for a user without $select (the recorded ones, in their order).
_DEFAULT_USER_FIELDS = (
    "businessPhones",
    "displayName",
    "givenName",
    "jobTitle",
    "mail",
    "mobilePhone",
    "officeLocation",
    "preferredLanguage",
    "surname",
    "userPrincipalName",
    "id",
)
# microsoft.graph.user properties a client may $select (unknown names -> 400 like Graph).
USER_PROPERTIES = [
    *_DEFAULT_USER_FIELDS,
    "accountEnabled",
    "userType",
    "createdDateTime",
    "department",
    "companyName",
    "city",
    "country",
    "usageLocation",
    "employeeId",
    "onPremisesSyncEnabled",
    "lastPasswordChangeDateTime",
    "onPremisesSamAccountName",
    "onPremisesDomainName",
    "onPremisesImmutableId",
    "onPremisesLastSyncDateTime",
    "onPremisesSecurityIdentifier",
    "onPremisesUserPrincipalName",
    "otherMails",
    "proxyAddresses",
    "state",
    "streetAddress",
    "postalCode",
    "creationType",
    "deletedDateTime",
    "employeeType",
    "externalUserState",
    "identities",
    "imAddresses",
    "mailNickname",
    "passwordPolicies",
    "signInSessionsValidFromDateTime",
    "showInAddressList",
    "ageGroup",
    "consentProvidedForMinor",
    "legalAgeGroupClassification",
    "faxNumber",
    "employeeHireDate",
    "securityIdentifier",
    "assignedLicenses",
    "assignedPlans",
]
_USER_CANON = {p.lower(): p for p in USER_PROPERTIES}
_UNSUPPORTED = ("$filter", "$search", "$orderby", "$expand", "$skip")


def _err(status: int, message: str | None = None, code: str | None = None) -> Response:
    return json_response(status, graph_error(status, message, code), CONTENT_TYPE)


def _select(query: dict[str, str], canon: dict[str, str], type_name: str) -> list[str] | Response:
    raw = query.get("$select", "").strip()
    if not raw:
        return []
    out: list[str] = []
    for name in (p.strip() for p in raw.split(",")):
        if not name:
            continue
        prop = canon.get(name.lower())
        if prop is None:
            return _err(
                400,
                f"Could not find a property named '{name}' on type 'microsoft.graph.{type_name}'.",
            )
        if prop not in out:
            out.append(prop)
    return out


def _project(item: dict[str, Any], props: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    out = {p: item.get(p, defaults.get(p)) for p in props}
    if "id" not in out:
        out["id"] = item.get("id")
    return out


def encode_skiptoken(offset: int) -> str:
    return b64url(b"RFNwd" + orjson.dumps({"o": offset}))


def decode_skiptoken(token: str) -> int:
    """The offset in a $skiptoken this simulator issued; ValueError otherwise."""
    raw = b64url_decode(token)
    if not raw.startswith(b"RFNwd"):
        raise ValueError("not a simulator skiptoken")
    offset = orjson.loads(raw[5:]).get("o")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError("bad offset")
    return offset


class GraphApi:
    """Routes and handlers of the Graph listener."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def route(self, req: Request) -> Route:
        parts = [p for p in req.path.split("/") if p]
        if len(parts) >= 2 and parts[0] in ("v1.0", "beta"):
            resource = parts[1].lower()
            if resource == "organization" and len(parts) == 2:
                return Route("graph:/organization", self.organization, role="Organization.Read.All")
            if resource == "users" and len(parts) == 2:
                return Route("graph:/users", self.users, role="Directory.Read.All")
            if resource == "users" and parts[2:] in (["delta"], ["microsoft.graph.delta"]):
                return Route("graph:/users/delta", self.users_delta, role="Directory.Read.All")
            if resource == "groups" and parts[2:] in (["delta"], ["microsoft.graph.delta"]):
                return Route("graph:/groups/delta", self.groups_delta, role="Directory.Read.All")
            if resource == "directoryroles" and len(parts) == 2:
                return Route(
                    "graph:/directoryRoles", self.directory_roles, role="Directory.Read.All"
                )
            if resource == "directoryroles" and len(parts) == 4 and parts[3] == "members":
                return Route(
                    "graph:/directoryRoles/{id}/members",
                    self.role_members,
                    {"id": parts[2]},
                    role="Directory.Read.All",
                )
            if resource == "users" and len(parts) == 3:
                return Route(
                    "graph:/users/{id}", self.user, {"id": parts[2]}, role="Directory.Read.All"
                )
        return Route("graph:unknown", self.not_found)

    # ---- errors used by the simulator's auth step -------------------------------------

    def unauthorized(self, message: str) -> Response:
        resp = _err(401, message, "InvalidAuthenticationToken")
        resp.headers["WWW-Authenticate"] = (
            f'Bearer realm="", authorization_uri="{self.sim.authority_url}/common/oauth2/authorize",'
            ' client_id="00000003-0000-0000-c000-000000000000"'
        )
        return resp

    def forbidden(self, role: str) -> Response:
        return _err(403, "Insufficient privileges to complete the operation.",
                    "Authorization_RequestDenied")  # fmt: skip

    def error(self, status: int, message: str | None = None, code: str | None = None) -> Response:
        return _err(status, message, code)

    # ---- handlers ---------------------------------------------------------------------

    def not_found(self, req: Request, tenant: SimTenant | None = None) -> Response:
        segment = req.path.strip("/").split("/")[-1] or "/"
        return _err(400, f"Resource not found for the segment '{segment}'.")

    def check_request(self, req: Request) -> Response | None:
        """405 for anything but GET; 400 for query options the simulator does not implement."""
        if req.method not in ("GET", "HEAD"):
            return _err(405, f"The simulator does not support {req.method} here.",
                        "Request_BadRequest")  # fmt: skip
        for option in _UNSUPPORTED:
            if option == "$expand" and _expand_supported(req):
                continue
            if option in req.query:
                return _err(400, f"The simulator does not support {option} on this resource.")
        return None

    def organization(self, req: Request, tenant: SimTenant) -> Response:
        org = tenant.organization
        props = _select(req.query, {k.lower(): k for k in org}, "organization")
        if isinstance(props, Response):
            return props
        item = _project(org, props, {}) if props else org
        context = f"{req.base_url}/v1.0/$metadata#organization"
        if props:
            context += f"({','.join(props)})"
        return json_response(200, {"@odata.context": context, "value": [item]}, CONTENT_TYPE)

    def groups_delta(self, req: Request, tenant: SimTenant) -> Response:
        canon = {p.lower(): p for p in (*directory.GROUP_PROPERTIES, "members")}
        props = _select(req.query, canon, "group")
        if isinstance(props, Response):
            return props
        with tenant.lock:
            try:
                status, body = directory.groups_delta_page(
                    tenant.directory, req.query, req.base_url, req.path, props or ["id"]
                )
            except (ValueError, KeyError, orjson.JSONDecodeError):
                return _err(400, "Invalid delta or skip token.", "Request_BadRequest")
        return _delta_response(status, body)

    def users_delta(self, req: Request, tenant: SimTenant) -> Response:
        """`/users/delta` (see monitor.simulator.users_delta); `$top` is ignored, as Graph does."""
        props = _select(req.query, {**_USER_CANON, "manager": "manager"}, "user")
        if isinstance(props, Response):
            return props
        with tenant.lock:
            d = tenant.directory
            try:
                status, body = users_delta.users_delta_page(
                    tenant.users,
                    d.managers,
                    d.former_managers,
                    req.query,
                    req.base_url,
                    req.path,
                    props or list(_DEFAULT_USER_FIELDS),
                    {"accountEnabled": True},
                )
            except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
                return _err(400, "Invalid delta or skip token.", "Request_BadRequest")
        return _delta_response(status, body)

    def directory_roles(self, req: Request, tenant: SimTenant) -> Response:
        props = _select(
            req.query, {p.lower(): p for p in directory.ROLE_PROPERTIES}, "directoryRole"
        )
        if isinstance(props, Response):
            return props
        with tenant.lock:
            body = directory.directory_roles_body(
                tenant.directory, req.base_url, props, "$expand" in req.query
            )
        return json_response(200, body, CONTENT_TYPE)

    def role_members(self, req: Request, tenant: SimTenant, id: str) -> Response:
        with tenant.lock:
            try:
                body = directory.role_members_page(
                    tenant.directory, id, req.query, req.base_url, req.path
                )
            except (ValueError, KeyError, orjson.JSONDecodeError):
                return _err(400, "Invalid $skiptoken or $top.", "Request_BadRequest")
        if body is None:
            return _err(404, f"Resource '{id}' does not exist.", "Request_ResourceNotFound")
        return json_response(200, body, CONTENT_TYPE)

    def user(self, req: Request, tenant: SimTenant, id: str) -> Response:
        props = _select(req.query, _USER_CANON, "user")
        if isinstance(props, Response):
            return props
        found = tenant.users.get(id)
        if found is None:
            found = next(
                (u for u in tenant.users.values() if u.get("userPrincipalName") == id), None
            )
        if found is None:
            return _err(
                404,
                f"Resource '{id}' does not exist or one of its queried reference-property"
                " objects are not present.",
                "Request_ResourceNotFound",
            )
        doc = {"@odata.context": f"{req.base_url}/v1.0/$metadata#users/$entity"}
        doc.update(_project(found, props, {"accountEnabled": True}) if props else _default(found))
        return json_response(200, doc, CONTENT_TYPE)

    def users(self, req: Request, tenant: SimTenant) -> Response:
        props = _select(req.query, _USER_CANON, "user")
        if isinstance(props, Response):
            return props
        raw_top = req.query.get("$top")
        try:
            top = int(raw_top) if raw_top is not None else DEFAULT_TOP
        except ValueError:
            return _err(400, f"Invalid value '{raw_top}' for query option $top.")
        if not 1 <= top <= MAX_TOP:
            return _err(
                400,
                f"Invalid page size specified: '{top}'. Must be between 1 and {MAX_TOP} inclusive.",
                "Request_UnsupportedQuery",
            )
        offset = 0
        if "$skiptoken" in req.query:
            try:
                offset = decode_skiptoken(req.query["$skiptoken"])
            except (ValueError, orjson.JSONDecodeError, AttributeError):
                return _err(400, "Invalid $skiptoken.", "Request_BadRequest")
        short = tenant.graph_short_pages
        if short is None:
            short = self.sim.graph_short_pages
        managers = req.query.get("$expand", "").lower().startswith("manager")
        if managers:
            top = min(top, 100)  # Graph: $expand on directory objects returns at most 100
        size = max(1, (top + 1) // 2) if short else top
        with tenant.lock:
            everyone = list(tenant.users.values())
        total = len(everyone)
        # a short list: the last users missing, and no nextLink pointing to them
        everyone = everyone[: total - min(total, tenant.short_lists.get("graph:/users", 0))]
        page = everyone[offset : offset + size]
        if props:
            items = [_project(u, props, {"accountEnabled": True}) for u in page]
        else:
            items = [_default(u) for u in page]
        if managers:
            boss = tenant.directory.managers
            for item in items:
                if item.get("id") in boss:
                    item["manager"] = {
                        "@odata.type": "#microsoft.graph.user",
                        "id": boss[item["id"]],
                    }
        context = f"{req.base_url}/v1.0/$metadata#users"
        if props:
            context += f"({','.join(props)})"
        doc: dict[str, Any] = {"@odata.context": context}
        if tenant.odata_count and offset == 0:
            doc["@odata.count"] = total
        next_offset = offset + len(page)
        if next_offset < len(everyone):
            kept = [(k, v) for k, v in req.query.items() if k != "$skiptoken"]
            kept.append(("$skiptoken", encode_skiptoken(next_offset)))
            qs = "&".join(f"{k}={quote(v, safe=',()$')}" for k, v in kept)
            origin = tenant.next_link_origin or req.base_url
            doc["@odata.nextLink"] = f"{origin}{req.path}?{qs}"
        doc["value"] = items
        return json_response(200, doc, CONTENT_TYPE)


def _delta_response(status: int, body: dict[str, Any] | None) -> Response:
    if body is None:  # an expired or unknown delta token
        return _err(
            410,
            "The sync state is not found or expired. Resync without a token.",
            "syncStateNotFound",
        )
    return json_response(status, body, CONTENT_TYPE)


def _expand_supported(req: Request) -> bool:
    """`$expand` the simulator implements: users' manager, directory roles' members."""
    value = req.query.get("$expand", "").lower()
    path = req.path.rstrip("/").lower()
    if path.endswith("/users"):
        return value in ("manager", "manager($select=id)")
    if path.endswith("/directoryroles"):
        return value in ("members", "members($select=id)")
    return False


def _default(user: dict[str, Any]) -> dict[str, Any]:
    """The properties Graph returns for a user without $select (the recorded ones)."""
    return {f: user.get(f) for f in _DEFAULT_USER_FIELDS}
