"""Identity stage of a tenant's collection: employees (directory and/or HR file), groups (delta),
directory roles, then the mapping of users to employees and of logon accounts to users.

Runs after users and logon users are in the builder. Scope rules (nothing deleted on doubt):

- `employees` is COMPLETE only when the users were read whole and the HR file (if configured)
  parsed; otherwise FAILED and the previous employees and their relationships are kept.
- Logon users are mapped only when that mapping can be trusted (users and employees complete).
  `identity_inputs` decides that right after the users are read, before any logon users are
  fetched: when it cannot be trusted, the collector holds this sync's logon-user refresh (the
  planned machines' scopes SKIPPED with the reason, no `/logonusers` call spent): the previous
  logon users, their kinds and IS relationships are kept and the machines are refreshed later.
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
    logon_set_aside: int = 0  # machines whose refresh was held (mapping not trusted)

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


@dataclass
class IdentityInputs:
    """What the mapping needs besides the graph: the HR records (None: no HR file configured)
    and, when users cannot be mapped to employees and logon accounts this sync, why."""

    hr_records: list[HrRecord] | None = None
    problem: str | None = None


def identity_inputs(tenant: TenantConfig, graph: Graph) -> IdentityInputs:
    """Call once the directory users are in `graph`, before the logon users are fetched: a
    `problem` means this sync's logon-user refresh should be held (see the module doc)."""
    if not _complete(graph, SCOPE_USERS):
        return IdentityInputs(
            problem="directory users incomplete: employees and logon-user mapping kept as before"
        )
    hr_file = tenant.identity.hr_file
    if hr_file is None:
        return IdentityInputs()
    try:
        return IdentityInputs(hr_records=read_hr_file(hr_file))
    except HrFileError as exc:
        return IdentityInputs(problem=f"HR file: {exc}")


def collect_identity(
    graph: GraphClient,
    target: Graph,
    tenant: TenantConfig,
    progress: Progress,
    *,
    redis_client: redis.Redis | None,
    redis_prefix: str,
    inputs: IdentityInputs,
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

    # employees (the logon users of this sync were not fetched if there is a problem)
    if inputs.problem is not None:
        target.scopes[SCOPE_EMPLOYEES] = ScopeStatus(ScopeState.FAILED, error=inputs.problem)
        return result
    records = inputs.hr_records
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
