"""CLI polish: completion, one duration grammar, log level/format checks, no hard wrap (9.12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alert_helpers import restore_logging  # noqa: F401 (fixture)
from typer.testing import CliRunner

from monitor.cli import app
from monitor.cli.app import parse_duration_arg

pytestmark = pytest.mark.usefixtures("restore_logging")


def test_shell_completion_is_offered() -> None:
    res = CliRunner().invoke(app, ["--show-completion", "bash"])
    assert res.exit_code == 0, res.output
    assert "_MDE_MONITOR_COMPLETE" in res.stdout


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("30s", 30.0), ("1h30m", 5400.0), ("2d", 172800.0)]
)
def test_one_duration_grammar(text: str, seconds: float) -> None:
    assert parse_duration_arg(text) == seconds


def test_duration_options_accept_the_grammar_and_reject_nonsense(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    config = tmp_path / "monitor.yaml"
    config.write_text(f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["--config", str(config), "events", "--since", "1h30m", "--json"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["--config", str(config), "events", "--since", "soon"])
    assert bad.exit_code == 2 and "1h30m" in bad.output
    bad = runner.invoke(app, ["--config", str(config), "dispatch", "--once", "--timeout", "x"])
    assert bad.exit_code == 2 and "not a duration" in bad.output
    replay = runner.invoke(
        app,
        ["--config", str(config), "--alerts-dir", str(tmp_path), "rules", "replay", "--since", "1h30m", "--json"],
    )  # fmt: skip
    assert replay.exit_code == 0, replay.output
    assert json.loads(replay.stdout)["events"] == 0


def test_bad_log_level_and_log_format_are_usage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["--log-level", "LOUD", "rules", "check"])
    assert res.exit_code == 2 and "LOUD" in res.output
    monkeypatch.setenv("MDE_MONITOR_LOG_FORMAT", "xml")
    res = runner.invoke(app, ["rules", "check"])
    assert res.exit_code == 2 and "MDE_MONITOR_LOG_FORMAT" in res.output


def test_log_format_env_is_honoured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    config = tmp_path / "monitor.yaml"
    config.write_text(f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\n")
    monkeypatch.setenv("MDE_MONITOR_LOG_FORMAT", "json")
    res = CliRunner().invoke(
        app,
        ["--config", str(config), "--alerts-dir", str(tmp_path / "none"), "dispatch", "--once"],
    )
    lines = [line for line in res.stderr.splitlines() if line.startswith("{")]
    assert lines and all(json.loads(line)["level"] for line in lines)


def test_no_hard_wrap_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    long_dir = tmp_path / ("a-very-long-directory-name-" * 6)
    res = CliRunner().invoke(app, ["--alerts-dir", str(long_dir), "rules", "check"])
    assert res.exit_code == 2
    assert str(long_dir) in res.output.replace("\n", "") and str(long_dir) in res.output
