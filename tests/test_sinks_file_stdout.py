"""File and stdout sinks: JSON lines with the events; a safe compact human form."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from sink_receivers import HOSTILE, hostile_notification, machine_event, make_notification

from monitor.alerts.sinks.base import DeliveryError
from monitor.alerts.sinks.file import FileSettings, FileSink
from monitor.alerts.sinks.stdout import StdoutSettings, StdoutSink


def test_file_appends_one_line_per_notification(tmp_path: Path) -> None:
    path = tmp_path / "out" / "alerts.jsonl"
    sink = FileSink("siem-file", FileSettings(path=path))
    first = make_notification([machine_event("a"), machine_event("b")], total=3)
    sink.send(first)
    sink.send(hostile_notification())
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    doc = json.loads(lines[0])
    assert doc["id"] == first.id and doc["rule"] == first.rule and doc["total"] == 3
    assert doc["status"] == "firing" and doc["group_labels"] == {"tenant": "contoso"}
    assert doc["events"] == first.events
    hostile = json.loads(lines[1])
    assert hostile["events"][0]["data"]["displayName"] == HOSTILE  # exact data, JSON-escaped
    assert "\x1b" not in lines[1]  # control characters are escaped by JSON
    assert str(path) in sink.describe()


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as info:
        FileSink("f", FileSettings(path=tmp_path)).send(make_notification())  # a directory
    assert not info.value.retryable and "file sink 'f'" in str(info.value)
    with pytest.raises(DeliveryError):
        FileSink("f", FileSettings(path=tmp_path / "no" / "x.jsonl", mkdir=False)).send(
            make_notification()
        )


def test_stdout_json(capsys: pytest.CaptureFixture[str]) -> None:
    n = make_notification()
    StdoutSink("out", StdoutSettings()).send(n)
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert json.loads(out)["events"] == n.events


def test_stdout_human_is_compact_and_safe() -> None:
    stream = io.StringIO()
    sink = StdoutSink("out", StdoutSettings(format="human", max_events=2), stream=stream)
    sink.send(make_notification([machine_event("a"), machine_event("b")], total=4))
    text = stream.getvalue()
    assert text.splitlines()[0] == (
        "[HIGH] FIRING machine-risk-high - Machine risk raised to High (contoso, 4 events)"
    )
    assert "  machine.risk_raised: a" in text and "riskScore: Low -> High" in text
    assert text.rstrip().endswith("... and 2 more")
    stream.seek(0)
    stream.truncate()
    sink.send(hostile_notification())
    text = stream.getvalue()
    assert "\x1b" not in text and "\u202e" not in text and "<U+001B>[31mred" in text
    assert max(len(line) for line in text.splitlines()) < 800
