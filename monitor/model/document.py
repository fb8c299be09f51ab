"""`mde-monitor document`: the data-model Markdown, generated from monitor/model/schema.py only.

The three tables ("### Entities", "### Relationships", "### Mapped Relationships") are written
exactly as JupiterOne's `j1-integration document` and Prettier write them: every column as wide as
its longest cell, the header separator dashed to that width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monitor.model.schema import (
    ENTITY_TYPES,
    EXTENSION_ENTITY_TYPES,
    EXTENSION_RELATIONSHIP_TYPES,
    MAPPED_RELATIONSHIP_TYPES,
    RELATIONSHIP_TYPES,
    SCOPE_LOGON_USERS,
    SEED_ENTITY_TYPES,
    SEED_RELATIONSHIP_TYPES,
    TAG_ACCOUNT_NAME,
    EntityType,
    MappedRelationshipType,
    RelationshipType,
)

DATA_MODEL_HEADING = "## Data Model"
J1_MARKER_START = "<!-- {J1_DOCUMENTATION_MARKER_START} -->"
J1_MARKER_END = "<!-- {J1_DOCUMENTATION_MARKER_END} -->"
PROPERTIES_MARKER_START = "<!-- {MDE_PROPERTIES_MARKER_START} -->"
PROPERTIES_MARKER_END = "<!-- {MDE_PROPERTIES_MARKER_END} -->"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Prettier-formatted Markdown table (no trailing newline)."""
    widths = [len(h) for h in header]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, header has {len(header)}")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _code(text: str) -> str:
    return f"`{text}`"


def _entities(types: Sequence[EntityType]) -> str:
    rows = [
        [e.resource, _code(e.type), ", ".join(_code(c) for c in e.classes)]
        for e in sorted(types, key=lambda e: (e.resource, e.type))
    ]
    return markdown_table(["Resources", "Entity `_type`", "Entity `_class`"], rows)


def _relationships(types: Sequence[RelationshipType]) -> str:
    rows = [
        [_code(r.source.type), f"**{r.rel_class}**", _code(r.target.type)]
        for r in sorted(types, key=lambda r: (r.source.type, r.rel_class, r.target.type))
    ]
    return markdown_table(
        ["Source Entity `_type`", "Relationship `_class`", "Target Entity `_type`"], rows
    )


def _mapped(types: Sequence[MappedRelationshipType]) -> str:
    rows = [
        [_code(m.source.type), f"**{m.rel_class}**", _code(f"*{m.target_type}*"), m.direction]
        for m in sorted(types, key=lambda m: (m.source.type, m.rel_class, m.target_type))
    ]
    return markdown_table(
        ["Source Entity `_type`", "Relationship `_class`", "Target Entity `_type`", "Direction"],
        rows,
    )


def data_model_markdown() -> str:
    """The "## Data Model" section with its three tables, ending in one newline."""
    parts = [DATA_MODEL_HEADING, "### Entities", "The following entities are created:"]
    parts.append(_entities(SEED_ENTITY_TYPES))
    if SEED_RELATIONSHIP_TYPES:
        parts += ["### Relationships", "The following relationships are created:"]
        parts.append(_relationships(SEED_RELATIONSHIP_TYPES))
    if MAPPED_RELATIONSHIP_TYPES:
        parts += ["### Mapped Relationships", "The following mapped relationships are created:"]
        parts.append(_mapped(MAPPED_RELATIONSHIP_TYPES))
    return "\n\n".join(parts) + "\n"


def extract_data_model(text: str) -> str | None:
    """The "## Data Model" section of a Markdown file (up to the next `<!--` line or level-1/2
    heading), trailing blank lines dropped, ending in one newline; None when absent."""
    lines = text.splitlines()
    try:
        start = lines.index(DATA_MODEL_HEADING)
    except ValueError:
        return None
    end = start + 1
    while end < len(lines):
        ln = lines[end]
        if ln.startswith("<!--") or ln.startswith("# ") or ln.startswith("## "):
            break
        end += 1
    block = lines[start:end]
    while block and not block[-1].strip():
        block.pop()
    return "\n".join(block) + "\n"


EXTENSIONS_HEADING = "## Extensions of the seed model"


def extensions_markdown() -> str:
    """The identity extensions (issue 13): types beyond the seed's tables, in their own tables."""
    return (
        "\n\n".join(
            [
                EXTENSIONS_HEADING,
                "These types are not in the JupiterOne seed's tables above (which stay byte-equal"
                " to it);\nthey come from the identity mapping, the groups delta and the directory"
                " roles.",
                "### Extension entities",
                _entities(EXTENSION_ENTITY_TYPES),
                "### Extension relationships",
                _relationships(EXTENSION_RELATIONSHIP_TYPES),
            ]
        )
        + "\n"
    )


