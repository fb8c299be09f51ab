"""Incremental evaluation: which start entities a commit's changes can reach, for one plan.

An entity's membership in a list query's result depends only on the entity itself and what its
path can reach: its filters and negations, the relationships it leaves by, and the next
entities' in turn. So after a commit only the start entities from which a touched entity can be
reached along the plan's own steps (walked backwards, in the previous and the new graph, and
through negations) can enter or leave; matching those again (`executor.match(starts=...)`)
against the previous result gives the same answer as matching everything. Touched: an entity
that joined or left, both ends of a changed relationship, an entity with a changed field the
plan reads (a machine whose `lastSeenOn` alone moved touches no plan that does not read it).

Queries whose answer is not a union of per-start answers (RETURN, ORDER BY, SKIP, LIMIT), or that
move with the clock or with the change history (`date.now`, `_beginOn`, `CHANGED`), are not
incremental: they are evaluated whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from monitor.query.executor import neighbours, node_pred
from monitor.query.graph import QueryGraph
from monitor.query.planner import EdgePlan, NodePlan, Plan, expr_props


@dataclass(frozen=True)
class GraphDelta:
    """Two consecutive generations of a tenant's query graph and the keys that changed."""

    before: QueryGraph
    after: QueryGraph
    changed: frozenset[str]  # keys (re)written or deleted by the commit
    quiet: frozenset[str] = frozenset()  # of those, changed in their `ignored` fields only
    ignored: Mapping[str, frozenset[str]] = field(default_factory=dict)  # _type -> fields
    _edited: dict[frozenset[str], dict[frozenset[str], list[str]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @cached_property
    def structural(self) -> frozenset[str]:
        """Entities that joined or left, and both ends of every changed relationship."""
        out: set[str] = set()
        old_ents, new_ents = self.before.entities, self.after.entities
        for key in self.changed:
            was, now = key in old_ents, key in new_ents
            if was != now:
                out.add(key)
            elif was:
                continue  # an entity in both: see `edited`
            for g in (self.before, self.after):
                r = g.relationships.get(key)
                if r is not None:
                    out.add(r["_fromEntityKey"])
                    out.add(r["_toEntityKey"])
        return frozenset(out)

    def edited(self, watched: frozenset[str]) -> dict[frozenset[str], list[str]]:
        """Entities present in both generations with a changed `watched` field, grouped by
        which of those fields changed (a sync moves `lastSeenOn` on every machine and little
        else: no plan that does not read it sees those machines as touched)."""
        groups = self._edited.get(watched)
        if groups is None:
            groups = self._edited[watched] = {}
            old_ents, new_ents = self.before.entities, self.after.entities
            quiet, by_type = self.quiet, {t: f & watched for t, f in self.ignored.items()}
            for key in self.changed:
                old, new = old_ents.get(key), new_ents.get(key)
                if old is None or new is None or old is new:
                    continue
                ignored = by_type.get(new.get("_type", "")) if key in quiet else None
                if ignored is not None:  # what changed is among its type's ignored fields
                    fields = ignored
                else:
                    fields = frozenset(f for f in watched if old.get(f) != new.get(f))
                if fields:
                    groups.setdefault(fields, []).append(key)
        return groups


def is_incremental(plan: Plan) -> bool:
    """Is the plan's answer the union of what each start entity matches, today as yesterday?"""
    q = plan.query
    return (
        not plan.table
        and not q.order
        and q.skip is None
        and q.limit is None
        and not q.relative
        and not plan.needs_changes
    )


ALWAYS_READ = frozenset({"_key", "_type", "_class", "displayName"})  # stored with each member


def plan_fields(plan: Plan) -> frozenset[str]:
    """The top-level entity fields the plan's answer can depend on."""
    names: set[str] = set(ALWAYS_READ)
    exprs = [*plan.residual]
    nodes = list(plan.nodes)
    edges = list(plan.edges)
    while nodes or edges:
        if nodes:
            node = nodes.pop()
            exprs += node.filters
            edges += node.negations
        if edges:
            edge = edges.pop()
            exprs += edge.filters
            if edge.target is not None:
                nodes.append(edge.target)
    for e in exprs:
        for p in expr_props(e):
            names.add(p.name)
            names.add(p.name.split(".", 1)[0])
    return frozenset(names)


def _touched(delta: GraphDelta, fields: frozenset[str], watched: frozenset[str]) -> set[str]:
    """The entities whose part in the plan may have changed: those that joined or left, the
    ends of changed relationships, and those with a changed field the plan reads."""
    out = set(delta.structural)
    for changed, keys in delta.edited(watched).items():
        if changed & fields:
            out.update(keys)
    return out


def _back(keys: Iterable[str], edge: EdgePlan, graphs: tuple[QueryGraph, ...]) -> set[str]:
    """The entities one `edge` step before `keys` (the step walked backwards), in any graph."""
    found: set[str] = set()
    for g in graphs:
        for k in keys:
            for _r, n in neighbours(g, k, edge, None, forward=False):
                found.add(n)
    return found


def _through_negations(
    node: NodePlan, touched: set[str], graphs: tuple[QueryGraph, ...]
) -> set[str]:
    """`touched`, plus the entities whose `THAT !VERB` tests can see a touched entity."""
    keys = set(touched)
    for neg in node.negations:
        assert neg.target is not None
        keys |= _back(_through_negations(neg.target, touched, graphs), neg, graphs)
    return keys


def _prune(node: NodePlan, keys: set[str], touched: set[str], graph: QueryGraph) -> set[str]:
    """Drop untouched entities that fail the node's own filters: unchanged, they failed them
    before too, so no path of either generation went through them."""
    own = NodePlan(node.index, node.alias, node.selector, node.filters)
    pred = node_pred(own, graph)
    ents, names = graph.entities, node.selector.names
    return {
        k for k in keys if k in touched or (k in ents and graph.is_a(names, k) and pred(ents[k]))
    }


def affected_starts(
    plan: Plan, delta: GraphDelta, watched: frozenset[str] | None = None
) -> set[str]:
    """The start entities whose membership the commit may have changed. `watched` (a superset
    of the plan's fields, e.g. those of every rule evaluated together) lets several plans share
    one comparison of the changed entities."""
    graphs = (delta.before, delta.after)
    fields = plan_fields(plan)
    touched = _touched(delta, fields, watched if watched is not None else fields)
    reach: set[str] = set()
    for i in range(len(plan.nodes) - 1, -1, -1):
        node = plan.nodes[i]
        here = _through_negations(node, touched, graphs)
        if i < len(plan.edges):
            here |= _back(reach, plan.edges[i], graphs)
        reach = _prune(node, here, touched, delta.after)
    return reach


__all__ = ["GraphDelta", "affected_starts", "is_incremental"]
