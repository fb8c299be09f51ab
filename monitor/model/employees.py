"""Employees (`employee`, class Person) from the directory and/or an HR export file.

HR file: CSV with a header row, or JSON (a list of objects, or `{"employees": [...]}`); the
config maps its columns. A file that cannot be read whole raises HrFileError naming the file
and line (JSON: the item), and the collector then keeps the previous employees.

Employee identity: the employee id when known, else the lower-case e-mail. A directory user and
an HR record are one employee when they share the employee id, else the e-mail (user `mail` or
UPN). HR fields win (status, termination date, manager); the directory fills the rest.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.config import DirectoryEmployees, HrFile
from monitor.model.schema import EMPLOYEE, epoch_ms

Item = dict[str, Any]


class HrFileError(ValueError):
    """The HR file cannot be used; the message names the file and the line (or item)."""


@dataclass
class HrRecord:
    line: int  # CSV line (1 = header) or JSON item index
    employee_id: str | None
    email: str | None  # lower case
    name: str | None
    manager_email: str | None  # lower case
    terminated: bool
    termination_on: int | None  # epoch ms


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _record(row: Mapping[str, Any], cfg: HrFile, line: int, where: str) -> HrRecord:
    cols = cfg.columns
    emp_id = _text(row.get(cols.employee_id))
    email = _text(row.get(cols.email))
    if emp_id is None and email is None:
        raise HrFileError(f"{where}: neither {cols.employee_id!r} nor {cols.email!r} is set")
    if email is not None and "@" not in email:
        raise HrFileError(f"{where}: {cols.email!r} is not an e-mail address: {email!r}")
    status = (_text(row.get(cols.status)) or "active").lower()
    raw_date = _text(row.get(cols.termination_date))
    term = None
    if raw_date is not None:
        term = epoch_ms(raw_date if "T" in raw_date else f"{raw_date}T00:00:00Z")
        if term is None:
            raise HrFileError(
                f"{where}: {cols.termination_date!r} is not an ISO date: {raw_date!r}"
            )
    manager = _text(row.get(cols.manager_email))
    return HrRecord(
        line=line,
        employee_id=emp_id,
        email=email.lower() if email else None,
        name=_text(row.get(cols.name)),
        manager_email=manager.lower() if manager else None,
        terminated=status in {v.lower() for v in cfg.terminated_values},
        termination_on=term,
    )


def read_hr_file(cfg: HrFile) -> list[HrRecord]:
    """Every record of the HR export, or HrFileError("<path>:<line>: ...")."""
    path = Path(cfg.path)
    fmt = cfg.format or ("json" if path.suffix.lower() == ".json" else "csv")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise HrFileError(f"{path}: cannot read the HR file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise HrFileError(f"{path}: not UTF-8 text ({exc.reason})") from None
    records = _read_json(path, text, cfg) if fmt == "json" else _read_csv(path, text, cfg)
    seen: dict[str, int] = {}
    for r in records:
        for label, value in (("employee id", r.employee_id), ("e-mail", r.email)):
            if value is None:
                continue
            key = f"{label}:{value.lower()}"
            if key in seen:
                raise HrFileError(
                    f"{path}:{r.line}: duplicate {label} {value!r} (first on line {seen[key]})"
                )
            seen[key] = r.line
    return records


def _read_csv(path: Path, text: str, cfg: HrFile) -> list[HrRecord]:
    reader = csv.DictReader(text.splitlines(), strict=True)
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise HrFileError(f"{path}:1: {exc}") from None
    cols = cfg.columns
    if cols.employee_id not in header and cols.email not in header:
        raise HrFileError(
            f"{path}:1: the header has neither {cols.employee_id!r} nor {cols.email!r}"
            f" (columns: {', '.join(header) or 'none'})"
        )
    out: list[HrRecord] = []
    rows = iter(reader)
    while True:
        start = reader.line_num + 1  # the line the next record starts on
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:
            raise HrFileError(f"{path}:{start}: {exc}") from None
        if None in row or any(v is None for v in row.values()):
            raise HrFileError(
                f"{path}:{start}: expected {len(header)} fields, got a different number"
            )
        out.append(_record(row, cfg, start, f"{path}:{start}"))
    return out


def _read_json(path: Path, text: str, cfg: HrFile) -> list[HrRecord]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HrFileError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("employees"), list):
        data = data["employees"]
    if not isinstance(data, list):
        raise HrFileError(f"{path}: expected a list of employees (or {{'employees': [...]}})")
    out: list[HrRecord] = []
    for i, row in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(row, dict):
            raise HrFileError(f"{where}: expected an object, got {type(row).__name__}")
        out.append(_record(row, cfg, i, where))
    return out


def is_directory_employee(user: Mapping[str, Any], cfg: DirectoryEmployees) -> bool:
    """Whether a user entity counts as an employee under the configured filter."""
    if not cfg.enabled:
        return False
    if cfg.user_types and user.get("userType") not in cfg.user_types:
        return False
    return not (cfg.require_employee_id and not user.get("employeeId"))


def employee_entity(
    emp_id: str,
    user: Mapping[str, Any] | None,
    hr: HrRecord | None,
    *,
    account_tag: str | None = None,
) -> Item:
    """One employee from a directory user entity and/or an HR record."""
    u: Mapping[str, Any] = user or {}
    email = (
        (hr.email if hr else None)
        or lower_text(u.get("email"))
        or lower_text(u.get("userPrincipalName"))
    )
    name = (hr.name if hr else None) or u.get("displayName") or email or emp_id
    terminated = bool(hr and hr.terminated)
    source = "+".join(s for s, present in (("directory", user), ("hr", hr)) if present)
    properties = {
        "id": emp_id,
        "employeeId": (hr.employee_id if hr else None) or u.get("employeeId"),
        "email": [email] if email else None,  # JupiterOne's Person: a list of addresses
        "firstName": _text(u.get("givenName")),  # from the directory; never guessed from a name
        "lastName": _text(u.get("surname")),
        "employeeType": u.get("employeeType"),
        "companyName": u.get("companyName"),
        "department": u.get("department"),
        "jobTitle": u.get("jobTitle"),
        "status": "terminated" if terminated else "active",
        "active": not terminated,
        "terminationOn": hr.termination_on if hr else None,
        "managerEmail": hr.manager_email if hr else None,
        "source": source,
        "directoryAccountEnabled": None,  # set by the identity mapping
    }
    raw = {"hrLine": hr.line} if hr else {"userKey": u.get("_key")}
    return EMPLOYEE.entity(emp_id, str(name), properties, raw=raw, account_tag=account_tag)


def lower_text(value: object) -> str | None:
    """A non-empty string in lower case (e-mail addresses, UPNs, ids); None otherwise."""
    return value.lower() if isinstance(value, str) and value else None


def employee_id_of(user: Mapping[str, Any] | None, hr: HrRecord | None) -> str | None:
    """The employee's source id: employee id when known, else the lower-case e-mail/UPN."""
    if hr is not None:
        return hr.employee_id or hr.email
    if user is None:
        return None
    return (
        _text(user.get("employeeId"))
        or lower_text(user.get("email"))
        or lower_text(user.get("userPrincipalName"))
    )


def index_records(records: Iterable[HrRecord]) -> tuple[dict[str, HrRecord], dict[str, HrRecord]]:
    """(by lower-case employee id, by lower-case e-mail)."""
    by_id: dict[str, HrRecord] = {}
    by_mail: dict[str, HrRecord] = {}
    for r in records:
        if r.employee_id:
            by_id[r.employee_id.lower()] = r
        if r.email:
            by_mail[r.email] = r
    return by_id, by_mail
