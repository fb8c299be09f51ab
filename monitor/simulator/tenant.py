"""A simulated tenant: its app registration, directory and Defender data, and the ways to change it.

All mutation goes through the methods below (they take the tenant lock and invalidate the caches
the HTTP handlers use). If you change the public dicts directly, call `changed()` afterwards.
Items are replaced, never edited in place, so a page being served never sees half an update (and
`/users/delta`, which logs every write to `users`, sees every change).
"""

from __future__ import annotations

import random
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from monitor.simulator.certs import ClientCertificate, make_client_certificate
from monitor.simulator.directory import DIRECTORY_OPS, DirectoryMixin, SimDirectory
from monitor.simulator.users_delta import UserTable

if TYPE_CHECKING:
    from _typeshed import SupportsLenAndGetItem

GRAPH_ROLES = ("Organization.Read.All", "Directory.Read.All")
# the seed's Defender permissions, granted to every simulated tenant by default ...
SEED_DEFENDER_ROLES = ("Machine.Read.All", "User.Read.All", "Vulnerability.Read.All")
SEED_ROLES = GRAPH_ROLES + SEED_DEFENDER_ROLES
# ... and the opt-in one `logon_users: hunting` needs (set_roles / tenant.roles.add to grant it)
HUNTING_ROLE = "AdvancedQuery.Read.All"
DEFENDER_ROLES = (*SEED_DEFENDER_ROLES, HUNTING_ROLE)
ALL_ROLES = GRAPH_ROLES + DEFENDER_ROLES

# Operations the admin API may call by name (`{"op": ..., "args": {...}}`).
MUTATION_OPS = (
    "set_machine",
    "add_machine",
    "remove_machine",
    "set_user",
    "add_user",
    "remove_user",
    "set_manager",
    "expire_user_delta_tokens",
    "add_logon_user",
    "remove_logon_user",
    "add_machine_vuln",
    "remove_machine_vuln",
    "set_cve",
    "touch_all_machines",
    "set_roles",
    "set_graph_short_pages",
    "set_client_secret",
    "set_behaviour",
    "summary",
    *DIRECTORY_OPS,
)

# What real tenants do that a tidy simulator would not; switched per tenant (`set_behaviour`).
BEHAVIOUR_KNOBS = (
    "defender_page_size",
    "defender_next_link",
    "next_link_origin",
    "odata_count",
    "short_lists",
    "catalogue_extra",
    # advanced hunting (monitor.simulator.hunting): table size and Microsoft's limits
    "hunting_events_per_logon",
    "hunting_max_rows",
    "hunting_max_query_events",
    "hunting_cpu_events_per_hour",
)
_HUNTING_KNOBS = BEHAVIOUR_KNOBS[-4:]

ODATA_VULN_TYPE = "#microsoft.windowsDefenderATP.api.PublicVulnerabilityDto"

Json = dict[str, Any]
T = TypeVar("T")


