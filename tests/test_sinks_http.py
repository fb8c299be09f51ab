"""Shared HTTP plumbing of the sinks: URL policy, Retry-After, status mapping, TLS, redaction."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
import trustme
from sink_receivers import Receiver, Reply, write_ca_bundle

from monitor.alerts.sinks.base import DeliveryError
from monitor.alerts.sinks.http import (
    HttpPoster,
    check_url,
    error_for_status,
    is_loopback_host,
    parse_retry_after,
    redact_url,
)
from monitor.redis_conn import free_port

SECRET = "T000/B000/XXXXSECRETXXXX"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver().start() as receiver:
        yield receiver


def poster(url: str, **kw: object) -> HttpPoster:
    return HttpPoster(sink_type="webhook", name="t", url=url, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.slack.com/services/x",
        "http://127.0.0.1:8080/x",
        "http://127.9.9.9/x",
        "http://localhost/x",
        "http://[::1]:99/x",
    ],
)
def test_allowed_urls(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "expect"),
    [
        (f"http://hooks.slack.com/services/{SECRET}", "http:// is allowed only on loopback"),
        (f"http://10.0.0.1/{SECRET}", "http:// is allowed only on loopback"),
        (f"ftp://example.com/{SECRET}", "https://"),
        ("https://user:XXXXSECRETXXXX@example.com/", "credentials in the URL"),
        ("hooks.slack.com/services/x", "https://"),
    ],
)
def test_refused_urls_do_not_echo_secrets(url: str, expect: str) -> None:
    with pytest.raises(ValueError) as info:
        check_url(url)
    assert expect in str(info.value)
    assert "XXXXSECRETXXXX" not in str(info.value)


def test_loopback_and_redaction() -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1")
    assert not is_loopback_host("128.0.0.1") and not is_loopback_host("localhost.evil.com")
    assert (
        redact_url(f"https://hooks.slack.com/services/{SECRET}?a=b") == "https://hooks.slack.com/…"
    )
    assert redact_url("https://example.com") == "https://example.com"
    assert redact_url("http://[::1]:8080/x") == "http://[::1]:8080/…"


def test_retry_after_parsing() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30
    assert parse_retry_after(format_datetime(now - timedelta(hours=1), usegmt=True), now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("status", "retryable", "disable"),
    [(500, True, False), (503, True, False), (429, True, False), (408, True, False),
     (410, False, True), (400, False, False), (404, False, False), (301, False, False)],
)  # fmt: skip
def test_status_mapping(status: int, retryable: bool, disable: bool) -> None:
    err = error_for_status(status, {"retry-after": "3"}, "webhook sink 't'")
    assert err is not None
    assert (err.retryable, err.disable, err.status) == (retryable, disable, status)
    assert err.retry_after == (3.0 if retryable else None) or not retryable
    assert error_for_status(204, {}, "x") is None


def test_post_maps_receiver_statuses(rx: Receiver) -> None:
    p = poster(f"{rx.url}/hook/{SECRET}")
    rx.reply(Reply(500, "boom"), Reply(429, headers={"Retry-After": "7"}), 410, 400)
    errors = []
    for _ in range(4):
        with pytest.raises(DeliveryError) as info:
            p.post(b"{}", {"content-type": "application/json"})
        errors.append(info.value)
    assert [(e.status, e.retryable, e.disable) for e in errors] == [
        (500, True, False),
        (429, True, False),
        (410, False, True),
        (400, False, False),
    ]
    assert errors[1].retry_after == 7.0
    assert "boom" in str(errors[0])
    assert all(SECRET not in str(e) for e in errors)
    assert p.post(b"{}", {}).status_code == 200
    assert len(rx.wait_for(5)) == 5
    p.close()


def test_receiver_echoing_the_url_is_scrubbed(rx: Receiver) -> None:
    url = f"{rx.url}/hook/{SECRET}"
    rx.reply(Reply(400, f"bad request to {url}"))
    with pytest.raises(DeliveryError) as info:
        poster(url).post(b"{}", {})
    assert SECRET not in str(info.value) and "***" in str(info.value)


def test_timeout_is_retryable(rx: Receiver) -> None:
    rx.reply(Reply(200, delay=30))
    with pytest.raises(DeliveryError) as info:
        poster(f"{rx.url}/{SECRET}", timeout_seconds=0.3).post(b"{}", {})
    assert info.value.retryable and "timed out" in str(info.value)
    assert SECRET not in str(info.value)


def test_connection_refused_is_retryable() -> None:
    with pytest.raises(DeliveryError) as info:
        poster(f"http://127.0.0.1:{free_port()}/{SECRET}").post(b"{}", {})
    assert info.value.retryable and SECRET not in str(info.value)


def test_https_with_ca_bundle(ca: trustme.CA, tmp_path: Path) -> None:
    with Receiver(tls=ca).start() as rx:
        assert rx.url.startswith("https://")
        poster(f"{rx.url}/{SECRET}", ca_bundle=write_ca_bundle(ca, tmp_path)).post(b"{}", {})
        assert rx.wait_for(1)[0].path == f"/{SECRET}"
        with pytest.raises(DeliveryError) as info:  # default trust store: not trusted
            poster(f"{rx.url}/{SECRET}").post(b"{}", {})
        assert not info.value.retryable and "ca_bundle" in str(info.value)


def test_logs_never_carry_the_url_secret(rx: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="httpx")  # the CLI quiets httpx process-wide
    p = poster(f"{rx.url}/hook/{SECRET}?token=QUERYSECRET")
    p.post(b"{}", {})
    rx.reply(500)
    with pytest.raises(DeliveryError):
        p.post(b"{}", {})
    assert "HTTP Request" in caplog.text  # httpx logged the request, redacted
    assert "plain http" in caplog.text  # the loopback http warning
    assert SECRET not in caplog.text and "QUERYSECRET" not in caplog.text
    assert SECRET not in repr(p)
