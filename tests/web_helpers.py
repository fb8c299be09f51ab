"""A populated tenant for the console tests: two committed syncs (hostile machine names
included), a real dispatcher run that leaves a firing alert, a sent file delivery and a dead
letter (a webhook to a closed loopback port)."""

from __future__ import annotations

import socket
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from detect_helpers import TENANT, TENANT_ID, build_graph, commit, standard_tenant

from monitor.alerts.dispatch import Dispatcher
from monitor.config import Settings, parse_settings
from monitor.snapshot.store import SnapshotStore

SCRIPT_NAME = "<script>alert(1)</script>"
CHANNEL_NAME = "<!channel>"
VIEWER_TOKEN = "viewer-token-0123456789abcdef"
OPERATOR_TOKEN = "operator-token-0123456789abcdef"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def write_alerts(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sinks.yaml").write_text(
        textwrap.dedent(
            f"""
            delivery:
              max_attempts: 1
            sinks:
              file:
                type: file
                path: {directory / "alerts.jsonl"}
              hook:
                type: webhook
                url: http://127.0.0.1:{_closed_port()}/hook
                secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
            """
        )
    )
    (directory / "rules.yaml").write_text(
        textwrap.dedent(
            """
            rules:
              - name: machine-risk-raised
                description: A machine's risk went up
                severity: high
                match:
                  type: mde.machine.risk_raised
                sinks: [file, hook]
                group_by: [tenant]
            """
        )
    )
    return directory


def settings_for(
    redis_url: str, prefix: str, alerts_dir: Path, *, tokens: bool = False, **web: object
) -> Settings:
    doc: dict[str, object] = {
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "alerts_dir": str(alerts_dir),
        "tenants": [
            {
                "name": TENANT,
                "tenant_id": TENANT_ID,
                "client_id": "00000000-0000-0000-0000-00000000c11e",
                "client_secret": "not-a-real-secret",
            }
        ],
        "web": {
            **(
                {
                    "tokens": [
                        {"name": "alice", "role": "viewer", "token": VIEWER_TOKEN},
                        {"name": "olga", "role": "operator", "token": OPERATOR_TOKEN},
                    ]
                }
                if tokens
                else {}
            ),
            **web,
        },
    }
    return parse_settings(doc, "test")


def populate(client: redis.Redis, settings: Settings) -> dict[str, str]:
    """Two syncs (m00/m01 carry hostile names and go High) and one dispatcher pass."""
    store = SnapshotStore(client, settings.redis_prefix)
    t = standard_tenant(machines=10)
    t.machines["m00"]["computerDnsName"] = SCRIPT_NAME
    t.machines["m01"]["computerDnsName"] = CHANNEL_NAME
    now = datetime.now(UTC)
    iso = lambda d: d.isoformat(timespec="milliseconds").replace("+00:00", "Z")  # noqa: E731
    commit(store, build_graph(t), finished=iso(now - timedelta(minutes=2)))
    t2 = t.copy()
    t2.machines["m00"]["riskScore"] = "High"
    t2.machines["m01"]["riskScore"] = "High"
    t2.machines["m02"]["exposureLevel"] = "High"
    commit(store, build_graph(t2), finished=iso(now - timedelta(minutes=1)))
    d = Dispatcher(settings, client, consumer="web-test")
    try:
        d.drain(5.0)
    finally:
        d.close()
    return {"tenant": TENANT}


class Served:
    """The console on 127.0.0.1:<free port> in a thread of this process."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("console did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
