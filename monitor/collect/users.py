"""Users: directory users from Graph (Directory.Read.All), every page or nothing."""

from __future__ import annotations

from monitor.collect.errors import CollectError
from monitor.collect.graph_api import GraphClient
from monitor.collect.progress import Progress
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import SCOPE_USERS


def collect_users(graph: GraphClient, builder: GraphBuilder, progress: Progress) -> ScopeStatus:
    """Fetch all users; the scope is complete only when the last page arrived."""
    pages: list[list[dict]] = []
    fetched = 0
    try:
        for page in graph.iter_user_pages():
            pages.append(page)
            fetched += len(page)
            progress("users", fetched, None)
    except CollectError as exc:
        status = ScopeStatus(ScopeState.FAILED, count=fetched, error=str(exc))
    else:
        count = sum(builder.add_users(page) for page in pages)
        status = ScopeStatus(ScopeState.COMPLETE, count=count)
    builder.set_scope(SCOPE_USERS, status)
    return status
