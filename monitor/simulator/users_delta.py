"""Simulated `/users/delta`: the tenant's users with a change log, served in rounds like Graph.

Every write to `SimTenant.users` (a UserTable) is logged with the fields it changed, once a delta
round has been asked for (before that nobody can ask what changed, so generation logs nothing).
Items must be replaced, never edited in place: an in-place edit is not seen.

A round without a token returns every user with the `$select`ed properties, 200 per page (what
Graph serves for users; it ignores `$top` on delta), sorted by id, following `@odata.nextLink`
(`$skiptoken`) to the page that carries `@odata.deltaLink` (`$deltatoken`). A round from a delta
token returns only users whose tracked properties changed since (all their selected properties,
as Graph does without `Prefer: return=minimal`), and deleted users as
`{"id": ..., "@removed": {"reason": "changed"}}`. Properties never set (None) are left out, as
Graph leaves them out, unless the window set them to None. With `manager` in `$select`, users
carry `manager@delta` (the manager's id; a removed manager as an `@removed` entry).
`$deltatoken=latest` returns only a delta link ("sync from now"). A token older than
`expire_user_delta_tokens()`, or from another simulator run, gets 410 `syncStateNotFound`.
"""

from __future__ import annotations

import secrets
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from monitor.simulator.directory import USER_ODATA, decode_token, encode_token

Json = dict[str, Any]

USERS_PER_PAGE = 200
MANAGER = "manager"
ALL = frozenset({"*"})  # a created (or wholly replaced) user: every property changed
GONE = frozenset({"-"})  # a deleted user


@dataclass
class UserLog:
    """(seq, user id, changed fields) for every logged write, in seq order."""

    seq: int = 0
    entries: list[tuple[int, str, frozenset[str]]] = field(default_factory=list)
    watched: bool = False  # a delta round was asked for: log from now on
    floor: int = 0  # delta tokens issued before this seq are expired (410)
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))  # this run's tokens
    per_page: int = USERS_PER_PAGE
    _sorted: tuple[int, list[str]] | None = None  # (seq, ids) of the last full round

    def record(self, uid: str, fields: frozenset[str]) -> None:
        self.seq += 1
        if self.watched and fields:
            self.entries.append((self.seq, uid, fields))

    def window(self, since: int, upto: int) -> dict[str, set[str]]:
        """User id -> the fields written in (since, upto], in the order first written."""
        lo = bisect_right(self.entries, since, key=lambda e: e[0])
        hi = bisect_right(self.entries, upto, key=lambda e: e[0])
        out: dict[str, set[str]] = {}
        for _seq, uid, fields in self.entries[lo:hi]:
            out.setdefault(uid, set()).update(fields)
        return out


