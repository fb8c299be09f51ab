"""`mde-monitor demo --cycles 3` end to end, on the embedded-Redis path (nothing answers REDIS_URL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from monitor.demo import EXPECTED
from monitor.redis_conn import free_port

REPO = Path(__file__).resolve().parents[1]


def test_demo_three_cycles_with_embedded_redis(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: the demo starts its own Redis
    env = {**os.environ, "REDIS_URL": dead, "PYTHONPATH": str(REPO)}
    env.pop("MDE_MONITOR_CONFIG", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from monitor.cli import main; main()",
            "demo",
            "--cycles",
            "3",
            "--json",
            "--no-live",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True and summary["problems"] == []
    assert summary["redis"].startswith("embedded")
    assert summary["cycles_done"] == 3
    assert summary["expected"] == {kind: True for kind in EXPECTED}
    for rule, state in EXPECTED.values():
        for sink in ("stdout", "webhook"):
            assert summary["alerts"][rule][sink].get(state, 0) >= 1, (rule, sink, state)
    webhook = summary["webhook"]
    assert webhook["verified_unique"] >= len(EXPECTED)
    assert webhook["unverified"] == 0 and webhook["duplicates"] == 0
    assert summary["syncs"].get("ok", 0) >= 4  # the baseline and one per cycle
    assert not {"failed", "error"} & set(summary["syncs"])
    for typ in (
        "mde.machine.created",
        "mde.machine.risk_raised",
        "mde.machine.health_degraded",
        "mde.user.disabled",
        "mde.machine_vulnerability.identified",
        "mde.machine_vulnerability.resolved",
    ):
        assert summary["events"].get(typ, 0) >= 1, typ
    # the generated webhook secret never leaves the process environment
    assert "whsec_" not in proc.stdout + proc.stderr
    for path in (tmp_path / "demo").rglob("*"):
        if path.is_file():
            assert b"whsec_" not in path.read_bytes(), path
    # the embedded Redis was stopped and its data is where the brief says
    assert (tmp_path / "demo-redis").is_dir()
    pid_file = tmp_path / "demo-redis" / "redis.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().strip())
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )
