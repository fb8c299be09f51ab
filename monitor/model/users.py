"""Users: Microsoft Graph `/users` objects -> `microsoft_defender_user` entities + account HAS user."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monitor.model.schema import ACCOUNT_HAS_USER, USER, epoch_ms, require_str

Item = dict[str, Any]

# The Graph user fields this converter reads; the collector `$select`s exactly these (Graph's
# default projection leaves out accountEnabled, department, userType and createdDateTime;
# businessPhones, mobilePhone and preferredLanguage are mapped as JupiterOne's converter does).
GRAPH_USER_FIELDS: tuple[str, ...] = (
    "id",
    "displayName",
    "userPrincipalName",
    "mail",
    "givenName",
    "surname",
    "jobTitle",
    "department",
    "officeLocation",
    "accountEnabled",
    "userType",
    "createdDateTime",
    "businessPhones",
    "mobilePhone",
    "preferredLanguage",
)
# Identity mapping (monitor.model.identity): employee fields and the on-premises account.
IDENTITY_USER_FIELDS = (
    "employeeId",
    "employeeType",
    "companyName",
    "onPremisesSecurityIdentifier",
    "onPremisesSamAccountName",
    "onPremisesDomainName",
)
GRAPH_USER_FIELDS += IDENTITY_USER_FIELDS


def _strings(value: object) -> list[str] | None:
    """The non-empty strings of a list (Graph's `businessPhones`); None when there are none."""
    if not isinstance(value, list):
        return None
    return [v for v in value if isinstance(v, str) and v] or None


def user_entity(user: Mapping[str, Any], *, account_tag: str | None = None) -> Item:
    """One Graph user as a `microsoft_defender_user` entity.

    `active` is Graph's `accountEnabled` (None when it was not selected, see
    GRAPH_USER_FIELDS); `email` is `mail`.
    """
    user_id = require_str(user, "user")
    upn = user.get("userPrincipalName")
    name = user.get("displayName") or upn or user_id
    properties = {
        "id": user_id,
        "username": upn,
        "userPrincipalName": upn,
        "email": user.get("mail") or None,
        "mail": user.get("mail"),
        "givenName": user.get("givenName"),
        "surname": user.get("surname"),
        "jobTitle": user.get("jobTitle"),
        "department": user.get("department"),
        "officeLocation": user.get("officeLocation"),
        "active": user.get("accountEnabled"),
        "accountEnabled": user.get("accountEnabled"),
        "userType": user.get("userType"),
        "createdOn": epoch_ms(user.get("createdDateTime")),
        "businessPhones": _strings(user.get("businessPhones")),
        "mobilePhone": user.get("mobilePhone") or None,
        "preferredLanguage": user.get("preferredLanguage") or None,
    }
    properties.update({f: user.get(f) for f in IDENTITY_USER_FIELDS})
    properties["employeeMapped"] = None  # set by the identity mapping (monitor.model.identity)
    return USER.entity(user_id, name, properties, raw=user, account_tag=account_tag)


def account_user_relationship(account_key: str, user_key: str) -> Item:
    """account HAS user."""
    return ACCOUNT_HAS_USER.relationship(account_key, user_key)
