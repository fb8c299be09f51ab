"""Query errors: every one carries the line and column (1-based) of the offending token."""

from __future__ import annotations


class QueryError(Exception):
    """A query that cannot run: unknown alias, date compared with a string, refused scan, ..."""

    def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.message = message
        self.line = line
        self.column = column

    def to_dict(self) -> dict[str, object]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "line": self.line,
            "column": self.column,
        }


class QuerySyntaxError(QueryError):
    """The text is not J1QL: what was expected at which token."""
