"""Durations in one grammar for every place a person writes one (rule files, CLI options,
the config): `30s`, `5m`, `4h`, `1d`, `1h30m`, `250ms`, or a plain number of seconds."""

from __future__ import annotations

import re
from typing import Any

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any) -> float:
    """Seconds from `30s`, `5m`, `4h`, `1d`, `1h30m`, `250ms`, or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return float(text)
        if text and re.fullmatch(rf"(?:{_DURATION_PART.pattern})+", text):
            return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 4h, 1d, 1h30m)")


def format_duration(seconds: float) -> str:
    """`4h`, `90s`, `1h30m`: the short form of a number of seconds."""
    if seconds < 1 and seconds:
        return f"{round(seconds * 1000)}ms"
    out, rest = "", round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out or "0s"
