"""Recursive-descent parser: tokens -> `ast.Query`. The grammar is in docs/query.md.

Keywords are case-insensitive; class, type and property names and values are case-sensitive.
Every error is a QuerySyntaxError naming the line, column, what was expected and what was found.
"""

from __future__ import annotations

from datetime import UTC, datetime

from monitor.model.schema import epoch_ms
from monitor.query import ast
from monitor.query.errors import QuerySyntaxError
from monitor.query.lexer import Token, tokenize

KEYWORDS = frozenset(
    [
        "FIND",
        "UNIQUE",
        "WITH",
        "AS",
        "THAT",
        "WHERE",
        "RETURN",
        "ORDER",
        "BY",
        "ASC",
        "DESC",
        "SKIP",
        "LIMIT",
        "AND",
        "OR",
        "RELATES",
        "TO",
        "CHANGED",
        "SINCE",
    ]
)
COMPARE_OPS = frozenset(("=", "!=", ">", "<", ">=", "<=", "~=", "^=", "$=", "!~=", "!^=", "!$="))
AGGREGATES = frozenset(("COUNT", "MIN", "MAX", "AVG", "SUM"))
DATE_UNITS_MS = {
    "SECOND": 1_000,
    "MINUTE": 60_000,
    "HOUR": 3_600_000,
    "DAY": 86_400_000,
    "WEEK": 7 * 86_400_000,
    "MONTH": 30 * 86_400_000,
    "YEAR": 365 * 86_400_000,
}


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


