"""Generated tenants in the shapes of the recorded responses, deterministic by seed."""

from __future__ import annotations

import hashlib
import random
import uuid
from bisect import bisect_right
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from itertools import accumulate

from monitor.simulator.directory import populate_directory
from monitor.simulator.tenant import ODATA_VULN_TYPE, FastRandom, Json, SimTenant, iso

DEFAULT_BASE_TIME = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)

COMPANIES = (
    "Contoso",
    "Fabrikam",
    "Northwind Traders",
    "Tailspin Toys",
    "Woodgrove Bank",
    "Adatum",
    "Litware",
    "Proseware",
    "Wingtip Toys",
    "Alpine Ski House",
    "Coho Winery",
    "Lamna Healthcare",
    "Relecloud",
    "Trey Research",
    "Fourth Coffee",
    "Humongous Insurance",
)
GIVEN = [
    "Alex",
    "Avery",
    "Blake",
    "Casey",
    "Dana",
    "Drew",
    "Elliot",
    "Emery",
    "Finley",
    "Frankie",
    "Gray",
    "Harper",
    "Hayden",
    "Jamie",
    "Jordan",
    "Jules",
    "Kai",
    "Kendall",
    "Lee",
    "Logan",
    "Morgan",
    "Noel",
    "Oakley",
    "Parker",
    "Peyton",
    "Quinn",
    "Reese",
    "Riley",
    "Robin",
    "Rowan",
    "Sage",
    "Sam",
    "Skyler",
    "Taylor",
    "Teagan",
    "Toby",
    "Val",
    "Wren",
    "Ari",
    "Bailey",
    "Cameron",
    "Charlie",
    "Devon",
    "Eden",
    "Hollis",
    "Indigo",
    "Jesse",
    "Kit",
    "Lane",
    "Marley",
    "Nico",
    "Perry",
    "Rene",
    "Shay",
    "Sidney",
    "Tatum",
    "Umi",
    "Vic",
    "Winter",
    "Zion",
]
SURNAMES = [
    "Adler",
    "Baker",
    "Banda",
    "Chen",
    "Costa",
    "Dubois",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Haddad",
    "Hale",
    "Ibrahim",
    "Ito",
    "Jensen",
    "Kaur",
    "Kowalski",
    "Larsen",
    "Lopez",
    "Mensah",
    "Moreau",
    "Nakamura",
    "Novak",
    "Okafor",
    "Olsen",
    "Patel",
    "Petrov",
    "Quispe",
    "Rossi",
    "Sato",
    "Schmidt",
    "Silva",
    "Singh",
    "Sokolov",
    "Tanaka",
    "Torres",
    "Usman",
    "Varga",
    "Wagner",
    "Weber",
    "Xu",
    "Yamamoto",
    "Yilmaz",
    "Zhang",
    "Ahmed",
    "Brown",
    "Dias",
    "Evans",
    "Ferrari",
    "Gomez",
    "Hansen",
    "Ivanova",
    "Jones",
    "Kim",
    "Lindqvist",
    "Murphy",
    "Nguyen",
    "Ortiz",
]
JOB_TITLES = (
    "Engineer",
    "Senior Engineer",
    "Analyst",
    "Account Manager",
    "Accountant",
    "Designer",
    "HR Partner",
    "IT Administrator",
    "Security Analyst",
    "Sales Representative",
    "Support Specialist",
    "Product Manager",
    "Director",
    "Intern",
)
DEPARTMENTS = ("Engineering", "Finance", "HR", "IT", "Marketing", "Operations", "Sales", "Support")
OFFICES = ("Building 1", "Building 2", "Remote", "HQ 3rd floor", "Branch office")
CITIES = (("Seattle", "US"), ("London", "GB"), ("Berlin", "DE"), ("Paris", "FR"), ("Austin", "US"))

