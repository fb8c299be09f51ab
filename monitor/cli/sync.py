"""`mde-monitor sync`, `check` and `export`: run a sync now, probe permissions, dump a snapshot."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

import redis
import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from monitor.cli.app import ExitCode, app, console, json_option, out, print_json, state
from monitor.collect.check import check_tenant
from monitor.collect.progress import Progress as ProgressFn
from monitor.collect.progress import on_budget_wait, throttled, wait_message
from monitor.config import TenantConfig
from monitor.model.schema import LANE_FULL, LANE_IDENTITY
from monitor.redis_conn import connect
from monitor.snapshot.lock import TenantBusy
from monitor.snapshot.store import SnapshotStore
from monitor.sync import SyncSummary, run_sync

PROGRESS_EVERY_S = 10.0  # a non-terminal run logs its progress this often


@contextmanager
def _progress(terminal: bool) -> Iterator[ProgressFn]:
    """Progress of a sync on stderr, including waits for Microsoft's rate limits.

    On a terminal: a live display (a wait shows as "waiting 38 s for /logonusers: 100/min").
    Otherwise (a pipe, a log file, --json): one line per stage change, at most every
    PROGRESS_EVERY_S per stage, and one line per rate-limit wait.
    """
    if not terminal:

        def line(stage: str, done: int, total: int | None) -> None:
            of = f"/{total}" if total is not None else ""
            console.print(f"progress: {stage} {done}{of}", highlight=False, markup=False)

        def wait_line(endpoint: str, seconds: float, limit: str) -> None:
            console.print(wait_message(endpoint, seconds, limit), highlight=False, markup=False)

        remove = on_budget_wait(wait_line)
        try:
            yield throttled(line, PROGRESS_EVERY_S)
        finally:
            remove()
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}
        waits: dict[str, TaskID] = {}

        def report(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        def waiting(endpoint: str, seconds: float, limit: str) -> None:
            text = wait_message(endpoint, seconds, limit)
            if endpoint not in waits:
                waits[endpoint] = bar.add_task(text, total=None)
            bar.update(waits[endpoint], description=text)

        remove = on_budget_wait(waiting)
        try:
            yield report
        finally:
            remove()


def _tenants(name: str | None, all_tenants: bool) -> list[TenantConfig]:
    settings = state.settings()
    if name:
        return [settings.tenant(name)]
    if all_tenants or len(settings.tenants) == 1:
        return list(settings.tenants)
    names = ", ".join(t.name for t in settings.tenants) or "none configured"
    console.print(f"choose a tenant with --tenant NAME or --all (configured: {names})")
    raise typer.Exit(ExitCode.USAGE)


def _print_summary(s: SyncSummary) -> None:
    colour = {"ok": "green", "degraded": "yellow", "failed": "red"}.get(s.status, "white")
    out.print(
        f"[bold]{s.tenant}[/bold]: [{colour}]{s.status}[/{colour}]"
        f"  generation {s.generation}  {s.duration_seconds:.1f}s"
        + ("  (baseline)" if s.baseline else "")
        + (f"  ({s.lane} lane: the other resources kept)" if s.lane != "full" else "")
    )
    if s.error:
        out.print(f"  error: {s.error}", markup=False)
    if s.counts:
        t = Table("type", "items", box=None, pad_edge=False)
        for typ, n in s.counts.items():
            t.add_row(typ, f"{n:,}")
        out.print(t)
    req = s.requests
    if req:
        t = Table("endpoint", "requests", "retries", "429s", box=None, pad_edge=False)
        for ep, n in req.get("requests", {}).items():
            t.add_row(ep, str(n), str(req["retries"].get(ep, 0)), str(req["throttled"].get(ep, 0)))
        out.print(t)
        out.print(
            f"  {req.get('requests_total', 0)} requests, {req.get('retries_total', 0)} retries,"
            f" {req.get('throttled_total', 0)} throttled"
        )
        if req.get("budget_wait_seconds"):
            out.print(
                f"  waited {req['budget_wait_seconds']:.0f} s for Microsoft's rate limits"
                " (wall clock)",
                highlight=False,
            )
    if s.events:
        out.print("  events: " + ", ".join(f"{k} x{v}" for k, v in s.events.items()), markup=False)
    for scope, err in s.scopes_incomplete.items():
        out.print(
            f"  [yellow]kept previous data[/yellow] for {scope}: {err or 'not refreshed'}",
            highlight=False,
        )
    for note in s.notes:
        out.print(f"  [yellow]note[/yellow]: {escape(note)}", highlight=False)


def _count_sync(client: Any, prefix: str, summary: dict[str, Any]) -> None:
    """Count a CLI sync in the metrics like a worker's (mde_syncs_total, API requests, events)."""
    from monitor.metrics import record_sync

    try:
        record_sync(client, prefix, summary)
    except redis.RedisError as exc:
        console.print(f"could not count the sync in the metrics: {exc}", highlight=False)


class Lane(StrEnum):
    FULL = LANE_FULL
    IDENTITY = LANE_IDENTITY


