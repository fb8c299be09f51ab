"""`mde-monitor` commands: events, history."""

from __future__ import annotations

import orjson
import redis
import typer
from rich.markup import escape

from monitor.cli.app import (
    ExitCode,
    app,
    console,
    json_option,
    json_stream,
    out,
    print_json,
    since_ms,
    state,
)
from monitor.events import history
from monitor.events.envelope import Event
from monitor.redis_conn import connect, describe_error

JSON_OPT = json_option()


def _client() -> tuple[redis.Redis, str]:
    settings = state.settings()
    return connect(settings.redis_url), settings.redis_prefix


def _since(text: str | None) -> int | None:
    return None if text is None else since_ms(text)


def _line(ev: Event) -> str:
    return "  ".join(
        part
        for part in (
            str(ev.get("time", "")),
            history.tenant_of(ev),
            str(ev.get("type", "")),
            history.display_name(ev),
            history.summarize(ev),
        )
        if part
    )


def _emit(ev: Event, as_json: bool) -> None:
    if as_json:
        stream = json_stream()
        stream.write(orjson.dumps(ev).decode() + "\n")
        stream.flush()
    else:
        out.print(_line(ev), markup=False, highlight=False, soft_wrap=True)


@app.command("events")
def events_cmd(
    tenant: str | None = typer.Option(None, "--tenant", help="One tenant (default: all)."),
    type_glob: str | None = typer.Option(
        None, "--type", help="Event type glob, e.g. 'mde.machine.*'."
    ),
    since: str | None = typer.Option(None, "--since", help="24h, 1h30m, 7d or an ISO date/time."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
    as_json: bool = JSON_OPT,
    limit: int = typer.Option(100, "--limit", help="At most this many (the latest); 0 = all."),
) -> None:
    """Show stored change events: one line each (time, tenant, type, name, change), or JSON lines."""
    since_ms = _since(since)
    client, prefix = _client()
    try:
        rows = history.recent(
            client, prefix, tenant=tenant, since_ms=since_ms, type_glob=type_glob, limit=limit
        )
        for _sid, ev in rows:
            _emit(ev, as_json)
        if follow:
            after = rows[-1][0] if rows else "$"
            for _sid, ev in history.follow(
                client, prefix, tenant=tenant, after_id=after, type_glob=type_glob
            ):
                _emit(ev, as_json)
    except KeyboardInterrupt:
        return
    except redis.RedisError as exc:
        console.print(f"[red]error[/red]: {escape(describe_error(exc))}", highlight=False)
        raise typer.Exit(ExitCode.FAILED) from None


@app.command("history")
def history_cmd(
    key: str = typer.Option(..., "--key", help="The entity's or relationship's _key."),
    tenant: str | None = typer.Option(None, "--tenant", help="One tenant (default: all)."),
    since: str | None = typer.Option(None, "--since", help="24h, 1h30m, 7d or an ISO date/time."),
    as_json: bool = JSON_OPT,
) -> None:
    """The change history of one entity from the stored events (oldest first)."""
    since_ms = _since(since)
    client, prefix = _client()
    try:
        events = history.entity_history(client, prefix, key, tenant=tenant, since_ms=since_ms)
    except redis.RedisError as exc:
        console.print(f"[red]error[/red]: {escape(describe_error(exc))}", highlight=False)
        raise typer.Exit(ExitCode.FAILED) from None
    if as_json:
        print_json(events)
        return
    if not events:
        console.print(f"no stored events about {key}", markup=False, highlight=False)
        return
    for ev in events:
        parts = [str(ev.get("time", "")), str(ev.get("type", ""))]
        summary = history.summarize(ev)
        if ev.get("subject") != key:
            summary = f"{history.display_name(ev)} {summary}".strip()
        if summary:
            parts.append(summary)
        out.print("  ".join(parts), markup=False, highlight=False, soft_wrap=True)