# osPlatform -> weight, version, osBuild, kind
PLATFORMS: tuple[tuple[str, int, tuple[str, ...], tuple[int | None, ...], str], ...] = (
    ("Windows11", 36, ("22H2", "23H2"), (22621, 22631), "client"),
    ("Windows10", 28, ("21H2", "22H2"), (19044, 19045), "client"),
    ("WindowsServer2022", 12, ("21H2",), (20348,), "server"),
    ("WindowsServer2019", 4, ("1809",), (17763,), "server"),
    ("Ubuntu", 12, ("20.4", "22.4"), (None,), "linux"),
    ("macOS", 8, ("13.6", "14.4"), (None,), "mac"),
)
_PLATFORM_WEIGHTS = [p[1] for p in PLATFORMS]

HEALTH = (
    ("Active", 85),
    ("Inactive", 9),
    ("ImpairedCommunication", 2),
    ("NoSensorData", 2),
    ("NoSensorDataImpairedCommunication", 2),
)
RISK = (("None", 30), ("Informational", 10), ("Low", 20), ("Medium", 25), ("High", 15))
EXPOSURE = (("None", 15), ("Low", 35), ("Medium", 35), ("High", 15))
ONBOARDING = (("Onboarded", 96), ("CanBeOnboarded", 2), ("InsufficientInfo", 1), ("Unsupported", 1))
TAGS = ("VIP", "Finance", "HR", "Engineering", "Kiosk", "Test-Device", "PCI", "Production")
LOGON_TYPES = (
    "Interactive",
    "RemoteInteractive",
    "Interactive, RemoteInteractive",
    "Network",
    "Interactive, Network",
    "Batch",
    "Service",
)

SEVERITIES = (("Low", 10), ("Medium", 40), ("High", 40), ("Critical", 10))
_SCORE_RANGE = {
    "Low": (1.0, 3.9),
    "Medium": (4.0, 6.9),
    "High": (7.0, 8.9),
    "Critical": (9.0, 10.0),
}
# (productVendor, productName, display name, Windows KB fixes it?)
PRODUCTS = (
    ("microsoft", "windows_11", "Windows 11", True),
    ("microsoft", "windows_10", "Windows 10", True),
    ("microsoft", "windows_server_2022", "Windows Server 2022", True),
    ("microsoft", "edge_chromium-based", "Microsoft Edge", False),
    ("microsoft", "office", "Microsoft Office", True),
    ("microsoft", ".net_framework", ".NET Framework", True),
    ("google", "chrome", "Google Chrome", False),
    ("mozilla", "firefox", "Mozilla Firefox", False),
    ("openssl", "openssl", "OpenSSL", False),
    ("haxx", "curl", "curl", False),
    ("isc", "bind", "ISC BIND", False),
    ("oracle", "jre", "Oracle Java SE", False),
    ("adobe", "acrobat_reader_dc", "Adobe Acrobat Reader DC", False),
    ("linux", "kernel", "the Linux kernel", False),
    ("apple", "macos", "macOS", False),
    ("zoom", "zoom", "Zoom", False),
    ("7-zip", "7-zip", "7-Zip", False),
    ("python", "python", "Python", False),
    ("openbsd", "openssh", "OpenSSH", False),
    ("gnu", "glibc", "GNU C Library", False),
)
FLAWS = (
    ("remote code execution", "execute arbitrary code", "Remote"),
    ("heap-based buffer overflow", "execute arbitrary code", "Remote"),
    ("elevation of privilege", "gain elevated privileges", "PrivilegeEscalation"),
    ("denial of service", "crash the service", "Dos"),
    ("information disclosure", "read sensitive information", "Remote"),
    ("security feature bypass", "bypass security checks", "Local"),
    ("use-after-free", "corrupt memory", "Local"),
)
_CVSS_VECTORS = (
    "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H/E:U/RL:O/RC:C",
    "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:U/C:H/I:H/A:H/E:P/RL:O/RC:C",
    "CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:H/A:H/E:U/RL:O/RC:C",
    "CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H/E:U/RL:O/RC:C",
    "CVSS:3.0/AV:N/AC:H/PR:N/UI:N/S:U/C:N/I:L/A:N/E:U/RL:O/RC:C",
    "CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:N/I:N/A:H/E:U/RL:O/RC:C",
)


_CUMULATIVE: dict[tuple[tuple[str, int], ...], tuple[list[str], list[int]]] = {}


