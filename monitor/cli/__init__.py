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
from monitor.cli.app import app


def main() -> None:
    app()
