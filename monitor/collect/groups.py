"""Groups and memberships through `/groups/delta` (Directory.Read.All / GroupMember.Read.All).

The first sync reads every group with `$select=...,members` page by page (`@odata.nextLink`)
until the page that carries `@odata.deltaLink`; a large group's members arrive over several
pages (the group appears again with more `members@delta`). Later syncs follow the stored delta
link and get only the changes: changed properties, `members@delta` additions and removals
(`@removed`), and removed groups (`@removed`). The state (every group's properties and member
ids) and the delta link live in Redis per tenant and are saved only AFTER the snapshot commit,
so a sync that dies re-reads the same changes next time. The link has a key of its own: a round
that brought no changes writes only the new link, not the whole (large) state again.

No phantom deletions: a page that fails leaves the scope FAILED (previous groups kept, the state
and link untouched); a 410 (the delta token expired, `syncStateNotFound`) restarts with a full
read, and only a full read that reached its delta link replaces the state (monitor.collect.delta).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from monitor.collect.delta import (
    USER_TYPE,
    DeltaQuery,
    DeltaStateStore,
    pack_state,
    read_delta,
    unpack_state,
)
from monitor.collect.errors import CollectError, PageError
from monitor.collect.graph_api import GraphClient
from monitor.collect.http import Json
from monitor.collect.progress import Progress
from monitor.model.graph import Graph, ScopeState, ScopeStatus
from monitor.model.groups import GRAPH_GROUP_FIELDS, add_groups
from monitor.model.schema import SCOPE_GROUPS

GROUPS_DELTA = "graph:/groups/delta"


@dataclass
class GroupsState:
    """What the delta rounds so far say: group properties and member ids (with their type)."""

    delta_link: str | None = None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    members: dict[str, dict[str, str]] = field(default_factory=dict)  # gid -> id -> @odata.type
    changed: bool = True  # groups or members differ from what was saved (not saved itself)

    def dumps(self) -> bytes:
        return pack_state({"link": self.delta_link, "groups": self.groups, "members": self.members})

    @classmethod
    def loads(cls, blob: bytes) -> GroupsState:
        doc = unpack_state(blob, "groups")
        return cls(doc.get("link"), doc.get("groups") or {}, doc.get("members") or {}, False)

    def user_members(self) -> dict[str, list[str]]:
        return {
            gid: sorted(m for m, t in ms.items() if t == USER_TYPE)
            for gid, ms in self.members.items()
        }

    def member_counts(self) -> dict[str, int]:
        return {gid: len(ms) for gid, ms in self.members.items()}


class GroupsStateStore(DeltaStateStore[GroupsState]):
    """The groups delta state of one tenant in Redis (one compressed value)."""

    def __init__(self, client: redis.Redis | None, prefix: str, tenant: str) -> None:
        super().__init__(client, prefix, tenant, "groups_delta", GroupsState.loads)


def apply_delta_items(state: GroupsState, items: list[Json]) -> None:
    """Fold one page of `/groups/delta` items into `state`."""
    if items:
        state.changed = True
    for i, item in enumerate(items):
        gid = item.get("id")
        if not isinstance(gid, str) or not gid:
            raise PageError(GROUPS_DELTA, f"item {i} has no id", status=200)
        if "@removed" in item:
            state.groups.pop(gid, None)
            state.members.pop(gid, None)
            continue
        props = state.groups.setdefault(gid, {})
        for k, v in item.items():
            if "@" not in k and k not in ("id", "members"):
                props[k] = v
        changes = item.get("members@delta")
        if changes is None:
            continue
        if not isinstance(changes, list):
            raise PageError(GROUPS_DELTA, f"group {gid}: members@delta is not a list", status=200)
        members = state.members.setdefault(gid, {})
        for m in changes:
            mid = m.get("id") if isinstance(m, dict) else None
            if not isinstance(mid, str):
                continue
            if "@removed" in m:
                members.pop(mid, None)
            else:
                members[mid] = str(m.get("@odata.type") or USER_TYPE)


def _query() -> DeltaQuery:
    return DeltaQuery(
        GROUPS_DELTA, "/v1.0/groups/delta", {"$select": ",".join((*GRAPH_GROUP_FIELDS, "members"))}
    )


@dataclass
class GroupsResult:
    status: ScopeStatus
    state: GroupsState | None = None  # to save after the commit (None: nothing to save)
    resynced: bool = False  # a full read replaced the stored state (410, or an unusable link)


def collect_groups(
    graph: GraphClient,
    target: Graph,
    store: GroupsStateStore,
    progress: Progress,
    *,
    account_tag: str | None = None,
) -> GroupsResult:
    """Bring the groups state up to date and put every group and membership into `target`."""
    resynced = False
    try:
        state, resynced = read_delta(
            graph,
            _query(),
            store.load(),
            GroupsState,
            apply_delta_items,
            lambda st: progress("groups", len(st.groups), None),
        )
    except CollectError as exc:
        status = ScopeStatus(ScopeState.FAILED, error=str(exc))
        target.scopes[SCOPE_GROUPS] = status
        return GroupsResult(status, None, resynced)
    n = add_groups(
        target, state.groups, state.user_members(), state.member_counts(), account_tag=account_tag
    )
    status = ScopeStatus(ScopeState.COMPLETE, count=n)
    target.scopes[SCOPE_GROUPS] = status
    return GroupsResult(status, state, resynced)