def _pick(rng: random.Random, table: tuple[tuple[str, int], ...]) -> str:
    """A value from a (value, weight) table."""
    cum = _CUMULATIVE.get(table)
    if cum is None:
        cum = _CUMULATIVE[table] = (
            [t[0] for t in table],
            list(accumulate(t[1] for t in table)),
        )
    values, weights = cum
    return values[bisect_right(weights, rng.random() * weights[-1])]


def _z(ts: datetime) -> str:
    """Graph-style UTC timestamp without fractions: 2024-03-26T02:42:32Z."""
    return ts.isoformat(timespec="seconds")[:19] + "Z"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _slug(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _mac(rng: random.Random) -> bytes:
    return bytes([rng.choice((0x00, 0x60, 0x7C, 0xA4, 0x3C)), *rng.randbytes(5)])


def _link_local(mac: bytes) -> str:
    """IPv6 link-local address derived from a MAC (EUI-64), as the recorded machines show."""
    b = bytes([mac[0] ^ 0x02, *mac[1:3], 0xFF, 0xFE, *mac[3:]])
    groups = [f"{(b[i] << 8) | b[i + 1]:x}" for i in range(0, 8, 2)]
    return "fe80::" + ":".join(groups)


def _subscription(domain: str, n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"sub{n}.{domain}"))


def make_organization(rng: random.Random, tenant_id: str, base: datetime) -> Json:
    """An organization object with the recorded fields."""
    company = rng.choice(COMPANIES)
    slug = f"{_slug(company)}{rng.randint(100, 999)}"
    return {
        "id": tenant_id,
        "deletedDateTime": None,
        "businessPhones": ["+1 425 555 0100"],
        "city": "Seattle",
        "country": None,
        "countryLetterCode": "US",
        "createdDateTime": _z(base - timedelta(days=rng.randint(400, 3000))),
        "defaultUsageLocation": None,
        "displayName": company,
        "isMultipleDataLocationsForServicesEnabled": None,
        "marketingNotificationEmails": [],
        "onPremisesLastSyncDateTime": None,
        "onPremisesSyncEnabled": None,
        "partnerTenantType": None,
        "postalCode": "98052",
        "preferredLanguage": "en",
        "securityComplianceNotificationMails": [],
        "securityComplianceNotificationPhones": [],
        "state": "WA",
        "street": "1 Example Way",
        "technicalNotificationMails": [f"security-team@{slug}.example.com"],
        "tenantType": "AAD",
        "directorySizeQuota": {"used": 0, "total": 300000},
        "assignedPlans": [
            {
                "assignedDateTime": _z(base - timedelta(days=rng.randint(30, 300))),
                "capabilityStatus": "Enabled",
                "service": "WindowsDefenderATP",
                "servicePlanId": "871d91ec-ec1a-452b-a83f-bd76c7d770ef",
            }
        ],
        "onPremisesSyncStatus": [],
        "privacyProfile": {"contactEmail": "", "statementUrl": ""},
        "provisionedPlans": [],
        "verifiedDomains": [
            {
                "capabilities": "Email, OfficeCommunicationsOnline",
                "isDefault": True,
                "isInitial": True,
                "name": f"{slug}.onmicrosoft.com",
                "type": "Managed",
            }
        ],
    }


