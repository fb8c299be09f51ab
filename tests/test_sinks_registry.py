"""Sink registry: every type builds from a dict; errors name the file, the sink and the field."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trustme
from sink_receivers import write_ca_bundle

from monitor.alerts.sinks.registry import SinkConfigError, build_sink, sink_types
from monitor.config import ConfigError

SECRET = "zzSECRETzz"

MINIMAL: dict[str, dict[str, Any]] = {
    "slack": {"url": f"https://hooks.slack.com/services/T/B/{SECRET}"},
    "webhook": {"url": f"https://siem.example.com/in?token={SECRET}"},
    "teams": {"url": f"https://prod.westeurope.logic.azure.com/workflows/x?sig={SECRET}"},
    "email": {"host": "smtp.example.com", "from": "m@example.com", "to": ["soc@example.com"],
              "username": "u", "password": SECRET},
    "pagerduty": {"routing_key": SECRET},
    "file": {"path": "/tmp/mde-alerts.jsonl"},
    "stdout": {},
}  # fmt: skip


def test_every_type_is_registered() -> None:
    assert sink_types() == sorted(MINIMAL)


@pytest.mark.parametrize("type_name", sorted(MINIMAL))
def test_builds_and_hides_secrets(type_name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sink = build_sink(f"my-{type_name}", type_name, MINIMAL[type_name], "alerts/sinks.yaml")
    assert callable(sink.send) and callable(sink.describe)
    assert sink.name == f"my-{type_name}" and sink.type == type_name
    for text in (repr(sink), sink.describe(), str(getattr(sink, "settings", "")), caplog.text):
        assert SECRET not in text


@pytest.mark.parametrize(
    ("name", "type_name", "settings", "expected"),
    [
        ("s", "carrier-pigeon", {}, "type: unknown sink type 'carrier-pigeon' (known: email,"),
        ("bad name", "stdout", {}, "invalid sink name"),
        ("s", "stdout", {"colour": "red"}, "field 'colour': unknown setting"),
        ("s", "stdout", {"format": "xml"}, "field 'format': Input should be 'json' or 'human'"),
        ("s", "slack", {}, "field 'url': Field required"),
        ("s", "slack", {"url": f"http://hooks.slack.com/{SECRET}"}, "field 'url': must use https://"),
        ("s", "slack", {"url": f"https://hooks.slack.com/{SECRET}", "max_events": 99}, "max_events"),
        ("s", "webhook", {"url": "https://x.example", "ca_bundle": "/nonexistent/ca.pem"},
         "field 'ca_bundle': file not found"),
        ("s", "pagerduty", {"routing_key": SECRET, "url": "http://events.example.com/x"},
         "field 'url': must use https://"),
        ("s", "stdout", {"type": "file"}, "type: 'file' does not match 'stdout'"),
    ],
)  # fmt: skip
def test_errors_name_file_sink_and_field(
    name: str, type_name: str, settings: dict[str, Any], expected: str
) -> None:
    with pytest.raises(SinkConfigError) as info:
        build_sink(name, type_name, settings, "alerts/sinks.yaml")
    text = str(info.value)
    assert text.startswith(f"alerts/sinks.yaml: sink {name!r}")
    assert expected in text
    assert SECRET not in text
    assert isinstance(info.value, ConfigError)


def test_type_and_name_keys_are_tolerated() -> None:
    sink = build_sink("out", "stdout", {"type": "stdout", "name": "out"}, "s.yaml")
    assert sink.describe() == "stdout (json)"


def test_default_ca_bundle_is_applied(tmp_path: Path) -> None:
    bundle = write_ca_bundle(trustme.CA(), tmp_path)
    sink = build_sink("w", "webhook", {"url": "https://x.example/in"}, "s.yaml", ca_bundle=bundle)
    assert sink.settings.ca_bundle == bundle  # type: ignore[attr-defined]
    own = tmp_path / "own.pem"
    own.write_bytes(bundle.read_bytes())
    sink = build_sink(
        "w", "webhook", {"url": "https://x.example/in", "ca_bundle": str(own)}, "s.yaml",
        ca_bundle=bundle,
    )  # fmt: skip
    assert sink.settings.ca_bundle == own  # type: ignore[attr-defined]
