"""Field paths into events and the condition operators of alert rules (compiled once, no eval).

A field path is dotted: `changes.riskScore.new`, `entity.machineTags`, `target.public`.
`data.` is optional (paths resolve inside `data` first, then in the envelope: `type`, `subject`,
`time`, `id`); `event.` forces the envelope. Change keys may contain dots themselves
(`changes.vmMetadata.cloudProvider.new`), so segments are joined greedily against dict keys:
the longest key that exists wins, with backtracking.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import re2

from monitor.events.envelope import Event
from monitor.model.schema import LEVELS, level_rank


class _Missing:
    """The value of a path that does not resolve."""

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()

Predicate = Callable[[Event], bool]

OPERATORS: tuple[str, ...] = (
    "eq",
    "ne",
    "in",
    "not_in",
    "contains",
    "regex",
    "exists",
    "gt",
    "gte",
    "lt",
    "lte",
    "changed",
    "from",
    "to",
)


class ConditionError(ValueError):
    """A condition that cannot be compiled; `path` locates it inside the rule (e.g. where[1].op)."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.path = path


Candidates = tuple[tuple[tuple[int, str], ...], ...]


def _candidates(segs: Sequence[str]) -> Candidates:
    """Per position i, the keys to try there, longest first: ((j, "segs[i..j)"), ...)."""
    n = len(segs)
    return tuple(tuple((j, ".".join(segs[i:j])) for j in range(n, i, -1)) for i in range(n))


def _walk(node: Any, cands: Candidates, i: int) -> Any:
    n = len(cands)
    while i < n:
        if isinstance(node, dict):
            options = cands[i]
            if len(options) == 1:  # the last segment: one key to try
                key = options[0][1]
                if key not in node:
                    return MISSING
                node = node[key]
                i = n
                continue
            for j, key in options:  # longest key first: "vmMetadata.cloudProvider"
                if key in node:
                    found = _walk(node[key], cands, j)
                    if found is not MISSING:
                        return found
            return MISSING
        if isinstance(node, list):
            try:
                idx = int(cands[i][-1][1])
            except ValueError:
                return MISSING
            if not -len(node) <= idx < len(node):
                return MISSING
            node = node[idx]
            i += 1
            continue
        return MISSING
    return node


@dataclass(frozen=True)
class FieldPath:
    """A compiled dotted path; `get(event)` returns the value or MISSING."""

    raw: str
    segs: tuple[str, ...]
    scope: str  # "data", "event" or "any" (data first, then the envelope)
    cands: Candidates = field(default=(), repr=False, compare=False)

    @classmethod
    def parse(cls, raw: str) -> FieldPath:
        if not isinstance(raw, str) or not raw.strip():
            raise ConditionError("field must be a non-empty dotted path")
        raw = raw.strip()
        segs = tuple(raw.split("."))
        if any(not s for s in segs):
            raise ConditionError(f"field {raw!r}: empty segment in dotted path")
        scope = "any"
        if segs[0] in ("data", "event") and len(segs) > 1:
            scope, segs = segs[0], segs[1:]
        return cls(raw, segs, scope, _candidates(segs))

    def get(self, event: Event) -> Any:
        if self.scope != "event":
            data = event.get("data")
            if isinstance(data, dict):
                found = _walk(data, self.cands, 0)
                if found is not MISSING or self.scope == "data":
                    return found
            elif self.scope == "data":
                return MISSING
        return _walk(event, self.cands, 0)


def get_field(event: Event, path: str) -> Any:
    """The value at a dotted path (see module doc), or MISSING."""
    return FieldPath.parse(path).get(event)


def change_key(raw: str) -> str:
    """The key into `data.changes` named by a `changed`/`from`/`to` field (prefixes optional)."""
    key = raw.strip()
    for prefix in ("data.", "changes."):
        key = key.removeprefix(prefix)
    if not key:
        raise ConditionError(f"field {raw!r}: name a changed field, e.g. riskScore")
    return key


def values_equal(a: Any, b: Any) -> bool:
    """Equality that keeps booleans apart from numbers (true != 1)."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return bool(a == b)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_datetime(v: Any) -> datetime | None:
    """An ISO 8601 date or date-time (naive = UTC), else None."""
    if not isinstance(v, str) or len(v) < 10 or not v[:4].isdigit() or v[4] != "-":
        return None
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _ordering(op: str, value: Any) -> Callable[[Any], bool]:
    """Compare as a Defender level, a number or an ISO date, chosen by the rule's value."""
    cmp = _CMP[op]
    rank = level_rank(value)
    if rank is not None:
        return lambda v: (r := level_rank(v)) is not None and cmp(r, rank)
    if _is_number(value):
        return lambda v: _is_number(v) and cmp(v, value)
    when = parse_datetime(value)
    if when is not None:
        return lambda v: (d := parse_datetime(v)) is not None and cmp(d, when)
    raise ConditionError(
        f"{op} needs a number, an ISO date or a level ({' < '.join(LEVELS)}), got {value!r}"
    )


