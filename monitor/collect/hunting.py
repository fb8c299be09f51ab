"""Logon users through advanced hunting (`logon_users: hunting`): every onboarded machine per sync.

One query reads the successful logons of `DeviceLogonEvents` over the window for the machines of
one device id range, summarised per device and account. The sorted machine ids are cut into
ranges expected to fill half of the row limit (from the rows per machine seen so far); a range
whose answer reaches the row limit (Microsoft cuts it silently) or that Microsoft refuses as too
heavy (400 "... exceeded ...") is split in two and asked again. A query that fails otherwise
leaves its machines uncovered; a missing permission, an exhausted quota or a refused query stops
the queries that remain (the caller falls back to the per-machine rotation for those machines).

Each row becomes an item shaped like a `/logonusers` one (id `domain\\name` lower-cased, as
Defender's ids are), without the account facts DeviceLogonEvents does not hold (isDomainAdmin,
isOnlyNetworkUser, logOnMachinesCount): those are added by the caller from the per-machine API.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from monitor.collect.budget import BudgetExhausted
from monitor.collect.defender_api import DefenderClient
from monitor.collect.errors import (
    ApiError,
    AuthError,
    CollectError,
    FeatureDisabled,
    PermissionMissing,
)
from monitor.collect.http import Json
from monitor.model.schema import epoch_ms

log = logging.getLogger(__name__)

# Account facts only the per-machine API knows (the caller carries or reads them).
DETAIL_FIELDS = ("isDomainAdmin", "isOnlyNetworkUser", "logOnMachinesCount")
TARGET_FILL = 0.5  # plan each query for half the row limit: room for machines busier than usual
DEFAULT_ROWS_PER_MACHINE = 10.0  # before any query told us better
MIN_ROWS_PER_MACHINE = 0.5  # never plan a range as if its machines had (almost) no rows

# Microsoft's 400 for a query too heavy for its limits: "Query execution has exceeded the allowed
# limits", "... the allowed result size", "Query exceeded the timeout period": a smaller range helps
_TOO_HEAVY = re.compile(r"exceed", re.IGNORECASE)


def _kql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def logon_query(first: str, last: str, window: str) -> str:
    """The query for the machines whose id sorts from `first` to `last` (both included)."""
    return (
        "DeviceLogonEvents"
        f"\n| where Timestamp > ago({window})"
        '\n| where ActionType == "LogonSuccess" and isnotempty(AccountName)'
        f"\n| where strcmp(DeviceId, {_kql_string(first)}) >= 0"
        f" and strcmp(DeviceId, {_kql_string(last)}) <= 0"
        "\n| summarize FirstSeen = min(Timestamp), LastSeen = max(Timestamp),"
        " LogonTypes = make_set(LogonType), AccountSid = take_any(AccountSid)"
        " by DeviceId, AccountDomain, AccountName"
    )


def _logon_types(value: object) -> list[str]:
    """make_set's value: a list, or the JSON-ish / comma-separated text some clients get."""
    if isinstance(value, str):
        text = value.strip().removeprefix("[").removesuffix("]")
        parts: Iterable[object] = text.split(",")
    elif isinstance(value, list):
        parts = value
    else:
        return []
    out = {str(p).strip().strip('"').strip() for p in parts}
    return sorted(t for t in out if t)


def _later(a: object, b: object) -> bool:
    """Whether time `a` is after time `b` (unparseable ones are never later)."""
    ta, tb = epoch_ms(a), epoch_ms(b)
    return ta is not None and (tb is None or ta > tb)


def row_item(row: Mapping[str, Any]) -> tuple[str, Json] | None:
    """(machine id, `/logonusers`-shaped item) of one summary row; None for an empty account name.

    A row without a string DeviceId or without the AccountName column raises ValueError: the
    answer is not the one asked for, and reading it would empty machines of their logon users."""
    device = row.get("DeviceId")
    if not isinstance(device, str) or not device:
        raise ValueError("a row without DeviceId")
    if "AccountName" not in row:
        raise ValueError("a row without AccountName")
    name, domain = row.get("AccountName"), row.get("AccountDomain")
    if not isinstance(name, str) or not name.strip():
        return None
    domain = domain if isinstance(domain, str) and domain.strip() else None
    sid = row.get("AccountSid")
    types = _logon_types(row.get("LogonTypes"))
    item: Json = {
        "id": (f"{domain}\\{name}" if domain else name).lower(),
        "accountName": name,
        "accountDomain": domain,
        "accountSid": sid if isinstance(sid, str) and sid else None,
        "firstSeen": row.get("FirstSeen"),
        "lastSeen": row.get("LastSeen"),
        "logonTypes": ", ".join(types) if types else None,
    }
    return device, item


def _merge(old: Json, new: Json) -> Json:
    """Two rows of one account on one machine (AccountDomain cased differently): one item."""
    first = new if _later(old["firstSeen"], new["firstSeen"]) else old
    last, other = (new, old) if _later(new["lastSeen"], old["lastSeen"]) else (old, new)
    types = _logon_types(f"{old['logonTypes'] or ''},{new['logonTypes'] or ''}")
    return {
        **last,
        "accountSid": last["accountSid"] or other["accountSid"],
        "firstSeen": first["firstSeen"],
        "logonTypes": ", ".join(types) if types else None,
    }


class HuntedLogon(NamedTuple):
    """One account on one machine as the summary rows tell it: the `/logonusers` item's fields,
    held as a tuple until it is converted (a big tenant has hundreds of thousands)."""

    id: str
    accountName: str  # (the API's field names)
    accountDomain: str | None
    accountSid: str | None
    firstSeen: Any
    lastSeen: Any
    logonTypes: str | None


