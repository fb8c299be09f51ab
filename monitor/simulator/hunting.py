"""Advanced hunting (`POST /api/advancedqueries/run`) over a simulated `DeviceLogonEvents`.

The table is derived from the tenant's per-machine logon users, so the two ways of reading them
agree: each (onboarded machine, logon user) stands for a fixed number of successful logons
(`hunting_events_per_logon` on average), the first at its `firstSeen`, the last at its
`lastSeen`, of its `logonTypes`, with its account name, domain and SID. The simulated table holds
successful logons only, and every listed logon user counts as inside any window: the per-machine
lists stand for Defender's last 30 days, whatever the timestamps of a generated tenant say.

Only the query shape the collector sends is understood (anything else is an honest 400):

    DeviceLogonEvents
    | where Timestamp > ago(30d)                      (optional; 1 minute to 30 days ...)
    | where ActionType == "LogonSuccess" and isnotempty(AccountName)     (optional)
    | where strcmp(DeviceId, "<first>") >= 0 and strcmp(DeviceId, "<last>") <= 0   (or DeviceId == "x")
    | summarize FirstSeen = min(Timestamp), LastSeen = max(Timestamp),
                LogonTypes = make_set(LogonType), AccountSid = take_any(AccountSid), count()
                by DeviceId, AccountDomain, AccountName       (any of DeviceId, DeviceName,
                                                               AccountDomain, AccountName, AccountSid)

Microsoft's documented limits are played: at most `hunting_max_rows` result rows (the rest are
cut without a word), a query scanning more than `hunting_max_query_events` events is preempted
(400 "Query execution has exceeded the allowed limits ..."), and the tenant's CPU quota of
`hunting_cpu_events_per_hour` scanned events per hour answers 429 with Retry-After until it frees
up. (One simulated event costs one microsecond: 200 s per query, 10 minutes per hour.) The 45
calls per minute and 1,500 per hour are the Simulator's hunting rate limiter.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from monitor.simulator.tenant import parse_iso

if TYPE_CHECKING:
    from monitor.simulator.tenant import SimTenant

TABLE = "DeviceLogonEvents"
MAX_WINDOW_SECONDS = 30 * 86400
PREEMPTED = (
    "Query execution has exceeded the allowed limits. The query execution was preempted. This"
    " could possibly be due to high CPU and/or memory resource consumption. Optimize your query"
    " by following best practices and try again."
)

_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"|\'((?:[^\'\\]|\\.)*)\'')
_LIT = r"\x00(\d+)\x00"
_WINDOW = re.compile(r"^Timestamp\s*(>=|>)\s*ago\(\s*(\d+)\s*([dhms])\s*\)$")
_ACTION = re.compile(rf"^ActionType\s*(==|=~)\s*{_LIT}$")
_STRCMP = re.compile(rf"^strcmp\(\s*DeviceId\s*,\s*{_LIT}\s*\)\s*(>=|<=|>|<|==)\s*0$")
_DEVICE_EQ = re.compile(rf"^DeviceId\s*==\s*{_LIT}$")
_NOT_EMPTY = re.compile(r"^isnotempty\(\s*AccountName\s*\)$")
_AGG = re.compile(r"^(?:([A-Za-z_]\w*)\s*=\s*)?([a-z_]+)\(\s*(\w*)\s*\)$")
_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}
GROUP_COLUMNS = ("DeviceId", "DeviceName", "AccountDomain", "AccountName", "AccountSid")
# aggregation -> (columns it accepts, default name prefix, result type)
_AGGS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "min": (("Timestamp",), "min_", "DateTime"),
    "max": (("Timestamp",), "max_", "DateTime"),
    "make_set": (("LogonType",), "set_", "Dynamic"),
    "take_any": (GROUP_COLUMNS, "any_", "String"),
    "any": (GROUP_COLUMNS, "any_", "String"),
    "count": (("",), "count_", "Int64"),
}


class QueryError(Exception):
    """The query cannot be answered: HTTP `status` with Defender's error `code` and message."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        code: str = "BadRequest",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


@dataclass
class LogonQuery:
    """The parts of a recognised query."""

    window_seconds: int | None = None
    low: tuple[str, bool] | None = None  # (device id, inclusive)
    high: tuple[str, bool] | None = None
    device: str | None = None
    by: list[str] = field(default_factory=list)
    aggregates: list[tuple[str, str, str]] = field(default_factory=list)  # (name, func, column)


def _mask(text: str) -> tuple[str, list[str]]:
    """The query with string literals replaced by \\x00N\\x00 and its // comments removed."""
    literals: list[str] = []

    def keep(m: re.Match[str]) -> str:
        raw = m.group(1) if m.group(1) is not None else m.group(2)
        literals.append(re.sub(r"\\(.)", r"\1", raw))
        return f"\x00{len(literals) - 1}\x00"

    masked = _STRING.sub(keep, text)
    if '"' in masked or "'" in masked:
        raise QueryError("Syntax error: a string literal is not closed.")
    return re.sub(r"//[^\n]*", "", masked), literals


