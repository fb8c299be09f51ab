"""Identity stage of a tenant's collection: employees (directory and/or HR file), groups (delta),
directory roles, then the mapping of users to employees and of logon accounts to users.

Runs after users and logon users are in the builder. Scope rules (nothing deleted on doubt):

- `employees` is COMPLETE only when the users were read whole and the HR file (if configured)
  parsed; otherwise FAILED and the previous employees and their relationships are kept.
- The logon users refreshed this sync are mapped only when that mapping can be trusted (users
  and employees complete). Otherwise they are set aside (scopes SKIPPED with the reason): the
  previous logon users, their kinds and IS relationships are kept and the machines are
  refreshed again next sync.
- `groups` / `directory_roles`: see monitor.collect.groups and monitor.collect.directory_roles.
  A feature turned off in the config is an empty COMPLETE scope.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import redis

from monitor.collect.directory_roles import collect_directory_roles
from monitor.collect.graph_api import GraphClient
from monitor.collect.groups import GroupsResult, GroupsStateStore, collect_groups
from monitor.collect.logon_users import LogonUsersResult
from monitor.collect.progress import Progress
from monitor.config import TenantConfig
from monitor.model.account import account_tag
from monitor.model.employees import HrFileError, HrRecord, read_hr_file
from monitor.model.graph import Graph, Item, ScopeState, ScopeStatus
from monitor.model.identity import EmployeesOutcome, build_employees, map_logon_users
from monitor.model.schema import (
    LOGON_USER,
    SCOPE_DIRECTORY_ROLES,
    SCOPE_EMPLOYEES,
    SCOPE_GROUPS,
    SCOPE_LOGON_USERS,
    SCOPE_USERS,
    USER,
)


@dataclass
class IdentityResult:
    """What the identity stage did; `after_commit()` saves the groups delta state."""

    groups: GroupsResult | None = None
    groups_store: GroupsStateStore | None = None
    employees: EmployeesOutcome | None = None
    logon_kinds: dict[str, int] = field(default_factory=dict)
    logon_set_aside: int = 0  # machines whose logon users were kept (mapping not trusted)

    def summary(self) -> dict[str, object]:
        """For the sync metadata: what was mapped, whether groups had to be read in full."""
        emp = self.employees
        return {
            "employees": emp.employees if emp else None,
            "users_mapped": emp.mapped_users if emp else None,
            "users_unmapped": emp.unmapped_users if emp else None,
            "logon_kinds": dict(sorted(self.logon_kinds.items())),
            "logon_set_aside": self.logon_set_aside,
            "groups_resynced": self.groups.resynced if self.groups else None,
        }

    def after_commit(self) -> None:
        if self.groups is not None and self.groups.state is not None and self.groups_store:
            self.groups_store.save(self.groups.state)


def _complete(graph: Graph, scope: str) -> bool:
    st = graph.scopes.get(scope)
    return st is not None and st.state is ScopeState.COMPLETE


def _set_aside_logon_users(graph: Graph, reason: str, logon: LogonUsersResult | None) -> int:
    """Remove this sync's logon users from the graph; their scopes become SKIPPED (kept)."""
    prefix = f"{SCOPE_LOGON_USERS}:"
    scopes = {
        s
        for s, st in graph.scopes.items()
        if s.startswith(prefix) and st.state is not ScopeState.SKIPPED
    }
    for store in (graph.entities, graph.relationships):
        for key in [k for k in store if graph.scope_of.get(k, "").startswith(prefix)]:
            del store[key]
            graph.scope_of.pop(key, None)
    for s in scopes:
        graph.scopes[s] = ScopeStatus(ScopeState.SKIPPED, error=reason)
    if logon is not None:
        logon.refreshed.clear()
    return len(scopes)


def collect_identity(
    graph: GraphClient,
    target: Graph,
    tenant: TenantConfig,
    progress: Progress,
    *,
    redis_client: redis.Redis | None,
    redis_prefix: str,
    logon: LogonUsersResult | None = None,
    machines_of: Mapping[str, Iterable[str]] | None = None,
) -> IdentityResult:
    """Employees, groups, roles and the mappings into `target` (see the module doc)."""
    cfg = tenant.identity
    tag = account_tag(tenant)
    result = IdentityResult()

    # groups and roles do not depend on the rest
    if cfg.groups:
        result.groups_store = GroupsStateStore(redis_client, redis_prefix, tenant.name)
        result.groups = collect_groups(
            graph, target, result.groups_store, progress, account_tag=tag
        )
    else:
        target.scopes[SCOPE_GROUPS] = ScopeStatus(ScopeState.COMPLETE)
    if cfg.directory_roles:
        collect_directory_roles(graph, target, progress, account_tag=tag)
    else:
        target.scopes[SCOPE_DIRECTORY_ROLES] = ScopeStatus(ScopeState.COMPLETE)

    # employees
    records: list[HrRecord] | None = None
    problem: str | None = None
    if not _complete(target, SCOPE_USERS):
        problem = "directory users incomplete: employees and logon-user mapping kept as before"
    elif cfg.hr_file is not None:
        try:
            records = read_hr_file(cfg.hr_file)
        except HrFileError as exc:
            problem = f"HR file: {exc}"
    if problem is not None:
        target.scopes[SCOPE_EMPLOYEES] = ScopeStatus(ScopeState.FAILED, error=problem)
        result.logon_set_aside = _set_aside_logon_users(target, problem, logon)
        return result
    users: list[Item] = []
    logon_keys: list[str] = []
    for key, entity in target.entities.items():
        typ = entity.get("_type")
        if typ == USER.type:
            users.append(entity)
        elif typ == LOGON_USER.type:
            logon_keys.append(key)
    if cfg.directory_employees.enabled or records is not None:
        result.employees = build_employees(target, cfg, records, account_tag=tag, users=users)
        target.scopes[SCOPE_EMPLOYEES] = ScopeStatus(
            ScopeState.COMPLETE, count=result.employees.employees
        )
    else:
        target.scopes[SCOPE_EMPLOYEES] = ScopeStatus(ScopeState.COMPLETE)

    # logon accounts -> directory users
    progress("identity mapping", 0, None)
    user_employee = result.employees.user_employee if result.employees else {}
    outcome = map_logon_users(
        target, cfg, user_employee, logon_keys, users=users, machines_of=machines_of
    )
    result.logon_kinds = dict(outcome.kinds)
    return result
