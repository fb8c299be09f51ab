"""Helpers for the alert tests: events in the docs/events.md shape, a recording sink, a clock."""

from __future__ import annotations

import logging
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from monitor.alerts.sinks.base import DeliveryError, Notification
from monitor.config import Settings
from monitor.events import stream
from monitor.events.envelope import Event, make_event

MACHINE_TYPE = "microsoft_defender_machine"


def machine(i: int, **props: Any) -> dict[str, Any]:
    """A machine entity as the model writes it (no _rawData)."""
    base: dict[str, Any] = {
        "_key": f"{MACHINE_TYPE}:{i:040x}",
        "_type": MACHINE_TYPE,
        "_class": ["HostAgent"],
        "id": f"{i:040x}",
        "displayName": f"vm{i}.contoso.local",
        "name": f"vm{i}.contoso.local",
        "healthStatus": "Active",
        "riskScore": "Low",
        "exposureLevel": "Low",
        "defenderAvStatus": "Updated",
        "onboardingStatus": "Onboarded",
        "machineTags": [],
        "osPlatform": "Windows11",
    }
    base.update(props)
    return base


def entity_event(
    type: str,
    entity: dict[str, Any],
    changes: dict[str, Any] | None = None,
    *,
    tenant: str = "contoso",
    generation: int = 1,
    before: dict[str, Any] | None = None,
    time: str | None = None,
) -> Event:
    """An entity event: data.changes/entity(/before) as docs/events.md describes."""
    data: dict[str, Any] = {
        "entityType": entity.get("_type", MACHINE_TYPE),
        "entityClass": entity.get("_class", ["HostAgent"]),
        "key": entity["_key"],
        "displayName": entity.get("displayName"),
        "changes": changes or {},
        "entity": entity,
    }
    if before is not None:
        data["before"] = before
    return make_event(
        tenant=tenant,
        type=type,
        subject=entity["_key"],
        generation=generation,
        data=data,
        time=time,
    )


def change_event(
    type: str,
    i: int,
    field: str,
    old: Any,
    new: Any,
    *,
    tenant: str = "contoso",
    generation: int = 1,
    **props: Any,
) -> Event:
    """A machine event changing one field from old to new."""
    after = machine(i, **{field: new}, **props)
    before = machine(i, **{field: old}, **props)
    return entity_event(
        type,
        after,
        {field: {"old": old, "new": new}},
        tenant=tenant,
        generation=generation,
        before=before,
    )


def relationship_event(
    type: str,
    source: dict[str, Any],
    target: dict[str, Any],
    rel_type: str,
    rel_class: str,
    *,
    tenant: str = "contoso",
    generation: int = 1,
) -> Event:
    key = f"{source['_key']}|{rel_class.lower()}|{target['_key']}"
    rel = {
        "_key": key,
        "_type": rel_type,
        "_class": rel_class,
        "_fromEntityKey": source["_key"],
        "_toEntityKey": target["_key"],
        "displayName": rel_class,
    }
    return make_event(
        tenant=tenant,
        type=type,
        subject=key,
        generation=generation,
        data={
            "relationshipType": rel_type,
            "relationshipClass": rel_class,
            "key": key,
            "displayName": f"{source['displayName']} {rel_class} {target['displayName']}",
            "changes": {},
            "entity": rel,
            "source": source,
            "target": target,
        },
    )


def vulnerability(cve: str, severity: str = "High", public: bool = False) -> dict[str, Any]:
    return {
        "_key": f"microsoft_defender_vulnerability:{cve}",
        "_type": "microsoft_defender_vulnerability",
        "_class": ["Finding"],
        "id": cve,
        "displayName": cve,
        "name": cve,
        "severity": severity,
        "score": 9.8 if severity == "Critical" else 7.5,
        "public": public,
    }


def logon_user(name: str, admin: bool = False) -> dict[str, Any]:
    return {
        "_key": f"microsoft_defender_logon_user:{name}",
        "_type": "microsoft_defender_logon_user",
        "_class": ["User"],
        "id": name,
        "displayName": name,
        "name": name,
        "domain": "CONTOSO",
        "isDomainAdmin": admin,
    }


def user(uid: str, enabled: bool = True) -> dict[str, Any]:
    return {
        "_key": f"microsoft_defender_user:{uid}",
        "_type": "microsoft_defender_user",
        "_class": ["User"],
        "id": uid,
        "displayName": f"User {uid}",
        "userPrincipalName": f"{uid}@contoso.com",
        "accountEnabled": enabled,
    }


def sync_event(
    type: str, data: dict[str, Any], tenant: str = "contoso", generation: int = 1
) -> Event:
    return make_event(tenant=tenant, type=type, subject=tenant, generation=generation, data=data)


def publish(client: redis.Redis, prefix: str, events: list[Event], tenant: str = "contoso") -> None:
    """Append events to the tenant and all-tenants streams, as the detect stage does."""
    pipe = client.pipeline(transaction=True)
    stream.append(pipe, prefix, tenant, events, maxlen=1_000_000, retention_days=30)
    pipe.execute()


def settings_for(redis_url: str, prefix: str, alerts_dir: Path) -> Settings:
    return Settings(redis_url=redis_url, redis_prefix=prefix, alerts_dir=alerts_dir)


def write_alerts(directory: Path, rules: str, sinks: str | None = None) -> Path:
    """A rule file (and sinks.yaml) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yaml").write_text(textwrap.dedent(rules))
    if sinks is None:
        sinks = """
            delivery: {backoff_base: 10ms, backoff_max: 50ms, jitter: 0}
            sinks:
              rec: {type: stdout}
            """
    (directory / "sinks.yaml").write_text(textwrap.dedent(sinks))
    return directory


class RecordingSink:
    """A sink that records notifications; `fail_with` raises the queued errors first."""

    type = "recording"

    def __init__(self, name: str = "rec") -> None:
        self.name = name
        self.sent: list[Notification] = []
        self.fail_with: list[DeliveryError] = []
        self._cond = threading.Condition()

    def describe(self) -> str:
        return f"recording sink {self.name}"

    def send(self, notification: Notification) -> None:
        with self._cond:
            if self.fail_with:
                raise self.fail_with.pop(0)
            self.sent.append(notification)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Notification]:
        """The first `n` notifications, waiting up to `timeout` seconds for them."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.sent) >= n, timeout):
                raise AssertionError(f"expected {n} notifications, got {len(self.sent)}")
            return list(self.sent[:n])


class FakeClock:
    """A clock tests advance by hand; `sleep` advances it instead of waiting."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


def pending_count(client: redis.Redis, prefix: str, group: str = "alerts") -> int:
    """Events the dispatcher's consumer group read but did not acknowledge."""
    info: Any = client.xpending(stream.stream_key(prefix), group)
    return int(info["pending"])


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI's callback configures logging globally: put everything back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = ("httpx", "httpcore", "msal", "urllib3")
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)
