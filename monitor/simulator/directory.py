"""Simulated Entra groups and directory roles: `/groups/delta`, `/directoryRoles`, managers.

`/groups/delta` behaves like Graph's: the first round (no token) returns every group with the
`$select`ed properties and `members@delta`, paged with `@odata.nextLink` (`$skiptoken`); a large
group's members continue on the next page (the group again, with only `id` and more
`members@delta`). The last page carries `@odata.deltaLink` (`$deltatoken`). A round from a delta
token returns only what changed since: changed groups with their properties, membership
additions and removals (`@removed`), deleted groups (`@removed`). A token older than
`expire_group_delta_tokens()` gets 410 `syncStateNotFound`, like an expired Graph token.

Page limits are the simulator's (GROUPS_PER_PAGE groups, LINKS_PER_PAGE member links); Graph
does not document its own. `/directoryRoles?$expand=members` lists at most 20 members per role
(Graph's limit for expanded directory objects); `/directoryRoles/{id}/members` pages the rest.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from monitor.simulator.certs import b64url, b64url_decode

if TYPE_CHECKING:
    import threading

Json = dict[str, Any]

USER_ODATA = "#microsoft.graph.user"
GROUPS_PER_PAGE = 250
LINKS_PER_PAGE = 25_000
ROLE_EXPAND_LIMIT = 20
GROUP_PROPERTIES = (
    "id",
    "displayName",
    "description",
    "mail",
    "mailEnabled",
    "mailNickname",
    "securityEnabled",
    "isAssignableToRole",
    "onPremisesSyncEnabled",
    "groupTypes",
    "createdDateTime",
    "visibility",
)
ROLE_PROPERTIES = ("id", "displayName", "description", "roleTemplateId")
# (displayName, roleTemplateId): the well-known built-in roles
BUILTIN_ROLES = (
    ("Global Administrator", "62e90394-69f5-4237-9190-012177145e10"),
    ("User Administrator", "fe930be7-5e62-47db-91af-98c3a49a38b1"),
    ("Helpdesk Administrator", "729827e3-9c14-49f7-bb1b-9608f156bbb8"),
    ("Security Administrator", "194ae4cb-b126-40b2-bd5b-6091b380977d"),
    ("Security Reader", "5d6b6bb7-de71-4623-b4af-96380a352509"),
    ("Exchange Administrator", "29232cdf-9323-42fd-ade2-1d097af3e4de"),
    ("SharePoint Administrator", "f28a1f50-f6e7-4571-818b-6a12f2af6b6c"),
    ("Privileged Role Administrator", "e8611ab8-c189-46e8-94e1-60213ab1f814"),
    ("Application Administrator", "9b895d92-2cd3-44c7-9d02-a6ac2d5ea5c3"),
    ("Cloud Application Administrator", "158c047a-c907-4556-b7ef-446551a6b5f7"),
    ("Intune Administrator", "3a2c62db-5318-420d-8d74-23affee5d9d5"),
    ("Billing Administrator", "b0f54661-2d74-4c50-afa3-1ec803f12efe"),
    ("Compliance Administrator", "17315797-102d-40b4-93e0-432062caca18"),
    ("Conditional Access Administrator", "b1be1c3e-b65d-4f19-8427-f6fa0d97feb9"),
    ("Authentication Administrator", "c4e39bd9-1100-46d3-8c65-fb160da0071f"),
    ("Groups Administrator", "fdd7a751-b60b-444a-984c-02652fe8fa1c"),
    ("License Administrator", "4d6ac14f-3453-41d0-bef9-a3e0c569773a"),
    ("Reports Reader", "4a5d8f65-41da-4de4-8968-e035b65339cf"),
    ("Global Reader", "f2ef992c-3afb-46b9-b7cf-a126ee74c451"),
    ("Directory Readers", "88d8e3e3-8f55-4a1e-953a-9b9898b8876b"),
    ("Teams Administrator", "69091246-20e8-4a56-aa4d-066075b2a7a8"),
    ("Password Administrator", "966707d0-3269-4727-9be2-8c3a10f19b9d"),
)
DIRECTORY_OPS = (
    "add_group",
    "set_group",
    "remove_group",
    "add_group_member",
    "remove_group_member",
    "assign_role",
    "unassign_role",
    "expire_group_delta_tokens",
)


@dataclass
class SimDirectory:
    """Groups (with user members), activated roles (with members), managers, the change log."""

    groups: dict[str, Json] = field(default_factory=dict)
    members: dict[str, dict[str, None]] = field(default_factory=dict)  # gid -> ordered user ids
    roles: dict[str, Json] = field(default_factory=dict)
    role_members: dict[str, list[str]] = field(default_factory=dict)
    managers: dict[str, str] = field(default_factory=dict)  # user id -> manager's user id
    former_managers: dict[str, str] = field(default_factory=dict)  # whose manager was removed
    seq: int = 0
    log: list[tuple[int, str, str, str | None]] = field(default_factory=list)  # seq, gid, op, uid
    token_floor: int = 0  # delta tokens issued before this seq are expired (410)
    groups_per_page: int = GROUPS_PER_PAGE
    links_per_page: int = LINKS_PER_PAGE
    _full_cache: tuple[int, list[str]] | None = None

    def record(self, gid: str, op: str, uid: str | None = None) -> None:
        self.seq += 1
        self.log.append((self.seq, gid, op, uid))


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"


class DirectoryMixin:
    """SimTenant methods for groups and roles (admin ops by name, see DIRECTORY_OPS)."""

    directory: SimDirectory
    lock: threading.RLock
    users: dict[str, Json]

    def _group(self, group_id: str) -> Json:
        g = self.directory.groups.get(group_id)
        if g is None:
            raise KeyError(f"no group {group_id!r}")
        return g

    def _role(self, role: str) -> str:
        d = self.directory
        if role in d.roles:
            return role
        for rid, r in d.roles.items():
            if r.get("displayName") == role or r.get("roleTemplateId") == role:
                return rid
        raise KeyError(f"no activated role {role!r}")

    def add_group(self, group: Json | None = None, members: list[str] | None = None) -> Json:
        """A new group (default: a security group); members are user ids."""
        with self.lock:
            d = self.directory
            g = dict(group or {})
            g.setdefault("id", _uuid(random.Random(f"group:{d.seq}:{len(d.groups)}")))
            g.setdefault("displayName", f"Group {len(d.groups) + 1}")
            g.setdefault("securityEnabled", True)
            g.setdefault("mailEnabled", False)
            g.setdefault("isAssignableToRole", False)
            g.setdefault("groupTypes", [])
            d.groups[g["id"]] = g
            d.members[g["id"]] = {}
            d.record(g["id"], "props")
            for uid in members or []:
                self.add_group_member(g["id"], uid)
            return g

    def set_group(self, group_id: str, **fields: Any) -> Json:
        with self.lock:
            g = {**self._group(group_id), **fields, "id": group_id}
            self.directory.groups[group_id] = g
            self.directory.record(group_id, "props")
            return g

    def remove_group(self, group_id: str) -> None:
        with self.lock:
            self._group(group_id)
            del self.directory.groups[group_id]
            self.directory.members.pop(group_id, None)
            self.directory.record(group_id, "deleted")

    def add_group_member(self, group_id: str, user_id: str) -> None:
        with self.lock:
            self._group(group_id)
            if user_id not in self.users:
                raise KeyError(f"no user {user_id!r}")
            self.directory.members.setdefault(group_id, {})[user_id] = None
            self.directory.record(group_id, "add", user_id)

    def remove_group_member(self, group_id: str, user_id: str) -> None:
        with self.lock:
            self._group(group_id)
            self.directory.members.get(group_id, {}).pop(user_id, None)
            self.directory.record(group_id, "remove", user_id)

    def assign_role(self, role: str, user_id: str) -> None:
        """Add a user to an activated role (by id, display name or template id)."""
        with self.lock:
            rid = self._role(role)
            if user_id not in self.users:
                raise KeyError(f"no user {user_id!r}")
            members = self.directory.role_members.setdefault(rid, [])
            if user_id not in members:
                members.append(user_id)

    def unassign_role(self, role: str, user_id: str) -> None:
        with self.lock:
            rid = self._role(role)
            members = self.directory.role_members.get(rid, [])
            if user_id in members:
                members.remove(user_id)

    def expire_group_delta_tokens(self) -> None:
        """Every delta token issued so far gets 410 syncStateNotFound from now on."""
        with self.lock:
            self.directory.token_floor = self.directory.seq + 1
            self.directory.seq += 1


# ---- generation --------------------------------------------------------------------------


def account_for(user: Json, domain: str) -> tuple[str, str]:
    """(sAMAccountName, SID) of a directory user: the same as its generated logon users'."""
    name = str(user["userPrincipalName"]).split("@")[0].split("#")[0].lower()[:20]
    h = hashlib.sha256(str(user["id"]).encode()).digest()
    rid = 1000 + int.from_bytes(h[:3], "big") % 900000
    sid = (
        f"S-1-5-21-{int.from_bytes(h[3:7], 'big')}-{int.from_bytes(h[7:11], 'big')}"
        f"-{int.from_bytes(h[11:15], 'big')}-{rid}"
    )
    return name, sid


