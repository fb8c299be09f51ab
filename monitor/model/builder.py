"""GraphBuilder: feeds converted Microsoft objects into a Graph, scope by scope, as they stream in.

The collector calls `add_*` per page (or once), then `set_scope(scope, status)` with the outcome
of each scope's fetch. The account key comes from the tenant config, so relationships from the
account can be written before (or without) the organization being read.

Items are converted one by one: an item that cannot be converted (no `id`, not an object, a
malformed field) is left out and recorded in `rejected` (resource, index, reason); the other
items are added, and its scope can never be set complete - `set_scope` turns COMPLETE into
FAILED naming the rejected items, so the previous data of that scope is kept.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from monitor.config import TenantConfig
from monitor.model.account import account_entity, account_key, account_tag
from monitor.model.graph import Graph, Relationships, ScopeState, ScopeStatus
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
    MACHINE_IDENTIFIED_VULNERABILITY,
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
    LIST_SEPARATOR,
    machine_vulnerability_relationship,
    pair_product,
    vulnerability_cve_relationship,
    vulnerability_entity,
    vulnerability_entity_from_pair,
)

log = logging.getLogger(__name__)

MAX_REPORTED = 3  # rejected items named in a scope's error (all are in `GraphBuilder.rejected`)


@dataclass(frozen=True)
class Rejected:
    """One Microsoft item that could not be converted; its scope is degraded."""

    scope: str
    resource: str  # "users", "machines", "machinesVulnerabilities", ...
    index: int  # position in the list as received (0-based)
    reason: str

    def __str__(self) -> str:
        return f"{self.resource} item {self.index}: {self.reason}"


def _severity_order(value: str | None) -> tuple[int, str]:
    """Orders severities by LEVELS (unknown strings below None, absent lowest), then by text."""
    if value is None:
        return (-2, "")
    rank = level_rank(value)
    return (-1 if rank is None else rank, value)


def _joined(value: object) -> list[str]:
    """The members of a relationship property joined with LIST_SEPARATOR."""
    return value.split(LIST_SEPARATOR) if isinstance(value, str) and value else []


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
        # pairs converted page by page, held aside until the scope's lists were read whole
        self._staged = Relationships()
        self._staged_cves: set[str] = set()
        self._staged_read = 0  # pairs staged so far, rejected ones included (their index)
        self.rejected: list[Rejected] = []

    def _reject(self, scope: str, resource: str, index: int, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
        item = Rejected(scope, resource, index, reason[:300])
        self.rejected.append(item)
        log.warning(
            "item rejected",
            extra={"tenant": self.tenant.name, "scope": scope, "rejected": str(item)},
        )

    def rejected_in(self, scope: str) -> list[Rejected]:
        """The items of `scope` that could not be converted."""
        return [r for r in self.rejected if r.scope == scope]

    def _count(self, scope: str, n: int) -> int:
        self._counts[scope] = self._counts.get(scope, 0) + n
        return n

    def count(self, scope: str) -> int:
        """Main entities added to `scope` so far (for its ScopeStatus.count)."""
        return self._counts.get(scope, 0)

    def add_account(self, organization: Mapping[str, Any] | None) -> None:
        """The account entity from Graph `/organization` value[0] (scope "account")."""
        try:
            entity = account_entity(self.tenant, organization)
        except Exception as exc:  # an unconvertible organization: rejected, not a crash
            self._reject(SCOPE_ACCOUNT, "organization", 0, exc)
            return
        self._graph.add_entity(entity, SCOPE_ACCOUNT)
        self._counts[SCOPE_ACCOUNT] = 1

    def add_users(self, users: Iterable[Mapping[str, Any]]) -> int:
        """Graph users -> user entities + account HAS user (scope "users")."""
        n = 0
        for i, raw in enumerate(users):
            try:
                entity = user_entity(_item(raw), account_tag=self._tag)
            except Exception as exc:  # any unconvertible item: rejected, not a crash
                self._reject(SCOPE_USERS, "users", i, exc)
                continue
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
                device = device_entity(machine, account_tag=self._tag, raw=agent["_rawData"])
            except Exception as exc:  # any unconvertible item: rejected, not a crash
                self._reject(SCOPE_MACHINES, "machines", i, exc)
                continue
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
                key = LOGON_USER.key(user_id)
                reports = {**self._logon_reports.get(key, {}), machine_id: item}
                entity = merged_logon_user_entity(reports, account_tag=self._tag)
                rel = machine_logon_user_relationship(machine_key, key, item)
            except Exception as exc:  # any unconvertible item: rejected, not a crash
                self._reject(scope, "logonusers", i, exc)
                continue
            self._logon_reports[key] = reports
            self._graph.add_entity(entity, logon_users_scope(min(reports)))
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

        The same as `stage_pairs` for every page, then `add_staged_vulnerabilities`.
        """
        self.stage_pairs(pairs)
        return self.add_staged_vulnerabilities(cves)

    def stage_pairs(self, pairs: Iterable[Mapping[str, Any]]) -> None:
        """Fold one page of machine/CVE pairs into IDENTIFIED relationships held aside until
        `add_staged_vulnerabilities` (or dropped by `discard_staged`): a page is converted as
        it arrives, so the raw list is never held whole."""
        g, staged, severities = self._graph, self._staged, self._pair_severity
        for raw in pairs:
            i = self._staged_read
            self._staged_read += 1
            try:
                pair = _item(raw)
                machine_id = require_str(pair, "machine vulnerability", "machineId")
                cve_id = sys.intern(require_str(pair, "machine vulnerability", "cveId").upper())
                product = pair_product(pair)
            except Exception as exc:  # any unconvertible item: rejected, not a crash
                self._reject(SCOPE_VULNERABILITIES, "machinesVulnerabilities", i, exc)
                continue
            machine_key, vuln_key = MACHINE.key(machine_id), VULNERABILITY.key(cve_id)
            key = MACHINE_IDENTIFIED_VULNERABILITY.key(machine_key, vuln_key)
            kb = pair.get("fixingKbId")
            products = [product] if product else []
            kbs = [str(kb)] if kb not in (None, "") else []
            earlier = staged.get(key) or g.relationships.get(key)
            if earlier is not None:  # another product of the pair, or a repeated call
                products += _joined(earlier.get("products"))
                kbs += _joined(earlier.get("fixingKbIds"))
            staged[key] = machine_vulnerability_relationship(machine_key, vuln_key, products, kbs)
            self._staged_cves.add(cve_id)
            severity = pair.get("severity")
            worst = severities.get(cve_id)
            if cve_id not in severities or (severity != worst and isinstance(severity, str)):
                severities[cve_id] = max(
                    worst, severity if isinstance(severity, str) else None, key=_severity_order
                )

    def staged_pairs(self) -> int:
        """Distinct machine/CVE pairs staged so far."""
        return len(self._staged)

    def staged_cves(self) -> set[str]:
        """The CVE ids (upper case) of the staged pairs."""
        return set(self._staged_cves)

    def discard_staged(self) -> None:
        """Forget the staged pairs (their list could not be read whole)."""
        self._staged = Relationships()
        self._staged_cves = set()
        self._staged_read = 0

    def add_staged_vulnerabilities(self, cves: Iterable[Mapping[str, Any]]) -> int:
        """The staged pairs' CVEs as entities (with `cves`' details) and the staged relationships
        into the graph; see `add_machine_vulnerabilities`."""
        details: dict[str, tuple[int, Mapping[str, Any]]] = {}  # CVE id -> (index, item)
        for i, raw in enumerate(cves):
            try:
                cve = _item(raw)
                cve_id = require_str(cve, "vulnerability").upper()
            except Exception as exc:  # any unconvertible item: rejected, not a crash
                self._reject(SCOPE_VULNERABILITIES, "vulnerabilities", i, exc)
                continue
            details[cve_id] = (i, cve)
        g = self._graph
        added = 0
        touched = set(self._staged_cves)
        touched.update(c for c in details if c in self._pair_severity)  # late details
        broken: set[str] = set()  # keys of CVEs whose details could not be converted: left out
        for cve_id in sorted(touched):
            detail = details.get(cve_id)
            if detail is not None:
                try:
                    entity = vulnerability_entity(detail[1], on_machine=True, account_tag=self._tag)
                except Exception as exc:  # any unconvertible item: rejected, not a crash
                    self._reject(SCOPE_VULNERABILITIES, "vulnerabilities", detail[0], exc)
                    broken.add(VULNERABILITY.key(cve_id))
                    continue
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
        staged = self._staged
        if broken:
            for key in [k for k in staged if (staged.endpoints(k) or (None, None))[1] in broken]:
                del staged[key]
        g.absorb(staged, SCOPE_VULNERABILITIES)
        self.discard_staged()
        return self._count(SCOPE_VULNERABILITIES, added)

    def logon_user_machines(self) -> Mapping[str, Mapping[str, Mapping[str, Any]]]:
        """Logon-user key -> machine id -> what that machine reported, for this sync."""
        return self._logon_reports

    def set_scope(self, scope: str, status: ScopeStatus) -> None:
        """Record how the fetch of `scope` ended (complete / failed / skipped).

        A scope with rejected items is never complete: COMPLETE becomes FAILED with an error
        naming them (so its previous data is kept, nothing is deleted on partial evidence).
        """
        rejected = self.rejected_in(scope)
        if rejected and status.state is ScopeState.COMPLETE:
            named = "; ".join(str(r) for r in rejected[:MAX_REPORTED])
            more = (
                f" (+{len(rejected) - MAX_REPORTED} more)" if len(rejected) > MAX_REPORTED else ""
            )
            status = ScopeStatus(
                ScopeState.FAILED,
                count=status.count,
                error=(
                    f"{len(rejected)} item(s) could not be converted, previous data kept: "
                    f"{named}{more}"
                ),
            )
        self._graph.scopes[scope] = status

    def graph(self) -> Graph:
        """The graph built so far (the same object on every call)."""
        return self._graph
