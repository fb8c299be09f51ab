"""J1QL text -> tokens, each with its offset, line and column."""

from __future__ import annotations

import re
from dataclasses import dataclass

from monitor.query.errors import QuerySyntaxError


@dataclass(frozen=True)
class Token:
    kind: str  # IDENT, STRING, NUMBER, OP, PUNCT, QUOTED, DATE, EOF
    text: str  # the source text (for STRING: the unescaped value; QUOTED/DATE: the inside)
    pos: int  # offset in the query text
    end: int
    line: int
    column: int

    def describe(self) -> str:
        if self.kind == "EOF":
            return "the end of the query"
        if self.kind == "STRING":
            return f"string {self.text!r}"
        return repr(self.text)


_OPS = ("!~=", "!^=", "!$=", ">=", "<=", "!=", "~=", "^=", "$=", ">>", "<<", "=", ">", "<")
_PUNCT = "()|,*.!+-"
_IDENT = re.compile(r"[A-Za-z_@][A-Za-z0-9_@]*")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_DATE = re.compile(r"date\s*\(", re.IGNORECASE)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def tokenize(text: str) -> list[Token]:
    """All tokens of `text`, ending with EOF; QuerySyntaxError on an unknown character."""
    tokens: list[Token] = []
    line, line_start = 1, 0
    i, n = 0, len(text)

    def tok(kind: str, value: str, start: int, end: int) -> None:
        tokens.append(Token(kind, value, start, end, line, start - line_start + 1))

    while i < n:
        c = text[i]
        if c == "\n":
            line, line_start = line + 1, i + 1
            i += 1
            continue
        if c.isspace():
            i += 1
            continue
        if c in "'\"":
            j, out = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    out.append(_ESCAPES.get(text[j + 1], text[j + 1]))
                    j += 2
                    continue
                if text[j] == "\n":
                    break
                out.append(text[j])
                j += 1
            if j >= n or text[j] != c:
                raise QuerySyntaxError(
                    f"unterminated string starting with {c}", line, i - line_start + 1
                )
            tok("STRING", "".join(out), i, j + 1)
            i = j + 1
            continue
        if c == "[":
            j = text.find("]", i + 1)
            if j < 0 or "\n" in text[i:j]:
                raise QuerySyntaxError("unterminated [property name]", line, i - line_start + 1)
            tok("QUOTED", text[i + 1 : j], i, j + 1)
            i = j + 1
            continue
        m = _DATE.match(text, i)
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_.")):
            j = text.find(")", m.end())
            if j < 0:
                raise QuerySyntaxError("unterminated date(...)", line, i - line_start + 1)
            tok("DATE", text[m.end() : j].strip(), i, j + 1)
            i = j + 1
            continue
        m = _NUMBER.match(text, i)
        if m:
            tok("NUMBER", m.group(), i, m.end())
            i = m.end()
            continue
        m = _IDENT.match(text, i)
        if m:
            tok("IDENT", m.group(), i, m.end())
            i = m.end()
            continue
        op = next((o for o in _OPS if text.startswith(o, i)), None)
        if op is not None:
            tok("OP", op, i, i + len(op))
            i += len(op)
            continue
        if c in _PUNCT:
            tok("PUNCT", c, i, i + 1)
            i += 1
            continue
        raise QuerySyntaxError(f"unexpected character {c!r}", line, i - line_start + 1)
    tokens.append(Token("EOF", "", n, n, line, n - line_start + 1))
    return tokens
