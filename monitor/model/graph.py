"""The graph of one tenant as collected: items keyed by `_key`, each tagged with its scope."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

Item = dict[str, Any]


class ScopeState(StrEnum):
    COMPLETE = "complete"  # every page fetched and parsed: absence means deletion
    FAILED = "failed"  # error after retries, 401/403, malformed or truncated page
    SKIPPED = "skipped"  # not fetched this sync (budget cut): previous items are kept


@dataclass
class ScopeStatus:
    state: ScopeState
    count: int = 0
    error: str | None = None  # short, secret-free; names the endpoint and the code

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "count": self.count, "error": self.error}


@dataclass
class Graph:
    """Entities and relationships (direct and mapped) by `_key`, with the scope of each."""

    entities: dict[str, Item] = field(default_factory=dict)
    relationships: dict[str, Item] = field(default_factory=dict)  # mapped ones carry `_mapping`
    scope_of: dict[str, str] = field(default_factory=dict)  # _key -> scope
    scopes: dict[str, ScopeStatus] = field(default_factory=dict)  # scope -> status

    def add_entity(self, entity: Item, scope: str) -> None:
        self.entities[entity["_key"]] = entity
        self.scope_of[entity["_key"]] = scope

    def add_relationship(self, rel: Item, scope: str) -> None:
        self.relationships[rel["_key"]] = rel
        self.scope_of[rel["_key"]] = scope

    def count_by_type(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in (*self.entities.values(), *self.relationships.values()):
            counts[item["_type"]] = counts.get(item["_type"], 0) + 1
        return dict(sorted(counts.items()))

    def export(self) -> dict[str, list[Item]]:
        """`{"entities", "relationships", "mappedRelationships"}` as JupiterOne writes them."""
        direct = [r for r in self.relationships.values() if "_mapping" not in r]
        mapped = [r for r in self.relationships.values() if "_mapping" in r]
        return {
            "entities": list(self.entities.values()),
            "relationships": direct,
            "mappedRelationships": mapped,
        }
