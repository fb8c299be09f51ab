"""`mde-monitor worker`, `beat`, `trigger`, `status`, `metrics` and `demo`: running the product."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import redis
import typer
from rich.markup import escape
from rich.table import Table

from monitor.cli.app import (
    ExitCode,
    app,
    console,
    duration_option,
    json_option,
    out,
    print_json,
    state,
)
from monitor.config import CONFIG_ENV, Settings
from monitor.redis_conn import describe_error, is_redis_error


def _redis(settings: Settings) -> redis.Redis:
    """A client for the config's Redis (kombu's redis+socket:// spelling accepted too)."""
    from monitor.celery_app import redis_urls
    from monitor.redis_conn import connect

    return connect(redis_urls(settings.redis_url).client)


def _export_config_env(settings: Settings) -> None:
    """Make the Celery app (imported next) and its pool processes read the same config file."""
    if settings.source_path is not None:
        os.environ[CONFIG_ENV] = str(settings.source_path.resolve())


def _celery_main(argv: list[str]) -> None:
    """Run Celery; exit with its status (non-zero when it failed, so supervisors restart it)."""
    import click
    from celery.bin.celery import celery as celery_cmd

    from monitor.celery_app import app as celery_app

    # `Celery.start` drops the exit status click returns; call the command the same way, keep it
    celery_cmd.params[0].default = celery_app
    try:
        result = celery_cmd.main(args=argv, standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except (SystemExit, typer.Exit):
        raise
    except Exception as exc:  # beat re-raises what stopped it (after logging it)
        why = describe_error(exc) if is_redis_error(exc) else f"{type(exc).__name__}: {exc}"
        console.print(f"[red]{argv[0]} stopped[/red]: {why}", highlight=False, soft_wrap=True)
        raise typer.Exit(ExitCode.FAILED) from None
    finally:
        celery_cmd.params[0].default = None
    if code:
        console.print(f"[red]{argv[0]} exited with status {code}[/red]", highlight=False)
    raise typer.Exit(int(code or 0))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    queues: str | None = typer.Option(
        None,
        "--queues",
        "-Q",
        help="Comma list of queues (default: sync,dispatch,deliver). Queue `query` (query alert"
        " rules) wants a worker of its own: `--queues query`, which runs one pool process.",
    ),
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        "-c",
        help="Pool processes (default: number of CPUs; 1 for `--queues query`).",
    ),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l", help="DEBUG, INFO, WARNING, ERROR."),
    pool: str | None = typer.Option(None, "--pool", "-P", help="prefork (default), threads, solo."),
    hostname: str | None = typer.Option(None, "--hostname", "-n", help="Worker node name."),
    metrics_port: int | None = typer.Option(
        None,
        "--metrics-port",
        help="Serve Prometheus /metrics here (default: config metrics_port).",
    ),
    metrics_addr: str | None = typer.Option(
        None,
        "--metrics-addr",
        envvar="MDE_MONITOR_METRICS_ADDR",
        help="Address /metrics listens on (default 0.0.0.0; 127.0.0.1 keeps it local).",
    ),
) -> None:
    """Run a Celery worker (wraps `celery -A monitor.celery_app worker`; extra args pass through)."""
    _export_config_env(state.settings())
    if metrics_port:
        os.environ["MDE_MONITOR_METRICS_PORT"] = str(metrics_port)
    if metrics_addr:
        os.environ["MDE_MONITOR_METRICS_ADDR"] = metrics_addr
    from monitor.celery_app import DEFAULT_WORKER_QUEUES, QUERY_QUEUE

    argv = ["worker", "--loglevel", loglevel]
    names = [q.strip() for q in (queues or ",".join(DEFAULT_WORKER_QUEUES)).split(",") if q.strip()]
    argv += ["-Q", ",".join(names)]
    if names == [QUERY_QUEUE] and not concurrency:
        concurrency = 1  # the query evaluator keeps tenants' graphs in one process
    if concurrency:
        argv += ["-c", str(concurrency)]
    if pool:
        argv += ["-P", pool]
    if hostname:
        argv += ["-n", hostname]
    _celery_main(argv + list(ctx.args))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def beat(
    ctx: typer.Context,
    loglevel: str = typer.Option("INFO", "--loglevel", "-l", help="DEBUG, INFO, WARNING, ERROR."),
) -> None:
    """Run the scheduler (wraps `celery -A monitor.celery_app beat`; one is active at a time)."""
    _export_config_env(state.settings())
    _celery_main(["beat", "--loglevel", loglevel, *ctx.args])


