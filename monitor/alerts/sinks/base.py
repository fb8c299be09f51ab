"""The one small interface every sink implements, and the notification it is handed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from monitor.events.envelope import Event

Severity = Literal["info", "low", "medium", "high", "critical"]
Status = Literal["firing", "resolved"]


@dataclass(frozen=True)
class Notification:
    """One message to send: a digest of the events of one rule group.

    `id` is the idempotency key: unique per notification forever, repeated only by retries of
    its delivery (webhook-id, e-mail Message-ID, ...). `group_key` is stable across flushes of
    the same group (PagerDuty dedup_key, Slack thread, ...).
    """

    id: str
    rule: str
    description: str
    severity: Severity
    status: Status
    group_key: str
    group_labels: dict[str, str]  # the group_by values, e.g. {"tenant": "contoso"}
    title: str  # rendered, plain text, untrusted values included as-is (sinks escape)
    summary: str  # rendered, plain text, may be multi-line
    events: list[Event]  # the first N events of the group (digest)
    total: int  # number of events in the group (may exceed len(events))
    tenant: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DeliveryError(Exception):
    """A failed send; says whether a retry can help. Never carries a secret."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        disable: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after  # seconds, from Retry-After
        self.disable = disable  # the receiver said "gone" (410): disable the sink until re-enabled
        self.status = status


class Sink(Protocol):
    """A destination. `send` returns on success and raises DeliveryError otherwise."""

    name: str
    type: str

    def send(self, notification: Notification) -> None: ...

    def render(self, notification: Notification) -> str:
        """What `send` would deliver, pretty-printed, without any secret; sends nothing.

        JSON (indented) for the HTTP, file and stdout-json sinks; the full MIME text for e-mail.
        Secrets are masked (`***`) or left out (webhook URLs, the signature value).
        """
        ...

    def describe(self) -> str:
        """Where it sends, without secrets (e.g. "slack webhook hooks.slack.com/…")."""
        ...
