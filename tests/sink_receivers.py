"""Reusable local receivers for sink tests: an HTTP(S) server and an SMTP server, both on 127.0.0.1.

    with Receiver().start() as rx:           # or Receiver(tls=trustme.CA()) for https
        rx.responses.put(Reply(429, headers={"Retry-After": "7"}))   # then the default 200
        sink.send(...)
        path, headers, body = rx.wait_for(1)[0]

    with SmtpReceiver(ca=ca, username="u", password="p").start() as smtp:
        ...; mail = smtp.wait_for(1)[0]; mail.message.get_body(("html",))

Also: `make_event` / `make_notification` to build realistic notifications, `HOSTILE` text.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import queue
import ssl
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from monitor.alerts.sinks.base import Notification, Severity, Status
from monitor.events.envelope import Event, make_event
from monitor.redis_conn import free_port

# Untrusted text that must render inertly everywhere: a Slack broadcast, markup, an RTL override,
# emoji, HTML and a Markdown link.
HOSTILE = (
    "<!channel> <@U123> *bold* _it_ ~strike~ `code` [click](https://evil.example) "
    "<b>html</b> & \u202eexe.pdf \U0001f6a8\U0001f468\u200d\U0001f469 \x1b[31mred"
)
LONG_NAME = "A" * 5000


# ----------------------------------------------------------------------------------------- HTTP


@dataclass
class Reply:
    """One programmed HTTP response (used once, in queue order; then the default)."""

    status: int = 200
    body: bytes | str = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (a timeout test); cut short by stop()


class Request(NamedTuple):
    """A recorded request: path (with query), headers (lower-case names), raw body."""

    path: str
    headers: dict[str, str]
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    receiver: Receiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that time out and hang up are expected: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _handle(self) -> None:
        rx = self.server.receiver
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = rx._next_reply()
        rx._record(Request(self.path, headers, body))
        if reply.delay and rx._stopping.wait(reply.delay):
            return
        data = reply.body.encode() if isinstance(reply.body, str) else reply.body
        self.send_response(reply.status)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_PUT = do_GET = do_PATCH = do_DELETE = _handle


class Receiver:
    """An HTTP (or HTTPS with a trustme CA) server on 127.0.0.1 recording every request."""

    def __init__(self, *, tls: trustme.CA | None = None, default: Reply | None = None) -> None:
        self.tls = tls
        self.default = default or Reply()
        self.requests: list[Request] = []
        self.responses: queue.Queue[Reply | int] = queue.Queue()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> Receiver:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.receiver = self
        scheme = "http"
        if self.tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
            scheme = "https"
        self._server = server
        self.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def reply(self, *replies: Reply | int) -> Receiver:
        """Queue responses (a bare int is a status with an empty body)."""
        for r in replies:
            self.responses.put(r)
        return self

    def _next_reply(self) -> Reply:
        try:
            r = self.responses.get_nowait()
        except queue.Empty:
            return self.default
        return Reply(r, b"") if isinstance(r, int) else r

    def _record(self, request: Request) -> None:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Request]:
        """The first `n` requests, waiting up to `timeout` seconds for them to arrive."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= n, timeout):
                raise AssertionError(f"expected {n} requests, got {len(self.requests)}")
            return list(self.requests[:n])

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Receiver:
        return self if self._server else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_ca_bundle(ca: trustme.CA, directory: Path) -> Path:
    """The CA's certificate as a PEM file (for a sink's `ca_bundle`)."""
    path = directory / "test-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


# ----------------------------------------------------------------------------------------- SMTP


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage
    tls: bool
    login: str | None


class _SmtpHandler:
    def __init__(self, rx: SmtpReceiver) -> None:
        self.rx = rx

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.rx._next_reply()
        if not reply.startswith("250"):
            return reply
        raw = bytes(envelope.original_content or envelope.content)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        login = session.auth_data.login.decode() if session.auth_data else None
        self.rx._record(
            ReceivedMail(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                raw,
                msg,
                tls=session.ssl is not None or self.rx.implicit_tls,
                login=login,
            )
        )
        return reply


class _Controller(Controller):
    def factory(self) -> Any:
        with warnings.catch_warnings():  # "AUTH without TLS": implicit TLS is TLS
            warnings.simplefilter("ignore")
            return super().factory()


