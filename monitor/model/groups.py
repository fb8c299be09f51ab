"""Entra groups: the groups-delta state -> `entra_group` entities + `entra_group HAS user`.

Only user members make relationships (nested groups, devices and service principals are counted
in `memberCount` but not linked). A membership whose user is not among the directory users is
dropped by the snapshot merge (a relationship needs both ends).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from monitor.model.graph import Graph
from monitor.model.schema import GROUP, GROUP_HAS_USER, SCOPE_GROUPS, USER, require_str

Item = dict[str, Any]

# The group properties `$select`ed on /groups/delta (with `members`).
GRAPH_GROUP_FIELDS = (
    "id",
    "displayName",
    "description",
    "mail",
    "mailEnabled",
    "securityEnabled",
    "isAssignableToRole",
    "onPremisesSyncEnabled",
    "groupTypes",
)


def group_entity(
    group: Mapping[str, Any], member_count: int, *, account_tag: str | None = None
) -> Item:
    """One group (the merged delta state of its properties) as an `entra_group` entity."""
    group_id = require_str(group, "group")
    name = group.get("displayName") or group_id
    properties = {
        "id": group_id,
        "description": group.get("description"),
        "mail": group.get("mail"),
        "securityEnabled": group.get("securityEnabled"),
        "mailEnabled": group.get("mailEnabled"),
        "isAssignableToRole": bool(group.get("isAssignableToRole")),
        "onPremisesSyncEnabled": group.get("onPremisesSyncEnabled"),
        "groupTypes": group.get("groupTypes"),
        "memberCount": member_count,
    }
    raw = {k: v for k, v in group.items() if k in GRAPH_GROUP_FIELDS}
    return GROUP.entity(group_id, str(name), properties, raw=raw, account_tag=account_tag)


def add_groups(
    graph: Graph,
    groups: Mapping[str, Mapping[str, Any]],
    user_members: Mapping[str, Iterable[str]],
    member_counts: Mapping[str, int],
    *,
    account_tag: str | None = None,
) -> int:
    """Every group and its user memberships into `graph` (scope "groups"); returns the groups."""
    for gid, props in groups.items():
        entity = group_entity(
            {**props, "id": gid}, member_counts.get(gid, 0), account_tag=account_tag
        )
        graph.add_entity(entity, SCOPE_GROUPS)
        key = entity["_key"]
        for uid in user_members.get(gid, ()):
            graph.add_relationship(GROUP_HAS_USER.relationship(key, USER.key(uid)), SCOPE_GROUPS)
    return len(groups)