def make_machine(rng: random.Random, domain: str, base: datetime) -> Json:
    """A Defender machine in the recorded shape (GET /api/machines item)."""
    platform, _, versions, builds, kind = rng.choices(PLATFORMS, weights=_PLATFORM_WEIGHTS)[0]
    vi = rng.randrange(len(versions))
    version, build = versions[vi], builds[min(vi, len(builds) - 1)]
    health = _pick(rng, HEALTH)
    ad_domain = "corp." + domain.split(".")[0] + ".com"
    tail = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=7))
    if kind == "client":
        host = f"{rng.choice(('desktop', 'laptop'))}-{tail}.{ad_domain}"
    elif kind == "server":
        role = rng.choice(("app", "sql", "file", "dc", "web", "print"))
        host = f"srv-{role}-{rng.randint(1, 999):03d}.{ad_domain}"
    elif kind == "linux":
        host = f"{rng.choice(('web', 'db', 'build', 'k8s-node', 'cache'))}-{tail[:4]}.internal"
    else:
        host = f"{rng.choice(GIVEN).lower()}s-macbook-{tail[:4]}"
    first = base - timedelta(days=rng.randint(10, 700), seconds=rng.random() * 86400)
    if health == "Active":
        last = base - timedelta(seconds=rng.random() * 3 * 86400)
    else:
        last = base - timedelta(days=rng.randint(8, 60), seconds=rng.random() * 86400)
    last = max(last, first)
    ipv4 = f"10.{rng.randint(0, 40)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
    mac = _mac(rng)
    windows = kind in ("client", "server")
    nic_type = "Other" if not windows else rng.choice(("Ethernet", "Ethernet", "Wireless80211"))
    loop_type = "SoftwareLoopback" if windows else "Other"
    ips: list[Json] = [
        {"ipAddress": ipv4, "macAddress": mac.hex().upper(), "type": nic_type,
         "operationalStatus": "Up"},
        {"ipAddress": _link_local(mac), "macAddress": mac.hex().upper(), "type": nic_type,
         "operationalStatus": "Up"},
        {"ipAddress": "127.0.0.1", "macAddress": "000000000000", "type": loop_type,
         "operationalStatus": "Up"},
        {"ipAddress": "::1", "macAddress": "000000000000", "type": loop_type,
         "operationalStatus": "Up"},
    ]  # fmt: skip
    vm: Json | None = None
    if kind in ("server", "linux") and rng.random() < 0.7:
        sub = _subscription(domain, rng.randint(0, 2))
        name = host.split(".")[0]
        vm = {
            "vmId": _uuid(rng),
            "cloudProvider": "Azure",
            "resourceId": f"/subscriptions/{sub}/resourceGroups/rg-{rng.choice(DEPARTMENTS).lower()}"
            f"/providers/Microsoft.Compute/virtualMachines/{name}",
            "subscriptionId": sub,
        }
    if windows:
        agent = f"10.{rng.choice((8560, 8672, 8760))}.{build}.{rng.randint(1000, 4400)}"
        av = _pick(rng, (("Updated", 80), ("NotUpdated", 15), ("Disabled", 5)))
    elif kind == "linux":
        agent = f"30.124{rng.randint(1, 6):02d}2.{rng.randint(1, 19999)}.0"
        av = _pick(rng, (("Updated", 70), ("NotUpdated", 20), ("NotSupported", 10)))
    else:
        agent = f"101.24{rng.randint(1, 6):02d}2.{rng.randint(1, 9999):04d}"
        av = _pick(rng, (("Updated", 80), ("NotUpdated", 20)))
    aad = kind == "client" and rng.random() < 0.8
    rbac_id, rbac_name = rng.choice(
        ((0, None), (0, None), (101, "Workstations") if kind == "client" else (102, "Servers"))
    )
    managed = (
        _pick(rng, (("Intune", 70), ("ConfigMgr", 15), ("Unknown", 15)))
        if kind == "client"
        else "Unknown"
    )
    return {
        "id": f"{rng.getrandbits(160):040x}",
        "mergedIntoMachineId": None,
        "isPotentialDuplication": rng.random() < 0.01,
        "isExcluded": False,
        "exclusionReason": None,
        "computerDnsName": host,
        "firstSeen": iso(first),
        "lastSeen": iso(last),
        "osPlatform": platform,
        "osVersion": None,
        "osProcessor": "ARM64" if kind == "mac" and rng.random() < 0.6 else "x64",
        "version": version,
        "lastIpAddress": ipv4,
        "lastExternalIpAddress": (
            f"{rng.choice(('203.0.113', '198.51.100', '192.0.2'))}.{rng.randint(1, 254)}"
            if rng.random() < 0.9
            else None
        ),
        "agentVersion": agent,
        "osBuild": build,
        "healthStatus": health,
        "deviceValue": _pick(rng, (("Normal", 90), ("High", 8), ("Low", 2))),
        "rbacGroupId": rbac_id,
        "rbacGroupName": rbac_name,
        "riskScore": _pick(rng, RISK),
        "exposureLevel": _pick(rng, EXPOSURE),
        "isAadJoined": aad if windows else None,
        "aadDeviceId": _uuid(rng) if aad else None,
        "machineTags": sorted(rng.sample(TAGS, rng.randint(1, 2))) if rng.random() < 0.3 else [],
        "defenderAvStatus": av,
        "onboardingStatus": _pick(rng, ONBOARDING),
        "osArchitecture": "64-bit",
        "managedBy": managed,
        "managedByStatus": "Success" if managed != "Unknown" else "Unknown",
        "ipAddresses": ips,
        "vmMetadata": vm,
    }


