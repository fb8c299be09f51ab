"""Links a notification carries back to the console (`web.public_url`) and to Microsoft's portal:
the console page of each entity, of the rule, and the entity's Defender / Entra page."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from monitor.alerts import portal
from monitor.config import ConfigError, Settings
from monitor.events.envelope import Event

MAX_ENTITIES = 5


def _entity_like(ev: Event) -> dict[str, Any]:
    """What the portal module needs (`_type`, `id`) from an event about an entity."""
    data = ev.get("data") or {}
    ent = data.get("entity") if isinstance(data.get("entity"), dict) else {}
    assert isinstance(ent, dict)
    typ = ent.get("_type") or data.get("entityType")
    source_id = ent.get("id")
    subject = str(ev.get("subject") or "")
    if not source_id and typ and subject.startswith(f"{typ}:"):
        source_id = subject[len(typ) + 1 :]
    return {"_type": typ, "id": source_id}


def notification_links(settings: Settings, rule: str, events: list[Event]) -> dict[str, Any]:
    """`{"rule": url, "entities": [{"key", "console", "portal"}]}`; empty without public_url."""
    base = (settings.web.public_url or "").rstrip("/")
    if not base:
        return {}
    entities: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for ev in events:
        tenant = str((ev.get("data") or {}).get("tenant") or "")
        subject = str(ev.get("subject") or "")
        if not subject or (tenant, subject) in seen or "|" in subject:
            continue  # relationship subjects link through their machine's page
        seen.add((tenant, subject))
        try:
            cfg = settings.tenant(tenant) if tenant else None
        except ConfigError:
            cfg = None
        found = portal.links(_entity_like(ev), cfg)
        entities.append(
            {
                "key": subject,
                "console": f"{base}/entities/{quote(subject, safe='')}?tenant={quote(tenant, safe='')}",
                "portal": found[0]["url"] if found else None,
            }
        )
        if len(entities) >= MAX_ENTITIES:
            break
    return {"rule": f"{base}/alerts#rule-{quote(rule, safe='')}", "entities": entities}


def summary_lines(links: dict[str, Any]) -> str:
    """The links as plain text lines appended to a notification's summary."""
    if not links:
        return ""
    lines = []
    for e in links.get("entities", []):
        lines.append(f"Console: {e['console']}")
        if e.get("portal"):
            lines.append(f"Defender: {e['portal']}")
    lines.append(f"Rule: {links['rule']}")
    return "\n".join(lines)
