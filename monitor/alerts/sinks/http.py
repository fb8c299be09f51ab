"""Shared HTTP plumbing for sinks: URL policy, one POST per call, status -> DeliveryError, limiter.

Secrets (webhook URLs with tokens in their path or query, keys, header values) never appear in
messages, logs or reprs: only scheme://host[:port] of a URL is ever shown (`redact_url`). A
poster registers its URL and secrets with `monitor.redact`, whose log-record factory masks them in
every log line (the `httpx` logger's "HTTP Request: POST <url>" included); its error texts go
through `monitor.redact.scrub`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import httpx

from monitor.alerts.sinks.base import DeliveryError
from monitor.redact import register_secret, register_secrets, scrub

if TYPE_CHECKING:
    import redis

    from monitor.alerts.sinks.common import HttpSinkSettings

log = logging.getLogger(__name__)

USER_AGENT = "mde-monitor-alerts/1"
DEFAULT_TIMEOUT_SECONDS = 10.0


def is_loopback_host(host: str | None) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if not host:
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """scheme://host[:port]/… - never the path, query or user info, which may hold tokens."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    tail = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme or '?'}://{host}{port}{tail}"


def check_url(url: str) -> str:
    """Validate a sink URL: https://, or http:// on loopback. Errors never echo its secrets."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(
            f"must be an absolute https:// URL (got {parts.scheme or 'no'} scheme"
            f"{'' if host else ', no host'})"
        )
    if parts.username or parts.password:
        raise ValueError("credentials in the URL are not supported; use the sink's settings")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ValueError(
            f"must use https:// (got {redact_url(url)}); http:// is allowed only on loopback"
        )
    return url


def warn_if_plain_http(sink_type: str, name: str, url: str) -> None:
    """Log a warning when a sink talks plain http (allowed on loopback only, for tests/relays)."""
    if url.lower().startswith("http://"):
        log.warning(
            "%s sink %r sends over plain http to %s (loopback only)",
            sink_type,
            name,
            redact_url(url),
        )


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait per a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    where: str,
    detail: str = "",
) -> DeliveryError | None:
    """Map an HTTP status to a DeliveryError (None for 2xx).

    429, 408 and 5xx are retryable (with Retry-After when sent); 410 disables the sink; other
    3xx/4xx are not retryable. `where` names the sink and the redacted target.
    """
    if 200 <= status < 300:
        return None
    retry_after = parse_retry_after(headers.get("retry-after"))
    suffix = f": {detail}" if detail else ""
    if status == 410:
        return DeliveryError(
            f"{where}: HTTP 410 Gone - the receiver says this endpoint is gone; disabling{suffix}",
            retryable=False,
            disable=True,
            status=status,
        )
    if status in (408, 425, 429) or status >= 500:
        return DeliveryError(
            f"{where}: HTTP {status}, retryable{suffix}",
            retryable=True,
            retry_after=retry_after,
            status=status,
        )
    if 300 <= status < 400:
        return DeliveryError(
            f"{where}: unexpected redirect HTTP {status} (redirects are not followed)",
            retryable=False,
            status=status,
        )
    return DeliveryError(
        f"{where}: HTTP {status}, not retryable{suffix}", retryable=False, status=status
    )


def tls_verify(ca_bundle: Path | None) -> ssl.SSLContext | bool:
    """An SSL context trusting only `ca_bundle` when given, else httpx's default trust store."""
    if ca_bundle is None:
        return True
    return ssl.create_default_context(cafile=str(ca_bundle))