def _between(text: str, start: str, end: str) -> str | None:
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        return None
    return text[i + len(start) : j].strip("\n") + "\n"


def properties_markdown() -> str:
    """Per entity and relationship type: key, class, scope, volatile fields and properties."""
    sections: list[str] = []
    for e in sorted(ENTITY_TYPES, key=lambda e: (e.resource, e.type)):
        scope = f"{e.scope}:<machine id>" if e.scope == SCOPE_LOGON_USERS else e.scope
        facts = [
            f"`_key`: `{e.key_format}`",
            f"`_class`: {', '.join(_code(c) for c in e.classes)}",
            f"scope: `{scope}`",
        ]
        if e.volatile:
            facts.append("volatile: " + ", ".join(_code(v) for v in e.volatile))
        if e.keep_null:
            facts.append(
                "written as null when unknown: " + ", ".join(_code(v) for v in e.keep_null)
            )
        sections += [
            f"### {e.resource} (`{e.type}`)",
            " - ".join(facts),
            "Properties: " + ", ".join(_code(p) for p in e.properties),
        ]
    lines: list[str] = []
    for r in sorted(RELATIONSHIP_TYPES, key=lambda r: r.type):
        scope = f"{r.scope}:<machine id>" if r.scope == SCOPE_LOGON_USERS else r.scope
        line = f"- `{r.type}`: `_key` `<from>|{r.rel_class.lower()}|<to>`, scope `{scope}`"
        if r.properties:
            line += "; properties: " + ", ".join(_code(p) for p in r.properties)
        lines.append(line)
    for m in sorted(MAPPED_RELATIONSHIP_TYPES, key=lambda m: m.type):
        lines.append(
            f"- `{m.type}` (mapped, {m.direction}): `_key` "
            f"`<source>|{m.rel_class.lower()}|{m.direction}:_type={m.target_type}:_key=<target>`, "
            f"scope `{m.scope}`; the `{m.target_type}` target is matched on `_type` + `_key`"
        )
    sections += ["### Relationships", "\n".join(lines)]
    return "\n\n".join(sections) + "\n"


