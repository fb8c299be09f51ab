"""`mde-monitor` commands: rules, dispatch, deliveries, silence, sinks."""

from __future__ import annotations

import getpass
import json
import os
import signal
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from monitor import safe_yaml
from monitor.alerts.deliver import DeliveryQueue
from monitor.alerts.dispatch import BLOCKED_MESSAGE, Dispatcher, subject_of
from monitor.alerts.group import group_key, group_labels, notification_id
from monitor.alerts.match import parse_datetime
from monitor.alerts.render import render_notification
from monitor.alerts.rules import (
    LoadError,
    RuleSet,
    build_sinks,
    load_rules,
    sink_rows,
)
from monitor.alerts.silences import SilenceStore
from monitor.alerts.sinks.base import Notification, Sink
from monitor.alerts.throttle import window
from monitor.cli.app import (
    ExitCode,
    app,
    console,
    duration_option,
    json_option,
    out,
    print_json,
    since_ms,
    state,
)
from monitor.config import config_path
from monitor.durations import format_duration, parse_duration
from monitor.events import stream
from monitor.events.envelope import EVENT_TYPES, Event, make_event
from monitor.redis_conn import connect

rules_app = typer.Typer(help="Alert rules: check, test, replay.", no_args_is_help=True)
deliveries_app = typer.Typer(
    help="Notification deliveries: list, retry, log.", no_args_is_help=True
)
silence_app = typer.Typer(help="Silences: time-boxed mutes by matcher.", no_args_is_help=True)
sinks_app = typer.Typer(help="Notification sinks: list, enable.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
app.add_typer(deliveries_app, name="deliveries")
app.add_typer(silence_app, name="silence")
app.add_typer(sinks_app, name="sinks")

JSON_OPT = json_option()


def _alerts_dir() -> Path:
    """--alerts-dir, else the config's alerts_dir (the config is only read when needed).

    Without a config file: ./alerts when present, else the rule pack shipped with the package.
    """
    if state.alerts_dir is not None:
        return state.alerts_dir
    if state.config_path is None and not config_path().exists():
        from monitor.starter import pack_dir

        local = Path("alerts")
        chosen = local if local.is_dir() else pack_dir()
        console.print(f"no config file: using the rules in {chosen}", highlight=False)
        return chosen
    return state.settings().alerts_dir


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (TypeError, ValueError):
        return ""


def _print_errors(errors: list[LoadError]) -> None:
    for e in errors:
        colour = "red" if e.level == "error" else "yellow"
        console.print(
            f"[{colour}]{e.level}[/{colour}] {escape(str(e))}",
            markup=True,
            highlight=False,
            soft_wrap=True,
        )


def _load(
    with_sinks: bool = True, redis_client: Any = None
) -> tuple[RuleSet, dict[str, Sink], list[LoadError]]:
    ruleset = load_rules(_alerts_dir())
    sinks: dict[str, Sink] = {}
    errors = list(ruleset.errors)
    if with_sinks:
        prefix, ca = "mde", None
        if state.config_path is not None or state._settings is not None:
            settings = state.settings()
            prefix, ca = settings.redis_prefix, settings.ca_bundle
        sinks, sink_errors = build_sinks(
            ruleset, redis_client=redis_client, redis_prefix=prefix, ca_bundle=ca
        )
        errors += sink_errors
    return ruleset, sinks, errors


# ------------------------------------------------------------------------------------- rules


@rules_app.command("check")
def rules_check(json_out: bool = JSON_OPT) -> None:
    """Validate every rule and sink file; exit 2 when there are errors (file:line rule)."""
    ruleset, sinks, errors = _load()
    if json_out:
        print_json(
            {
                "directory": str(ruleset.directory),
                "rules": [r.summary() for r in ruleset.rules],
                "sinks": {
                    n: {"type": c.type, "built": n in sinks, "file": c.file, "line": c.line}
                    for n, c in ruleset.sinks.items()
                },
                "errors": [e.to_dict() for e in errors],
            }
        )
    else:
        table = Table(title=f"alert rules in {ruleset.directory}")
        for col in ("rule", "severity", "types", "sinks", "group_by", "wait/interval/repeat"):
            table.add_column(col)
        for r in ruleset.rules:
            table.add_row(
                r.name,
                r.severity,
                "\n".join(r.types),
                ", ".join(r.sinks),
                ", ".join(p.raw for p in r.group_by),
                f"{format_duration(r.group_wait)}/{format_duration(r.group_interval)}/"
                f"{format_duration(r.repeat_interval)}",
            )
        out.print(table)
        out.print(
            f"{len(ruleset.rules)} rules, {len(ruleset.sinks)} sinks"
            f" ({len(sinks)} ready), {len([e for e in errors if e.level == 'error'])} errors,"
            f" {len([e for e in errors if e.level == 'warning'])} warnings",
            highlight=False,
        )
        _print_errors(errors)
    if any(e.level == "error" for e in errors):
        raise typer.Exit(ExitCode.USAGE)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_field(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `path` in an event's data: `changes.<field>.old|new|added|removed` or a dotted path."""
    path = path.removeprefix("data.")
    if path.startswith("changes."):
        key, _, side = path.removeprefix("changes.").rpartition(".")
        if side not in ("old", "new", "added", "removed") or not key:
            raise typer.BadParameter(
                f"{path}: use changes.<field>.old|new|added|removed", param_hint="--field"
            )
        data.setdefault("changes", {}).setdefault(key, {})[side] = value
        return
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise typer.BadParameter(f"{path}: {part} is not a mapping", param_hint="--field")
        node = nxt
    node[parts[-1]] = value


def _test_event(
    event_file: Path | None, type_: str | None, fields: list[str], tenant: str, subject: str
) -> Event:
    if event_file is not None:
        try:  # bounded like the rule files (monitor.safe_yaml)
            doc = safe_yaml.load_file(event_file)
        except safe_yaml.YamlFileError as exc:
            raise typer.BadParameter(str(exc), param_hint="--event") from None
        if not isinstance(doc, dict) or "type" not in doc:
            raise typer.BadParameter(
                f"{event_file}: expected an event with a type", param_hint="--event"
            )
        if "specversion" not in doc:
            data = dict(doc.get("data") or {})
            doc = make_event(
                tenant=str(data.pop("tenant", tenant)),
                type=doc["type"],
                subject=str(doc.get("subject", subject)),
                generation=int(data.pop("generation", 0)),
                data=data,
            )
        event: Event = doc
    elif type_ is not None:
        if type_ not in EVENT_TYPES:
            raise typer.BadParameter(f"unknown event type {type_!r}", param_hint="--type")
        event = make_event(tenant=tenant, type=type_, subject=subject, generation=0, data={})
    else:
        raise typer.BadParameter("give --event FILE or --type TYPE")
    for f in fields:
        key, sep, raw = f.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{f!r}: use path=value", param_hint="--field")
        set_field(event["data"], key.strip(), _parse_value(raw))
    return event


def _preview(sink: Sink | None, notification: Notification) -> Any:
    render = getattr(sink, "render", None) if sink is not None else None
    if callable(render):
        try:
            return render(notification)
        except Exception as exc:  # a preview must not fail the command
            return f"(the sink could not render: {type(exc).__name__})"
    return asdict(notification)


@rules_app.command("test")
def rules_test(
    event_file: Path | None = typer.Option(None, "--event", help="A CloudEvent (JSON/YAML) file."),
    type_: str | None = typer.Option(None, "--type", help="Build an event of this type."),
    field: list[str] = typer.Option(
        [], "--field", help="path=value in data, e.g. changes.riskScore.new=High (repeatable)."
    ),
    tenant: str = typer.Option("contoso", "--tenant"),
    subject: str = typer.Option("microsoft_defender_machine:test", "--subject"),
    json_out: bool = JSON_OPT,
    query: bool = typer.Option(
        False, "--query", help="Query rules: what would enter or leave now (nothing written)."
    ),
) -> None:
    """Which rules an event fires or resolves, and the message each sink would get (nothing sent).

    With --query: every query rule over every tenant's latest snapshot, against its stored set.
    """
    if query:
        from monitor.cli.query import test_query_rules

        test_query_rules(json_out)
        return
    event = _test_event(event_file, type_, field, tenant, subject)
    ruleset, sinks, errors = _load()
    results: list[dict[str, Any]] = []
    for rule, status in ruleset.evaluate(event):
        labels = group_labels(rule, event)
        key = group_key(rule.name, labels)
        title, summary = render_notification(rule, status, labels, [event], 1)
        n = Notification(
            id=notification_id("preview", 0),
            rule=rule.name,
            description=rule.description,
            severity=rule.severity,
            status="resolved" if status == "resolved" else "firing",
            group_key=key,
            group_labels=labels,
            title=title,
            summary=summary,
            events=[event],
            total=1,
            tenant=event["data"].get("tenant"),
        )
        results.append(
            {
                "rule": rule.name,
                "status": status,
                "title": title,
                "summary": summary,
                "sinks": {s: _preview(sinks.get(s), n) for s in rule.sinks},
            }
        )
    if json_out:
        print_json({"event": event, "matches": results, "errors": [e.to_dict() for e in errors]})
        return
    if not results:
        out.print(f"no rule fires or resolves on this {event['type']} event", highlight=False)
    for r in results:
        out.print(
            f"[bold]{r['rule']}[/bold] ({r['status']}): {escape(r['title'])}",
            highlight=False,
            soft_wrap=True,
        )
        out.print(r["summary"], markup=False, highlight=False, soft_wrap=True)
        for s, preview in r["sinks"].items():
            body = (
                preview if isinstance(preview, str) else json.dumps(preview, indent=2, default=str)
            )
            out.print(f"--- sink {s} ---", markup=False)
            out.print(body, markup=False, highlight=False, soft_wrap=True)
    _print_errors([e for e in errors if e.level == "error"])


def replay_events(ruleset: RuleSet, events: list[tuple[str, Event]]) -> dict[str, Any]:
    """Simulate the pipeline over stored events by their own times (no silences, nothing sent)."""
    per_rule: dict[str, dict[str, int]] = {
        r.name: {"matched": 0, "throttled": 0, "notifications": 0, "resolved": 0}
        for r in ruleset.rules
    }
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    windows: dict[tuple[str, str], float] = {}
    firing: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    fired: list[dict[str, Any]] = []

    def flush(gid: tuple[str, str, str], g: dict[str, Any], at: float) -> None:
        rule = ruleset.rule(gid[0])
        assert rule is not None
        title, _ = render_notification(rule, gid[2], g["labels"], g["events"], g["pending"])
        per_rule[gid[0]]["resolved" if gid[2] == "resolved" else "notifications"] += 1
        fired.append(
            {
                "time": _when(at),
                "rule": gid[0],
                "status": gid[2],
                "events": g["pending"],
                "title": title,
            }
        )
        g.update(pending=0, events=[], last_flush=at, due=None)

    for _sid, ev in events:
        when = parse_datetime(ev.get("time"))
        t = when.timestamp() if when else 0.0
        for gid, g in groups.items():
            if g["due"] is not None and g["due"] <= t:
                flush(gid, g, g["due"])
        for rule, status in ruleset.evaluate(ev):
            subject = subject_of(ev)
            if status == "firing":
                per_rule[rule.name]["matched"] += 1
                labels = group_labels(rule, ev)
                key = group_key(rule.name, labels)
                firing[(rule.name, subject)] = (key, labels)
            else:
                hit = firing.pop((rule.name, subject), None)
                if hit is None:
                    continue
                key, labels = hit
            token, ttl_s = window(rule.repeat_interval, status, ev, rule.name)
            if windows.get((rule.name, token), -1.0) > t:
                per_rule[rule.name]["throttled"] += 1
                continue
            windows[(rule.name, token)] = t + ttl_s
            gid = (rule.name, key, status)
            g = groups.setdefault(
                gid, {"labels": labels, "pending": 0, "events": [], "last_flush": None, "due": None}
            )
            if g["due"] is None:
                g["due"] = t + rule.group_wait
                if g["last_flush"] is not None:
                    g["due"] = max(g["due"], g["last_flush"] + rule.group_interval)
            g["pending"] += 1
            if len(g["events"]) < rule.max_events:
                g["events"].append(ev)
    for gid, g in groups.items():
        if g["pending"]:
            flush(gid, g, g["due"])
    fired.sort(key=lambda f: f["time"])
    return {"events": len(events), "rules": per_rule, "notifications": fired}


@rules_app.command("replay")
def rules_replay(
    since: str = typer.Option("7d", "--since", help="How far back: 1h30m, 7d, or an ISO date."),
    tenant: str | None = typer.Option(None, "--tenant"),
    limit: int = typer.Option(50, "--limit", help="Notifications to list (humans)."),
    json_out: bool = JSON_OPT,
) -> None:
    """What the rules would have sent over the stored events (dry run; silences ignored)."""
    start_ms = since_ms(since)
    ruleset, _sinks, errors = _load(with_sinks=False)
    settings = state.settings()
    client = connect(settings.redis_url)
    events = list(stream.read_range(client, settings.redis_prefix, tenant, since_ms=start_ms))
    result = replay_events(ruleset, events)
    if json_out:
        print_json({**result, "errors": [e.to_dict() for e in errors]})
        return
    table = Table(title=f"replay of {result['events']} events since {since}")
    for col in ("rule", "matched", "throttled", "notifications", "resolved"):
        table.add_column(col)
    for name, c in result["rules"].items():
        table.add_row(
            name, *(str(c[k]) for k in ("matched", "throttled", "notifications", "resolved"))
        )
    out.print(table)
    for f in result["notifications"][:limit]:
        out.print(
            f"{f['time']} {f['status']:<8} {f['rule']}: {f['title']}", markup=False, highlight=False
        )
    _print_errors(errors)


# ------------------------------------------------------------------------------------- dispatch


@app.command("dispatch")
def dispatch(
    once: bool = typer.Option(
        False, "--once", help="Evaluate pending events, flush every group now, deliver, exit."
    ),
    timeout: float = duration_option(60.0, "--timeout", help="--once: how long retries may take"),
    consumer: str = typer.Option(
        "dispatch", "--consumer", help="Consumer name in the stream group (keep it stable)."
    ),
    json_out: bool = JSON_OPT,
) -> None:
    """Turn change events into notifications: read the stream, group, deliver with retries."""
    settings = state.settings()
    client = connect(settings.redis_url)
    d = Dispatcher(settings, client, consumer=consumer)
    if once:
        try:
            stats = d.drain(timeout)
        finally:
            d.close()
        if json_out:
            print_json(
                {
                    **stats.to_dict(),
                    "blocked_reason": d.blocked,
                    "errors": [e.to_dict() for e in d.errors],
                }
            )
        else:
            table = Table(title="dispatch --once")
            table.add_column("count")
            table.add_column("value", justify="right")
            for k, v in stats.to_dict().items():
                table.add_row(k, str(v))
            out.print(table)
            _print_errors(d.errors)
        if d.blocked:
            console.print(
                f"[bold red]{BLOCKED_MESSAGE}[/bold red]: {escape(d.blocked)}",
                highlight=False,
                soft_wrap=True,
            )
        if stats.dead or stats.held:
            raise typer.Exit(ExitCode.FAILED)
        if d.blocked or any(e.level == "error" for e in d.errors):
            raise typer.Exit(ExitCode.USAGE)
        return
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    console.print(f"dispatching (consumer {consumer}); Ctrl-C to stop", highlight=False)
    try:
        d.run_forever(stop)
    finally:
        d.close()


# ------------------------------------------------------------------------------------- deliveries


def _queue() -> DeliveryQueue:
    settings = state.settings()
    return DeliveryQueue(connect(settings.redis_url), settings.redis_prefix)


def _disabled_banner(disabled: dict[str, dict[str, Any]]) -> None:
    for name, why in disabled.items():
        console.print(
            f"[bold red]SINK DISABLED[/bold red] {escape(name)} since"
            f" {_when(why.get('since'))}: {escape(str(why.get('reason', '')))} -"
            f" `mde-monitor sinks enable {escape(name)}` re-queues its held deliveries",
            markup=True,
            highlight=False,
            soft_wrap=True,
        )


@deliveries_app.command("list")
def deliveries_list(
    failed: bool = typer.Option(False, "--failed", help="Only retrying, dead and held ones."),
    limit: int = typer.Option(50, "--limit"),
    json_out: bool = JSON_OPT,
) -> None:
    """Recent deliveries, newest first (disabled sinks are called out)."""
    q = _queue()
    rows = q.records(failed_only=failed, limit=limit)
    disabled = q.disabled_sinks()
    if json_out:
        print_json({"disabled_sinks": disabled, "deliveries": rows})
        return
    _disabled_banner(disabled)
    table = Table(title="deliveries" + (" (failed)" if failed else ""))
    for col in ("id", "sink", "rule", "status", "tries", "created", "title / last error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        text = escape(r.get("title", ""))
        if r.get("last_error"):
            text += f"\n[red]{escape(r['last_error'])}[/red]"
        table.add_row(
            *(escape(r.get(k, "")) for k in ("id", "sink", "rule", "status", "attempts")),
            _when(r.get("created_at")),
            text,
        )
    out.print(table)


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: str | None = typer.Argument(None, help="Delivery id (see deliveries list)."),
    all_: bool = typer.Option(False, "--all", help="Every dead or held delivery."),
    queue_only: bool = typer.Option(
        False, "--queue-only", help="Only queue them; the running dispatcher sends."
    ),
    json_out: bool = JSON_OPT,
) -> None:
    """Queue failed deliveries again (fresh retry budget) and try each once now."""
    if bool(delivery_id) == all_:
        raise typer.BadParameter("give a delivery ID or --all")
    settings = state.settings()
    client = connect(settings.redis_url)
    d = Dispatcher(settings, client, consumer="cli-retry")
    if all_:
        ids = d.queue.requeue_failed()
    else:
        assert delivery_id is not None
        if not d.queue.requeue(delivery_id):
            console.print(f"no failed delivery {delivery_id!r}", highlight=False)
            raise typer.Exit(ExitCode.FAILED)
        ids = [delivery_id]
    outcomes = [] if queue_only else [d.deliver(i).to_dict() for i in ids]
    if json_out:
        print_json({"requeued": ids, "outcomes": outcomes})
    else:
        out.print(f"requeued {len(ids)} deliveries", highlight=False)
        for o in outcomes:
            out.print(
                f"{o['id']}: {o['status']} {o.get('error') or ''}", markup=False, highlight=False
            )
    if any(o["status"] in ("dead", "held") for o in outcomes):
        raise typer.Exit(ExitCode.FAILED)


@deliveries_app.command("log")
def deliveries_log(limit: int = typer.Option(50, "--limit"), json_out: bool = JSON_OPT) -> None:
    """The delivery log: every attempt (sink, status, latency) and every silenced event."""
    entries = _queue().log_entries(limit)
    if json_out:
        print_json(entries)
        return
    for e in entries:
        rest = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("id", "ts", "kind"))
        out.print(
            f"{_when(e.get('ts'))} {e.get('kind'):<9} {rest}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


# ------------------------------------------------------------------------------------- silences


def _silences() -> SilenceStore:
    settings = state.settings()
    return SilenceStore(connect(settings.redis_url), settings.redis_prefix)


@silence_app.command("add")
def silence_add(
    match: list[str] = typer.Option(
        ..., "--match", help="field=glob, field!=glob, field=~regex (repeatable; all must match)."
    ),
    for_: str = typer.Option(..., "--for", help="How long: 30m, 8h, 2d."),
    comment: str = typer.Option("", "--comment"),
    by: str = typer.Option("", "--by", help="Author (default $USER).", show_default=False),
    json_out: bool = JSON_OPT,
) -> None:
    """Mute matching events for a while (applied before grouping; logged per event)."""
    try:
        seconds = parse_duration(for_)
        s = _silences().add(
            match, seconds, comment, by or os.environ.get("USER") or getpass.getuser()
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if json_out:
        print_json(s.to_dict())
    else:
        out.print(
            f"silence {s.id} until {_when(s.ends_at)}: {' '.join(s.matchers)}",
            markup=False,
            highlight=False,
        )


@silence_app.command("list")
def silence_list(
    all_: bool = typer.Option(False, "--all", help="Include expired ones (last 7 days)."),
    json_out: bool = JSON_OPT,
) -> None:
    """Active silences (with --all, recently expired ones too)."""
    now = time.time()
    store = _silences()
    items = store.all(now) if all_ else store.active(now)
    if json_out:
        print_json([{**s.to_dict(), "active": s.active(now)} for s in items])
        return
    table = Table(title="silences")
    for col in ("id", "matchers", "until", "by", "comment", "active"):
        table.add_column(col)
    for s in items:
        table.add_row(
            s.id,
            escape("\n".join(s.matchers)),
            _when(s.ends_at),
            escape(s.created_by),
            escape(s.comment),
            str(s.active(now)),
        )
    out.print(table)


@silence_app.command("expire")
def silence_expire(silence_id: str = typer.Argument(...)) -> None:
    """End a silence now."""
    s = _silences().expire(silence_id)
    if s is None:
        console.print(f"no silence {silence_id!r}", highlight=False)
        raise typer.Exit(ExitCode.FAILED)
    out.print(f"silence {s.id} expired", highlight=False)


# ------------------------------------------------------------------------------------- sinks


@sinks_app.command("list")
def sinks_list(json_out: bool = JSON_OPT) -> None:
    """Declared sinks: type, where they send (no secrets), disabled or broken."""
    settings = state.settings()
    client = connect(settings.redis_url)
    ruleset, sinks, errors = _load(redis_client=client)
    q = DeliveryQueue(client, settings.redis_prefix)
    disabled = q.disabled_sinks()
    rows = sink_rows(ruleset, sinks, errors, disabled)
    if json_out:
        print_json(rows)
        return
    _disabled_banner(disabled)
    table = Table(title="sinks")
    for col in ("name", "type", "target", "state", "rules"):
        table.add_column(col, overflow="fold")
    for r in rows:
        st = (
            "DISABLED"
            if r["disabled"]
            else ("broken: " + "; ".join(r["errors"]) if r["errors"] else "ok")
        )
        table.add_row(
            r["name"], r["type"], escape(r["describe"] or "-"), escape(st), ", ".join(r["rules"])
        )
    out.print(table)


@sinks_app.command("enable")
def sinks_enable(name: str = typer.Argument(...)) -> None:
    """Re-enable a sink its receiver had disabled (410); its held deliveries are queued again."""
    q = _queue()
    if name not in q.disabled_sinks():
        out.print(f"sink {name} is not disabled", highlight=False)
        return
    n = q.enable_sink(name)
    out.print(f"sink {name} enabled; {n} held deliveries queued again", highlight=False)
