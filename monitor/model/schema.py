"""The data model, declared once: entity and relationship types, keys, scopes, volatile fields.

Converters, `mde-monitor document`, the diff and the tests all read these declarations.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from monitor.model.raw import RawData

# A property with few values (a platform, a status, a department) holds one string object per
# value, shared by every entity that has it: parsing the API's JSON makes a new string for each
# occurrence, and a big tenant's machines and users repeat them by the hundred thousand. A field
# seen with more than SHARED_VALUES_PER_FIELD distinct values (names, times, ids) is not tracked
# from then on, so the table stays small for the life of the process.
SHARED_VALUES_PER_FIELD = 256
_SHARED: dict[str, dict[str, dict[str, str] | None]] = {}  # _type -> field -> value -> value
_UNSEEN: dict[str, str] = {}


@dataclass(frozen=True)
class EntityType:
    resource: str  # name in the docs table ("Machine")
    type: str  # JupiterOne `_type`
    classes: tuple[str, ...]  # JupiterOne `_class`
    key_format: str  # `_key` template, `{id}` is the source id
    scope: str  # collection scope that produces it (see monitor.collect)
    short: str  # short name used in event types: mde.<short>.<change>
    volatile: tuple[str, ...] = ()  # fields that change constantly; never an update by themselves
    properties: tuple[str, ...] = ()  # every field the converter writes besides `_key` & co.
    # Properties written even when unknown (null): the JupiterOne class requires them and allows
    # null. Every other property is left out when its value is unknown (None).
    keep_null: tuple[str, ...] = ()

    def key(self, source_id: str) -> str:
        return self.key_format.format(id=source_id)

    def entity(
        self,
        source_id: str,
        display_name: str,
        properties: Mapping[str, Any],
        raw: Any,
        account_tag: str | None = None,
    ) -> dict[str, Any]:
        """A JupiterOne entity: `_key`, `_type`, `_class`, names, properties, tag, `_rawData`.

        A property whose value is None is left out, unless it is one of `keep_null`.
        """
        item: dict[str, Any] = {
            "_key": self.key(source_id),
            "_type": self.type,
            "_class": list(self.classes),
            "displayName": display_name,
            "name": display_name,
        }
        keep = self.keep_null
        shared = _SHARED.setdefault(self.type, {})
        for k, v in properties.items():
            if type(v) is str:
                values = shared.get(k, _UNSEEN)
                if values is _UNSEEN:
                    values = shared[k] = {}
                if values is not None:
                    v = values.setdefault(v, v)
                    if len(values) > SHARED_VALUES_PER_FIELD:
                        shared[k] = None  # many values (names, times, ids): not tracked
            elif v is None and k not in keep:
                continue
            item[k] = v
        if account_tag is not None:
            item[TAG_ACCOUNT_NAME] = account_tag
        item["_rawData"] = raw if isinstance(raw, RawData) else RawData.default(raw)
        return item


@dataclass(frozen=True)
class RelationshipType:
    source: EntityType
    rel_class: str  # HAS, IDENTIFIED, MANAGES ...
    target: EntityType
    scope: str
    short: str  # event type name: mde.<short>.<change>
    properties: tuple[str, ...] = ()  # fields the converter writes besides `_key` & co.

    @functools.cached_property
    def type(self) -> str:
        return relationship_type(self.source.type, self.rel_class, self.target.type)

    def key(self, from_key: str, to_key: str) -> str:
        return f"{from_key}|{self.rel_class.lower()}|{to_key}"

    def relationship(
        self, from_key: str, to_key: str, properties: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A direct JupiterOne relationship between two entity keys (None properties left out)."""
        item: dict[str, Any] = {
            "_key": self.key(from_key, to_key),
            "_type": self.type,
            "_class": self.rel_class,
            "_fromEntityKey": from_key,
            "_toEntityKey": to_key,
            "displayName": self.rel_class,
        }
        if properties:
            item.update((k, v) for k, v in properties.items() if v is not None)
        return item


