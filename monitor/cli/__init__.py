"""The `mde-monitor` command line: one module per command group."""

# isort: skip_file
# Each module registers its commands on `app`; --help lists them in this (workflow) order.
from __future__ import annotations

from monitor.cli.app import ExitCode, app, console
from monitor.cli import sync  # noqa: F401  sync, check, export
from monitor.cli import events  # noqa: F401  events, history
from monitor.cli import alerts  # noqa: F401  dispatch, rules, deliveries, silence, sinks
from monitor.cli import run  # noqa: F401  worker, beat, trigger, status, metrics, demo
from monitor.cli import simulate  # noqa: F401
from monitor.cli import document  # noqa: F401
from monitor.cli import query  # noqa: F401  query, questions
from monitor.cli import web  # noqa: F401  the console
from monitor.config import ConfigError


def main() -> None:
    """Entry point of the `mde-monitor` console script."""
    from monitor.memory import pin_mmap_threshold
    from monitor.redis_conn import describe_error, is_redis_error

    pin_mmap_threshold()
    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]config error[/red]: {exc}", highlight=False)
        raise SystemExit(ExitCode.USAGE) from None
    except Exception as exc:
        if not is_redis_error(exc):
            raise
        # Redis down, wrong password, untrusted certificate: one line, password masked
        console.print(f"[red]error[/red]: {describe_error(exc)}", highlight=False, soft_wrap=True)
        raise SystemExit(ExitCode.FAILED) from None
