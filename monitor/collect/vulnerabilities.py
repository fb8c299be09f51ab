"""Vulnerabilities in bulk (Vulnerability.Read.All): machine-CVE pairs plus the CVE catalogue.

Two list endpoints cover the whole tenant in ceil(pairs / 10,000) + ceil(CVEs / 8,000) calls,
instead of one `/machines/{id}/vulnerabilities` call per machine.
"""

from __future__ import annotations

import sys
from typing import Any

from monitor.collect.defender_api import DefenderClient
from monitor.collect.pages import IncompleteList, read_all
from monitor.collect.progress import Progress
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import SCOPE_VULNERABILITIES

# What the model reads of a pair. The list is held whole until the last page arrived (the scope is
# all or nothing), so pairs are slimmed on arrival: the long composite `id` is dropped and the
# repeated strings (machine ids, CVE ids, products) are shared - about half the memory per pair.
_PAIR_FIELDS = (
    "machineId",
    "cveId",
    "severity",
    "productName",
    "productVendor",
    "productVersion",
    "fixingKbId",
)


def _slim(pair: Any) -> Any:
    if not isinstance(pair, dict):
        return pair  # not an object: the builder rejects it by its index
    return {
        k: sys.intern(v) if isinstance(v, str) else v
        for k in _PAIR_FIELDS
        if (v := pair.get(k)) is not None
    }


def collect_vulnerabilities(
    defender: DefenderClient, builder: GraphBuilder, progress: Progress
) -> ScopeStatus:
    """Fetch all pairs and all CVEs; any failure leaves the scope failed (nothing deleted)."""
    try:
        pairs = read_all(
            defender.iter_machine_vulnerability_pages(), progress, "machine vulnerabilities", _slim
        )
        cves = read_all(defender.iter_vulnerability_pages(), progress, "vulnerabilities")
    except IncompleteList as exc:
        status = exc.status()
    else:
        count = builder.add_machine_vulnerabilities(pairs, cves)
        status = ScopeStatus(ScopeState.COMPLETE, count=count)
    builder.set_scope(SCOPE_VULNERABILITIES, status)
    return status
