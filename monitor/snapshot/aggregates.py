"""Per-sync aggregates the console plots over time (machines by risk / exposure / health, open
critical CVEs): computed from the fetched graph and stored with the sync's bounded metadata."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from monitor.model.graph import Graph, ScopeState, ScopeStatus
from monitor.model.schema import (
    MACHINE,
    SCOPE_MACHINES,
    SCOPE_VULNERABILITIES,
    VULNERABILITY,
)

MACHINE_FIELDS = ("riskScore", "exposureLevel", "healthStatus")


def compute(graph: Graph, states: Mapping[str, ScopeStatus]) -> dict[str, Any]:
    """`{"machines": {field: {value: n}}, "criticalCves": n}`; a part is left out when its
    scope was not fetched completely this sync (a partial count would read as a drop)."""
    out: dict[str, Any] = {}
    complete = {s for s, st in states.items() if st.state is ScopeState.COMPLETE}
    if SCOPE_MACHINES in complete:
        counters: dict[str, Counter[str]] = {f: Counter() for f in MACHINE_FIELDS}
        for item in graph.entities.values():
            if item.get("_type") == MACHINE.type:
                for f in MACHINE_FIELDS:
                    counters[f][str(item.get(f) or "None")] += 1
        out["machines"] = {f: dict(sorted(c.items())) for f, c in counters.items()}
    if SCOPE_VULNERABILITIES in complete:
        out["criticalCves"] = sum(
            1
            for item in graph.entities.values()
            if item.get("_type") == VULNERABILITY.type
            and str(item.get("severity") or "").lower() == "critical"
        )
    return out
