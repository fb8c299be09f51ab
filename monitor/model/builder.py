"""GraphBuilder: feeds converted Microsoft objects into a Graph, scope by scope, as they stream in.

The collector calls `add_*` per page (or once), then `set_scope(scope, status)` with the outcome
of each scope's fetch. The account key comes from the tenant config, so relationships from the
account can be written before (or without) the organization being read.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

from monitor.config import TenantConfig
from monitor.model.account import account_entity, account_key, account_tag
from monitor.model.graph import Graph, ScopeStatus
from monitor.model.logon_users import machine_logon_user_relationship, merged_logon_user_entity
from monitor.model.machines import (
    account_machine_relationship,
    device_entity,
    machine_device_relationship,
    machine_entity,
)
from monitor.model.schema import (
    LOGON_USER,
    MACHINE,
    SCOPE_ACCOUNT,
    SCOPE_MACHINES,
    SCOPE_USERS,
    SCOPE_VULNERABILITIES,
    VULNERABILITY,
    ModelError,
    level_rank,
    logon_users_scope,
    require_str,
)
from monitor.model.users import account_user_relationship, user_entity
from monitor.model.vulnerabilities import (
    machine_vulnerability_relationship,
    pair_product,
    vulnerability_cve_relationship,
    vulnerability_entity,
    vulnerability_entity_from_pair,
)


def _severity_order(value: str | None) -> tuple[int, str]:
    """Orders severities by LEVELS (unknown strings below None, absent lowest), then by text."""
    if value is None:
        return (-2, "")
    rank = level_rank(value)
    return (-1 if rank is None else rank, value)


def _item(obj: object) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ModelError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


class GraphBuilder:
    """Builds one tenant's Graph; every `add_*` returns how many main entities it added."""

    def __init__(self, tenant: TenantConfig) -> None:
        self.tenant = tenant
        self.account_key: str = account_key(tenant)
        self._tag = account_tag(tenant)
        self._graph = Graph()
        self._counts: dict[str, int] = {}
        # logon-user key -> machine id -> the item that machine reported
        self._logon_reports: dict[str, dict[str, Mapping[str, Any]]] = {}
        # vulnerabilities: CVE id (upper) -> worst severity among its pairs; CVEs with details
        self._pair_severity: dict[str, str | None] = {}
        self._detailed: set[str] = set()

    def _count(self, scope: str, n: int) -> int:
        self._counts[scope] = self._counts.get(scope, 0) + n
        return n

    def count(self, scope: str) -> int:
        """Main entities added to `scope` so far (for its ScopeStatus.count)."""
        return self._counts.get(scope, 0)

    def add_account(self, organization: Mapping[str, Any] | None) -> None:
        """The account entity from Graph `/organization` value[0] (scope "account")."""
        self._graph.add_entity(account_entity(self.tenant, organization), SCOPE_ACCOUNT)
        self._counts[SCOPE_ACCOUNT] = 1

    def add_users(self, users: Iterable[Mapping[str, Any]]) -> int:
        """Graph users -> user entities + account HAS user (scope "users")."""
        n = 0
        for i, raw in enumerate(users):
            try:
                entity = user_entity(_item(raw), account_tag=self._tag)
            except ModelError as exc:
                raise ModelError(f"users item {i}: {exc}") from None
            self._graph.add_entity(entity, SCOPE_USERS)
            rel = account_user_relationship(self.account_key, entity["_key"])
            self._graph.add_relationship(rel, SCOPE_USERS)
            n += 1
        return self._count(SCOPE_USERS, n)

    def add_machines(self, machines: Iterable[Mapping[str, Any]]) -> int:
        """Defender machines -> machine + user_endpoint, account HAS machine, machine MANAGES."""
        n = 0
        for i, raw in enumerate(machines):
            try:
                machine = _item(raw)
                agent = machine_entity(machine, account_tag=self._tag)
                device = device_entity(machine, account_tag=self._tag)
            except ModelError as exc:
                raise ModelError(f"machines item {i}: {exc}") from None
            g = self._graph
            g.add_entity(agent, SCOPE_MACHINES)
            g.add_entity(device, SCOPE_MACHINES)
            g.add_relationship(
                account_machine_relationship(self.account_key, agent["_key"]), SCOPE_MACHINES
            )
            g.add_relationship(
                machine_device_relationship(agent["_key"], device["_key"]), SCOPE_MACHINES
            )
            n += 1
        return self._count(SCOPE_MACHINES, n)

    def add_logon_users(self, machine_id: str, logon_users: Iterable[Mapping[str, Any]]) -> int:
        """One machine's logon users (scope `logon_users:<machine id>`).

        An account seen on several machines stays one entity (see `merged_logon_user_entity`);
        it is filed under the scope of the smallest machine id that reported it, so the result
        does not depend on the order machines are fetched in.
        """
        scope = logon_users_scope(machine_id)
        machine_key = MACHINE.key(machine_id)
        n = 0
        for i, raw in enumerate(logon_users):
            try:
                item = _item(raw)
                user_id = require_str(item, "logon user")
            except ModelError as exc:
                raise ModelError(f"{scope} item {i}: {exc}") from None
            key = LOGON_USER.key(user_id)
            reports = self._logon_reports.setdefault(key, {})
            reports[machine_id] = item
            entity = merged_logon_user_entity(reports, account_tag=self._tag)
            self._graph.add_entity(entity, logon_users_scope(min(reports)))
            rel = machine_logon_user_relationship(machine_key, key, item)
            self._graph.add_relationship(rel, scope)
            n += 1
        return self._count(scope, n)

    def add_machine_vulnerabilities(
        self, pairs: Iterable[Mapping[str, Any]], cves: Iterable[Mapping[str, Any]]
    ) -> int:
        """Machine/CVE pairs + CVE details -> vulnerabilities, IDENTIFIED and IS cve relationships.

        `pairs` are `/api/vulnerabilities/machinesVulnerabilities` items, `cves` are
        `/api/vulnerabilities` items. Only CVEs with at least one pair become entities (the
        pair's machine need not be among the collected machines). A pair whose CVE is missing
        from `cves` still gives an entity, built from the pair's `cveId` and `severity` alone
        (the worst severity when pairs disagree). Several pairs of one machine and CVE (one per
        product) give ONE relationship whose `products` / `fixingKbIds` list them all. Repeated
        calls (e.g. one per machine) accumulate; a CVE's details are used in the call they come
        with, or later for a CVE already seen in pairs. Returns the number of vulnerability
        entities new in this call. Not thread-safe: call from one thread.
        """
        details: dict[str, Mapping[str, Any]] = {}
        for i, raw in enumerate(cves):
            try:
                cve = _item(raw)
                details[require_str(cve, "vulnerability").upper()] = cve
            except ModelError as exc:
                raise ModelError(f"vulnerabilities item {i}: {exc}") from None
        # (machine id, CVE id) -> ([products], [fixing KB ids]); only for this call's pairs
        found: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        for i, raw in enumerate(pairs):
            try:
                pair = _item(raw)
                machine_id = require_str(pair, "machine vulnerability", "machineId")
                cve_id = require_str(pair, "machine vulnerability", "cveId").upper()
            except ModelError as exc:
                raise ModelError(f"machinesVulnerabilities item {i}: {exc}") from None
            key = (sys.intern(machine_id), sys.intern(cve_id))
            products, kbs = found.setdefault(key, ([], []))
            product = pair_product(pair)
            if product and product not in products:
                products.append(product)
            kb = pair.get("fixingKbId")
            if kb not in (None, "") and str(kb) not in kbs:
                kbs.append(str(kb))
            severity = pair.get("severity")
            worst = self._pair_severity.get(key[1])
            if key[1] not in self._pair_severity or (
                severity != worst and isinstance(severity, str)
            ):
                self._pair_severity[key[1]] = max(
                    worst, severity if isinstance(severity, str) else None, key=_severity_order
                )

        g = self._graph
        added = 0
        touched = {cve_id for _, cve_id in found}
        touched.update(c for c in details if c in self._pair_severity)  # late details
        for cve_id in sorted(touched):
            dto = details.get(cve_id)
            if dto is not None:
                entity = vulnerability_entity(dto, on_machine=True, account_tag=self._tag)
                self._detailed.add(cve_id)
            elif cve_id in self._detailed:
                continue  # keep the entity built from the CVE's details in an earlier call
            else:
                entity = vulnerability_entity_from_pair(
                    cve_id, self._pair_severity.get(cve_id), account_tag=self._tag
                )
            added += entity["_key"] not in g.entities
            g.add_entity(entity, SCOPE_VULNERABILITIES)
            mapped = vulnerability_cve_relationship(entity)
            if mapped is not None:
                g.add_relationship(mapped, SCOPE_VULNERABILITIES)
        for machine_id, cve_id in sorted(found):
            products, kbs = found.pop((machine_id, cve_id))
            rel = machine_vulnerability_relationship(
                MACHINE.key(machine_id), VULNERABILITY.key(cve_id), products, kbs
            )
            earlier = g.relationships.get(rel["_key"])
            if earlier is not None:  # a repeated call: merge the products and KBs
                rel = machine_vulnerability_relationship(
                    rel["_fromEntityKey"],
                    rel["_toEntityKey"],
                    [*earlier["products"], *products],
                    [*earlier["fixingKbIds"], *kbs],
                )
            g.add_relationship(rel, SCOPE_VULNERABILITIES)
        return self._count(SCOPE_VULNERABILITIES, added)

    def logon_user_machines(self) -> Mapping[str, Mapping[str, Mapping[str, Any]]]:
        """Logon-user key -> machine id -> what that machine reported, for this sync."""
        return self._logon_reports

    def set_scope(self, scope: str, status: ScopeStatus) -> None:
        """Record how the fetch of `scope` ended (complete / failed / skipped)."""
        self._graph.scopes[scope] = status

    def graph(self) -> Graph:
        """The graph built so far (the same object on every call)."""
        return self._graph
