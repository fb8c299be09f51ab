"""Field-level changes, fingerprints and derived transitions (pure functions)."""

from __future__ import annotations

from monitor.config import DetectSettings
from monitor.detect import diff
from monitor.model import schema
from monitor.model.graph import Graph


def test_scalar_nested_and_list_membership() -> None:
    old = {
        "riskScore": "Low",
        "machineTags": ["a", "b"],
        "vmMetadata": {"cloudProvider": None, "vmId": "1"},
        "gone": 1,
    }
    new = {
        "riskScore": "High",
        "machineTags": ["b", "a", "prod"],
        "vmMetadata": {"cloudProvider": "Azure", "vmId": "1"},
        "fresh": True,
    }
    ch = diff.field_changes(old, new)
    assert ch == {
        "riskScore": {"old": "Low", "new": "High"},
        "machineTags": {
            "old": ["a", "b"],
            "new": ["b", "a", "prod"],
            "added": ["prod"],
            "removed": [],
        },
        "vmMetadata.cloudProvider": {"old": None, "new": "Azure"},
        "gone": {"old": 1, "new": None},
        "fresh": {"old": None, "new": True},
    }


def test_order_of_scalar_lists_and_ignored_fields_are_no_change() -> None:
    old = {"ipAddress": ["10.0.0.1", "10.0.0.2"], "lastSeenOn": 1, "_rawData": [{"x": 1}]}
    new = {"ipAddress": ["10.0.0.2", "10.0.0.1"], "lastSeenOn": 2, "_rawData": [{"x": 2}]}
    assert diff.field_changes(old, new, {"_rawData", "lastSeenOn"}) == {}


def test_list_of_objects_reported_as_a_whole() -> None:
    old = {"ips": [{"ip": "1", "mac": "a"}]}
    new = {"ips": [{"ip": "1", "mac": "b"}]}
    ch = diff.field_changes(old, new)
    assert list(ch) == ["ips"]
    assert ch["ips"]["new"] == [{"ip": "1", "mac": "b"}]
    assert diff.field_changes({"ips": [{"a": 1}, {"b": 2}]}, {"ips": [{"b": 2}, {"a": 1}]}) == {}


def test_fingerprint_significant_part_ignores_volatile_and_raw() -> None:
    ign = diff.ignored_fields(None)[schema.MACHINE.type]
    a = {"_key": "k", "_type": schema.MACHINE.type, "riskScore": "Low", "lastSeenOn": 1}
    b = {**a, "lastSeenOn": 2, "_rawData": [{"name": "default", "rawData": {}}]}
    c = {**a, "riskScore": "High"}
    fa, fb, fc = (diff.fingerprint(x, ign)[0] for x in (a, b, c))
    assert len(fa) == 16 and fa[:8] == fb[:8] and fa != fb  # digests: significant, then full
    assert fa[:8] != fc[:8]
    # no ignored field present: one hash, equal to the significant one
    rel = {"_key": "r", "_type": "x", "_fromEntityKey": "a", "_toEntityKey": "b"}
    assert len(diff.fingerprint(rel)[0]) == 8
    # key order does not matter
    assert diff.fingerprint(dict(reversed(list(a.items()))), ign)[0] == fa
    # compare() computes the same prints in bulk
    g = Graph()
    g.add_entity(b, schema.SCOPE_MACHINES)
    g.add_relationship(rel, schema.SCOPE_MACHINES)
    fresh = diff.compare(g, None, diff.ignored_fields(None)).fresh[schema.SCOPE_MACHINES]
    assert fresh[schema.MACHINE.type]["k"] == fb
    assert fresh["x"]["r"] == diff.fingerprint(rel)[0]


