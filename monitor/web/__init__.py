"""The console: `mde-monitor web`, server-rendered pages over the same Redis, JSON twins under
/api/, operator actions (silences, retries, sink enable, sync) audited."""

from monitor.web.app import create_app

__all__ = ["create_app"]
