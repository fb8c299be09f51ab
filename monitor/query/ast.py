"""The J1QL syntax tree: small frozen dataclasses; every node remembers where it starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pos:
    line: int
    column: int


@dataclass(frozen=True)
class Literal:
    """A string, number, boolean, `undefined` (value None) or a date (epoch ms, is_date)."""

    value: Any
    pos: Pos
    is_date: bool = False
    is_undefined: bool = False
    text: str = ""


@dataclass(frozen=True)
class Prop:
    """A property reference: `name`, `tag.AccountName`, `[odd-name]`, or `alias.name`."""

    name: str
    pos: Pos
    alias: str | None = None


@dataclass(frozen=True)
class ValueList:
    """`('a' OR 'b')` / `('a' AND 'b')`: J1's shorthand for several comparisons."""

    items: tuple[Literal, ...]
    conj: str  # "OR" | "AND"
    pos: Pos


@dataclass(frozen=True)
class Compare:
    left: Prop
    op: str  # = != > < >= <= ~= ^= $= !~= !^= !$=
    right: Literal | ValueList | Prop
    pos: Pos


@dataclass(frozen=True)
class Changed:
    """Extension: `CHANGED field SINCE <date>` (from the stored change events)."""

    prop: Prop
    since: Literal
    pos: Pos


@dataclass(frozen=True)
class BoolOp:
    op: str  # "AND" | "OR"
    items: tuple[Expr, ...]
    pos: Pos


Expr = Compare | Changed | BoolOp


@dataclass(frozen=True)
class Selector:
    """`*`, a class (TitleCase), a `_type` (snake_case), or several in `(A|B)`."""

    names: tuple[str, ...]  # empty: `*`
    pos: Pos

    @property
    def any(self) -> bool:
        return not self.names


@dataclass(frozen=True)
class NodePattern:
    selector: Selector
    where: Expr | None
    alias: str | None
    pos: Pos


@dataclass(frozen=True)
class Step:
    """`THAT [!]VERB [>>|<<] [AS alias] <node>`: verbs empty means RELATES TO (any)."""

    verbs: tuple[str, ...]
    direction: str | None  # ">>" (left to right), "<<" (right to left), None (either)
    negated: bool
    alias: str | None
    node: NodePattern
    pos: Pos


@dataclass(frozen=True)
class ReturnItem:
    """`alias.prop`, `alias.*`, `alias`, or `FUNC(alias[.prop])`, with an optional AS name."""

    key: str  # the column name: the text as written, or the AS name
    alias: str
    prop: str | None  # None: the whole entity; "*": every property
    func: str | None  # COUNT | MIN | MAX | AVG | SUM
    pos: Pos


@dataclass(frozen=True)
class OrderItem:
    text: str  # as written (may name a RETURN column, e.g. COUNT(m))
    prop: Prop | None
    descending: bool
    pos: Pos


@dataclass(frozen=True)
class Query:
    text: str
    start: NodePattern
    steps: tuple[Step, ...]
    where: Expr | None = None
    returns: tuple[ReturnItem, ...] = ()
    order: tuple[OrderItem, ...] = ()
    skip: int | None = None
    limit: int | None = None
    unique: bool = False
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> "entity" | "relationship"
    relative: bool = False  # uses date.now: its dates move with the clock (plan it again)
