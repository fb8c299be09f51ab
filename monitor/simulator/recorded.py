"""The recorded Microsoft responses (monitor/simulator/recorded/) as a simulated tenant."""

from __future__ import annotations

import copy
import hashlib
import re

from monitor.simulator.errors import recorded
from monitor.simulator.tenant import Json, SimTenant

RECORDED_CLIENT_ID = "3d7e133b-9537-49e5-9006-1408cda46f55"  # from the AADSTS7000215 body
RECORDED_VULN_MACHINE = "6dd3f7ce1291c2ccd7a1da22f0934bca93ee2e24"

# Description keyword -> (productVendor, productName); first match wins. The recording has no
# machinesVulnerabilities answer, so the product of each CVE is read from its description.
_PRODUCT_HINTS: tuple[tuple[str, str, str], ...] = (
    (r"\bcurl\b|libcurl", "haxx", "curl"),
    (r"\bbind\b|`named`|\bdns\b", "isc", "bind9"),
    (r"grub2", "gnu", "grub2"),
    (r"\bcpio\b", "gnu", "cpio"),
    (r"http/2", "nghttp2", "nghttp2"),
    (r"openssl", "openssl", "openssl"),
    (r"\bexim\b", "exim", "exim4"),
    (r"\bglib\b", "gnome", "glib2.0"),
    (r"openssh|\bssh\b", "openbsd", "openssh"),
    (r"mariadb", "mariadb", "mariadb"),
    (r"kerberos", "mit", "krb5"),
    (r"d-bus", "freedesktop", "dbus"),
    (r"gnu tar", "gnu", "tar"),
    (r"mysql", "oracle", "mysql"),
    (r"ncurses", "gnu", "ncurses"),
    (r"libuv", "libuv", "libuv1"),
    (r"json-c", "json-c", "json-c"),
    (r"\bperl\b", "perl", "perl"),
    (r"file software", "file_project", "file"),
)


def _product_for(cve: Json) -> Json:
    text = str(cve.get("description") or "").lower()
    vendor, name = "gnu", "glibc"  # CVE-2023-4911 (empty description) is glibc's "Looney Tunables"
    for pattern, v, n in _PRODUCT_HINTS:
        if re.search(pattern, text):
            vendor, name = v, n
            break
    h = hashlib.sha256(str(cve["id"]).encode()).digest()
    return {
        "productName": name,
        "productVendor": vendor,
        "productVersion": f"{h[0] % 10}.{h[1] % 40}.{h[2]}",
        "fixingKbId": None,
    }


def load_recorded_tenant(name: str | None = None) -> SimTenant:
    """The recorded tenant as it is: 1 organization, 38 users, 9 machines, 51 CVEs on one machine.

    The tenant id is the recorded organization's id (real tenants have org id == tenant id);
    the client id is the app named in the recorded AADSTS7000215 error; the secret is fresh.
    The recording has no logon users, so every machine has none (add some with
    `add_logon_user`). Each CVE gets one product, so machinesVulnerabilities has 51 items.
    """
    org = copy.deepcopy(recorded("graph_organization.json")["value"][0])
    tenant = SimTenant(
        tenant_id=org["id"], client_id=RECORDED_CLIENT_ID, organization=org, name=name
    )
    for user in copy.deepcopy(recorded("graph_users.json")["value"]):
        tenant.users[user["id"]] = user
    for machine in copy.deepcopy(recorded("mde_machines.json")["value"]):
        tenant.machines[machine["id"]] = machine
        tenant.machine_vulns[machine["id"]] = []
        tenant.logon_users[machine["id"]] = []
    vulns = recorded(f"mde_machine_vulnerabilities_{RECORDED_VULN_MACHINE}.json")["value"]
    for cve in copy.deepcopy(vulns):
        tenant.cves[cve["id"]] = cve
        tenant.cve_products[cve["id"]] = [_product_for(cve)]
    tenant.machine_vulns[RECORDED_VULN_MACHINE] = [c["id"] for c in vulns]
    return tenant
