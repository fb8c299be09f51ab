"""Managed-Redis style TLS (`rediss://user:password@host:port/db`) for every client (issue 9.6).

A real `redis-server` with TLS on a free port, certificates from trustme; the CLI, a worker with
its result backend, and beat with redbeat all talk to it. Errors are one line, password masked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from alert_helpers import restore_logging  # noqa: F401 (fixture)
from celery_helpers import REPO, wait_until

from monitor.celery_app import SYNC_QUEUE, SYNC_TASK, build_app
from monitor.cli import main
from monitor.config import load_settings
from monitor.redis_conn import connect, free_port

PASSWORD = "tls-s3cret-pw"


pytestmark = [
    pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server"),
    pytest.mark.usefixtures("restore_logging"),
]


@dataclass
class TlsRedis:
    port: int
    ca: Path
    client_cert: Path
    client_key: Path

    def url(self, db: int = 0, query: str = "") -> str:
        return f"rediss://default:{PASSWORD}@127.0.0.1:{self.port}/{db}" + (
            f"?{query}" if query else ""
        )


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.mde-monitor.test")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.crt"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
            "--tls-ca-cert-file", str(d / "ca.pem"), "--tls-auth-clients", "optional",
            "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(d),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    t = TlsRedis(port, d / "ca.pem", d / "client.crt", d / "client.key")
    try:
        wait_until(
            lambda: _pings(t.url(query=f"ssl_ca_certs={t.ca}")), 10, "TLS redis-server answers"
        )
        yield t
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(url: str) -> bool:
    try:
        return bool(connect(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def _config(tmp: Path, url: str, prefix: str, tls: str = "") -> Path:
    cfg = tmp / f"monitor-{abs(hash((url, tls)))}.yaml"
    cfg.write_text(f"redis_url: '{url}'\nredis_prefix: {prefix}\nalerts_dir: {tmp}\n{tls}")
    return cfg


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run `mde-monitor ARGS` in this process through the console script's `main`."""

    def run(args: list[str], env: dict[str, str] | None = None) -> Ran:
        with monkeypatch.context() as m:
            m.delenv("REDIS_URL", raising=False)
            for k, v in (env or {}).items():
                m.setenv(k, v)
            m.setattr(sys, "argv", ["mde-monitor", *args])
            capsys.readouterr()
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0)
            out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run


def test_cli_over_tls_ca_bundle_system_cas_and_both_cert_reqs_spellings(
    tls_redis: TlsRedis, tmp_path: Path, redis_prefix: str, cli: Any
) -> None:
    ok = _config(tmp_path, tls_redis.url(), redis_prefix, f"redis:\n  ca_bundle: {tls_redis.ca}\n")
    res = cli(["--config", str(ok), "status", "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["events"]["stream_length"] == 0
    # the system CA store (here: OpenSSL's SSL_CERT_FILE) with nothing configured
    plain = _config(tmp_path, tls_redis.url(), redis_prefix)
    res = cli(["--config", str(plain), "status", "--json"], {"SSL_CERT_FILE": str(tls_redis.ca)})
    assert res.returncode == 0, res.stderr
    # a client certificate, and ssl_cert_reqs in Celery's and redis-py's spelling
    for reqs in ("CERT_REQUIRED", "required"):
        cfg = _config(
            tmp_path,
            tls_redis.url(query=f"ssl_cert_reqs={reqs}"),
            redis_prefix,
            f"redis:\n  ca_bundle: {tls_redis.ca}\n  client_cert: {tls_redis.client_cert}\n"
            f"  client_key: {tls_redis.client_key}\n",
        )
        res = cli(["--config", str(cfg), "status", "--json"])
        assert res.returncode == 0, (reqs, res.stderr)
    # not trusted: one line naming the URL, password masked, no traceback
    res = cli(["--config", str(plain), "status"], {"SSL_CERT_FILE": os.devnull})
    assert res.returncode == 1
    line = res.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, res.stderr
    assert f"Redis at rediss://default:***@127.0.0.1:{tls_redis.port}/0" in line
    assert "certificate" in line and PASSWORD not in res.stderr
    # wrong password
    bad = _config(
        tmp_path,
        tls_redis.url().replace(PASSWORD, "wrong-pw"),
        redis_prefix,
        f"redis:\n  ca_bundle: {tls_redis.ca}\n",
    )
    res = cli(["--config", str(bad), "deliveries", "list"])
    assert res.returncode == 1 and "authentication failed" in res.stderr, res.stderr
    assert "wrong-pw" not in res.stderr and "Traceback" not in res.stderr


def test_worker_result_backend_beat_and_redbeat_over_tls(
    tls_redis: TlsRedis,
    tmp_path: Path,
    redis_prefix: str,
    cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)  # it would win over the config's rediss:// URL
    cfg = _config(tmp_path, tls_redis.url(), redis_prefix, f"redis:\n  ca_bundle: {tls_redis.ca}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MDE_MONITOR_CONFIG": str(cfg)}
    env.pop("REDIS_URL", None)
    boot = "import sys; from monitor.cli import main; sys.argv = sys.argv[1:]; main()"
    worker = subprocess.Popen(
        [sys.executable, "-c", boot, "mde-monitor", "worker", "-P", "solo", "-Q", SYNC_QUEUE],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    beat = subprocess.Popen(
        [sys.executable, "-c", boot, "mde-monitor", "beat"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    app = build_app(load_settings(cfg), env={})
    assert app.conf.broker_use_ssl["ssl_ca_certs"] == str(tls_redis.ca)
    try:
        # broker (worker receives) and result backend (we read the result) over TLS
        res = app.send_task(SYNC_TASK, args=["not-configured"], queue=SYNC_QUEUE)
        value = res.get(timeout=60)
        assert value["status"] == "skipped"
        # beat's redbeat schedule and lock live in the TLS Redis
        client = connect(load_settings(cfg).redis_url)
        wait_until(
            lambda: client.exists(f"{redis_prefix}:redbeat::lock"), 60, "redbeat holds its lock"
        )
        # the compose health checks, over TLS: this host's worker answers, a beat is active
        health = cli(["--config", str(cfg), "health", "--worker", "--beat"])
        assert health.returncode == 0 and "healthy" in health.stdout, health.stderr
    finally:
        for p in (worker, beat):
            p.terminate()
        for p in (worker, beat):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        app.close()
    assert worker.returncode == 0 or worker.returncode == -15


def test_redis_down_is_one_masked_line_for_every_command(tmp_path: Path, cli: Any) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    cfg = _config(
        tmp_path,
        url,
        "down",
        "tenants:\n  - {name: t1, tenant_id: t, client_id: c, client_secret: s}\n",
    )
    for args in (
        ["status"],
        ["dispatch", "--once"],
        ["deliveries", "list"],
        ["events"],
        ["silence", "list"],
        ["trigger", "--all"],
    ):
        res = cli(["--config", str(cfg), *args])
        assert res.returncode == 1, (args, res.stderr)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert lines and "Redis at redis://:***@127.0.0.1:" in lines[-1], (args, res.stderr)
        assert "hunter2" not in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
