"""Change events as CloudEvents 1.0 JSON, and the versioned catalogue of event types."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

SPEC_VERSION = "1.0"
SCHEMA_VERSION = "1"  # bump when `data` changes shape; carried as the `mdeschemaversion` attribute

Event = dict[str, Any]

# type -> what it means. Documented in docs/events.md (generated from this table).
EVENT_TYPES: dict[str, str] = {
    # entities
    "mde.account.created": "The tenant's organization appeared (it was missing from a complete fetch)",
    "mde.account.deleted": "The tenant's organization is missing from a complete fetch",
    "mde.account.updated": "The tenant's organization changed (name, domains)",
    "mde.machine.created": "A machine appeared in Defender (onboarded or newly seen)",
    "mde.machine.deleted": "A machine disappeared from Defender's machine list",
    "mde.machine.updated": "A machine's properties changed (changes lists each field)",
    "mde.machine.risk_raised": "riskScore went up (None < Informational < Low < Medium < High)",
    "mde.machine.risk_lowered": "riskScore went down",
    "mde.machine.exposure_raised": "exposureLevel went up",
    "mde.machine.exposure_lowered": "exposureLevel went down",
    "mde.machine.health_degraded": "healthStatus became Inactive, NoSensorData or ImpairedCommunication",
    "mde.machine.health_recovered": "healthStatus went back to Active",
    "mde.machine.onboarding_changed": "onboardingStatus changed",
    "mde.machine.av_status_changed": "defenderAvStatus changed",
    "mde.machine.tags_changed": "machineTags gained or lost a tag",
    "mde.user.created": "A directory user appeared",
    "mde.user.deleted": "A directory user disappeared",
    "mde.user.updated": "A directory user's properties changed",
    "mde.user.disabled": "accountEnabled went from true to false",
    "mde.user.enabled": "accountEnabled went from false to true",
    "mde.logon_user.created": "A logon account was seen for the first time in the tenant",
    "mde.logon_user.deleted": "A logon account is no longer seen on any machine",
    "mde.logon_user.updated": "A logon account's properties changed (e.g. isDomainAdmin)",
    "mde.vulnerability.created": "A CVE is now present on at least one machine of the tenant",
    "mde.vulnerability.deleted": "A CVE is no longer present on any machine",
    "mde.vulnerability.updated": "A CVE's properties changed (severity, score, exploit)",
    "mde.vulnerability.exploit_published": "publicExploit went from false to true",
    "mde.employee.created": "An employee appeared (directory or HR file)",
    "mde.employee.deleted": "An employee is gone from the directory and the HR file",
    "mde.employee.updated": "An employee's properties changed (e.g. status active -> terminated)",
    "mde.group.created": "An Entra group was created",
    "mde.group.deleted": "An Entra group was deleted",
    "mde.group.updated": "An Entra group's properties changed (e.g. isAssignableToRole)",
    "mde.role.created": "A directory role was activated in the tenant",
    "mde.role.deleted": "A directory role is no longer activated",
    "mde.role.updated": "A directory role's properties changed",
    # relationships
    "mde.machine_vulnerability.identified": "A CVE was newly identified on a machine",
    "mde.machine_vulnerability.resolved": "A CVE is no longer identified on a machine",
    "mde.machine_logon_user.added": "An account logged on to a machine for the first time",
    "mde.machine_logon_user.removed": "An account no longer appears among a machine's logon users",
    "mde.machine_logon_user.logged_on": (
        "An account whose directory user is disabled or gone (or whose employee is terminated)"
        " logged on again to a machine"
    ),
    # query alert rules (monitor/alerts/query_rules.py)
    "mde.query.entered": "An entity or row entered a query rule's result set after a sync",
    "mde.query.left": "An entity or row left a query rule's result set after a complete sync",
    "mde.group.member_added": "A user was added to an Entra group",
    "mde.group.member_removed": "A user was removed from an Entra group",
    "mde.role.assigned": "A user was assigned a directory role (e.g. Global Administrator)",
    "mde.role.unassigned": "A user no longer holds a directory role",
    # sync
    "mde.sync.baseline": "First sync of a tenant or of a resource: counts, no per-item events",
    "mde.sync.degraded": "A resource could not be fetched completely; its previous items were kept",
    "mde.sync.failed": "The sync failed (sign-in or every resource); nothing was changed",
    "mde.sync.suspicious_drop": "A complete fetch would delete more than the allowed share of a type",
    "mde.sync.drop_applied": "A large drop the guard held was applied (persisted or accepted)",
    # the event stream itself
    "mde.events.lost": "Unread events were trimmed from the stream at its memory cap (data.count)",
}


def event_id(tenant: str, subject: str, change: str, generation: int) -> str:
    """Deterministic id: a re-run of the same diff on the same generation gives the same id."""
    digest = hashlib.sha256(f"{tenant}\x1f{subject}\x1f{change}\x1f{generation}".encode())
    return digest.hexdigest()[:32]


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(
    *,
    tenant: str,
    type: str,
    subject: str,
    generation: int,
    data: dict[str, Any],
    time: str | None = None,
    change: str | None = None,
) -> Event:
    """A CloudEvents 1.0 envelope; `data` always carries tenant and generation."""
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    return {
        "specversion": SPEC_VERSION,
        "id": event_id(tenant, subject, change or type, generation),
        "source": f"mde-monitor/{tenant}",
        "type": type,
        "subject": subject,
        "time": time or utc_now_iso(),
        "datacontenttype": "application/json",
        "mdeschemaversion": SCHEMA_VERSION,
        "data": {"tenant": tenant, "generation": generation, **data},
    }
