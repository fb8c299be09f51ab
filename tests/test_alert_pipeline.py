"""The pipeline on real Redis: grouping, group_wait/interval across runs, throttle, resolved, silences."""

from __future__ import annotations

from pathlib import Path

import redis
from alert_helpers import (
    FakeClock,
    RecordingSink,
    change_event,
    pending_count,
    publish,
    settings_for,
    write_alerts,
)

from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.silences import SilenceStore

SENSOR_RULE = """
rules:
  - name: sensor
    description: Sensor health degraded
    severity: medium
    match:
      type: mde.machine.health_degraded
    sinks: [rec]
    group_by: [tenant]
    group_wait: 30s
    group_interval: 5m
    repeat_interval: 4h
    max_events: 10
"""


def degraded(i: int, new: str = "Inactive", tenant: str = "contoso", gen: int = 1) -> dict:
    return change_event(
        "mde.machine.health_degraded",
        i,
        "healthStatus",
        "Active",
        new,
        tenant=tenant,
        generation=gen,
    )


def recovered(i: int, tenant: str = "contoso", gen: int = 2) -> dict:
    return change_event(
        "mde.machine.health_recovered",
        i,
        "healthStatus",
        "Inactive",
        "Active",
        tenant=tenant,
        generation=gen,
    )


def make(
    tmp_path: Path, redis_url: str, prefix: str, client: redis.Redis, rules: str = SENSOR_RULE
) -> tuple[Dispatcher, RecordingSink, FakeClock]:
    write_alerts(tmp_path / "alerts", rules)
    sink = RecordingSink("rec")
    clock = FakeClock()
    d = Dispatcher(
        settings_for(redis_url, prefix, tmp_path / "alerts"),
        client,
        consumer="t1",
        sinks={"rec": sink},
        clock=clock,
        sleep=clock.sleep,
    )
    assert d.errors == []
    return d, sink, clock


