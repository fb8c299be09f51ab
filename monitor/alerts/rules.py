"""Alert rules and sink declarations: YAML files validated into compiled rules (no eval).

`load_rules(dir)` reads every `*.yaml` / `*.yml` in the alerts directory: `sinks.yaml` declares the
sinks and the delivery policy, every other file holds `rules:`. Each problem becomes a `LoadError`
naming file, line and rule; a bad rule (or a bad file) never stops the good ones.
See alerts/README.md for the rule language.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from monitor import safe_yaml
from monitor.alerts.match import (
    ConditionError,
    FieldPath,
    Predicate,
    all_of,
    compile_conditions,
    glob_matcher,
    is_glob,
    regex_warnings,
)
from monitor.alerts.sinks.base import Severity, Sink, Status
from monitor.durations import format_duration, parse_duration
from monitor.events.envelope import EVENT_TYPES, Event
from monitor.safe_yaml import BoundedSafeLoader

SINKS_FILE_NAMES = ("sinks.yaml", "sinks.yml")
SEVERITIES: tuple[str, ...] = ("info", "low", "medium", "high", "critical")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

# Every transition and its counterpart: a firing alert raised by the first is resolved by the second.
_PAIRS: tuple[tuple[str, str], ...] = (
    ("mde.machine.health_degraded", "mde.machine.health_recovered"),
    ("mde.machine.risk_raised", "mde.machine.risk_lowered"),
    ("mde.machine.exposure_raised", "mde.machine.exposure_lowered"),
    ("mde.machine_vulnerability.identified", "mde.machine_vulnerability.resolved"),
    ("mde.user.disabled", "mde.user.enabled"),
    ("mde.machine.created", "mde.machine.deleted"),
    ("mde.machine_logon_user.added", "mde.machine_logon_user.removed"),
    ("mde.user.created", "mde.user.deleted"),
    ("mde.logon_user.created", "mde.logon_user.deleted"),
    ("mde.vulnerability.created", "mde.vulnerability.deleted"),
    ("mde.query.entered", "mde.query.left"),
    ("mde.group.member_added", "mde.group.member_removed"),
    ("mde.role.assigned", "mde.role.unassigned"),
)
COUNTERPARTS: dict[str, str] = {**dict(_PAIRS), **{b: a for a, b in _PAIRS}}


# ---------------------------------------------------------------------------------------------
# durations (monitor.durations: one grammar everywhere)

Duration = Annotated[float, BeforeValidator(parse_duration)]


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class LineDict(dict[Any, Any]):
    """A mapping loaded from YAML that remembers its own line and the line of each key."""

    line: int = 0
    key_lines: dict[Any, int]
    duplicates: list[tuple[Any, int]]


class _LineLoader(BoundedSafeLoader):
    """Bounded SafeLoader whose mappings are LineDicts; duplicate keys are recorded (first kept)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    mapping = LineDict()
    mapping.line = node.start_mark.line + 1
    mapping.key_lines = {}
    mapping.duplicates = []
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "unhashable or complex mapping key", key_node.start_mark
            )
        if key in mapping:
            mapping.duplicates.append((key, key_node.start_mark.line + 1))
            continue
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[key] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_with_lines(text: str, file: str = "<string>") -> Any:
    """Parse YAML within bounds (monitor.safe_yaml); every mapping is a LineDict.

    Raises YamlFileError naming `file` and the line."""
    return safe_yaml.loads(text, file, _LineLoader)


def duplicate_keys(node: Any) -> list[tuple[str, int]]:
    """(key, line) of every repeated mapping key below `node` (YAML keeps the first)."""
    found: list[tuple[str, int]] = []
    stack = [node]
    seen: set[int] = set()
    while stack:  # iterative: aliases may share nodes, and depth never costs recursion
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, LineDict):
            found += [(str(k), line) for k, line in cur.duplicates]
            stack.extend(reversed(list(cur.values())))
        elif isinstance(cur, list):
            stack.extend(reversed(cur))
    return found


def line_of(node: Any, loc: Iterable[str | int], default: int = 0) -> int:
    """Best known line of the item at `loc` (a pydantic-style location) below `node`."""
    line = node.line if isinstance(node, LineDict) else default
    for part in loc:
        if isinstance(node, LineDict):
            if part in node.key_lines:
                line = node.key_lines[part]
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            break
        if isinstance(node, LineDict) and node.line:
            line = node.line
    return line


