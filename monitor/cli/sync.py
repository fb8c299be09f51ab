"""`mde-monitor` commands: sync."""

from __future__ import annotations

from monitor.cli.app import app  # noqa: F401
