"""Small stages on their own: silence matchers, throttle fingerprints, grouping keys, rendering."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis
from alert_helpers import (
    RecordingSink,
    change_event,
    entity_event,
    machine,
    publish,
    settings_for,
    write_alerts,
)

from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.group import group_key, group_labels
from monitor.alerts.render import compile_template, render_notification
from monitor.alerts.rules import compile_rule, load_rules
from monitor.alerts.silences import Matcher, Silence, silenced_by
from monitor.alerts.throttle import fingerprint, window

EV = change_event(
    "mde.machine.health_degraded",
    1,
    "healthStatus",
    "Active",
    "Inactive",
    machineTags=["lab", "eu"],
)


@pytest.mark.parametrize(
    ("matcher", "expected"),
    [
        ("type=mde.machine.*", True),
        ("type=mde.user.*", False),
        ("tenant=contoso", True),
        ("tenant!=contoso", False),
        ("entity.machineTags=lab", True),  # any member of a list
        ("entity.machineTags=prod", False),
        ("entity.machineTags!=prod", True),
        ("displayName=~^vm1\\.", True),
        ("displayName!~^vm1\\.", False),
        ("entity.nothing=*", False),
        ("rule=sensor*", True),
        ("rule=other", False),
    ],
)
def test_silence_matchers(matcher: str, expected: bool) -> None:
    assert Matcher.parse(matcher).matches(EV, "sensor-health") is expected


def test_silence_activity_window_and_bad_matchers() -> None:
    s = Silence("s1", ["tenant=contoso"], starts_at=100, ends_at=200)
    assert s.active(100) and s.active(199.9) and not s.active(200) and not s.active(99)
    assert silenced_by(EV, [s]) is s
    for bad in ("nonsense", "displayName=~(", "=x"):
        with pytest.raises(ValueError):
            Matcher.parse(bad)


def test_throttle_fingerprint_is_about_content_not_identity() -> None:
    again = change_event(
        "mde.machine.health_degraded", 1, "healthStatus", "Active", "Inactive", generation=9
    )
    other_value = change_event(
        "mde.machine.health_degraded", 1, "healthStatus", "Active", "NoSensorData"
    )
    other_machine = change_event(
        "mde.machine.health_degraded", 2, "healthStatus", "Active", "Inactive"
    )
    assert again["id"] != EV["id"]
    assert fingerprint("r", "firing", again) == fingerprint("r", "firing", EV)
    assert fingerprint("r", "firing", other_value) != fingerprint("r", "firing", EV)
    assert fingerprint("r", "firing", other_machine) != fingerprint("r", "firing", EV)
    assert fingerprint("r", "resolved", EV) != fingerprint("r", "firing", EV)
    assert window(3600, "firing", EV, "r")[1] == 3600
    token, ttl = window(0, "firing", EV, "r")
    assert token.endswith(EV["id"]) and ttl > 0


def test_group_labels_and_keys(tmp_path: Path) -> None:
    (tmp_path / "sinks.yaml").write_text("sinks: {s: {type: stdout}}\n")
    raw = {
        "name": "g",
        "match": {"type": "mde.machine.*"},
        "sinks": ["s"],
        "group_by": ["tenant", "entity.machineTags", "changes.healthStatus.new", "nope"],
    }
    rule, errors = compile_rule(raw, "x.yaml", 0, ["s"])
    assert rule is not None and errors == []
    labels = group_labels(rule, EV)
    assert labels == {
        "tenant": "contoso",
        "entity.machineTags": '["lab","eu"]',
        "changes.healthStatus.new": "Inactive",
        "nope": "",
    }
    assert group_key("g", labels) == group_key("g", dict(reversed(labels.items())))
    assert group_key("g", labels) != group_key("h", labels)


def test_sandboxed_templates_fall_back_to_the_default(tmp_path: Path) -> None:
    raw = {
        "name": "t",
        "description": "Sensor",
        "match": {"type": "mde.machine.health_degraded"},
        "sinks": ["s"],
        "template": {"title": "{{ ''.__class__.__mro__[1].__subclasses__() }}"},
    }
    rule, errors = compile_rule(raw, "x.yaml", 0, ["s"])
    assert rule is not None, errors
    title, summary = render_notification(rule, "firing", {"tenant": "contoso"}, [EV], 1)
    assert title == "Sensor: vm1.contoso.local went Inactive in contoso"  # the default
    assert "healthStatus: Active → Inactive" in summary
    bad = dict(raw, template={"summary": "{% for x in %}"})
    rule, errors = compile_rule(bad, "x.yaml", 0, ["s"])
    assert rule is None and "template.summary: line 1" in errors[0].message
    assert compile_template("{{ total }}").render(total=3) == "3"


def test_default_titles_for_relationships_and_sync() -> None:
    rs_dir = Path(__file__).resolve().parent.parent / "alerts"
    rs = load_rules(rs_dir)
    rule = rs.rule("sync-failed")
    assert rule is not None
    ev = entity_event("mde.machine.created", machine(5))
    title, _ = render_notification(rule, "firing", {"tenant": "contoso"}, [ev, ev], 2)
    assert title == "Sync failed: 2 machines onboarded in contoso"


def test_run_forever_delivers_until_stopped(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    alerts = write_alerts(
        tmp_path / "alerts",
        """
        rules:
          - name: r
            match: {type: mde.machine.health_degraded}
            sinks: [rec]
            group_wait: 0s
        """,
    )
    sink = RecordingSink("rec")
    d = Dispatcher(settings_for(redis_url, redis_prefix, alerts), redis_client, sinks={"rec": sink})
    stop = threading.Event()
    worker = threading.Thread(target=d.run_forever, args=(stop, 0.2), daemon=True)
    worker.start()
    try:
        publish(redis_client, redis_prefix, [EV])
        assert [n.total for n in sink.wait_for(1)] == [1]
    finally:
        stop.set()
        worker.join(10)
    assert not worker.is_alive()