def with_details(item: HuntedLogon, details: Mapping[str, Any] | None) -> Json:
    """The `/logonusers`-shaped item, with the account facts only the per-machine API knows
    when known."""
    out = item._asdict()
    if details:
        out.update((k, details[k]) for k in DETAIL_FIELDS if k in details)
    return out


@dataclass
class HuntOutcome:
    """What the hunting queries gave: items per covered machine, and what they could not cover."""

    # covered machine -> its accounts
    items: dict[str, list[HuntedLogon]] = field(default_factory=dict)
    uncovered: list[str] = field(default_factory=list)  # machines no query answered for
    calls: int = 0
    splits: int = 0
    rows: int = 0
    errors: list[str] = field(default_factory=list)  # failed queries, in order
    stopped: str | None = None  # why the remaining queries were not sent
    seconds: float = 0.0  # wall time of the queries

    @property
    def rows_per_machine(self) -> float | None:
        """Rows per covered machine, for planning the next sync's ranges."""
        return self.rows / len(self.items) if self.items else None


def _stops(exc: Exception) -> bool:
    """Errors after which no further query can succeed this sync."""
    if isinstance(exc, PermissionMissing | FeatureDisabled | AuthError | BudgetExhausted):
        return True
    if isinstance(exc, ApiError):
        return exc.status == 429 or (exc.status == 400 and not _TOO_HEAVY.search(exc.detail))
    return False


def hunt_logon_users(
    defender: DefenderClient,
    machine_ids: Iterable[str],
    window: str,
    *,
    max_rows: int,
    rows_per_machine: float | None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> HuntOutcome:
    """Query every machine's logon users, range by range; see the module doc."""
    t0 = time.monotonic()
    ids = sorted(set(machine_ids))
    out = HuntOutcome()
    estimate = max(rows_per_machine or DEFAULT_ROWS_PER_MACHINE, MIN_ROWS_PER_MACHINE)
    pos = 0
    redo: list[list[str]] = []  # halves of ranges that were too big, asked before moving on
    while redo or pos < len(ids):
        if redo:
            chunk = redo.pop()
        else:
            size = max(1, int(max_rows * TARGET_FILL / estimate))
            chunk, pos = ids[pos : pos + size], pos + size
        out.calls += 1
        try:
            rows = defender.run_query(logon_query(chunk[0], chunk[-1], window))
            items = None if len(rows) >= max_rows else _items(rows, chunk)
        except (CollectError, BudgetExhausted, ValueError) as exc:
            heavy = isinstance(exc, ApiError) and exc.status == 400
            if heavy and _TOO_HEAVY.search(str(exc)) and len(chunk) > 1:
                out.splits += 1
                redo += _halves(chunk)
                continue
            reason = str(exc) if not isinstance(exc, ValueError) else f"malformed answer: {exc}"
            out.errors.append(reason)
            out.uncovered += chunk
            log.warning(
                "hunting query failed",
                extra={"machines": len(chunk), "first": chunk[0], "error": reason},
            )
            if _stops(exc):
                out.stopped = reason
                out.uncovered += [m for c in redo for m in c] + ids[pos:]
                redo, pos = [], len(ids)
            continue
        if items is None:  # as many rows as one answer holds: Microsoft may have cut it
            estimate = max(estimate, len(rows) / len(chunk))
            if len(chunk) > 1:
                out.splits += 1
                redo += _halves(chunk)
                continue
            out.errors.append(f"machine {chunk[0]}: {len(rows)} rows, the most one answer holds")
            out.uncovered += chunk
            continue
        out.rows += len(rows)
        out.items.update(items)
        seen = out.rows_per_machine
        if seen is not None:
            estimate = max(seen, MIN_ROWS_PER_MACHINE)
        progress(len(out.items), len(ids))
    out.seconds = time.monotonic() - t0
    return out


def _halves(chunk: list[str]) -> list[list[str]]:
    """The two halves of a range, the first one last (asked next: `redo` is a stack)."""
    half = len(chunk) // 2
    return [chunk[half:], chunk[:half]]


def _items(rows: list[Json], chunk: list[str]) -> dict[str, list[HuntedLogon]]:
    """Rows -> items per machine of the chunk (every chunk machine present, maybe empty)."""
    per: dict[str, dict[str, Json]] = {m: {} for m in chunk}
    by_lower = {m.lower(): m for m in chunk}
    for row in rows:
        got = row_item(row)
        if got is None:
            continue
        device, item = got
        mid = device if device in per else by_lower.get(device.lower())
        mine = per.get(mid) if mid is not None else None
        if mine is None:  # a device in the range that is not an onboarded machine of ours
            continue
        prev = mine.get(item["id"])
        mine[item["id"]] = item if prev is None else _merge(prev, item)
    return {m: [HuntedLogon(**item) for item in v.values()] for m, v in per.items()}


class RowsHint:
    """The rows per machine the last sync's queries returned, kept in Redis per tenant, so the
    next sync plans its ranges from the tenant's own density."""

    def __init__(self, client: redis.Redis | None, prefix: str, tenant: str) -> None:
        self._client = client
        self._key = f"{prefix}:logon_hunting:{tenant}"

    def load(self) -> float | None:
        if self._client is None:
            return None
        raw = self._client.hget(self._key, "rows_per_machine")
        try:
            return float(raw) if raw is not None else None  # type: ignore[arg-type]
        except ValueError:
            return None

    def save(self, rows_per_machine: float) -> None:
        if self._client is not None:
            self._client.hset(self._key, "rows_per_machine", f"{rows_per_machine:.3f}")