@app.command()
def trigger(
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="Tenant name from the config."),
    all_tenants: bool = typer.Option(False, "--all", help="Every configured tenant."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the sync(s) to finish."),
    timeout: float = duration_option(900.0, "--timeout", help="How long to wait with --wait"),
    as_json: bool = json_option("Print task ids (and results) as JSON."),
) -> None:
    """Enqueue a sync now (also for DISABLED tenants); workers pick it up from the `sync` queue."""
    from monitor.celery_app import SYNC_QUEUE, SYNC_TASK, build_app

    settings = state.settings()
    if tenant:
        names = [settings.tenant(tenant).name]
    elif all_tenants:
        names = [t.name for t in settings.tenants]
    else:
        console.print("choose a tenant with --tenant NAME or --all")
        raise typer.Exit(ExitCode.USAGE)
    _redis(settings).ping()  # Redis away: one line now, not Celery's minute of retries
    celery_app = build_app(settings)
    sent = {
        name: celery_app.send_task(
            SYNC_TASK, args=[name], kwargs={"origin": "trigger"}, queue=SYNC_QUEUE
        )
        for name in names
    }
    results: dict[str, object] = {}
    code = ExitCode.OK
    if wait:
        deadline = time.monotonic() + timeout
        for name, res in sent.items():
            try:
                value = res.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False)
            except Exception as exc:  # celery's TimeoutError and backend errors
                value = {"tenant": name, "status": "unknown", "error": type(exc).__name__}
            results[name] = value
            status = value.get("status") if isinstance(value, dict) else "error"
            if status in ("failed", "error", "unknown") or not isinstance(value, dict):
                code = ExitCode.FAILED
            elif status == "busy" and code == ExitCode.OK:
                code = ExitCode.BUSY
            elif status == "degraded" and code == ExitCode.OK:
                code = ExitCode.DEGRADED
    if as_json:
        print_json(
            [{"tenant": n, "task_id": r.id, "result": results.get(n)} for n, r in sent.items()]
        )
    else:
        for name, res in sent.items():
            line = f"{name}: enqueued sync {res.id}"
            if name in results:
                value = results[name]
                status = value.get("status") if isinstance(value, dict) else value
                line += f" -> {status}"
            out.print(line, highlight=False)
    celery_app.close()
    raise typer.Exit(code)


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    delta = now - ts
    sign = "" if delta >= 0 else "in "
    delta = abs(delta)
    if delta < 90:
        text = f"{delta:.0f}s"
    elif delta < 5400:
        text = f"{delta / 60:.0f}m"
    elif delta < 172800:
        text = f"{delta / 3600:.1f}h"
    else:
        text = f"{delta / 86400:.1f}d"
    return f"{sign}{text}" + (" ago" if not sign else "")


@app.command()
def status(as_json: bool = json_option("Print the status as JSON.")) -> None:
    """Per tenant: last sync (when, status, counts), next run; event backlog; dead letters.

    Exit 0, or 1 when some tenant's last sync failed or dispatch is blocked (rules not loaded).
    """
    from monitor.status import DISPATCH_BLOCKED, any_failed, collect_status

    settings = state.settings()
    st = collect_status(settings, _redis(settings))
    if as_json:
        print_json(st.to_dict())
    else:
        now = datetime.now(UTC).timestamp()
        table = Table(
            "tenant", "interval", "last sync", "status", "took", "items", "events", "next run"
        )
        for t in st.tenants:
            last = t.last_completed
            colour = {"ok": "green", "degraded": "yellow"}.get(last.status if last else "", "red")
            status_text = f"[{colour}]{last.status}[/{colour}]" if last else "never"
            if t.running:
                status_text += f" (syncing on {t.running.get('host', '?')} since {t.running.get('since', '?')})"
            table.add_row(
                t.name,
                t.polling_interval or "-",
                _ago(last.finished_ts, now) if last else "-",
                status_text,
                f"{last.duration_seconds:.1f}s"
                if last and last.duration_seconds is not None
                else "-",
                f"{sum(last.counts.values()):,}" if last and last.counts else "-",
                f"{sum(last.events.values()):,}" if last and last.events else "-",
                _ago(t.next_run_ts, now)
                if t.next_run_ts
                else ("disabled" if t.polling_interval == "DISABLED" else "not scheduled"),
            )
        out.print(table)
        lanes = [
            f"{t.name} {t.identity_lane.status} {_ago(t.identity_lane.finished_ts, now)}"
            for t in st.tenants
            if t.identity_lane is not None
        ]
        if lanes:
            out.print(
                "identity lane (last run): " + ", ".join(lanes), markup=False, highlight=False
            )
        for t in st.tenants:
            if t.last_completed and t.last_completed.error:
                out.print(f"  {t.name}: {t.last_completed.error}", markup=False, highlight=False)
        if st.dispatch_blocked is not None:
            since = st.dispatch_blocked.get("since")
            out.print(
                f"[bold red]{DISPATCH_BLOCKED}[/bold red]"
                f" (since {_ago(float(since), now) if since else '?'}):"
                f" {escape(str(st.dispatch_blocked.get('reason', '')))}",
                highlight=False,
                soft_wrap=True,
            )
        out.print(
            f"query rules: evaluated by the query evaluator {st.query_evaluator}"
            if st.query_evaluator
            else "query rules: evaluated by each sync (no query evaluator: worker --queues query)",
            markup=False,
            highlight=False,
        )
        groups = ", ".join(f"{g.name}: {g.pending} pending, {g.lag or 0} unread" for g in st.groups)
        out.print(f"events: {st.stream_length:,} in stream" + (f" ({groups})" if groups else ""))
        if st.dead_letters is not None:
            out.print(f"failed deliveries (dead letters): {st.dead_letters}")
            for d in st.failed_deliveries[:10]:
                reason = d.get("reason") or d.get("error") or ""
                out.print(
                    f"  {d.get('delivery', d.get('id'))} sink={d.get('sink', '?')} {reason}",
                    markup=False,
                    highlight=False,
                )
    if any_failed(st):
        raise typer.Exit(ExitCode.FAILED)


