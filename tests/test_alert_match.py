"""Rule conditions: field paths (dotted change keys), every operator, levels, dates, from/to/changed."""

from __future__ import annotations

from typing import Any

import pytest
from alert_helpers import change_event, entity_event, machine

from monitor.alerts.match import (
    MISSING,
    ConditionError,
    compile_condition,
    get_field,
    glob_matcher,
)

EVENT = entity_event(
    "mde.machine.updated",
    machine(
        1, machineTags=["production", "lab"], riskScore="High", lastSeen="2024-03-01T10:00:00Z"
    ),
    {
        "riskScore": {"old": "Low", "new": "High"},
        "vmMetadata.cloudProvider": {"old": None, "new": "Azure"},
        "machineTags": {
            "old": ["lab"],
            "new": ["production", "lab"],
            "added": ["production"],
            "removed": [],
        },
        "exposureScore": {"old": 3, "new": 42.5},
    },
)


def holds(field: str, op: str, value: Any = None, event: dict[str, Any] = EVENT, **kw: Any) -> bool:
    spec: dict[str, Any] = {"field": field, "op": op}
    if value is not None or kw.get("with_none"):
        spec["value"] = value
    return compile_condition(spec)(event)


def test_paths_resolve_into_data_then_envelope_and_greedy_change_keys() -> None:
    assert get_field(EVENT, "changes.riskScore.new") == "High"
    assert get_field(EVENT, "data.changes.riskScore.new") == "High"
    assert get_field(EVENT, "changes.vmMetadata.cloudProvider.new") == "Azure"  # dotted key
    assert get_field(EVENT, "entity.machineTags.0") == "production"
    assert get_field(EVENT, "type") == "mde.machine.updated"  # envelope fallback
    assert get_field(EVENT, "tenant") == "contoso"
    assert get_field(EVENT, "event.source") == "mde-monitor/contoso"
    assert get_field(EVENT, "entity.nope") is MISSING
    nested = {"data": {"a": {"b.c": {"d": 1}, "b": {"c": {"d": 2}}}}}
    assert get_field(nested, "a.b.c.d") == 1  # the longest key wins...
    backtrack = {"data": {"a.b": {"x": 1}, "a": {"b": {"y": 2}}}}
    assert get_field(backtrack, "a.b.y") == 2  # ...and falls back when it leads nowhere


def test_eq_ne_in_not_in() -> None:
    assert holds("changes.riskScore.new", "eq", "High")
    assert not holds("changes.riskScore.new", "eq", "Low")
    assert holds("changes.riskScore.new", "ne", "Low")
    assert holds("entity.missing", "ne", "x")  # absent is "not equal"
    assert holds("changes.riskScore.new", "in", ["High", "Critical"])
    assert holds("changes.riskScore.new", "not_in", ["Low"])
    assert holds("entity.missing", "not_in", ["Low"])
    assert not holds("entity.missing", "in", ["Low"])
    flag = entity_event("mde.machine.updated", machine(2, isAadJoined=True, rbacGroupId=1))
    assert holds("entity.isAadJoined", "eq", True, flag)
    assert not holds("entity.rbacGroupId", "eq", True, flag)  # 1 is not true


def test_contains_regex_exists() -> None:
    assert holds("entity.machineTags", "contains", "production")
    assert not holds("entity.machineTags", "contains", "prod")
    assert holds("entity.displayName", "contains", "contoso")
    assert holds("changes", "contains", "vmMetadata.cloudProvider")  # a key of a mapping
    assert holds("entity.displayName", "regex", r"^vm\d+\.contoso")
    assert holds("entity.machineTags", "regex", "^lab$")  # any member
    assert not holds("entity.nope", "regex", ".*")
    assert holds("entity.machineTags", "exists")
    assert holds("entity.nope", "exists", False)
    assert not holds("changes.vmMetadata.cloudProvider.old", "exists")  # null counts as absent


def test_ordering_numbers_dates_and_levels() -> None:
    assert holds("changes.exposureScore.new", "gt", 40)
    assert holds("changes.exposureScore.new", "lte", 42.5)
    assert not holds("changes.exposureScore.new", "lt", 42.5)
    assert holds("entity.lastSeen", "gte", "2024-03-01")
    assert holds("entity.lastSeen", "lt", "2024-03-01T10:00:01+00:00")
    assert holds("changes.riskScore.new", "gte", "High")
    assert holds("changes.riskScore.new", "gt", "Medium")
    assert not holds("changes.riskScore.new", "gt", "High")
    assert holds("changes.riskScore.old", "lt", "Medium")
    # None < Informational < Low < Medium < High < Critical
    for lower, higher in [("None", "Informational"), ("Low", "Medium"), ("High", "Critical")]:
        ev = change_event("mde.machine.risk_raised", 3, "riskScore", lower, higher)
        assert holds("changes.riskScore.new", "gt", lower, ev)
        assert holds("changes.riskScore.old", "lt", higher, ev)
    # mixed kinds never compare
    assert not holds("entity.displayName", "gt", 3)
    assert not holds("changes.exposureScore.new", "gt", "High")


def test_changed_from_to() -> None:
    assert holds("riskScore", "changed")
    assert holds("changes.riskScore", "changed")
    assert holds("vmMetadata", "changed")  # a parent of a changed dotted key
    assert holds("healthStatus", "changed", False)
    assert holds("riskScore", "from", "Low")
    assert holds("riskScore", "to", "High")
    assert holds("riskScore", "to", ["High", "Critical"])  # one of
    assert not holds("riskScore", "from", "High")
    assert holds("vmMetadata.cloudProvider", "to", "Azure")
    assert holds("machineTags", "to", ["production", "lab"])  # a list value compares whole


def test_combinators() -> None:
    cond = compile_condition(
        {
            "any": [
                {"field": "riskScore", "op": "to", "value": "Critical"},
                {
                    "all": [
                        {"field": "entity.machineTags", "op": "contains", "value": "lab"},
                        {"not": {"field": "type", "op": "eq", "value": "mde.machine.deleted"}},
                    ]
                },
            ]
        }
    )
    assert cond(EVENT)


@pytest.mark.parametrize(
    ("spec", "where", "text"),
    [
        ({"field": "x", "op": "regex", "value": "("}, "value", "bad regex"),
        ({"field": "x", "op": "gt", "value": "soon"}, "value", "number, an ISO date or a level"),
        ({"field": "x", "op": "in", "value": "High"}, "value", "list"),
        ({"field": "x", "op": "between", "value": 1}, "op", "unknown op"),
        ({"field": "", "op": "eq", "value": 1}, "field", "non-empty"),
        ({"field": "x", "op": "eq"}, "op", "needs a value"),
        ({"field": "x", "op": "eq", "value": 1, "extra": 2}, "extra", "unknown key"),
    ],
)
def test_bad_conditions_name_the_part(spec: dict[str, Any], where: str, text: str) -> None:
    with pytest.raises(ConditionError) as exc:
        compile_condition(spec, ("match", "where", 0))
    assert text in str(exc.value)
    assert exc.value.path[-1] == where


def test_type_globs() -> None:
    ok = glob_matcher(["mde.machine.*", "mde.user.created"])
    assert ok("mde.machine.risk_raised") and ok("mde.user.created")
    assert not ok("mde.user.deleted") and not ok("mde.machine_vulnerability.identified")
