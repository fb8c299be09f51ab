"""The data model, declared once: entity and relationship types, keys, scopes, volatile fields.

Converters, `mde-monitor document`, the diff and the tests all read these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EntityType:
    resource: str  # name in the docs table ("Machine")
    type: str  # JupiterOne `_type`
    classes: tuple[str, ...]  # JupiterOne `_class`
    key_format: str  # `_key` template, `{id}` is the source id
    scope: str  # collection scope that produces it (see monitor.collect)
    short: str  # short name used in event types: mde.<short>.<change>
    volatile: tuple[str, ...] = ()  # fields that change constantly; never an update by themselves

    def key(self, source_id: str) -> str:
        return self.key_format.format(id=source_id)


@dataclass(frozen=True)
class RelationshipType:
    source: EntityType
    rel_class: str  # HAS, IDENTIFIED, MANAGES ...
    target: EntityType
    scope: str
    short: str  # event type name: mde.<short>.<change>

    @property
    def type(self) -> str:
        return relationship_type(self.source.type, self.rel_class, self.target.type)

    def key(self, from_key: str, to_key: str) -> str:
        return f"{from_key}|{self.rel_class.lower()}|{to_key}"


@dataclass(frozen=True)
class MappedRelationshipType:
    source: EntityType
    rel_class: str
    target_type: str  # e.g. "cve" (an entity owned by another integration)
    direction: str  # FORWARD | REVERSE
    scope: str
    short: str
    target_classes: tuple[str, ...] = field(default=())

    @property
    def type(self) -> str:
        return f"{self.source.type}_{self.rel_class.lower()}_{self.target_type}"

    def key(self, source_key: str, target_key: str) -> str:
        return (
            f"{source_key}|{self.rel_class.lower()}|{self.direction}:"
            f"_type={self.target_type}:_key={target_key}"
        )


def relationship_type(source_type: str, rel_class: str, target_type: str) -> str:
    """JupiterOne's rule: the target's shared prefix with the source is dropped."""
    src_parts, tgt_parts = source_type.split("_"), target_type.split("_")
    i = 0
    while i < min(len(src_parts), len(tgt_parts)) - 1 and src_parts[i] == tgt_parts[i]:
        i += 1
    return f"{source_type}_{rel_class.lower()}_{'_'.join(tgt_parts[i:])}"


# Collection scopes: the unit of completeness. A scope whose fetch failed keeps its previous
# items. Logon users are fetched per machine: scope "logon_users:<machine id>".
SCOPE_ACCOUNT = "account"
SCOPE_USERS = "users"
SCOPE_MACHINES = "machines"
SCOPE_VULNERABILITIES = "vulnerabilities"
SCOPE_LOGON_USERS = "logon_users"  # prefix; one scope per machine


def logon_users_scope(machine_id: str) -> str:
    return f"{SCOPE_LOGON_USERS}:{machine_id}"


ACCOUNT = EntityType(
    "Account",
    "microsoft_defender_account",
    ("Account",),
    "microsoft_defender_account:{id}",
    SCOPE_ACCOUNT,
    "account",
)
DEVICE = EntityType(
    "Device/Machine/Host",
    "user_endpoint",
    ("Device",),
    "user_endpoint.{id}",
    SCOPE_MACHINES,
    "device",
    volatile=("lastSeenOn", "lastSeen"),
)
LOGON_USER = EntityType(
    "Logon User",
    "microsoft_defender_logon_user",
    ("User",),
    "microsoft_defender_logon_user:{id}",
    SCOPE_LOGON_USERS,
    "logon_user",
    volatile=("lastSeenOn", "lastSeen"),
)
MACHINE = EntityType(
    "Machine",
    "microsoft_defender_machine",
    ("HostAgent",),
    "microsoft_defender_machine:{id}",
    SCOPE_MACHINES,
    "machine",
    volatile=("lastSeenOn", "lastSeen"),
)
USER = EntityType(
    "User",
    "microsoft_defender_user",
    ("User",),
    "microsoft_defender_user:{id}",
    SCOPE_USERS,
    "user",
)
VULNERABILITY = EntityType(
    "Vulnerability",
    "microsoft_defender_vulnerability",
    ("Finding",),
    "microsoft_defender_vulnerability:{id}",
    SCOPE_VULNERABILITIES,
    "vulnerability",
    volatile=("updatedOn", "exposedMachines"),
)

ENTITY_TYPES: tuple[EntityType, ...] = (ACCOUNT, DEVICE, LOGON_USER, MACHINE, USER, VULNERABILITY)

ACCOUNT_HAS_MACHINE = RelationshipType(ACCOUNT, "HAS", MACHINE, SCOPE_MACHINES, "account_machine")
ACCOUNT_HAS_USER = RelationshipType(ACCOUNT, "HAS", USER, SCOPE_USERS, "account_user")
MACHINE_HAS_LOGON_USER = RelationshipType(
    MACHINE, "HAS", LOGON_USER, SCOPE_LOGON_USERS, "machine_logon_user"
)
MACHINE_IDENTIFIED_VULNERABILITY = RelationshipType(
    MACHINE, "IDENTIFIED", VULNERABILITY, SCOPE_VULNERABILITIES, "machine_vulnerability"
)
MACHINE_MANAGES_DEVICE = RelationshipType(
    MACHINE, "MANAGES", DEVICE, SCOPE_MACHINES, "machine_device"
)

RELATIONSHIP_TYPES: tuple[RelationshipType, ...] = (
    ACCOUNT_HAS_MACHINE,
    ACCOUNT_HAS_USER,
    MACHINE_HAS_LOGON_USER,
    MACHINE_IDENTIFIED_VULNERABILITY,
    MACHINE_MANAGES_DEVICE,
)

VULNERABILITY_IS_CVE = MappedRelationshipType(
    VULNERABILITY,
    "IS",
    "cve",
    "FORWARD",
    SCOPE_VULNERABILITIES,
    "vulnerability_cve",
    target_classes=("Vulnerability",),
)

MAPPED_RELATIONSHIP_TYPES: tuple[MappedRelationshipType, ...] = (VULNERABILITY_IS_CVE,)

ENTITY_BY_TYPE: dict[str, EntityType] = {e.type: e for e in ENTITY_TYPES}
RELATIONSHIP_BY_TYPE: dict[str, RelationshipType | MappedRelationshipType] = {
    **{r.type: r for r in RELATIONSHIP_TYPES},
    **{m.type: m for m in MAPPED_RELATIONSHIP_TYPES},
}

# Ordered levels used by the diff (risk raised/lowered) and by alert rule comparisons.
LEVELS: tuple[str, ...] = ("None", "Informational", "Low", "Medium", "High", "Critical")


def level_rank(value: object) -> int | None:
    """Position of a Defender level (None < Informational < Low < Medium < High < Critical)."""
    if isinstance(value, str):
        try:
            return LEVELS.index(value)
        except ValueError:
            return None
    return None
