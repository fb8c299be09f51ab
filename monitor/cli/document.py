"""`mde-monitor document`: print, write or check the data-model Markdown (docs/data-model.md)."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import typer

from monitor.cli.app import ExitCode, app, console, json_option, print_json
from monitor.model.document import (
    check_document,
    data_model_markdown,
    document_markdown,
    extract_data_model,
)


@app.command("document")
def document(
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write the document to FILE instead of printing it."
    ),
    check: Path | None = typer.Option(
        None,
        "--check",
        help="Exit 1 if FILE's generated blocks (Data Model tables, property list) are stale.",
    ),
    as_json: bool = json_option("Print the declarations as JSON."),
) -> None:
    """The data model (entity, relationship and mapped-relationship tables) from the schema."""
    if check is not None:
        _check(check)
        return
    if as_json:
        from monitor.model.document import schema_json

        print_json(schema_json())
        return
    text = document_markdown()
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        console.print(f"{output}: cannot write: {exc.strerror}", highlight=False, markup=False)
        raise typer.Exit(ExitCode.FAILED) from None
    console.print(f"wrote {output}", highlight=False, markup=False)


def _check(path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        console.print(f"{path}: cannot read: {exc.strerror}", highlight=False, markup=False)
        raise typer.Exit(ExitCode.USAGE) from None
    problems = check_document(text)
    if not problems:
        console.print(f"{path}: up to date", highlight=False, markup=False)
        return
    for problem in problems:
        console.print(f"{path}: {problem}", highlight=False, markup=False)
    current = extract_data_model(text)
    if current is not None:
        diff = difflib.unified_diff(
            current.splitlines(keepends=True),
            data_model_markdown().splitlines(keepends=True),
            fromfile=str(path),
            tofile="generated",
        )
        sys.stderr.writelines(diff)
    console.print(
        "regenerate with: mde-monitor document --output docs/data-model.md",
        highlight=False,
        markup=False,
    )
    raise typer.Exit(ExitCode.FAILED)