def _member(value: Any, options: list[Any]) -> bool:
    return any(values_equal(value, o) for o in options)


# Regexes run on RE2 (linear time in the input, whatever the pattern): no catastrophic
# backtracking, so one rule can never stall dispatch. RE2 refuses what needs backtracking.
MAX_REGEX_INPUT = 65_536  # characters of a value a regex looks at
MAX_REGEX_ITEMS = 1_000  # items of a list value a regex looks at
REGEX_MAX_MEM = 8 << 20  # bytes RE2 may use for one compiled pattern
REFUSED_REGEX = (
    "backreferences, lookahead/lookbehind, possessive quantifiers, atomic groups,"
    " repetition counts above 1000"
)
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = REGEX_MAX_MEM
_RE2_OPTIONS.log_errors = False
_RE2_OPTIONS.never_capture = True  # rules only ask "does it match": no groups to track
# a group holding a quantifier, itself quantified: (a+)+, (x*y)*, (\w+\s?){2,}
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)\s*(?:[+*]|\{\d*,)")


class Re2Pattern:
    """A compiled RE2 pattern whose `search(text)` says whether it matches anywhere (a bool).

    Calls RE2's matcher directly on the UTF-8 bytes: the `re`-compatible wrapper of google-re2
    computes match offsets in characters, which costs ~10x more than the match itself.
    """

    __slots__ = ("_match", "_regexp", "pattern")

    def __init__(self, regexp: Any, pattern: str) -> None:
        self._regexp = regexp
        self.pattern = pattern
        raw = getattr(regexp, "_regexp", None)
        anchor = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)
        self._match = (
            (lambda b: raw.Match(anchor, b, 0, len(b))[0][0] != -1)
            if raw is not None and anchor is not None
            else None
        )

    def search(self, text: str) -> bool:
        if self._match is not None:
            return bool(self._match(text.encode("utf-8", "surrogatepass")))
        return self._regexp.search(text) is not None


def compile_regex(pattern: str) -> Re2Pattern:
    """An RE2 pattern; ConditionError naming what RE2 refuses (see REFUSED_REGEX)."""
    try:
        return Re2Pattern(re2.compile(pattern, _RE2_OPTIONS), pattern)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ConditionError(
            f"bad regex {pattern!r}: {detail} (regexes run on RE2, linear time; it refuses"
            f" {REFUSED_REGEX})"
        ) from None


def regex_warnings(
    specs: Any, path: tuple[str | int, ...] = ()
) -> list[tuple[tuple[str | int, ...], str]]:
    """(path, message) for every regex condition with a nested quantifier such as `(a+)+`.

    RE2 evaluates them in linear time, but they are the classic catastrophic-backtracking shape
    (and a sign the pattern does not say what was meant), so `rules check` flags them.
    """
    out: list[tuple[tuple[str | int, ...], str]] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(specs, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, list):
            stack.extend((item, (*where, i)) for i, item in enumerate(node))
        elif isinstance(node, dict):
            for kind in ("any", "all", "not"):
                if kind in node:
                    stack.append((node[kind], (*where, kind)))
            value = node.get("value")
            if (
                node.get("op") == "regex"
                and isinstance(value, str)
                and _NESTED_QUANTIFIER.search(value)
            ):
                out.append(
                    (
                        (*where, "value"),
                        f"regex {value!r} has a nested quantifier (catastrophic on"
                        " backtracking engines; RE2 runs it in linear time, but check it"
                        " means what you want)",
                    )
                )
    return out


def _field_test(op: str, value: Any, has_value: bool) -> Callable[[Any], bool]:
    """A test of one resolved field value (MISSING when absent)."""
    if op == "exists":
        want = True if not has_value else value
        if not isinstance(want, bool):
            raise ConditionError("exists takes true or false (or no value)")
        return lambda v: (v is not MISSING and v is not None) == want
    if not has_value:
        raise ConditionError(f"{op} needs a value")
    if op == "eq":
        return lambda v: v is not MISSING and values_equal(v, value)
    if op == "ne":
        return lambda v: v is MISSING or not values_equal(v, value)
    if op in ("in", "not_in"):
        if not isinstance(value, list):
            raise ConditionError(f"{op} needs a list value, e.g. [High, Critical]")
        if op == "in":
            return lambda v: v is not MISSING and _member(v, value)
        return lambda v: v is MISSING or not _member(v, value)
    if op == "contains":

        def contains(v: Any) -> bool:
            if isinstance(v, list | tuple):
                return _member(value, list(v))
            if isinstance(v, str):
                return isinstance(value, str) and value in v
            if isinstance(v, dict):
                return isinstance(value, str) and value in v
            return False

        return contains
    if op == "regex":
        if not isinstance(value, str):
            raise ConditionError("regex needs a string pattern")
        rx = compile_regex(value)

        def search(v: Any) -> bool:
            if isinstance(v, list | tuple):
                return any(search(x) for x in v[:MAX_REGEX_ITEMS])
            if v is MISSING or v is None or isinstance(v, dict):
                return False
            text = str(v).lower() if isinstance(v, bool) else str(v)
            return rx.search(text[:MAX_REGEX_INPUT])

        return search
    if op in _CMP:
        return _ordering(op, value)
    raise ConditionError(f"unknown op {op!r} (known: {', '.join(OPERATORS)})")


