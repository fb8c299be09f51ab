"""Memory helpers for the big in-process graphs."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC while millions of small objects are built or compared: they hold no
    cycles, and each full collection would walk every object of the loaded graphs."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class LongLived:
    """The cyclic GC kept off a long-lived heap (the query evaluator's graphs).

    A collection of the oldest generation walks every tracked object: about 0.2 s per GB of
    graphs, paid again whenever enough new objects pile up. Once `settle()` is called the
    process runs without automatic collections: every `collect_every` settles, what is new since
    the last one is collected and the survivors frozen (`gc.freeze`: later collections skip
    them; reference counting still frees them). Objects frozen while alive that later become
    cyclic garbage would stay, so every `thaw_every` settles everything is collected once."""

    def __init__(self, collect_every: int = 20, thaw_every: int = 500) -> None:
        self.collect_every = collect_every
        self.thaw_every = thaw_every
        self.settled = 0

    def settle(self) -> None:
        gc.disable()
        if self.settled % self.collect_every == 0:
            if self.settled % self.thaw_every == 0:
                gc.unfreeze()
            gc.collect()  # the frozen heap is not walked: only what is new since the last one
            gc.freeze()
        self.settled += 1
