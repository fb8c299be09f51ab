"""`_rawData` held as its canonical JSON while a graph is in memory.

An entity's `_rawData` is the whole source object: for a machine about three quarters of its
dict's memory. A sync never reads it (the diff leaves it out, events drop it, query rules cannot
ask for it), it only writes it to the snapshot. Held as the bytes it is written as - orjson,
sorted keys, what the snapshot stores - it costs a third, and writing or fingerprinting the
entity inlines those bytes instead of walking the nested dicts again.

`canonical_json` writes an item with it (orjson, through `json_default`); `export_value` turns
an item into plain JSON values for other serialisers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

_SORT = orjson.OPT_SORT_KEYS


class RawData:
    """A `_rawData` value as canonical JSON (orjson, sorted keys). Reads decode it: indexing,
    iteration, `value`; it equals a RawData of the same JSON or the plain value it holds."""

    __slots__ = ("json",)

    def __init__(self, value: Any) -> None:
        # copied: orjson's bytes keep the whole buffer it wrote into (4 KiB or more each)
        self.json: bytes = memoryview(orjson.dumps(value, option=_SORT)).tobytes()

    @classmethod
    def default(cls, source: Any) -> RawData:
        """`[{"name": "default", "rawData": source}]`, as every converter writes it."""
        return cls([{"name": "default", "rawData": source}])

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

    def __repr__(self) -> str:
        return f"RawData({len(self.json)} bytes)"


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