def _loc_text(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------------------------------------
# errors


@dataclass(frozen=True)
class LoadError:
    """A problem in a rule or sink file. `level` "warning" keeps the rule; "error" drops it."""

    file: str
    line: int
    rule: str | None
    message: str
    level: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        who = f" rule {self.rule}:" if self.rule else ""
        return f"{where}:{who} {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "rule": self.rule,
            "message": self.message,
            "level": self.level,
        }


# ---------------------------------------------------------------------------------------------
# rule models


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


StrOrList = str | list[str]


class MatchSpec(_Spec):
    type: StrOrList
    tenant: StrOrList | None = None
    where: list[Any] = Field(default_factory=list)


class ResolveSpec(_Spec):
    type: StrOrList
    where: list[Any] = Field(default_factory=list)


class TemplateSpec(_Spec):
    title: str | None = None
    summary: str | None = None


class RuleSpec(_Spec):
    """One rule as written in YAML (validated; compiled into `Rule`)."""

    name: str = Field(min_length=1, max_length=100, pattern=NAME_PATTERN)
    description: str = ""
    severity: Literal["info", "low", "medium", "high", "critical"] = "medium"
    enabled: bool = True
    match: MatchSpec | None = None
    query: str | None = Field(default=None, min_length=1)  # J1QL: a query rule (see query_rules)
    tenant: StrOrList | None = None  # query rules: which tenants (globs); match rules use match
    alert_on_baseline: bool = False  # query rules: fire for the first evaluation's result set
    sinks: list[str] = Field(min_length=1)
    group_by: list[str] = Field(default_factory=lambda: ["tenant"])
    group_wait: Duration = 30.0
    group_interval: Duration = 300.0
    repeat_interval: Duration = Field(
        default=4 * 3600.0, validation_alias=AliasChoices("repeat_interval", "realert")
    )
    send_resolved: bool = True
    resolve_on: ResolveSpec | Literal[False] | None = None
    template: TemplateSpec | None = None
    max_events: int = Field(default=10, ge=1, le=1000)


def _as_list(v: str | list[str] | None) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


@dataclass(eq=False)
class Rule:
    """A compiled rule: what it matches, where it sends, how it groups and throttles."""

    name: str
    description: str
    severity: Severity
    types: tuple[str, ...]
    tenants: tuple[str, ...] | None
    where: Predicate
    sinks: tuple[str, ...]
    group_by: tuple[FieldPath, ...]
    group_wait: float
    group_interval: float
    repeat_interval: float
    send_resolved: bool
    resolve_types: tuple[str, ...]
    resolve_where: Predicate
    title_template: Any = None  # jinja2 Template or None (default rendering)
    summary_template: Any = None
    max_events: int = 10
    file: str = ""
    line: int = 0
    query: str | None = None  # J1QL of a query rule (None: an event rule)
    alert_on_baseline: bool = False
    _type_ok: Callable[[str], bool] = field(init=False, repr=False)
    _resolve_type_ok: Callable[[str], bool] = field(init=False, repr=False)
    _tenant_ok: Callable[[str], bool] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._type_ok = glob_matcher(self.types)
        self._resolve_type_ok = glob_matcher(self.resolve_types)
        self._tenant_ok = glob_matcher(self.tenants) if self.tenants else None

    def fires_on_type(self, event_type: str) -> bool:
        return self._type_ok(event_type)

    def resolves_type(self, event_type: str) -> bool:
        return self.send_resolved and bool(self.resolve_types) and self._resolve_type_ok(event_type)

    def _tenant_matches(self, event: Event) -> bool:
        if self._tenant_ok is None:
            return True
        data = event.get("data")
        tenant = data.get("tenant") if isinstance(data, dict) else None
        return isinstance(tenant, str) and self._tenant_ok(tenant)

    def matches(self, event: Event) -> bool:
        """This event fires the rule."""
        return (
            self._type_ok(str(event.get("type", "")))
            and self._tenant_matches(event)
            and self.where(event)
        )

    def resolves(self, event: Event) -> bool:
        """This event is the counterpart that resolves a firing alert of the rule."""
        return (
            self.resolves_type(str(event.get("type", "")))
            and self._tenant_matches(event)
            and self.resolve_where(event)
        )

    def summary(self) -> dict[str, Any]:
        """A plain description for `rules check --json`."""
        return {
            "name": self.name,
            "severity": self.severity,
            "types": list(self.types),
            "tenants": list(self.tenants) if self.tenants else None,
            "sinks": list(self.sinks),
            "group_by": [p.raw for p in self.group_by],
            "group_wait": format_duration(self.group_wait),
            "group_interval": format_duration(self.group_interval),
            "repeat_interval": format_duration(self.repeat_interval),
            "send_resolved": self.send_resolved,
            "resolve_on": list(self.resolve_types),
            "file": self.file,
            "line": self.line,
            **(
                {"query": self.query, "alert_on_baseline": self.alert_on_baseline}
                if self.query
                else {}
            ),
        }


