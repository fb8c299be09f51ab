"""`mde-monitor check`: sign in and probe each permission the customer grants with one cheap call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from monitor.collect.collector import TenantSession, open_session
from monitor.collect.defender_api import LOGON_USERS, MACHINES, VULNERABILITIES
from monitor.collect.errors import AuthError, CollectError, FeatureDisabled, PermissionMissing
from monitor.collect.graph_api import ORGANIZATION, USERS
from monitor.collect.hunting import logon_query
from monitor.collect.users import USERS_DELTA
from monitor.config import Settings, TenantConfig


@dataclass
class Probe:
    permission: str
    api: str  # "Microsoft Graph" | "WindowsDefenderATP"
    ok: bool | None  # None: could not be probed (e.g. no machine to ask about)
    detail: str  # "ok", or the AADSTS / HTTP code and what to do
    # why it failed: "permission" (missing/not consented), "not_enabled" (feature not enabled or
    # not licensed in the tenant), "sign_in" (no token for the API's scope), "error" (other)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _probe(permission: str, api: str, call: Callable[[], Any]) -> Probe:
    try:
        call()
    except PermissionMissing as exc:
        code = f" {exc.code}" if exc.code else ""
        return Probe(
            permission,
            api,
            False,
            f"HTTP {exc.status}{code}: missing or not consented",
            "permission",
        )
    except FeatureDisabled as exc:
        return Probe(
            permission,
            api,
            False,
            f"HTTP 403 {exc.code}: {exc.detail} (the permission itself is granted)",
            "not_enabled",
        )
    except AuthError as exc:
        return Probe(permission, api, False, str(exc), "sign_in")
    except CollectError as exc:  # API errors say what happened themselves
        return Probe(permission, api, False, str(exc), "error")
    return Probe(permission, api, True, "ok")


def check_tenant(settings: Settings, tenant: TenantConfig) -> list[Probe]:
    """One row per permission of the seed's list, plus a sign-in row per API whose scope fails.

    Each API's token is asked for separately, so a Defender audience problem still lets the
    Graph permissions be probed (and the other way round); the sign-in row names the scope.
    """
    with open_session(settings, tenant) as s:
        endpoints = tenant.cloud_endpoints()
        sign_in: list[Probe] = []
        failed_apis: set[str] = set()
        for api_name, scope in (
            ("Microsoft Graph", endpoints.graph.scope),
            ("WindowsDefenderATP", endpoints.defender.scope),
        ):
            try:
                s.tokens.token(scope)
            except AuthError as exc:
                failed_apis.add(api_name)
                sign_in.append(Probe(f"sign-in ({scope})", api_name, False, str(exc), "sign_in"))
        if len(failed_apis) == 2:
            return sign_in
        return sign_in + [p for p in _probes(s, tenant) if p.api not in failed_apis]


def _probes(s: TenantSession, tenant: TenantConfig) -> list[Probe]:
    g, d = s.graph.api, s.defender.api
    first_machine: list[str] = []

    def users() -> None:
        """The users read the sync does: `/users/delta` ("latest": a link, no users) or the list."""
        if s.tenant.users_delta:
            g.get_json(
                USERS_DELTA,
                "/v1.0/users/delta",
                {"$deltatoken": "latest"},
                permission="Directory.Read.All",
            )
        else:
            g.get_json(
                USERS, "/v1.0/users", {"$select": "id", "$top": 1}, permission="Directory.Read.All"
            )

    def machines() -> None:
        body = d.get_json(
            MACHINES,
            "/api/machines",
            {"$top": 1},
            permission="Machine.Read.All",
            empty_on_not_found=True,
        )
        first_machine.extend(
            m["id"] for m in body.get("value", [])[:1] if isinstance(m, dict) and "id" in m
        )

    probes = [
        _probe(
            "Organization.Read.All",
            "Microsoft Graph",
            lambda: g.get_json(
                ORGANIZATION,
                "/v1.0/organization",
                {"$select": "id"},
                permission="Organization.Read.All",
            ),
        ),
        _probe("Directory.Read.All", "Microsoft Graph", users),
        _probe("Machine.Read.All", "WindowsDefenderATP", machines),
    ]
    if first_machine:
        probes.append(
            _probe(
                "User.Read.All",
                "WindowsDefenderATP",
                lambda: d.get_json(
                    LOGON_USERS,
                    f"/api/machines/{first_machine[0]}/logonusers",
                    permission="User.Read.All",
                ),
            )
        )
    else:
        probes.append(
            Probe(
                "User.Read.All",
                "WindowsDefenderATP",
                None,
                "not probed: no machine to ask about (needs Machine.Read.All and one machine)",
            )
        )
    probes.append(
        _probe(
            "Vulnerability.Read.All",
            "WindowsDefenderATP",
            lambda: d.get_json(
                VULNERABILITIES,
                "/api/vulnerabilities",
                {"$top": 1},
                permission="Vulnerability.Read.All",
            ),
        )
    )
    if tenant.logon_users == "hunting":
        # the collector's own query, for one machine over one hour: cheap, and the shape it sends
        device = first_machine[0] if first_machine else "0" * 40
        probes.append(
            _probe(
                "AdvancedQuery.Read.All",
                "WindowsDefenderATP",
                lambda: s.defender.run_query(logon_query(device, device, "1h")),
            )
        )
    return probes
