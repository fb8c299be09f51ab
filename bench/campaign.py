"""Randomized fault campaign: faults per resource, SIGKILLs during sync, Redis restarts.

    python bench/campaign.py --seed 1 --cases 60 --max-seconds 300      # `make campaign`

A simulated tenant on the HTTPS simulator, a private Redis (unix socket, AOF fsync always: a
restart keeps every acknowledged write) and, per case, drawn from one seeded RNG:

- 0-3 machines change (healthStatus, riskScore, exposureLevel), as Defender would report;
- random faults on random resources (HTTP 429/500/503/403, malformed JSON, truncated bodies,
  dropped connections; once, twice, or for the whole case);
- a sync in a forked child that may be SIGKILLed at a named commit point (after_diff, mid_queue,
  before_exec, after_exec) or after a random delay;
- sometimes a Redis restart (SIGTERM or SIGKILL), between syncs or while one runs;
- alert dispatch after each case (a rule on every machine event into a file sink).

Then the faults are cleared, one clean sync and a drain run, and the campaign checks what
matters, printing it: phantom deletions (nothing is ever removed from the simulator, so any
deleted/removed/resolved event is one), lost and duplicated events (every machine field's
events must chain old -> new from its first value to its final one, exactly once), duplicated
event ids, and notifications: duplicated notification ids, events never notified or notified
twice. Exit 0 when all are zero, 1 otherwise. The seed makes the draws (not the timing) repeat.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

from monitor.alerts.dispatch import Dispatcher
from monitor.config import load_settings
from monitor.events.stream import read_range
from monitor.redis_conn import _server_binary
from monitor.simulator import Simulator, generate_tenant
from monitor.simulator.faults import Fault
from monitor.snapshot.commit import CRASH_ENV
from monitor.sync import run_sync

TENANT = "sim"
PREFIX = "campaign"
FIELDS: dict[str, list[str]] = {
    "healthStatus": ["Active", "Inactive", "ImpairedCommunication", "NoSensorData"],
    "riskScore": ["None", "Informational", "Low", "Medium", "High"],
    "exposureLevel": ["None", "Low", "Medium", "High"],
}
CRASH_POINTS = ("after_diff", "mid_queue", "before_exec", "after_exec")
FAULT_SPECS: tuple[dict[str, Any], ...] = (
    {"kind": "status", "status": 429, "retry_after": 0},
    {"kind": "status", "status": 500},
    {"kind": "status", "status": 503, "retry_after": 0},
    {"kind": "status", "status": 403},
    {"kind": "malformed"},
    {"kind": "truncated"},
    {"kind": "drop"},
)
FAST_HTTP = {
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "max_retry_seconds": 2,
    "max_attempts": 3,
    "timeout_seconds": 3,
}
RULES = """
rules:
  - name: every-machine-change
    match: {type: "mde.machine.*"}
    sinks: [out]
    group_by: [tenant]
    group_wait: 0s
    group_interval: 0s
    repeat_interval: 0s
    max_events: 1000
