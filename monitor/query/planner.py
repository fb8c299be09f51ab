"""Query -> Plan: aliases checked, WHERE conjuncts on one alias pushed into that node or edge,
types checked (a date is never compared with a string), comparisons compiled into closures,
and for each node the cheapest way to find its candidates (an equality index or a scan).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from monitor.query import ast
from monitor.query.errors import QueryError
from monitor.query.graph import CHANGE_PROPS, RAW_DATA, QueryGraph, get_prop

Pred = Callable[[Any], bool]
Getter = Callable[[Any], Any]
_DATE_PROP = re.compile(r"On$")
_POSITIVE = {"!=": "=", "!~=": "~=", "!^=": "^=", "!$=": "$="}


@dataclass
class NodePlan:
    index: int
    alias: str | None
    selector: ast.Selector
    filters: list[ast.Expr] = field(default_factory=list)
    negations: list[EdgePlan] = field(default_factory=list)


@dataclass
class EdgePlan:
    verbs: frozenset[str] | None  # None: RELATES TO
    direction: str | None
    alias: str | None
    filters: list[ast.Expr] = field(default_factory=list)
    target: NodePlan | None = None  # only for negations
    pos: ast.Pos = field(default_factory=lambda: ast.Pos(1, 1))


@dataclass
class Plan:
    query: ast.Query
    nodes: list[NodePlan]
    edges: list[EdgePlan]  # edges[i] joins nodes[i] and nodes[i + 1]
    residual: list[ast.Expr]  # WHERE conjuncts spanning several aliases
    slots: dict[str, int]  # alias -> position in a path tuple (nodes, then edges)
    needs_changes: bool = False

    @property
    def table(self) -> bool:
        return bool(self.query.returns)


def _conjuncts(e: ast.Expr | None) -> list[ast.Expr]:
    if e is None:
        return []
    if isinstance(e, ast.BoolOp) and e.op == "AND":
        return [c for item in e.items for c in _conjuncts(item)]
    return [e]


def expr_props(e: ast.Expr) -> list[ast.Prop]:
    """The properties an expression reads."""
    if isinstance(e, ast.Compare):
        return [e.left] + ([e.right] if isinstance(e.right, ast.Prop) else [])
    if isinstance(e, ast.Changed):
        return [e.prop]
    return [p for item in e.items for p in expr_props(item)]


def _uses_changes(e: ast.Expr) -> bool:
    if isinstance(e, ast.Changed):
        return True
    return any(p.name in CHANGE_PROPS for p in expr_props(e))


def _check_types(e: ast.Expr) -> None:
    """Static checks: dates against `...On` properties only; `undefined` only with = / !=."""
    if isinstance(e, ast.BoolOp):
        for item in e.items:
            _check_types(item)
        return
    if not isinstance(e, ast.Compare):
        return
    lits = (
        list(e.right.items)
        if isinstance(e.right, ast.ValueList)
        else [e.right]
        if isinstance(e.right, ast.Literal)
        else []
    )
    is_date_prop = bool(_DATE_PROP.search(e.left.name))
    for lit in lits:
        if lit.is_undefined and e.op not in ("=", "!="):
            raise QueryError(
                f"undefined can only be compared with = or !=, not {e.op}",
                lit.pos.line,
                lit.pos.column,
            )
        if lit.is_date and not is_date_prop:
            raise QueryError(
                f"comparing a date ({lit.text}) to {e.left.name!r}, which is not a date property"
                " (dates are the ...On properties, in epoch milliseconds)",
                lit.pos.line,
                lit.pos.column,
            )
        if (
            is_date_prop
            and isinstance(lit.value, str)
            and not lit.is_date
            and e.op in ("=", "!=", ">", "<", ">=", "<=")
        ):
            raise QueryError(
                f"{e.left.name!r} is a date (epoch milliseconds): compare it with"
                f" date({lit.value}) or date.now - 7 days, not with the string {lit.text}",
                lit.pos.line,
                lit.pos.column,
            )


def _refuse_raw(node: Any) -> None:
    """`_rawData` is the source object kept beside the properties, not one of them: it is
    returned with an entity when asked (`--raw`), never filtered, returned or sorted on."""
    if isinstance(node, ast.Prop | ast.ReturnItem):
        name = node.name if isinstance(node, ast.Prop) else node.prop
        if name is not None and name.split(".", 1)[0] == RAW_DATA:
            raise QueryError(
                f"{RAW_DATA} is not a queryable property (ask for it with the entity: --raw)",
                node.pos.line,
                node.pos.column,
            )
    if isinstance(node, list | tuple):
        for item in node:
            _refuse_raw(item)
    elif is_dataclass(node) and not isinstance(node, type):
        for f in fields(node):
            _refuse_raw(getattr(node, f.name))


def _selector_types(selector: ast.Selector) -> frozenset[str] | None:
    """The entity `_type`s a selector can match (None: any; a class is looked up in the model,
    an unknown class could be anything)."""
    from monitor.model.schema import ENTITY_TYPES

    if selector.any:
        return None
    out: set[str] = set()
    for name in selector.names:
        if not name[:1].isupper():
            out.add(name)
            continue
        found = {t.type for t in ENTITY_TYPES if name in t.classes}
        if not found:
            return None
        out |= found
    return frozenset(out)


def plan_types(plan: Plan) -> frozenset[str] | None:
    """The entity `_type`s whose properties the plan can read (None: any type, relationships
    included). Relationships' own properties are only read through their filters and aliases:
    a plan with either may read any type."""
    if any(e.filters or e.alias for e in plan.edges):
        return None
    nodes = list(plan.nodes)
    out: set[str] = set()
    while nodes:
        node = nodes.pop()
        types = _selector_types(node.selector)
        if types is None:
            return None
        out |= types
        for neg in node.negations:
            if neg.filters or neg.alias:
                return None
            if neg.target is not None:
                nodes.append(neg.target)
    return frozenset(out)


def plan_query(q: ast.Query) -> Plan:
    _refuse_raw(q)
    nodes = [NodePlan(0, q.start.alias, q.start.selector, _conjuncts(q.start.where))]
    edges: list[EdgePlan] = []
    for step in q.steps:
        verbs = frozenset(step.verbs) if step.verbs else None
        target = NodePlan(-1, step.node.alias, step.node.selector, _conjuncts(step.node.where))
        if step.negated:
            nodes[-1].negations.append(
                EdgePlan(verbs, step.direction, None, target=target, pos=step.pos)
            )
            continue
        edges.append(EdgePlan(verbs, step.direction, step.alias, pos=step.pos))
        target.index = len(nodes)
        nodes.append(target)
    slots: dict[str, int] = {}
    for n in nodes:
        if n.alias:
            slots[n.alias] = n.index
    for i, e in enumerate(edges):
        if e.alias:
            slots[e.alias] = len(nodes) + i
    defined = ", ".join(q.aliases) or "none"

    def check_alias(p: ast.Prop) -> None:
        if p.alias is not None and p.alias not in slots:
            raise QueryError(
                f"unknown alias {p.alias!r} (defined: {defined})", p.pos.line, p.pos.column
            )

    residual: list[ast.Expr] = []
    for c in _conjuncts(q.where):
        props = expr_props(c)
        for p in props:
            check_alias(p)
        aliases = {p.alias for p in props}
        if len(aliases) == 1:
            alias = next(iter(aliases))
            assert alias is not None
            slot = slots[alias]
            local = _strip_alias(c)
            if slot < len(nodes):
                nodes[slot].filters.append(local)
            else:
                edges[slot - len(nodes)].filters.append(local)
        else:
            residual.append(c)
    for item in q.returns:
        if item.alias not in slots:
            raise QueryError(
                f"unknown alias {item.alias!r} in RETURN (defined: {defined})",
                item.pos.line,
                item.pos.column,
            )
    return_keys = {r.key for r in q.returns}
    for o in q.order:
        if o.text in return_keys:
            continue
        if o.prop is None:
            raise QueryError(f"ORDER BY {o.text}: not a RETURN column", o.pos.line, o.pos.column)
        if o.prop.alias is not None:
            check_alias(o.prop)
        elif q.returns:
            raise QueryError(
                f"ORDER BY {o.text}: use alias.property or a RETURN column",
                o.pos.line,
                o.pos.column,
            )
    needs = False
    everything = [f for n in nodes for f in n.filters] + residual
    everything += [f for e in edges for f in e.filters]
    everything += [f for n in nodes for neg in n.negations for f in neg.target.filters]  # type: ignore[union-attr]
    for f in everything:
        _check_types(f)
        needs = needs or _uses_changes(f)
    needs = needs or any(r.prop in CHANGE_PROPS for r in q.returns)
    needs = needs or any(o.prop is not None and o.prop.name in CHANGE_PROPS for o in q.order)
    return Plan(q, nodes, edges, residual, slots, needs_changes=needs)


def _strip_alias(e: ast.Expr) -> ast.Expr:
    if isinstance(e, ast.Compare):
        right = e.right
        if isinstance(right, ast.Prop):
            right = ast.Prop(right.name, right.pos)
        return ast.Compare(ast.Prop(e.left.name, e.left.pos), e.op, right, e.pos)
    if isinstance(e, ast.Changed):
        return ast.Changed(ast.Prop(e.prop.name, e.prop.pos), e.since, e.pos)
    return ast.BoolOp(e.op, tuple(_strip_alias(i) for i in e.items), e.pos)


# -- compiling comparisons ---------------------------------------------------------------------


def _same_kind(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is bool and type(b) is bool
    if isinstance(a, int | float) and isinstance(b, int | float):
        return True
    return type(a) is type(b)


def _scalar(op: str, v: Any, lit: Any) -> bool:
    if v is None:
        return False
    if op == "=":
        return _same_kind(v, lit) and v == lit
    if op in ("~=", "^=", "$="):
        if not isinstance(v, str) or not isinstance(lit, str):
            return False
        if op == "~=":
            return lit in v
        return v.startswith(lit) if op == "^=" else v.endswith(lit)
    if not _same_kind(v, lit) or isinstance(v, bool | dict | list):
        return False
    if op == ">":
        return bool(v > lit)
    if op == "<":
        return bool(v < lit)
    if op == ">=":
        return bool(v >= lit)
    return bool(v <= lit)  # "<="


def _positive(op: str, v: Any, lit: Any) -> bool:
    """Does the value (or, for a list property, any member) satisfy the positive operator?"""
    if isinstance(v, list):
        return any(_scalar(op, m, lit) for m in v)
    return _scalar(op, v, lit)


def compare_values(op: str, v: Any, right: ast.Literal | ast.ValueList | Any) -> bool:
    """J1 semantics of `v op right` (right: a literal, a value list or a plain value)."""
    if isinstance(right, ast.ValueList):
        pos_op = _POSITIVE.get(op, op)
        hits = (_positive(pos_op, v, lit.value) for lit in right.items if not lit.is_undefined)
        undefined = any(lit.is_undefined for lit in right.items)
        if right.conj == "OR":
            result = any(hits) or (undefined and _is_undefined(v))
        else:
            result = all(hits) and (not undefined or _is_undefined(v))
        return not result if op in _POSITIVE else result
    if isinstance(right, ast.Literal):
        if right.is_undefined:
            return _is_undefined(v) if op == "=" else not _is_undefined(v)
        right = right.value
    if op in _POSITIVE:
        return not _positive(_POSITIVE[op], v, right)
    return _positive(op, v, right)


def _is_undefined(v: Any) -> bool:
    return v is None


def compile_expr(e: ast.Expr, graph: QueryGraph, getter: Callable[[ast.Prop], Getter]) -> Pred:
    """A predicate over whatever `getter` reads from (an item, or a path tuple)."""
    if isinstance(e, ast.BoolOp):
        parts = [compile_expr(i, graph, getter) for i in e.items]
        if e.op == "AND":
            return lambda x: all(p(x) for p in parts)
        return lambda x: any(p(x) for p in parts)
    if isinstance(e, ast.Changed):
        key_of = getter(ast.Prop("_key", e.prop.pos, e.prop.alias))
        name, since = e.prop.name, int(e.since.value)
        facts = graph.changes
        if facts is None:
            return lambda x: False
        return lambda x: facts.changed_since(str(key_of(x)), name, since)
    left = getter(e.left)
    op, right = e.op, e.right
    if isinstance(right, ast.Prop):
        other = getter(right)
        return lambda x: compare_values(op, left(x), other(x))
    if isinstance(right, ast.Literal) and not right.is_undefined:
        value = right.value
        if op in ("=", "!=") and isinstance(value, str):
            if op == "=":
                return lambda x: _eq_str(left(x), value)
            return lambda x: not _eq_str(left(x), value)
        if op == "=":
            return lambda x: _positive("=", left(x), value)
        if op in _ORDER and isinstance(value, int | float) and not isinstance(value, bool):
            return _number_pred(left, op, value)
        return lambda x: compare_values(op, left(x), value)
    if (
        isinstance(right, ast.ValueList)
        and right.conj == "OR"
        and op in ("=", "!=")
        and all(isinstance(i.value, str) and not i.is_undefined for i in right.items)
    ):
        values = frozenset(i.value for i in right.items)
        if op == "=":
            return lambda x: _in_strs(left(x), values)
        return lambda x: not _in_strs(left(x), values)
    return lambda x: compare_values(op, left(x), right)


_ORDER = {">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le}


def _number_pred(left: Getter, op: str, value: float) -> Pred:
    """`prop < 5` and the like (dates are epoch-ms numbers): a number compares directly,
    anything else (a list, a string, null) as `compare_values` says."""
    cmp = _ORDER[op]

    def pred(x: Any) -> bool:
        v = left(x)
        if v.__class__ is int or v.__class__ is float:
            return bool(cmp(v, value))
        return compare_values(op, v, value)

    return pred


def _in_strs(v: Any, values: frozenset[str]) -> bool:
    if v.__class__ is str:
        return v in values
    return isinstance(v, list) and any(m.__class__ is str and m in values for m in v)


def _eq_str(v: Any, s: str) -> bool:
    if v.__class__ is str:
        return bool(v == s)
    return isinstance(v, list) and s in v


def item_getter(p: ast.Prop) -> Getter:
    name = p.name
    if "." in name:
        return lambda item: get_prop(item, name)
    return lambda item: item.get(name)


def index_hint(filters: list[ast.Expr]) -> tuple[str, list[Any]] | None:
    """An `=` on a literal (or an OR list of them) among the node's conjuncts: use the index."""
    for f in filters:
        if isinstance(f, ast.Compare) and f.op == "=" and f.left.alias is None:
            r = f.right
            if isinstance(r, ast.Literal) and not r.is_undefined and not r.is_date:
                return f.left.name, [r.value]
            if (
                isinstance(r, ast.ValueList)
                and r.conj == "OR"
                and not any(i.is_undefined or i.is_date for i in r.items)
            ):
                return f.left.name, [i.value for i in r.items]
    return None
