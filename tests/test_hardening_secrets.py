"""Issue 10 item 8: configured secrets never show, whoever echoes them.

Patterns catch `client_secret=`, `access_token=`, JSON-quoted `"access_token"`, `"token"` and
`"routing_key"`; every configured secret is also masked by exact value in error text, events,
logs, delivery records and `deliveries list/log`.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import redis
from alert_helpers import (
    change_event,
    publish,
    restore_logging,  # noqa: F401 (fixture)
    sync_event,
    write_alerts,
)
from sink_receivers import Receiver, Reply
from typer.testing import CliRunner

from monitor.alerts.dispatch import Dispatcher
from monitor.auth import explain_auth_failure
from monitor.cli import app
from monitor.config import load_settings
from monitor.events import stream
from monitor.logs import JsonFormatter
from monitor.redact import scrub

pytestmark = pytest.mark.usefixtures("restore_logging")

CLIENT_SECRET = "Qx8~cl1ent.S3cret-from-entra"
URL_TOKEN = "hookT0kenAbCdEfGh123456"
ROUTING_KEY = "R0uting0123456789abcdef01234567"


@pytest.mark.parametrize(
    "text",
    [
        "POST body: grant_type=client_credentials&client_secret=abcDEF123~x&scope=x",
        "redirect with access_token=eyJ0eXAiOiJKV1Qi.eyJhdWQiOiJ4In0.sig and more",
        '{"token_type": "Bearer", "access_token": "eyJ0eXAiOiJKV1Qi.eyJ.sig", "expires_in": 3599}',
        '{"token": "xoxb-1234-5678-abcdef"}',
        '{"routing_key": "R0123456789abcdef0123456789abcdef", "event_action": "trigger"}',
    ],
)
def test_scrub_masks_underscore_and_json_quoted_secret_keys(text: str) -> None:
    out = scrub(text)
    for secret in (
        "abcDEF123~x",
        "eyJ0eXAiOiJKV1Qi",
        "xoxb-1234",
        "R0123456789abcdef",
    ):
        assert secret not in out, out
    assert "***" in out


def _config(tmp_path: Path, redis_url: str, prefix: str, alerts: Path) -> Path:
    config = tmp_path / "monitor.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            redis_url: {redis_url}
            redis_prefix: {prefix}
            alerts_dir: {alerts}
            tenants:
              - name: contoso
                tenant_id: 00000000-0000-0000-0000-000000000001
                client_id: 00000000-0000-0000-0000-000000000002
                client_secret: "{CLIENT_SECRET}"
            """
        )
    )
    return config


def test_configured_secrets_are_masked_in_errors_events_logs_and_delivery_records(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    with Receiver() as rx:
        # both receivers answer 400 echoing what they were sent: the URL token, the routing key
        rx.reply(
            Reply(400, f'{{"error": "unknown hook {URL_TOKEN}"}}'),
            Reply(400, f"bad routing key {ROUTING_KEY} (\\u0022{ROUTING_KEY}\\u0022)"),
        )
        alerts = write_alerts(
            tmp_path / "alerts",
            """
            rules:
              - name: failed
                match: {type: mde.sync.failed}
                sinks: [chat]
                group_wait: 0s
              - name: risk
                match: {type: mde.machine.risk_raised}
                sinks: [pd]
                group_wait: 0s
            """,
            f"""
            delivery: {{max_attempts: 1}}
            sinks:
              chat: {{type: slack, url: "{rx.url}/services/T0/B0/{URL_TOKEN}"}}
              pd: {{type: pagerduty, routing_key: "{ROUTING_KEY}", url: "{rx.url}/enqueue"}}
            """,
        )
        config = _config(tmp_path, redis_url, redis_prefix, alerts)
        settings = load_settings(config)  # registers the client secret
        # a token endpoint error that echoes the client secret (as a misbehaving proxy did)
        err = explain_auth_failure(
            {"error": "invalid_client", "error_description": f"bad secret {CLIENT_SECRET}"}
        )
        assert CLIENT_SECRET not in str(err) and "***" in str(err)
        # ... and a sync.failed event built from unscrubbed text still never stores it
        publish(
            redis_client,
            redis_prefix,
            [
                sync_event("mde.sync.failed", {"stage": "auth", "error": f"x {CLIENT_SECRET}"}),
                change_event("mde.machine.risk_raised", 1, "riskScore", "Low", "High"),
            ],
        )
        stored = [e for _sid, e in stream.read_range(redis_client, redis_prefix)]
        assert CLIENT_SECRET not in json.dumps(stored)
        d = Dispatcher(settings, redis_client)
        stats = d.drain(10)
        d.close()
        assert stats.dead == 2, stats
        sent = b"".join(r.body for r in rx.requests)
        assert len(rx.requests) == 2 and CLIENT_SECRET.encode() not in sent
    runner = CliRunner()
    outputs = [
        runner.invoke(app, ["--config", str(config), *args])
        for args in (
            ["deliveries", "list", "--json"],
            ["deliveries", "log", "--json"],
            ["deliveries", "list"],
        )
    ]
    for res in outputs:
        assert res.exit_code in (0, 3), res.output
        for secret in (URL_TOKEN, ROUTING_KEY, CLIENT_SECRET):
            assert secret not in res.output, (secret, res.output)
    assert "HTTP 400" in outputs[0].output
    # every Redis value of this deployment
    for key in redis_client.scan_iter(f"{redis_prefix}:*"):
        kind = redis_client.type(key)
        dump = redis_client.dump(key) or b""
        for secret in (URL_TOKEN, ROUTING_KEY, CLIENT_SECRET):
            assert secret.encode() not in dump, (key, kind)
    # logs: message, extra fields and exception text
    record = logging.getLogger("t").makeRecord(
        "t",
        logging.ERROR,
        __file__,
        1,
        "failed with %s",
        (CLIENT_SECRET,),
        None,
        extra={"error": f"{ROUTING_KEY} / {URL_TOKEN}"},
    )
    line = JsonFormatter().format(record)
    for secret in (URL_TOKEN, ROUTING_KEY, CLIENT_SECRET):
        assert secret not in line
