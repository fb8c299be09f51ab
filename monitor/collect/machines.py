"""Machines: Defender's machine list (Machine.Read.All), `$top=10000` pages with `$skip`."""

from __future__ import annotations

from dataclasses import dataclass, field

from monitor.collect.defender_api import DefenderClient
from monitor.collect.errors import CollectError
from monitor.collect.progress import Progress
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import SCOPE_MACHINES


@dataclass
class MachinesResult:
    status: ScopeStatus
    last_seen: dict[str, str | None] = field(default_factory=dict)  # machine id -> lastSeen

    @property
    def complete(self) -> bool:
        return self.status.state is ScopeState.COMPLETE


def collect_machines(
    defender: DefenderClient, builder: GraphBuilder, progress: Progress
) -> MachinesResult:
    """Fetch every machine; a page shorter than `$top` ends the list."""
    pages: list[list[dict]] = []
    fetched = 0
    try:
        for page in defender.iter_machine_pages():
            pages.append(page)
            fetched += len(page)
            progress("machines", fetched, None)
    except CollectError as exc:
        status = ScopeStatus(ScopeState.FAILED, count=fetched, error=str(exc))
        builder.set_scope(SCOPE_MACHINES, status)
        return MachinesResult(status)
    last_seen: dict[str, str | None] = {}
    count = 0
    for page in pages:
        count += builder.add_machines(page)
        for m in page:
            if isinstance(m.get("id"), str):
                last_seen[m["id"]] = m.get("lastSeen")
    status = ScopeStatus(ScopeState.COMPLETE, count=count)
    builder.set_scope(SCOPE_MACHINES, status)
    return MachinesResult(status, last_seen)
