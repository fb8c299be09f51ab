"""Issue 10 item 9: hostile display names are inert in every block of every sink.

Slack's header block carried the raw display name (`<!channel>`, `<@U123>`); zero-width and
bidi control characters reached the receivers invisibly (PagerDuty custom_details included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis
from alert_helpers import FakeClock, publish, settings_for, write_alerts
from sink_receivers import Receiver, machine_event

from monitor.alerts.dispatch import Dispatcher
from monitor.events.envelope import utc_now_iso

HOSTILE_NAME = "<!channel> <@U123> <#C1|x> & @here \u200bvm\u2066\u202e\u200c1\ufeff"
INVISIBLE = ("\u200b", "\u2066", "\u202e", "\u200c", "\ufeff")


def _strings(doc: Any) -> list[str]:
    out: list[str] = []
    stack = [doc]
    while stack:
        cur = stack.pop()
        if isinstance(cur, str):
            out.append(cur)
        elif isinstance(cur, dict):
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return out


def test_mentions_and_invisible_characters_are_inert_in_every_block_and_sink(
    tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    with Receiver() as rx:
        alerts = write_alerts(
            tmp_path / "alerts",
            """
            rules:
              - name: risk
                match: {type: mde.machine.risk_raised}
                sinks: [chat, pd, teams]
                group_wait: 0s
            """,
            f"""
            sinks:
              chat: {{type: slack, url: "{rx.url}/slack/T0/B0/abcdefgh"}}
              pd: {{type: pagerduty, routing_key: "R0123456789", url: "{rx.url}/pd"}}
              teams: {{type: teams, url: "{rx.url}/teams/abcdefgh"}}
            """,
        )
        event = machine_event(HOSTILE_NAME)
        event["time"] = utc_now_iso()
        publish(redis_client, redis_prefix, [event])
        clock = FakeClock()
        d = Dispatcher(
            settings_for(redis_url, redis_prefix, alerts),
            redis_client,
            clock=clock,
            sleep=clock.sleep,
        )
        assert d.drain(10).sent == 3
        d.close()
        bodies = {r.path.split("/")[1]: json.loads(r.body) for r in rx.requests}
    slack = bodies["slack"]
    assert slack["blocks"][0]["type"] == "header"
    for text in _strings(slack):
        for raw in ("<!channel>", "<@U123>", "<#C1|x>", " & "):
            assert raw not in text, (raw, text)
    header = slack["blocks"][0]["text"]["text"]
    assert "&lt;!channel&gt;" in header and "&lt;@U123&gt;" in header
    # zero-width and bidi characters: visible markers in every sink, custom_details included
    for sink, doc in bodies.items():
        texts = _strings(doc if sink != "pd" else doc["payload"])
        assert any("U+202E" in t for t in texts), sink
        for text in texts:
            for ch in INVISIBLE:
                if sink == "slack" and ch == "\u200b":
                    continue  # Slack's own escape of * _ ~ ` (slack.py docstring), not the input's
                assert ch not in text, (sink, repr(ch), text)
    details = bodies["pd"]["payload"]["custom_details"]
    assert "<U+200B>" in details["events"][0]["displayName"]
