"""E-mail sink: one multipart/alternative message (plain text + HTML) per notification over SMTP.

Transport: STARTTLS by default (refused if the server does not offer it - no silent downgrade),
or implicit TLS with `ssl: true` (port 465; `starttls` is then ignored). Plain SMTP (`starttls:
false`, `ssl: false`) is accepted only for a loopback host (a local relay). AUTH with `username`
and `password` after TLS. `ca_bundle` trusts a private/test CA instead of the system store.

`Message-ID` is derived from notification.id, so a retried send of the same notification carries
the same id (mail clients and archives can drop the duplicate). Untrusted values are HTML-escaped
by Jinja2 autoescape in the HTML part; both parts show control and bidi characters as `<U+XXXX>`.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Any

import jinja2
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from monitor.alerts.sinks.base import DeliveryError, Notification
from monitor.alerts.sinks.common import (
    CaBundle,
    SinkSettings,
    change_lines,
    event_kind,
    event_name,
    more_text,
    safe_text,
    shorten,
)
from monitor.alerts.sinks.http import is_loopback_host

log = logging.getLogger(__name__)

SUBJECT_LIMIT = 200
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _address(value: str) -> str:
    if any(c in value for c in "\r\n"):
        raise ValueError("address has a line break")
    _, addr = parseaddr(value)
    if "@" not in addr or addr.startswith("@") or addr.endswith("@"):
        raise ValueError(f"not an e-mail address: {value!r}")
    return value


class EmailSettings(SinkSettings):
    """`type: email` - SMTP submission."""

    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    starttls: bool = True
    ssl: bool = False
    username: str | None = None
    password: SecretStr | None = None
    from_: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    subject_prefix: str = "[mde-monitor]"
    ca_bundle: CaBundle = None
    timeout_seconds: float = Field(default=20.0, gt=0, le=300)
    max_events: int = Field(default=50, ge=0, le=500)
    helo_name: str | None = None

    model_config = ConfigDict(populate_by_name=True)

    @field_validator("from_")
    @classmethod
    def _from_ok(cls, value: str) -> str:
        return _address(value)

    @field_validator("to")
    @classmethod
    def _to_ok(cls, value: list[str]) -> list[str]:
        return [_address(v) for v in value]

    @field_validator("subject_prefix")
    @classmethod
    def _prefix_ok(cls, value: str) -> str:
        if any(c in value for c in "\r\n"):
            raise ValueError("has a line break")
        return value

    @model_validator(mode="after")
    def _transport_ok(self) -> EmailSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither")
        if not self.ssl and not self.starttls and not is_loopback_host(self.host):
            raise ValueError(
                "plain SMTP without TLS is allowed only to a loopback host;"
                " keep starttls: true or use ssl: true"
            )
        return self

    @property
    def effective_port(self) -> int:
        return self.port or (465 if self.ssl else 587)


_HTML = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """<!DOCTYPE html>
<html><body style="font-family: sans-serif">
<h2 style="color: {{ color }}">{{ title }}</h2>
{% if summary %}<p style="white-space: pre-wrap">{{ summary }}</p>{% endif %}
<table cellpadding="3">
{% for label, value in facts %}<tr><th align="left">{{ label }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
{% for ev in events %}<h4 style="margin-bottom: 2px">{{ ev.kind }}: {{ ev.name }}</h4>
{% if ev.lines %}<ul style="margin-top: 2px">{% for line in ev.lines %}<li>{{ line }}</li>{% endfor %}</ul>{% endif %}
{% endfor %}{% if more %}<p><i>{{ more }}</i></p>{% endif %}
<p style="color: #888; font-size: small">mde-monitor</p>
</body></html>
"""
)


def _context(notification: Notification, max_events: int) -> dict[str, Any]:
    n = notification
    shown = n.events[:max_events]
    return {
        "title": ("[RESOLVED] " if n.status == "resolved" else "") + safe_text(n.title),
        "summary": safe_text(n.summary).strip(),
        "color": "#2e7d32" if n.status == "resolved" else "#c62828",
        "facts": [
            ("Severity", n.severity.upper()),
            ("Status", n.status),
            ("Tenant", safe_text(n.tenant or n.group_labels.get("tenant") or "-")),
            ("Rule", safe_text(n.rule)),
            ("Events", str(max(n.total, len(n.events)))),
        ],
        "events": [
            {"kind": event_kind(e), "name": event_name(e), "lines": change_lines(e)} for e in shown
        ],
        "more": more_text(n, len(shown)),
    }


def render_text(ctx: dict[str, Any]) -> str:
    """The text/plain part."""
    out = [ctx["title"], ""]
    if ctx["summary"]:
        out += [ctx["summary"], ""]
    out += [f"{label}: {value}" for label, value in ctx["facts"]]
    for ev in ctx["events"]:
        out += ["", f"{ev['kind']}: {ev['name']}", *(f"  - {line}" for line in ev["lines"])]
    if ctx["more"]:
        out += ["", ctx["more"]]
    out += ["", "-- ", "mde-monitor"]
    return "\n".join(out) + "\n"


def message_id(notification_id: str, from_addr: str) -> str:
    """`<id@domain>` from the notification id (stable across retries) and the sender's domain."""
    local = _ID_UNSAFE.sub("-", notification_id)[:120] or "notification"
    domain = parseaddr(from_addr)[1].rpartition("@")[2]
    domain = _ID_UNSAFE.sub("-", domain) or "mde-monitor.invalid"
    return f"<{local}@{domain}>"


def build_message(notification: Notification, settings: EmailSettings) -> EmailMessage:
    """The multipart/alternative message (text + HTML)."""
    ctx = _context(notification, settings.max_events)
    subject = " ".join(
        x for x in (settings.subject_prefix, safe_text(ctx["title"], single_line=True)) if x
    )
    msg = EmailMessage()
    msg["Subject"] = shorten(subject, SUBJECT_LIMIT)
    msg["From"] = settings.from_
    msg["To"] = ", ".join(settings.to)
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id(notification.id, settings.from_)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-MDE-Severity"] = notification.severity
    msg["X-MDE-Status"] = notification.status
    msg.set_content(render_text(ctx))
    msg.add_alternative(_HTML.render(**ctx), subtype="html")
    return msg


def _smtp_error(where: str, exc: smtplib.SMTPResponseException) -> DeliveryError:
    code = int(exc.smtp_code)
    text = (
        exc.smtp_error.decode("utf-8", "replace")
        if isinstance(exc.smtp_error, bytes)
        else str(exc.smtp_error)
    )
    text = " ".join(text.split())[:200]
    retryable = 400 <= code < 500 or code < 200
    return DeliveryError(
        f"{where}: SMTP {code} {text}".rstrip(),
        retryable=retryable,
        status=code,
    )


class EmailSink:
    """Sends one e-mail per notification. DeliveryError.status carries the SMTP reply code."""

    type = "email"

    def __init__(self, name: str, settings: EmailSettings) -> None:
        self.name = name
        self.settings = settings
        self._where = f"email sink {name!r} ({settings.host}:{settings.effective_port})"
        if not settings.ssl and not settings.starttls:
            log.warning("%s sends without TLS (loopback relay only)", self._where)

    def __repr__(self) -> str:
        return f"EmailSink(name={self.name!r}, server={self.settings.host!r})"

    def describe(self) -> str:
        s = self.settings
        tls = "ssl" if s.ssl else ("starttls" if s.starttls else "plain")
        return f"email via {s.host}:{s.effective_port} ({tls}) to {', '.join(s.to)}"

    def _tls(self) -> ssl.SSLContext:
        ca = self.settings.ca_bundle
        return ssl.create_default_context(cafile=str(ca) if ca else None)

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        if s.ssl:
            return smtplib.SMTP_SSL(
                s.host,
                s.effective_port,
                local_hostname=s.helo_name,
                timeout=s.timeout_seconds,
                context=self._tls(),
            )
        return smtplib.SMTP(
            s.host, s.effective_port, local_hostname=s.helo_name, timeout=s.timeout_seconds
        )

    def render(self, notification: Notification) -> str:
        """The full MIME text (headers, text and HTML parts) `send` would submit; no password."""
        return build_message(notification, self.settings).as_string()

    def send(self, notification: Notification) -> None:
        """Connect, (STARTTLS,) (AUTH,) send, quit - one attempt."""
        msg = build_message(notification, self.settings)
        s = self.settings
        try:
            with self._connect() as smtp:
                smtp.ehlo()
                if not s.ssl and s.starttls:
                    smtp.starttls(context=self._tls())
                    smtp.ehlo()
                if s.username is not None and s.password is not None:
                    smtp.login(s.username, s.password.get_secret_value())
                refused = smtp.send_message(msg)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            raise DeliveryError(
                f"{self._where}: every recipient refused (codes {sorted(set(codes))})",
                retryable=all(400 <= c < 500 for c in codes),
                status=codes[0] if codes else None,
            ) from None
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                f"{self._where}: authentication failed (SMTP {exc.smtp_code})",
                retryable=False,
                status=int(exc.smtp_code),
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise _smtp_error(self._where, exc) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise DeliveryError(f"{self._where}: {exc}", retryable=False) from None
        except smtplib.SMTPServerDisconnected:
            raise DeliveryError(f"{self._where}: server disconnected", retryable=True) from None
        except ssl.SSLCertVerificationError as exc:
            raise DeliveryError(
                f"{self._where}: TLS certificate not trusted ({exc.verify_message});"
                " set ca_bundle for a private CA",
                retryable=False,
            ) from None
        except (TimeoutError, OSError, smtplib.SMTPException) as exc:
            kind = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            detail = "" if isinstance(exc, TimeoutError) else f": {str(exc)[:200]}"
            raise DeliveryError(f"{self._where}: {kind}{detail}", retryable=True) from None
        if refused:
            log.warning("%s: some recipients refused: %s", self._where, ", ".join(sorted(refused)))

    def close(self) -> None:
        """Nothing kept open between sends."""