@app.command()
def metrics() -> None:
    """Print the Prometheus metrics once (text exposition), computed from Redis."""
    from monitor.metrics import exposition

    settings = state.settings()
    names = [t.name for t in settings.tenants]
    text = exposition(_redis(settings), settings.redis_prefix, lambda: names)
    typer.echo(text, nl=False)


@app.command()
def demo(
    cycles: int = typer.Option(3, "--cycles", min=1, help="Change sets to play (then stop)."),
    interval: float = duration_option(4.0, "--interval", help="Time between syncs, at least 1s"),
    machines: int = typer.Option(50, "--machines", min=5, help="Machines in the simulated tenant."),
    data_dir: Path = typer.Option(
        Path(".data"), "--data-dir", help="Working files and embedded Redis."
    ),
    timeout: float = duration_option(180.0, "--timeout", help="Give up after this long"),
    live: bool | None = typer.Option(
        None, "--live/--no-live", help="Live view (default: on a terminal)."
    ),
    as_json: bool = json_option("Print the summary as JSON."),
) -> None:
    """The whole product on this machine: simulator, Redis, worker, beat, alerts, webhook receiver.

    Nothing outside this machine is contacted. Exit 0 when every expected alert arrived.
    """
    from rich.console import Console

    from monitor.demo import DemoOptions, run_demo

    if interval < 1.0:
        raise typer.BadParameter("at least 1s", param_hint="--interval")

    summary = run_demo(
        DemoOptions(
            cycles=cycles,
            interval=interval,
            machines=machines,
            data_dir=data_dir,
            timeout=timeout,
            live=live,
            alerts_dir=state.alerts_dir,
        ),
        console=console,
        out=Console(stderr=True) if as_json else out,
    )
    if as_json:
        print_json(summary.to_dict())
    if not summary.ok:
        raise typer.Exit(ExitCode.FAILED)


@app.command()
def init(
    directory: Path = typer.Argument(Path("."), help="Where to write config/ and alerts/."),
    force: bool = typer.Option(False, "--force", help="Overwrite files that exist."),
) -> None:
    """Write a starter config/monitor.yaml and the shipped rule pack (alerts/) into DIRECTORY."""
    from monitor.starter import init as write_starter

    written, skipped = write_starter(directory, force=force)
    for p in written:
        out.print(f"wrote {p}", highlight=False, markup=False)
    for p in skipped:
        out.print(f"kept {p} (exists; --force overwrites)", highlight=False, markup=False)
    out.print(
        f"next: edit {directory / 'config' / 'monitor.yaml'}, then"
        f" `mde-monitor --config {directory / 'config' / 'monitor.yaml'} check`",
        highlight=False,
        markup=False,
    )


@app.command()
def health(
    worker_node: bool = typer.Option(
        False, "--worker", help="This host's worker answers a Celery ping over the broker."
    ),
    beat_lock: bool = typer.Option(
        False, "--beat", help="Redis answers and a beat holds redbeat's lock (one is active)."
    ),
    timeout: float = duration_option(5.0, "--timeout", help="How long to wait for the answer"),
) -> None:
    """Container health check: exit 0 when healthy, 1 otherwise (one line on stderr)."""
    import socket

    from monitor.celery_app import build_app

    settings = state.settings()
    client = _redis(settings)
    client.ping()
    if beat_lock:
        key = f"{settings.redis_prefix}:redbeat::lock"
        if not client.exists(key):
            console.print(f"unhealthy: no beat holds {key}", highlight=False)
            raise typer.Exit(ExitCode.FAILED)
    if worker_node:
        celery_app = build_app(settings)
        node = f"celery@{socket.gethostname()}"
        try:
            replies = celery_app.control.ping(destination=[node], timeout=timeout, limit=1) or []
        finally:
            celery_app.close()
        if not any(node in r for r in replies):
            console.print(f"unhealthy: worker {node} did not answer a ping", highlight=False)
            raise typer.Exit(ExitCode.FAILED)
    out.print("healthy", highlight=False)