@app.command()
def sync(
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="Tenant name from the config."),
    all_tenants: bool = typer.Option(False, "--all", help="Sync every configured tenant in turn."),
    accept_drop: bool = typer.Option(
        False, "--accept-drop", help="Apply deletions held back by the suspicious-drop guard rail."
    ),
    lane: Lane = typer.Option(
        Lane.FULL,
        "--lane",
        help="identity: users, groups, roles and employees only (the rest is kept).",
    ),
    as_json: bool = json_option("Print the summary as JSON."),
) -> None:
    """Sync now: collect, diff against the last snapshot, save the snapshot and its change events.

    Exit 0 ok, 1 failed, 3 degraded (a resource kept its previous data), 4 tenant busy.
    """
    settings = state.settings()
    client = connect(settings.redis_url)
    summaries: list[SyncSummary] = []
    busy = False
    for t in _tenants(tenant, all_tenants):
        try:
            with _progress(sys.stderr.isatty()) as progress:
                summaries.append(
                    run_sync(
                        settings,
                        t.name,
                        redis_client=client,
                        accept_drop=accept_drop,
                        progress=progress,
                        lane=lane.value,
                    )
                )
        except TenantBusy as exc:
            busy = True
            refused = SyncSummary(t.name, "busy", None, 0.0, error=str(exc), lane=lane.value)
            _count_sync(client, settings.redis_prefix, refused.to_dict())
            console.print(f"[yellow]{t.name}: busy[/yellow]: {exc}", highlight=False)
            if as_json:
                summaries.append(refused)
            continue
        _count_sync(client, settings.redis_prefix, summaries[-1].to_dict())
        if not as_json:
            _print_summary(summaries[-1])
    if as_json:
        print_json([s.to_dict() for s in summaries] if all_tenants else summaries[0].to_dict())
    statuses = {s.status for s in summaries}
    if "failed" in statuses:
        raise typer.Exit(ExitCode.FAILED)
    if busy:
        raise typer.Exit(ExitCode.BUSY)
    if "degraded" in statuses:
        raise typer.Exit(ExitCode.DEGRADED)


@app.command()
def check(
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="Tenant name (default: all)."),
    as_json: bool = json_option("Print the probes as JSON."),
) -> None:
    """Sign in and probe each API permission with one cheap call.

    Exit 5 if a permission is missing (or sign-in fails), 3 if all are granted but a feature is
    not enabled/licensed in the tenant (403 DisabledFeature / DisallowedOperation).
    """
    settings = state.settings()
    tenants = [settings.tenant(tenant)] if tenant else list(settings.tenants)
    results = {t.name: check_tenant(settings, t) for t in tenants}
    problems = _alert_file_problems()
    if as_json:
        print_json(
            {
                "tenants": {
                    name: [p.to_dict() for p in probes] for name, probes in results.items()
                },
                "alert_files": problems,
            }
        )
    else:
        for name, probes in results.items():
            table = Table(
                "permission", "API", "result", title=f"tenant {name}", title_justify="left"
            )
            for p in probes:
                mark = {
                    True: "[green]ok[/green]",
                    False: "[red]error[/red]",
                    None: "[yellow]unknown[/yellow]",
                }[p.ok]
                if p.reason == "not_enabled":
                    mark = "[yellow]not enabled/licensed[/yellow]"
                table.add_row(p.permission, p.api, mark if p.ok else f"{mark} {p.detail}")
            out.print(table)
        for problem in problems:
            out.print(f"[red]alert file error[/red]: {problem}", highlight=False)
    failed = [p for probes in results.values() for p in probes if p.ok is False]
    if any(p.reason != "not_enabled" for p in failed):
        raise typer.Exit(ExitCode.MISSING_PERMISSION)
    if failed:  # granted, but the tenant lacks the feature or licence: syncs will be degraded
        raise typer.Exit(ExitCode.DEGRADED)
    if problems:
        raise typer.Exit(ExitCode.USAGE)


def _alert_file_problems() -> list[str]:
    """Rule and sink file errors, so `check` reports a bad rule or sink file too."""
    from monitor.alerts.rules import build_sinks, load_rules

    settings = state.settings()
    if not settings.alerts_dir.is_dir():  # alerting is optional
        return []
    ruleset = load_rules(settings.alerts_dir)
    sinks, sink_errors = build_sinks(ruleset, ca_bundle=settings.ca_bundle)
    for sink in sinks.values():
        close = getattr(sink, "close", None)
        if callable(close):
            close()
    return [
        str(e) for e in (*ruleset.errors, *sink_errors) if getattr(e, "level", "error") == "error"
    ]


@app.command()
def export(
    tenant: str = typer.Option(..., "--tenant", "-t", help="Tenant name."),
    fmt: str = typer.Option("json", "--format", help="Output format (json)."),
) -> None:
    """Print the tenant's latest snapshot: {entities, relationships, mappedRelationships}."""
    if fmt != "json":
        console.print(f"unsupported --format {fmt!r} (supported: json)")
        raise typer.Exit(ExitCode.USAGE)
    settings = state.settings()
    settings.tenant(tenant)
    graph = SnapshotStore(connect(settings.redis_url), settings.redis_prefix).load_graph(tenant)
    if graph is None:
        console.print(
            f"no snapshot for tenant {tenant!r} yet: run `mde-monitor sync --tenant {tenant}`"
        )
        raise typer.Exit(ExitCode.FAILED)
    print_json(graph.export())
