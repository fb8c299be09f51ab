"""The `mde-monitor` command line: one module per command group."""

from __future__ import annotations

from monitor.cli import (  # noqa: F401  (each module registers its commands on `app`)
    alerts,
    document,
    events,
    run,
    simulate,
    sync,
)
from monitor.cli.app import ExitCode, app, console
from monitor.config import ConfigError


def main() -> None:
    """Entry point of the `mde-monitor` console script."""
    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]config error[/red]: {exc}", highlight=False)
        raise SystemExit(ExitCode.USAGE) from None