def _split_commas(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _unsupported(what: str) -> QueryError:
    return QueryError(
        f"The simulator does not support {what!r}: it answers DeviceLogonEvents summarised per"
        " device and account (see monitor/simulator/hunting.py)."
    )


def parse_query(text: str) -> LogonQuery:
    """The recognised parts of `text`, or QueryError (400) naming what is not supported."""
    masked, lits = _mask(text)
    stages = [" ".join(s.split()) for s in masked.split("|")]
    if not stages or stages[0] != TABLE:
        raise _unsupported(stages[0] if stages else "")
    q = LogonQuery()
    summarized = False
    for stage in stages[1:]:
        verb, _, rest = stage.partition(" ")
        if summarized:
            raise _unsupported(stage)
        if verb == "where":
            for cond in re.split(r"\s+and\s+", rest):
                _condition(q, cond.strip(), lits)
        elif verb == "summarize":
            _summarize(q, rest, lits)
            summarized = True
        else:
            raise _unsupported(stage)
    if not summarized:
        raise _unsupported("a query without summarize (raw events)")
    return q


def _condition(q: LogonQuery, cond: str, lits: list[str]) -> None:
    if m := _WINDOW.match(cond):
        seconds = int(m.group(2)) * _UNIT[m.group(3)]
        if seconds <= 0:
            raise QueryError(f"Semantic error: ago({m.group(2)}{m.group(3)}) is not a window.")
        q.window_seconds = min(seconds, MAX_WINDOW_SECONDS)  # the data holds 30 days anyway
    elif m := _ACTION.match(cond):
        value = lits[int(m.group(2))]
        equal = value == "LogonSuccess" if m.group(1) == "==" else value.lower() == "logonsuccess"
        if not equal:
            raise _unsupported(f"ActionType {m.group(1)} {value!r} (only LogonSuccess is held)")
    elif m := _STRCMP.match(cond):
        value, op = lits[int(m.group(1))], m.group(2)
        if op in (">=", ">"):
            q.low = (value, op == ">=")
        elif op in ("<=", "<"):
            q.high = (value, op == "<=")
        else:
            q.device = value
    elif m := _DEVICE_EQ.match(cond):
        q.device = lits[int(m.group(1))]
    elif not _NOT_EMPTY.match(cond):
        raise _unsupported(_unmask(cond, lits))


def _summarize(q: LogonQuery, rest: str, lits: list[str]) -> None:
    parts = re.split(r"\s+by\s+", f" {rest} ", maxsplit=1)
    if len(parts) != 2:
        raise _unsupported(f"summarize {_unmask(rest, lits)} (without by)")
    aggs, by = parts
    for col in _split_commas(by):
        if col not in GROUP_COLUMNS:
            raise _unsupported(f"summarize ... by {col}")
        q.by.append(col)
    for part in _split_commas(aggs):
        m = _AGG.match(part)
        spec = _AGGS.get(m.group(2)) if m else None
        if m is None or spec is None or m.group(3) not in spec[0]:
            raise _unsupported(_unmask(part, lits))
        name = m.group(1) or f"{spec[1]}{m.group(3)}"
        q.aggregates.append((name, m.group(2), m.group(3)))


def _unmask(text: str, lits: list[str]) -> str:
    return re.sub(_LIT, lambda m: f'"{lits[int(m.group(1))]}"', text)


@dataclass(frozen=True)
class LogonPair:
    """One (machine, account) of the simulated table: its events summarised."""

    DeviceId: str
    DeviceName: str | None
    AccountDomain: str | None
    AccountName: str
    AccountSid: str | None
    first: datetime | None
    last: datetime | None
    types: tuple[str, ...]
    events: int


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return parse_iso(value)
    except ValueError:
        return None


def build_table(tenant: SimTenant) -> tuple[list[str], dict[str, list[LogonPair]]]:
    """(sorted onboarded machine ids, machine id -> its pairs) from the per-machine lists."""
    per_logon = max(1, tenant.hunting_events_per_logon)
    out: dict[str, list[LogonPair]] = {}
    for mid, users in tenant.logon_users.items():
        machine = tenant.machines.get(mid)
        if machine is None or machine.get("onboardingStatus", "Onboarded") != "Onboarded":
            continue  # no sensor, no events (its /logonusers answers 404)
        pairs = []
        for lu in users:
            lid = str(lu.get("id") or "")
            name = lu.get("accountName") or lid.rpartition("\\")[2]
            if not name:
                continue
            domain = lu.get("accountDomain") or (lid.partition("\\")[0] if "\\" in lid else None)
            types = tuple(
                t.strip() for t in str(lu.get("logonTypes") or "").split(",") if t.strip()
            )
            spread = zlib.crc32(f"{mid}|{lid}".encode()) % (2 * per_logon - 1)
            pairs.append(
                LogonPair(
                    mid,
                    machine.get("computerDnsName"),
                    domain,
                    str(name),
                    lu.get("accountSid"),
                    _time(lu.get("firstSeen")) or _time(lu.get("lastSeen")),
                    _time(lu.get("lastSeen")) or _time(lu.get("firstSeen")),
                    types,
                    1 + spread,
                )
            )
        out[mid] = pairs
    return sorted(out), out


def _select(ids: list[str], q: LogonQuery) -> list[str]:
    if q.device is not None:
        return [q.device] if q.device in set(ids) else []
    lo = 0
    if q.low is not None:
        value, inclusive = q.low
        lo = (bisect.bisect_left if inclusive else bisect.bisect_right)(ids, value)
    hi = len(ids)
    if q.high is not None:
        value, inclusive = q.high
        hi = (bisect.bisect_right if inclusive else bisect.bisect_left)(ids, value)
    return ids[lo:hi]


def _kusto_time(value: datetime | None) -> str | None:
    """2024-05-30T08:01:48.0000000Z, as Defender writes DateTime columns."""
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def evaluate(tenant: SimTenant, q: LogonQuery) -> tuple[list[dict[str, Any]], list[Any], int]:
    """(Schema, Results before the row limit, events scanned) of a parsed query."""
    ids, table = tenant.cached("hunting_table", lambda: build_table(tenant), vulns=False)
    pairs = [p for mid in _select(ids, q) for p in table[mid]]
    scanned = sum(p.events for p in pairs)
    groups: dict[tuple[Any, ...], list[LogonPair]] = {}
    for p in pairs:
        groups.setdefault(tuple(getattr(p, c) for c in q.by), []).append(p)
    schema = [{"Name": c, "Type": "String"} for c in q.by] + [
        {"Name": name, "Type": _AGGS[func][2]} for name, func, _ in q.aggregates
    ]
    rows = []
    for key in sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        members = groups[key]
        row: dict[str, Any] = dict(zip(q.by, key, strict=True))
        for name, func, column in q.aggregates:
            row[name] = _aggregate(func, column, members)
        rows.append(row)
    return schema, rows, scanned


def _aggregate(func: str, column: str, members: list[LogonPair]) -> Any:
    if func == "count":
        return sum(p.events for p in members)
    if func in ("min", "max"):
        times = [t for p in members if (t := p.first if func == "min" else p.last) is not None]
        return _kusto_time((min if func == "min" else max)(times)) if times else None
    if func == "make_set":
        return list(dict.fromkeys(t for p in members for t in p.types))
    return next((v for p in members if (v := getattr(p, column)) is not None), None)


class CpuQuota:
    """Each tenant's scanned events over a sliding hour (Microsoft's CPU quota)."""

    def __init__(
        self, hour_seconds: float = 3600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.hour_seconds = hour_seconds
        self._clock = clock
        self._used: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._used.clear()

    def blocked_for(self, tenant_id: str, per_hour: int) -> int | None:
        """Seconds until the tenant may query again (None: it may now)."""
        now = self._clock()
        with self._lock:
            used = self._used.setdefault(tenant_id, deque())
            while used and used[0][0] <= now - self.hour_seconds:
                used.popleft()
            total = sum(n for _, n in used)
            if total < per_hour:
                return None
            for t, n in used:  # the moment enough of the hour's use has expired
                total -= n
                if total < per_hour:
                    return max(1, math.ceil(t + self.hour_seconds - now))
            return 1

    def charge(self, tenant_id: str, events: int) -> None:
        with self._lock:
            self._used.setdefault(tenant_id, deque()).append((self._clock(), events))


def run_query(tenant: SimTenant, text: object, quota: CpuQuota) -> dict[str, Any]:
    """The answer `{"Schema", "Results"}` to one query, or QueryError (400 or 429)."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError(
            "The request body needs a Query (the query text).", code="InvalidRequestBody"
        )
    q = parse_query(text)
    wait = quota.blocked_for(tenant.tenant_id, tenant.hunting_cpu_events_per_hour)
    if wait is not None:
        minutes = max(1, math.ceil(wait / 60))
        raise QueryError(
            "You have exceeded processing resources allocated to this tenant. You can run queries"
            f" again in {minutes} minute{'s' if minutes != 1 else ''}.",
            status=429,
            code="TooManyRequests",
            retry_after=wait,
        )
    with tenant.lock:
        schema, rows, scanned = evaluate(tenant, q)
    if scanned > tenant.hunting_max_query_events:
        quota.charge(tenant.tenant_id, tenant.hunting_max_query_events)
        raise QueryError(PREEMPTED)
    quota.charge(tenant.tenant_id, scanned)
    return {"Schema": schema, "Results": rows[: tenant.hunting_max_rows]}
