"""J1QL over the snapshot graph: `run_query` is the one entry point (CLI, console, rules).

text -> lexer -> parser (ast) -> planner (aliases, push-down, type checks, index choice)
-> executor (candidates, semi-joins, paths) -> result (J1's `list` / `table` document).
"""

from __future__ import annotations

from typing import Any

import redis

from monitor.config import Settings
from monitor.query import executor
from monitor.query.errors import QueryError, QuerySyntaxError
from monitor.query.executor import DEFAULT_MAX_ROWS, match
from monitor.query.graph import QueryGraph, load_query_graph
from monitor.query.parser import parse
from monitor.query.planner import Plan, plan_query
from monitor.query.result import build_result
from monitor.snapshot.store import SnapshotStore

__all__ = [
    "QueryError",
    "QueryGraph",
    "QuerySyntaxError",
    "compile_query",
    "execute",
    "run_query",
]


def compile_query(text: str, now: int | None = None) -> Plan:
    """Parse and plan; raises QuerySyntaxError / QueryError with line and column."""
    return plan_query(parse(text, now))


def execute(
    plan: Plan,
    graphs: list[QueryGraph],
    *,
    include_raw: bool = False,
    limit: int | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    max_paths: int | None = None,
) -> dict[str, Any]:
    """Run a plan over loaded graphs (change facts must be loaded when the plan needs them)."""
    if max_paths is None:
        max_paths = executor.DEFAULT_MAX_PATHS
    has_limit = plan.query.limit is not None or limit is not None
    matched = [match(plan, g, max_paths, has_limit) for g in graphs]
    doc = build_result(plan, matched, include_raw=include_raw, limit=limit, max_rows=max_rows)
    if any(m.truncated for m in matched):
        doc["message"] = f"the traversal stopped after {max_paths:,} paths; narrow the query"
    elif doc["truncated"]:
        doc["message"] = f"only the first {doc['count']:,} rows are shown; add LIMIT or filters"
    return doc


def query_tenants(client: redis.Redis, settings: Settings, tenant: str | None) -> list[str]:
    """The named tenant, or every tenant that has a committed snapshot."""
    configured = [t.name for t in settings.tenants]
    if tenant is not None and tenant in configured:
        return [tenant]  # no keyspace SCAN for the common case
    stored = SnapshotStore(client, settings.redis_prefix).tenants()
    if tenant is not None:
        if tenant not in stored:
            known = ", ".join(sorted({*configured, *stored})) or "none"
            raise QueryError(f"unknown tenant {tenant!r} (known: {known})", 0, 0)
        return [tenant]
    return stored


def run_query(
    client: redis.Redis,
    settings: Settings,
    text: str,
    tenant: str | None = None,
    *,
    include_raw: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run J1QL over the latest committed snapshot of one tenant (or all); J1's result shape.

    Returns `{"type": "list"|"table", "data": [...], "count", "truncated", "tenants"}` (plus
    `message` when truncated). Raises QueryError / QuerySyntaxError (`.line`, `.column`).
    """
    plan = compile_query(text)
    graphs = []
    for name in query_tenants(client, settings, tenant):
        g = load_query_graph(client, settings.redis_prefix, name)
        if g is None:
            continue
        if plan.needs_changes:
            g.ensure_changes(client, settings.redis_prefix)
        graphs.append(g)
    doc = execute(plan, graphs, include_raw=include_raw, limit=limit)
    doc["tenants"] = {g.tenant: g.generation for g in graphs}
    return doc