_INTRO = f"""\
# Data model

<!-- Generated by `mde-monitor document` from monitor/model/schema.py: do not edit by hand.
Regenerate with `mde-monitor document --output docs/data-model.md`. -->

The collected Microsoft objects become a JupiterOne-style graph of entities and relationships,
one per `_key`. Conventions:

- Entities carry `_key`, `_type`, `_class` (a list), `displayName`, `name`, their properties and
  `_rawData: [{{"name": "default", "rawData": <the Microsoft object>}}]` (ignored by the diff).
  With `tag_with_account_name: true` every entity also has `{TAG_ACCOUNT_NAME}` = the tenant name.
- A property whose value is unknown is left out, never written as `null` (JupiterOne's schemas
  want a string or a number where a value is given); the diff counts an absent field as null.
  Only the `Device` fields its class requires and allows as null (`category`, `deviceId`,
  `make`, `model`, `serial`) are always written.
- Times are epoch milliseconds in `...On` fields (`firstSeenOn`, `lastSeenOn`, `publishedOn`,
  `updatedOn`, `createdOn`, `firstDetectedOn`). Defender's "no date" `0001-01-01T00:00:00Z`
  counts as unknown.
- Relationships carry `_key` (`<from>|<class>|<to>`), `_type`, `_class`, `_fromEntityKey`,
  `_toEntityKey`, `displayName` (the class) and scalar properties only (lists are joined with
  `", "`). Mapped relationships carry `_mapping` instead of the two entity keys: the target
  (`cve`, `_key` = the lower-case CVE id) is matched on `_type` + `_key` and created when absent;
  it declares no `_class` (the `Vulnerability` class would require fields Defender does not give).
- Account: `name` / `displayName` are the organization's display name (the configured tenant name
  when it is unknown), `vendor` is `Microsoft Defender`.
- Machines: each Defender machine gives a `microsoft_defender_machine` (the agent) and a
  `user_endpoint` (the device). `ipAddress` lists the distinct interface IPs except loopback
  (127.0.0.0/8, ::1), sorted. `macAddress` lists the MACs of every interface except those in an
  explicit non-up `operationalStatus` (`Down`, `Testing`, `Dormant`, `NotPresent`,
  `LowerLayerDown`), of type `SoftwareLoopback` or on a loopback IP, and except the all-zero MAC,
  as `AA:BB:CC:DD:EE:FF`, sorted. Interfaces with status `Unknown` or null and type null are
  real and keep their MACs. The device's `ipAddresses` is Defender's list as is.
- Users: `active` is Graph's `accountEnabled` (absent when unknown); `businessPhones`,
  `mobilePhone` and `preferredLanguage` come from Graph as they are.
- Logon users: one entity per Defender logon-user `id`, shared by every machine that HAS it;
  fields come from the report of the smallest machine id, `firstSeenOn` / `lastSeenOn` are the
  earliest / latest over all reports; the entity belongs to that machine's
  `logon_users:<machine id>` scope.
- Vulnerabilities: one entity per CVE found on at least one machine (`epss` is Defender's EPSS
  score), one IDENTIFIED relationship per machine and CVE (`products`: the affected
  "vendor product version" strings, `fixingKbIds`: the fixing KBs, each joined with `", "`).
  A CVE missing from Defender's catalogue gets an entity with only its id and severity.
  Non-CVE ids (`TVM-...`) get no `cve` mapping.
- An item Microsoft sends that cannot be converted (no `id`, a malformed field) is left out and
  named in its scope's error (resource, index, reason); that scope keeps its previous data.
- Identity (extensions, see below): employees (`employee`, class `Person`) come from the
  directory (member users with an `employeeId` by default) and/or an HR export file; a user IS
  the employee with the same employee id, else e-mail, else UPN (case-insensitive,
  configurable); users that match none have `employeeMapped: false`. As JupiterOne's `Person`
  wants, an employee's `email` is a list and `firstName` / `lastName` are the directory's
  `givenName` / `surname` (absent for an HR-only record: never guessed). A logon user IS the
  directory user with its SID (`onPremisesSecurityIdentifier`), else its `accountName` +
  `accountDomain` (`onPremisesSamAccountName` + NetBIOS name), else its UPN, and gets
  `accountKind` `domain`, `local`, `service` or `unknown`. Groups come from `/groups/delta`
  (only changes after the first sync), activated directory roles from `/directoryRoles`.

"""


def document_markdown() -> str:
    """The whole docs/data-model.md."""
    return (
        _INTRO
        + J1_MARKER_START
        + "\n"
        + data_model_markdown()
        + "\n"
        + J1_MARKER_END
        + "\n\n"
        + extensions_markdown()
        + "\n## Properties\n\n"
        + PROPERTIES_MARKER_START
        + "\n"
        + properties_markdown()
        + PROPERTIES_MARKER_END
        + "\n"
    )


def check_document(text: str) -> list[str]:
    """What is out of date in a Markdown file's generated blocks ([] when up to date).

    The "## Data Model" tables must be present and equal; the property list is compared when
    the file has its markers.
    """
    problems: list[str] = []
    tables = extract_data_model(text)
    if tables is None:
        problems.append(f"no {DATA_MODEL_HEADING!r} section")
    elif tables != data_model_markdown():
        problems.append("the Data Model tables differ from the schema")
    props = _between(text, PROPERTIES_MARKER_START, PROPERTIES_MARKER_END)
    if props is not None and props != properties_markdown():
        problems.append("the property list differs from the schema")
    return problems


def schema_json() -> dict[str, Any]:
    """The declarations as JSON (for `mde-monitor document --json`)."""
    return {
        "entities": [
            {
                "resource": e.resource,
                "_type": e.type,
                "_class": list(e.classes),
                "key": e.key_format,
                "scope": e.scope,
                "short": e.short,
                "volatile": list(e.volatile),
                "properties": list(e.properties),
            }
            for e in ENTITY_TYPES
        ],
        "relationships": [
            {
                "_type": r.type,
                "_class": r.rel_class,
                "source": r.source.type,
                "target": r.target.type,
                "scope": r.scope,
                "short": r.short,
                "properties": list(r.properties),
            }
            for r in RELATIONSHIP_TYPES
        ],
        "mappedRelationships": [
            {
                "_type": m.type,
                "_class": m.rel_class,
                "source": m.source.type,
                "target": m.target_type,
                "targetClass": list(m.target_classes),
                "direction": m.direction,
                "scope": m.scope,
                "short": m.short,
            }
            for m in MAPPED_RELATIONSHIP_TYPES
        ],
    }
