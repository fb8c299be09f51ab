"""The shipped rule pack (alerts/*.yaml): each rule fed a real event through the whole pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from alert_helpers import (
    FakeClock,
    RecordingSink,
    change_event,
    entity_event,
    logon_user,
    machine,
    publish,
    relationship_event,
    settings_for,
    sync_event,
    user,
    vulnerability,
)

from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.rules import load_rules

PACK = Path(__file__).resolve().parent.parent / "alerts"
VULN_REL = "microsoft_defender_machine_identified_vulnerability"
LOGON_REL = "microsoft_defender_machine_has_logon_user"

Event = dict[str, Any]


def vuln(kind: str, cve: str, severity: str, public: bool = False) -> Event:
    return relationship_event(
        f"mde.machine_vulnerability.{kind}",
        machine(1),
        vulnerability(cve, severity, public),
        VULN_REL,
        "IDENTIFIED",
    )


def logon(kind: str, name: str, admin: bool) -> Event:
    return relationship_event(
        f"mde.machine_logon_user.{kind}", machine(1), logon_user(name, admin), LOGON_REL, "HAS"
    )


def user_event(
    kind: str, uid: str = "u1", enabled: bool = True, changes: dict[str, Any] | None = None
) -> Event:
    return entity_event(f"mde.user.{kind}", user(uid, enabled), changes)


@dataclass
class Case:
    rule: str
    fire: list[Event]
    resolve: list[Event] = field(default_factory=list)
    ignore: list[Event] = field(default_factory=list)  # must neither fire nor resolve the rule
    title: str = ""


CASES = [
    Case(
        "machine-onboarded",
        [entity_event("mde.machine.created", machine(1))],
        ignore=[entity_event("mde.machine.deleted", machine(1))],
        title="New machine onboarded: vm1.contoso.local onboarded in contoso",
    ),
    Case(
        "machine-removed",
        [
            entity_event("mde.machine.deleted", machine(1)),
            # Defender has no "Offboarded": an offboarded machine leaves Onboarded
            change_event(
                "mde.machine.onboarding_changed",
                2,
                "onboardingStatus",
                "Onboarded",
                "CanBeOnboarded",
            ),
        ],
        resolve=[
            entity_event("mde.machine.created", machine(1), generation=2),
            change_event(
                "mde.machine.onboarding_changed",
                2,
                "onboardingStatus",
                "CanBeOnboarded",
                "Onboarded",
                generation=2,
            ),
        ],
        ignore=[
            change_event(  # a discovered device that was never onboarded
                "mde.machine.onboarding_changed",
                3,
                "onboardingStatus",
                "InsufficientInfo",
                "CanBeOnboarded",
            )
        ],
    ),
    Case(
        "machine-risk-high",
        [
            change_event("mde.machine.risk_raised", 1, "riskScore", "Medium", "High"),
            change_event("mde.machine.risk_raised", 2, "riskScore", "Low", "Critical"),
        ],
        resolve=[
            change_event("mde.machine.risk_lowered", 1, "riskScore", "High", "Low", generation=2)
        ],
        ignore=[
            change_event("mde.machine.risk_raised", 3, "riskScore", "Low", "Medium"),
            change_event(
                "mde.machine.risk_lowered", 2, "riskScore", "Critical", "High", generation=2
            ),
        ],
        title="2 machines at High/Critical risk in contoso",
    ),
    Case(
        "machine-exposure-high",
        [change_event("mde.machine.exposure_raised", 1, "exposureLevel", "Medium", "High")],
        resolve=[
            change_event(
                "mde.machine.exposure_lowered", 1, "exposureLevel", "High", "Medium", generation=2
            )
        ],
        ignore=[change_event("mde.machine.exposure_raised", 2, "exposureLevel", "Low", "Medium")],
        title="Machine exposure raised to High: vm1.contoso.local exposure raised to High in contoso",
    ),
    Case(
        "machine-sensor-unhealthy",
        [
            change_event("mde.machine.health_degraded", i, "healthStatus", "Active", s)
            for i, s in enumerate(["Inactive", "NoSensorData", "ImpairedCommunication"])
        ],
        resolve=[
            change_event(
                "mde.machine.health_recovered",
                0,
                "healthStatus",
                "Inactive",
                "Active",
                generation=2,
            )
        ],
    ),
    Case(
        "machine-av-unhealthy",
        [
            change_event(
                "mde.machine.av_status_changed", 1, "defenderAvStatus", "Updated", "NotUpdated"
            ),
            change_event(
                "mde.machine.av_status_changed", 2, "defenderAvStatus", "Updated", "Disabled"
            ),
        ],
        resolve=[
            change_event(
                "mde.machine.av_status_changed",
                1,
                "defenderAvStatus",
                "NotUpdated",
                "Updated",
                generation=2,
            )
        ],
        ignore=[
            change_event(
                "mde.machine.av_status_changed", 3, "defenderAvStatus", "Updated", "NotSupported"
            ),
            change_event(
                "mde.machine.av_status_changed", 4, "defenderAvStatus", "NotSupported", "Unknown"
            ),
        ],
    ),
    Case(
        "machine-vulnerability-critical",
        [
            vuln("identified", "CVE-2024-0001", "Critical"),
            vuln("identified", "CVE-2024-0002", "High", public=True),
        ],
        resolve=[vuln("resolved", "CVE-2024-0001", "Critical")],
        ignore=[vuln("identified", "CVE-2024-0003", "High", public=False)],
    ),
    Case(
        "machine-new-logon-user",
        [logon("added", "alice", False)],
        ignore=[logon("removed", "alice", False)],
    ),
    Case(
        "machine-domain-admin-logon",
        [logon("added", "da-bob", True)],
        resolve=[logon("removed", "da-bob", True)],
        ignore=[logon("added", "carol", False)],
    ),
    Case(
        "logon-user-became-domain-admin",
        [
            entity_event(
                "mde.logon_user.updated",
                logon_user("da-eve", True),
                {"isDomainAdmin": {"old": None, "new": True}},
            )
        ],
        ignore=[
            entity_event(
                "mde.logon_user.updated",
                logon_user("frank", False),
                {"isDomainAdmin": {"old": None, "new": False}},
            )
        ],
    ),
    Case(
        "user-created",
        [user_event("created")],
        title="Directory user created: User u1 created in contoso",
    ),
    Case("user-deleted", [user_event("deleted")]),
    Case(
        "user-disabled",
        [
            user_event(
                "disabled", enabled=False, changes={"accountEnabled": {"old": True, "new": False}}
            )
        ],
        resolve=[user_event("enabled", changes={"accountEnabled": {"old": False, "new": True}})],
    ),
    Case(
        "sync-degraded",
        [
            sync_event(
                "mde.sync.degraded",
                {
                    "scopes": {
                        "vulnerabilities": {"state": "failed", "error": "HTTP 503", "count": 0}
                    },
                    "kept": {"microsoft_defender_vulnerability": 51},
                },
            )
        ],
    ),
    Case(
        "sync-failed",
        [
            sync_event(
                "mde.sync.failed",
                {"error": "AADSTS7000215: invalid client secret", "stage": "auth"},
            )
        ],
    ),
    Case(
        "sync-suspicious-drop",
        [
            sync_event(
                "mde.sync.suspicious_drop",
                {
                    "entityType": "microsoft_defender_machine",
                    "previous": 900,
                    "current": 12,
                    "share": 0.99,
                    "threshold": 0.5,
                    "heldSyncs": 1,
                },
            )
        ],
    ),
]


def test_every_shipped_rule_has_a_case() -> None:
    from test_identity_rules import IDENTITY_RULES  # tested there, with events of real syncs

    # query rules (alerts/queries.yaml) are exercised in tests/test_query_rules.py
    event_rules = {r.name for r in load_rules(PACK).rules if r.query is None}
    assert event_rules - IDENTITY_RULES == {c.rule for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.rule for c in CASES])
def test_shipped_rule_with_real_events(
    case: Case, tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    ruleset = load_rules(PACK)
    assert ruleset.errors == []
    rule = ruleset.rule(case.rule)
    assert rule is not None
    for ev in case.ignore:
        assert all(r.name != case.rule for r, _ in ruleset.evaluate(ev)), ev["type"]
    sinks = {"stdout": RecordingSink("stdout"), "file": RecordingSink("file")}
    clock = FakeClock()
    d = Dispatcher(
        settings_for(redis_url, redis_prefix, PACK),
        redis_client,
        "pack",
        ruleset=ruleset,
        sinks=sinks,
        clock=clock,
        sleep=clock.sleep,
    )
    publish(redis_client, redis_prefix, case.fire)
    d.drain(5)
    mine = [n for n in sinks["file"].sent if n.rule == case.rule]
    assert len(mine) == 1, [n.title for n in sinks["file"].sent]
    n = mine[0]
    assert n.status == "firing" and n.total == len(case.fire) and n.severity == rule.severity
    assert [x.id for x in sinks["stdout"].sent if x.rule == case.rule] == [n.id]
    if case.title:
        assert n.title == case.title
    assert n.summary  # every event listed on its own line
    assert len(n.summary.splitlines()) == len(case.fire)
    if not case.resolve:
        assert not rule.send_resolved or not rule.resolve_types
        return
    clock.advance(600)
    publish(redis_client, redis_prefix, case.resolve)
    d.drain(5)
    resolved = [x for x in sinks["file"].sent if x.rule == case.rule and x.status == "resolved"]
    assert len(resolved) == 1
    assert resolved[0].total == len(case.resolve) and resolved[0].group_key == n.group_key
