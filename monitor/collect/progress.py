"""Progress reporting from collectors to whoever displays it (CLI, logs, metrics)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int | None) -> None: ...


def no_progress(stage: str, done: int, total: int | None) -> None:
    """Discard progress."""
