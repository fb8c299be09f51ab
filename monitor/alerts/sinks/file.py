"""File sink: appends one JSON line per notification (with its events) for SIEM forwarders.

Each line is `{id, rule, description, severity, status, group_key, group_labels, tenant, title,
summary, total, events: [CloudEvents...]}` written with a single `write` on a file opened with
O_APPEND, so lines from several processes do not interleave. Rotation is left to logrotate
(`copytruncate`) or the forwarder.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from monitor.alerts.sinks.base import DeliveryError, Notification
from monitor.alerts.sinks.common import (
    SinkSettings,
    notification_document,
    pretty_json,
    to_json_line,
)


class FileSettings(SinkSettings):
    """`type: file` - a JSON lines file."""

    path: Path
    mkdir: bool = True
    fsync: bool = False
    mode: int = Field(default=0o640, ge=0, le=0o777)


class FileSink:
    """Appends notifications as JSON lines to `path`."""

    type = "file"

    def __init__(self, name: str, settings: FileSettings) -> None:
        self.name = name
        self.settings = settings
        self._where = f"file sink {name!r} ({settings.path})"

    def __repr__(self) -> str:
        return f"FileSink(name={self.name!r}, path={str(self.settings.path)!r})"

    def describe(self) -> str:
        return f"file {self.settings.path} (JSON lines)"

    def render(self, notification: Notification) -> str:
        """The JSON document `send` appends as one line, indented here for reading."""
        return pretty_json(notification_document(notification))

    def send(self, notification: Notification) -> None:
        """Append one line; OSError -> DeliveryError (permission errors are not retryable)."""
        line = to_json_line(notification_document(notification))
        path = self.settings.path
        try:
            if self.settings.mkdir:
                path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.settings.mode)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                if self.settings.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            raise DeliveryError(
                f"{self._where}: {type(exc).__name__}: {exc.strerror or exc}", retryable=False
            ) from None
        except OSError as exc:
            raise DeliveryError(
                f"{self._where}: {type(exc).__name__}: {exc.strerror or exc}", retryable=True
            ) from None

    def close(self) -> None:
        """Nothing kept open between sends."""
