"""Render a notification's title and summary: rule templates in a Jinja2 sandbox, sane defaults.

Templates see: `rule`, `description`, `severity`, `status`, `labels`, `tenant`, `events` (the
listed events), `first`, `total`, `shown`, `more`, `headlines` (value -> count of the group's
headline values, e.g. {"Inactive": 42}) and the function `field(event, "changes.riskScore.new")`.
Output is plain text; sinks escape it for their medium.

Rendering is budgeted (a rule file is untrusted input): every operation that could allocate
without bound is refused up front (`'x' * 10**9`, `9 ** 9 ** 9`, `'%0999999999d' | format(1)`,
arguments above `MAX_ARGUMENT`), template code runs under a step counter (`MAX_STEPS` lines,
so nested `range(100000)` loops stop) and a wall-clock budget, no variable may outgrow
`MAX_OUTPUT` and the output stops at `MAX_OUTPUT` characters. A template over budget falls back
to the default text; `rules check` trial-renders every template and reports one that is.
Titles are cut at `TITLE_LIMIT` and summaries at `SUMMARY_LIMIT` characters; each sink then cuts
to its own limits.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from monitor.alerts.match import MISSING, get_field
from monitor.events.envelope import Event

if TYPE_CHECKING:
    from monitor.alerts.rules import Rule

log = logging.getLogger(__name__)

MAX_LINE = 240
TITLE_LIMIT = 500
SUMMARY_LIMIT = 16_000
MAX_OUTPUT = 64_000  # characters a template may produce, or hold in one value
MAX_ARGUMENT = 100_000  # largest integer a template may pass to a function or filter
MAX_STEPS = 200_000  # lines of template code one render may execute
RENDER_SECONDS = 2.0  # wall-clock budget of one render
_WIDE_FORMAT = re.compile(r"%[-+ #0]*\d{6,}|\{[^{}]*:[^{}]*\d{6,}[^{}]*\}")


class TemplateError(ValueError):
    """A template that does not compile."""


class TemplateBudgetError(SecurityError):
    """A render that exceeded its budget (steps, time, size)."""


class _Budget:
    """Counts the template lines one render executes; refuses oversized values."""

    def __init__(self, steps: int, seconds: float) -> None:
        self.steps_left = steps
        self.deadline = time.monotonic() + seconds

    def check(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise TemplateBudgetError(f"template ran more than {MAX_STEPS:,} steps")
        if self.steps_left % 256 == 0 and time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"template ran longer than {RENDER_SECONDS:g}s")

    def tracer(self, frame: Any, event: str, arg: Any) -> Any:
        """sys.settrace hook: count the lines of template code, check its variables' sizes."""
        if frame.f_code.co_filename != "<template>":
            return None
        if event == "line":
            self.check()
            if self.steps_left % 16:
                return self.tracer
            for value in frame.f_locals.values():
                if isinstance(value, str | list | tuple | dict) and len(value) > MAX_OUTPUT:
                    raise TemplateBudgetError(
                        f"a template value grew beyond {MAX_OUTPUT:,} characters/items"
                    )
        return self.tracer


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any], value: Any = None) -> None:
    if isinstance(value, str) and _WIDE_FORMAT.search(value[:10_000]):
        raise TemplateBudgetError("format width above the template limit")
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_ARGUMENT:
            raise TemplateBudgetError(f"argument {a} is above the template limit {MAX_ARGUMENT:,}")
        if isinstance(a, str) and _WIDE_FORMAT.search(a[:10_000]):
            raise TemplateBudgetError("format width above the template limit")
        if _sized(a) > MAX_OUTPUT * 4:
            raise TemplateBudgetError("argument larger than the template limit")


def _check_result(value: Any) -> Any:
    if _sized(value) > MAX_OUTPUT:
        raise TemplateBudgetError(f"a template value grew beyond {MAX_OUTPUT:,} characters/items")
    return value


