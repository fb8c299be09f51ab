"""`_rawData` held as its canonical JSON while a graph is in memory, kept on disk.

An entity's `_rawData` is the whole source object: for a machine about three quarters of its
dict's memory. A sync never reads it (the diff leaves it out, events drop it, query rules cannot
ask for it), it only fingerprints it and writes it to the snapshot. It is held as the bytes it
is written as - orjson, sorted keys, what the snapshot stores - and those bytes are kept in a
spill file (an unlinked temporary file, in the page cache rather than the process's memory) of
which a RawData holds only the place: a 100,000-machine tenant's 300 MB of raw JSON cost its
sync about 30 MB of process memory. Writing or fingerprinting the entity inlines the bytes
read back from the file; when the file cannot be written (full disk), the bytes stay in memory.

`canonical_json` writes an item with it (orjson, through `json_default`); `export_value` turns
an item into plain JSON values for other serialisers.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import orjson

_SORT = orjson.OPT_SORT_KEYS
SPILL_MIN_BYTES = 64  # smaller raw JSON stays in memory: its place costs about as much
SPILL_FILE_BYTES = 1 << 30  # a new spill file past this (a dropped graph's bytes leave with it)
_SIZE_BITS = 32  # a spilled RawData's place: offset << 32 | size


class _Spill:
    """An append-only, already unlinked temporary file of raw JSON. Appends reserve their range
    under a lock and write outside it; reads are positional, so threads share it. The file is
    closed (and its space freed) when the last RawData in it is gone."""

    __slots__ = ("__weakref__", "_file", "_lock", "end", "fd")

    def __init__(self) -> None:
        # open as long as the spill lives: closed when the last RawData in it is gone
        self._file = tempfile.TemporaryFile(prefix="mde-monitor-raw-")  # noqa: SIM115
        self.fd = self._file.fileno()
        self._lock = threading.Lock()
        self.end = 0

    def put(self, data: bytes) -> int:
        """Append `data`; its place (offset << 32 | size). OSError when it cannot be written."""
        size = len(data)
        with self._lock:
            offset = self.end
            self.end += size
        written = os.pwrite(self.fd, data, offset)
        while written < size:  # a short write: the rest, at its own offset
            written += os.pwrite(self.fd, memoryview(data)[written:], offset + written)
        return offset << _SIZE_BITS | size

    def get(self, place: int) -> bytes:
        offset, size = place >> _SIZE_BITS, place & ((1 << _SIZE_BITS) - 1)
        data = os.pread(self.fd, size, offset)
        while len(data) < size:  # a short read: the rest
            more = os.pread(self.fd, size - len(data), offset + len(data))
            if not more:
                raise OSError(f"raw data spill file ends at {offset + len(data)}, short of {size}")
            data += more
        return data


_current: weakref.ref[_Spill] | None = None
_current_lock = threading.Lock()


def _after_fork() -> None:
    """A forked child starts its own spill file (and a lock no parent thread can hold)."""
    global _current, _current_lock
    _current, _current_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _spill_for(size: int) -> _Spill | None:
    """The spill file new raw JSON goes to (a new one past SPILL_FILE_BYTES, or once the last
    one was dropped); None when no temporary file can be made."""
    global _current
    with _current_lock:
        spill = _current() if _current is not None else None
        if spill is None or spill.end + size > SPILL_FILE_BYTES:
            try:
                spill = _Spill()
            except OSError:
                return None
            _current = weakref.ref(spill)
        return spill


class RawData:
    """A `_rawData` value as canonical JSON (orjson, sorted keys). Reads decode it: indexing,
    iteration, `value`; it equals a RawData of the same JSON or the plain value it holds."""

    __slots__ = ("_at", "_spill")
    _at: bytes | int  # the JSON, or its place in `_spill`
    _spill: _Spill | None

    def __init__(self, value: Any) -> None:
        self._put(orjson.dumps(value, option=_SORT))

    def _put(self, data: bytes) -> None:
        spill = _spill_for(len(data)) if len(data) >= SPILL_MIN_BYTES else None
        if spill is not None:
            try:
                self._at = spill.put(data)
                self._spill = spill
                return
            except OSError:  # e.g. a full disk: kept in memory
                pass
        # copied: orjson's bytes keep the whole buffer it wrote into (4 KiB or more each)
        self._at = memoryview(data).tobytes()
        self._spill = None

    @classmethod
    def default(cls, source: Any) -> RawData:
        """`[{"name": "default", "rawData": source}]`, as every converter writes it."""
        return cls([{"name": "default", "rawData": source}])

    @classmethod
    def of_json(cls, data: bytes) -> RawData:
        """A RawData of canonical JSON already made."""
        raw = cls.__new__(cls)
        raw._put(data)
        return raw

    @property
    def json(self) -> bytes:
        """The canonical JSON (read back from the spill file when it is there)."""
        at = self._at
        if self._spill is None:
            assert isinstance(at, bytes)
            return at
        assert isinstance(at, int)
        return self._spill.get(at)

    @property
    def value(self) -> Any:
        """The value, decoded (a new object every time)."""
        return orjson.loads(self.json)

    def __getitem__(self, index: Any) -> Any:
        return self.value[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RawData):
            return self.json == other.json
        return bool(self.value == other)

    __hash__ = None  # type: ignore[assignment]  # like the list it stands for

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its JSON (the spill file is this process's)."""
        return (RawData.of_json, (self.json,))

    def __repr__(self) -> str:
        at = self._at
        size = len(at) if isinstance(at, bytes) else at & ((1 << _SIZE_BITS) - 1)
        return f"RawData({size} bytes)"


def canonical_json(value: Any) -> bytes:
    """The canonical JSON of an item (orjson, sorted keys; a RawData inlined as it is): what
    the snapshot stores and fingerprints."""
    return orjson.dumps(value, option=_SORT, default=json_default)


def json_default(obj: Any) -> Any:
    """orjson's `default=`: a RawData is written as its JSON, as is."""
    if isinstance(obj, RawData):
        return orjson.Fragment(obj.json)
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


def export_value(item: dict[str, Any]) -> dict[str, Any]:
    """`item` with a RawData `_rawData` decoded (the item itself when there is none)."""
    raw = item.get("_rawData")
    if isinstance(raw, RawData):
        return {**item, "_rawData": raw.value}
    return item
