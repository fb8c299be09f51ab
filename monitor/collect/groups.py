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
read, and only a full read that reached its delta link replaces the state.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from monitor.collect.errors import ApiError, CollectError, PageError
from monitor.collect.graph_api import GraphClient
from monitor.collect.http import Json, page_value
from monitor.collect.progress import Progress
from monitor.model.graph import Graph, ScopeState, ScopeStatus
from monitor.model.groups import GRAPH_GROUP_FIELDS, add_groups
from monitor.model.schema import SCOPE_GROUPS

log = logging.getLogger(__name__)

GROUPS_DELTA = "graph:/groups/delta"
USER_TYPE = "#microsoft.graph.user"
MAX_PAGES = 100_000  # a runaway link chain is an error, not an endless loop


@dataclass
class GroupsState:
    """What the delta rounds so far say: group properties and member ids (with their type)."""

    delta_link: str | None = None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    members: dict[str, dict[str, str]] = field(default_factory=dict)  # gid -> id -> @odata.type
    changed: bool = True  # groups or members differ from what was saved (not saved itself)

    def dumps(self) -> bytes:
        doc = {"v": 1, "link": self.delta_link, "groups": self.groups, "members": self.members}
        return zlib.compress(orjson.dumps(doc), 1)

    @classmethod
    def loads(cls, blob: bytes) -> GroupsState:
        doc = orjson.loads(zlib.decompress(blob))
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise ValueError("unknown groups state version")
        return cls(doc.get("link"), doc.get("groups") or {}, doc.get("members") or {}, False)

    def user_members(self) -> dict[str, list[str]]:
        return {
            gid: sorted(m for m, t in ms.items() if t == USER_TYPE)
            for gid, ms in self.members.items()
        }

    def member_counts(self) -> dict[str, int]:
        return {gid: len(ms) for gid, ms in self.members.items()}


class GroupsStateStore:
    """The groups delta state of one tenant in Redis (one compressed value)."""

    def __init__(self, client: redis.Redis | None, prefix: str, tenant: str) -> None:
        self._client = client
        self.key = f"{prefix}:groups_delta:{tenant}"
        self.link_key = f"{prefix}:groups_delta_link:{tenant}"  # newer than the state's own

    def load(self) -> GroupsState | None:
        if self._client is None:
            return None
        blob, link = self._client.mget(self.key, self.link_key)  # type: ignore[misc]
        if blob is None:
            return None
        try:
            state = GroupsState.loads(blob)
        except (ValueError, zlib.error, orjson.JSONDecodeError) as exc:
            log.warning(
                "groups delta state unreadable; doing a full read", extra={"error": str(exc)}
            )
            return None
        if link:
            state.delta_link = link.decode()
        return state

    def save(self, state: GroupsState) -> None:
        """Call after the snapshot commit: the link, and the state when it changed."""
        if self._client is None:
            return
        pipe = self._client.pipeline(transaction=True)
        if state.changed:
            pipe.set(self.key, state.dumps())
        pipe.set(self.link_key, state.delta_link or "")
        pipe.execute()
        state.changed = False


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


def _pages(graph: GraphClient, start: str | None) -> Iterator[Json]:
    """Response bodies of one delta round, from `start` (a delta link) or from the beginning."""
    url: str = start or "/v1.0/groups/delta"
    params: dict[str, str | int] | None = (
        None if start else {"$select": ",".join((*GRAPH_GROUP_FIELDS, "members"))}
    )
    for _ in range(MAX_PAGES):
        body = graph.api.get_json(GROUPS_DELTA, url, params, permission="Directory.Read.All")
        yield body
        if body.get("@odata.deltaLink"):
            return
        nxt = body.get("@odata.nextLink")
        if not isinstance(nxt, str) or not nxt:
            raise PageError(GROUPS_DELTA, "page has neither nextLink nor deltaLink", status=200)
        url, params = nxt, None
    raise PageError(GROUPS_DELTA, f"more than {MAX_PAGES} pages in one round", status=200)


def _round(graph: GraphClient, state: GroupsState, progress: Progress) -> GroupsState:
    for body in _pages(graph, state.delta_link):
        apply_delta_items(state, page_value(GROUPS_DELTA, body))
        progress("groups", len(state.groups), None)
        link = body.get("@odata.deltaLink")
        if isinstance(link, str) and link:
            state.delta_link = link
    return state


@dataclass
class GroupsResult:
    status: ScopeStatus
    state: GroupsState | None = None  # to save after the commit (None: nothing to save)
    resynced: bool = False  # a 410 forced a full read


def collect_groups(
    graph: GraphClient,
    target: Graph,
    store: GroupsStateStore,
    progress: Progress,
    *,
    account_tag: str | None = None,
) -> GroupsResult:
    """Bring the groups state up to date and put every group and membership into `target`."""
    previous = store.load()
    resynced = False
    try:
        try:
            state = _round(graph, previous or GroupsState(), progress)
        except ApiError as exc:
            if exc.status != 410 or previous is None:
                raise
            log.info("groups delta token expired (410); full read", extra={"code": exc.code})
            resynced = True
            state = _round(graph, GroupsState(), progress)
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
