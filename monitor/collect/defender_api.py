"""Microsoft Defender for Endpoint API: machines, logon users and vulnerabilities in bulk."""

from __future__ import annotations

from collections.abc import Iterator

from monitor.collect.errors import PageError
from monitor.collect.http import ApiClient, Json, page_value

MACHINES = "defender:/api/machines"
MACHINE = "defender:/api/machines/{id}"
LOGON_USERS = "defender:/api/machines/{id}/logonusers"
MACHINE_VULNERABILITIES = "defender:/api/machines/{id}/vulnerabilities"
VULNERABILITIES = "defender:/api/vulnerabilities"
MACHINES_VULNERABILITIES = "defender:/api/vulnerabilities/machinesVulnerabilities"
HUNTING = "defender:/api/advancedqueries/run"

MACHINES_TOP = 10_000  # documented maximum page size
MACHINES_VULNERABILITIES_TOP = 10_000
VULNERABILITIES_TOP = 8_000
# Microsoft's longest run of one advanced hunting query is 200 s: wait a little longer for it
HUNTING_TIMEOUT_SECONDS = 210.0


class DefenderClient:
    """Typed Defender API calls; list endpoints page with `$top`/`$skip` and `@odata.nextLink`."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    def iter_machine_pages(self, top: int = MACHINES_TOP) -> Iterator[list[Json]]:
        yield from self.api.iter_skip_pages(
            MACHINES,
            "/api/machines",
            top,
            permission="Machine.Read.All",
            # documented: 404 when the tenant has no recently seen machines
            empty_on_not_found=True,
        )

    def logon_users(self, machine_id: str) -> list[Json]:
        """One machine's logon users; a 429 raises Throttled at once (the batch stops)."""
        body = self.api.get_json(
            LOGON_USERS,
            f"/api/machines/{machine_id}/logonusers",
            permission="User.Read.All",
            wait_on_throttle=False,
        )

        return page_value(LOGON_USERS, body)

    def run_query(self, query: str) -> list[Json]:
        """One advanced hunting query (AdvancedQuery.Read.All): its `Results` rows.

        Microsoft answers `{"Schema": [{"Name", "Type"}...], "Results": [{column: value}...]}`;
        an answer without a `Results` list of objects is a PageError.
        """
        body = self.api.post_json(
            HUNTING,
            "/api/advancedqueries/run",
            {"Query": query},
            permission="AdvancedQuery.Read.All",
            timeout=max(HUNTING_TIMEOUT_SECONDS, self.api.timeout_seconds),
        )
        rows = body.get("Results")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PageError(HUNTING, "answer has no `Results` list", status=200)
        return rows

    def iter_machine_vulnerability_pages(
        self, top: int = MACHINES_VULNERABILITIES_TOP
    ) -> Iterator[list[Json]]:
        """(machine, CVE, product) items for the whole tenant: one call per 10,000 pairs."""
        yield from self.api.iter_skip_pages(
            MACHINES_VULNERABILITIES,
            "/api/vulnerabilities/machinesVulnerabilities",
            top,
            permission="Vulnerability.Read.All",
        )

    def iter_vulnerability_pages(self, top: int = VULNERABILITIES_TOP) -> Iterator[list[Json]]:
        """Microsoft's whole CVE catalogue (most entries are on no machine of the tenant)."""
        yield from self.api.iter_skip_pages(
            VULNERABILITIES, "/api/vulnerabilities", top, permission="Vulnerability.Read.All"
        )