def test_500_machines_going_inactive_make_one_notification_per_group(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    d, sink, clock = make(tmp_path, redis_url, redis_prefix, redis_client)
    publish(redis_client, redis_prefix, [degraded(i) for i in range(500)])
    publish(
        redis_client, redis_prefix, [degraded(i, tenant="fabrikam") for i in range(3)], "fabrikam"
    )
    stats = d.run_once()
    assert (stats.read, stats.matched, stats.notifications) == (503, 503, 0)  # group_wait
    clock.advance(31)
    stats = d.run_once()
    assert (stats.read, stats.groups_flushed, stats.queued) == (0, 2, 2)
    d.deliver_due()
    by_tenant = {n.tenant: n for n in sink.sent}
    assert set(by_tenant) == {"contoso", "fabrikam"}
    n = by_tenant["contoso"]
    assert n.total == 500 and len(n.events) == 10
    assert n.title == "Sensor health degraded: 500 machines went Inactive in contoso"
    assert n.summary.endswith("… and 490 more")
    assert n.group_labels == {"tenant": "contoso"}
    assert n.status == "firing" and n.severity == "medium"
    # every event was acknowledged in the same transaction as the group writes
    assert pending_count(redis_client, redis_prefix) == 0


def test_mixed_values_are_counted_in_the_title(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    d, sink, _clock = make(tmp_path, redis_url, redis_prefix, redis_client)
    publish(
        redis_client,
        redis_prefix,
        [degraded(i) for i in range(30)] + [degraded(100 + i, "NoSensorData") for i in range(12)],
    )
    d.drain(5)
    (n,) = sink.sent
    assert n.total == 42
    assert "42 machines sensor health degraded (30 Inactive, 12 NoSensorData)" in n.title


def test_group_wait_spans_dispatch_runs_and_group_interval_holds(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    d, sink, clock = make(tmp_path, redis_url, redis_prefix, redis_client)
    publish(redis_client, redis_prefix, [degraded(1)])
    d.run_once()
    clock.advance(20)
    publish(redis_client, redis_prefix, [degraded(2)])
    # a new dispatcher (another process) continues the same group
    d2, sink2, _ = make(tmp_path, redis_url, redis_prefix, redis_client)
    d2.clock = d2.queue.clock = clock
    d2.run_once()
    d2.deliver_due()
    assert sink2.sent == []
    clock.advance(11)
    d2.run_once()
    d2.deliver_due()
    (first,) = sink2.sent
    assert first.total == 2
    # a new event right after the flush waits for group_interval (5m), not group_wait
    clock.advance(10)
    publish(redis_client, redis_prefix, [degraded(3)])
    d2.run_once()
    clock.advance(40)
    d2.run_once()
    d2.deliver_due()
    assert len(sink2.sent) == 1
    clock.advance(300)
    d2.run_once()
    d2.deliver_due()
    assert len(sink2.sent) == 2 and sink2.sent[1].total == 1
    assert sink2.sent[1].group_key == first.group_key and sink2.sent[1].id != first.id
    assert sink2.sent[1].extra["seq"] == 2
    assert sink.sent == []


def test_repeat_interval_is_respected_across_dispatch_runs(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    d, sink, clock = make(tmp_path, redis_url, redis_prefix, redis_client)
    publish(redis_client, redis_prefix, [degraded(i, gen=1) for i in range(500)])
    d.drain(5)
    assert [n.total for n in sink.sent] == [500]
    # the next sync reports the same 500 machines Inactive again (new event ids, same change)
    clock.advance(600)
    publish(redis_client, redis_prefix, [degraded(i, gen=2) for i in range(500)])
    stats = d.drain(5)
    assert stats.throttled == 500 and stats.notifications == 0
    assert len(sink.sent) == 1
    # new content inside the window still notifies: 5 other machines, and one going NoSensorData
    clock.advance(600)
    publish(
        redis_client,
        redis_prefix,
        [degraded(1000 + i, gen=3) for i in range(5)] + [degraded(7, "NoSensorData", gen=3)],
    )
    stats = d.drain(5)
    assert stats.throttled == 0 and [n.total for n in sink.sent] == [500, 6]
    # after repeat_interval the same change notifies again
    clock.advance(4 * 3600)
    publish(redis_client, redis_prefix, [degraded(i, gen=4) for i in range(500)])
    stats = d.drain(5)
    assert stats.throttled == 0 and [n.total for n in sink.sent] == [500, 6, 500]


def test_duplicate_events_are_absorbed_even_without_repeat_interval(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    d, sink, _clock = make(
        tmp_path,
        redis_url,
        redis_prefix,
        redis_client,
        SENSOR_RULE.replace("repeat_interval: 4h", "repeat_interval: 0"),
    )
    ev = degraded(1)
    publish(redis_client, redis_prefix, [ev, ev])  # the detect stage re-appended after a crash
    stats = d.drain(5)
    assert stats.throttled == 1 and [n.total for n in sink.sent] == [1]


def test_resolved_notifications_for_every_transition(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    d, sink, clock = make(tmp_path, redis_url, redis_prefix, redis_client)
    publish(redis_client, redis_prefix, [degraded(i) for i in range(3)])
    d.drain(5)
    (firing,) = sink.sent
    assert firing.status == "firing" and firing.extra["still_firing"] == 3
    clock.advance(60)
    # two recover; one machine that was never firing recovers too (nothing to resolve)
    publish(redis_client, redis_prefix, [recovered(0), recovered(1), recovered(99)])
    stats = d.drain(5)
    assert stats.resolving == 3
    resolved = sink.sent[1]
    assert resolved.status == "resolved" and resolved.total == 2
    assert resolved.group_key == firing.group_key  # PagerDuty resolves the same dedup_key
    assert resolved.extra["still_firing"] == 1
    assert resolved.title.startswith("RESOLVED: Sensor health degraded: 2 machines went Active")
    assert {e["subject"] for e in resolved.events} == {
        firing.events[0]["subject"],
        firing.events[1]["subject"],
    }
    # resolved once: a second recovery of machine 0 sends nothing
    clock.advance(60)
    publish(redis_client, redis_prefix, [recovered(0, gen=3)])
    d.drain(5)
    assert len(sink.sent) == 2


def test_silences_mute_matching_events_and_are_logged(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    d, sink, clock = make(tmp_path, redis_url, redis_prefix, redis_client)
    store = SilenceStore(redis_client, redis_prefix)
    s = store.add(
        ["type=mde.machine.*", "tenant=contoso", "entity.machineTags=lab"],
        8 * 3600,
        "lab rebuild",
        "alice",
        now=clock(),
    )
    old = store.add(["tenant=contoso"], 60, "over", "bob", now=clock() - 3600)  # expired
    lab = [
        change_event(
            "mde.machine.health_degraded",
            i,
            "healthStatus",
            "Active",
            "Inactive",
            machineTags=["lab", "x"],
        )
        for i in range(3)
    ]
    prod = [
        change_event(
            "mde.machine.health_degraded",
            10 + i,
            "healthStatus",
            "Active",
            "Inactive",
            machineTags=["prod"],
        )
        for i in range(2)
    ]
    publish(redis_client, redis_prefix, lab + prod)
    stats = d.drain(5)
    assert stats.silenced == 3
    (n,) = sink.sent
    assert n.total == 2
    entries = [e for e in d.queue.log_entries(100) if e["kind"] == "silenced"]
    assert len(entries) == 3 and {e["silence"] for e in entries} == {s.id}
    assert {e["event"] for e in entries} == {e["id"] for e in lab}
    assert old.id not in {s.id for s in store.active(clock())}
    # expiring the silence lets the next (different) events through
    store.expire(s.id, now=clock())
    clock.advance(600)
    publish(
        redis_client,
        redis_prefix,
        [
            change_event(
                "mde.machine.health_degraded",
                50,
                "healthStatus",
                "Active",
                "Inactive",
                machineTags=["lab"],
            )
        ],
    )
    d.drain(5)
    assert len(sink.sent) == 2


def test_stale_and_unmatched_events_are_acknowledged_without_alerting(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    d, sink, _clock = make(tmp_path, redis_url, redis_prefix, redis_client)
    old = change_event("mde.machine.health_degraded", 1, "healthStatus", "Active", "Inactive")
    old["time"] = "2020-01-01T00:00:00.000Z"
    other = change_event("mde.machine.risk_raised", 2, "riskScore", "Low", "High")
    publish(redis_client, redis_prefix, [old, other])
    stats = d.drain(5)
    assert (stats.read, stats.stale, stats.matched) == (2, 1, 0)
    assert sink.sent == []
    assert pending_count(redis_client, redis_prefix) == 0


def test_templates_render_in_a_sandbox(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    rules = (
        SENSOR_RULE
        + """
    template:
      title: "{{ total }} down in {{ tenant }} ({{ headlines | dictsort | first | first }})"
      summary: "{% for e in events %}{{ field(e, 'displayName') }};{% endfor %} +{{ more }}"
"""
    )
    d, sink, _clock = make(tmp_path, redis_url, redis_prefix, redis_client, rules)
    publish(redis_client, redis_prefix, [degraded(i) for i in range(12)])
    d.drain(5)
    (n,) = sink.sent
    assert n.title == "12 down in contoso (Inactive)"
    assert n.summary.startswith("vm0.contoso.local;vm1.contoso.local;") and n.summary.endswith("+2")