"""


@dataclass
class Report:
    seed: int
    cases: int = 0
    syncs: int = 0
    sync_outcomes: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    faults: int = 0
    redis_restarts: int = 0
    mutations: int = 0
    events: int = 0
    notifications: int = 0
    phantom_deletions: int = 0
    lost_events: int = 0
    duplicated_events: int = 0
    duplicated_event_ids: int = 0
    duplicated_notification_ids: int = 0
    events_not_notified: int = 0
    events_notified_twice: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.phantom_deletions
            or self.lost_events
            or self.duplicated_events
            or self.duplicated_event_ids
            or self.duplicated_notification_ids
            or self.events_not_notified
            or self.events_notified_twice
        )


class PrivateRedis:
    """A redis-server of our own on a unix socket (restartable without touching anyone else's)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.sock = directory / "redis.sock"
        self.url = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                _server_binary(),
                "--port",
                "0",
                "--unixsocket",
                str(self.sock),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(unix_socket_path=str(self.sock)).ping():
                    return
            except (redis.ConnectionError, OSError):
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def restart(self, sig: int) -> None:
        self.stop(sig)
        self.start()


def _sync_child(config: str, crash_at: str | None, errors: str) -> None:
    """Body of the forked sync: exit 0 ok/degraded, 1 failed, 2 raised (its type in `errors`)."""
    if crash_at:
        os.environ[CRASH_ENV] = crash_at
    else:
        os.environ.pop(CRASH_ENV, None)
    try:
        settings = load_settings(config)
        summary = run_sync(settings, TENANT, redis_client=redis.Redis.from_url(settings.redis_url))
    except BaseException as exc:  # a Redis restart mid-sync, a busy lock: the next case redoes it
        with open(errors, "a") as fh:
            fh.write(type(exc).__name__ + "\n")
        os._exit(2)
    os._exit(0 if summary.status in ("ok", "degraded") else 1)


class Campaign:
    def __init__(self, seed: int, work: Path, machines: int = 12) -> None:
        self.rng = random.Random(seed)
        self.report = Report(seed=seed)
        self.work = work
        self.tenant = generate_tenant(
            machines=machines,
            users=4,
            vulns_per_machine=2,
            cves=8,
            logon_users_per_machine=1,
            seed=seed,
        )
        self.redis = PrivateRedis(work)
        self.sim = Simulator(tenants=[self.tenant], state_dir=work / "sim")
        self.out = work / "notifications.jsonl"
        self.first_values: dict[tuple[str, str], Any] = {}
        self.fork = multiprocessing.get_context("fork")

    # setup ------------------------------------------------------------------------------------

    def __enter__(self) -> Campaign:
        self.redis.start()
        self.sim.start()
        alerts = self.work / "alerts"
        alerts.mkdir()
        (alerts / "rules.yaml").write_text(textwrap.dedent(RULES))
        (alerts / "sinks.yaml").write_text(f'sinks:\n  out: {{type: file, path: "{self.out}"}}\n')
        data = self.sim.config_dict(
            extra={
                "redis_url": self.redis.url,
                "redis_prefix": PREFIX,
                "http": FAST_HTTP,
                "alerts_dir": str(alerts),
            }
        )
        self.config = self.work / "monitor.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.settings = load_settings(self.config)
        self.client = redis.Redis.from_url(self.redis.url)
        self.t = self.sim.tenant(self.tenant.tenant_id)
        for mid, machine in self.t.machines.items():
            for name in FIELDS:
                self.first_values[(mid, name)] = machine.get(name)
        return self

    def __exit__(self, *exc: object) -> None:
        self.sim.stop()
        self.redis.stop()

    # one case ---------------------------------------------------------------------------------

    def _mutate(self) -> None:
        for mid in self.rng.sample(sorted(self.t.machines), self.rng.randint(0, 3)):
            name = self.rng.choice(sorted(FIELDS))
            current = self.t.machines[mid].get(name)
            value = self.rng.choice([v for v in FIELDS[name] if v != current])
            self.t.set_machine(mid, **{name: value})
            self.report.mutations += 1

    def _faults(self, endpoints: list[str]) -> None:
        self.sim.clear_faults()
        for endpoint in self.rng.sample(endpoints, self.rng.randint(0, 2)):
            spec = dict(self.rng.choice(FAULT_SPECS))
            self.sim.add_fault(
                Fault(endpoint=endpoint, times=self.rng.choice([1, 2, None]), **spec)
            )
            self.report.faults += 1

    def _sync(self, crash_at: str | None, kill_after: float | None, redis_kill: bool) -> str:
        self.report.syncs += 1
        # syncs here come seconds apart, not every 15 minutes: let the API budget windows pass
        # (they enforce Microsoft's per-minute limits, which dozens of syncs a minute exceed)
        self._call(
            lambda: [self.client.delete(k) for k in self.client.scan_iter(f"{PREFIX}:budget:*")]
        )
        errors = self.work / "sync-errors.txt"
        errors.write_text("")
        proc = self.fork.Process(target=_sync_child, args=(str(self.config), crash_at, str(errors)))
        proc.start()
        if redis_kill:
            time.sleep(self.rng.uniform(0.0, 0.6))
            self._restart_redis()
        proc.join(kill_after if kill_after is not None else 120)
        if proc.is_alive():
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
            outcome = "killed"
        else:
            code = proc.exitcode
            outcome = {0: "ok", 1: "failed", -signal.SIGKILL: "killed"}.get(
                code or 0, f"exit{code}"
            )
            if code == 2:
                outcome = "raised " + (errors.read_text().strip() or "?")
        if outcome == "killed":
            self.report.kills += 1
        # a sync killed, or cut off from Redis, leaves its lock until the TTL: time we compress
        # by removing it once the process is gone (fencing refuses a late writer anyway)
        self._call(
            lambda: [self.client.delete(k) for k in self.client.scan_iter(f"{PREFIX}:lock:*")]
        )
        self.report.sync_outcomes[outcome] = self.report.sync_outcomes.get(outcome, 0) + 1
        return outcome

    def _restart_redis(self) -> None:
        self.redis.restart(self.rng.choice([signal.SIGTERM, signal.SIGKILL]))
        self.report.redis_restarts += 1

    def _call(self, fn: Any) -> Any:
        for _ in range(50):
            try:
                return fn()
            except (redis.ConnectionError, redis.BusyLoadingError, OSError):
                time.sleep(0.1)
        return fn()

    def _dispatch(self) -> None:
        def drain() -> None:
            d = Dispatcher(self.settings, self.client, consumer="campaign")
            try:
                d.drain(10)
            finally:
                d.close()

        self._call(drain)

    def case(self, endpoints: list[str]) -> None:
        self.report.cases += 1
        self._mutate()
        self._faults(endpoints)
        if self.rng.random() < 0.15:
            self._restart_redis()
        roll = self.rng.random()
        crash_at = self.rng.choice(CRASH_POINTS) if roll < 0.3 else None
        kill_after = self.rng.uniform(0.05, 1.5) if 0.3 <= roll < 0.5 else None
        redis_kill = 0.5 <= roll < 0.6
        self._sync(crash_at, kill_after, redis_kill)
        self._dispatch()

    # the run ----------------------------------------------------------------------------------

    def run(self, cases: int, max_seconds: float) -> Report:
        started = time.monotonic()
        self._sync(None, None, False)  # the baseline
        endpoints = sorted(k for k in self.sim.counts() if not k.startswith("login:"))
        endpoints.append("login:/token")
        for _ in range(cases):
            if time.monotonic() - started > max_seconds:
                break
            self.case(endpoints)
        self.sim.clear_faults()
        for _ in range(3):  # the clean final sync (again if the last case left it failing)
            if self._sync(None, None, False) == "ok":
                break
        self._dispatch()
        self.check()
        self.report.seconds = round(time.monotonic() - started, 1)
        return self.report

    # the verdict ------------------------------------------------------------------------------

    def check(self) -> None:
        r = self.report
        events = [e for _sid, e in self._call(lambda: list(read_range(self.client, PREFIX)))]
        r.events = len(events)
        ids = collections.Counter(e["id"] for e in events)
        r.duplicated_event_ids = sum(n - 1 for n in ids.values() if n > 1)
        for e in events:
            t = str(e["type"])
            if t.endswith((".deleted", "_removed", ".removed", ".resolved")):
                r.phantom_deletions += 1
                r.problems.append(f"phantom: {t} {e['subject']}")
        # every machine field's changes chain from its first value to its final one, once
        per_gen: dict[tuple[str, str], dict[int, tuple[Any, Any]]] = {}
        for e in events:
            if not str(e["type"]).startswith("mde.machine.") or e["type"] in (
                "mde.machine.created",
                "mde.machine.deleted",
            ):
                continue
            mid = str(e["subject"]).split(":", 1)[1]
            for name, ch in (e["data"].get("changes") or {}).items():
                if name in FIELDS and isinstance(ch, dict):
                    per_gen.setdefault((mid, name), {})[int(e["data"]["generation"])] = (
                        ch.get("old"),
                        ch.get("new"),
                    )
        for (mid, name), first in self.first_values.items():
            value, prev = first, None
            for _gen, (old, new) in sorted(per_gen.get((mid, name), {}).items()):
                if old != value:
                    if (old, new) == prev:
                        r.duplicated_events += 1
                        r.problems.append(f"duplicated: {mid} {name} {old}->{new}")
                    else:
                        r.lost_events += 1
                        r.problems.append(
                            f"lost: {mid} {name} had {value}, next event {old}->{new}"
                        )
                value, prev = new, (old, new)
            final = self.t.machines[mid].get(name)
            if value != final:
                r.lost_events += 1
                r.problems.append(f"lost: {mid} {name} ends at {value}, Defender says {final}")
        # notifications: unique ids, every machine event notified exactly once
        lines = self.out.read_text().splitlines() if self.out.exists() else []
        docs = [json.loads(line) for line in lines]
        r.notifications = len(docs)
        nids = collections.Counter(d["id"] for d in docs)
        r.duplicated_notification_ids = sum(n - 1 for n in nids.values() if n > 1)
        notified = collections.Counter(ev["id"] for d in docs for ev in d["events"])
        machine_ids = {e["id"] for e in events if str(e["type"]).startswith("mde.machine.")}
        r.events_not_notified = len(machine_ids - set(notified))
        r.events_notified_twice = sum(1 for i in machine_ids if notified[i] > 1)


def run(seed: int, cases: int, max_seconds: float, machines: int = 12) -> Report:
    work = Path(tempfile.mkdtemp(prefix="mde-campaign-"))
    # the campaign runs its own Redis: $REDIS_URL (which wins over a config file) must not send
    # its syncs to another one
    outer_url = os.environ.pop("REDIS_URL", None)
    try:
        with Campaign(seed, work, machines) as campaign:
            return campaign.run(cases, max_seconds)
    finally:
        if outer_url is not None:
            os.environ["REDIS_URL"] = outer_url
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--machines", type=int, default=12)
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args(argv)
    report = run(args.seed, args.cases, args.max_seconds, args.machines)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(f"campaign seed {report.seed}: {report.cases} cases in {report.seconds}s")
        print(
            f"  syncs {report.syncs} {report.sync_outcomes}, kills {report.kills},"
            f" faults {report.faults}, redis restarts {report.redis_restarts},"
            f" machine changes {report.mutations}"
        )
        print(f"  events {report.events}, notifications {report.notifications}")
        for name in (
            "phantom_deletions",
            "lost_events",
            "duplicated_events",
            "duplicated_event_ids",
            "duplicated_notification_ids",
            "events_not_notified",
            "events_notified_twice",
        ):
            print(f"  {name.replace('_', ' ')}: {getattr(report, name)}")
        for p in report.problems[:20]:
            print(f"  ! {p}")
        print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
