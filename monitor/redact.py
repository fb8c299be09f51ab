"""Keep secrets out of text: known secrets by exact value, secret-looking `key=value` by pattern.

Two layers, both applied by `scrub()`:

- **exact values**: every configured secret (client secrets, PFX passwords, sink webhook URLs
  and the tokens in their paths and queries, PagerDuty routing keys, SMTP passwords, `whsec_`
  signing keys) is registered once with `register_secret` (config, sign-in and sink building do
  it) and replaced by `***` wherever it appears: error text, events (`monitor.events.stream`),
  delivery records and logs (a log-record factory installed on first registration);
- **patterns**: `client_secret=...`, `access_token=...`, `"access_token": "..."`, `"token": "..."`,
  `"routing_key": "..."`, `Authorization: Bearer ...` and URLs (cut to scheme://host/…), for
  secrets nobody registered (a token a server invented and echoed).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, SecretStr

MASK = "***"
MIN_SECRET_LEN = 8  # shorter values would mask ordinary words everywhere
MIN_LOCAL_SECRET_LEN = 4  # a caller's own secrets in its own error text (`scrub`)
MIN_URL_PART_LEN = 8  # a path segment or query value of a secret URL: see _tokenish

_lock = threading.Lock()
_secrets: set[str] = set()
_ordered: tuple[str, ...] = ()  # longest first, so a secret containing another is masked whole
_factory_installed = False

_KEY_WORDS = (
    r"client[_-]?secret|access[_-]?token|refresh[_-]?token|id[_-]?token|routing[_-]?key"
    r"|integration[_-]?key|api[_-]?key|secret|token|password|passwd|passphrase|signature|sig"
    r"|authorization|key"
)
# `"access_token": "v"`, `'token': 'v'`, `client_secret=v`, `password: v` (not `key` inside words
# such as `monkey=`: the name must start at a boundary, `_`/`-` prefixes such as `client_` allowed)
_SECRETISH = re.compile(
    rf"""(?ix)
    (?<![A-Za-z0-9_-])
    (["']?)(?!(?:group|dedup)[_-]key)((?:[A-Za-z0-9]+[_-])*(?:{_KEY_WORDS}))\1
    (\s*[=:]\s*)
    (?:"(?:[^"\\]|\\.)*"|'[^']*'|(?:bearer\s+|basic\s+)?[^\s,;&"'}}\]]+)
    """
)
_URL = re.compile(r"\b([a-z][a-z0-9+.-]*://)(?:[^/\s@]*@)?([^/\s?#\"']+)[^\s\"']*", re.I)
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}")


def _json_escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _tokenish(part: str) -> bool:
    """Looks like a token, not a word or a version: 16+ characters, or 8+ mixing letters and
    digits (`T0123ABCD`, not `services`, `workflows` or `2016-06-01`)."""
    if len(part) >= 16:
        return True
    return (
        len(part) >= MIN_URL_PART_LEN
        and any(c.isdigit() for c in part)
        and any(c.isalpha() for c in part)
    )


def url_secrets(url: str) -> list[str]:
    """The parts of a secret URL that are secrets on their own: long path segments, query values.

    A receiver that echoes `T000/B000/XXXXXXXX` or `?code=abc...` leaks the token even when the
    whole URL is never repeated.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    out = [seg for seg in parts.path.split("/") if _tokenish(seg)]
    out += [v for _k, v in parse_qsl(parts.query) if _tokenish(v)]
    if parts.path.strip("/"):
        out.append(parts.path)
    return out


def register_secret(value: str | SecretStr | None) -> None:
    """Mask this exact value (and, for a URL, its secret parts) everywhere from now on."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not value or len(value) < MIN_SECRET_LEN:
        return
    values = {value, _json_escaped(value)}
    if "://" in value:
        values.update(url_secrets(value))
    global _ordered
    with _lock:
        if values <= _secrets:
            return
        _secrets.update(v for v in values if len(v) >= MIN_SECRET_LEN)
        _ordered = tuple(sorted(_secrets, key=len, reverse=True))
    _install_log_factory()


def register_secrets(values: Iterable[str | SecretStr | None]) -> None:
    for v in values:
        register_secret(v)


def secrets_in(obj: Any) -> list[str]:
    """Every SecretStr value inside a pydantic model, dict, list or tuple (iterative walk)."""
    found: list[str] = []
    stack: list[Any] = [obj]
    seen: set[int] = set()
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, SecretStr):
            found.append(cur.get_secret_value())
        elif isinstance(cur, BaseModel):
            stack.extend(getattr(cur, name, None) for name in type(cur).model_fields)
        elif isinstance(cur, dict):
            stack.extend(cur.values())
        elif isinstance(cur, list | tuple | set | frozenset):
            stack.extend(cur)
    return found


def redact(text: str) -> str:
    """`text` with every registered secret replaced by ***."""
    ordered = _ordered
    if not ordered or not text:
        return text
    for secret in ordered:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_bytes(data: bytes) -> bytes:
    """`redact` for UTF-8 bytes (e.g. an encoded event); unchanged when nothing matched."""
    ordered = _ordered
    if not ordered:
        return data
    text = data.decode("utf-8", errors="surrogateescape")
    out = redact(text)
    return data if out is text else out.encode("utf-8", errors="surrogateescape")


def scrub(text: str, limit: int = 300, secrets: Iterable[str] = ()) -> str:
    """Error text safe to log and store: secrets masked (exact and by pattern), URLs cut to
    scheme://host/…, at most `limit` characters.

    `secrets` are the caller's own (a sink's URL and keys): masked here from 4 characters, below
    the registry's `MIN_SECRET_LEN`, since in this text they are known to be secrets.
    """
    text = redact(text)
    for secret in secrets:
        if secret and len(secret) >= MIN_LOCAL_SECRET_LEN:
            text = text.replace(secret, MASK)
    text = _URL.sub(lambda m: f"{m.group(1)}{m.group(2)}/…", text)
    text = _SECRETISH.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------- logging

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__
) | {"message", "asctime"}


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: leave it to the handler to report
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    for key, value in list(record.__dict__.items()):
        if key not in _STANDARD_ATTRS and isinstance(value, str):
            record.__dict__[key] = redact(value)


def _install_log_factory() -> None:
    """Every log record, of every logger and handler, is redacted when it is created."""
    global _factory_installed
    with _lock:
        if _factory_installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if _ordered:
                _redact_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed = True
