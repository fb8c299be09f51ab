"""Machines: Defender's machine list (Machine.Read.All), `$top=10000` pages, `$skip`/nextLink."""

from __future__ import annotations

from dataclasses import dataclass, field

from monitor.collect.defender_api import DefenderClient
from monitor.collect.pages import IncompleteList, read_all
from monitor.collect.progress import Progress
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import SCOPE_MACHINES


@dataclass
class MachinesResult:
    status: ScopeStatus
    last_seen: dict[str, str | None] = field(default_factory=dict)  # machine id -> lastSeen
    onboarded: set[str] = field(default_factory=set)  # ids with onboardingStatus Onboarded

    @property
    def complete(self) -> bool:
        return self.status.state is ScopeState.COMPLETE


def collect_machines(
    defender: DefenderClient, builder: GraphBuilder, progress: Progress
) -> MachinesResult:
    """Fetch every machine (every page: see `ApiClient.iter_skip_pages`)."""
    try:
        machines = read_all(defender.iter_machine_pages(), progress, "machines")
    except IncompleteList as exc:
        status = exc.status()
        builder.set_scope(SCOPE_MACHINES, status)
        return MachinesResult(status)
    # malformed items are the builder's to reject (by index, degrading the scope); discovered
    # devices are listed too (CanBeOnboarded, Unsupported, InsufficientInfo) - a machine without
    # onboardingStatus is taken as onboarded
    last_seen: dict[str, str | None] = {}
    onboarded: set[str] = set()
    for m in machines:
        if isinstance(m, dict) and isinstance(mid := m.get("id"), str):
            last_seen[mid] = m.get("lastSeen")
            if m.get("onboardingStatus", "Onboarded") == "Onboarded":
                onboarded.add(mid)
    status = ScopeStatus(ScopeState.COMPLETE, count=builder.add_machines(machines))
    builder.set_scope(SCOPE_MACHINES, status)
    return MachinesResult(status, last_seen, onboarded)