def _change_test(op: str, key: str, value: Any, has_value: bool) -> Predicate:
    """`changed`, `from`, `to`: look at data.changes[key]."""

    def entry(event: Event) -> Any:
        data = event.get("data")
        changes = data.get("changes") if isinstance(data, dict) else None
        return changes.get(key, MISSING) if isinstance(changes, dict) else MISSING

    if op == "changed":
        want = True if not has_value else value
        if not isinstance(want, bool):
            raise ConditionError("changed takes true or false (or no value)")
        nested = key + "."

        def changed(event: Event) -> bool:
            data = event.get("data")
            changes = data.get("changes") if isinstance(data, dict) else None
            if not isinstance(changes, dict):
                return not want
            hit = key in changes or any(k.startswith(nested) for k in changes)
            return hit == want

        return changed
    if not has_value:
        raise ConditionError(f"{op} needs a value")
    side = "old" if op == "from" else "new"

    def side_matches(v: Any) -> bool:
        if isinstance(value, list) and not isinstance(v, list):
            return _member(v, value)  # one of these values
        return values_equal(v, value)

    def test(event: Event) -> bool:
        ch = entry(event)
        return isinstance(ch, dict) and side in ch and side_matches(ch[side])

    return test


def compile_condition(spec: Any, path: tuple[str | int, ...] = ()) -> Predicate:
    """One `where` item: {field, op, value} or {any: [...]}, {all: [...]}, {not: {...}}."""
    if not isinstance(spec, dict):
        raise ConditionError("a condition is a mapping {field, op, value}", path)
    combinators = [k for k in ("any", "all", "not") if k in spec]
    if combinators:
        if len(spec) != 1:
            raise ConditionError(f"{combinators[0]} must be alone in its mapping", path)
        kind = combinators[0]
        inner = spec[kind]
        if kind == "not":
            pred = compile_condition(inner, (*path, "not"))
            return lambda e: not pred(e)
        if not isinstance(inner, list) or not inner:
            raise ConditionError(f"{kind} needs a non-empty list of conditions", (*path, kind))
        preds = compile_conditions(inner, (*path, kind))
        if kind == "any":
            return lambda e: any(p(e) for p in preds)
        return lambda e: all(p(e) for p in preds)
    unknown = set(spec) - {"field", "op", "value"}
    if unknown:
        raise ConditionError(
            f"unknown key(s) {', '.join(sorted(map(str, unknown)))} (a condition has field, op,"
            " value; or any/all/not)",
            (*path, sorted(map(str, unknown))[0]),
        )
    if "field" not in spec:
        raise ConditionError("missing field", path)
    op = spec.get("op", "eq")
    if op not in OPERATORS:
        raise ConditionError(f"unknown op {op!r} (known: {', '.join(OPERATORS)})", (*path, "op"))
    has_value = "value" in spec
    value = spec.get("value")
    vpath = (*path, "value" if has_value else "op")
    if op in ("changed", "from", "to"):
        try:
            key = change_key(str(spec["field"]))
        except ConditionError as exc:
            raise ConditionError(str(exc), (*path, "field")) from None
        try:
            return _change_test(op, key, value, has_value)
        except ConditionError as exc:
            raise ConditionError(str(exc), vpath) from None
    try:
        fpath = FieldPath.parse(spec["field"])
    except ConditionError as exc:
        raise ConditionError(str(exc), (*path, "field")) from None
    try:
        test = _field_test(op, value, has_value)
    except ConditionError as exc:
        raise ConditionError(str(exc), vpath) from None
    get = fpath.get
    return lambda e: test(get(e))


def compile_conditions(specs: Any, path: tuple[str | int, ...] = ()) -> list[Predicate]:
    """A list of conditions (all must hold)."""
    if specs is None:
        return []
    if not isinstance(specs, list):
        raise ConditionError("where is a list of conditions", path)
    return [compile_condition(s, (*path, i)) for i, s in enumerate(specs)]


def all_of(preds: list[Predicate]) -> Predicate:
    """One predicate: every one of `preds` holds (true when empty)."""
    if not preds:
        return lambda e: True
    if len(preds) == 1:
        return preds[0]
    return lambda e: all(p(e) for p in preds)


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def glob_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """Exact names or shell globs (`mde.machine.*`)."""
    exact = frozenset(p for p in patterns if not is_glob(p))
    globs = tuple(p for p in patterns if is_glob(p))
    if not globs:
        return exact.__contains__
    return lambda s: s in exact or any(fnmatch.fnmatchcase(s, g) for g in globs)
