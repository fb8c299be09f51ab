"""Deep links into Microsoft's portals for an entity, on the right host for the tenant's cloud."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from monitor.config import Cloud, TenantConfig
from monitor.model.schema import DEVICE, MACHINE, USER, VULNERABILITY

# Defender portal per cloud (GCC uses the commercial portal; GCC High and DoD have their own).
DEFENDER_PORTAL = {
    Cloud.PUBLIC: "https://security.microsoft.com",
    Cloud.GCC: "https://security.microsoft.com",
    Cloud.GCC_HIGH: "https://security.microsoft.us",
    Cloud.DOD: "https://security.apps.mil",
}
ENTRA_PORTAL = {
    Cloud.PUBLIC: "https://entra.microsoft.com",
    Cloud.GCC: "https://entra.microsoft.com",
    Cloud.GCC_HIGH: "https://entra.microsoft.us",
    Cloud.DOD: "https://entra.microsoft.us",
}


def links(entity: dict[str, Any], tenant: TenantConfig | None) -> list[dict[str, str]]:
    """`[{"label", "url"}]` for a machine, device, CVE or directory user (empty otherwise)."""
    cloud = tenant.cloud if tenant is not None else Cloud.PUBLIC
    defender = DEFENDER_PORTAL.get(cloud)
    entra = ENTRA_PORTAL.get(cloud)
    if defender is None or entra is None:  # custom endpoints (the simulator): no portal
        return []
    tid = f"?tid={quote(tenant.tenant_id, safe='')}" if tenant is not None else ""
    typ = entity.get("_type")
    out: list[dict[str, str]] = []
    if typ in (MACHINE.type, DEVICE.type):
        mid = entity.get("id") or entity.get("machineId")
        if mid:
            out.append(
                {
                    "label": "Defender: device page",
                    "url": f"{defender}/machines/{quote(str(mid), safe='')}/overview{tid}",
                }
            )
    elif typ == VULNERABILITY.type:
        cve = entity.get("id") or entity.get("name")
        if cve:
            out.append(
                {
                    "label": "Defender: vulnerability page",
                    "url": f"{defender}/vulnerabilities/vulnerability/"
                    f"{quote(str(cve), safe='')}/overview{tid}",
                }
            )
    elif typ == USER.type:
        uid = entity.get("id")
        if uid:
            out.append(
                {
                    "label": "Entra ID: user",
                    "url": f"{entra}/#view/Microsoft_AAD_UsersAndTenants/UserProfileMenuBlade"
                    f"/~/overview/userId/{quote(str(uid), safe='')}",
                }
            )
    return out