def make_user(
    rng: random.Random, domain: str, index: int, base: datetime, used: set[str] | None = None
) -> Json:
    """A Graph user: the default fields first (as recorded), then the ones only $select returns."""
    given, surname = rng.choice(GIVEN), rng.choice(SURNAMES)
    local = f"{given}.{surname}"
    if used is not None:
        if local.lower() in used:
            local = f"{local}{index}"
        used.add(local.lower())
    else:
        local = f"{local}{index}"
    guest = rng.random() < 0.05
    city, country = rng.choice(CITIES)
    if guest:
        ext = rng.choice(("example.com", "example.org", "example.net"))
        upn = f"{local.lower()}_{ext}#EXT#@{domain}"
        mail: str | None = f"{local.lower()}@{ext}"
    else:
        upn = f"{local}@{domain}"
        mail = upn if rng.random() < 0.85 else None
    created = base - timedelta(days=rng.randint(1, 1500), seconds=rng.randint(0, 86399))
    return {
        "businessPhones": [f"+1 425 555 {rng.randint(0, 9999):04d}"] if rng.random() < 0.4 else [],
        "displayName": f"{given} {surname}",
        "givenName": None if guest else given,
        "jobTitle": None if guest else rng.choice(JOB_TITLES),
        "mail": mail,
        "mobilePhone": f"+1 206 555 {rng.randint(0, 9999):04d}" if rng.random() < 0.3 else None,
        "officeLocation": None if guest else rng.choice(OFFICES),
        "preferredLanguage": rng.choice(("en-US", "en-GB", None)),
        "surname": None if guest else surname,
        "userPrincipalName": upn,
        "id": _uuid(rng),
        "accountEnabled": rng.random() < 0.93,
        "userType": "Guest" if guest else "Member",
        "createdDateTime": _z(created),
        "department": None if guest else rng.choice(DEPARTMENTS),
        "companyName": None,
        "city": None if guest else city,
        "country": None if guest else country,
        "usageLocation": None if guest else country,
        "employeeId": None if guest else f"E{100000 + index}",
        "onPremisesSyncEnabled": None if guest or rng.random() < 0.5 else True,
        "lastPasswordChangeDateTime": _z(created + timedelta(days=rng.randint(0, 400))),
    }


def _account(user: Json | None, rng: random.Random) -> tuple[str, str]:
    """(accountName, SID) for a directory user (or a local service account)."""
    if user is None:
        name = rng.choice(("svc_backup", "svc_sql", "administrator", "localadmin"))
        key = f"{name}{rng.random()}"
    else:
        name = str(user["userPrincipalName"]).split("@")[0].split("#")[0].lower()[:20]
        key = str(user["id"])
    h = hashlib.sha256(key.encode()).digest()
    rid = 1000 + int.from_bytes(h[:3], "big") % 900000
    sid = (
        f"S-1-5-21-{int.from_bytes(h[3:7], 'big')}-{int.from_bytes(h[7:11], 'big')}"
        f"-{int.from_bytes(h[11:15], 'big')}-{rid}"
    )
    return name, sid


