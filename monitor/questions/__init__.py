"""The question library: Defender questions in JupiterOne's managed-question format.

Each `*.yaml` here holds `sourceId`, `integrationDefinitionId` and `questions:`; a question has
`id`, `title`, `description`, `tags` and one or more named `queries` (`name`, `query`,
`resultsAre`: GOOD | BAD | INFORMATIVE | UNKNOWN). Shipped as package data.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from monitor import safe_yaml

RESULTS_ARE = ("GOOD", "BAD", "INFORMATIVE", "UNKNOWN")


class QuestionError(ValueError):
    """A malformed question file (names the file and the question)."""


@dataclass(frozen=True)
class QuestionQuery:
    name: str
    query: str
    results_are: str = "INFORMATIVE"


@dataclass(frozen=True)
class Question:
    id: str
    title: str
    description: str
    tags: tuple[str, ...]
    queries: tuple[QuestionQuery, ...]
    file: str

    def to_dict(self) -> dict[str, Any]:
        """J1's managed-question shape."""
        return {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "tags": list(self.tags),
            "queries": [
                {"name": q.name, "query": q.query, "resultsAre": q.results_are}
                for q in self.queries
            ],
        }


def _parse(doc: Any, file: str) -> list[Question]:
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise QuestionError(f"{file}: expected a mapping with `questions:`")
    out = []
    for i, q in enumerate(doc["questions"]):
        where = f"{file}: questions[{i}]"
        if not isinstance(q, dict):
            raise QuestionError(f"{where}: expected a mapping")
        for key in ("id", "title", "queries"):
            if not q.get(key):
                raise QuestionError(f"{where}: {key} is required")
        queries = []
        for j, item in enumerate(q["queries"]):
            if not isinstance(item, dict) or not isinstance(item.get("query"), str):
                raise QuestionError(f"{where} ({q['id']}): queries[{j}].query is required")
            results = str(item.get("resultsAre", "INFORMATIVE")).upper()
            if results not in RESULTS_ARE:
                raise QuestionError(
                    f"{where} ({q['id']}): queries[{j}].resultsAre must be one of"
                    f" {', '.join(RESULTS_ARE)}"
                )
            name = str(item.get("name") or f"query{j}")
            queries.append(QuestionQuery(name, " ".join(item["query"].split()), results))
        out.append(
            Question(
                id=str(q["id"]),
                title=str(q["title"]),
                description=" ".join(str(q.get("description", "")).split()),
                tags=tuple(str(t) for t in q.get("tags") or ()),
                queries=tuple(queries),
                file=file,
            )
        )
    return out


def load_questions() -> list[Question]:
    """Every shipped question, in file then question order; ids are unique."""
    root = resources.files(__package__)
    questions: list[Question] = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            try:  # bounded like every other YAML file the project reads
                text = safe_yaml.decode_utf8(entry.read_bytes(), entry.name)
                doc = safe_yaml.loads(text, entry.name)
            except safe_yaml.YamlFileError as exc:
                raise QuestionError(str(exc)) from None
            questions += _parse(doc, entry.name)
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise QuestionError(f"{q.file}: question id {q.id!r} is used twice")
        seen.add(q.id)
    return questions


def find_question(name: str) -> Question | None:
    """A question by id (the `mde-` prefix may be left out)."""
    for q in load_questions():
        if name in (q.id, q.id.removeprefix("mde-")):
            return q
    return None
