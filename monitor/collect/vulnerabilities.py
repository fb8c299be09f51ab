"""Vulnerabilities in bulk (Vulnerability.Read.All): machine-CVE pairs plus the CVE catalogue.

Two list endpoints cover the whole tenant in ceil(pairs / 10,000) + ceil(CVEs / 8,000) calls,
instead of one `/machines/{id}/vulnerabilities` call per machine.
"""

from __future__ import annotations

from monitor.collect.defender_api import DefenderClient
from monitor.collect.errors import CollectError
from monitor.collect.progress import Progress
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import SCOPE_VULNERABILITIES


def collect_vulnerabilities(
    defender: DefenderClient, builder: GraphBuilder, progress: Progress
) -> ScopeStatus:
    """Fetch all pairs and all CVEs; any failure leaves the scope failed (nothing deleted)."""
    pairs: list[dict] = []
    cves: list[dict] = []
    try:
        for page in defender.iter_machine_vulnerability_pages():
            pairs.extend(page)
            progress("machine vulnerabilities", len(pairs), None)
        for page in defender.iter_vulnerability_pages():
            cves.extend(page)
            progress("vulnerabilities", len(cves), None)
    except CollectError as exc:
        status = ScopeStatus(ScopeState.FAILED, count=len(pairs), error=str(exc))
    else:
        count = builder.add_machine_vulnerabilities(pairs, cves)
        status = ScopeStatus(ScopeState.COMPLETE, count=count)
    builder.set_scope(SCOPE_VULNERABILITIES, status)
    return status
