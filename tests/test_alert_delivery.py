"""Delivery to a real local webhook receiver: retries, Retry-After, dead letters, disabled sinks."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from alert_helpers import (
    FakeClock,
    change_event,
    publish,
    restore_logging,  # noqa: F401 (fixture)
    settings_for,
    write_alerts,
)
from sink_receivers import Receiver, Reply
from typer.testing import CliRunner

from monitor.alerts.deliver import backoff_delay, retry_delay, scrub
from monitor.alerts.dispatch import Dispatcher
from monitor.alerts.rules import DeliveryPolicy
from monitor.cli import app

pytestmark = pytest.mark.usefixtures("restore_logging")

TOKEN = "T0KEN-s3cr3t-path"

RULES = """
rules:
  - name: risk
    description: Risk raised
    severity: high
    match: {type: mde.machine.risk_raised}
    sinks: [hook]
    group_wait: 0s
"""


def sinks_yaml(url: str, max_attempts: int = 5) -> str:
    return f"""
delivery: {{max_attempts: {max_attempts}, backoff_base: 10ms, backoff_max: 40ms, jitter: 0}}
sinks:
  hook: {{type: webhook, url: "{url}/hooks/{TOKEN}"}}
"""


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


def make(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    client: redis.Redis,
    rx: Receiver,
    max_attempts: int = 5,
) -> tuple[Dispatcher, FakeClock]:
    alerts = write_alerts(tmp_path / "alerts", RULES, sinks_yaml(rx.url, max_attempts))
    clock = FakeClock()
    d = Dispatcher(
        settings_for(redis_url, prefix, alerts), client, "w1", clock=clock, sleep=clock.sleep
    )
    assert d.errors == [], d.errors
    return d, clock


def risk(i: int) -> dict:
    return change_event("mde.machine.risk_raised", i, "riskScore", "Low", "High")


def test_three_500s_then_200_delivers_once_with_the_same_webhook_id(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis, rx: Receiver
) -> None:
    d, _clock = make(tmp_path, redis_url, redis_prefix, redis_client, rx)
    rx.reply(500, 500, 500)
    publish(redis_client, redis_prefix, [risk(1)])
    stats = d.drain(10)
    assert (stats.sent, stats.retrying, stats.dead) == (1, 3, 0)
    requests = rx.wait_for(4)
    assert len(rx.requests) == 4
    ids = {r.headers["webhook-id"] for r in requests}
    assert len(ids) == 1
    (rec,) = d.queue.records()
    assert rec["status"] == "sent" and rec["attempts"] == "4"
    log = [e for e in d.queue.log_entries(50) if e["kind"] == "attempt"]
    assert [e["status"] for e in reversed(log)] == ["retrying"] * 3 + ["sent"]
    assert all(e["sink"] == "hook" and "latency_ms" in e for e in log)
    assert [e["attempt"] for e in reversed(log)] == ["1", "2", "3", "4"]
    everything = str(log) + str(rec) + str(d.queue.dead_letters())
    assert TOKEN not in everything


def test_429_retry_after_schedules_the_retry_at_that_time(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis, rx: Receiver
) -> None:
    d, clock = make(tmp_path, redis_url, redis_prefix, redis_client, rx)
    rx.reply(Reply(429, headers={"Retry-After": "7"}))
    publish(redis_client, redis_prefix, [risk(1)])
    d.run_once(flush_all=True)
    (did,) = d.due_deliveries()
    t0 = clock()
    out = d.deliver(did)
    assert out.status == "retrying" and out.http_status == 429
    assert out.retry_after == 7 and out.next_at == pytest.approx(t0 + 7)
    rec = d.queue.get(did)
    assert rec is not None and rec["retry_after"] == "7.0"
    assert float(rec["next_at"]) == pytest.approx(t0 + 7)
    assert d.due_deliveries() == []
    clock.advance(6.9)
    assert d.due_deliveries() == []
    clock.advance(0.2)
    assert d.due_deliveries() == [did]
    assert d.deliver(did).status == "sent"
    assert len(rx.wait_for(2)) == 2


def test_dead_letter_then_deliveries_retry_delivers_it(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis, rx: Receiver
) -> None:
    d, _clock = make(tmp_path, redis_url, redis_prefix, redis_client, rx, max_attempts=3)
    rx.reply(503, 503, 503)
    publish(redis_client, redis_prefix, [risk(1)])
    stats = d.drain(10)
    assert (stats.sent, stats.retrying, stats.dead) == (0, 2, 1)
    (dead,) = d.queue.dead_letters()
    assert dead["sink"] == "hook" and "gave up after 3 attempts" in dead["error"]
    assert TOKEN not in str(dead)
    (failed,) = d.queue.records(failed_only=True)
    assert failed["status"] == "dead"
    config = tmp_path / "monitor.yaml"
    config.write_text(
        f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\nalerts_dir: {tmp_path / 'alerts'}\n"
    )
    runner = CliRunner()
    listed = runner.invoke(
        app, ["--config", str(config), "deliveries", "list", "--failed", "--json"]
    )
    assert listed.exit_code == 0, listed.output
    assert '"status": "dead"' in listed.output and TOKEN not in listed.output
    result = runner.invoke(app, ["--config", str(config), "deliveries", "retry", dead["delivery"]])
    assert result.exit_code == 0, result.output
    assert f"{dead['delivery']}: sent" in result.output
    assert len(rx.wait_for(4)) == 4
    assert d.queue.get(dead["delivery"])["status"] == "sent"  # type: ignore[index]
    assert d.queue.records(failed_only=True) == []
    # retried then sent: no longer a dead letter anywhere (status, metrics, deliveries list)
    assert d.queue.dead_letters() == []
    st = runner.invoke(app, ["--config", str(config), "status", "--json"])
    doc = json.loads(st.stdout)
    assert (doc["dead_letters"], doc["failed_deliveries"]) == (0, [])
    metrics = runner.invoke(app, ["--config", str(config), "metrics"])
    assert "mde_dead_letters 0.0" in metrics.stdout


def test_not_retryable_goes_straight_to_the_dead_letters(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis, rx: Receiver
) -> None:
    d, _clock = make(tmp_path, redis_url, redis_prefix, redis_client, rx)
    rx.reply(400)
    publish(redis_client, redis_prefix, [risk(1)])
    stats = d.drain(10)
    assert (stats.sent, stats.dead) == (0, 1)
    assert len(rx.requests) == 1


def test_410_disables_the_sink_until_enabled(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis, rx: Receiver
) -> None:
    d, clock = make(tmp_path, redis_url, redis_prefix, redis_client, rx)
    rx.reply(410)
    publish(redis_client, redis_prefix, [risk(1)])
    stats = d.drain(10)
    assert stats.held == 1
    assert "hook" in d.queue.disabled_sinks()
    clock.advance(3600)
    publish(redis_client, redis_prefix, [risk(2)])
    stats = d.drain(10)
    assert stats.held == 1 and len(rx.requests) == 1  # not even tried while disabled
    config = tmp_path / "monitor.yaml"
    config.write_text(
        f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\nalerts_dir: {tmp_path / 'alerts'}\n"
    )
    runner = CliRunner()
    listed = runner.invoke(app, ["--config", str(config), "deliveries", "list"])
    assert "SINK DISABLED" in listed.output or "SINK DISABLED" in (listed.stderr or "")
    enabled = runner.invoke(app, ["--config", str(config), "sinks", "enable", "hook"])
    assert "2 held deliveries queued again" in enabled.output
    stats = d.drain(10)
    assert stats.sent == 2 and len(rx.wait_for(3)) == 3


def test_backoff_grows_with_jitter_and_retry_after_wins() -> None:
    policy = DeliveryPolicy(backoff_base=2, backoff_max=60, jitter=0.2)
    rng = random.Random(1)
    delays = [backoff_delay(n, policy, rng) for n in range(1, 8)]
    assert 1.6 <= delays[0] <= 2.4 and 6.4 <= delays[2] <= 9.6
    assert all(d <= 60 for d in delays) and delays[-1] >= 48
    assert retry_delay(3, policy, 7.0) == 7.0
    assert retry_delay(3, policy, 99999.0) == policy.retry_after_max


def test_scrub_removes_url_paths_and_secrets() -> None:
    text = (
        "POST https://hooks.slack.com/services/T0/B0/xyz failed token=abc Authorization: Bearer qq"
    )
    out = scrub(text)
    assert "xyz" not in out and "abc" not in out and "qq" not in out
    assert "https://hooks.slack.com/…" in out