def changed_fields(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> frozenset[str]:
    if old is None:
        return ALL
    return frozenset(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


class UserTable(dict[str, Json]):
    """A tenant's users (id -> Graph user); writes are logged for `/users/delta`."""

    def __init__(self, items: Iterable[tuple[str, Json]] | Mapping[str, Json] = ()) -> None:
        super().__init__(items)
        self.log = UserLog()

    def __setitem__(self, uid: str, user: Json) -> None:
        old = self.get(uid)
        super().__setitem__(uid, user)
        self.log.record(uid, changed_fields(old, user))

    def __delitem__(self, uid: str) -> None:
        super().__delitem__(uid)
        self.log.record(uid, GONE)

    def pop(self, uid: str, *default: Any) -> Any:
        if uid in self:
            user = super().pop(uid)
            self.log.record(uid, GONE)
            return user
        return super().pop(uid, *default)

    def popitem(self) -> tuple[str, Json]:
        uid, user = super().popitem()
        self.log.record(uid, GONE)
        return uid, user

    def setdefault(self, uid: str, default: Json | None = None) -> Json:
        if uid not in self:
            self[uid] = default if default is not None else {}
        return self[uid]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for uid, user in dict(*args, **kwargs).items():
            self[uid] = user

    def __ior__(self, other: Any) -> UserTable:  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        for uid in list(self):
            del self[uid]


def _sorted_ids(users: UserTable) -> list[str]:
    log = users.log
    if log._sorted is None or log._sorted[0] != log.seq:
        log._sorted = (log.seq, sorted(users))
    return log._sorted[1]


def _item(
    user: Json,
    props: list[str],
    defaults: Mapping[str, Any],
    nulls: set[str] | frozenset[str] = frozenset(),
) -> Json:
    """The user with the selected properties; None ones left out unless named in `nulls`."""
    item: Json = {}
    for p in props:
        if p == MANAGER:
            continue
        value = user.get(p, defaults.get(p))
        if value is not None or p in nulls:
            item[p] = value
    item["id"] = user.get("id")
    return item


def users_delta_page(
    users: UserTable,
    managers: Mapping[str, str],
    former_managers: Mapping[str, str],
    query: Mapping[str, str],
    base_url: str,
    path: str,
    props: list[str],
    defaults: Mapping[str, Any],
) -> tuple[int, Json | None]:
    """(status, body) of one `/users/delta` request; (410, None) for an expired token.

    `managers`: user id -> manager id; `former_managers`: the manager a user had before its
    manager was removed. ValueError / KeyError for a token this simulator did not issue.
    """
    log = users.log
    log.watched = True

    def link(kind: str, doc: Json) -> str:
        return f"{base_url}{path}?${kind}={quote(encode_token({**doc, 'e': log.epoch}))}"

    context = f"{base_url}/v1.0/$metadata#users({','.join(props)})"
    if "$skiptoken" in query:
        cursor = decode_token(query["$skiptoken"])
        if cursor.get("e") != log.epoch:
            return 410, None
    elif "$deltatoken" in query:
        if query["$deltatoken"] == "latest":
            latest = link("deltatoken", {"s": log.seq, "p": props})
            return 200, {"@odata.context": context, "value": [], "@odata.deltaLink": latest}
        start = decode_token(query["$deltatoken"])
        since = int(start["s"])
        if start.get("e") != log.epoch or since < log.floor or since > log.seq:
            return 410, None
        cursor = {"m": "d", "since": since, "upto": log.seq, "i": 0, "p": start["p"]}
    else:
        cursor = {"m": "f", "upto": log.seq, "after": "", "p": props}
    selected: list[str] = list(cursor["p"])
    want_manager = MANAGER in selected
    tracked = set(selected) | ALL
    value: list[Json] = []
    nxt: Json = dict(cursor)
    done = False
    if cursor["m"] == "f":
        ids = _sorted_ids(users)
        pos = bisect_right(ids, cursor["after"]) if cursor["after"] else 0
        # users added since the round began are in the list too (Graph may replay them)
        while len(value) < log.per_page and pos < len(ids):
            uid = ids[pos]
            pos += 1
            user = users.get(uid)
            if user is None:
                continue
            item = _item(user, selected, defaults)
            if want_manager and uid in managers:
                item["manager@delta"] = [{"@odata.type": USER_ODATA, "id": managers[uid]}]
            value.append(item)
            nxt["after"] = uid
        done = pos >= len(ids)
    else:
        window = log.window(int(cursor["since"]), int(cursor["upto"]))
        touched = [(uid, fields) for uid, fields in window.items() if fields & (tracked | GONE)]
        i = int(cursor["i"])
        for uid, fields in touched[i : i + log.per_page]:
            user = users.get(uid)
            if user is None:
                value.append({"id": uid, "@removed": {"reason": "changed"}})
                continue
            item = _item(user, selected, defaults, fields)
            if want_manager and fields & {MANAGER, *ALL}:
                if uid in managers:
                    item["manager@delta"] = [{"@odata.type": USER_ODATA, "id": managers[uid]}]
                elif uid in former_managers:
                    item["manager@delta"] = [
                        {
                            "@odata.type": USER_ODATA,
                            "id": former_managers[uid],
                            "@removed": {"reason": "deleted"},
                        }
                    ]
            value.append(item)
        nxt["i"] = min(len(touched), i + log.per_page)
        done = nxt["i"] >= len(touched)
    body: Json = {"@odata.context": context, "value": value}
    if done:
        body["@odata.deltaLink"] = link("deltatoken", {"s": int(cursor["upto"]), "p": selected})
    else:
        body["@odata.nextLink"] = link("skiptoken", nxt)
    return 200, body
