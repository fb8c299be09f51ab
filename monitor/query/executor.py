"""Plan + QueryGraphs -> J1's result document (`list` of entities, or `table` of RETURN rows).

Matching follows the path left to right: each node's candidates (index or scan, then its
filters and negations), then a forward and a backward semi-join pass so every remaining
candidate lies on at least one complete path (joining from the smaller side each time). Without
RETURN and cross-alias WHERE that is the answer; otherwise the paths are enumerated, at most
`max_paths` of them (the result then says `truncated`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from monitor.model.graph import Item
from monitor.query import ast
from monitor.query.errors import QueryError
from monitor.query.graph import QueryGraph, get_prop, rel_class
from monitor.query.planner import (
    EdgePlan,
    NodePlan,
    Plan,
    Pred,
    compile_expr,
    index_hint,
    item_getter,
)

DEFAULT_MAX_ROWS = 10_000  # rows returned when neither LIMIT nor a limit is given
DEFAULT_MAX_PATHS = 500_000  # traversal paths enumerated before stopping (truncated)
STAR_SCAN_LIMIT = 10_000  # FIND * with no filter on more entities than this needs LIMIT

Path = tuple[Item, ...]


@dataclass
class Matched:
    """What one tenant's graph contributed."""

    items: list[Item] = field(default_factory=list)  # list mode
    paths: list[Path] = field(default_factory=list)  # table mode / residual WHERE
    truncated: bool = False


def _node_pred(node: NodePlan, graph: QueryGraph) -> Pred:
    preds = [compile_expr(f, graph, item_getter) for f in node.filters]
    for neg in node.negations:
        preds.append(_negation_pred(neg, graph))
    if not preds:
        return lambda item: True
    if len(preds) == 1:
        return preds[0]
    return lambda item: all(p(item) for p in preds)


def _edge_pred(edge: EdgePlan, graph: QueryGraph) -> Callable[[Item], bool]:
    verbs = edge.verbs
    preds = [compile_expr(f, graph, item_getter) for f in edge.filters]
    if verbs is None and not preds:
        return lambda rel: True
    return lambda rel: (verbs is None or rel_class(rel) in verbs) and all(p(rel) for p in preds)


def _candidates(node: NodePlan, graph: QueryGraph) -> dict[str, Item]:
    hint = index_hint(node.filters)
    base = (
        graph.lookup(node.selector.names, hint[0], hint[1])
        if hint is not None
        else graph.base(node.selector.names)
    )
    pred = _node_pred(node, graph)
    return {e["_key"]: e for e in base if pred(e)}


def _neighbours(
    graph: QueryGraph, key: str, edge: EdgePlan, ok: Callable[[Item], bool], forward: bool
) -> Iterator[tuple[Item, str]]:
    """(relationship, other end) of `key` along `edge`, walked forward (node i -> i+1) or back."""
    d = edge.direction
    if d is None or (d == ">>") == forward:
        for r in graph.out.get(key, ()):
            if ok(r):
                yield r, r["_toEntityKey"]
    if d is None or (d == "<<") == forward:
        for r in graph.inn.get(key, ()):
            if ok(r):
                yield r, r["_fromEntityKey"]


def _negation_pred(neg: EdgePlan, graph: QueryGraph) -> Pred:
    assert neg.target is not None
    target = neg.target
    unfiltered = target.selector.any and not target.filters and not target.negations
    keys = None if unfiltered else set(_candidates(target, graph))
    ok = _edge_pred(neg, graph)

    def pred(item: Item) -> bool:
        for _r, other in _neighbours(graph, item["_key"], neg, ok, True):
            if keys is None or other in keys:
                return False
        return True

    return pred


def _semi_join(
    graph: QueryGraph,
    left: dict[str, Item],
    right: dict[str, Item],
    edge: EdgePlan,
    ok: Callable[[Item], bool],
    keep_right: bool,
) -> dict[str, Item]:
    """The members of `right` (keep_right) or `left` with a neighbour on the other side."""
    keep, other = (right, left) if keep_right else (left, right)
    if len(other) < len(keep):  # walk from the smaller side
        found: dict[str, Item] = {}
        for k in other:
            for _r, n in _neighbours(graph, k, edge, ok, forward=keep_right):
                if n in keep and n not in found:
                    found[n] = keep[n]
        return {k: v for k, v in keep.items() if k in found}
    return {
        k: v
        for k, v in keep.items()
        if any(n in other for _r, n in _neighbours(graph, k, edge, ok, forward=not keep_right))
    }


def match(plan: Plan, graph: QueryGraph, max_paths: int, has_limit: bool) -> Matched:
    """Candidates, semi-joins, and (when needed) the paths of one tenant."""
    nodes, edges = plan.nodes, plan.edges
    first = nodes[0]
    if (
        first.selector.any
        and not first.filters
        and not first.negations
        and not edges
        and not has_limit
        and len(graph) > STAR_SCAN_LIMIT
    ):
        pos = first.selector.pos
        raise QueryError(
            f"FIND * without a filter would return all {len(graph):,} entities of tenant"
            f" {graph.tenant!r}: add WITH ..., a class or type, or LIMIT n",
            pos.line,
            pos.column,
        )
    sets = [_candidates(n, graph) for n in nodes]
    oks = [_edge_pred(e, graph) for e in edges]
    for i, e in enumerate(edges):  # forward
        sets[i + 1] = _semi_join(graph, sets[i], sets[i + 1], e, oks[i], keep_right=True)
    for i in range(len(edges) - 1, -1, -1):  # backward
        sets[i] = _semi_join(graph, sets[i], sets[i + 1], edges[i], oks[i], keep_right=False)
    out = Matched()
    if not plan.table and not plan.residual:
        out.items = list(sets[0].values())
        return out
    residual = [compile_expr(r, graph, _path_getter(plan)) for r in plan.residual]
    n_nodes = len(nodes)
    paths: list[Path] = []

    def walk(i: int, key: str, nodes_so_far: list[Item], rels: list[Item]) -> bool:
        if i == len(edges):
            path = tuple(nodes_so_far) + tuple(rels)
            if all(p(path) for p in residual):
                if len(paths) >= max_paths:
                    return False
                paths.append(path)
            return True
        nxt = sets[i + 1]
        for r, other in _neighbours(graph, key, edges[i], oks[i], True):
            item = nxt.get(other)
            if item is None:
                continue
            nodes_so_far.append(item)
            rels.append(r)
            go_on = walk(i + 1, other, nodes_so_far, rels)
            nodes_so_far.pop()
            rels.pop()
            if not go_on:
                return False
        return True

    for key, item in sets[0].items():
        if not walk(0, key, [item], []):
            out.truncated = True
            break
    del n_nodes
    out.paths = paths
    return out


def _path_getter(plan: Plan) -> Callable[[ast.Prop], Callable[[Path], Any]]:
    slots = plan.slots

    def getter(p: ast.Prop) -> Callable[[Path], Any]:
        slot = slots[p.alias or ""]
        name = p.name
        return lambda path: get_prop(path[slot], name)

    return getter
