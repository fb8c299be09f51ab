"""E-mail sink against a real aiosmtpd server: STARTTLS, implicit TLS, AUTH, both parts, errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from sink_receivers import (
    HOSTILE,
    SmtpReceiver,
    hostile_notification,
    machine_event,
    make_notification,
    write_ca_bundle,
)

from monitor.alerts.sinks.base import DeliveryError
from monitor.alerts.sinks.email import EmailSettings, EmailSink
from monitor.alerts.sinks.registry import SinkConfigError, build_sink
from monitor.redis_conn import free_port

PASSWORD = "smtpPASSWORDsecret"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def bundle(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ca_bundle(ca, tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def smtp(ca: trustme.CA) -> Iterator[SmtpReceiver]:
    with SmtpReceiver(ca=ca, username="alerts", password=PASSWORD).start() as server:
        yield server


@pytest.fixture(autouse=True)
def _quiet_smtp_server_log() -> None:
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def settings(port: int, bundle: Path | None, **kw: Any) -> EmailSettings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "from": "MDE Monitor <monitor@example.com>",
        "to": ["soc@example.com", "oncall@example.com"],
        "username": "alerts",
        "password": PASSWORD,
        "ca_bundle": str(bundle) if bundle else None,
        "timeout_seconds": 5,
    }
    return EmailSettings.model_validate({**base, **kw})


def test_starttls_auth_both_parts(smtp: SmtpReceiver, bundle: Path) -> None:
    before = len(smtp.messages)
    n = make_notification([machine_event(), machine_event("vm2")], total=3)
    EmailSink("mail", settings(smtp.port, bundle)).send(n)
    mail = smtp.wait_for(before + 1)[-1]
    assert mail.tls and mail.login == "alerts"
    assert mail.rcpt_tos == ["soc@example.com", "oncall@example.com"]
    msg = mail.message
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["Subject"] == "[mde-monitor] Machine risk raised to High"
    assert msg["Message-ID"] == f"<{n.id}@example.com>"
    assert msg["Auto-Submitted"] == "auto-generated"
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain is not None and html is not None
    text = plain.get_content()
    assert "vm1.contoso.local" in text and "riskScore: Low -> High" in text
    assert "... and 1 more" in text
    assert "<li>riskScore: Low -&gt; High</li>" in html.get_content()


def test_hostile_values_are_escaped(smtp: SmtpReceiver, bundle: Path) -> None:
    before = len(smtp.messages)
    EmailSink("mail", settings(smtp.port, bundle)).send(hostile_notification())
    msg = smtp.wait_for(before + 1)[-1].message
    subject = msg["Subject"]
    assert "\n" not in subject and "\u202e" not in subject and len(subject) <= 200
    html = msg.get_body(("html",))
    plain = msg.get_body(("plain",))
    assert html is not None and plain is not None
    h = html.get_content()
    assert "<b>html</b>" not in h and "&lt;b&gt;html&lt;/b&gt;" in h
    assert "\u202e" not in h and "\x1b" not in h and "\U0001f6a8" in h
    t = plain.get_content()
    assert "\u202e" not in t and "\x1b" not in t and "<U+202E>exe.pdf" in t
    assert HOSTILE.split(" ")[0] in t  # plain text shows the text as-is (no markup there)


def test_message_id_is_stable_across_retries(smtp: SmtpReceiver, bundle: Path) -> None:
    before = len(smtp.messages)
    sink = EmailSink("mail", settings(smtp.port, bundle))
    smtp.responses.put("451 4.3.0 try again later")
    n = make_notification(id="notif/with spaces")
    with pytest.raises(DeliveryError) as info:
        sink.send(n)
    assert info.value.retryable and info.value.status == 451
    sink.send(n)
    smtp.responses.put("554 5.7.1 rejected")
    with pytest.raises(DeliveryError) as info:
        sink.send(n)
    assert not info.value.retryable and info.value.status == 554
    mail = smtp.wait_for(before + 1)[-1]
    assert mail.message["Message-ID"] == "<notif-with-spaces@example.com>"


def test_implicit_tls(ca: trustme.CA, bundle: Path) -> None:
    with SmtpReceiver(ca=ca, implicit_tls=True, username="alerts", password=PASSWORD) as server:
        EmailSink("mail", settings(server.port, bundle, ssl=True)).send(make_notification())
        assert server.wait_for(1)[0].tls


def test_wrong_password_is_not_retryable(
    smtp: SmtpReceiver, bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sink = EmailSink("mail", settings(smtp.port, bundle, password="wrong" + PASSWORD))
    with pytest.raises(DeliveryError) as info:
        sink.send(make_notification())
    assert not info.value.retryable and "authentication failed" in str(info.value)
    for text in (str(info.value), repr(sink), sink.describe(), caplog.text):
        assert PASSWORD not in text


def test_untrusted_certificate(smtp: SmtpReceiver) -> None:
    with pytest.raises(DeliveryError) as info:
        EmailSink("mail", settings(smtp.port, None)).send(make_notification())
    assert not info.value.retryable and "ca_bundle" in str(info.value)


def test_server_without_starttls_is_refused(bundle: Path) -> None:
    with SmtpReceiver() as plain:  # no TLS at all
        with pytest.raises(DeliveryError) as info:
            EmailSink("mail", settings(plain.port, bundle, username=None, password=None)).send(
                make_notification()
            )
        assert not info.value.retryable and "STARTTLS" in str(info.value)
        # explicitly plain to a loopback relay is allowed
        relay = settings(plain.port, None, username=None, password=None, starttls=False)
        EmailSink("relay", relay).send(make_notification())
        assert not plain.wait_for(1)[0].tls


def test_connection_refused_is_retryable() -> None:
    with pytest.raises(DeliveryError) as info:
        EmailSink("mail", settings(free_port(), None)).send(make_notification())
    assert info.value.retryable


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"host": "smtp.example.com", "starttls": False}, "only to a loopback host"),
        ({"password": None}, "both username and password"),
        ({"to": ["not-an-address"]}, "not an e-mail address"),
        ({"to": []}, "at least 1"),
        ({"from": "a@example.com\r\nBcc: x@evil.com"}, "line break"),
        ({"subject_prefix": "x\nBcc: y"}, "line break"),
    ],
)
def test_config_errors(kw: dict[str, Any], message: str) -> None:
    data: dict[str, Any] = {
        "host": "127.0.0.1",
        "from": "monitor@example.com",
        "to": ["soc@example.com"],
        "username": "u",
        "password": PASSWORD,
        **kw,
    }
    with pytest.raises(SinkConfigError) as info:
        build_sink("mail", "email", data, "alerts/sinks.yaml")
    assert str(info.value).startswith("alerts/sinks.yaml: sink 'mail' (email): field ")
    assert message in str(info.value) and PASSWORD not in str(info.value)
