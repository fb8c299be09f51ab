"""Activated directory roles and their members: `/directoryRoles?$expand=members`.

Graph returns at most 20 expanded members per role; a role whose expanded list is that long is
read again through `/directoryRoles/{id}/members` (paged). Every page or nothing: a failure
leaves the scope FAILED and the previous roles and assignments are kept; so does a role that
cannot be converted (no id), named in the scope's error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monitor.collect.graph_api import GraphClient
from monitor.collect.pages import IncompleteList, read_all
from monitor.collect.progress import Progress
from monitor.model.graph import Graph, ScopeState, ScopeStatus
from monitor.model.roles import GRAPH_ROLE_FIELDS, add_roles
from monitor.model.schema import SCOPE_DIRECTORY_ROLES

DIRECTORY_ROLES = "graph:/directoryRoles"
ROLE_MEMBERS = "graph:/directoryRoles/{id}/members"
EXPANDED_MEMBERS_LIMIT = 20


def collect_directory_roles(
    graph: GraphClient, target: Graph, progress: Progress, *, account_tag: str | None = None
) -> ScopeStatus:
    """Read the roles (with members) into `target`; the scope status says whether it is whole."""
    api = graph.api
    params: dict[str, str | int] = {
        "$select": ",".join(GRAPH_ROLE_FIELDS),
        "$expand": "members($select=id)",
    }
    try:
        roles = read_all(
            api.iter_next_link_pages(
                DIRECTORY_ROLES, "/v1.0/directoryRoles", params, permission="Directory.Read.All"
            ),
            progress,
            "directory roles",
        )
        members: dict[str, list[Mapping[str, Any]]] = {}
        for role in roles:
            rid = role.get("id")
            expanded = role.get("members")
            if not isinstance(rid, str):
                continue
            listed: list[Mapping[str, Any]] = (
                [m for m in expanded if isinstance(m, dict)] if isinstance(expanded, list) else []
            )
            if len(listed) >= EXPANDED_MEMBERS_LIMIT:
                listed = read_all(
                    api.iter_next_link_pages(
                        ROLE_MEMBERS,
                        f"/v1.0/directoryRoles/{rid}/members",
                        {"$select": "id", "$top": 999},
                        permission="Directory.Read.All",
                    ),
                    progress,
                    "directory role members",
                )  # type: ignore[assignment]
            members[rid] = listed
        n = add_roles(target, roles, members, account_tag=account_tag)
    except IncompleteList as exc:
        status = exc.status()
    except ValueError as exc:  # a role that cannot be converted: this scope fails, not the sync
        status = ScopeStatus(ScopeState.FAILED, error=f"{exc}; previous roles and assignments kept")
    else:
        status = ScopeStatus(ScopeState.COMPLETE, count=n)
    target.scopes[SCOPE_DIRECTORY_ROLES] = status
    return status
