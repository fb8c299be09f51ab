"""Logging: structured JSON lines (one per event, tenant and task ids attached), human on a TTY."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from monitor.redact import redact

LOG_FORMAT_ENV = "MDE_MONITOR_LOG_FORMAT"
LOG_FORMATS = ("json", "human")

log_context: ContextVar[dict[str, Any]] = ContextVar("log_context", default={})  # noqa: B039

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **log_context.get(),
        }
        for k, v in record.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                doc[k] = v
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, default=str))


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{k}={v}" for k, v in log_context.get().items())
        extra = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _RESERVED and not k.startswith("_")
        )
        base = f"{datetime.now().strftime('%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        tail = " ".join(x for x in (ctx, extra) if x)
        line = f"{base} [{tail}]" if tail else base
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger; `fmt` is "json", "human", or None: $MDE_MONITOR_LOG_FORMAT,
    else human on a TTY and JSON otherwise. ValueError for another format."""
    if fmt is None:
        fmt = os.environ.get(LOG_FORMAT_ENV) or ("human" if sys.stderr.isatty() else "json")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: use json or human (${LOG_FORMAT_ENV})")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "msal", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
