"""Users: directory users from Graph (Directory.Read.All), every page or nothing."""

from __future__ import annotations

from monitor.collect.graph_api import GraphClient
from monitor.collect.pages import IncompleteList, read_all
from monitor.collect.progress import Progress
from monitor.model.builder import GraphBuilder
from monitor.model.graph import ScopeState, ScopeStatus
from monitor.model.schema import SCOPE_USERS


def collect_users(
    graph: GraphClient, builder: GraphBuilder, progress: Progress, *, managers: bool = False
) -> ScopeStatus:
    """Fetch all users; the scope is complete only when the last page arrived."""
    try:
        users = read_all(graph.iter_user_pages(managers=managers), progress, "users")
    except IncompleteList as exc:
        status = exc.status()
    else:
        status = ScopeStatus(ScopeState.COMPLETE, count=builder.add_users(users))
    builder.set_scope(SCOPE_USERS, status)
    return status
