"""Issue 10 item 4: trimming the event stream never loses unread events silently.

Reproduced before the fix: 140 events written with `stream_maxlen` 100 while dispatch was down;
40 were trimmed unread and the consumer lag stayed wrong. Now trimming stops at the slowest
group; only past the memory cap (10 x maxlen) are unread events dropped, with an
`mde.events.lost` event, the `mde_events_lost_total` counter and a lag that stays true.
"""

from __future__ import annotations

from pathlib import Path

import redis
from alert_helpers import FakeClock, RecordingSink, change_event, settings_for, write_alerts

from monitor.alerts.dispatch import Dispatcher
from monitor.events import stream
from monitor.events.envelope import Event
from monitor.metrics import RedisStateCollector
from monitor.status import read_state

RULES = """
rules:
  - name: all
    match: {type: ["mde.machine.risk_raised", "mde.events.lost"]}
    sinks: [rec]
    group_by: [type]
    group_wait: 0s
    max_events: 1
    repeat_interval: 0s
"""


def _commit(client: redis.Redis, prefix: str, events: list[Event], maxlen: int) -> None:
    """What each sync's snapshot commit does: append its events with the configured bounds."""
    pipe = client.pipeline(transaction=True)
    stream.append(pipe, prefix, "contoso", events, maxlen=maxlen, retention_days=30)
    pipe.execute()


def _events(n: int, start: int = 0) -> list[Event]:
    return [
        change_event("mde.machine.risk_raised", i, "riskScore", "Low", "High", generation=i)
        for i in range(start, start + n)
    ]


def _dispatcher(
    tmp_path: Path, redis_url: str, prefix: str, client: redis.Redis
) -> tuple[Dispatcher, RecordingSink]:
    alerts = write_alerts(tmp_path / "alerts", RULES)
    sink = RecordingSink("rec")
    clock = FakeClock()
    d = Dispatcher(
        settings_for(redis_url, prefix, alerts),
        client,
        sinks={"rec": sink},
        clock=clock,
        sleep=clock.sleep,
    )
    return d, sink


def _lag(client: redis.Redis, prefix: str) -> int | None:
    (group,) = read_state(client, prefix, []).groups
    return group.lag


def test_unread_events_beyond_maxlen_are_kept_and_the_lag_is_true(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    d, sink = _dispatcher(tmp_path, redis_url, redis_prefix, redis_client)  # creates the group
    for start in range(0, 140, 10):  # 14 syncs while dispatch is down
        _commit(redis_client, redis_prefix, _events(10, start), maxlen=100)
    assert redis_client.xlen(stream.stream_key(redis_prefix)) == 140
    assert _lag(redis_client, redis_prefix) == 140
    stats = d.drain(5)
    assert stats.read == 140 and sink.sent[0].total == 140
    assert _lag(redis_client, redis_prefix) == 0
    # once read, the next commit trims back to about maxlen (approximate: whole nodes)
    _commit(redis_client, redis_prefix, _events(1, 500), maxlen=100)
    assert redis_client.xlen(stream.stream_key(redis_prefix)) < 140
    # the per-tenant stream has no consumer group: plain length bound
    assert redis_client.xlen(stream.stream_key(redis_prefix, "contoso")) <= 141


def test_past_the_memory_cap_the_loss_is_an_event_a_metric_and_a_true_lag(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    d, sink = _dispatcher(tmp_path, redis_url, redis_prefix, redis_client)
    for start in range(0, 1200, 100):  # cap = 10 x 100: the last two commits overflow it
        _commit(redis_client, redis_prefix, _events(100, start), maxlen=100)
    key = stream.stream_key(redis_prefix)
    lost_events = [
        e for _sid, e in stream.read_range(redis_client, redis_prefix, type_glob="mde.events.lost")
    ]
    # the second trim also counts the first loss event, which is newer than what it drops
    assert [e["data"]["count"] for e in lost_events] == [100, 101]
    assert redis_client.xlen(key) == 1000 + 1  # the cap, plus the newest loss event
    assert _lag(redis_client, redis_prefix) == 1001
    collector = RedisStateCollector(redis_client, redis_prefix, lambda: [])
    lost_metric = {
        s.labels["group"]: s.value
        for fam in collector.collect()
        if fam.name == "mde_events_lost"
        for s in fam.samples
        if s.name == "mde_events_lost_total"
    }
    assert lost_metric == {"alerts": 201.0}
    stats = d.drain(5)
    assert stats.read == 1001
    by_type = {n.group_labels["type"]: n for n in sink.sent}
    assert by_type["mde.machine.risk_raised"].total == 999
    assert by_type["mde.events.lost"].total == 2
    assert _lag(redis_client, redis_prefix) == 0
