"""Sink types by name: each a settings model (extra keys forbidden) and a factory.

`build_sink("ops-slack", "slack", {"url": "https://hooks.slack.com/..."}, "alerts/sinks.yaml")`
validates the settings and returns the sink; any problem raises SinkConfigError naming the source
file, the sink and the field - never a secret value.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from monitor.alerts.sinks.base import Sink
from monitor.alerts.sinks.email import EmailSettings, EmailSink
from monitor.alerts.sinks.file import FileSettings, FileSink
from monitor.alerts.sinks.pagerduty import PagerDutySettings, PagerDutySink
from monitor.alerts.sinks.slack import SlackSettings, SlackSink
from monitor.alerts.sinks.stdout import StdoutSettings, StdoutSink
from monitor.alerts.sinks.teams import TeamsSettings, TeamsSink
from monitor.alerts.sinks.webhook import WebhookSettings, WebhookSink
from monitor.config import ConfigError, field_path

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

SINK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SinkConfigError(ConfigError):
    """A sink definition problem, naming the file, the sink and the field."""


@dataclass(frozen=True)
class SinkContext:
    """What factories may use besides the settings: Redis (shared rate limits), a default CA."""

    redis_client: redis.Redis | None = None
    redis_prefix: str = "mde"
    ca_bundle: Path | None = None


@dataclass(frozen=True)
class SinkType:
    """One registered sink type."""

    name: str
    settings_model: type[BaseModel]
    factory: Callable[[str, Any, SinkContext], Sink]
    description: str


def _slack(name: str, s: SlackSettings, ctx: SinkContext) -> Sink:
    return SlackSink(name, s, redis_client=ctx.redis_client, redis_prefix=ctx.redis_prefix)


SINK_TYPES: dict[str, SinkType] = {
    t.name: t
    for t in (
        SinkType("slack", SlackSettings, _slack, "Slack incoming webhook (Block Kit)"),
        SinkType(
            "webhook",
            WebhookSettings,
            lambda n, s, c: WebhookSink(n, s),
            "CloudEvents over HTTP, Standard Webhooks signature",
        ),
        SinkType(
            "teams",
            TeamsSettings,
            lambda n, s, c: TeamsSink(n, s),
            "Microsoft Teams Workflows webhook (Adaptive Card)",
        ),
        SinkType("email", EmailSettings, lambda n, s, c: EmailSink(n, s), "SMTP e-mail"),
        SinkType(
            "pagerduty",
            PagerDutySettings,
            lambda n, s, c: PagerDutySink(n, s),
            "PagerDuty Events API v2",
        ),
        SinkType("file", FileSettings, lambda n, s, c: FileSink(n, s), "JSON lines file"),
        SinkType(
            "stdout", StdoutSettings, lambda n, s, c: StdoutSink(n, s), "JSON lines or human text"
        ),
    )
}


def sink_types() -> list[str]:
    """The registered type names, sorted."""
    return sorted(SINK_TYPES)


def parse_sink_settings(name: str, type: str, settings: dict[str, Any], source: str) -> BaseModel:
    """The validated settings model; SinkConfigError naming source, sink and field otherwise."""
    where = f"{source}: sink {name!r}"
    if not isinstance(name, str) or not SINK_NAME.match(name):
        raise SinkConfigError(
            f"{where}: invalid sink name (letters, digits, '_', '.', '-'; starting alphanumeric)"
        )
    sink_type = SINK_TYPES.get(type)
    if sink_type is None:
        raise SinkConfigError(
            f"{where}: type: unknown sink type {type!r} (known: {', '.join(sink_types())})"
        )
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise SinkConfigError(f"{where} ({type}): expected a mapping of settings")
    data = dict(settings)
    for key in ("type", "name"):
        given = data.pop(key, None)
        expected = type if key == "type" else name
        if given is not None and given != expected:
            raise SinkConfigError(f"{where} ({type}): {key}: {given!r} does not match {expected!r}")
    try:
        return sink_type.settings_model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_input=False, include_url=False):
            field = field_path(err["loc"]) or "(settings)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown setting"
            lines.append(f"{where} ({type}): field {field!r}: {msg}")
        raise SinkConfigError("\n".join(lines)) from None


def build_sink(
    name: str,
    type: str,
    settings: dict[str, Any],
    source: str,
    *,
    redis_client: redis.Redis | None = None,
    redis_prefix: str = "mde",
    ca_bundle: Path | None = None,
) -> Sink:
    """Validate `settings` for sink type `type` and build the sink called `name`.

    `source` (the file the definition came from) prefixes every error. `redis_client` enables
    cross-process rate limits (Slack); `ca_bundle` is the default CA for HTTP sinks that do not
    set their own.
    """
    known = SINK_TYPES.get(type)
    if (
        ca_bundle is not None
        and known is not None
        and isinstance(settings, dict)
        and "ca_bundle" in known.settings_model.model_fields
        and settings.get("ca_bundle") is None
    ):
        settings = {**settings, "ca_bundle": ca_bundle}
    model = parse_sink_settings(name, type, settings, source)
    ctx = SinkContext(redis_client=redis_client, redis_prefix=redis_prefix, ca_bundle=ca_bundle)
    try:
        return SINK_TYPES[type].factory(name, model, ctx)
    except ValueError as exc:
        raise SinkConfigError(f"{source}: sink {name!r} ({type}): {exc}") from None
