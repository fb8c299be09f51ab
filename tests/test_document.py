"""`mde-monitor document`: the data-model tables equal JupiterOne's, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from monitor.model.document import (
    check_document,
    data_model_markdown,
    document_markdown,
    extract_data_model,
    markdown_table,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "000_0aad891aaea008d6.txt"
SEED_COPY = ROOT / "docs" / "jupiterone-seed.md"
DATA_MODEL_DOC = ROOT / "docs" / "data-model.md"


def seed_tables(path: Path) -> str:
    """The seed's text from "## Data Model" to just before the end-marker comment."""
    text = path.read_text(encoding="utf-8")
    start = text.index("## Data Model\n")
    end = text.index("<!--", start)
    return text[start:end].rstrip("\n") + "\n"


@pytest.mark.parametrize(
    "seed",
    [
        pytest.param(SHARED_SEED, id="shared-seed"),
        pytest.param(SEED_COPY, id="docs-copy"),
    ],
)
def test_tables_equal_the_seed_byte_for_byte(seed: Path) -> None:
    if not seed.exists():
        pytest.skip(f"{seed} not present")
    expected = seed_tables(seed)
    separators = [ln for ln in expected.splitlines() if ln.startswith("| ---")]
    assert len(separators) == 3  # the three tables really are in the slice
    assert data_model_markdown() == expected
    assert extract_data_model(seed.read_text(encoding="utf-8")) == expected
    assert check_document(seed.read_text(encoding="utf-8")) == []


def test_seed_copy_is_the_shared_seed() -> None:
    if not SHARED_SEED.exists():
        pytest.skip("shared/ is not beside the clone")
    assert SEED_COPY.read_bytes() == SHARED_SEED.read_bytes()


def test_markdown_table_pads_like_prettier() -> None:
    table = markdown_table(["A", "Longer head"], [["wide cell", "x"], ["y", ""]])
    assert table == (
        "| A         | Longer head |\n"
        "| --------- | ----------- |\n"
        "| wide cell | x           |\n"
        "| y         |             |"
    )
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a"], [["b", "c"]])


def test_data_model_doc_is_up_to_date() -> None:
    text = DATA_MODEL_DOC.read_text(encoding="utf-8")
    assert text == document_markdown(), "run: mde-monitor document --output docs/data-model.md"
    assert check_document(text) == []
    assert "### Machine (`microsoft_defender_machine`)" in text
    assert "`riskScore`" in text


def test_check_reports_stale_blocks() -> None:
    good = document_markdown()
    stale_table = good.replace("| **IS**    ", "| **IS_NOT**").replace(
        "| **IS**                |", "| **ISNT**              |"
    )
    assert check_document(stale_table) == ["the Data Model tables differ from the schema"]
    stale_props = good.replace("`riskScore`, ", "", 1)
    assert check_document(stale_props) == ["the property list differs from the schema"]
    assert check_document("# nothing here\n") == ["no '## Data Model' section"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_cli_prints_writes_and_checks(runner: CliRunner, tmp_path: Path) -> None:
    from monitor.cli import app

    printed = runner.invoke(app, ["document"])
    assert printed.exit_code == 0, printed.output
    assert printed.stdout == document_markdown()

    out = tmp_path / "sub" / "data-model.md"
    written = runner.invoke(app, ["document", "--output", str(out)])
    assert written.exit_code == 0, written.output
    assert out.read_text(encoding="utf-8") == document_markdown()

    ok = runner.invoke(app, ["document", "--check", str(out)])
    assert ok.exit_code == 0, ok.output
    assert runner.invoke(app, ["document", "--check", str(SEED_COPY)]).exit_code == 0

    out.write_text(document_markdown().replace("`Finding`      ", "`Vulnerability`"))
    stale = runner.invoke(app, ["document", "--check", str(out)])
    assert stale.exit_code == 1
    assert "differ" in stale.stderr and "+| Vulnerability" in stale.stderr

    missing = runner.invoke(app, ["document", "--check", str(tmp_path / "nope.md")])
    assert missing.exit_code == 2
    assert "nope.md" in missing.stderr


def test_cli_json(runner: CliRunner) -> None:
    from monitor.cli import app

    result = runner.invoke(app, ["document", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    types = [e["_type"] for e in data["entities"]]
    assert "microsoft_defender_machine" in types
    machine = next(e for e in data["entities"] if e["_type"] == "microsoft_defender_machine")
    assert "riskScore" in machine["properties"] and machine["key"].endswith("{id}")
    assert data["mappedRelationships"][0]["target"] == "cve"