def make_logon_user(
    rng: random.Random,
    user: Json | None,
    domain: str,
    machine_id: str,
    base: datetime,
    count: int = 1,
    is_admin: bool | None = None,
    account: tuple[str, str] | None = None,
) -> Json:
    """A Defender logon user (GET /api/machines/{id}/logonusers item, documented shape)."""
    name, sid = account or _account(user, rng)
    account_domain = domain.split(".")[0].upper()[:15]
    first = base - timedelta(days=rng.randint(1, 300), seconds=rng.randint(0, 86399))
    last = max(first, base - timedelta(days=rng.randint(0, 7), seconds=rng.randint(0, 86399)))
    return {
        "id": f"{account_domain.lower()}\\{name}",
        "accountName": name,
        "accountDomain": account_domain,
        "accountSid": sid,
        "firstSeen": _z(first),
        "lastSeen": _z(last),
        "mostPrevalentMachineId": machine_id,
        "leastPrevalentMachineId": machine_id,
        "logonTypes": rng.choice(LOGON_TYPES),
        "logOnMachinesCount": count,
        "isDomainAdmin": is_admin if is_admin is not None else rng.random() < 0.03,
        "isOnlyNetworkUser": False,
    }


def make_cve(rng: random.Random, cve_id: str) -> tuple[Json, list[Json]]:
    """A PublicVulnerabilityDto (recorded shape) and the 1-2 products it affects."""
    severity = _pick(rng, SEVERITIES)
    lo, hi = _SCORE_RANGE[severity]
    products = rng.sample(PRODUCTS, 2 if rng.random() < 0.15 else 1)
    vendor, pname, display, kb = products[0]
    flaw, impact, exploit_type = rng.choice(FLAWS)
    year = int(cve_id.split("-")[1]) if cve_id.count("-") >= 2 else 2023
    published = datetime(min(max(year, 2000), 2024), 1, 1, tzinfo=UTC) + timedelta(
        days=rng.randint(0, 360)
    )
    updated = published + timedelta(days=rng.randint(1, 120), seconds=rng.randint(0, 86399))
    detected = published + timedelta(days=rng.randint(1, 60), seconds=rng.randint(0, 86399))
    public = rng.random() < 0.15
    verified = public and rng.random() < 0.4
    cve: Json = {
        "@odata.type": ODATA_VULN_TYPE,
        "id": cve_id,
        "name": cve_id,
        "description": (
            f"Summary: A {flaw} vulnerability exists in {display}. A"
            f" {'remote' if exploit_type == 'Remote' else 'local'} attacker could exploit it to"
            f" {impact}. Impact: successful exploitation could compromise the affected system."
            " Remediation: Apply the latest patches and updates provided by the respective"
            " vendors. Generated by simulator"
        ),
        "severity": severity,
        "cvssV3": round(rng.uniform(lo, hi), 1),
        "cvssVector": rng.choice(_CVSS_VECTORS),
        "exposedMachines": 0,
        "publishedOn": _z(published),
        "updatedOn": _z(updated),
        "firstDetected": _z(detected),
        "publicExploit": public,
        "exploitVerified": verified,
        "exploitInKit": verified and rng.random() < 0.3,
        "exploitTypes": [exploit_type] if rng.random() < 0.7 else [],
        "exploitUris": (
            [f"https://www.exploit-db.com/exploits/{rng.randint(10000, 52000)}"] if public else []
        ),
        "cveSupportability": "Supported",
    }
    out = []
    for vendor, pname, _, kb in products:
        out.append(
            {
                "productName": pname,
                "productVendor": vendor,
                "productVersion": (
                    f"{rng.randint(1, 120)}.{rng.randint(0, 9)}.{rng.randint(0, 9999)}"
                ),
                "fixingKbId": f"{rng.randint(5020000, 5039999)}" if kb else None,
            }
        )
    return cve, out


def _cve_ids(rng: random.Random, n: int) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        cve = f"CVE-{rng.randint(2016, 2024)}-{rng.randint(1000, 52999)}"
        if cve not in seen:
            seen.add(cve)
            out.append(cve)
    return out