class Parser:
    def __init__(self, text: str, now: int | None = None) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.now = now if now is not None else now_ms()
        self.aliases: dict[str, str] = {}
        self.relative = False  # a date.now was read

    # -- token helpers -------------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def peek(self, k: int = 1) -> Token:
        return self.tokens[min(self.i + k, len(self.tokens) - 1)]

    def advance(self) -> Token:
        t = self.tokens[self.i]
        if t.kind != "EOF":
            self.i += 1
        return t

    def pos(self, t: Token | None = None) -> ast.Pos:
        t = t or self.tok
        return ast.Pos(t.line, t.column)

    def error(self, expected: str, t: Token | None = None) -> QuerySyntaxError:
        t = t or self.tok
        return QuerySyntaxError(f"expected {expected}, found {t.describe()}", t.line, t.column)

    def is_kw(self, *words: str, t: Token | None = None) -> bool:
        t = t or self.tok
        return t.kind == "IDENT" and t.text.upper() in words

    def expect_kw(self, word: str) -> Token:
        if not self.is_kw(word):
            raise self.error(word)
        return self.advance()

    def is_punct(self, c: str, t: Token | None = None) -> bool:
        t = t or self.tok
        return t.kind == "PUNCT" and t.text == c

    def expect_punct(self, c: str, what: str | None = None) -> Token:
        if not self.is_punct(c):
            raise self.error(what or repr(c))
        return self.advance()

    # -- query ---------------------------------------------------------------------------------
    def parse(self) -> ast.Query:
        if self.tok.kind == "EOF":
            raise self.error("FIND")
        self.expect_kw("FIND")
        unique = False
        if self.is_kw("UNIQUE"):
            self.advance()
            unique = True
        start = self.node(after="FIND")
        steps: list[ast.Step] = []
        while self.is_kw("THAT"):
            steps.append(self.step())
        where = None
        if self.is_kw("WHERE"):
            self.advance()
            where = self.expr(aliased=True)
        returns: list[ast.ReturnItem] = []
        if self.is_kw("RETURN"):
            self.advance()
            returns.append(self.return_item())
            while self.is_punct(","):
                self.advance()
                returns.append(self.return_item())
        order: list[ast.OrderItem] = []
        if self.is_kw("ORDER"):
            self.advance()
            self.expect_kw("BY")
            order.append(self.order_item())
            while self.is_punct(","):
                self.advance()
                order.append(self.order_item())
        skip = limit = None
        if self.is_kw("SKIP"):
            self.advance()
            skip = self.integer("a number after SKIP")
        if self.is_kw("LIMIT"):
            self.advance()
            limit = self.integer("a number after LIMIT")
        if self.tok.kind != "EOF":
            expected = "THAT, WHERE, RETURN, ORDER BY, SKIP, LIMIT or the end of the query"
            raise self.error(expected)
        return ast.Query(
            text=self.text,
            start=start,
            steps=tuple(steps),
            where=where,
            returns=tuple(returns),
            order=tuple(order),
            skip=skip,
            limit=limit,
            unique=unique,
            aliases=dict(self.aliases),
            relative=self.relative,
        )

    def integer(self, what: str) -> int:
        t = self.tok
        if t.kind != "NUMBER" or not t.text.isdigit():
            raise self.error(what)
        self.advance()
        return int(t.text)

    def define_alias(self, kind: str) -> str:
        t = self.tok
        if t.kind != "IDENT" or t.text.upper() in KEYWORDS:
            raise self.error("an alias name after AS")
        self.advance()
        if t.text in self.aliases:
            raise QuerySyntaxError(f"alias {t.text!r} is defined twice", t.line, t.column)
        self.aliases[t.text] = kind
        return t.text

    # -- nodes and steps -----------------------------------------------------------------------
    def selector(self, after: str) -> ast.Selector:
        t = self.tok
        if self.is_punct("*"):
            self.advance()
            return ast.Selector((), self.pos(t))
        if self.is_punct("("):
            self.advance()
            names = [self.name("a class or type")]
            while self.is_punct("|"):
                self.advance()
                names.append(self.name("a class or type"))
            self.expect_punct(")", "'|' or ')'")
            return ast.Selector(tuple(names), self.pos(t))
        if t.kind == "IDENT" and t.text.upper() not in KEYWORDS:
            self.advance()
            return ast.Selector((t.text,), self.pos(t))
        raise self.error(f"a class, a type, '*' or '(' after {after}")

    def name(self, what: str) -> str:
        t = self.tok
        if t.kind != "IDENT" or t.text.upper() in KEYWORDS:
            raise self.error(what)
        self.advance()
        return t.text

    def node(self, after: str) -> ast.NodePattern:
        t = self.tok
        sel = self.selector(after)
        where = None
        alias = None
        if self.is_kw("AS"):
            self.advance()
            alias = self.define_alias("entity")
        if self.is_kw("WITH"):
            self.advance()
            where = self.expr(aliased=False)
        if alias is None and self.is_kw("AS"):
            self.advance()
            alias = self.define_alias("entity")
        return ast.NodePattern(sel, where, alias, self.pos(t))

    def step(self) -> ast.Step:
        that = self.advance()
        negated = False
        if self.is_punct("!"):
            self.advance()
            negated = True
        verbs: tuple[str, ...]
        if self.is_kw("RELATES"):
            self.advance()
            self.expect_kw("TO")
            verbs = ()
        elif self.is_punct("("):
            self.advance()
            vs = [self.verb()]
            while self.is_punct("|"):
                self.advance()
                vs.append(self.verb())
            self.expect_punct(")", "'|' or ')'")
            verbs = tuple(vs)
        else:
            verbs = (self.verb(),)
        direction = None
        alias = None
        for _ in range(2):
            if self.tok.kind == "OP" and self.tok.text in (">>", "<<") and direction is None:
                direction = self.advance().text
            elif self.is_kw("AS") and alias is None:
                self.advance()
                alias = self.define_alias("relationship")
        if negated and alias is not None:
            raise QuerySyntaxError(
                "a negated relationship (THAT !VERB) cannot have an alias", that.line, that.column
            )
        node = self.node(after="the relationship")
        if negated and node.alias is not None:
            raise QuerySyntaxError(
                "the target of THAT !VERB matches nothing, so it cannot have an alias",
                node.pos.line,
                node.pos.column,
            )
        return ast.Step(verbs, direction, negated, alias, node, self.pos(that))

    def verb(self) -> str:
        t = self.tok
        if t.kind != "IDENT" or t.text.upper() in KEYWORDS - {"RELATES"}:
            raise self.error("a relationship verb (HAS, IDENTIFIED, ...) or RELATES TO after THAT")
        self.advance()
        return t.text.upper()

    # -- filters -------------------------------------------------------------------------------
    def expr(self, aliased: bool) -> ast.Expr:
        t = self.tok
        items = [self.conjunction(aliased)]
        while self.is_kw("OR"):
            self.advance()
            items.append(self.conjunction(aliased))
        return items[0] if len(items) == 1 else ast.BoolOp("OR", tuple(items), self.pos(t))

    def conjunction(self, aliased: bool) -> ast.Expr:
        t = self.tok
        items = [self.atom(aliased)]
        while self.is_kw("AND"):
            self.advance()
            items.append(self.atom(aliased))
        return items[0] if len(items) == 1 else ast.BoolOp("AND", tuple(items), self.pos(t))

    def atom(self, aliased: bool) -> ast.Expr:
        t = self.tok
        if self.is_punct("("):
            self.advance()
            inner = self.expr(aliased)
            self.expect_punct(")", "AND, OR or ')'")
            return inner
        if self.is_kw("CHANGED"):
            self.advance()
            prop = self.prop(aliased)
            self.expect_kw("SINCE")
            since = self.value()
            if not since.is_date:
                raise QuerySyntaxError(
                    "CHANGED ... SINCE needs a date (date.now - 24 hours, date(2026-05-01))",
                    since.pos.line,
                    since.pos.column,
                )
            return ast.Changed(prop, since, self.pos(t))
        left = self.prop(aliased)
        op_tok = self.tok
        if op_tok.kind != "OP" or op_tok.text not in COMPARE_OPS:
            raise self.error("a comparison (=, !=, >, <, >=, <=, ~=, ^=, $=, !~=, !^=, !$=)")
        self.advance()
        right: ast.Literal | ast.ValueList | ast.Prop
        if self.is_punct("("):
            right = self.value_list()
        elif aliased and self.tok.kind == "IDENT" and self.is_prop_ref():
            right = self.prop(aliased=True)
        else:
            right = self.value()
        return ast.Compare(left, op_tok.text, right, self.pos(t))

    def is_prop_ref(self) -> bool:
        """In WHERE, `alias.prop` on the right side (not a literal like true or date.now)."""
        t = self.tok
        if t.text.lower() in ("true", "false", "undefined", "null"):
            return False
        return not (t.text.lower() == "date" and self.is_punct(".", self.peek()))

    def prop(self, aliased: bool) -> ast.Prop:
        t = self.tok
        parts: list[str] = []
        if t.kind == "QUOTED" or (t.kind == "IDENT" and t.text.upper() not in KEYWORDS):
            self.advance()
            parts.append(t.text)
        else:
            raise self.error("a property name" if not aliased else "alias.property")
        while self.is_punct("."):
            self.advance()
            n = self.tok
            if n.kind in ("IDENT", "QUOTED"):
                self.advance()
                parts.append(n.text)
            else:
                raise self.error("a property name after '.'")
        if aliased:
            if len(parts) < 2:
                raise QuerySyntaxError(
                    f"WHERE needs alias.property, found {parts[0]!r}", t.line, t.column
                )
            return ast.Prop(".".join(parts[1:]), self.pos(t), alias=parts[0])
        return ast.Prop(".".join(parts), self.pos(t))

    def value_list(self) -> ast.ValueList:
        t = self.advance()  # (
        items = [self.value()]
        conj = None
        while self.is_kw("OR", "AND"):
            word = self.advance().text.upper()
            if conj is not None and word != conj:
                raise QuerySyntaxError(
                    "a value list uses either OR or AND, not both",
                    self.tokens[self.i - 1].line,
                    self.tokens[self.i - 1].column,
                )
            conj = word
            items.append(self.value())
        self.expect_punct(")", "OR, AND or ')' in the value list")
        return ast.ValueList(tuple(items), conj or "OR", self.pos(t))

    def value(self) -> ast.Literal:
        t = self.tok
        p = self.pos(t)
        if t.kind == "STRING":
            self.advance()
            return ast.Literal(t.text, p, text=repr(t.text))
        if t.kind == "NUMBER" or (self.is_punct("-") and self.peek().kind == "NUMBER"):
            sign = -1 if self.is_punct("-") else 1
            if sign < 0:
                self.advance()
            n = self.advance()
            num: int | float = float(n.text) if any(c in n.text for c in ".eE") else int(n.text)
            return ast.Literal(sign * num, p, text=n.text)
        if t.kind == "DATE":
            self.advance()
            return ast.Literal(self.static_date(t), p, is_date=True, text=f"date({t.text})")
        if t.kind == "IDENT":
            low = t.text.lower()
            if low in ("true", "false"):
                self.advance()
                return ast.Literal(low == "true", p, text=low)
            if low in ("undefined", "null"):
                self.advance()
                return ast.Literal(None, p, is_undefined=True, text=low)
            if low == "date" and self.is_punct(".", self.peek()):
                return self.relative_date()
        raise self.error("a value (a 'string', a number, true, false, undefined or a date)")

    def static_date(self, t: Token) -> int:
        raw = t.text
        if raw.isdigit():
            return int(raw)
        ms = epoch_ms(raw)  # a day is its midnight, no zone is UTC (as for the ...On fields)
        if ms is None:
            raise QuerySyntaxError(
                f"date({raw}) is not a date: use date(2026-05-01), an ISO 8601 time or epoch ms",
                t.line,
                t.column,
            )
        return ms

    def relative_date(self) -> ast.Literal:
        t = self.advance()  # date
        self.advance()  # .
        if not self.is_kw("NOW"):
            raise self.error("now after date.")
        end = self.advance()
        value = self.now
        self.relative = True
        if self.is_punct("+") or self.is_punct("-"):
            sign = 1 if self.advance().text == "+" else -1
            n = self.tok
            if n.kind != "NUMBER":
                raise self.error("a number after date.now +/-")
            self.advance()
            u = self.tok
            unit = u.text.upper().rstrip("S") if u.kind == "IDENT" else ""
            if unit not in DATE_UNITS_MS:
                raise self.error("a unit (seconds, minutes, hours, days, weeks, months, years)")
            end = self.advance()
            value += sign * int(float(n.text) * DATE_UNITS_MS[unit])
        return ast.Literal(
            value, self.pos(t), is_date=True, text=self.text[t.pos : end.end].strip()
        )

    # -- RETURN / ORDER BY ---------------------------------------------------------------------
    def return_item(self) -> ast.ReturnItem:
        t = self.tok
        if t.kind != "IDENT" or t.text.upper() in KEYWORDS:
            raise self.error("alias.property, alias.*, alias or COUNT(alias) after RETURN")
        func = None
        prop: str | None = None
        if t.text.upper() in AGGREGATES and self.is_punct("(", self.peek()):
            func = self.advance().text.upper()
            self.advance()
            alias = self.name("an alias")
            if self.is_punct("."):
                self.advance()
                prop = self.prop_name()
            self.expect_punct(")")
        else:
            alias = self.advance().text
            if self.is_punct("."):
                self.advance()
                if self.is_punct("*"):
                    self.advance()
                    prop = "*"
                else:
                    prop = self.prop_name()
        key = self.text[t.pos : self.tokens[self.i - 1].end]
        if self.is_kw("AS"):
            self.advance()
            n = self.tok
            if n.kind not in ("IDENT", "STRING"):
                raise self.error("a column name after AS")
            self.advance()
            key = n.text
        return ast.ReturnItem(key, alias, prop, func, self.pos(t))

    def prop_name(self) -> str:
        parts = []
        while True:
            n = self.tok
            if n.kind not in ("IDENT", "QUOTED"):
                raise self.error("a property name")
            self.advance()
            parts.append(n.text)
            if not (self.is_punct(".") and self.peek().kind in ("IDENT", "QUOTED")):
                return ".".join(parts)
            self.advance()

    def order_item(self) -> ast.OrderItem:
        t = self.tok
        prop = None
        if t.kind == "IDENT" and t.text.upper() in AGGREGATES and self.is_punct("(", self.peek()):
            self.advance()
            self.advance()
            while not self.is_punct(")"):
                if self.tok.kind == "EOF":
                    raise self.error("')'")
                self.advance()
            self.advance()
        elif t.kind in ("IDENT", "QUOTED") and t.text.upper() not in KEYWORDS:
            first = self.advance().text
            parts = [first]
            while self.is_punct("."):
                self.advance()
                parts.append(self.prop_name())
            alias = parts[0] if len(parts) > 1 else None
            name = ".".join(parts[1:]) if len(parts) > 1 else first
            prop = ast.Prop(name, self.pos(t), alias=alias)
        else:
            raise self.error("alias.property or a RETURN column after ORDER BY")
        text = self.text[t.pos : self.tokens[self.i - 1].end]
        descending = False
        if self.is_kw("ASC", "DESC"):
            descending = self.advance().text.upper() == "DESC"
        return ast.OrderItem(text, prop, descending, self.pos(t))


def parse(text: str, now: int | None = None) -> ast.Query:
    """Parse J1QL; raises QuerySyntaxError with line and column."""
    return Parser(text, now).parse()
