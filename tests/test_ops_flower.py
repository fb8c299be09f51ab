"""Flower works with the product's broker: it sees the queues under our key prefix (issue 9.10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from celery_helpers import REPO, wait_until

from monitor.celery_app import SYNC_QUEUE, SYNC_TASK, build_app
from monitor.config import Settings
from monitor.redis_conn import free_port

pytest.importorskip("flower")


def test_flower_reads_queue_lengths_through_the_broker(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    config = tmp_path / "monitor.yaml"
    config.write_text(f"redis_url: {redis_url}\nredis_prefix: {redis_prefix}\n")
    app = build_app(Settings(redis_url=redis_url, redis_prefix=redis_prefix), env={})
    assert app.connection().as_uri().startswith("redis://")  # a scheme Flower understands
    for _ in range(3):  # no worker runs: they wait in the queue
        app.send_task(SYNC_TASK, args=["nobody"], queue=SYNC_QUEUE)
    app.close()
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MDE_MONITOR_CONFIG": str(config),
        "FLOWER_UNAUTHENTICATED_API": "true",
    }
    env.pop("REDIS_URL", None)
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "monitor.celery_app", "flower",
         "--address=127.0.0.1", f"--port={port}", "--inspect_timeout=500"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:

        def lengths() -> dict[str, int] | None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/queues/length", timeout=5)
            except httpx.HTTPError:
                return None
            if r.status_code != 200:
                return None
            return {q["name"]: q["messages"] for q in r.json()["active_queues"]}

        got = wait_until(lengths, 60, "Flower answers /api/queues/length")
        assert got.get(SYNC_QUEUE) == 3, got
    finally:
        flower.terminate()
        try:
            flower.wait(15)
        except subprocess.TimeoutExpired:
            flower.kill()
