"""Memory helpers for the big in-process graphs."""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# glibc's mallopt parameter and the threshold it is pinned at. Not glibc's starting 128 KiB: the
# commit's many 128 KiB - 1 MiB buffers, each mapped and unmapped, made it 1.5 - 4x slower.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1024 * 1024


def pin_mmap_threshold() -> bool:
    """Keep glibc's malloc from growing its mmap threshold; True when it was set.

    glibc raises the threshold to the size of each large block freed (up to 32 MiB), after
    which the API pages a sync reads and drops (several MB each) come from the heap between
    the graph's long-lived objects, and their freed space stays in RSS. Pinned at 1 MiB, such a
    block is mapped and unmapped on its own: a sync's peak RSS drops by about 8%
    (bench/sync_memory.py) and diff-and-commit keeps its speed (bench/diff.py). Nothing is done
    on other C libraries (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


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