class _BudgetedEnvironment(SandboxedEnvironment):
    """The Jinja sandbox plus size checks on `*`, `**`, `+`, every call and every filter."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        numbers = isinstance(left, int | float) and isinstance(right, int | float)
        if operator == "**":
            if numbers and abs(right) > 64 and abs(left) > 1:
                raise TemplateBudgetError("exponent above the template limit")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _sized(seq) and isinstance(n, int) and _sized(seq) * n > MAX_OUTPUT:
                    raise TemplateBudgetError(f"repetition beyond {MAX_OUTPUT:,} characters/items")
        elif operator == "+" and _sized(left) + _sized(right) > MAX_OUTPUT:
            raise TemplateBudgetError(f"a template value grew beyond {MAX_OUTPUT:,} characters")
        return _check_result(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_args(args, kwargs, template)
            return str(_check_result(wrapped(*args, **kwargs)))

        return checked

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs, getattr(__obj, "__self__", None))
        return _check_result(super().call(__context, __obj, *args, **kwargs))


def _guarded_filter(func: Any) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_args(args[1:] if args else args, kwargs, args[0] if args else None)
        return _check_result(func(*args, **kwargs))

    for attr in ("jinja_pass_arg",):  # keep @pass_context / @pass_environment markers
        if hasattr(func, attr):
            setattr(guarded, attr, getattr(func, attr))
    return guarded


def _field(event: Any, path: str) -> Any:
    if not isinstance(event, dict):
        return None
    v = get_field(event, path)
    return None if v is MISSING else v


_ENV = _BudgetedEnvironment(
    autoescape=False,
    undefined=jinja2.ChainableUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)
_ENV.globals["field"] = _field
_ENV.filters = {name: _guarded_filter(f) for name, f in _ENV.filters.items()}


def render_budgeted(
    template: jinja2.Template,
    context: Mapping[str, Any],
    *,
    steps: int = MAX_STEPS,
    seconds: float = RENDER_SECONDS,
) -> str:
    """Render within the budget (see the module doc); TemplateBudgetError when over it."""
    budget = _Budget(steps, seconds)
    previous = sys.gettrace()
    sys.settrace(budget.tracer)
    out: list[str] = []
    size = 0
    try:
        for chunk in template.generate(dict(context)):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise TemplateBudgetError(f"template output beyond {MAX_OUTPUT:,} characters")
            out.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(out)


def trial_render(template: jinja2.Template, event_type: str) -> str | None:
    """Render once against a sample notification; the budget problem, or None when within it.

    `rules check` uses it: a template that cannot stay within budget on one small event
    (`'x' * 200000000`, nested `range(100000)` loops) never will on real ones.
    """
    sample: Event = {
        "id": "sample",
        "type": event_type,
        "subject": "sample",
        "time": "2024-01-01T00:00:00Z",
        "data": {"tenant": "sample", "displayName": "sample", "changes": {}},
    }
    context = {
        "rule": "sample",
        "description": "",
        "severity": "medium",
        "status": "firing",
        "labels": {"tenant": "sample"},
        "tenant": "sample",
        "events": [sample],
        "first": sample,
        "total": 1,
        "shown": 1,
        "more": 0,
        "headlines": {},
        "default_title": "sample",
        "default_summary": "sample",
    }
    try:
        render_budgeted(template, context)
    except TemplateBudgetError as exc:
        return str(exc)
    except Exception:  # other errors depend on the data; at run time they fall back to defaults
        return None
    return None


def cut(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, ending with "…" when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def compile_template(text: str) -> jinja2.Template:
    """A sandboxed template; syntax errors raise TemplateError."""
    try:
        return _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"line {exc.lineno}: {exc.message}") from None


# type -> (noun, plural, verb, field whose new value is the headline, verb with that value)
_PHRASES: dict[str, tuple[str, str, str, str | None, str | None]] = {
    "mde.account.created": ("account", "accounts", "appeared", None, None),
    "mde.account.deleted": ("account", "accounts", "is missing", None, None),
    "mde.account.updated": ("account", "accounts", "changed", None, None),
    "mde.machine.created": ("machine", "machines", "onboarded", None, None),
    "mde.machine.deleted": ("machine", "machines", "removed from Defender", None, None),
    "mde.machine.updated": ("machine", "machines", "changed", None, None),
    "mde.machine.risk_raised": (
        "machine",
        "machines",
        "risk raised",
        "riskScore",
        "risk raised to {}",
    ),
    "mde.machine.risk_lowered": (
        "machine",
        "machines",
        "risk lowered",
        "riskScore",
        "risk lowered to {}",
    ),
    "mde.machine.exposure_raised": (
        "machine",
        "machines",
        "exposure raised",
        "exposureLevel",
        "exposure raised to {}",
    ),
    "mde.machine.exposure_lowered": (
        "machine",
        "machines",
        "exposure lowered",
        "exposureLevel",
        "exposure lowered to {}",
    ),
    "mde.machine.health_degraded": (
        "machine",
        "machines",
        "sensor health degraded",
        "healthStatus",
        "went {}",
    ),
    "mde.machine.health_recovered": (
        "machine",
        "machines",
        "sensor health recovered",
        "healthStatus",
        "went {}",
    ),
    "mde.machine.onboarding_changed": (
        "machine",
        "machines",
        "onboarding status changed",
        "onboardingStatus",
        "onboarding status changed to {}",
    ),
    "mde.machine.av_status_changed": (
        "machine",
        "machines",
        "Defender AV status changed",
        "defenderAvStatus",
        "Defender AV status changed to {}",
    ),
    "mde.machine.tags_changed": ("machine", "machines", "tags changed", None, None),
    "mde.user.created": ("user", "users", "created", None, None),
    "mde.user.deleted": ("user", "users", "deleted", None, None),
    "mde.user.updated": ("user", "users", "changed", None, None),
    "mde.user.disabled": ("user", "users", "disabled", None, None),
    "mde.user.enabled": ("user", "users", "enabled", None, None),
    "mde.logon_user.created": (
        "logon account",
        "logon accounts",
        "seen for the first time",
        None,
        None,
    ),
    "mde.logon_user.deleted": ("logon account", "logon accounts", "no longer seen", None, None),
    "mde.logon_user.updated": ("logon account", "logon accounts", "changed", None, None),
    "mde.vulnerability.created": ("vulnerability", "vulnerabilities", "now present", None, None),
    "mde.vulnerability.deleted": (
        "vulnerability",
        "vulnerabilities",
        "no longer present",
        None,
        None,
    ),
    "mde.vulnerability.updated": ("vulnerability", "vulnerabilities", "changed", None, None),
    "mde.vulnerability.exploit_published": (
        "vulnerability",
        "vulnerabilities",
        "got a public exploit",
        None,
        None,
    ),
    "mde.machine_vulnerability.identified": (
        "vulnerability finding",
        "vulnerability findings",
        "newly identified",
        None,
        None,
    ),
    "mde.machine_vulnerability.resolved": (
        "vulnerability finding",
        "vulnerability findings",
        "resolved",
        None,
        None,
    ),
    "mde.machine_logon_user.added": ("machine logon", "machine logons", "new", None, None),
    "mde.machine_logon_user.removed": ("machine logon", "machine logons", "gone", None, None),
    "mde.query.entered": ("query result", "query results", "entered the result set", None, None),
    "mde.query.left": ("query result", "query results", "left the result set", None, None),
    "mde.sync.baseline": ("sync", "syncs", "recorded a baseline", None, None),
    "mde.sync.degraded": ("sync", "syncs", "degraded (previous data kept)", None, None),
    "mde.sync.failed": ("sync", "syncs", "failed", None, None),
    "mde.sync.suspicious_drop": ("sync", "syncs", "held back a suspicious drop", None, None),
}


def headline(event: Event) -> str | None:
    """The value that summarises this event in a digest (e.g. the new healthStatus), or None."""
    phrase = _PHRASES.get(str(event.get("type", "")))
    if phrase is None or phrase[3] is None:
        return None
    data = event.get("data")
    changes = data.get("changes") if isinstance(data, dict) else None
    ch = changes.get(phrase[3]) if isinstance(changes, dict) else None
    if isinstance(ch, dict) and ch.get("new") is not None:
        return str(ch["new"])
    return None


def _short(value: Any) -> str:
    if isinstance(value, list):
        text = "[" + ", ".join(_short(v) for v in value[:10]) + (", …]" if len(value) > 10 else "]")
    elif isinstance(value, dict):
        text = "{…}"
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:79] + "…"


def event_name(event: Event) -> str:
    """What the event is about, for people: display name, else subject."""
    data = event.get("data")
    if isinstance(data, dict):
        name = data.get("displayName")
        if name:
            return str(name)
        ent = data.get("entity")
        if isinstance(ent, dict) and ent.get("displayName"):
            return str(ent["displayName"])
    return str(event.get("subject", "?"))


def describe_event(event: Event) -> str:
    """One line: what changed on what."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    assert isinstance(data, dict)
    etype = str(event.get("type", ""))
    parts: list[str] = []
    changes = data.get("changes")
    if isinstance(changes, dict) and changes:
        for key, ch in list(changes.items())[:6]:
            if not isinstance(ch, dict):
                continue
            if ch.get("added") or ch.get("removed"):
                bits = []
                if ch.get("added"):
                    bits.append("+" + ", +".join(_short(v) for v in ch["added"]))
                if ch.get("removed"):
                    bits.append("-" + ", -".join(_short(v) for v in ch["removed"]))
                parts.append(f"{key}: {' '.join(bits)}")
            else:
                parts.append(f"{key}: {_short(ch.get('old'))} → {_short(ch.get('new'))}")
    elif etype.startswith("mde.sync."):
        if "error" in data:
            parts.append(f"{data.get('stage', 'sync')}: {_short(data.get('error'))}")
        if isinstance(data.get("scopes"), dict):
            parts.append("scopes: " + ", ".join(sorted(map(str, data["scopes"]))))
        if "entityType" in data:
            parts.append(
                f"{data['entityType']}: {data.get('previous')} → {data.get('current')}"
                f" (held {data.get('heldSyncs', '?')} syncs)"
            )
    else:
        target = data.get("target")
        if isinstance(target, dict):
            for key in ("severity", "score", "public", "isDomainAdmin"):
                if key in target:
                    parts.append(f"{key}: {_short(target[key])}")
        phrase = _PHRASES.get(etype)
        if not parts and phrase:
            parts.append(phrase[2])
    line = f"{event_name(event)} ({etype.removeprefix('mde.')})"
    if parts:
        line += ": " + "; ".join(parts)
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 1] + "…"