def iso(ts: datetime) -> str:
    """Defender-style UTC timestamp with microseconds: 2024-03-26T00:04:48.577193Z."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")[:26] + "Z"


class FastRandom(random.Random):
    """random.Random with cheaper randint/choice (float based); deterministic by seed."""

    def randint(self, a: int, b: int) -> int:
        return a + int(self.random() * (b - a + 1))

    def choice(self, seq: SupportsLenAndGetItem[T]) -> T:
        return seq[int(self.random() * len(seq))]


def parse_iso(text: str) -> datetime:
    """Parse the timestamps Microsoft sends (Z suffix, 0-7 fractional digits)."""
    text = text.rstrip("Z")
    if "." in text:
        main, frac = text.split(".", 1)
        text = f"{main}.{frac[:6]:0<6}"
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass(eq=False)
class SimTenant(DirectoryMixin):
    """One simulated Entra ID tenant with its app registration and data (dicts keyed by id)."""

    tenant_id: str
    client_id: str
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(30), repr=False)
    organization: Json = field(default_factory=dict)
    users: UserTable = field(default_factory=UserTable)  # writes logged for /users/delta
    machines: dict[str, Json] = field(default_factory=dict)
    logon_users: dict[str, list[Json]] = field(default_factory=dict)
    machine_vulns: dict[str, list[str]] = field(default_factory=dict)
    cves: dict[str, Json] = field(default_factory=dict)
    # Per CVE, the affected software: productName, productVendor, productVersion, fixingKbId.
    cve_products: dict[str, list[Json]] = field(default_factory=dict)
    roles: set[str] = field(default_factory=lambda: set(SEED_ROLES))
    # interactive sign-in (the console's OIDC flow): UPN -> group ids / app roles in the ID token
    sign_in_groups: dict[str, list[str]] = field(default_factory=dict)
    sign_in_roles: dict[str, list[str]] = field(default_factory=dict)
    certificate: ClientCertificate | None = None
    graph_short_pages: bool | None = None  # None: the simulator's default
    name: str | None = None  # config name; default derived by the simulator
    seed: int = 0
    # Defender list pages hold at most this many items (None: up to $top) ...
    defender_page_size: int | None = None
    # ... and point to the rest with a same-host @odata.nextLink (False: no link at all)
    defender_next_link: bool = True
    # nextLinks (Graph and Defender) point to this origin instead (a link to another host)
    next_link_origin: str | None = None
    # lists carry @odata.count (the true total, even when `short_lists` hides items)
    odata_count: bool = False
    # endpoint key -> items silently missing at the end of that list (short final page, no link)
    short_lists: dict[str, int] = field(default_factory=dict)
    # Microsoft's catalogue: this many more CVEs, on no machine of the tenant, in
    # /api/vulnerabilities (generated on the fly, so 250,000 cost no memory)
    catalogue_extra: int = 0
    # Advanced hunting's DeviceLogonEvents: logons behind each (machine, logon user), on average
    hunting_events_per_logon: int = 20
    # Microsoft's limits (one simulated event costs 1 us): rows per answer (the rest are cut),
    # events one query may scan (its 200 s), events per tenant and hour (10 minutes of CPU)
    hunting_max_rows: int = 100_000
    hunting_max_query_events: int = 200_000_000
    hunting_cpu_events_per_hour: int = 600_000_000
    directory: SimDirectory = field(default_factory=SimDirectory)  # groups, roles, managers

    def __post_init__(self) -> None:
        if not isinstance(self.users, UserTable):
            self.users = UserTable(self.users)
        self.lock = threading.RLock()
        self.version = 0  # bumped by every change
        self.vuln_version = 0  # bumped by changes that affect the vulnerability views
        self.state_dir: Path | None = None  # set by the Simulator the tenant is added to
        self._rng = FastRandom(f"{self.seed}:{self.tenant_id}:mutations")
        self._cache: dict[str, tuple[int, Any]] = {}

    def __repr__(self) -> str:
        return (
            f"SimTenant(tenant_id={self.tenant_id!r}, client_id={self.client_id!r},"
            f" users={len(self.users)}, machines={len(self.machines)},"
            f" cves={len(self.cves)}, pairs={self.pair_count()})"
        )

    # ---- bookkeeping -------------------------------------------------------------------

    def changed(self, vulns: bool = True) -> None:
        """Record a change made directly to the dicts (invalidates the served views)."""
        with self.lock:
            self.version += 1
            if vulns:
                self.vuln_version += 1

    def cached(self, key: str, build: Callable[[], T], vulns: bool = True) -> T:
        """`build()` once per data version (per vulnerability version when `vulns`)."""
        with self.lock:
            version = self.vuln_version if vulns else self.version
            hit = self._cache.get(key)
            if hit is not None and hit[0] == version:
                value: T = hit[1]
                return value
            value = build()
            self._cache[key] = (version, value)
            return value

    def pair_count(self) -> int:
        """Number of (machine, CVE) pairs."""
        return sum(len(v) for v in self.machine_vulns.values())

    def summary(self) -> Json:
        """Ids and sizes, no secret."""
        with self.lock:
            return {
                "tenant_id": self.tenant_id,
                "client_id": self.client_id,
                "name": self.name,
                "roles": sorted(self.roles),
                "certificate_thumbprint": self.certificate.thumbprint if self.certificate else None,
                "users": len(self.users),
                "machines": len(self.machines),
                "logon_users": sum(len(v) for v in self.logon_users.values()),
                "cves": len(self.cves),
                "machine_vulnerability_pairs": self.pair_count(),
            }

    def domain(self) -> str:
        """The tenant's default verified domain."""
        for d in self.organization.get("verifiedDomains") or []:
            if d.get("isDefault"):
                return str(d["name"])
        return f"{self.tenant_id[:8]}.onmicrosoft.com"

    def domains(self) -> list[str]:
        """All verified domain names (the token endpoint accepts them in place of the id)."""
        return [str(d["name"]) for d in self.organization.get("verifiedDomains") or []]

    # ---- derived views (cached) ---------------------------------------------------------

    def exposure(self) -> Counter[str]:
        """CVE id -> number of machines exposed to it."""

        def build() -> Counter[str]:
            counts: Counter[str] = Counter()
            for cve_ids in self.machine_vulns.values():
                counts.update(set(cve_ids))
            return counts

        return self.cached("exposure", build)

    def vulnerability_list(self) -> list[Json]:
        """The tenant's catalogue entries (also those on no machine now), exposedMachines set.

        /api/vulnerabilities serves these among `catalogue_extra` more (see catalogue_page).
        """

        def build() -> list[Json]:
            exposed = self.exposure()
            out = []
            for cve_id, cve in self.cves.items():
                item = {k: v for k, v in cve.items() if k != "@odata.type"}
                item["exposedMachines"] = exposed.get(cve_id, 0)
                out.append(item)
            return out

        return self.cached("vulnerability_list", build)

    def machine_vulnerability_list(self) -> list[Json]:
        """GET /api/vulnerabilities/machinesVulnerabilities: one item per machine, CVE, product."""

        def build() -> list[Json]:
            # Per CVE, precompute everything but the machine id (the list can be 300k+ items).
            parts: dict[str, list[tuple[str, Any, str, str, str, Any]]] = {}
            for cve_id, products in self.cve_products.items():
                severity = self.cves.get(cve_id, {}).get("severity")
                parts[cve_id] = [
                    (
                        f"-{cve_id}-{p['productName']}-{p['productVendor']}-{p['productVersion']}",
                        p.get("fixingKbId"),
                        p["productName"],
                        p["productVendor"],
                        p["productVersion"],
                        severity,
                    )
                    for p in products or [_UNKNOWN_PRODUCT]
                ]
            out: list[Json] = []
            append = out.append
            for machine_id, cve_ids in self.machine_vulns.items():
                if machine_id not in self.machines:
                    continue
                for cve_id in cve_ids:
                    rows = parts.get(cve_id)
                    if rows is None:
                        severity = self.cves.get(cve_id, {}).get("severity")
                        p = _UNKNOWN_PRODUCT
                        rows = parts[cve_id] = [
                            (
                                f"-{cve_id}-{p['productName']}-{p['productVendor']}-{p['productVersion']}",
                                None, p["productName"], p["productVendor"], p["productVersion"],
                                severity,
                            )
                        ]  # fmt: skip
                    for suffix, kb, name, vendor, version, severity in rows:
                        append(
                            {
                                "id": machine_id + suffix,
                                "cveId": cve_id,
                                "machineId": machine_id,
                                "fixingKbId": kb,
                                "productName": name,
                                "productVendor": vendor,
                                "productVersion": version,
                                "severity": severity,
                            }
                        )
            return out

        return self.cached("machine_vulnerability_list", build)

    def machine_vulnerabilities(self, machine_id: str) -> list[Json]:
        """GET /api/machines/{id}/vulnerabilities items (exposedMachines computed)."""
        with self.lock:
            exposed = self.exposure()
            out = []
            for cve_id in self.machine_vulns.get(machine_id, []):
                cve = self.cves.get(cve_id)
                if cve is not None:
                    out.append({**cve, "exposedMachines": exposed.get(cve_id, 0)})
            return out

    # ---- machines ------------------------------------------------------------------------

    def _get(self, items: dict[str, Json], kind: str, item_id: str) -> Json:
        try:
            return items[item_id]
        except KeyError:
            raise KeyError(f"tenant {self.tenant_id}: no {kind} {item_id!r}") from None

    def _update(self, items: dict[str, Json], kind: str, item_id: str, fields: Json) -> Json:
        with self.lock:
            old = self._get(items, kind, item_id)
            if "id" in fields and fields["id"] != item_id:
                raise ValueError(f"a {kind}'s id cannot be changed")
            items[item_id] = new = {**old, **fields}
            self.changed(vulns=False)
            return new

    def _machine(self, machine_id: str) -> Json:
        return self._get(self.machines, "machine", machine_id)

    def set_machine(self, machine_id: str, **fields: Any) -> Json:
        """Change some fields of a machine (e.g. healthStatus='Inactive'); returns the machine."""
        return self._update(self.machines, "machine", machine_id, fields)

    def add_machine(self, machine: Json | None = None) -> Json:
        """Add a machine (generated in the tenant's style when None); returns it."""
        from monitor.simulator.generate import make_machine

        with self.lock:
            if machine is None:
                machine = make_machine(self._rng, self.domain(), datetime.now(UTC))
            if not machine.get("id"):
                raise ValueError("a machine needs an 'id'")
            if machine["id"] in self.machines:
                raise ValueError(f"tenant {self.tenant_id}: machine {machine['id']!r} exists")
            self.machines[machine["id"]] = dict(machine)
            self.machine_vulns.setdefault(machine["id"], [])
            self.logon_users.setdefault(machine["id"], [])
            self.changed()
            return self.machines[machine["id"]]

    def remove_machine(self, machine_id: str) -> None:
        """Remove a machine with its logon users and vulnerabilities (offboarded)."""
        with self.lock:
            self._machine(machine_id)
            del self.machines[machine_id]
            self.machine_vulns.pop(machine_id, None)
            self.logon_users.pop(machine_id, None)
            self.changed()

    def touch_all_machines(self, at: datetime | None = None) -> None:
        """Move every machine's lastSeen forward (to `at`/now, or one second later)."""
        now = at or datetime.now(UTC)
        with self.lock:
            for mid, m in self.machines.items():
                last = m.get("lastSeen")
                new = now
                if last:
                    prev = parse_iso(last)
                    if prev >= now:
                        new = prev + timedelta(seconds=1)
                self.machines[mid] = {**m, "lastSeen": iso(new)}
            self.changed(vulns=False)

    # ---- users ---------------------------------------------------------------------------

    def _user(self, user_id: str) -> Json:
        return self._get(self.users, "user", user_id)

    def set_user(self, user_id: str, **fields: Any) -> Json:
        """Change some fields of a user (e.g. accountEnabled=False); returns the user."""
        return self._update(self.users, "user", user_id, fields)

    def add_user(self, user: Json | None = None) -> Json:
        """Add a directory user (generated when None); returns it."""
        from monitor.simulator.generate import make_user

        with self.lock:
            if user is None:
                user = make_user(self._rng, self.domain(), len(self.users), datetime.now(UTC))
            if not user.get("id"):
                raise ValueError("a user needs an 'id'")
            if user["id"] in self.users:
                raise ValueError(f"tenant {self.tenant_id}: user {user['id']!r} exists")
            self.users[user["id"]] = dict(user)
            self.changed(vulns=False)
            return self.users[user["id"]]

    def remove_user(self, user_id: str) -> None:
        """Delete a directory user."""
        with self.lock:
            self._user(user_id)
            del self.users[user_id]
            self.changed(vulns=False)

    def set_manager(self, user_id: str, manager_id: str | None = None) -> None:
        """Give a user a manager (another user's id), or take it away (None)."""
        with self.lock:
            self._user(user_id)
            managers = self.directory.managers
            if manager_id is not None:
                self._user(manager_id)
                if managers.get(user_id) == manager_id:
                    return
                managers[user_id] = manager_id
            elif user_id in managers:
                self.directory.former_managers[user_id] = managers.pop(user_id)
            else:
                return
            self.users.log.record(user_id, frozenset({"manager"}))
            self.changed(vulns=False)

    def expire_user_delta_tokens(self) -> None:
        """Every `/users/delta` token issued so far gets 410 syncStateNotFound from now on."""
        with self.lock:
            log = self.users.log
            log.floor = log.seq + 1
            log.seq += 1

    # ---- logon users ---------------------------------------------------------------------

    def add_logon_user(self, machine_id: str, logon_user: Json | None = None) -> Json:
        """Record an account logging on to a machine (generated when None); returns it."""
        from monitor.simulator.generate import make_logon_user

        with self.lock:
            self._machine(machine_id)
            current = self.logon_users.get(machine_id, [])
            if logon_user is None:
                users = list(self.users.values())
                user = self._rng.choice(users) if users else None
                logon_user = make_logon_user(
                    self._rng, user, self.domain(), machine_id, datetime.now(UTC)
                )
            if not logon_user.get("id"):
                raise ValueError("a logon user needs an 'id' (DOMAIN\\account)")
            if any(lu["id"] == logon_user["id"] for lu in current):
                raise ValueError(f"machine {machine_id}: logon user {logon_user['id']!r} exists")
            self.logon_users[machine_id] = [*current, dict(logon_user)]
            self.changed(vulns=False)
            return logon_user

    def remove_logon_user(self, machine_id: str, logon_user_id: str) -> None:
        """Remove one account from a machine's logon users."""
        with self.lock:
            current = self.logon_users.get(machine_id, [])
            kept = [lu for lu in current if lu["id"] != logon_user_id]
            if len(kept) == len(current):
                raise KeyError(f"machine {machine_id}: no logon user {logon_user_id!r}")
            self.logon_users[machine_id] = kept
            self.changed(vulns=False)

    # ---- vulnerabilities -----------------------------------------------------------------

    def add_machine_vuln(self, machine_id: str, cve_id: str) -> Json:
        """Identify a CVE on a machine (the CVE joins the catalogue if new); returns the CVE."""
        from monitor.simulator.generate import make_cve

        with self.lock:
            self._machine(machine_id)
            if cve_id not in self.cves:
                rng = FastRandom(f"{self.seed}:{cve_id}")
                self.cves[cve_id], self.cve_products[cve_id] = make_cve(rng, cve_id)
            current = self.machine_vulns.get(machine_id, [])
            if cve_id not in current:
                self.machine_vulns[machine_id] = [*current, cve_id]
            self.changed()
            return self.cves[cve_id]

    def remove_machine_vuln(self, machine_id: str, cve_id: str) -> None:
        """The CVE is no longer identified on the machine (the catalogue keeps it)."""
        with self.lock:
            current = self.machine_vulns.get(machine_id, [])
            if cve_id not in current:
                raise KeyError(f"machine {machine_id}: CVE {cve_id!r} not present")
            self.machine_vulns[machine_id] = [c for c in current if c != cve_id]
            self.changed()

    def set_cve(self, cve_id: str, **fields: Any) -> Json:
        """Change a catalogue entry (e.g. publicExploit=True, severity='Critical')."""
        with self.lock:
            try:
                old = self.cves[cve_id]
            except KeyError:
                raise KeyError(f"tenant {self.tenant_id}: no CVE {cve_id!r}") from None
            self.cves[cve_id] = new = {**old, **fields}
            self.changed()
            return new

    # ---- app registration ----------------------------------------------------------------

    def set_roles(self, roles: list[str] | set[str]) -> None:
        """Replace the granted application permissions (e.g. drop Machine.Read.All -> 403)."""
        unknown = set(roles) - set(ALL_ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; known: {list(ALL_ROLES)}")
        with self.lock:
            self.roles = set(roles)

    def set_graph_short_pages(self, enabled: bool | None) -> None:
        """Serve Graph pages shorter than $top (None: use the simulator's default)."""
        self.graph_short_pages = enabled

    def set_behaviour(self, **knobs: Any) -> Json:
        """Switch real-tenant behaviours (see BEHAVIOUR_KNOBS); returns the current values."""
        unknown = set(knobs) - set(BEHAVIOUR_KNOBS)
        if unknown:
            raise ValueError(
                f"unknown behaviour(s) {sorted(unknown)}; known: {', '.join(BEHAVIOUR_KNOBS)}"
            )
        size = knobs.get("defender_page_size")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError("defender_page_size must be a positive integer or null")
        extra = knobs.get("catalogue_extra", 0)
        if not isinstance(extra, int) or extra < 0:
            raise ValueError("catalogue_extra must be an integer >= 0")
        for name in _HUNTING_KNOBS:
            value = knobs.get(name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1")
        short = knobs.get("short_lists", {})
        if not isinstance(short, dict) or not all(
            isinstance(v, int) and v >= 0 for v in short.values()
        ):
            raise ValueError("short_lists must map endpoint keys to integers >= 0")
        with self.lock:
            for name, value in knobs.items():
                setattr(self, name, dict(value) if name == "short_lists" else value)
            self.changed()
            return {name: getattr(self, name) for name in BEHAVIOUR_KNOBS}

    def catalogue_size(self) -> int:
        """Entries of /api/vulnerabilities: the tenant's CVEs plus the extra catalogue."""
        return len(self.vulnerability_list()) + self.catalogue_extra

    def catalogue_page(self, skip: int, top: int) -> list[Json]:
        """/api/vulnerabilities[skip:skip+top]: half the extra entries, the tenant's, the rest."""
        own = self.vulnerability_list()
        before = self.catalogue_extra // 2
        out: list[Json] = []
        end = skip + top
        for i in range(skip, min(end, before)):
            out.append(extra_catalogue_entry(i))
        lo, hi = max(skip, before) - before, min(end, before + len(own)) - before
        if hi > lo:
            out.extend(own[lo:hi])
        after = before + len(own)
        for i in range(max(skip, after), min(end, after + self.catalogue_extra - before)):
            out.append(extra_catalogue_entry(i - len(own)))
        return out

    def set_client_secret(self, secret: str) -> None:
        """Rotate the app's client secret (old one now fails with AADSTS7000215)."""
        if not secret:
            raise ValueError("the client secret must not be empty")
        self.client_secret = secret

    def add_certificate(self, directory: Path | None = None) -> tuple[Path, str]:
        """Register a new certificate credential; returns (PEM path with key+cert, thumbprint)."""
        where = directory or self.state_dir
        if where is None:
            raise ValueError(
                "add_certificate needs a directory (or add the tenant to a Simulator first)"
            )
        path = Path(where) / f"client-{self.tenant_id}.pem"
        self.certificate = make_client_certificate(path, f"mde-monitor sim {self.client_id}")
        return path, self.certificate.thumbprint


_EXTRA_SEVERITIES = ("Low", "Medium", "High", "Critical")


def extra_catalogue_entry(i: int) -> Json:
    """The i-th catalogue CVE on no machine (6-digit numbers: never one of a tenant's CVEs)."""
    cve_id = f"CVE-{2000 + i % 25}-{100000 + i}"
    return {
        "id": cve_id,
        "name": cve_id,
        "description": f"Summary: catalogue entry {i} on no machine of this tenant.",
        "severity": _EXTRA_SEVERITIES[i % 4],
        "cvssV3": round(2.0 + (i % 80) / 10, 1),
        "cvssVector": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H/E:U/RL:O/RC:C",
        "exposedMachines": 0,
        "publishedOn": "2023-01-01T00:00:00Z",
        "updatedOn": "2023-02-01T00:00:00Z",
        "firstDetected": None,
        "publicExploit": False,
        "exploitVerified": False,
        "exploitInKit": False,
        "exploitTypes": [],
        "exploitUris": [],
        "cveSupportability": "Supported",
        "epss": None,
    }


_UNKNOWN_PRODUCT: Json = {
    "productName": "unknown",
    "productVendor": "unknown",
    "productVersion": "0.0",
    "fixingKbId": None,
}
