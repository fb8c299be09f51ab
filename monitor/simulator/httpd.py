"""Small HTTP(S) plumbing: threaded servers (TLS handshake in the worker thread), request and
response values, and the handler that turns one into the other."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import orjson

log = logging.getLogger("monitor.simulator")

JSON = "application/json; charset=utf-8"


@dataclass
class Request:
    """One HTTP request as the API handlers see it."""

    api: str  # login | graph | defender | admin
    method: str
    path: str  # without the query string
    query: dict[str, str]  # decoded; first value of each name
    headers: dict[str, str]  # lower-case names
    body: bytes
    base_url: str  # scheme://127.0.0.1:port of the listener

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def form(self) -> dict[str, str]:
        """An application/x-www-form-urlencoded body."""
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))

    def json(self) -> Any:
        """The JSON body (ValueError when it is not JSON)."""
        if not self.body:
            return {}
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"request body is not JSON: {exc}") from None


@dataclass
class Response:
    """What to send back; `mode` lets faults cut the body or drop the connection."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON
    mode: Literal["normal", "truncate", "drop"] = "normal"


def json_response(
    status: int, doc: Any, content_type: str = JSON, headers: dict[str, str] | None = None
) -> Response:
    return Response(status, orjson.dumps(doc), dict(headers or {}), content_type)


Dispatch = Callable[[Request], Response]


@dataclass
class Route:
    """Where a request goes: its counts/faults key, path parameters, the permission it needs."""

    key: str  # e.g. "defender:/api/machines/{id}"
    handler: Callable[..., Response] | None = None
    params: dict[str, str] = field(default_factory=dict)
    role: str | None = None  # application permission required (Graph/Defender)
    tenant_hint: str | None = None  # tenant named in the URL (login)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Microsoft-HTTPAPI/2.0"
    sys_version = ""
    timeout = 120  # idle keep-alive connections are closed after this
    server: SimHTTPServer

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        if self.server.stopped:  # a kept-alive connection outliving stop(): answer nothing more
            self.close_connection = True
            return
        parts = urlsplit(self.path)
        req = Request(
            api=self.server.api,
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self._read_body(),
            base_url=self.server.base_url,
        )
        try:
            resp = self.server.dispatch(req)
        except Exception:
            log.exception("simulator: %s %s failed", req.api, req.path)
            resp = json_response(500, {"error": {"code": "InternalServerError",
                                                 "message": "simulator error"}})  # fmt: skip
        self._send(resp)

    def _send(self, resp: Response) -> None:
        if resp.mode == "drop":
            self.close_connection = True
            return
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        for name, value in resp.headers.items():
            self.send_header(name, value)
        if resp.mode == "truncate":
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            body = resp.body[: len(resp.body) // 2] if resp.mode == "truncate" else resp.body
            self.wfile.write(body)
        self.wfile.flush()
        if resp.mode == "truncate":
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("simulator %s: " + format, self.server.api, *args)


class SimHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP(S) server on 127.0.0.1; with TLS the handshake runs in the worker thread
    so a slow or silent client never blocks accepting others."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, api: str, port: int, dispatch: Dispatch, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.api = api
        self.dispatch = dispatch
        self.ssl_context = ssl_context
        super().__init__(("127.0.0.1", port), _Handler)
        scheme = "https" if ssl_context else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.server_address[1]}"
        self._thread: threading.Thread | None = None
        self.stopped = False

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Headers and body go out in separate writes: without NODELAY, Nagle + delayed ACK
        # add ~40 ms to every keep-alive response.
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(30)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("simulator %s: TLS handshake failed: %s", self.api, exc)
            return
        try:
            tls.settimeout(_Handler.timeout)
            _Handler(tls, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("simulator %s: connection from %s ended with an error", self.api,
                  client_address, exc_info=True)  # fmt: skip

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"simulator-{self.api}", daemon=True,
        )  # fmt: skip
        self._thread.start()

    def stop(self) -> None:
        self.stopped = True
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
