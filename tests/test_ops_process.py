"""Worker, beat and `celery -A monitor.celery_app` fail loudly (issue 9.3, 9.4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from celery_helpers import REPO

BOOT = Path(__file__).resolve().parent / "celery_helpers.py"


def _run(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("REDIS_URL", None)
    return env


def test_worker_exits_non_zero_when_celery_fails(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    config = tmp_path / "monitor.yaml"
    config.write_text(f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\n")
    pidfile = tmp_path / "worker.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # a live process holds the pid lock: Celery gives up
    code = "import sys; from monitor.cli import main; sys.argv = sys.argv[1:]; main()"
    out = _run(
        [
            "-c",
            code,
            "mde-monitor",
            "--config",
            str(config),
            "worker",
            "-P",
            "solo",
            "--pidfile",
            str(pidfile),
        ],
        tmp_path,
        _env(),
    )
    assert out.returncode != 0, out.stderr
    assert "Pidfile" in out.stderr


def test_beat_exits_non_zero_when_celery_fails(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    config = tmp_path / "monitor.yaml"
    config.write_text(f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\n")
    pidfile = tmp_path / "beat.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # a live process holds the pid lock
    code = "import sys; from monitor.cli import main; sys.argv = sys.argv[1:]; main()"
    out = _run(
        ["-c", code, "mde-monitor", "--config", str(config), "beat", "--pidfile", str(pidfile)],
        tmp_path,
        _env(),
    )
    assert out.returncode != 0, out.stderr
    assert "Pidfile" in out.stderr


def test_celery_stops_on_a_broken_config_instead_of_using_defaults(tmp_path: Path) -> None:
    config = tmp_path / "monitor.yaml"
    config.write_text("redis_url: redis://127.0.0.1:6379/9\nredis_prefix: [not, a, string]\n")
    code = "import monitor.celery_app"
    out = _run(["-c", code], tmp_path, _env(MDE_MONITOR_CONFIG=str(config)))
    assert out.returncode == 2
    assert f"config error: {config}: redis_prefix" in out.stderr
    assert "Traceback" not in out.stderr
    # a missing file is still fine (environment defaults)
    out = _run(["-c", code], tmp_path, _env(MDE_MONITOR_CONFIG=str(tmp_path / "absent.yaml")))
    assert out.returncode == 0, out.stderr


def test_sync_retries_with_backoff_when_redis_is_down(tmp_path: Path) -> None:
    """A sync that cannot reach Redis is retried (with backoff), not recorded as a failure."""
    from monitor.redis_conn import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    config = tmp_path / "monitor.yaml"
    config.write_text("tenants:\n  - {name: t1, tenant_id: tid, client_id: c, client_secret: s}\n")
    code = (
        "import logging, sys\n"
        "from monitor.logs import setup_logging\n"
        "setup_logging('INFO', 'json')\n"
        "from monitor.celery_app import app\n"
        "app.conf.task_always_eager = True\n"
        "from monitor import tasks\n"
        "tasks.REDIS_RETRIES = 2\n"
        "r = tasks.sync_tenant.apply(args=['t1'])\n"
        "print(r.state)\n"
    )
    out = _run(["-c", code], tmp_path, {**_env(MDE_MONITOR_CONFIG=str(config)), "REDIS_URL": url})
    lines = [json.loads(x) for x in out.stderr.splitlines() if x.startswith("{")]
    retries = [x for x in lines if x["message"].startswith("sync interrupted: Redis unavailable")]
    assert len(retries) == 2, out.stderr
    assert all(x["in_s"] >= 5 * 0.8 for x in retries)
    assert retries[1]["in_s"] > 5 * 1.2  # backoff grows
    gave_up = [x for x in lines if x["message"].startswith("sync failed: Redis unavailable")]
    assert gave_up and "Redis at redis://:***@127.0.0.1:" in gave_up[0]["error"]
    assert "hunter2" not in out.stderr + out.stdout