def test_a_later_sync_indexes_every_item_as_a_first_sync_does() -> None:
    """A later sync builds the new index after meeting the stored one (its key -> print table
    is gone by then): every item lands in the same scope, type and print as in a first sync -
    entity prints with their significant half, mapped relationships, rows with a volatile field
    set for their type, items outside their type's scope - and only unmet items are `added`."""
    pair_type = "microsoft_defender_machine_identified_vulnerability"
    ign = diff.ignored_fields(DetectSettings(volatile_fields={pair_type: ["products"]}))
    machine = {"_key": "m", "_type": schema.MACHINE.type, "riskScore": "Low", "lastSeenOn": 1}
    pair = {
        "_key": "m|identified|v",
        "_type": pair_type,
        "_class": "IDENTIFIED",
        "_fromEntityKey": "m",
        "_toEntityKey": "v",
        "products": "contoso 1.0",
    }
    has = {"_key": "a|has|m", "_type": "x_has", "_class": "HAS", "_fromEntityKey": "a"}
    mapped = {"_key": "v|is|c", "_type": "x_is", "_class": "IS", "_mapping": {"a": [1]}}
    g = Graph()
    g.add_entity(machine, schema.SCOPE_MACHINES)
    g.add_relationship(pair, schema.SCOPE_VULNERABILITIES)
    g.add_relationship(has, "elsewhere")
    g.add_relationship(mapped, schema.SCOPE_VULNERABILITIES)
    first = diff.compare(g, None, ign)
    assert len(first.fresh[schema.SCOPE_VULNERABILITIES][pair_type]["m|identified|v"]) == 16
    stored = {  # as the store holds it: prints in hex
        s: {t: {k: fp.hex() for k, fp in items.items()} for t, items in types.items()}
        for s, types in first.fresh.items()
    }
    del stored["elsewhere"]  # not stored yet: new in this sync
    stored[schema.SCOPE_MACHINES]["gone"] = {"g": "0" * 16}
    later = diff.compare(g, [stored], ign)
    assert later.fresh == first.fresh
    assert set(later.added) == {"a|has|m"} and set(first.added) == set(g.entities) | set(
        g.relationships
    )
    assert later.missing == [("g", schema.SCOPE_MACHINES, "gone")] and not later.changed
    assert set(later.bodies) == {"a|has|m"} and len(first.bodies) == 4


def test_an_item_fetched_as_another_type_than_stored_is_compared() -> None:
    """The fresh prints are kept per `_type`: a key stored under one type and fetched under
    another is still met (changed and rewritten), neither new nor missing."""
    ign = diff.ignored_fields(None)
    g = Graph()
    g.add_entity({"_key": "k", "_type": "x_new", "name": "a"}, "s")
    g.add_entity({"_key": "same", "_type": "x_new", "name": "b"}, "s")
    first = diff.compare(g, None, ign)
    stored = {
        "s": {"x_old": {"k": "0" * 16}, "x_new": {"same": first.fresh["s"]["x_new"]["same"].hex()}}
    }
    later = diff.compare(g, [stored], ign)
    assert set(later.changed) == {"k"} and set(later.bodies) == {"k"}
    assert not later.added and not later.missing
    assert later.previous_counts == {"s": {"x_old": 1, "x_new": 1}}


def test_volatile_override_from_settings() -> None:
    ign = diff.ignored_fields(DetectSettings(volatile_fields={schema.USER.type: ["jobTitle"]}))
    assert ign[schema.USER.type] == {"jobTitle", "_rawData"}
    assert ign[schema.MACHINE.type] == {"lastSeenOn", "lastSeen", "_rawData"}


def test_transitions() -> None:
    t = diff.transitions
    m = schema.MACHINE.short

    def changes(**kw: tuple[object, object]) -> diff.Changes:
        return {k: {"old": a, "new": b} for k, (a, b) in kw.items()}

    assert [x.change for x in t(m, changes(riskScore=("Low", "High")))] == ["risk_raised"]
    assert [x.change for x in t(m, changes(riskScore=("High", "None")))] == ["risk_lowered"]
    assert [x.change for x in t(m, changes(exposureLevel=("Medium", "Low")))] == [
        "exposure_lowered"
    ]
    assert [x.change for x in t(m, changes(healthStatus=("Active", "Inactive")))] == [
        "health_degraded"
    ]
    assert [x.change for x in t(m, changes(healthStatus=("NoSensorData", "Active")))] == [
        "health_recovered"
    ]
    assert [x.change for x in t(m, changes(onboardingStatus=("Onboarded", "Offboarded")))] == [
        "onboarding_changed"
    ]
    assert [x.change for x in t(m, changes(defenderAvStatus=("Updated", "NotUpdated")))] == [
        "av_status_changed"
    ]
    assert [x.change for x in t(m, changes(machineTags=([], ["x"])))] == ["tags_changed"]
    assert t(m, changes(riskScore=("Low", "Weird"))) == []
    u = schema.USER.short
    assert [x.change for x in t(u, changes(accountEnabled=(True, False)))] == ["disabled"]
    assert [x.change for x in t(u, changes(accountEnabled=(False, True)))] == ["enabled"]
    assert t(u, changes(accountEnabled=(None, True))) == []
    v = schema.VULNERABILITY.short
    assert [x.change for x in t(v, changes(publicExploit=(False, True)))] == ["exploit_published"]
    assert t(v, changes(publicExploit=(True, False))) == []
