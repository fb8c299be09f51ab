"""Generic webhook sink: CloudEvents JSON over HTTP, signed per the Standard Webhooks spec.

Body, one POST per notification (the pipeline retries the same notification with the same body
semantics and the same `webhook-id`):

- `batch: true` (default) - the change events themselves. A notification with one event is sent
  in CloudEvents structured mode (`application/cloudevents+json`, the event object); with more, in
  batched mode (`application/cloudevents-batch+json`, a JSON array of events).
- `batch: false` - always a single CloudEvent (`application/cloudevents+json`) of type
  `mde.alert.firing` / `mde.alert.resolved` whose `data` is the notification (rule, severity,
  status, group, title, summary, total) with its `events` array: one self-describing object.

In both modes the notification is also described in headers: `mde-rule`, `mde-status`,
`mde-severity`, `mde-group-key`, `mde-total` (not covered by the signature - the body is).

Signature (https://www.standardwebhooks.com): `webhook-id` = notification.id (stable across
retries, so receivers can de-duplicate), `webhook-timestamp` = unix seconds of this attempt,
`webhook-signature` = `v1,` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), where the key is
the base64-decoded part of the `whsec_...` secret. Without a `secret` the id and timestamp
are still sent, with no signature.

`render` (the `rules test` preview) shows the headers and the indented body; the URL is left out,
custom header values are `***` and the signature reads `v1,<computed at send time>`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Any

import orjson
from pydantic import Field, SecretStr, field_validator

from monitor.alerts.sinks.base import Notification
from monitor.alerts.sinks.common import (
    HttpSinkSettings,
    SecretUrl,
    notification_document,
    pretty_json,
)
from monitor.alerts.sinks.http import HttpSink
from monitor.events.envelope import SPEC_VERSION, utc_now_iso

SINGLE_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json; charset=utf-8"
_RESERVED_HEADERS = {
    "content-type",
    "content-length",
    "host",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
}
MIN_SECRET_BYTES = 24
MASK = "***"
SIGNATURE_PLACEHOLDER = "v1,<computed at send time>"


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (`whsec_<base64>` or bare base64)."""
    raw = secret.removeprefix("whsec_")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 after the whsec_ prefix") from None


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256>`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSettings(HttpSinkSettings):
    """`type: webhook` - any HTTP receiver of CloudEvents."""

    url: SecretUrl
    secret: SecretStr | None = None
    batch: bool = True
    headers: dict[str, SecretStr] = Field(default_factory=dict)

    @field_validator("secret")
    @classmethod
    def _secret_ok(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            key = decode_secret(value.get_secret_value())
            if len(key) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"decodes to {len(key)} bytes; use at least {MIN_SECRET_BYTES}"
                    " (e.g. 'whsec_' + base64 of 32 random bytes)"
                )
        return value

    @field_validator("headers")
    @classmethod
    def _headers_ok(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name in value:
            if name.lower() in _RESERVED_HEADERS or not name.isascii() or not name:
                raise ValueError(f"{name!r} cannot be set here")
            if any(c in value[name].get_secret_value() for c in "\r\n"):
                raise ValueError(f"{name!r} has a line break")
        return value


def alert_event(notification: Notification) -> dict[str, Any]:
    """The notification as one CloudEvent `mde.alert.<status>` carrying its events."""
    n = notification
    return {
        "specversion": SPEC_VERSION,
        "id": n.id,
        "source": f"mde-monitor/{n.tenant}" if n.tenant else "mde-monitor",
        "type": f"mde.alert.{n.status}",
        "subject": n.rule,
        "time": utc_now_iso(),
        "datacontenttype": "application/json",
        "data": notification_document(n),
    }


def build_document(notification: Notification, *, batch: bool) -> tuple[Any, str]:
    """(JSON document, content type) for this notification and mode (see the module docstring)."""
    if not batch:
        return alert_event(notification), SINGLE_CONTENT_TYPE
    if len(notification.events) == 1:
        return notification.events[0], SINGLE_CONTENT_TYPE
    return list(notification.events), BATCH_CONTENT_TYPE


def build_body(notification: Notification, *, batch: bool) -> tuple[bytes, str]:
    """(body, content type) for this notification and mode (see the module docstring)."""
    document, content_type = build_document(notification, batch=batch)
    return orjson.dumps(document, default=str), content_type


def _header_value(text: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text)[:200]


class WebhookSink(HttpSink):
    """POSTs CloudEvents JSON, signed with Standard Webhooks headers when a secret is set."""

    type = "webhook"

    def __init__(self, name: str, settings: WebhookSettings) -> None:
        self.settings = settings
        self._key = decode_secret(settings.secret.get_secret_value()) if settings.secret else None
        self._extra = {k: v.get_secret_value() for k, v in settings.headers.items()}
        secrets = list(self._extra.values())
        if settings.secret:
            secrets.append(settings.secret.get_secret_value())
        super().__init__(name, settings.url.get_secret_value(), settings, secrets=secrets)

    def describe(self) -> str:
        signed = "signed" if self._key else "unsigned"
        return f"webhook {self._target} ({signed}, {'batch' if self.settings.batch else 'alert'})"

    def _headers(
        self, notification: Notification, content_type: str, timestamp: int, *, masked: bool
    ) -> dict[str, str]:
        """Every request header but the signature; custom header values `***` when `masked`."""
        extra = {k: MASK for k in self._extra} if masked else self._extra
        return {
            **extra,
            "content-type": content_type,
            "mde-rule": _header_value(notification.rule),
            "mde-status": notification.status,
            "mde-severity": notification.severity,
            "mde-group-key": _header_value(notification.group_key),
            "mde-total": str(max(notification.total, len(notification.events))),
            "webhook-id": notification.id,
            "webhook-timestamp": str(timestamp),
        }

    def render(self, notification: Notification) -> str:
        """The headers, a blank line and the indented body; no URL, secret or signature value."""
        document, content_type = build_document(notification, batch=self.settings.batch)
        headers = self._headers(notification, content_type, int(time.time()), masked=True)
        if self._key is not None:
            headers["webhook-signature"] = SIGNATURE_PLACEHOLDER
        head = "".join(f"{k}: {v}\n" for k, v in headers.items())
        return f"{head}\n{pretty_json(document)}"

    def send(self, notification: Notification) -> None:
        """One signed POST of the CloudEvents body."""
        body, content_type = build_body(notification, batch=self.settings.batch)
        timestamp = int(time.time())
        headers = self._headers(notification, content_type, timestamp, masked=False)
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, notification.id, timestamp, body)
        self._poster.post(body, headers)
