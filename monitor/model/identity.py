"""Identity mapping: directory users to employees, logon accounts to directory users.

Users to employees (`microsoft_defender_user IS employee`, `matchedBy`): the configured order
(`identity.match`, default employee id, then e-mail, then UPN; case-insensitive) against the
employees' employee id / e-mail. Users that match no employee get `employeeMapped: false`.
`employee MANAGES employee` comes from the HR file's manager e-mail, or the directory manager
(`identity.directory_employees.managers`).

Logon accounts to directory users (`microsoft_defender_logon_user IS microsoft_defender_user`,
`matchedBy`): by SID (`accountSid` = `onPremisesSecurityIdentifier`), then `accountName` +
`accountDomain` against `onPremisesSamAccountName` + the NetBIOS name of
`onPremisesDomainName` (its first label, or `identity.netbios_domains`), then UPN (`accountName`
equal to a UPN, or to a UPN's part before `@` when that is unique). Each logon user gets
`accountKind`: `service` (well-known service SIDs or domains, or only Service/Batch logons),
`domain` (mapped), `local` (the domain is the machine's name, or a well-known local RID such as
500 without a mapping) or `unknown`; `directoryUserState` (`enabled`, `disabled`, `not_found`
for an unmapped account of a directory domain, else null); `employeeStatus` of the mapped user's
employee; `loggedOnAfterTermination` (last seen after the HR termination date).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from monitor.config import IdentitySettings
from monitor.memory import gc_paused
from monitor.model.employees import (
    HrRecord,
    employee_entity,
    employee_id_of,
    index_records,
    is_directory_employee,
    lower_text,
)
from monitor.model.graph import Graph, Item
from monitor.model.raw import RawData
from monitor.model.schema import (
    EMPLOYEE_MANAGES_EMPLOYEE,
    LOGON_USER,
    LOGON_USER_IS_USER,
    MACHINE,
    MACHINE_HAS_LOGON_USER,
    SCOPE_EMPLOYEES,
    USER,
    USER_IS_EMPLOYEE,
)

SERVICE_SIDS = frozenset({"S-1-5-18", "S-1-5-19", "S-1-5-20"})  # SYSTEM, LOCAL/NETWORK SERVICE
SERVICE_SID_PREFIXES = (
    "S-1-5-80-",
    "S-1-5-82-",
    "S-1-5-90-",
    "S-1-5-96-",
)  # services, IIS, DWM, UMFD
SERVICE_DOMAINS = frozenset(
    {"NT AUTHORITY", "NT SERVICE", "WINDOW MANAGER", "FONT DRIVER HOST", "IIS APPPOOL"}
)
SERVICE_LOGON_TYPES = frozenset({"service", "batch"})
LOCAL_RIDS = ("-500", "-501", "-503", "-504")  # Administrator, Guest, DefaultAccount, WDAGUtility


@dataclass
class EmployeesOutcome:
    employees: int = 0
    mapped_users: int = 0
    unmapped_users: int = 0
    user_employee: dict[str, str] = field(default_factory=dict)  # user key -> employee key


def _raw(entity: Mapping[str, Any]) -> Mapping[str, Any]:
    raw = entity.get("_rawData")
    if isinstance(raw, RawData):
        raw = raw.value
    if isinstance(raw, list) and raw and isinstance(raw[0], Mapping):
        inner = raw[0].get("rawData")
        if isinstance(inner, Mapping):
            return inner
    return {}


def _find(index: Mapping[str, str], value: object) -> str | None:
    text = lower_text(value)
    return index.get(text) if text else None


def build_employees(
    graph: Graph,
    settings: IdentitySettings,
    hr_records: list[HrRecord] | None,
    *,
    account_tag: str | None = None,
    users: list[Item] | None = None,
) -> EmployeesOutcome:
    """Employees, user IS employee, employee MANAGES employee into `graph` (scope "employees");
    sets `employeeMapped` on every user entity and `directoryAccountEnabled` on employees."""
    with gc_paused():
        if users is None:
            users = [e for e in graph.entities.values() if e.get("_type") == USER.type]
        return _build_employees(graph, settings, hr_records, users, account_tag)


def _build_employees(
    graph: Graph,
    settings: IdentitySettings,
    hr_records: list[HrRecord] | None,
    users: list[Item],
    account_tag: str | None,
) -> EmployeesOutcome:
    by_hr_id, by_hr_mail = index_records(hr_records or [])
    employees: dict[str, Item] = {}  # employee key -> entity
    key_of_hr: dict[int, str] = {}  # id(HR record) -> its employee key
    for r in hr_records or []:
        emp_id = employee_id_of(None, r)
        assert emp_id is not None
        entity = employee_entity(emp_id, None, r, account_tag=account_tag)
        employees[entity["_key"]] = entity
        key_of_hr[id(r)] = entity["_key"]
    # directory employees (merged with their HR record when one matches)
    for u in users:
        if not is_directory_employee(u, settings.directory_employees):
            continue
        rec = None
        if u.get("employeeId"):
            rec = by_hr_id.get(str(u["employeeId"]).lower())
        for mail in (lower_text(u.get("email")), lower_text(u.get("userPrincipalName"))):
            if rec is None and mail:
                rec = by_hr_mail.get(mail)
        if rec is not None:
            key = key_of_hr[id(rec)]
            emp_id = employees[key]["id"]
            employees[key] = employee_entity(emp_id, u, rec, account_tag=account_tag)
            continue
        emp_id = employee_id_of(u, None)
        if emp_id is None:
            continue
        entity = employee_entity(emp_id, u, None, account_tag=account_tag)
        employees.setdefault(entity["_key"], entity)
    # indexes for matching users to employees
    emp_by_id: dict[str, str] = {}
    emp_by_mail: dict[str, str] = {}
    for key, e in employees.items():
        if e.get("employeeId"):
            emp_by_id.setdefault(str(e["employeeId"]).lower(), key)
        for mail in e.get("email") or ():  # a list (JupiterOne's Person)
            emp_by_mail.setdefault(str(mail).lower(), key)
    outcome = EmployeesOutcome(employees=len(employees))
    enabled: dict[str, bool] = {}
    for u in users:
        hit: tuple[str, str] | None = None
        for how in settings.match:
            if how == "employee_id":
                found = _find(emp_by_id, u.get("employeeId"))
            elif how == "email":
                found = _find(emp_by_mail, u.get("email"))
            else:
                found = _find(emp_by_mail, u.get("userPrincipalName"))
            if found is not None:
                hit = (found, how)
                break
        u["employeeMapped"] = hit is not None
        if hit is None:
            outcome.unmapped_users += 1
            continue
        outcome.mapped_users += 1
        emp_key, matched_by = hit
        outcome.user_employee[u["_key"]] = emp_key
        rel = USER_IS_EMPLOYEE.relationship(u["_key"], emp_key, {"matchedBy": matched_by})
        graph.add_relationship(rel, SCOPE_EMPLOYEES)
        if isinstance(u.get("accountEnabled"), bool):
            enabled[emp_key] = enabled.get(emp_key, False) or u["accountEnabled"]
    for emp_key, is_enabled in enabled.items():
        employees[emp_key]["directoryAccountEnabled"] = is_enabled
    # manager chain: HR manager e-mail first, else the directory manager
    user_by_id = {u.get("id"): u for u in users}
    for key, e in employees.items():
        manager_key: str | None = None
        if e.get("managerEmail"):
            manager_key = emp_by_mail.get(str(e["managerEmail"]).lower())
        elif settings.directory_employees.managers:
            user_key = _raw(e).get("userKey")
            user = graph.entities.get(user_key) if isinstance(user_key, str) else None
            manager = _raw(user).get("manager") if user else None
            if isinstance(manager, Mapping):
                mgr_user = user_by_id.get(manager.get("id"))
                if mgr_user is not None:
                    manager_key = outcome.user_employee.get(mgr_user["_key"])
        if manager_key is not None and manager_key != key:
            rel = EMPLOYEE_MANAGES_EMPLOYEE.relationship(manager_key, key)
            graph.add_relationship(rel, SCOPE_EMPLOYEES)
    for e in employees.values():
        graph.add_entity(e, SCOPE_EMPLOYEES)
    return outcome


@dataclass
class UserIndex:
    """Directory users indexed for logon-account matching."""

    by_sid: dict[str, Item] = field(default_factory=dict)
    by_sam: dict[tuple[str, str], Item] = field(default_factory=dict)  # (sam, NetBIOS) lower
    by_upn: dict[str, Item] = field(default_factory=dict)
    by_upn_local: dict[str, Item | None] = field(default_factory=dict)  # None: ambiguous
    netbios: set[str] = field(default_factory=set)  # directory NetBIOS domains, lower


def index_users(users: Iterable[Item], netbios_domains: Mapping[str, str]) -> UserIndex:
    idx = UserIndex()
    dns_to_netbios: dict[str, set[str]] = {}
    for nb, dns in netbios_domains.items():
        dns_to_netbios.setdefault(dns.lower(), set()).add(nb.lower())
    for u in users:
        sid = u.get("onPremisesSecurityIdentifier")
        if isinstance(sid, str) and sid:
            idx.by_sid[sid.upper()] = u
        sam = lower_text(u.get("onPremisesSamAccountName"))
        dns_name = lower_text(u.get("onPremisesDomainName"))
        if sam and dns_name:
            names = {dns_name, dns_name.split(".")[0], *dns_to_netbios.get(dns_name, ())}
            idx.netbios.update(names)
            for nb in names:
                idx.by_sam[(sam, nb)] = u
        upn = lower_text(u.get("userPrincipalName"))
        if upn:
            idx.by_upn[upn] = u
            local = upn.split("@")[0]
            idx.by_upn_local[local] = None if local in idx.by_upn_local else u
    return idx


@dataclass
class LogonOutcome:
    kinds: Counter[str] = field(default_factory=Counter)  # "domain": mapped to a directory user


def _machines_of(graph: Graph) -> dict[str, list[str]]:
    """Logon-user key -> ids of the machines that HAVE it (this sync), from the relationships."""
    prefix = MACHINE.key("")
    out: dict[str, list[str]] = {}
    rel_type = MACHINE_HAS_LOGON_USER.type
    for rel in graph.relationships.of_type(rel_type):
        mid = rel["_fromEntityKey"].removeprefix(prefix)
        out.setdefault(rel["_toEntityKey"], []).append(mid)
    return out


def map_logon_users(
    graph: Graph,
    settings: IdentitySettings,
    user_employee: Mapping[str, str] | None = None,
    logon_keys: Iterable[str] | None = None,
    *,
    users: list[Item] | None = None,
    machines_of: Mapping[str, Iterable[str]] | None = None,
) -> LogonOutcome:
    """Set accountKind & co. on the logon users in `graph` and add their IS user relationships
    (in each logon user's own scope). `users` / `logon_keys` / `machines_of` (logon-user key ->
    machine ids) save a pass over the graph when the caller has them."""
    with gc_paused():
        if users is None:
            users = [e for e in graph.entities.values() if e.get("_type") == USER.type]
        if logon_keys is None:
            logon_keys = [k for k, e in graph.entities.items() if e.get("_type") == LOGON_USER.type]
        if machines_of is None:
            machines_of = _machines_of(graph)
        return _map_logon_users(
            graph, settings, user_employee or {}, logon_keys, users, machines_of
        )


def _hosts_of(graph: Graph, key: str, machines_of: Mapping[str, Iterable[str]]) -> set[str]:
    """Upper-case short names of the machines that HAVE this logon user (this sync)."""
    out = set()
    for mid in machines_of.get(key, ()):
        machine = graph.entities.get(MACHINE.key(mid)) or {}
        name = str(machine.get("computerDnsName") or "").split(".")[0].upper()
        if name:
            out.add(name)
    return out


def _map_logon_users(
    graph: Graph,
    settings: IdentitySettings,
    user_employee: Mapping[str, str],
    logon_keys: Iterable[str],
    users: list[Item],
    machines_of: Mapping[str, Iterable[str]],
) -> LogonOutcome:
    idx = index_users(users, settings.netbios_domains)
    by_sid, by_sam, by_upn, by_local = idx.by_sid, idx.by_sam, idx.by_upn, idx.by_upn_local
    entities, scope_of = graph.entities, graph.scope_of
    rels = graph.relationships
    rel_type_name = LOGON_USER_IS_USER.type
    assert LOGON_USER_IS_USER.key("a", "b") == "a|is|b"
    kinds: Counter[str] = Counter()
    for key in logon_keys:
        lu = entities[key]
        sid = lu.get("accountSid")
        sid_u = sid.upper() if isinstance(sid, str) else ""
        name = lu.get("username")
        name = name.lower() if isinstance(name, str) else ""
        domain = lu.get("domain")
        domain = domain.lower() if isinstance(domain, str) else ""
        user: Item | None = None
        how: str | None = None
        kind = "unknown"
        if (
            sid_u in SERVICE_SIDS
            or sid_u.startswith(SERVICE_SID_PREFIXES)
            or domain.upper() in SERVICE_DOMAINS
        ):
            kind = "service"
        else:
            if sid_u:
                user = by_sid.get(sid_u)
                how = "sid"
            if user is None and name:
                user = by_sam.get((name, domain))
                how = "samAccountName"
                if user is None:
                    user = by_upn.get(name) or (by_local.get(name) if "@" not in name else None)
                    how = "upn"
            if user is not None:
                kind = "domain"
            elif sid_u.endswith(LOCAL_RIDS) or domain.upper() in _hosts_of(graph, key, machines_of):
                kind = "local"
            else:
                types = {
                    t.strip().lower()
                    for t in str(lu.get("logonTypes") or "").split(",")
                    if t.strip()
                }
                if types and types <= SERVICE_LOGON_TYPES:
                    kind = "service"
        lu["accountKind"] = kind
        kinds[kind] += 1
        state: str | None = None
        emp_status: str | None = None
        after_termination: bool | None = None
        if user is not None:
            state = "disabled" if user.get("accountEnabled") is False else "enabled"
            user_key = user["_key"]
            rel_key = f"{key}|is|{user_key}"  # rel_type.relationship(), inlined: hot loop
            rels[rel_key] = {
                "_key": rel_key,
                "_type": rel_type_name,
                "_class": "IS",
                "_fromEntityKey": key,
                "_toEntityKey": user_key,
                "displayName": "IS",
                "matchedBy": how,
            }
            scope_of[rel_key] = scope_of[key]
            emp_key = user_employee.get(user_key)
            emp = entities.get(emp_key) if emp_key else None
            if emp is not None:
                emp_status = emp.get("status")
                if emp_status == "terminated":
                    term, last = emp.get("terminationOn"), lu.get("lastSeenOn")
                    after_termination = term is None or (isinstance(last, int) and last > term)
                else:
                    after_termination = False
        elif kind == "unknown" and domain and domain in idx.netbios:
            state = "not_found"
        lu["directoryUserState"] = state
        lu["employeeStatus"] = emp_status
        lu["loggedOnAfterTermination"] = after_termination
    return LogonOutcome(kinds)
