"""`mde-monitor query` (J1QL over the latest snapshots) and `mde-monitor questions`."""

from __future__ import annotations

import csv
import json
import sys
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from monitor.cli.app import ExitCode, app, console, out, print_json, state
from monitor.query import QueryError, QuerySyntaxError, run_query
from monitor.redis_conn import connect

questions_app = typer.Typer(
    help="The question library: Defender questions in J1's managed-question format.",
    no_args_is_help=True,
)
app.add_typer(questions_app, name="questions")

LIST_COLUMNS = ("_tenant", "displayName", "_type", "_key")
FORMATS = ("table", "json", "csv")


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return json.dumps(v, default=str)


def _columns(doc: dict[str, Any]) -> list[str]:
    if doc["type"] == "list":
        return list(LIST_COLUMNS)
    cols: dict[str, None] = {}
    for row in doc["data"]:
        cols.update(dict.fromkeys(row))
    return list(cols)


def print_result(doc: dict[str, Any], fmt: str, title: str | None = None) -> None:
    """The result document as a Rich table, J1 JSON, or CSV on stdout."""
    if fmt == "json":
        print_json(doc)
        return
    cols = _columns(doc)
    if fmt == "csv":
        all_cols = cols
        if doc["type"] == "list":
            seen: dict[str, None] = {}
            for item in doc["data"]:
                seen.update(dict.fromkeys(item))
            all_cols = list(seen)
        w = csv.writer(sys.stdout)
        w.writerow(all_cols)
        for row in doc["data"]:
            w.writerow([_cell(row.get(c)) for c in all_cols])
        return
    table = Table(*cols, title=title, title_justify="left", box=None, pad_edge=False)
    for row in doc["data"]:
        table.add_row(*(escape(_cell(row.get(c))) for c in cols))
    out.print(table)
    note = f"{doc['count']:,} {'entities' if doc['type'] == 'list' else 'rows'}"
    if doc.get("truncated"):
        note += f" [yellow](truncated: {escape(str(doc.get('message', '')))})[/yellow]"
    console.print(note, highlight=False)


def query_error(exc: QueryError, text: str) -> None:
    """The message, the offending line and a caret under the column; exit 2."""
    kind = "syntax error" if isinstance(exc, QuerySyntaxError) else "query error"
    console.print(f"[red]{kind}[/red]: {escape(str(exc))}", highlight=False)
    lines = text.splitlines()
    if 1 <= exc.line <= len(lines) and exc.column >= 1:
        console.print("  " + escape(lines[exc.line - 1]), highlight=False, markup=True)
        console.print("  " + " " * (exc.column - 1) + "^", highlight=False)
    raise typer.Exit(ExitCode.USAGE)


@app.command("query")
def query_cmd(
    text: str = typer.Argument(..., help='The J1QL query, e.g. "FIND HostAgent WITH ...".'),
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="One tenant (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="J1's result document on stdout."),
    fmt: str = typer.Option("table", "--format", help="table, json or csv."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Return at most N rows."),
    raw: bool = typer.Option(False, "--raw", help="Include each entity's _rawData."),
) -> None:
    """Run a J1QL query over the latest committed snapshot (see docs/query.md).

    Exit 0 (an empty result too), 2 for a syntax or query error (line and column shown).
    """
    if fmt not in FORMATS:
        console.print(f"unsupported --format {fmt!r} (supported: {', '.join(FORMATS)})")
        raise typer.Exit(ExitCode.USAGE)
    settings = state.settings()
    client = connect(settings.redis_url)
    try:
        doc = run_query(client, settings, text, tenant, include_raw=raw, limit=limit)
    except QueryError as exc:
        query_error(exc, text)
        return
    print_result(doc, "json" if as_json else fmt)


@questions_app.command("list")
def questions_list(
    as_json: bool = typer.Option(False, "--json", help="The questions in J1's format."),
    tag: str | None = typer.Option(None, "--tag", help="Only questions with this tag."),
) -> None:
    """List the shipped questions (id, title, tags)."""
    from monitor.questions import load_questions

    questions = [q for q in load_questions() if tag is None or tag in q.tags]
    if as_json:
        print_json([q.to_dict() for q in questions])
        return
    table = Table("id", "title", "tags", box=None, pad_edge=False)
    for q in questions:
        table.add_row(q.id, escape(q.title), ", ".join(q.tags))
    out.print(table)


@questions_app.command("run")
def questions_run(
    name: str = typer.Argument(..., help="Question id (see `questions list`)."),
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="One tenant (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="{query name: J1 result} on stdout."),
    fmt: str = typer.Option("table", "--format", help="table, json or csv."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most N rows per query."),
) -> None:
    """Run every query of a question over the latest snapshot(s)."""
    from monitor.questions import find_question

    question = find_question(name)
    if question is None:
        console.print(f"unknown question {name!r}: see `mde-monitor questions list`")
        raise typer.Exit(ExitCode.USAGE)
    if fmt not in FORMATS:
        console.print(f"unsupported --format {fmt!r} (supported: {', '.join(FORMATS)})")
        raise typer.Exit(ExitCode.USAGE)
    settings = state.settings()
    client = connect(settings.redis_url)
    results: dict[str, Any] = {}
    for q in question.queries:
        try:
            results[q.name] = run_query(client, settings, q.query, tenant, limit=limit)
        except QueryError as exc:
            query_error(exc, q.query)
    if as_json:
        print_json({"id": question.id, "title": question.title, "results": results})
        return
    if fmt == "table":
        out.print(f"[bold]{escape(question.title)}[/bold]", highlight=False)
    for q in question.queries:
        print_result(results[q.name], fmt, title=f"{q.name} ({q.results_are})")


def test_query_rules(json_out: bool) -> None:
    """`rules test --query`: evaluate every query rule now without writing state or events."""
    from monitor.alerts.query_rules import evaluate, rules_for
    from monitor.alerts.rules import load_rules
    from monitor.query.graph import load_query_graph
    from monitor.snapshot.store import SnapshotStore

    settings = state.settings()
    client = connect(settings.redis_url)
    ruleset = load_rules(settings.alerts_dir)
    evaluations = []
    for tenant in SnapshotStore(client, settings.redis_prefix).tenants():
        rules = rules_for(ruleset.rules, tenant)
        graph = load_query_graph(client, settings.redis_prefix, tenant) if rules else None
        if graph is not None:
            evaluations += evaluate(
                client, settings.redis_prefix, tenant, rules, graph, write=False
            )
    problems = [e for e in ruleset.problems if e.rule is None or "query" in e.message]
    if json_out:
        print_json(
            {
                "evaluations": [e.to_dict() for e in evaluations],
                "errors": [e.to_dict() for e in problems],
            }
        )
    else:
        if not evaluations:
            out.print("no query rule applies to a tenant with a snapshot", highlight=False)
        for e in evaluations:
            head = f"[bold]{escape(e.rule)}[/bold] on {escape(e.tenant)}: {e.current} in the set"
            if e.baseline:
                head += " (first evaluation: baseline)"
            if e.error:
                head += f" [red]error[/red]: {escape(e.error)}"
            out.print(head, highlight=False)
            for m in e.entered:
                out.print(f"  would fire:    {m.display}", markup=False, highlight=False)
            for _k, d in e.left:
                out.print(f"  would resolve: {d}", markup=False, highlight=False)
        for p in problems:
            console.print(f"[red]rule error[/red]: {escape(str(p))}", highlight=False)
    if problems or any(e.error for e in evaluations):
        raise typer.Exit(ExitCode.USAGE)
