"""Users: directory users from Graph (Directory.Read.All), by `/users/delta` or the full list.

By delta (the default; the round, 410 resync and Redis state are monitor.collect.delta's): the
first sync reads every user through the delta chain with the same `$select` as the list; later
syncs follow the stored delta link and get only the users whose selected properties changed
(with their properties) and the deleted ones (`@removed`). The state keeps every user's selected
properties, so the builder still gets the whole list, shaped as the list gives it, and the
snapshot diff is as before. The state is saved after the snapshot commit, and only when the
users scope ended COMPLETE: a failed page, or an item the builder rejects, leaves the previous
users in the snapshot and the state as it was, so the next sync reads the same changes again.
With `directory_employees.managers` the manager is tracked too: `$select=...,manager` brings
`manager@delta` (Graph's delta takes `manager` in `$select`, not `$expand`).

The full list (`users_delta: false`): `$select`, `$top=999` (100 with `$expand=manager`), every
page or the scope is incomplete.
"""

from __future__ import annotations

import logging
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
from monitor.collect.errors import CollectError
from monitor.collect.graph_api import GraphClient
from monitor.collect.http import Json
from monitor.collect.pages import IncompleteList, read_all
from monitor.collect.progress import Progress
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import SCOPE_USERS
from monitor.model.users import GRAPH_USER_FIELDS

log = logging.getLogger(__name__)

USERS_DELTA = "graph:/users/delta"
MANAGER = "manager"


@dataclass
class UsersState:
    """What the delta rounds so far say: every user's selected properties, by id."""

    delta_link: str | None = None
    select: str = ""  # the `$select` of its rounds: a state read with another one is not reused
    users: dict[str, dict[str, Any]] = field(default_factory=dict)  # the manager as "manager"
    changed: bool = True  # users differ from what was saved (not saved itself)
    unkeyed: list[Json] = field(default_factory=list)  # this round's items without an id
    packed: bytes | None = field(default=None, repr=False)  # `dumps()` once `seal`ed
    sealed: bool = False

    def dumps(self) -> bytes:
        if self.sealed:
            if self.packed is None:
                raise ValueError("an unchanged users state was sealed without being packed")
            return self.packed
        return pack_state({"link": self.delta_link, "select": self.select, "users": self.users})

    def seal(self) -> None:
        """Once the builder has the users: keep only what `dumps` will write (when it changed),
        and let the users' records go. A big tenant's users would otherwise be held twice
        through the rest of the sync (here and in the graph), and packed at its peak."""
        if self.changed:
            self.packed = self.dumps()
        self.users, self.unkeyed, self.sealed = {}, [], True

    @classmethod
    def loads(cls, blob: bytes) -> UsersState:
        doc = unpack_state(blob, "users")
        return cls(doc.get("link"), str(doc.get("select") or ""), doc.get("users") or {}, False)

    def user_list(self) -> list[Json]:
        """Every user as the list gives it (each selected field, None when unset; the manager
        when there is one), then this round's items without an id, for the builder to reject."""
        out: list[Json] = []
        for rec in self.users.values():
            user = {f: rec.get(f) for f in GRAPH_USER_FIELDS}
            if MANAGER in rec:
                user[MANAGER] = rec[MANAGER]
            out.append(user)
        return out + self.unkeyed


class UsersStateStore(DeltaStateStore[UsersState]):
    """The users delta state of one tenant in Redis (one compressed value)."""

    def __init__(self, client: redis.Redis | None, prefix: str, tenant: str) -> None:
        super().__init__(client, prefix, tenant, "users_delta", UsersState.loads)


def apply_user_items(state: UsersState, items: list[Json]) -> None:
    """Fold one page of `/users/delta` items into `state`: properties it names are replaced,
    the others kept (a property never set is left out by Graph); `@removed` deletes."""
    if items:
        state.changed = True
    for item in items:
        uid = item.get("id")
        if not isinstance(uid, str) or not uid:
            state.unkeyed.append(item)
            continue
        if "@removed" in item:
            state.users.pop(uid, None)
            continue
        rec = state.users.setdefault(uid, {})
        for k, v in item.items():
            if "@" not in k:
                rec[k] = v
        changes = item.get("manager@delta")
        if isinstance(changes, list):
            alive = [
                m
                for m in changes
                if isinstance(m, dict) and "@removed" not in m and isinstance(m.get("id"), str)
            ]
            if alive:
                rec[MANAGER] = {
                    "@odata.type": str(alive[-1].get("@odata.type") or USER_TYPE),
                    "id": alive[-1]["id"],
                }
            else:  # the manager was removed (an `@removed` entry), or there is none
                rec.pop(MANAGER, None)


def delta_select(managers: bool) -> str:
    return ",".join((*GRAPH_USER_FIELDS, MANAGER) if managers else GRAPH_USER_FIELDS)


@dataclass
class UsersResult:
    status: ScopeStatus
    state: UsersState | None = None  # to save after the commit (None: nothing to save)
    full_read: bool = False  # the delta round read every user (first sync, 410, new $select)


def collect_users(
    graph: GraphClient,
    builder: GraphBuilder,
    progress: Progress,
    *,
    managers: bool = False,
    store: UsersStateStore | None = None,
) -> UsersResult:
    """Put every directory user into `builder`: by delta with `store`, else the full list."""
    if store is None:
        return UsersResult(_full_list(graph, builder, progress, managers))
    select = delta_select(managers)
    previous = store.load()
    if previous is not None and previous.select != select:
        log.info("users: the stored delta state has other fields; full read")
        previous = None
    try:
        state, resynced = read_delta(
            graph,
            DeltaQuery(USERS_DELTA, "/v1.0/users/delta", {"$select": select}),
            previous,
            lambda: UsersState(select=select),
            apply_user_items,
            lambda st: progress("users", len(st.users), None),
        )
    except CollectError as exc:
        status = ScopeStatus(ScopeState.FAILED, error=str(exc))
        builder.set_scope(SCOPE_USERS, status)
        return UsersResult(status)
    n = builder.add_users(state.user_list())
    builder.set_scope(SCOPE_USERS, ScopeStatus(ScopeState.COMPLETE, count=n))
    status = builder.graph().scopes[SCOPE_USERS]  # FAILED if the builder rejected an item
    complete = status.state is ScopeState.COMPLETE
    if complete:
        state.seal()
    return UsersResult(status, state if complete else None, previous is None or resynced)


def _full_list(
    graph: GraphClient, builder: GraphBuilder, progress: Progress, managers: bool
) -> ScopeStatus:
    """Fetch all users; the scope is complete only when the last page arrived."""
    try:
        users = read_all(graph.iter_user_pages(managers=managers), progress, "users")
    except IncompleteList as exc:
        status = exc.status()
    else:
        status = ScopeStatus(ScopeState.COMPLETE, count=builder.add_users(users))
    builder.set_scope(SCOPE_USERS, status)
    return status