class SmtpReceiver:
    """An aiosmtpd server on 127.0.0.1: STARTTLS (or implicit TLS) with a trustme CA, AUTH."""

    def __init__(
        self,
        *,
        ca: trustme.CA | None = None,
        implicit_tls: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.ca = ca
        self.implicit_tls = implicit_tls
        self.username = username
        self.password = password
        self.messages: list[ReceivedMail] = []
        self.responses: queue.Queue[str] = queue.Queue()  # DATA replies, e.g. "451 4.3.0 later"
        self.auth_attempts: list[str] = []
        self._cond = threading.Condition()
        self._controller: Controller | None = None
        self.host = "127.0.0.1"
        self.port = 0

    def _auth(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        self.auth_attempts.append(mechanism)
        ok = (
            auth_data.login.decode() == self.username
            and auth_data.password.decode() == self.password
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def start(self) -> SmtpReceiver:
        tls_ctx: ssl.SSLContext | None = None
        if self.ca is not None:
            tls_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(tls_ctx)
        kwargs: dict[str, Any] = {}
        if self.username is not None:
            # implicit TLS: aiosmtpd only counts STARTTLS as TLS, and the link is TLS already
            kwargs.update(
                authenticator=self._auth,
                auth_required=True,
                auth_require_tls=not self.implicit_tls,
            )
        if tls_ctx is not None and self.implicit_tls:
            kwargs["ssl_context"] = tls_ctx
        elif tls_ctx is not None:
            kwargs.update(tls_context=tls_ctx, require_starttls=True)
        last: Exception | None = None
        for _ in range(5):
            self.port = free_port()
            controller = _Controller(
                _SmtpHandler(self),
                hostname=self.host,
                port=self.port,
                loop=asyncio.new_event_loop(),
                server_hostname="localhost",
                **kwargs,
            )
            try:
                controller.start()
            except Exception as exc:  # port taken between free_port() and bind: retry
                last = exc
                continue
            self._controller = controller
            return self
        raise RuntimeError(f"SMTP receiver did not start: {last}")

    def _next_reply(self) -> str:
        try:
            return self.responses.get_nowait()
        except queue.Empty:
            return "250 OK"

    def _record(self, mail: ReceivedMail) -> None:
        with self._cond:
            self.messages.append(mail)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[ReceivedMail]:
        """The first `n` messages, waiting up to `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= n, timeout):
                raise AssertionError(f"expected {n} messages, got {len(self.messages)}")
            return list(self.messages[:n])

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller.loop.close()
            self._controller = None

    def __enter__(self) -> SmtpReceiver:
        return self if self._controller else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------- notifications


def machine_event(
    name: str = "vm1.contoso.local",
    *,
    tenant: str = "contoso",
    type: str = "mde.machine.risk_raised",
    changes: dict[str, Any] | None = None,
    generation: int = 7,
) -> Event:
    """A machine change event shaped like docs/events.md."""
    key = "microsoft_defender_machine:" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return make_event(
        tenant=tenant,
        type=type,
        subject=key,
        generation=generation,
        time="2024-05-01T12:00:00.000Z",
        data={
            "entityType": "microsoft_defender_machine",
            "entityClass": ["HostAgent"],
            "key": key,
            "displayName": name,
            "changes": changes
            if changes is not None
            else {
                "riskScore": {"old": "Low", "new": "High"},
                "machineTags": {
                    "old": ["a"],
                    "new": ["a", "prod"],
                    "added": ["prod"],
                    "removed": [],
                },
            },
            "entity": {"_key": key, "computerDnsName": name, "riskScore": "High"},
            "before": {"_key": key, "computerDnsName": name, "riskScore": "Low"},
        },
    )


def make_notification(
    events: Iterable[Event] | None = None,
    *,
    id: str = "n-0123456789abcdef",
    rule: str = "machine-risk-high",
    severity: Severity = "high",
    status: Status = "firing",
    title: str = "Machine risk raised to High",
    summary: str = "1 machine changed risk",
    tenant: str | None = "contoso",
    total: int | None = None,
    group_key: str = "machine-risk-high|tenant=contoso",
) -> Notification:
    """A notification with sensible defaults (one machine event)."""
    evs = list(events) if events is not None else [machine_event()]
    return Notification(
        id=id,
        rule=rule,
        description="A machine's risk score went up",
        severity=severity,
        status=status,
        group_key=group_key,
        group_labels={"tenant": tenant or "-"},
        title=title,
        summary=summary,
        events=evs,
        total=total if total is not None else len(evs),
        tenant=tenant,
    )


def hostile_notification(count: int = 3, total: int | None = None) -> Notification:
    """Untrusted text everywhere: names, tags, title, summary, rule label; one 5,000-char name."""
    events = [
        machine_event(
            HOSTILE,
            changes={
                "machineTags": {"old": [], "new": [HOSTILE], "added": [HOSTILE], "removed": []},
                "osPlatform": {"old": "<b>", "new": HOSTILE},
            },
        ),
        machine_event(LONG_NAME + HOSTILE),
        *(machine_event(f"vm{i} {HOSTILE}") for i in range(max(0, count - 2))),
    ]
    return make_notification(
        events,
        title=f"{HOSTILE} {LONG_NAME}",
        summary=f"{HOSTILE}\n{LONG_NAME}",
        tenant=HOSTILE,
        rule=f"rule {HOSTILE}",
        total=total,
    )
