"""The console: `mde-monitor web`, server-rendered pages over the same Redis, JSON twins under
/api/, operator actions (silences, retries, sink enable, sync) audited.

`create_app` is imported lazily: `monitor.web.security` (used by the CLI before serving) loads
without the web stack."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from monitor.config import Settings


def create_app(settings: Settings, *, host: str = "127.0.0.1") -> Starlette:
    """The console ASGI app (see `monitor.web.app.create_app`)."""
    from monitor.web.app import create_app as _create

    return _create(settings, host=host)


__all__: list[Any] = ["create_app"]