def default_title(
    rule: Rule,
    status: str,
    labels: Mapping[str, str],
    events: Sequence[Event],
    total: int,
    headlines: Mapping[str, int] | None = None,
) -> str:
    """E.g. "Sensor health degraded: 42 machines went Inactive in contoso"."""
    types = {str(e.get("type", "")) for e in events}
    phrase = _PHRASES.get(next(iter(types))) if len(types) == 1 else None
    tenants = {str(e.get("data", {}).get("tenant", "")) for e in events}
    tenant = labels.get("tenant") or (next(iter(tenants)) if len(tenants) == 1 else "")
    if phrase is not None:
        noun, plural, verb, _field_name, valued = phrase
        counts = dict(headlines or {})
        if not counts and total == len(events):
            counts = dict(Counter(h for e in events if (h := headline(e)) is not None))
        if valued and len(counts) == 1 and sum(counts.values()) == total:
            verb = valued.format(next(iter(counts)))
        elif valued and counts:
            top = ", ".join(f"{n} {v}" for v, n in Counter(counts).most_common(3))
            verb = f"{verb} ({top})"
        what = (
            event_name(events[0])
            if total == 1 and events
            else f"{total} {plural if total != 1 else noun}"
        )
        text = f"{what} {verb}"
    else:
        text = f"{total} change{'s' if total != 1 else ''}"
    if tenant:
        text += f" in {tenant}"
    head = rule.description or rule.name
    prefix = "RESOLVED: " if status == "resolved" else ""
    return f"{prefix}{head}: {text}"


