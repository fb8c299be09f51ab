"""Account: the tenant's organization from Graph (Organization.Read.All)."""

from __future__ import annotations

from monitor.collect.errors import CollectError
from monitor.collect.graph_api import GraphClient
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import SCOPE_ACCOUNT


def collect_account(graph: GraphClient, builder: GraphBuilder) -> ScopeStatus:
    """Fetch the organization and add the account entity."""
    try:
        organization = graph.organization()
    except CollectError as exc:
        status = ScopeStatus(ScopeState.FAILED, error=str(exc))
    else:
        builder.add_account(organization)
        status = ScopeStatus(ScopeState.COMPLETE, count=1)
    builder.set_scope(SCOPE_ACCOUNT, status)
    return status
