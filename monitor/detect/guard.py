"""Deletion guard rail: a complete fetch that would delete too much of a type is held.

Decisions are made per *guarded* type: the entity types machine, user, vulnerability, account
and the relationship types machine IDENTIFIED vulnerability and machine HAS logon user. The
structural types follow their owner (a held machine drop also holds its `user_endpoint` mirror
and the account HAS machine / machine MANAGES device relationships). Logon-user entities exist
through their relationships and follow them.

A type is held when, in COMPLETE scopes, it would lose more than `drop_threshold` of its
previous items and at least `drop_min_items` items. Its previous items are kept, one
`mde.sync.suspicious_drop` is emitted and the sync is degraded. The number of consecutive syncs
with such a drop is kept in Redis; when it reaches `drop_persist_syncs` (counting the current
sync), or when the operator passes `accept_drop`, the deletions are applied, the count reset
and one `mde.sync.drop_applied` is emitted (`reason`: persisted or accepted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from monitor.config import DetectSettings
from monitor.model import schema

# owned _type -> the guarded _type whose decision it follows
OWNER: dict[str, str] = {
    schema.DEVICE.type: schema.MACHINE.type,
    schema.ACCOUNT_HAS_MACHINE.type: schema.MACHINE.type,
    schema.MACHINE_MANAGES_DEVICE.type: schema.MACHINE.type,
    schema.ACCOUNT_HAS_USER.type: schema.USER.type,
    schema.VULNERABILITY_IS_CVE.type: schema.VULNERABILITY.type,
}
UNGUARDED: frozenset[str] = frozenset({schema.LOGON_USER.type})


@dataclass
class DropDecision:
    """The guard's verdict on one guarded type's deletions."""

    entity_type: str
    previous: int
    current: int
    deleted: int
    share: float
    threshold: float
    held_syncs: int  # consecutive syncs with this drop, the current one included
    held: bool  # True: deletions withheld this sync; False: applied (persisted or accepted)
    accepted: bool = False

    def to_event_data(self) -> dict[str, object]:
        return {
            "entityType": self.entity_type,
            "previous": self.previous,
            "current": self.current,
            "deleted": self.deleted,
            "share": round(self.share, 4),
            "threshold": self.threshold,
            "heldSyncs": self.held_syncs,
            "held": self.held,
        }


def guarded_type(typ: str) -> str | None:
    """The type whose guard decision `typ` follows (None: not guarded)."""
    if typ in UNGUARDED:
        return None
    return OWNER.get(typ, typ)


def evaluate(
    *,
    previous: Mapping[str, int],
    current: Mapping[str, int],
    deletions: Mapping[str, int],
    counts: Mapping[str, int],
    detect: DetectSettings,
    accept_drop: bool,
) -> tuple[dict[str, DropDecision], dict[str, int]]:
    """Decide per guarded type; returns (decisions for large drops, new consecutive counts).

    `previous`/`current`/`deletions` count items per `_type` (stored, fetched, to be deleted
    from COMPLETE scopes); `counts` is the stored consecutive-drop count per type.
    """
    decisions: dict[str, DropDecision] = {}
    new_counts: dict[str, int] = {}
    for typ, n_del in sorted(deletions.items()):
        if guarded_type(typ) != typ or n_del <= 0:
            continue
        prev = previous.get(typ, 0)
        if prev <= 0:
            continue
        share = n_del / prev
        if share <= detect.drop_threshold or n_del < detect.drop_min_items:
            continue
        seen = counts.get(typ, 0) + 1
        apply = accept_drop or seen >= detect.drop_persist_syncs
        decisions[typ] = DropDecision(
            entity_type=typ,
            previous=prev,
            current=current.get(typ, 0),
            deleted=n_del,
            share=share,
            threshold=detect.drop_threshold,
            held_syncs=seen,
            held=not apply,
            accepted=accept_drop,
        )
        if not apply:
            new_counts[typ] = seen
    return decisions, new_counts
