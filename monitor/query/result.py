"""Matched paths -> J1's result document: RETURN columns, aggregates, ORDER BY, SKIP, LIMIT."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from monitor.model.graph import Item
from monitor.model.raw import export_value
from monitor.query import ast
from monitor.query.errors import QueryError
from monitor.query.executor import DEFAULT_MAX_ROWS, Matched, Path
from monitor.query.graph import get_prop
from monitor.query.planner import Plan

HIDDEN = ("_rawData",)


def public(item: Item, include_raw: bool = False) -> Item:
    """An entity or relationship as a result carries it (without `_rawData` unless asked)."""
    if include_raw:
        out = export_value(item)  # a new dict when a fetched item's RawData was decoded
        return dict(item) if out is item else out
    return {k: v for k, v in item.items() if k not in HIDDEN}


def _rank(v: Any) -> tuple[int, Any]:
    if isinstance(v, bool):
        return (0, v)
    if isinstance(v, int | float):
        return (1, v)
    if isinstance(v, str):
        return (2, v)
    return (3, orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode())


def _sort(rows: list[Any], keys: Sequence[tuple[Callable[[Any], Any], bool]]) -> None:
    """Stable multi-key sort; missing values last in both directions."""
    for get, desc in reversed(keys):
        rows.sort(key=_sort_key(get, desc), reverse=desc)


def _sort_key(get: Callable[[Any], Any], desc: bool) -> Callable[[Any], tuple[bool, Any]]:
    def key(row: Any) -> tuple[bool, Any]:
        v = get(row)
        return ((v is not None) if desc else (v is None), _rank(v))

    return key


def _hashable(v: Any) -> Any:
    if isinstance(v, list | dict):
        return orjson.dumps(v, option=orjson.OPT_SORT_KEYS)
    return (type(v) is bool, v)


def _cap(
    rows: list[Any], q: ast.Query, limit: int | None, max_rows: int | None
) -> tuple[list[Any], bool]:
    if q.skip:
        rows = rows[q.skip :]
    cut = False
    if q.limit is not None:
        rows = rows[: q.limit]
    bound = limit if limit is not None else (None if q.limit is not None else max_rows)
    if bound is not None and len(rows) > bound:
        rows, cut = rows[:bound], True
    return rows, cut


def build_result(
    plan: Plan,
    matched: Sequence[Matched],
    *,
    include_raw: bool = False,
    limit: int | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> dict[str, Any]:
    q = plan.query
    truncated = any(m.truncated for m in matched)
    if not plan.table:
        items = [i for m in matched for i in m.items]
        keys = []
        for o in q.order:
            assert o.prop is not None
            if o.prop.alias not in (None, plan.nodes[0].alias):
                raise QueryError(
                    f"ORDER BY {o.text}: without RETURN only the FIND entity can be ordered",
                    o.pos.line,
                    o.pos.column,
                )
            name = o.prop.name
            keys.append(((lambda it, n=name: get_prop(it, n)), o.descending))
        if keys:
            _sort(items, keys)
        else:
            items.sort(key=lambda it: (it.get("_tenant", ""), it["_key"]))
        items, cut = _cap(items, q, limit, max_rows)
        return _doc("list", [public(i, include_raw) for i in items], truncated or cut)
    rows = _table(plan, [p for m in matched for p in m.paths], include_raw)
    rows, cut = _cap(rows, q, limit, max_rows)
    return _doc("table", rows, truncated or cut)


def _doc(kind: str, data: list[Any], truncated: bool) -> dict[str, Any]:
    return {"type": kind, "data": data, "count": len(data), "truncated": truncated}


def _column(
    item: ast.ReturnItem, slot: int, include_raw: bool
) -> Callable[[Path, dict[str, Any]], None]:
    key, prop, alias = item.key, item.prop, item.alias
    if prop is None:
        return lambda path, row: row.__setitem__(key, public(path[slot], include_raw))
    if prop == "*":

        def star(path: Path, row: dict[str, Any]) -> None:
            for k, v in path[slot].items():
                if include_raw or k not in HIDDEN:
                    row[f"{alias}.{k}"] = v

        return star
    return lambda path, row: row.__setitem__(key, get_prop(path[slot], prop))


def _table(plan: Plan, paths: list[Path], include_raw: bool) -> list[dict[str, Any]]:
    q = plan.query
    plain = [r for r in q.returns if r.func is None]
    aggs = [r for r in q.returns if r.func is not None]
    cols = [_column(r, plan.slots[r.alias], include_raw) for r in plain]
    return_keys = {r.key for r in q.returns}
    if not aggs:
        order_keys: list[tuple[Callable[[Any], Any], bool]] = []
        for o in q.order:
            if o.text in return_keys:
                order_keys.append((_pair_column(o.text), o.descending))
            else:
                assert o.prop is not None and o.prop.alias is not None
                order_keys.append((_pair_prop(plan.slots[o.prop.alias], o.prop.name), o.descending))
        pairs: list[tuple[Path, dict[str, Any]]] = []
        for path in paths:
            row: dict[str, Any] = {}
            for c in cols:
                c(path, row)
            pairs.append((path, row))
        if order_keys:
            _sort(pairs, order_keys)
        rows = [r for _p, r in pairs]
        if q.unique:
            seen: set[bytes] = set()
            out = []
            for r in rows:
                h = orjson.dumps(r, option=orjson.OPT_SORT_KEYS, default=str)
                if h not in seen:
                    seen.add(h)
                    out.append(r)
            rows = out
        return rows
    for o in q.order:
        if o.text not in return_keys:
            raise QueryError(
                f"ORDER BY {o.text}: with COUNT/MIN/MAX/AVG/SUM, order by a RETURN column",
                o.pos.line,
                o.pos.column,
            )
    groups: dict[tuple[Any, ...], tuple[dict[str, Any], list[dict[int, Item]]]] = {}
    agg_slots = [plan.slots[a.alias] for a in aggs]
    for path in paths:
        row = {}
        for c in cols:
            c(path, row)
        gkey = tuple(_hashable(v) for v in row.values())
        g = groups.get(gkey)
        if g is None:
            g = groups[gkey] = (row, [{} for _ in aggs])
        for seen_items, slot in zip(g[1], agg_slots, strict=True):
            it = path[slot]
            seen_items[id(it)] = it
    rows = []
    for row, distinct in groups.values():
        for a, seen_items in zip(aggs, distinct, strict=True):
            row[a.key] = _aggregate(a, list(seen_items.values()))
        rows.append(row)
    if not paths and not plain:  # COUNT over nothing is one row of zeros, as in SQL and Cypher
        rows = [{a.key: 0 if a.func == "COUNT" else None for a in aggs}]
    order: list[tuple[Callable[[Any], Any], bool]] = [
        (_row_value(o.text), o.descending) for o in q.order
    ]
    if order:
        _sort(rows, order)
    return rows


def _aggregate(a: ast.ReturnItem, items: list[Item]) -> Any:
    if a.func == "COUNT":
        if a.prop is None or a.prop == "*":
            return len(items)
        return sum(1 for it in items if get_prop(it, a.prop) is not None)
    assert a.prop is not None
    values = [get_prop(it, a.prop) for it in items]
    if a.func in ("MIN", "MAX"):
        vals = [v for v in values if v is not None and not isinstance(v, list | dict)]
        if not vals:
            return None
        try:
            return min(vals) if a.func == "MIN" else max(vals)
        except TypeError:
            key = _rank
            return min(vals, key=key) if a.func == "MIN" else max(vals, key=key)
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not nums:
        return None
    total = sum(nums)
    return total if a.func == "SUM" else total / len(nums)


def _row_value(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: row.get(key)


def _pair_column(key: str) -> Callable[[tuple[Path, dict[str, Any]]], Any]:
    return lambda pair: pair[1].get(key)


def _pair_prop(slot: int, name: str) -> Callable[[tuple[Path, dict[str, Any]]], Any]:
    return lambda pair: get_prop(pair[0][slot], name)
