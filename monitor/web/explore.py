"""The Explore page's engine: the J1QL engine of `mde-monitor query` when it is installed
(`monitor.query.run_query`, the exact `query --json` document), else type/property filters:
`FIND <_type or _class> [WITH field = 'value' [AND ...]] [LIMIT n]`."""

from __future__ import annotations

import re
from typing import Any

import redis

from monitor.config import Settings
from monitor.model.schema import ENTITY_BY_TYPE
from monitor.snapshot.store import SnapshotStore

try:  # the query issue's engine; the console works without it
    from monitor.query import QueryError, run_query  # type: ignore[attr-defined,unused-ignore]

    HAVE_J1QL = True
except ImportError:  # pragma: no cover - depends on what is installed
    HAVE_J1QL = False

    class QueryError(Exception):  # type: ignore[no-redef]
        """A query that cannot be run, with its position."""

        def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
            super().__init__(f"{line}:{column}: {message}")
            self.message, self.line, self.column = message, line, column

    run_query = None  # type: ignore[assignment,unused-ignore]


DEFAULT_LIMIT = 250
_FIND = re.compile(
    r"^\s*find\s+(?P<what>[A-Za-z0-9_*]+)"
    r"(?:\s+with\s+(?P<where>.+?))?(?:\s+limit\s+(?P<limit>\d+))?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_COND = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*(!=|=)\s*(?:'([^']*)'|\"([^\"]*)\"|(\S+))\s*$")


def _literal(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "undefined"):
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def fallback_query(
    client: redis.Redis,
    settings: Settings,
    text: str,
    tenant: str | None = None,
    *,
    include_raw: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Type/property filters over the stored snapshots, in the `query --json` shape."""
    m = _FIND.match(text)
    if not m:
        raise QueryError("expected FIND <type or class> [WITH field = 'value' [AND ...]]", 1, 1)
    what = m.group("what")
    conds: list[tuple[str, str, Any]] = []
    if m.group("where"):
        for part in re.split(r"\s+and\s+", m.group("where"), flags=re.IGNORECASE):
            c = _COND.match(part)
            if not c:
                raise QueryError(f"cannot read condition {part.strip()!r}", 1, 1)
            value = c.group(3) if c.group(3) is not None else c.group(4)
            value = value if value is not None else _literal(c.group(5))
            conds.append((c.group(1), c.group(2), value))
    cap = int(m.group("limit") or limit or DEFAULT_LIMIT)
    store = SnapshotStore(client, settings.redis_prefix)
    tenants = [tenant] if tenant else [t.name for t in settings.tenants] or store.tenants()
    types = [
        t for t, spec in ENTITY_BY_TYPE.items() if what == "*" or t == what or what in spec.classes
    ]
    if not types:
        raise QueryError(f"unknown entity type or class {what!r}", 1, 6)
    data: list[dict[str, Any]] = []
    truncated = False
    for t in tenants:
        index = store.load_index(t) or {}
        keys = [k for scope in index.values() for typ in types for k in scope.get(typ, {})]
        for start in range(0, len(keys), 2_000):
            bodies = store.load_bodies(t, keys[start : start + 2_000])
            for body in bodies.values():
                if all(
                    (str(body.get(f)) == str(v)) == (op == "=")
                    if not isinstance(v, bool | type(None))
                    else (body.get(f) == v) == (op == "=")
                    for f, op, v in conds
                ):
                    if not include_raw:
                        body = {k: v for k, v in body.items() if k != "_rawData"}
                    data.append(body)
                    if len(data) >= cap:
                        truncated = True
                        break
            if truncated:
                break
        if truncated:
            break
    doc: dict[str, Any] = {"type": "list", "data": data}
    if truncated:
        doc["truncated"] = True
    return doc


def run(
    client: redis.Redis,
    settings: Settings,
    text: str,
    tenant: str | None = None,
    *,
    include_raw: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """The `query --json` document of `text` (J1QL when installed, else the filters)."""
    if HAVE_J1QL and run_query is not None:
        result: dict[str, Any] = run_query(
            client, settings, text, tenant, include_raw=include_raw, limit=limit
        )
        return result
    return fallback_query(client, settings, text, tenant, include_raw=include_raw, limit=limit)