# ---------------------------------------------------------------------------------------------
# sinks file


class DeliveryPolicy(_Spec):
    """Retry and freshness settings (`delivery:` in sinks.yaml)."""

    max_attempts: int = Field(default=8, ge=1, le=100)
    backoff_base: Duration = 2.0
    backoff_max: Duration = 300.0
    jitter: float = Field(default=0.2, ge=0, le=1)  # +-share of the backoff, randomised
    retry_after_max: Duration = 3600.0  # a Retry-After longer than this is capped
    max_event_age: Duration = 86400.0  # older events are acknowledged without alerting (0 = off)
    lease: Duration = 120.0  # how long one worker owns a delivery attempt
    keep_sent: Duration = 7 * 86400.0  # how long delivered records stay listable


@dataclass(frozen=True)
class SinkConfig:
    """A declared sink; `settings` may hold secrets and never appears in reprs or output."""

    name: str
    type: str
    file: str
    line: int
    settings: dict[str, Any] = field(repr=False, default_factory=dict)
    error: str | None = None  # why it cannot be built (missing ${ENV}, ...)

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line} sink {self.name}"


@dataclass
class RuleSet:
    """Everything loaded from the alerts directory."""

    rules: list[Rule] = field(default_factory=list)
    sinks: dict[str, SinkConfig] = field(default_factory=dict)
    errors: list[LoadError] = field(default_factory=list)
    delivery: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    directory: Path | None = None
    _by_type: dict[str, tuple[list[Rule], list[Rule]]] = field(
        default_factory=dict, init=False, repr=False
    )

    @property
    def problems(self) -> list[LoadError]:
        return [e for e in self.errors if e.level == "error"]

    @property
    def warnings(self) -> list[LoadError]:
        return [e for e in self.errors if e.level == "warning"]

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def candidates(self, event_type: str) -> tuple[list[Rule], list[Rule]]:
        """(rules this type may fire, rules this type may resolve), memoised per type."""
        hit = self._by_type.get(event_type)
        if hit is None:
            firing = [r for r in self.rules if r.fires_on_type(event_type)]
            resolving = [r for r in self.rules if r.resolves_type(event_type)]
            hit = self._by_type[event_type] = (firing, resolving)
        return hit

    def evaluate(self, event: Event) -> list[tuple[Rule, Status]]:
        """The rules this event fires ("firing") or resolves ("resolved"), in rule order."""
        firing, resolving = self.candidates(str(event.get("type", "")))
        out: list[tuple[Rule, Status]] = [
            (r, "firing") for r in firing if r._tenant_matches(event) and r.where(event)
        ]
        if resolving:
            fired = {id(r) for r, _ in out}
            out += [
                (r, "resolved")
                for r in resolving
                if id(r) not in fired and r._tenant_matches(event) and r.resolve_where(event)
            ]
        return out


# ---------------------------------------------------------------------------------------------
# loading


def _type_problems(
    patterns: tuple[str, ...], file: str, line: int, rule: str, what: str
) -> list[LoadError]:
    out: list[LoadError] = []
    for pat in patterns:
        if is_glob(pat):
            if not any(glob_matcher([pat])(t) for t in EVENT_TYPES):
                out.append(
                    LoadError(
                        file,
                        line,
                        rule,
                        f"{what} glob {pat!r} matches no known event type",
                        "warning",
                    )
                )
        elif pat not in EVENT_TYPES:
            out.append(
                LoadError(
                    file,
                    line,
                    rule,
                    f"{what}: unknown event type {pat!r} (see docs/events.md)",
                )
            )
    return out


def derived_resolve_types(types: Iterable[str]) -> tuple[str, ...]:
    """Counterparts of the catalogue types matched by `types` (minus those types themselves)."""
    ok = glob_matcher(list(types))
    matched = [t for t in EVENT_TYPES if ok(t)]
    out = [COUNTERPARTS[t] for t in matched if t in COUNTERPARTS]
    return tuple(dict.fromkeys(t for t in out if t not in matched))