class HttpPoster:
    """POSTs to one URL for one sink: a kept-alive client, timeouts, no redirects, error mapping."""

    def __init__(
        self,
        *,
        sink_type: str,
        name: str,
        url: str,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        ca_bundle: Path | None = None,
        secret_url: bool = True,
        secrets: Iterable[str] = (),
    ) -> None:
        check_url(url)
        self._url = url
        self.target = redact_url(url)
        self.where = f"{sink_type} sink {name!r} ({self.target})"
        self._secrets = [url, *secrets] if secret_url else list(secrets)
        register_secrets(self._secrets)  # masked in every log line, event and record from now on
        if secret_url:
            register_secret(str(httpx.URL(url)))  # as httpx logs it (normalised)
        warn_if_plain_http(sink_type, name, url)
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_seconds),
            verify=tls_verify(ca_bundle),
            follow_redirects=False,
            headers={"user-agent": USER_AGENT},
        )

    def __repr__(self) -> str:
        return f"HttpPoster({self.where})"

    def post(self, content: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """One POST; returns the 2xx response or raises DeliveryError (never with a secret)."""
        try:
            response = self._client.post(self._url, content=content, headers=dict(headers))
        except httpx.TimeoutException:
            raise DeliveryError(f"{self.where}: timed out", retryable=True) from None
        except httpx.TransportError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise DeliveryError(
                    f"{self.where}: TLS certificate not trusted; set ca_bundle for a private CA",
                    retryable=False,
                ) from None
            kind = type(exc).__name__
            reason = scrub(str(exc), limit=200, secrets=self._secrets)
            raise DeliveryError(f"{self.where}: {kind}: {reason}", retryable=True) from None
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{self.where}: {type(exc).__name__}", retryable=False) from None
        error = error_for_status(
            response.status_code, response.headers, self.where, self._detail(response)
        )
        if error is not None:
            raise error
        return response

    def _detail(self, response: httpx.Response) -> str:
        if 200 <= response.status_code < 300:
            return ""
        text = " ".join(response.text[:200].split())
        return scrub(text, secrets=self._secrets)

    def close(self) -> None:
        self._client.close()


class HttpSink:
    """Base of the HTTP sinks: one HttpPoster for `url`, a repr without secrets, `close`."""

    type: str

    def __init__(
        self,
        name: str,
        url: str,
        settings: HttpSinkSettings,
        *,
        secret_url: bool = True,
        secrets: Iterable[str] = (),
    ) -> None:
        self.name = name
        self._poster = HttpPoster(
            sink_type=self.type,
            name=name,
            url=url,
            timeout_seconds=settings.timeout_seconds,
            ca_bundle=settings.ca_bundle,
            secret_url=secret_url,
            secrets=secrets,
        )
        self._target = self._poster.target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, target={self._target!r})"

    def close(self) -> None:
        self._poster.close()


class RateLimiter:
    """At most one send per `interval` seconds per key: in-process, and across processes via Redis.

    `acquire` waits up to `max_wait` seconds for the slot; past that it raises a retryable
    DeliveryError with `retry_after`. `hold(seconds)` blocks the key (after a 429 Retry-After).
    The Redis key holds only a hash of the key (the key may be a secret URL).
    """

    _next_at: dict[str, float] = {}
    _lock = threading.Lock()

    def __init__(
        self,
        key: str,
        interval: float,
        *,
        where: str,
        redis_client: redis.Redis | None = None,
        redis_prefix: str = "mde",
        max_wait: float = 5.0,
    ) -> None:
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        self._key = digest
        self._interval = interval
        self._where = where
        self._redis = redis_client
        self._redis_key = f"{redis_prefix}:sinks:ratelimit:{digest}"
        self._max_wait = max_wait

    @property
    def redis_key(self) -> str:
        return self._redis_key

    def acquire(self) -> None:
        """Wait for this key's next slot (or raise a retryable DeliveryError)."""
        deadline = time.monotonic() + self._max_wait
        self._acquire_local()
        if self._redis is not None:
            self._acquire_redis(deadline)

    def _acquire_local(self) -> None:
        with self._lock:
            now = time.monotonic()
            next_at = self._next_at.get(self._key, 0.0)
            wait = next_at - now
            if wait > self._max_wait:
                raise self._busy(wait)
            self._next_at[self._key] = max(now, next_at) + self._interval
        if wait > 0:
            time.sleep(wait)

    def _acquire_redis(self, deadline: float) -> None:
        import redis as redis_lib

        assert self._redis is not None
        interval_ms = max(1, int(self._interval * 1000))
        try:
            while True:
                if self._interval <= 0:
                    pttl = self._pttl()
                    if pttl <= 0:
                        return
                elif self._redis.set(self._redis_key, b"1", nx=True, px=interval_ms):
                    return
                else:
                    pttl = self._pttl()
                    if pttl == -1:  # no expiry (should not happen): give it one
                        self._redis.pexpire(self._redis_key, interval_ms)
                wait = max(pttl, 1) / 1000.0
                if time.monotonic() + wait > deadline:
                    raise self._busy(wait)
                time.sleep(wait)
        except redis_lib.RedisError as exc:
            log.warning(
                "%s: rate limiter Redis unavailable (%s); using in-process limit only",
                self._where,
                type(exc).__name__,
            )

    def hold(self, seconds: float) -> None:
        """Block the key for `seconds` (the receiver asked us to slow down)."""
        if seconds <= 0:
            return
        with self._lock:
            self._next_at[self._key] = max(
                self._next_at.get(self._key, 0.0), time.monotonic() + seconds
            )
        if self._redis is not None:
            import redis as redis_lib

            try:
                ms = int(seconds * 1000)
                if self._pttl() < ms:
                    self._redis.set(self._redis_key, b"1", px=ms)
            except redis_lib.RedisError:
                pass

    def _pttl(self) -> int:
        assert self._redis is not None
        return int(cast(int, self._redis.pttl(self._redis_key)))

    def _busy(self, wait: float) -> DeliveryError:
        return DeliveryError(
            f"{self._where}: rate limited by mde-monitor (one message per {self._interval:g}s)",
            retryable=True,
            retry_after=round(wait, 3),
        )
