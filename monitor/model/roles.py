"""Directory roles: Graph `/directoryRoles` (activated roles) -> `entra_directory_role` entities
and `microsoft_defender_user ASSIGNED entra_directory_role` for each user member."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from monitor.model.graph import Graph
from monitor.model.schema import (
    DIRECTORY_ROLE,
    SCOPE_DIRECTORY_ROLES,
    USER,
    USER_ASSIGNED_DIRECTORY_ROLE,
    require_str,
)

Item = dict[str, Any]

GRAPH_ROLE_FIELDS = ("id", "displayName", "description", "roleTemplateId")


def role_entity(
    role: Mapping[str, Any], member_count: int, *, account_tag: str | None = None
) -> Item:
    """One activated directory role as an `entra_directory_role` entity."""
    role_id = require_str(role, "directory role")
    name = role.get("displayName") or role_id
    properties = {
        "id": role_id,
        "description": role.get("description"),
        "roleTemplateId": role.get("roleTemplateId"),
        "memberCount": member_count,
    }
    raw = {k: v for k, v in role.items() if k in GRAPH_ROLE_FIELDS}
    return DIRECTORY_ROLE.entity(role_id, str(name), properties, raw=raw, account_tag=account_tag)


def add_roles(
    graph: Graph,
    roles: Iterable[Mapping[str, Any]],
    members: Mapping[str, list[Mapping[str, Any]]],
    *,
    account_tag: str | None = None,
) -> int:
    """Roles and their user members (`@odata.type` user) into `graph` (scope "directory_roles")."""
    n = 0
    for i, role in enumerate(roles):
        try:
            role_id = require_str(role, "directory role")
        except ValueError as exc:
            raise type(exc)(f"directoryRoles item {i}: {exc}") from None
        role_members = members.get(role_id, [])
        entity = role_entity(role, len(role_members), account_tag=account_tag)
        graph.add_entity(entity, SCOPE_DIRECTORY_ROLES)
        for m in role_members:
            if _is_user(m) and isinstance(m.get("id"), str):
                rel = USER_ASSIGNED_DIRECTORY_ROLE.relationship(USER.key(m["id"]), entity["_key"])
                graph.add_relationship(rel, SCOPE_DIRECTORY_ROLES)
        n += 1
    return n


def _is_user(member: Mapping[str, Any]) -> bool:
    odata = member.get("@odata.type")
    return odata is None or odata == "#microsoft.graph.user"