def compile_rule(
    raw: Any, file: str, index: int, known_sinks: Iterable[str]
) -> tuple[Rule | None, list[LoadError]]:
    """Validate and compile one rule mapping; errors name file, line and rule."""
    from monitor.alerts.render import TemplateError, compile_template, trial_render

    base_line = raw.line if isinstance(raw, LineDict) else 0
    name = raw.get("name") if isinstance(raw, dict) else None
    label = name if isinstance(name, str) and name else f"rules[{index}]"
    if not isinstance(raw, dict):
        return None, [LoadError(file, base_line, label, "a rule is a mapping")]
    errors: list[LoadError] = [
        LoadError(file, line, label, f"duplicate key {key!r}") for key, line in duplicate_keys(raw)
    ]
    try:
        spec = RuleSpec.model_validate(raw)
    except ValidationError as exc:
        for detail in exc.errors():
            loc = tuple(detail["loc"])
            msg = detail["msg"].removeprefix("Value error, ")
            line = line_of(raw, loc, base_line)
            errors.append(LoadError(file, line, label, f"{_loc_text(loc)}: {msg}"))
        return None, errors

    def err(
        loc: tuple[str | int, ...],
        message: str,
        level: Literal["error", "warning"] = "error",
    ) -> None:
        errors.append(LoadError(file, line_of(raw, loc, base_line), label, message, level))

    tenants: tuple[str, ...] = ()
    if spec.query is not None:  # a query rule: see monitor/alerts/query_rules.py
        from monitor.alerts import query_rules

        if spec.match is not None:
            err(("query",), "give match: (an event rule) or query: (a query rule), not both")
        if spec.resolve_on is not None:
            err(("resolve_on",), "resolve_on: a query rule resolves when results leave the set")
        problem = query_rules.check_query(spec.query)
        if problem is not None:
            err(("query",), f"query: {problem}")
        where = query_rules.rule_predicate(spec.name)
        types: tuple[str, ...] = (query_rules.QUERY_ENTERED,)
        tenants = _as_list(spec.tenant)
    elif spec.match is None:
        err((), "give match: (an event rule) or query: (a J1QL query rule)")
        return None, errors
    else:
        if spec.tenant is not None or spec.alert_on_baseline:
            err(("tenant",), "tenant and alert_on_baseline are for query rules (use match.tenant)")
        try:
            where = all_of(compile_conditions(spec.match.where, ("match", "where")))
        except ConditionError as exc:
            err(exc.path, f"{_loc_text(exc.path)}: {exc}")
            where = all_of([])
        for loc, message in [
            *regex_warnings(spec.match.where, ("match", "where")),
            *regex_warnings(
                spec.resolve_on.where if isinstance(spec.resolve_on, ResolveSpec) else [],
                ("resolve_on", "where"),
            ),
        ]:
            err(loc, f"{_loc_text(loc)}: {message}", "warning")
        types = _as_list(spec.match.type)
        tenants = _as_list(spec.match.tenant)
        if not types:
            err(("match", "type"), "match.type: give at least one event type")
        errors += _type_problems(
            types, file, line_of(raw, ("match", "type"), base_line), label, "match.type"
        )
    known = set(known_sinks)
    for i, s in enumerate(spec.sinks):
        if s not in known:
            err(
                ("sinks", i),
                f"sinks: unknown sink {s!r} (declared: {', '.join(sorted(known)) or 'none'})",
            )
    group_by: list[FieldPath] = []
    for i, g in enumerate(spec.group_by):
        try:
            group_by.append(FieldPath.parse(g))
        except ConditionError as exc:
            err(("group_by", i), f"group_by[{i}]: {exc}")
    resolve_types: tuple[str, ...] = ()
    resolve_where = all_of([])
    if spec.resolve_on is False:
        resolve_types = ()
    elif spec.resolve_on is not None:
        resolve_types = _as_list(spec.resolve_on.type)
        errors += _type_problems(
            resolve_types,
            file,
            line_of(raw, ("resolve_on", "type"), base_line),
            label,
            "resolve_on.type",
        )
        try:
            resolve_where = all_of(
                compile_conditions(spec.resolve_on.where, ("resolve_on", "where"))
            )
        except ConditionError as exc:
            err(exc.path, f"{_loc_text(exc.path)}: {exc}")
    else:
        resolve_types = derived_resolve_types(types)
        if spec.query is not None:
            resolve_where = where
    if spec.send_resolved and "send_resolved" in spec.model_fields_set and not resolve_types:
        err(
            ("send_resolved",),
            "send_resolved: no counterpart event type resolves these types; add resolve_on",
            "warning",
        )
    templates: dict[str, Any] = {}
    if spec.template is not None:
        for part in ("title", "summary"):
            text = getattr(spec.template, part)
            if text is None:
                continue
            try:
                templates[part] = compile_template(text)
            except TemplateError as exc:
                err(("template", part), f"template.{part}: {exc}")
                continue
            over = trial_render(templates[part], types[0] if types else "mde.machine.updated")
            if over is not None:
                err(
                    ("template", part),
                    f"template.{part}: over the render budget on a sample event ({over})",
                )
    if any(e.level == "error" for e in errors):
        return None, errors
    rule = Rule(
        name=spec.name,
        description=spec.description,
        severity=spec.severity,
        types=types,
        tenants=tenants or None,
        where=where,
        sinks=tuple(dict.fromkeys(spec.sinks)),
        group_by=tuple(group_by),
        group_wait=spec.group_wait,
        group_interval=spec.group_interval,
        repeat_interval=spec.repeat_interval,
        send_resolved=spec.send_resolved,
        resolve_types=resolve_types,
        resolve_where=resolve_where,
        title_template=templates.get("title"),
        summary_template=templates.get("summary"),
        max_events=spec.max_events,
        file=file,
        line=base_line,
        query=spec.query,
        alert_on_baseline=spec.alert_on_baseline,
    )
    return (rule if spec.enabled else None), errors