def generate_tenant(
    machines: int = 100,
    users: int = 200,
    vulns_per_machine: int = 20,
    cves: int = 1000,
    logon_users_per_machine: int = 3,
    seed: int = 42,
    tenant_id: str | None = None,
    *,
    base_time: datetime | None = None,
    name: str | None = None,
    groups: int | None = None,
    large_groups: int = 0,
    roles: int = 8,
) -> SimTenant:
    """A tenant of the given size; the same arguments always give the same data.

    Every machine gets exactly `vulns_per_machine` distinct CVEs (capped at `cves`), so the
    tenant has machines * vulns_per_machine (machine, CVE) pairs; ~15% of CVEs affect two
    products, so machinesVulnerabilities returns a bit more items than pairs.
    """
    for label, value in (
        ("machines", machines),
        ("users", users),
        ("vulns_per_machine", vulns_per_machine),
        ("cves", cves),
        ("logon_users_per_machine", logon_users_per_machine),
    ):
        if value < 0:
            raise ValueError(f"{label} must be >= 0 (got {value})")
    rng = FastRandom(seed)
    base = base_time or DEFAULT_BASE_TIME
    tid = tenant_id or _uuid(rng)
    client_id = _uuid(random.Random(f"{seed}:{tid}:client"))
    org = make_organization(rng, tid, base)
    domain = org["verifiedDomains"][0]["name"]
    tenant = SimTenant(tenant_id=tid, client_id=client_id, organization=org, name=name, seed=seed)

    used: set[str] = set()
    for i in range(users):
        u = make_user(rng, domain, i, base, used)
        tenant.users[u["id"]] = u
    org["directorySizeQuota"]["used"] = users + machines // 2

    cve_ids = _cve_ids(rng, cves)
    for cve_id in cve_ids:
        tenant.cves[cve_id], tenant.cve_products[cve_id] = make_cve(rng, cve_id)

    k = min(vulns_per_machine, cves)
    n_cves = len(cve_ids)
    for _ in range(machines):
        m = make_machine(rng, domain, base)
        while m["id"] in tenant.machines:  # 160 random bits: never, but be exact
            m["id"] = f"{rng.getrandbits(160):040x}"
        tenant.machines[m["id"]] = m
        tenant.machine_vulns[m["id"]] = [cve_ids[j] for j in rng.sample(range(n_cves), k)]
        tenant.logon_users[m["id"]] = []

    _assign_logon_users(tenant, rng, logon_users_per_machine, domain, base)
    # groups (default: one per 20 users), roles, managers, on-premises SIDs: own random stream
    populate_directory(
        tenant,
        seed=seed,
        domain=domain,
        groups=users // 20 if groups is None else groups,
        large_groups=large_groups,
        roles=roles,
    )
    return tenant


def _assign_logon_users(
    tenant: SimTenant, rng: random.Random, per_machine: int, domain: str, base: datetime
) -> None:
    members = [u for u in tenant.users.values() if u.get("userType") != "Guest"]
    if per_machine == 0 or not tenant.machines:
        return
    per_user: dict[str, list[str]] = defaultdict(list)
    picks: dict[str, list[Json | None]] = {}
    for machine_id in tenant.machines:
        chosen: list[Json | None]
        chosen = list(rng.sample(members, min(per_machine, len(members)))) if members else [None]
        picks[machine_id] = chosen
        for u in chosen:
            if u is not None:
                per_user[u["id"]].append(machine_id)
    admins = {u["id"] for u in members if rng.random() < 0.03}
    accounts = {uid: _account(tenant.users[uid], rng) for uid in per_user}
    for machine_id, chosen in picks.items():
        entries: list[Json] = []
        for u in chosen:
            seen_on = per_user.get(u["id"], [machine_id]) if u else [machine_id]
            lu = make_logon_user(
                rng,
                u,
                domain,
                machine_id,
                base,
                count=len(seen_on),
                is_admin=(u["id"] in admins) if u else False,
                account=accounts[u["id"]] if u else None,
            )
            lu["mostPrevalentMachineId"] = seen_on[0] if len(seen_on) > 1 else None
            lu["leastPrevalentMachineId"] = seen_on[-1] if len(seen_on) > 1 else None
            entries.append(lu)
        tenant.logon_users[machine_id] = entries
