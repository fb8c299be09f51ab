"""A tiny local webhook receiver for the demo: verifies Standard Webhooks signatures, counts alerts.

`python -m monitor.demo_receiver --port 8099` (secret from $DEMO_WEBHOOK_SECRET, `whsec_...`)
prints one JSON line per received notification: webhook id, rule, status, whether the signature
verified and whether the id was seen before (receivers de-duplicate by webhook-id). The secret is
never printed.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

from monitor.alerts.sinks.webhook import decode_secret, sign

SECRET_ENV = "DEMO_WEBHOOK_SECRET"
TOLERANCE_SECONDS = 300  # Standard Webhooks: reject timestamps this far from now


@dataclass(frozen=True)
class Received:
    """One POST: its webhook id, the notification's rule/status headers, and what we checked."""

    webhook_id: str
    rule: str
    status: str
    verified: bool
    duplicate: bool
    at: float


def verify(key: bytes, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """True when one of the `v1,` signatures matches and the timestamp is recent."""
    msg_id = headers.get("webhook-id", "")
    ts = headers.get("webhook-timestamp", "")
    try:
        if abs((now or time.time()) - int(ts)) > TOLERANCE_SECONDS:
            return False
    except ValueError:
        return False
    expected = sign(key, msg_id, int(ts), body).encode()
    signatures = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(part.encode(), expected) for part in signatures)


def new_secret() -> str:
    """A fresh `whsec_` secret (32 random bytes)."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    receiver: WebhookReceiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up are not our problem."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the receiver reports what it received."""

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        got = self.server.receiver.record(headers, body)
        code = 204 if got.verified else 401
        self.send_response(code)
        self.send_header("content-length", "0")
        self.end_headers()


class WebhookReceiver:
    """An HTTP server on `host` (127.0.0.1 by default) that checks and records webhook POSTs."""

    def __init__(
        self,
        secret: str | None,
        host: str = "127.0.0.1",
        port: int = 0,
        echo: TextIO | None = None,
    ) -> None:
        self._key = decode_secret(secret) if secret else None
        self._host = host
        self._port = port
        self._echo = echo
        self._cond = threading.Condition()
        self._server: _Server | None = None
        self.received: list[Received] = []
        self.url = ""

    def __repr__(self) -> str:
        return f"WebhookReceiver(url={self.url!r}, received={len(self.received)})"

    def start(self) -> WebhookReceiver:
        server = _Server((self._host, self._port), _Handler)
        server.receiver = self
        self._server = server
        self.url = f"http://{self._host}:{server.server_address[1]}/hooks/mde"
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def record(self, headers: dict[str, str], body: bytes) -> Received:
        verified = verify(self._key, headers, body) if self._key is not None else False
        with self._cond:
            wid = headers.get("webhook-id", "")
            seen = any(r.webhook_id == wid and r.verified for r in self.received)
            got = Received(
                webhook_id=wid,
                rule=headers.get("mde-rule", ""),
                status=headers.get("mde-status", ""),
                verified=verified,
                duplicate=seen,
                at=time.time(),
            )
            self.received.append(got)
            self._cond.notify_all()
        if self._echo is not None:
            self._echo.write(json.dumps(asdict(got)) + "\n")
            self._echo.flush()
        return got

    def unique_verified(self) -> list[Received]:
        """Verified notifications, one per webhook id."""
        with self._cond:
            return [r for r in self.received if r.verified and not r.duplicate]

    def by_rule(self) -> Counter[tuple[str, str]]:
        """(rule, status) -> verified unique notifications."""
        return Counter((r.rule, r.status) for r in self.unique_verified())

    def wait_until(self, predicate: Any, timeout: float) -> bool:
        """Wait until `predicate(self)` holds (re-checked on every POST) or the timeout passes."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)


def main(argv: list[str] | None = None) -> int:
    """`python -m monitor.demo_receiver`: receive and print the demo's webhook notifications."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 in compose)")
    parser.add_argument("--port", type=int, default=8099)
    ns = parser.parse_args(argv)
    secret = os.environ.get(SECRET_ENV) or None
    if secret is None:
        print(
            f"demo_receiver: {SECRET_ENV} is not set; signatures cannot be verified",
            file=sys.stderr,
        )
    rx = WebhookReceiver(secret, ns.host, ns.port, echo=sys.stdout).start()
    print(f"demo_receiver: listening on {rx.url}", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        rx.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
