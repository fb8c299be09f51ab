"""Progress reporting from collectors to whoever displays it (CLI, logs, metrics)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

WaitListener = Callable[[str, float, str], None]
_listeners: list[WaitListener] = []
_listeners_lock = threading.Lock()


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int | None) -> None: ...


def no_progress(stage: str, done: int, total: int | None) -> None:
    """Discard progress."""


def wait_message(endpoint: str, seconds: float, limit: str) -> str:
    """`waiting 38 s for /logonusers: 100/min`."""
    path = endpoint.split(":", 1)[-1]
    return f"waiting {seconds:.0f} s for {path}: {limit}"


def on_budget_wait(listener: WaitListener) -> Callable[[], None]:
    """Call `listener(endpoint, seconds, limit)` whenever a sync waits for Microsoft's rate limits;
    returns the function that removes it."""
    with _listeners_lock:
        _listeners.append(listener)

    def remove() -> None:
        with _listeners_lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return remove


def announce_wait(endpoint: str, seconds: float, limit: str) -> None:
    """A collector is about to wait `seconds` for the endpoint's documented limit: log it and
    tell the listeners (the CLI's progress display)."""
    log.info(wait_message(endpoint, seconds, limit), extra={"endpoint": endpoint})
    with _listeners_lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(endpoint, seconds, limit)


def throttled(emit: Progress, every_s: float) -> Progress:
    """`emit` each stage at most every `every_s` seconds, and always when a stage completes
    (for logs and pipes, where every update would be a line)."""
    last: dict[str, float] = {}

    def report(stage: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        if stage in last and now - last[stage] < every_s and not finished:
            return
        last[stage] = now
        emit(stage, done, total)

    return report
