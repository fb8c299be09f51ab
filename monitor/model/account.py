"""Account: the tenant's Graph `/organization` object plus its configuration -> one entity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monitor.config import TenantConfig
from monitor.model.schema import ACCOUNT, ModelError, epoch_ms

Item = dict[str, Any]

VENDOR = "Microsoft Defender"  # the account's `vendor`, as JupiterOne's Defender integration writes


def account_tag(tenant: TenantConfig) -> str | None:
    """The `tag.AccountName` value for this tenant's entities, or None when tagging is off."""
    return tenant.name if tenant.tag_with_account_name else None


def account_key(tenant: TenantConfig) -> str:
    """The account entity's `_key`; known before anything is fetched."""
    return ACCOUNT.key(tenant.tenant_id)


def _domains(organization: Mapping[str, Any]) -> tuple[list[str] | None, str | None]:
    raw = organization.get("verifiedDomains")
    if raw is None:
        return None, None
    if not isinstance(raw, list):
        raise ModelError("organization: field 'verifiedDomains' must be a list")
    names: list[str] = []
    default: str | None = None
    for domain in raw:
        if not isinstance(domain, Mapping) or not isinstance(domain.get("name"), str):
            raise ModelError("organization: verifiedDomains items need a string 'name'")
        names.append(domain["name"])
        if domain.get("isDefault") is True and default is None:
            default = domain["name"]
    return names, default


def account_entity(tenant: TenantConfig, organization: Mapping[str, Any] | None) -> Item:
    """The `microsoft_defender_account` entity.

    name/displayName are the organization's `displayName`, else the configured tenant name;
    `organization` is Graph's `/organization` value[0] (None when it could not be read: only the
    configured fields are set).
    """
    if organization is not None and not isinstance(organization, Mapping):
        raise ModelError(f"organization: expected a JSON object, got {type(organization).__name__}")
    org: Mapping[str, Any] = organization or {}
    verified, default = _domains(org)
    properties = {
        "id": org.get("id"),
        "organizationName": org.get("displayName"),
        "defaultDomain": default,
        "verifiedDomains": verified,
        "countryLetterCode": org.get("countryLetterCode"),
        "createdOn": epoch_ms(org.get("createdDateTime")),
        "tenantType": org.get("tenantType"),
        "description": tenant.description,
        "vendor": VENDOR,
    }
    org_name = org.get("displayName")
    return ACCOUNT.entity(
        tenant.tenant_id,
        org_name if isinstance(org_name, str) and org_name.strip() else tenant.name,
        properties,
        raw=organization,
        account_tag=account_tag(tenant),
    )
