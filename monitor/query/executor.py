"""Plan + QueryGraphs -> J1's result document (`list` of entities, or `table` of RETURN rows).

Matching follows the path left to right: each node's candidates (index or scan, then its
filters and negations), then a forward and a backward semi-join pass so every remaining
candidate lies on at least one complete path (joining from the smaller side each time). Without
RETURN and cross-alias WHERE that is the answer; otherwise the paths are enumerated, at most
`max_paths` of them (the result then says `truncated`).

Given `starts` (a few start entities, e.g. those a commit's changes can reach), the first node's
candidates are those of `starts` only and each next node's are the neighbours of the previous
set that pass its tests: the cost follows the start set, not the tenant's size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from monitor.model.graph import Entry, Item, entry_ends, entry_item
from monitor.query import ast
from monitor.query.errors import QueryError
from monitor.query.graph import QueryGraph, get_prop
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


def node_pred(node: NodePlan, graph: QueryGraph, lazy: bool = False) -> Pred:
    """The node's filters and negations as one test of an entity."""
    preds = [compile_expr(f, graph, item_getter) for f in node.filters]
    for neg in node.negations:
        preds.append(_negation_pred(neg, graph, lazy))
    if not preds:
        return lambda item: True
    if len(preds) == 1:
        return preds[0]
    return lambda item: all(p(item) for p in preds)


def _edge_pred(edge: EdgePlan, graph: QueryGraph) -> Callable[[Item], bool] | None:
    """The relationship's own filters (WHERE on its alias); the verbs are the index's job."""
    preds = [compile_expr(f, graph, item_getter) for f in edge.filters]
    if not preds:
        return None
    if len(preds) == 1:
        return preds[0]
    return lambda rel: all(p(rel) for p in preds)


def _candidates(node: NodePlan, graph: QueryGraph) -> dict[str, Item]:
    hint = index_hint(node.filters)
    base = (
        graph.lookup(node.selector.names, hint[0], hint[1])
        if hint is not None
        else graph.base(node.selector.names)
    )
    pred = node_pred(node, graph)
    return {e["_key"]: e for e in base if pred(e)}


def _lists(
    side: dict[str, dict[str, list[Entry]]], key: str, verbs: frozenset[str] | None
) -> Iterator[list[Entry]]:
    """`key`'s relationship lists on one side (`QueryGraph.out` or `.inn`) of these verbs (None:
    every verb)."""
    if verbs is None:
        for by_end in side.values():
            lst = by_end.get(key)
            if lst:
                yield lst
    else:
        for v in verbs:
            of_verb = side.get(v)
            lst = of_verb.get(key) if of_verb is not None else None
            if lst:
                yield lst


def neighbours(
    graph: QueryGraph,
    key: str,
    edge: EdgePlan,
    ok: Callable[[Item], bool] | None,
    forward: bool,
) -> Iterator[tuple[Entry, str]]:
    """(relationship entry, other end) of `key` along `edge`, walked forward (node i -> i+1)
    or back. The entry is the graph's stored one (`entry_item` builds the relationship)."""
    d = edge.direction
    if d is None or (d == ">>") == forward:
        for lst in _lists(graph.out, key, edge.verbs):
            for r in lst:
                if ok is None or ok(entry_item(r)):
                    yield r, entry_ends(r)[1]
    if d is None or (d == "<<") == forward:
        for lst in _lists(graph.inn, key, edge.verbs):
            for r in lst:
                if ok is None or ok(entry_item(r)):
                    yield r, entry_ends(r)[0]


def _member_test(node: NodePlan, graph: QueryGraph) -> Callable[[str], bool]:
    """Is this key one of the node's candidates? Asked key by key (memoised), not by a scan."""
    names = node.selector.names
    pred = node_pred(node, graph, lazy=True)
    entities = graph.entities
    memo: dict[str, bool] = {}

    def test(key: str) -> bool:
        v = memo.get(key)
        if v is None:
            e = entities.get(key)
            v = memo[key] = e is not None and graph.is_a(names, key) and pred(e)
        return v

    return test


def _negation_pred(neg: EdgePlan, graph: QueryGraph, lazy: bool = False) -> Pred:
    """`THAT !VERB target`: no such relationship to a target candidate. The targets are scanned
    once, or with `lazy` tested one neighbour at a time."""
    assert neg.target is not None
    target = neg.target
    unfiltered = target.selector.any and not target.filters and not target.negations
    test: Callable[[str], bool] | None = None
    if not unfiltered and lazy:
        test = _member_test(target, graph)
    elif not unfiltered:
        test = set(_candidates(target, graph)).__contains__
    ok = _edge_pred(neg, graph)

    def pred(item: Item) -> bool:
        for _r, other in neighbours(graph, item["_key"], neg, ok, True):
            if test is None or test(other):
                return False
        return True

    return pred


