"""`mde-monitor events` and `mde-monitor history` over events stored by real commits."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import redis
from detect_helpers import (
    TENANT,
    build_graph,
    commit,
    machine_key,
    mutated_tenant,
    pair_key,
    standard_tenant,
)
from typer.testing import CliRunner

from monitor.cli import app
from monitor.events import history, stream
from monitor.events.envelope import make_event
from monitor.snapshot.store import SnapshotStore


@pytest.fixture
def config(tmp_path: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis) -> Path:
    store = SnapshotStore(redis_client, redis_prefix)
    commit(store, build_graph(standard_tenant()), finished="2024-05-01T10:00:00.000Z")
    commit(store, build_graph(mutated_tenant()), finished="2024-05-01T11:00:00.000Z")
    t3 = mutated_tenant()
    t3.machines["m01"]["riskScore"] = "Medium"
    commit(store, build_graph(t3), finished="2024-05-01T12:00:00.000Z")
    path = tmp_path / "monitor.yaml"
    path.write_text(f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\n")
    return path


def run(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--config", str(config), *args])
    return result.exit_code, result.stdout


def test_events_human_lines(config: Path) -> None:
    code, text = run(config, "events", "--type", "mde.machine.risk_*")
    assert code == 0, text
    lines = text.strip().splitlines()
    assert len(lines) == 4  # three raised, then one lowered
    assert lines[0] == (
        "2024-05-01T11:00:00.000Z  contoso  mde.machine.risk_raised  m01.contoso.local"
        "  riskScore Low -> High"
    )
    assert lines[-1].endswith(
        "mde.machine.risk_lowered  m01.contoso.local  riskScore High -> Medium"
    )


def test_events_json_lines_limit_and_tenant(config: Path) -> None:
    code, text = run(config, "events", "--json", "--limit", "3", "--tenant", TENANT)
    assert code == 0
    events = [orjson.loads(line) for line in text.strip().splitlines()]
    assert [e["type"] for e in events] == [
        "mde.machine_vulnerability.resolved",  # the last of the second sync
        "mde.machine.updated",
        "mde.machine.risk_lowered",
    ]
    assert events[-1]["time"] == "2024-05-01T12:00:00.000Z"
    code, text = run(config, "events", "--json", "--limit", "0", "--tenant", "other")
    assert code == 0 and text == ""


def test_events_since(config: Path, redis_client: redis.Redis, redis_prefix: str) -> None:
    # stream ids carry the append time: everything here was appended seconds ago
    code, text = run(config, "events", "--json", "--since", "1h", "--limit", "0")
    assert code == 0 and len(text.strip().splitlines()) == redis_client.xlen(
        stream.stream_key(redis_prefix)
    )
    future = datetime.now(UTC).replace(year=datetime.now(UTC).year + 1).isoformat()
    code, text = run(config, "events", "--since", future)
    assert code == 0 and text == ""
    code, _ = run(config, "events", "--since", "yesterday-ish")
    assert code == 2


def test_history_of_a_machine(config: Path) -> None:
    code, text = run(config, "history", "--key", machine_key("m01"))
    assert code == 0, text
    lines = text.strip().splitlines()
    assert "2024-05-01T11:00:00.000Z  mde.machine.risk_raised  riskScore Low -> High" in lines
    assert "2024-05-01T12:00:00.000Z  mde.machine.risk_lowered  riskScore High -> Medium" in lines
    code, text = run(config, "history", "--key", machine_key("m00"), "--json")
    events = orjson.loads(text)
    assert {e["subject"] for e in events} == {
        pair_key("m00", "CVE-2024-1003"),
        pair_key("m00", "CVE-2024-1000"),
    }


def test_follow_yields_new_events(redis_client: redis.Redis, redis_prefix: str) -> None:
    stop = threading.Event()
    got: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        ready.set()
        for _sid, ev in history.follow(
            redis_client,
            redis_prefix,
            after_id="0",
            type_glob="mde.sync.*",
            block_ms=100,
            stop=stop,
        ):
            got.append(ev["type"])
            stop.set()

    th = threading.Thread(target=reader)
    th.start()
    ready.wait(5)
    pipe = redis_client.pipeline()
    events = [
        make_event(tenant=TENANT, type="mde.machine.created", subject="x", generation=1, data={}),
        make_event(tenant=TENANT, type="mde.sync.failed", subject=TENANT, generation=1, data={}),
    ]
    stream.append(pipe, redis_prefix, TENANT, events, maxlen=1000, retention_days=1)
    pipe.execute()
    th.join(10)
    assert got == ["mde.sync.failed"]


def test_parse_since() -> None:
    now = datetime(2024, 5, 2, tzinfo=UTC)
    assert history.parse_since("24h", now) == int(
        datetime(2024, 5, 1, tzinfo=UTC).timestamp() * 1000
    )
    assert history.parse_since("2024-05-01", now) == int(
        datetime(2024, 5, 1, tzinfo=UTC).timestamp() * 1000
    )
    with pytest.raises(ValueError, match="--since"):
        history.parse_since("soon", now)