def _read_yaml(path: Path, shown: str) -> tuple[Any, LoadError | None]:
    """One file through the bounded loader: unreadable, non-UTF-8, too deep, too big or bad
    YAML is one LoadError naming the file and line; the other files keep loading."""
    try:
        return safe_yaml.load_file(path, shown, _LineLoader), None
    except safe_yaml.YamlFileError as exc:
        return None, LoadError(shown, exc.line, None, exc.message)


def _load_sinks_file(path: Path, shown: str, ruleset: RuleSet) -> None:
    from monitor.config import _interpolate

    doc, problem = _read_yaml(path, shown)
    if problem is not None:
        ruleset.errors.append(problem)
        return
    if doc is None:
        return
    if not isinstance(doc, dict):
        ruleset.errors.append(LoadError(shown, 1, None, "expected a mapping with `sinks:`"))
        return
    ruleset.errors += [
        LoadError(shown, line, None, f"duplicate key {key!r}") for key, line in duplicate_keys(doc)
    ]
    for key in doc:
        if key not in ("sinks", "delivery"):
            ruleset.errors.append(
                LoadError(
                    shown,
                    line_of(doc, (key,)),
                    None,
                    f"unknown top-level key {key!r} (expected sinks, delivery)",
                )
            )
    if doc.get("delivery") is not None:
        try:
            ruleset.delivery = DeliveryPolicy.model_validate(doc["delivery"])
        except ValidationError as exc:
            for e in exc.errors():
                loc = ("delivery", *e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                ruleset.errors.append(
                    LoadError(shown, line_of(doc, loc), None, f"{_loc_text(loc)}: {msg}")
                )
    sinks = doc.get("sinks") or {}
    if not isinstance(sinks, dict):
        ruleset.errors.append(
            LoadError(
                shown,
                line_of(doc, ("sinks",)),
                None,
                "sinks: expected a mapping name -> {type, ...}",
            )
        )
        return
    for name, body in sinks.items():
        line = line_of(doc, ("sinks", name))
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            ruleset.errors.append(LoadError(shown, line, None, f"sinks: bad sink name {name!r}"))
            continue
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            ruleset.errors.append(
                LoadError(shown, line, None, f"sinks.{name}: expected a mapping with a `type`")
            )
            continue
        missing: list[str] = []
        settings = _interpolate(
            {k: v for k, v in body.items() if k != "type"}, f"sinks.{name}", missing
        )
        ruleset.sinks[name] = SinkConfig(
            name=name,
            type=body["type"],
            file=shown,
            line=line,
            settings=settings,
            error="; ".join(missing) or None,
        )
        if missing:
            ruleset.errors.append(LoadError(shown, line, None, "; ".join(missing)))


def load_rules(directory: str | Path, extra_sinks: Iterable[str] = ()) -> RuleSet:
    """Load sinks.yaml and every rule file of `directory`; problems land in `.errors`."""
    root = Path(directory)
    ruleset = RuleSet(directory=root)
    if not root.is_dir():
        ruleset.errors.append(LoadError(str(root), 0, None, "alerts directory not found"))
        return ruleset
    files = sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    for p in files:
        if p.name in SINKS_FILE_NAMES:
            _load_sinks_file(p, str(p), ruleset)
    known_sinks = [*ruleset.sinks, *extra_sinks]
    seen: dict[str, str] = {}
    for p in files:
        if p.name in SINKS_FILE_NAMES:
            continue
        shown = str(p)
        doc, problem = _read_yaml(p, shown)
        if problem is not None:
            ruleset.errors.append(problem)
            continue
        if doc is None:
            continue
        if not isinstance(doc, dict) or "rules" not in doc:
            ruleset.errors.append(LoadError(shown, 1, None, "expected a mapping with `rules:`"))
            continue
        if isinstance(doc, LineDict):
            ruleset.errors += [
                LoadError(shown, line, None, f"duplicate key {key!r}")
                for key, line in doc.duplicates
            ]
        for key in doc:
            if key != "rules":
                ruleset.errors.append(
                    LoadError(shown, line_of(doc, (key,)), None, f"unknown top-level key {key!r}")
                )
        items = doc["rules"]
        if items is None:
            continue
        if not isinstance(items, list):
            ruleset.errors.append(
                LoadError(shown, line_of(doc, ("rules",)), None, "rules: expected a list of rules")
            )
            continue
        for i, raw in enumerate(items):
            rule, errs = compile_rule(raw, shown, i, known_sinks)
            ruleset.errors += errs
            if rule is None:
                continue
            if rule.name in seen:
                ruleset.errors.append(
                    LoadError(
                        shown,
                        rule.line,
                        rule.name,
                        f"duplicate rule name (first defined at {seen[rule.name]})",
                    )
                )
                continue
            seen[rule.name] = f"{shown}:{rule.line}"
            ruleset.rules.append(rule)
    return ruleset


_SECRET_SETTING = re.compile(r"(?i)url|key|secret|token|password|passphrase")


def build_sinks(
    ruleset: RuleSet,
    *,
    redis_client: Any = None,
    redis_prefix: str = "mde",
    ca_bundle: Path | None = None,
) -> tuple[dict[str, Sink], list[LoadError]]:
    """Build the declared sinks through the sink registry; failures become LoadErrors."""
    from monitor.alerts.sinks.registry import build_sink
    from monitor.redact import register_secret, register_secrets, scrub, secrets_in

    sinks: dict[str, Sink] = {}
    errors: list[LoadError] = []
    for cfg in ruleset.sinks.values():
        if cfg.error:
            continue
        source = f"{cfg.file}:{cfg.line}"
        for key, value in cfg.settings.items():  # before building: its errors are masked too
            if isinstance(value, str) and _SECRET_SETTING.search(str(key)):
                register_secret(value)
        try:
            sinks[cfg.name] = build_sink(
                cfg.name,
                cfg.type,
                dict(cfg.settings),
                source,
                redis_client=redis_client,
                redis_prefix=redis_prefix,
                ca_bundle=ca_bundle,
            )
            register_secrets(secrets_in(getattr(sinks[cfg.name], "settings", None)))
        except Exception as exc:
            lines = [
                scrub(line.removeprefix(f"{source}: ").strip())
                for line in str(exc).splitlines()
                if line.strip()
            ]
            for line in lines or [type(exc).__name__]:
                errors.append(LoadError(cfg.file, cfg.line, None, line))
    return sinks, errors


def sink_rows(
    ruleset: RuleSet,
    sinks: dict[str, Sink],
    errors: Iterable[LoadError],
    disabled: dict[str, Any],
) -> list[dict[str, Any]]:
    """Each declared sink as `sinks list --json` shows it: type, target (no secrets), disabled
    state, its load errors, and the rules that send to it."""
    errors = list(errors)
    return [
        {
            "name": name,
            "type": cfg.type,
            "describe": sinks[name].describe() if name in sinks else None,
            "disabled": disabled.get(name),
            "errors": [e.message for e in errors if e.file == cfg.file and e.line == cfg.line],
            "rules": [r.name for r in ruleset.rules if name in r.sinks],
        }
        for name, cfg in ruleset.sinks.items()
    ]