def _semi_join(
    graph: QueryGraph,
    left: dict[str, Item],
    right: dict[str, Item],
    edge: EdgePlan,
    ok: Callable[[Item], bool] | None,
    keep_right: bool,
) -> dict[str, Item]:
    """The members of `right` (keep_right) or `left` with a neighbour on the other side."""
    keep, other = (right, left) if keep_right else (left, right)
    if len(other) < len(keep):  # walk from the smaller side
        found: dict[str, Item] = {}
        for k in other:
            for _r, n in neighbours(graph, k, edge, ok, forward=keep_right):
                if n in keep and n not in found:
                    found[n] = keep[n]
        return {k: v for k, v in keep.items() if k in found}
    return {
        k: v
        for k, v in keep.items()
        if any(n in other for _r, n in neighbours(graph, k, edge, ok, forward=not keep_right))
    }


def _restricted(
    plan: Plan, graph: QueryGraph, starts: Iterable[str], oks: list[Callable[[Item], bool] | None]
) -> list[dict[str, Item]]:
    """The candidate sets reachable from `starts`: the forward pass by expansion."""
    tests = [_member_test(n, graph) for n in plan.nodes]
    ents = graph.entities
    sets = [{k: ents[k] for k in starts if tests[0](k)}]
    for i, edge in enumerate(plan.edges):
        test, nxt = tests[i + 1], {}
        for k in sets[i]:
            for _r, n in neighbours(graph, k, edge, oks[i], True):
                if n not in nxt and test(n):
                    nxt[n] = ents[n]
        sets.append(nxt)
    return sets


def match(
    plan: Plan,
    graph: QueryGraph,
    max_paths: int,
    has_limit: bool,
    starts: Iterable[str] | None = None,
) -> Matched:
    """Candidates, semi-joins, and (when needed) the paths of one tenant; with `starts`, only
    the paths that begin at those entities."""
    nodes, edges = plan.nodes, plan.edges
    first = nodes[0]
    oks = [_edge_pred(e, graph) for e in edges]
    if starts is not None:
        sets = _restricted(plan, graph, starts, oks)
    elif (
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
    else:
        sets = [_candidates(n, graph) for n in nodes]
        for i, e in enumerate(edges):  # forward
            sets[i + 1] = _semi_join(graph, sets[i], sets[i + 1], e, oks[i], keep_right=True)
    for i in range(len(edges) - 1, -1, -1):  # backward
        sets[i] = _semi_join(graph, sets[i], sets[i + 1], edges[i], oks[i], keep_right=False)
    out = Matched()
    if not plan.table and not plan.residual and not _may_reuse(edges):
        out.items = list(sets[0].values())
        return out
    residual = [compile_expr(r, graph, _path_getter(plan)) for r in plan.residual]
    exists_only = not plan.table  # list mode: one complete path per start entity is enough
    paths: list[Path] = []

    def walk(i: int, key: str, nodes_so_far: list[Item], rels: list[Entry]) -> int:
        """0: stop everything (cap), 1: go on, 2: this start entity is proven (list mode)."""
        if i == len(edges):
            path = tuple(nodes_so_far) + tuple(map(entry_item, rels))
            if all(p(path) for p in residual):
                if len(paths) >= max_paths:
                    return 0
                paths.append(path)
                return 2 if exists_only else 1
            return 1
        nxt = sets[i + 1]
        for r, other in neighbours(graph, key, edges[i], oks[i], True):
            item = nxt.get(other)
            if item is None or any(r is x for x in rels):  # a relationship once per path
                continue
            nodes_so_far.append(item)
            rels.append(r)
            status = walk(i + 1, other, nodes_so_far, rels)
            nodes_so_far.pop()
            rels.pop()
            if status != 1:
                return status
        return 1

    for key, item in sets[0].items():
        if not walk(0, key, [item], []):
            out.truncated = True
            break
    if exists_only:
        out.items = list({id(p[0]): p[0] for p in paths}.values())
    else:
        out.paths = paths
    return out


def _may_reuse(edges: list[EdgePlan]) -> bool:
    """Could two consecutive steps match the same relationship (there and back)? Then paths
    are enumerated so a relationship is used once per path, as in Cypher."""
    for a, b in itertools.pairwise(edges):
        same_verb = a.verbs is None or b.verbs is None or bool(a.verbs & b.verbs)
        opposite = a.direction is None or b.direction is None or a.direction != b.direction
        if same_verb and opposite:
            return True
    return False


def _path_getter(plan: Plan) -> Callable[[ast.Prop], Callable[[Path], Any]]:
    slots = plan.slots

    def getter(p: ast.Prop) -> Callable[[Path], Any]:
        slot = slots[p.alias or ""]
        name = p.name
        return lambda path: get_prop(path[slot], name)

    return getter