@dataclass(frozen=True)
class MappedRelationshipType:
    source: EntityType
    rel_class: str
    target_type: str  # e.g. "cve" (an entity owned by another integration)
    direction: str  # FORWARD | REVERSE
    scope: str
    short: str
    target_classes: tuple[str, ...] = field(default=())

    @functools.cached_property
    def type(self) -> str:
        return f"{self.source.type}_{self.rel_class.lower()}_{self.target_type}"

    def key(self, source_key: str, target_key: str) -> str:
        return (
            f"{source_key}|{self.rel_class.lower()}|{self.direction}:"
            f"_type={self.target_type}:_key={target_key}"
        )

    def relationship(self, source_key: str, target_entity: Mapping[str, Any]) -> dict[str, Any]:
        """A mapped relationship to an entity matched on (`_type`, `_key`); created if absent.

        The target declares `_class` only when `target_classes` is set (a class brings its
        required properties with it); None values are left out.
        """
        target: dict[str, Any] = {"_type": self.target_type}
        if self.target_classes:
            target["_class"] = list(self.target_classes)
        target.update((k, v) for k, v in target_entity.items() if v is not None)
        return {
            "_key": self.key(source_key, target["_key"]),
            "_type": self.type,
            "_class": self.rel_class,
            "_mapping": {
                "sourceEntityKey": source_key,
                "relationshipDirection": self.direction,
                "targetFilterKeys": [["_type", "_key"]],
                "skipTargetCreation": False,
                "targetEntity": target,
            },
            "displayName": self.rel_class,
        }


TAG_ACCOUNT_NAME = "tag.AccountName"  # set on every entity when `tag_with_account_name: true`


class ModelError(ValueError):
    """A Microsoft object that cannot be converted; the message names the resource and field."""


def require_str(obj: object, resource: str, field_name: str = "id") -> str:
    """`obj[field_name]` as a non-empty string, else ModelError("<resource>: ...")."""
    if not isinstance(obj, Mapping):
        raise ModelError(f"{resource}: expected a JSON object, got {type(obj).__name__}")
    value = obj.get(field_name)
    if not isinstance(value, str) or not value:
        got = "missing" if value is None else f"got {type(value).__name__}"
        raise ModelError(f"{resource}: field {field_name!r} must be a non-empty string ({got})")
    return value


def epoch_ms(value: object) -> int | None:
    """An ISO 8601 time from Microsoft as epoch milliseconds (the `...On` fields).

    No zone means UTC; fractions beyond milliseconds are cut. None for None, for anything
    unparseable and for .NET's "no date" value `0001-01-01T00:00:00Z`.
    """
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.year <= 1:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
# Identity extensions (issue 13): see monitor.model.identity and docs/data-model.md.
SCOPE_EMPLOYEES = "employees"  # employees, user IS employee, employee MANAGES employee
SCOPE_GROUPS = "groups"  # Entra groups and their user members (groups delta)
SCOPE_DIRECTORY_ROLES = "directory_roles"  # activated directory roles and their members

# Sync lanes: a full sync reads every scope; the identity lane (on the tenant's shorter
# `identity_interval`) reads only these, the others keep their items (SKIPPED, not degraded)
LANE_FULL = "full"
LANE_IDENTITY = "identity"
IDENTITY_LANE_SCOPES = (SCOPE_USERS, SCOPE_EMPLOYEES, SCOPE_GROUPS, SCOPE_DIRECTORY_ROLES)


def logon_users_scope(machine_id: str) -> str:
    return f"{SCOPE_LOGON_USERS}:{machine_id}"


