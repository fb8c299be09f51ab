"""Crash mid-dispatch (SIGKILL at a named point), restart: every notification arrives, none twice.

The one window that remains is `after_send_before_mark`: the receiver has the message but the
delivery is not yet marked sent, so the restart sends it again - with the same webhook-id (the
notification id), which is how receivers de-duplicate (at-least-once delivery).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from alert_helpers import change_event, pending_count, publish, write_alerts
from sink_receivers import Receiver

from monitor.alerts.dispatch import Dispatcher
from monitor.config import Settings

RULES = """
rules:
  - name: risk
    match: {type: mde.machine.risk_raised}
    sinks: [hook]
    group_wait: 0s
  - name: risk-any
    match: {type: "mde.machine.risk_*"}
    sinks: [hook]
    group_wait: 0s
"""

SCRIPT = """
import json, sys
from monitor.alerts.dispatch import Dispatcher
from monitor.config import Settings
from monitor.redis_conn import connect
s = Settings(redis_url=sys.argv[1], redis_prefix=sys.argv[2], alerts_dir=sys.argv[3])
d = Dispatcher(s, connect(s.redis_url), consumer="crashy")
print(json.dumps(d.drain(30).to_dict()))
"""

TENANTS = ("contoso", "fabrikam", "northwind")


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


def run_dispatch(
    redis_url: str, prefix: str, alerts: Path, crash_at: str | None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MDE_MONITOR_CRASH_AT"}
    if crash_at:
        env["MDE_MONITOR_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, redis_url, prefix, str(alerts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )


CRASH_POINTS = (
    "before_ingest_commit",  # events read, nothing committed: re-read from the pending list
    "after_ingest_commit",  # groups written and events acknowledged, nothing flushed
    "before_flush_commit",  # a notification rendered, not queued: flushed again, same id
    "after_flush_commit:2",  # two groups flushed and queued, the rest still open
    "before_send:3",  # two delivered, the third marked "sending" but never sent
    "after_send_before_mark:2",  # the receiver has it, we do not know: sent again, same id
)


def test_crash_at_each_point_then_restart_delivers_everything_once_per_idempotency_key(
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
    rx: Receiver,
) -> None:
    alerts = write_alerts(
        tmp_path / "alerts",
        RULES,
        f"""
        delivery: {{backoff_base: 10ms, jitter: 0}}
        sinks:
          hook: {{type: webhook, url: "{rx.url}/in"}}
        """,
    )
    for t in TENANTS:
        events = [
            change_event("mde.machine.risk_raised", i, "riskScore", "Low", "High", tenant=t)
            for i in range(4)
        ]
        publish(redis_client, redis_prefix, events, t)
    # one process after another, each killed at the next point with the work left by the last
    for crash_at in CRASH_POINTS:
        crashed = run_dispatch(redis_url, redis_prefix, alerts, crash_at)
        assert crashed.returncode == -signal.SIGKILL, (crash_at, crashed.stderr)
    restarted = run_dispatch(redis_url, redis_prefix, alerts, None)
    assert restarted.returncode == 0, restarted.stderr
    stats = json.loads(restarted.stdout.strip().splitlines()[-1])
    assert stats["dead"] == 0 and stats["waiting"] == 0
    # 2 rules x 3 tenants = 6 notifications of 4 events each
    ids = collections.Counter(r.headers["webhook-id"] for r in rx.requests)
    assert len(ids) == 6
    duplicates = [n for n in ids.values() if n > 1]
    assert duplicates == [2]  # only the one in flight at after_send_before_mark, same webhook-id
    for r in rx.requests:
        assert len(json.loads(r.body)) == 4  # each notification carried its 4 events
    assert pending_count(redis_client, redis_prefix) == 0
    # nothing is left to do
    settings = Settings(redis_url=redis_url, redis_prefix=redis_prefix, alerts_dir=alerts)
    again = Dispatcher(settings, redis_client, consumer="crashy").drain(0)
    assert (again.read, again.notifications, again.sent) == (0, 0, 0)
    assert len(rx.requests) == 7
