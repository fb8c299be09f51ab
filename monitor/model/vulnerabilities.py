"""Vulnerabilities: Defender CVEs and machine/CVE pairs -> Finding entities and relationships.

Inputs are Defender's `PublicVulnerabilityDto` (`/api/vulnerabilities` or a machine's
`/api/machines/{id}/vulnerabilities`) and the bulk pairs of
`/api/vulnerabilities/machinesVulnerabilities` (`{id, cveId, machineId, fixingKbId, productName,
productVendor, productVersion, severity}`, several per machine/CVE when several products carry it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from monitor.model.schema import (
    MACHINE_IDENTIFIED_VULNERABILITY,
    VULNERABILITY,
    VULNERABILITY_IS_CVE,
    epoch_ms,
    require_str,
)

Item = dict[str, Any]

_CVE_ID = re.compile(r"^CVE-\d{4}-\d{4,}$", re.IGNORECASE)
NVD_DETAIL = "https://nvd.nist.gov/vuln/detail/"


def is_cve_id(value: str) -> bool:
    """True for `CVE-YYYY-NNNN...` (Defender also lists non-CVE ids such as `TVM-2020-0002`)."""
    return bool(_CVE_ID.match(value))


def nvd_link(cve_id: str) -> str | None:
    """The NVD page of a CVE (upper-case id); None for a non-CVE id."""
    return f"{NVD_DETAIL}{cve_id.upper()}" if is_cve_id(cve_id) else None


def _number(value: object) -> float | int | None:
    """A JSON number (not a bool); None otherwise."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def vulnerability_entity(
    cve: Mapping[str, Any], *, on_machine: bool = False, account_tag: str | None = None
) -> Item:
    """One `PublicVulnerabilityDto` as a `microsoft_defender_vulnerability` (Finding) entity.

    `open` is `exposedMachines > 0`, or True when the CVE was found on a machine (`on_machine`).
    The key uses the id upper-cased, as Defender writes it.
    """
    cve_id = require_str(cve, "vulnerability").upper()
    get = cve.get
    exposed = get("exposedMachines")
    score = _number(get("cvssV3"))
    raw_name = get("name")
    name = raw_name if isinstance(raw_name, str) and raw_name else cve_id
    properties = {
        "id": cve_id,
        "description": get("description"),
        "severity": get("severity"),
        "score": score,
        "numericSeverity": score,
        "cvssVector": get("cvssVector"),
        "publishedOn": epoch_ms(get("publishedOn")),
        "updatedOn": epoch_ms(get("updatedOn")),
        "firstDetectedOn": epoch_ms(get("firstDetected")),
        "exposedMachines": exposed,
        "open": on_machine or (isinstance(exposed, int) and exposed > 0),
        "public": get("publicExploit"),
        "exploitVerified": get("exploitVerified"),
        "exploitInKit": get("exploitInKit"),
        "exploitTypes": get("exploitTypes"),
        "references": get("exploitUris"),
        "category": "",
        "blocking": False,
        "production": False,
        "cveSupportability": get("cveSupportability"),
        "epss": _number(get("epss")),
        "webLink": nvd_link(cve_id),
    }
    return VULNERABILITY.entity(cve_id, name, properties, raw=cve, account_tag=account_tag)


def vulnerability_entity_from_pair(
    cve_id: str, severity: str | None, *, account_tag: str | None = None
) -> Item:
    """The entity of a CVE seen only in machine/CVE pairs (absent from `/api/vulnerabilities`).

    Only the id and severity are known: everything else is None, `open` is True, and
    `_rawData` holds `{"id", "severity"}`.
    """
    cve_id = cve_id.upper()
    return vulnerability_entity(
        {"id": cve_id, "severity": severity}, on_machine=True, account_tag=account_tag
    )


def vulnerability_cve_relationship(vulnerability: Mapping[str, Any]) -> Item | None:
    """vulnerability IS cve (mapped: matches or creates the `cve` entity); None for non-CVE ids."""
    cve_id = str(vulnerability["id"]).upper()
    link = nvd_link(cve_id)
    if link is None:
        return None
    target = {
        "_key": cve_id.lower(),
        "id": cve_id,
        "name": cve_id,
        "displayName": cve_id,
        "score": vulnerability.get("score"),
        "references": [link],
        "webLink": link,
    }
    return VULNERABILITY_IS_CVE.relationship(vulnerability["_key"], target)


def pair_product(pair: Mapping[str, Any]) -> str | None:
    """ "vendor product version" of a machine/CVE pair (missing parts left out); None if empty."""
    parts = (pair.get("productVendor"), pair.get("productName"), pair.get("productVersion"))
    return " ".join(str(p).strip() for p in parts if p not in (None, "")).strip() or None


LIST_SEPARATOR = ", "  # relationship properties are scalars: lists are joined with it


def machine_vulnerability_relationship(
    machine_key: str,
    vulnerability_key: str,
    products: Iterable[str] = (),
    fixing_kb_ids: Iterable[str] = (),
) -> Item:
    """machine IDENTIFIED vulnerability, with the affected products and fixing KBs.

    JupiterOne relationships take scalar properties only: each list is sorted, deduplicated and
    joined with ", " (left out when empty).
    """
    return MACHINE_IDENTIFIED_VULNERABILITY.relationship(
        machine_key,
        vulnerability_key,
        {
            "products": LIST_SEPARATOR.join(sorted(set(products))) or None,
            "fixingKbIds": LIST_SEPARATOR.join(sorted(set(fixing_kb_ids))) or None,
        },
    )


def pairs_from_machine_vulnerabilities(
    machine_id: str, vulnerabilities: Iterable[Mapping[str, Any]]
) -> list[Item]:
    """Bulk-shaped pairs from one machine's `/vulnerabilities` list (no product or KB known)."""
    pairs: list[Item] = []
    for v in vulnerabilities:
        cve_id = require_str(v, "vulnerability")
        pairs.append(
            {
                "id": f"{machine_id}_{cve_id}_-_-_-",
                "cveId": cve_id,
                "machineId": machine_id,
                "fixingKbId": None,
                "productName": None,
                "productVendor": None,
                "productVersion": None,
                "severity": v.get("severity"),
            }
        )
    return pairs