ACCOUNT = EntityType(
    "Account",
    "microsoft_defender_account",
    ("Account",),
    "microsoft_defender_account:{id}",
    SCOPE_ACCOUNT,
    "account",
    properties=(
        "name",
        "displayName",
        "id",
        "organizationName",
        "defaultDomain",
        "verifiedDomains",
        "countryLetterCode",
        "createdOn",
        "tenantType",
        "description",
        "vendor",
    ),
)
DEVICE = EntityType(
    "Device/Machine/Host",
    "user_endpoint",
    ("Device",),
    "user_endpoint.{id}",
    SCOPE_MACHINES,
    "device",
    volatile=("lastSeenOn", "lastSeen"),
    properties=(
        "name",
        "displayName",
        "id",
        "deviceId",
        "category",
        "computerDnsName",
        "hostname",
        "fqdn",
        "firstSeenOn",
        "lastSeenOn",
        "osPlatform",
        "osVersion",
        "osProcessor",
        "osArchitecture",
        "osBuild",
        "version",
        "lastIpAddress",
        "lastExternalIpAddress",
        "agentVersion",
        "healthStatus",
        "deviceValue",
        "rbacGroupId",
        "rbacGroupName",
        "riskScore",
        "exposureLevel",
        "isAadJoined",
        "aadDeviceId",
        "machineTags",
        "defenderAvStatus",
        "onboardingStatus",
        "managedBy",
        "managedByStatus",
        "vmId",
        "cloudProvider",
        "resourceId",
        "subscriptionId",
        "ipAddresses",
        "ipAddress",
        "macAddress",
        "make",
        "model",
        "serial",
    ),
    keep_null=("category", "deviceId", "make", "model", "serial"),
)
LOGON_USER = EntityType(
    "Logon User",
    "microsoft_defender_logon_user",
    ("User",),
    "microsoft_defender_logon_user:{id}",
    SCOPE_LOGON_USERS,
    "logon_user",
    # Per-machine facts (first/last seen on a machine, logon types there) live on the machine HAS
    # logon_user relationship; the entity's copies come from whichever machines were refreshed
    # this sync, so they must never make an event by themselves.
    # directoryUserState / employeeStatus mirror the mapped user and employee, whose own events
    # report the change (one user disabled must not give one update per logon account)
    volatile=(
        "lastSeenOn",
        "lastSeen",
        "firstSeenOn",
        "logonTypes",
        "directoryUserState",
        "employeeStatus",
    ),
    properties=(
        "name",
        "displayName",
        "id",
        "username",
        "domain",
        "accountSid",
        "firstSeenOn",
        "lastSeenOn",
        "logonTypes",
        "isDomainAdmin",
        "isOnlyNetworkUser",
        "logOnMachinesCount",
        "active",
        # identity extensions (monitor.model.identity)
        "accountKind",
        "directoryUserState",
        "employeeStatus",
        "loggedOnAfterTermination",
    ),
)
MACHINE = EntityType(
    "Machine",
    "microsoft_defender_machine",
    ("HostAgent",),
    "microsoft_defender_machine:{id}",
    SCOPE_MACHINES,
    "machine",
    volatile=("lastSeenOn", "lastSeen"),
    properties=(
        "name",
        "displayName",
        "id",
        "computerDnsName",
        "firstSeenOn",
        "lastSeenOn",
        "agentVersion",
        "defenderAvStatus",
        "riskScore",
        "exposureLevel",
        "healthStatus",
        "onboardingStatus",
        "deviceValue",
        "rbacGroupId",
        "rbacGroupName",
        "machineTags",
        "managedBy",
        "managedByStatus",
        "osPlatform",
        "osVersion",
        "osBuild",
        "osProcessor",
        "osArchitecture",
        "version",
        "lastIpAddress",
        "lastExternalIpAddress",
        "ipAddress",
        "macAddress",
        "aadDeviceId",
        "isAadJoined",
        "isExcluded",
        "exclusionReason",
        "isPotentialDuplication",
        "mergedIntoMachineId",
        "function",
    ),
)
USER = EntityType(
    "User",
    "microsoft_defender_user",
    ("User",),
    "microsoft_defender_user:{id}",
    SCOPE_USERS,
    "user",
    volatile=("employeeMapped",),  # derived from the employees scope, reported through it
    properties=(
        "name",
        "displayName",
        "id",
        "username",
        "userPrincipalName",
        "email",
        "mail",
        "givenName",
        "surname",
        "jobTitle",
        "department",
        "officeLocation",
        "active",
        "accountEnabled",
        "userType",
        "createdOn",
        "businessPhones",
        "mobilePhone",
        "preferredLanguage",
        # identity extensions (monitor.model.identity)
        "employeeId",
        "employeeType",
        "companyName",
        "onPremisesSecurityIdentifier",
        "onPremisesSamAccountName",
        "onPremisesDomainName",
        "employeeMapped",
    ),
)
VULNERABILITY = EntityType(
    "Vulnerability",
    "microsoft_defender_vulnerability",
    ("Finding",),
    "microsoft_defender_vulnerability:{id}",
    SCOPE_VULNERABILITIES,
    "vulnerability",
    volatile=("updatedOn", "exposedMachines"),
    properties=(
        "name",
        "displayName",
        "id",
        "description",
        "severity",
        "score",
        "numericSeverity",
        "cvssVector",
        "publishedOn",
        "updatedOn",
        "firstDetectedOn",
        "exposedMachines",
        "open",
        "public",
        "exploitVerified",
        "exploitInKit",
        "exploitTypes",
        "references",
        "category",
        "blocking",
        "production",
        "cveSupportability",
        "epss",
        "webLink",
    ),
)

