"""Vulnerabilities in bulk (Vulnerability.Read.All): machine-CVE pairs plus the CVE catalogue.

Two list endpoints cover the whole tenant in ceil(pairs / 10,000) + ceil(catalogue / 8,000)
calls, instead of one `/machines/{id}/vulnerabilities` call per machine. `/api/vulnerabilities`
is Microsoft's whole catalogue (hundreds of thousands of CVEs, most on no machine of the tenant),
so it is read page by page and only the CVEs present in the pairs are kept: memory follows the
tenant's CVEs, not the catalogue. Pairs are converted page by page into the relationships they
become (held aside until both lists are whole), never held as a raw list.

The two lists cross-check each other; when they disagree the scope is failed (previous data
kept) instead of turning the gap into deletions or emptied fields:
- pairs referencing CVEs the catalogue does not have (an empty or short catalogue);
- catalogue `exposedMachines` adding up to clearly more machine-CVE pairs than were listed.
"""

from __future__ import annotations

from collections.abc import Iterable

from monitor.collect.defender_api import DefenderClient
from monitor.collect.errors import CollectError
from monitor.collect.http import Json
from monitor.collect.progress import Progress
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import SCOPE_VULNERABILITIES

# Pair CVEs missing from the catalogue that are tolerated (a CVE published between the two
# reads): up to this share of the referenced CVEs. More means the catalogue was cut short.
MISSING_CVE_TOLERANCE = 0.02
# The catalogue's exposedMachines may lag the pairs a little; listing fewer than this share of
# the pairs it announces means the pair list was cut short.
EXPOSURE_TOLERANCE = 0.8


class CatalogueFilter:
    """Keeps the catalogue entries of the wanted CVEs, page by page; counts the rest."""

    def __init__(self, wanted: set[str]) -> None:
        self.wanted = wanted
        self.kept: dict[str, Json] = {}
        self.read = 0
        self.exposed_total = 0  # sum of exposedMachines over the whole catalogue

    def add_page(self, page: Iterable[Json]) -> None:
        wanted, kept = self.wanted, self.kept
        for item in page:
            self.read += 1
            if not isinstance(item, dict):
                continue  # never one of the pairs' CVEs; the builder never sees it
            exposed = item.get("exposedMachines")
            if isinstance(exposed, int) and not isinstance(exposed, bool) and exposed > 0:
                self.exposed_total += exposed
            cve_id = item.get("id")
            if isinstance(cve_id, str) and cve_id.upper() in wanted:
                kept[cve_id.upper()] = item

    def missing(self) -> int:
        return len(self.wanted) - len(self.kept)


def _cross_check(distinct: int, catalogue: CatalogueFilter) -> str | None:
    """Why the two lists cannot both be whole (None: they agree); `distinct`: machine-CVE pairs."""
    missing = catalogue.missing()
    referenced = len(catalogue.wanted)
    if missing > int(referenced * MISSING_CVE_TOLERANCE):
        return (
            f"defender:/api/vulnerabilities: the catalogue lacks {missing} of the {referenced}"
            f" CVEs the machine-CVE pairs reference ({catalogue.read} entries read);"
            " previous vulnerabilities kept"
        )
    if catalogue.exposed_total and distinct < catalogue.exposed_total * EXPOSURE_TOLERANCE:
        return (
            "defender:/api/vulnerabilities/machinesVulnerabilities: short list:"
            f" {distinct} machine-CVE pairs, the catalogue's exposedMachines add up to"
            f" {catalogue.exposed_total}; previous vulnerabilities kept"
        )
    return None


def collect_vulnerabilities(
    defender: DefenderClient, builder: GraphBuilder, progress: Progress
) -> ScopeStatus:
    """Fetch all pairs (converted page by page, held aside), then the catalogue entries of
    their CVEs; any failure or disagreement leaves the scope failed (nothing deleted, nothing
    emptied)."""
    read = 0
    try:
        for page in defender.iter_machine_vulnerability_pages():
            builder.stage_pairs(page)
            read += len(page)
            progress("machine vulnerabilities", read, None)
    except CollectError as exc:
        return _failed(builder, ScopeStatus(ScopeState.FAILED, count=read, error=str(exc)))
    catalogue = CatalogueFilter(builder.staged_cves())
    try:
        for page in defender.iter_vulnerability_pages():
            catalogue.add_page(page)
            progress("vulnerabilities", catalogue.read, None)
    except CollectError as exc:
        status = ScopeStatus(ScopeState.FAILED, count=len(catalogue.kept), error=str(exc))
        return _failed(builder, status)
    problem = _cross_check(builder.staged_pairs(), catalogue)
    if problem is not None:
        status = ScopeStatus(ScopeState.FAILED, count=len(catalogue.kept), error=problem)
        return _failed(builder, status)
    count = builder.add_staged_vulnerabilities(catalogue.kept.values())
    status = ScopeStatus(ScopeState.COMPLETE, count=count)
    builder.set_scope(SCOPE_VULNERABILITIES, status)
    return status


def _failed(builder: GraphBuilder, status: ScopeStatus) -> ScopeStatus:
    builder.discard_staged()
    builder.set_scope(SCOPE_VULNERABILITIES, status)
    return status
