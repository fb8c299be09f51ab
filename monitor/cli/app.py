"""The `mde-monitor` Typer app, its global options and exit codes (command modules attach here)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from monitor.config import ConfigError, Settings, load_settings


class ExitCode(IntEnum):
    """Exit codes scripts can rely on."""

    OK = 0
    FAILED = 1  # the work failed (sign-in, every resource, delivery)
    USAGE = 2  # bad command line, config or rule file
    DEGRADED = 3  # done, but partially (a resource kept its previous data)
    BUSY = 4  # the tenant is being synced by someone else
    MISSING_PERMISSION = 5  # `check`: a permission or consent is missing


app = typer.Typer(
    name="mde-monitor",
    help=(
        "Change monitor for Microsoft Defender for Endpoint: collects Graph and Defender data,\n"
        "snapshots it in Redis, turns differences into change events and alerts on them.\n\n"
        "Exit codes: 0 ok, 1 failed, 2 usage/config error, 3 degraded (partial data kept),\n"
        "4 tenant busy, 5 permission missing."
    ),
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, pwsh)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Messages (stderr) never hard-wrap: a long path or error stays one greppable line. Output on
# stdout wraps only on a terminal (piped into a file or another program, lines stay whole).
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=not sys.stdout.isatty())


@dataclass
class State:
    config_path: Path | None = None
    alerts_dir: Path | None = None
    _settings: Settings | None = field(default=None, repr=False)

    def settings(self) -> Settings:
        """The loaded config; a config error exits 2 with the file and field named."""
        if self._settings is None:
            try:
                self._settings = load_settings(self.config_path)
            except ConfigError as exc:
                console.print(f"[red]config error[/red]: {exc}", markup=True, highlight=False)
                raise typer.Exit(ExitCode.USAGE) from None
            if self.alerts_dir is not None:
                self._settings.alerts_dir = self.alerts_dir
        return self._settings


state = State()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r}: use one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def _version(value: bool) -> None:
    if value:
        from monitor import package_version

        sys.stdout.write(f"mde-monitor {package_version()}\n")
        raise typer.Exit(0)


@app.callback()
def _global(
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        envvar="MDE_MONITOR_CONFIG",
        help="Config file (default config/monitor.yaml).",
    ),
    alerts_dir: Path | None = typer.Option(
        None, "--alerts-dir", help="Rule and sink files (default: the config's alerts_dir)."
    ),
    log_level: str = typer.Option(
        "WARNING",
        "--log-level",
        help="DEBUG, INFO, WARNING, ERROR.",
        callback=_log_level,
    ),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    from monitor.logs import setup_logging

    state.config_path = config
    state.alerts_dir = alerts_dir
    state._settings = None
    try:
        setup_logging(log_level)
    except ValueError as exc:
        console.print(f"[red]usage error[/red]: {exc}", highlight=False)
        raise typer.Exit(ExitCode.USAGE) from None


_json_stdout: list[Any] = []  # the real stdout while a --json command runs


def _json_mode(ctx: typer.Context, value: bool) -> bool:
    """With --json, stdout carries only the JSON: everything else written there goes to stderr."""
    if value and not _json_stdout:
        real = sys.stdout
        _json_stdout.append(real)
        sys.stdout = sys.stderr

        def restore() -> None:
            if _json_stdout and _json_stdout[0] is real:
                _json_stdout.clear()
                sys.stdout = real

        ctx.call_on_close(restore)
    return value


def json_option(help: str = "Machine-readable output on stdout (and nothing else there).") -> Any:
    """The `--json` option of every command (see `_json_mode`)."""
    return typer.Option(False, "--json", help=help, callback=_json_mode)


def json_stream() -> Any:
    """Where machine-readable output goes: the real stdout (also while --json diverts it)."""
    return _json_stdout[0] if _json_stdout else sys.stdout


def parse_duration_arg(text: str) -> float:
    """Seconds from one grammar for every duration option: `90`, `30s`, `5m`, `1h30m`, `2d`."""
    from monitor.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def duration_option(default: float, *flags: str, help: str) -> Any:
    """A duration option (seconds, or `1h30m` style): the same grammar everywhere."""
    return typer.Option(
        default,
        *flags,
        parser=parse_duration_arg,
        metavar="DURATION",
        help=f"{help} (e.g. 90s, 5m, 1h30m)",
    )


def since_ms(text: str, option: str = "--since") -> int:
    """Epoch ms for `--since`: a duration ago (`24h`, `1h30m`, `7d`) or an ISO date/time.

    Durations in the rule files' grammar (`parse_duration`); the rest is the event history's
    own `parse_since` (ISO, UTC when naive)."""
    import time

    from monitor.durations import parse_duration
    from monitor.events.history import parse_since

    try:
        return int((time.time() - parse_duration(text)) * 1000)
    except ValueError:
        pass
    try:
        return parse_since(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: expected a duration like 24h, 1h30m, 7d or an ISO date/time",
            param_hint=option,
        ) from None


def print_json(data: Any) -> None:
    """Machine-readable output on stdout."""
    stream = json_stream()
    stream.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    stream.flush()