def populate_directory(
    tenant: Any,
    *,
    seed: int,
    domain: str,
    groups: int,
    large_groups: int,
    roles: int,
) -> None:
    """Employee and on-premises fields on users, managers, groups and activated roles.

    Uses its own random stream, so the rest of the generated tenant is unchanged. On-premises
    synced members get the SID and sAMAccountName their generated logon users carry.
    """
    rng = random.Random(f"{seed}:{tenant.tenant_id}:directory")
    d: SimDirectory = tenant.directory
    company = str(tenant.organization.get("displayName") or "Contoso")
    netbios = domain.split(".")[0].lower()
    members = [u for u in tenant.users.values() if u.get("userType") != "Guest"]
    bosses = members[: max(1, len(members) // 20)]
    for i, u in enumerate(members):
        u["companyName"] = company
        u["employeeType"] = "Contractor" if rng.random() < 0.1 else "Employee"
        if u.get("onPremisesSyncEnabled"):
            sam, sid = account_for(u, domain)
            u["onPremisesSamAccountName"] = sam
            u["onPremisesSecurityIdentifier"] = sid
            u["onPremisesDomainName"] = f"{netbios}.local"
        if i >= len(bosses) and bosses:
            d.managers[u["id"]] = bosses[rng.randrange(len(bosses))]["id"]
    user_ids = [u["id"] for u in members] or list(tenant.users)
    for i in range(groups):
        gid = _uuid(rng)
        large = i < large_groups
        assignable = not large and rng.random() < 0.02
        d.groups[gid] = {
            "id": gid,
            "displayName": f"{'All staff' if large else 'Team'} {i + 1}"
            + (" (role-assignable)" if assignable else ""),
            "description": None,
            "mail": None,
            "mailEnabled": False,
            "mailNickname": f"group{i + 1}",
            "securityEnabled": True,
            "isAssignableToRole": assignable,
            "onPremisesSyncEnabled": True if rng.random() < 0.3 else None,
            "groupTypes": [],
            "createdDateTime": "2023-01-01T00:00:00Z",
            "visibility": "Private",
        }
        if not user_ids:
            size = 0
        elif large:
            size = min(len(user_ids), 10_000 + rng.randrange(2_000))
        else:
            size = min(len(user_ids), rng.randint(1, 30))
        d.members[gid] = dict.fromkeys(rng.sample(user_ids, size))
    for name, template in BUILTIN_ROLES[: max(0, roles)]:
        rid = _uuid(rng)
        d.roles[rid] = {
            "id": rid,
            "displayName": name,
            "description": f"{name} (simulated)",
            "roleTemplateId": template,
        }
        size = 0 if not user_ids else min(len(user_ids), rng.randint(1, 4))
        if name == "Directory Readers" and user_ids:
            size = min(len(user_ids), 30)  # more than Graph expands: paged /members
        d.role_members[rid] = rng.sample(user_ids, size)
    for i in range(len(BUILTIN_ROLES), roles):
        rid = _uuid(rng)
        d.roles[rid] = {"id": rid, "displayName": f"Custom role {i}", "description": None,
                        "roleTemplateId": _uuid(rng)}  # fmt: skip
        d.role_members[rid] = []


# ---- HTTP ------------------------------------------------------------------------------


def encode_token(doc: Json) -> str:
    """An opaque skip or delta token carrying `doc`."""
    return b64url(b"DLTk" + orjson.dumps(doc))


def decode_token(text: str) -> Json:
    """The doc of a token from encode_token; ValueError for anything else."""
    raw = b64url_decode(text)
    if not raw.startswith(b"DLTk"):
        raise ValueError("not a simulator token")
    doc = orjson.loads(raw[4:])
    if not isinstance(doc, dict):
        raise ValueError("bad token")
    return doc


def _full_ids(d: SimDirectory) -> list[str]:
    if d._full_cache is None or d._full_cache[0] != d.seq:
        d._full_cache = (d.seq, sorted(d.groups))
    return d._full_cache[1]


def _records_delta(d: SimDirectory, since: int, upto: int) -> list[tuple[str, str, bool, Any]]:
    """(gid, kind, props changed, member ops) for each group touched in (since, upto]."""
    touched: dict[str, tuple[list[bool], dict[str, str]]] = {}
    for seq, gid, op, uid in d.log:
        if seq <= since or seq > upto:
            continue
        flags, ops = touched.setdefault(gid, ([False], {}))
        if op == "props":
            flags[0] = True
        elif op in ("add", "remove") and uid is not None:
            ops[uid] = op
    out = []
    for gid in sorted(touched):
        flags, ops = touched[gid]
        kind = "removed" if gid not in d.groups else "changed"
        out.append((gid, kind, flags[0], ops))
    return out


def groups_delta_page(
    d: SimDirectory, query: dict[str, str], base_url: str, path: str, props: list[str]
) -> tuple[int, Json | None]:
    """(status, body) of one `/groups/delta` request (see the module doc); (410, None) for an
    expired token."""
    if "$skiptoken" in query:
        cursor = decode_token(query["$skiptoken"])
    elif "$deltatoken" in query:
        start = decode_token(query["$deltatoken"])
        since = int(start["s"])
        if since < d.token_floor:
            return 410, None
        cursor = {"mode": "delta", "since": since, "upto": d.seq, "i": 0, "m": 0, "p": start["p"]}
    else:
        cursor = {"mode": "full", "upto": d.seq, "after": "", "m": 0, "p": props}
    selected = [p for p in cursor["p"] if p not in ("members", "id")]
    want_members = "members" in cursor["p"]
    m = int(cursor["m"])
    value: list[Json] = []
    links_left = d.links_per_page

    def emit(gid: str, head: Json | None, links: list[Json]) -> bool:
        """Append the group (or its next member chunk); False when the page is full mid-group."""
        nonlocal m, links_left
        item: Json = {"id": gid} if m else {"id": gid, **(head or {})}
        chunk = links[m : m + max(links_left, 0)] if want_members else []
        if want_members and (chunk or not m):
            item["members@delta"] = chunk
        if m and not chunk:
            return False
        value.append(item)
        links_left -= len(chunk)
        if want_members and m + len(chunk) < len(links):
            m += len(chunk)
            return False
        m = 0
        return True

    done = False
    nxt: Json = dict(cursor)
    if cursor["mode"] == "full":
        ids = _full_ids(d)
        pos = bisect_right(ids, cursor["after"]) if cursor["after"] else 0
        if cursor.get("cur"):
            pos = bisect_right(ids, cursor["cur"]) - 1  # still mid-group (ids are sorted)
        while True:
            if pos >= len(ids):
                done = True
                break
            if len(value) >= d.groups_per_page or links_left <= 0:
                break
            gid = ids[pos]
            g = d.groups[gid]
            links = [{"@odata.type": USER_ODATA, "id": u} for u in d.members.get(gid, {})]
            if not emit(gid, {p: g.get(p) for p in selected}, links):
                nxt.update({"cur": gid, "m": m})
                break
            nxt.update({"after": gid, "cur": None, "m": 0})
            pos += 1
    else:
        records = _records_delta(d, int(cursor["since"]), int(cursor["upto"]))
        i = int(cursor["i"])
        while True:
            if i >= len(records):
                done = True
                break
            if len(value) >= d.groups_per_page or links_left <= 0:
                break
            gid, kind, props_changed, ops = records[i]
            if kind == "removed":
                value.append({"id": gid, "@removed": {"reason": "changed"}})
                i += 1
                continue
            g = d.groups[gid]
            head = {p: g.get(p) for p in selected} if props_changed else {}
            changes: list[Json] = [
                {"@odata.type": USER_ODATA, "id": uid}
                if op == "add"
                else {"@odata.type": USER_ODATA, "id": uid, "@removed": {"reason": "deleted"}}
                for uid, op in ops.items()
            ]
            if not emit(gid, head, changes):
                break
            i += 1
        nxt.update({"i": i, "m": m})
    body: Json = {"@odata.context": f"{base_url}/v1.0/$metadata#groups(*)", "value": value}
    if done:
        tok = encode_token({"s": int(cursor["upto"]), "p": cursor["p"]})
        body["@odata.deltaLink"] = f"{base_url}{path}?$deltatoken={quote(tok)}"
    else:
        body["@odata.nextLink"] = f"{base_url}{path}?$skiptoken={quote(encode_token(nxt))}"
    return 200, body


def directory_roles_body(d: SimDirectory, base_url: str, props: list[str], expand: bool) -> Json:
    value = []
    for rid, role in d.roles.items():
        item = {p: role.get(p) for p in (props or ROLE_PROPERTIES)}
        item["id"] = rid
        if expand:
            item["members"] = [
                {"@odata.type": USER_ODATA, "id": uid}
                for uid in d.role_members.get(rid, [])[:ROLE_EXPAND_LIMIT]
            ]
        value.append(item)
    return {"@odata.context": f"{base_url}/v1.0/$metadata#directoryRoles", "value": value}


def role_members_page(
    d: SimDirectory, rid: str, query: dict[str, str], base_url: str, path: str
) -> Json | None:
    if rid not in d.roles:
        return None
    top = max(1, min(999, int(query.get("$top", "100"))))
    offset = int(decode_token(query["$skiptoken"])["o"]) if "$skiptoken" in query else 0
    ids = d.role_members.get(rid, [])
    body: Json = {
        "@odata.context": f"{base_url}/v1.0/$metadata#directoryObjects",
        "value": [{"@odata.type": USER_ODATA, "id": u} for u in ids[offset : offset + top]],
    }
    if offset + top < len(ids):
        tok = encode_token({"o": offset + top})
        body["@odata.nextLink"] = f"{base_url}{path}?$select=id&$top={top}&$skiptoken={quote(tok)}"
    return body