def default_summary(rule: Rule, status: str, events: Sequence[Event], total: int) -> str:
    """One line per listed event, then how many more there are."""
    lines = [f"- {describe_event(e)}" for e in events]
    if total > len(events):
        lines.append(f"… and {total - len(events)} more")
    if status == "resolved":
        lines.insert(0, f"Resolved ({rule.name}):")
    return "\n".join(lines)


def render_notification(
    rule: Rule,
    status: str,
    labels: Mapping[str, str],
    events: Sequence[Event],
    total: int,
    headlines: Mapping[str, int] | None = None,
) -> tuple[str, str]:
    """(title, summary): the rule's templates when given (falling back on error), else defaults."""
    title = default_title(rule, status, labels, events, total, headlines)
    summary = default_summary(rule, status, events, total)
    if rule.title_template is None and rule.summary_template is None:
        return cut(title, TITLE_LIMIT), cut(summary, SUMMARY_LIMIT)
    context = {
        "rule": rule.name,
        "description": rule.description,
        "severity": rule.severity,
        "status": status,
        "labels": dict(labels),
        "tenant": labels.get("tenant")
        or (events[0].get("data", {}).get("tenant") if events else None),
        "events": list(events),
        "first": events[0] if events else {},
        "total": total,
        "shown": len(events),
        "more": max(0, total - len(events)),
        "headlines": dict(headlines or {}),
        "default_title": title,
        "default_summary": summary,
    }
    for part in ("title", "summary"):
        template = rule.title_template if part == "title" else rule.summary_template
        if template is None:
            continue
        try:
            text = render_budgeted(template, context).strip()
        except Exception as exc:  # over budget, sandbox violations, type errors in templates
            log.warning(
                "template failed, using the default",
                extra={
                    "rule": rule.name,
                    "part": part,
                    "error": type(exc).__name__,
                    "reason": str(exc)[:200] if isinstance(exc, SecurityError) else "",
                },
            )
            continue
        if part == "title":
            title = " ".join(text.split()) or title
        else:
            summary = text or summary
    return cut(title, TITLE_LIMIT), cut(summary, SUMMARY_LIMIT)