# Extensions of the seed model (issue 13): people, groups and directory roles. The seed's tables
# (docs/jupiterone-seed.md) list SEED_* only; docs/data-model.md lists these separately.
EMPLOYEE = EntityType(
    "Employee",
    "employee",
    ("Person",),
    "employee:{id}",
    SCOPE_EMPLOYEES,
    "employee",
    volatile=("directoryAccountEnabled",),  # mirrors the user; mde.user.disabled reports it
    properties=(
        "name",
        "displayName",
        "id",
        "employeeId",
        "email",
        "firstName",
        "lastName",
        "employeeType",
        "companyName",
        "department",
        "jobTitle",
        "status",
        "active",
        "terminationOn",
        "managerEmail",
        "source",
        "directoryAccountEnabled",
    ),
)
GROUP = EntityType(
    "Entra Group",
    "entra_group",
    ("UserGroup",),
    "entra_group:{id}",
    SCOPE_GROUPS,
    "group",
    volatile=("memberCount",),  # membership changes are reported as member_added/removed
    properties=(
        "name",
        "displayName",
        "id",
        "description",
        "mail",
        "securityEnabled",
        "mailEnabled",
        "isAssignableToRole",
        "onPremisesSyncEnabled",
        "groupTypes",
        "memberCount",
    ),
)
DIRECTORY_ROLE = EntityType(
    "Entra Directory Role",
    "entra_directory_role",
    ("AccessRole",),
    "entra_directory_role:{id}",
    SCOPE_DIRECTORY_ROLES,
    "role",
    volatile=("memberCount",),  # reported as assigned/unassigned
    properties=("name", "displayName", "id", "description", "roleTemplateId", "memberCount"),
)

SEED_ENTITY_TYPES: tuple[EntityType, ...] = (
    ACCOUNT,
    DEVICE,
    LOGON_USER,
    MACHINE,
    USER,
    VULNERABILITY,
)
EXTENSION_ENTITY_TYPES: tuple[EntityType, ...] = (EMPLOYEE, GROUP, DIRECTORY_ROLE)
ENTITY_TYPES: tuple[EntityType, ...] = SEED_ENTITY_TYPES + EXTENSION_ENTITY_TYPES

ACCOUNT_HAS_MACHINE = RelationshipType(ACCOUNT, "HAS", MACHINE, SCOPE_MACHINES, "account_machine")
ACCOUNT_HAS_USER = RelationshipType(ACCOUNT, "HAS", USER, SCOPE_USERS, "account_user")
MACHINE_HAS_LOGON_USER = RelationshipType(
    MACHINE,
    "HAS",
    LOGON_USER,
    SCOPE_LOGON_USERS,
    "machine_logon_user",
    properties=("firstSeenOn", "lastSeenOn", "logonTypes"),
)
MACHINE_IDENTIFIED_VULNERABILITY = RelationshipType(
    MACHINE,
    "IDENTIFIED",
    VULNERABILITY,
    SCOPE_VULNERABILITIES,
    "machine_vulnerability",
    properties=("products", "fixingKbIds"),
)
MACHINE_MANAGES_DEVICE = RelationshipType(
    MACHINE, "MANAGES", DEVICE, SCOPE_MACHINES, "machine_device"
)

LOGON_USER_IS_USER = RelationshipType(
    LOGON_USER, "IS", USER, SCOPE_LOGON_USERS, "logon_user_user", properties=("matchedBy",)
)
USER_IS_EMPLOYEE = RelationshipType(
    USER, "IS", EMPLOYEE, SCOPE_EMPLOYEES, "user_employee", properties=("matchedBy",)
)
EMPLOYEE_MANAGES_EMPLOYEE = RelationshipType(
    EMPLOYEE, "MANAGES", EMPLOYEE, SCOPE_EMPLOYEES, "employee_employee"
)
GROUP_HAS_USER = RelationshipType(GROUP, "HAS", USER, SCOPE_GROUPS, "group")
USER_ASSIGNED_DIRECTORY_ROLE = RelationshipType(
    USER, "ASSIGNED", DIRECTORY_ROLE, SCOPE_DIRECTORY_ROLES, "role"
)

SEED_RELATIONSHIP_TYPES: tuple[RelationshipType, ...] = (
    ACCOUNT_HAS_MACHINE,
    ACCOUNT_HAS_USER,
    MACHINE_HAS_LOGON_USER,
    MACHINE_IDENTIFIED_VULNERABILITY,
    MACHINE_MANAGES_DEVICE,
)
EXTENSION_RELATIONSHIP_TYPES: tuple[RelationshipType, ...] = (
    LOGON_USER_IS_USER,
    USER_IS_EMPLOYEE,
    EMPLOYEE_MANAGES_EMPLOYEE,
    GROUP_HAS_USER,
    USER_ASSIGNED_DIRECTORY_ROLE,
)
RELATIONSHIP_TYPES: tuple[RelationshipType, ...] = (
    SEED_RELATIONSHIP_TYPES + EXTENSION_RELATIONSHIP_TYPES
)

VULNERABILITY_IS_CVE = MappedRelationshipType(
    VULNERABILITY,
    "IS",
    "cve",
    "FORWARD",
    SCOPE_VULNERABILITIES,
    "vulnerability_cve",
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
