"""Issue 10 item 5: a notification id is unique per distinct notification, forever.

The old id was hash(rule, group, status, seq) with `seq` in group state that expires an hour
after the last flush: a later, different alert of the same group reused an earlier id and
receivers de-duplicating by `webhook-id` dropped it. Ids now carry the deployment, a counter
that never expires and a random part; only retries of one delivery repeat an id. PagerDuty's
dedup_key (the group key) still repeats on purpose: it is the incident.
"""

from __future__ import annotations

from pathlib import Path

import redis
from alert_helpers import FakeClock, change_event, publish, settings_for, write_alerts
from sink_receivers import Receiver

from monitor.alerts import group as groups
from monitor.alerts.dispatch import Dispatcher
from monitor.redis_conn import delete_prefix

RULES = """
rules:
  - name: risk
    match: {type: mde.machine.risk_raised}
    sinks: [hook]
    group_by: [tenant]
    group_wait: 0s
    group_interval: 0s
    repeat_interval: 0s
"""


def _alerts(tmp_path: Path, url: str) -> Path:
    return write_alerts(
        tmp_path / "alerts",
        RULES,
        f"""
        delivery: {{backoff_base: 10ms, backoff_max: 20ms, jitter: 0}}
        sinks:
          hook: {{type: webhook, url: "{url}/in"}}
        """,
    )


def _dispatch(redis_url: str, prefix: str, alerts: Path, client: redis.Redis) -> Dispatcher:
    clock = FakeClock()
    return Dispatcher(
        settings_for(redis_url, prefix, alerts), client, clock=clock, sleep=clock.sleep
    )


def test_ids_never_repeat_after_group_state_expires_or_across_deployments(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    other_prefix = f"{redis_prefix}-other"
    try:
        with Receiver() as rx:
            rx.reply(503)  # the first attempt fails: its retry must carry the same id
            alerts = _alerts(tmp_path, rx.url)
            d = _dispatch(redis_url, redis_prefix, alerts, redis_client)
            publish(
                redis_client,
                redis_prefix,
                [change_event("mde.machine.risk_raised", 1, "riskScore", "Low", "High")],
            )
            assert d.drain(10).sent == 1
            first, retried = rx.requests[0], rx.requests[1]
            assert first.headers["webhook-id"] == retried.headers["webhook-id"]
            # the group's state expires (what Redis does an hour after the last flush)
            key = groups.group_key("risk", {"tenant": "contoso"})
            redis_client.delete(groups.state_key(redis_prefix, key, "firing"))
            publish(
                redis_client,
                redis_prefix,
                [change_event("mde.machine.risk_raised", 2, "riskScore", "Low", "High")],
            )
            assert d.drain(10).sent == 1
            # a second deployment watching the same tenant
            d2 = _dispatch(redis_url, other_prefix, alerts, redis_client)
            publish(
                redis_client,
                other_prefix,
                [change_event("mde.machine.risk_raised", 1, "riskScore", "Low", "High")],
            )
            assert d2.drain(10).sent == 1
            d.close()
            d2.close()
        ids = [r.headers["webhook-id"] for r in rx.requests]
        assert len(ids) == 4 and len(set(ids[1:])) == 3, ids  # retry = same id; others differ
        deployments = {i.split("-")[0] for i in ids}
        assert len(deployments) == 2  # the deployment prefix tells the two apart
    finally:
        delete_prefix(redis_client, other_prefix)
