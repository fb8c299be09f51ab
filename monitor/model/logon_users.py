"""Logon users: Defender `/api/machines/{id}/logonusers` items -> logon-user entities + machine HAS.

One entity per Defender logon-user `id` (an account such as `contoso\\alice`), whatever the number
of machines it logged on to; one machine HAS logon_user relationship per machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monitor.model.schema import LOGON_USER, MACHINE_HAS_LOGON_USER, epoch_ms, require_str

Item = dict[str, Any]


def logon_user_entity(logon_user: Mapping[str, Any], *, account_tag: str | None = None) -> Item:
    """One logon-user item as a `microsoft_defender_logon_user` entity (keyed by its `id`)."""
    user_id = require_str(logon_user, "logon user")
    get = logon_user.get
    account_name = get("accountName")
    name = account_name if isinstance(account_name, str) and account_name else user_id
    properties = {
        "id": user_id,
        "username": account_name,
        "domain": get("accountDomain"),
        "accountSid": get("accountSid"),
        "firstSeenOn": epoch_ms(get("firstSeen")),
        "lastSeenOn": epoch_ms(get("lastSeen")),
        "logonTypes": get("logonTypes"),
        "isDomainAdmin": get("isDomainAdmin"),
        "isOnlyNetworkUser": get("isOnlyNetworkUser"),
        "logOnMachinesCount": get("logOnMachinesCount"),
        "active": True,
        # set by the identity mapping (monitor.model.identity)
        "accountKind": None,
        "directoryUserState": None,
        "employeeStatus": None,
        "loggedOnAfterTermination": None,
    }
    return LOGON_USER.entity(user_id, name, properties, raw=logon_user, account_tag=account_tag)


def merged_logon_user_entity(
    reports: Mapping[str, Mapping[str, Any]], *, account_tag: str | None = None
) -> Item:
    """The entity of one account reported by several machines (`machine id -> item`).

    Independent of report order: fields come from the report of the smallest machine id,
    except `firstSeenOn` (earliest of all) and `lastSeenOn` (latest of all).
    """
    if not reports:
        raise ValueError("merged_logon_user_entity needs at least one report")
    entity = logon_user_entity(reports[min(reports)], account_tag=account_tag)
    first = [t for r in reports.values() if (t := epoch_ms(r.get("firstSeen"))) is not None]
    last = [t for r in reports.values() if (t := epoch_ms(r.get("lastSeen"))) is not None]
    entity["firstSeenOn"] = min(first) if first else None
    entity["lastSeenOn"] = max(last) if last else None
    return entity


def machine_logon_user_relationship(
    machine_key: str, logon_user_key: str, report: Mapping[str, Any] | None = None
) -> Item:
    """machine HAS logon_user, with what this machine reported: first/last seen, logon types."""
    report = report or {}
    return MACHINE_HAS_LOGON_USER.relationship(
        machine_key,
        logon_user_key,
        {
            "firstSeenOn": epoch_ms(report.get("firstSeen")),
            "lastSeenOn": epoch_ms(report.get("lastSeen")),
            "logonTypes": report.get("logonTypes"),
        },
    )
