"""Vulnerabilities in bulk (Vulnerability.Read.All): machine-CVE pairs plus the CVE catalogue.

Two list endpoints cover the whole tenant in ceil(pairs / 10,000) + ceil(catalogue / 8,000)
calls, instead of one `/machines/{id}/vulnerabilities` call per machine. `/api/vulnerabilities`
is Microsoft's whole catalogue (hundreds of thousands of CVEs, most on no machine of the tenant),
so it is read page by page and only the CVEs present in the pairs are kept: memory follows the
tenant's CVEs, not the catalogue.

The two lists cross-check each other; when they disagree the scope is failed (previous data
kept) instead of turning the gap into deletions or emptied fields:
- pairs referencing CVEs the catalogue does not have (an empty or short catalogue);
- catalogue `exposedMachines` adding up to clearly more machine-CVE pairs than were listed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from monitor.collect.defender_api import DefenderClient
from monitor.collect.errors import CollectError
from monitor.collect.http import Json
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

# Pair CVEs missing from the catalogue that are tolerated (a CVE published between the two
# reads): up to this share of the referenced CVEs. More means the catalogue was cut short.
MISSING_CVE_TOLERANCE = 0.02
# The catalogue's exposedMachines may lag the pairs a little; listing fewer than this share of
# the pairs it announces means the pair list was cut short.
EXPOSURE_TOLERANCE = 0.8


def _slim(pair: Any) -> Any:
    if not isinstance(pair, dict):
        return pair  # not an object: the builder rejects it by its index
    return {
        k: sys.intern(v) if isinstance(v, str) else v
        for k in _PAIR_FIELDS
        if (v := pair.get(k)) is not None
    }


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


def _cross_check(pairs: list[Json], catalogue: CatalogueFilter) -> str | None:
    """Why the two lists cannot both be whole (None: they agree)."""
    missing = catalogue.missing()
    referenced = len(catalogue.wanted)
    if missing > int(referenced * MISSING_CVE_TOLERANCE):
        return (
            f"defender:/api/vulnerabilities: the catalogue lacks {missing} of the {referenced}"
            f" CVEs the machine-CVE pairs reference ({catalogue.read} entries read);"
            " previous vulnerabilities kept"
        )
    distinct = len(
        {hash((p.get("machineId"), p.get("cveId"))) for p in pairs if isinstance(p, dict)}
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
    """Fetch all pairs, then the catalogue entries of their CVEs; any failure or disagreement
    leaves the scope failed (nothing deleted, nothing emptied)."""
    try:
        pairs = read_all(
            defender.iter_machine_vulnerability_pages(), progress, "machine vulnerabilities", _slim
        )
    except IncompleteList as exc:
        status = exc.status()
        builder.set_scope(SCOPE_VULNERABILITIES, status)
        return status
    wanted = {sys.intern(c.upper()) for p in pairs if isinstance(c := p.get("cveId"), str) and c}
    catalogue = CatalogueFilter(wanted)
    try:
        for page in defender.iter_vulnerability_pages():
            catalogue.add_page(page)
            progress("vulnerabilities", catalogue.read, None)
    except CollectError as exc:
        status = ScopeStatus(ScopeState.FAILED, count=len(catalogue.kept), error=str(exc))
        builder.set_scope(SCOPE_VULNERABILITIES, status)
        return status
    problem = _cross_check(pairs, catalogue)
    if problem is not None:
        status = ScopeStatus(ScopeState.FAILED, count=len(catalogue.kept), error=problem)
    else:
        count = builder.add_machine_vulnerabilities(pairs, catalogue.kept.values())
        status = ScopeStatus(ScopeState.COMPLETE, count=count)
    builder.set_scope(SCOPE_VULNERABILITIES, status)
    return status
