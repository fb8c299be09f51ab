"""The latest graph of each tenant in Redis: a fingerprint index, item bodies and sync metadata.

Layout per tenant (`<prefix>:snap:<tenant>:...`):

- `gen`     the snapshot generation (int), bumped by every committed sync.
- `ver`     which `idx`/`body` pair is current: absent or 0 = the unversioned `idx` and `body`
            (data stored before versions existed), v > 0 = `idx:<v>` and `body:<v>`. A commit
            that writes or deletes many bodies builds the next version aside and switches `ver`
            in its transaction (monitor/snapshot/commit.py); readers read one version per read.
            `verseq` numbers those versions (INCR: an attempt never reuses another's keys);
            `aside` names the version being built (and expires with it), so the next commit
            can remove what a dead attempt left.
- `idx`     hash `p<n>` -> part n of the index `{scope: {_type: {_key: fingerprint}}}`: each
            part an orjson document of up to `index_part_keys` (25,000) keys, so the index is
            written and read a part at a time (a diff compares the stored index part by part)
            and a part is one bulk reply (no per-item parsing in redis-py). Rewritten whole by
            every commit that changes anything (empty scopes included: they stay "known").
            An index stored before parts existed (fields `0`, `1`, ...: 16 MB byte pieces of
            one document) is still read.
- `body`    hash `_key` -> the item as canonical JSON (orjson, sorted keys, `_rawData` kept),
            zlib-compressed (first byte `z`) from `compress_min_bytes` (default 256) up;
            None or 0 stores plain JSON. Both forms are read back.
            Only new and changed bodies are written; HMGET reads only the bodies a diff needs.
- `scopes`  orjson list of the scopes that were COMPLETE at least once (baseline detection).
- `guard`   orjson `{_type: consecutive syncs a large drop was held}`.
- `meta`    orjson of the last sync's metadata; `history` a bounded list of recent ones.

A fingerprint is 16 hex chars (blake2b-64 of the canonical JSON) for items without volatile
fields or `_rawData`; otherwise 32: the "significant" hash (volatile fields and `_rawData`
removed) followed by the full-body hash. The first 16 chars decide whether an item changed
(and is diffed field by field); the whole string decides whether its body must be rewritten.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, TypeVar

import orjson
import redis

from monitor.events.stream import entry_event, stream_key
from monitor.model.graph import Graph, Item, ScopeState, ScopeStatus

_T = TypeVar("_T")

Index = dict[str, dict[str, dict[str, str]]]  # scope -> _type -> _key -> fingerprint (hex)
# the same in memory while a sync builds it: each fingerprint as its digest (8 or 16 bytes, 41 or
# 49 bytes of memory rather than 65 or 81 for the hex); written as hex
Prints = dict[str, dict[str, dict[str, bytes]]]

HISTORY_LENGTH = 50
# zlib (level 1) for bodies of at least this many bytes: bench/diff.py measured ~30% less Redis
# memory per item (a machine-vulnerability pair: 475 -> 216 bytes) for ~10 us per written body.
DEFAULT_COMPRESS_MIN_BYTES = 256
INDEX_PART_KEYS = 25_000  # keys per index part: ~4 MB of JSON for machine-CVE pairs
BODY_BATCH = 5_000
BODY_BATCHES_PER_TRIP = 4  # HMGET batches sent per round trip by iter_bodies
_COMPRESSED = b"z"


class StoreError(Exception):
    """The stored snapshot cannot be read or written as expected."""


class StreamingTransaction:
    """MULTI/EXEC on one dedicated connection, queuing commands in chunks as they are built.

    WATCHed keys are set first; commands are sent in batches so the client never holds the
    whole transaction in memory. Nothing is applied until `execute()`; if the connection
    dies before EXEC (process killed), Redis discards the queued commands.
    """

    def __init__(
        self,
        client: redis.Redis,
        watch: Iterable[str],
        batch: int = 2_000,
        max_bytes: int = 8 << 20,
    ) -> None:
        self._pool = client.connection_pool
        self._conn: Any = self._pool.get_connection()
        self._buffer: list[tuple[Any, ...]] = []
        self._bytes = 0
        self._batch = batch
        self._max_bytes = max_bytes
        self._in_multi = False
        try:
            keys = list(watch)
            if keys:
                self._call("WATCH", *keys)
        except BaseException:
            self.close(broken=True)
            raise

    def _call(self, *args: Any) -> Any:
        self._conn.send_command(*args)
        return self._conn.read_response()

    def get(self, key: str) -> bytes | None:
        """A read before MULTI (on the watching connection)."""
        if self._in_multi:
            raise StoreError("reads are not possible inside MULTI")
        value: bytes | None = self._call("GET", key)
        return value

    def exists(self, key: str) -> bool:
        """EXISTS before MULTI (on the watching connection)."""
        if self._in_multi:
            raise StoreError("reads are not possible inside MULTI")
        return bool(self._call("EXISTS", key))

    def multi(self) -> None:
        self._call("MULTI")
        self._in_multi = True

    def queue(self, *args: Any, size: int | None = None) -> None:
        """Queue one command (sent with the next batch: by count or by about 8 MB).

        `size`: the bytes of its arguments when the caller knows them (saves a pass).
        """
        self._buffer.append(args)
        if size is None:
            size = sum(len(a) for a in args if isinstance(a, bytes | str))
        self._bytes += size
        if len(self._buffer) >= self._batch or self._bytes >= self._max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        buffer, self._buffer, self._bytes = self._buffer, [], 0
        for reply in _round_trip(self._conn, buffer):
            if isinstance(reply, Exception):
                raise reply
            if reply not in (b"QUEUED", "QUEUED"):
                raise StoreError(f"command not queued: {reply!r}")

    def execute(self) -> list[Any] | None:
        """EXEC: the replies, or None when a WATCHed key changed (nothing applied)."""
        self.flush()
        try:
            result: list[Any] | None = self._call("EXEC")
        finally:
            self._in_multi = False
        return result

    def close(self, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if broken or self._in_multi:
            conn.disconnect()  # drops MULTI state and WATCHes
        else:
            try:
                conn.send_command("UNWATCH")
                conn.read_response()
            except (redis.RedisError, OSError):
                conn.disconnect()
        self._pool.release(conn)

    def __enter__(self) -> StreamingTransaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(broken=exc_type is not None)


def send_batch(client: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send `commands` as one pipelined write (no MULTI) and return their replies.

    Packed like StreamingTransaction's queue (cheaper than redis-py's pipeline for commands
    with thousands of arguments); StoreError when Redis answers any of them with an error.
    """
    if not commands:
        return []
    pool = client.connection_pool
    conn: Any = pool.get_connection()
    try:
        replies = _round_trip(conn, commands)
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    errors = [r for r in replies if isinstance(r, Exception)]
    if errors:
        raise StoreError(f"Redis refused a batched write: {errors[0]}")
    return replies


BIG_ARGUMENT = 1 << 20  # sent as a piece of its own, not copied into its command's bytes


def _pack(args: tuple[Any, ...]) -> list[bytes]:
    """One command in RESP (what redis-py's packer does, without its per-argument overhead),
    as pieces to send in order: one, unless an argument of BIG_ARGUMENT bytes or more (an
    index part) goes as it is rather than being copied."""
    pieces: list[bytes] = []
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int | float):
            a = repr(a).encode()
        elif not isinstance(a, bytes | bytearray | memoryview):
            raise StoreError(f"cannot send a {type(a).__name__} to Redis")
        parts.append(b"$%d\r\n" % len(a))
        if len(a) >= BIG_ARGUMENT:
            pieces += (b"".join(parts), bytes(a) if not isinstance(a, bytes) else a)
            parts = []
        else:
            parts.append(a)
        parts.append(b"\r\n")
    pieces.append(b"".join(parts))
    return pieces


def _round_trip(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send `commands` packed on `conn` and read their replies (an error reply as its
    exception). Pieces are not joined across commands, nor around a big argument: an index
    part is not copied again."""
    conn.send_packed_command([piece for args in commands for piece in _pack(args)])
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
    return replies


def batched(items: Iterable[_T], n: int) -> Iterator[list[_T]]:
    """`items` in lists of up to `n` (itertools.batched from Python 3.12)."""
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


class SnapshotStore:
    """Read access to the stored snapshots, and the key names and encoders commits use."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        *,
        compress_min_bytes: int | None = DEFAULT_COMPRESS_MIN_BYTES,
        index_part_keys: int = INDEX_PART_KEYS,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.compress_min_bytes = compress_min_bytes
        self.index_part_keys = index_part_keys

    def __repr__(self) -> str:
        return f"SnapshotStore(prefix={self.prefix!r})"

    # -- key names ---------------------------------------------------------------------------
    def key(self, tenant: str, part: str) -> str:
        """`<prefix>:snap:<tenant>:<part>`."""
        return f"{self.prefix}:snap:{tenant}:{part}"

    def version(self, tenant: str) -> int:
        """The current body/index version (0: the unversioned `body` and `idx` keys)."""
        raw: Any = self.client.get(self.key(tenant, "ver"))
        return int(raw) if raw else 0

    def body_key(self, tenant: str, version: int | None = None) -> str:
        """The body hash of `version` (default: the current one, read from Redis)."""
        v = self.version(tenant) if version is None else version
        return self.key(tenant, f"body:{v}" if v else "body")

    def index_key(self, tenant: str, version: int | None = None) -> str:
        """The index hash of `version` (default: the current one, read from Redis)."""
        v = self.version(tenant) if version is None else version
        return self.key(tenant, f"idx:{v}" if v else "idx")

    def tenant_keys(self, tenant: str) -> list[str]:
        """The tenant's fixed snapshot keys and its current version's body and index."""
        parts = ("gen", "ver", "verseq", "aside", "idx", "body", "scopes", "guard", "meta")
        keys = [self.key(tenant, p) for p in (*parts, "history")]
        version = self.version(tenant)
        if version:
            keys += [self.body_key(tenant, version), self.index_key(tenant, version)]
        return keys

    def versioned_keys(self, tenant: str) -> list[str]:
        """Every `body:<v>` and `idx:<v>` key of the tenant (SCAN: current, retired, aside)."""
        found: list[str] = []
        for part in ("body", "idx"):
            pattern = _glob_escape(self.key(tenant, part)) + ":*"
            for k in self.client.scan_iter(match=pattern, count=1000):
                found.append(k.decode() if isinstance(k, bytes) else str(k))
        return sorted(found)

    # -- bodies ------------------------------------------------------------------------------
    def encode_body(self, body_json: bytes) -> bytes:
        """Stored form of a canonical JSON body (zlib when long enough and configured)."""
        if self.compress_min_bytes and len(body_json) >= self.compress_min_bytes:
            return _COMPRESSED + zlib.compress(body_json, 1)
        # a copy: orjson's output keeps a 4 KB allocation whatever its length, and a baseline
        # holds every body until the commit
        return memoryview(body_json).tobytes()

    @staticmethod
    def decode_body(raw: bytes) -> Item:
        if raw[:1] == _COMPRESSED:
            raw = zlib.decompress(raw[1:])
        item: Item = orjson.loads(raw)
        return item

    def load_bodies(self, tenant: str, keys: Iterable[str]) -> dict[str, Item]:
        """Stored bodies of `keys` (missing ones are left out), read with batched HMGET."""
        return dict(self.iter_bodies(tenant, keys))

    def iter_bodies(self, tenant: str, keys: Iterable[str]) -> Iterator[tuple[str, Item]]:
        """(key, stored body) of `keys` (missing ones left out), a few HMGET batches per round
        trip: the stored bytes of only those batches are held at once (a caller keeping a few
        fields of 300,000 bodies never holds them all)."""
        wanted = list(dict.fromkeys(keys))
        hkey = self.body_key(tenant)
        for trip in batched(batched(wanted, BODY_BATCH), BODY_BATCHES_PER_TRIP):
            pipe = self.client.pipeline(transaction=False)
            for batch in trip:
                pipe.hmget(hkey, batch)
            for batch, values in zip(trip, pipe.execute(), strict=True):
                for k, raw in zip(batch, values, strict=True):
                    if raw is not None:
                        yield k, self.decode_body(raw)

    # -- index -------------------------------------------------------------------------------
    def load_index(self, tenant: str, version: int | None = None) -> Index | None:
        """`{scope: {_type: {_key: fingerprint}}}` of `version` (default: the current one), or
        None when there is no snapshot."""
        parts = self.index_parts(tenant, version)
        if parts is None:
            return None
        index: Index = {}
        for part in parts:
            for scope, types in part.items():
                into = index.setdefault(scope, {})
                for typ, items in types.items():
                    into.setdefault(typ, {}).update(items)
        return index

    def index_parts(self, tenant: str, version: int | None = None) -> Iterator[Index] | None:
        """The stored index of `version` (default: the current one) as a sequence of partial
        indexes, each read and parsed when reached (the index of a big tenant is never held
        whole as JSON); None when there is no snapshot.

        Parts are fields `p0`, `p1`, ... of the `idx` hash; an index written before parts
        existed (fields `0`, `1`, ...: byte pieces of one document) comes as one part."""
        hkey = self.index_key(tenant, version)
        names: Any = self.client.hkeys(hkey)
        fields = sorted(
            (f.decode() if isinstance(f, bytes) else str(f) for f in names),
            key=lambda f: (f[:1] == "p", int(f.lstrip("p") or 0)),
        )
        if not fields:
            return None
        return self._read_parts(tenant, hkey, fields)

    def _read_parts(self, tenant: str, hkey: str, fields: list[str]) -> Iterator[Index]:
        try:
            if not fields[0].startswith("p"):  # legacy: byte pieces of one document
                values: Any = self.client.hmget(hkey, fields)
                yield orjson.loads(b"".join(values))
                return
            for name in fields:
                raw: Any = self.client.hget(hkey, name)
                if raw is None:
                    raise StoreError(f"tenant {tenant!r}: index part {name} vanished while read")
                part: Index = orjson.loads(raw)
                del raw
                yield part
        except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
            raise StoreError(f"tenant {tenant!r}: stored index is unreadable: {exc}") from None

    def load_versioned_index(self, tenant: str, attempts: int = 3) -> tuple[int, Index | None]:
        """(version, its index): one consistent pair to read the bodies of that version with.

        Retried when the version moved on between reading its number and its index (a retired
        version's keys expire after a grace period; readers within it need no retry)."""
        version = self.version(tenant)
        for _ in range(attempts):
            index = self.load_index(tenant, version)
            now = self.version(tenant)
            if index is not None or now == version:
                return version, index
            version = now
        return version, self.load_index(tenant, version)

    def scan_bodies(self, tenant: str, version: int) -> Iterator[tuple[str, bytes]]:
        """(`_key`, stored body) of every body of `version`, HSCAN in batches."""
        hkey = self.body_key(tenant, version)
        cursor = 0
        while True:
            cursor, part = self.client.hscan(hkey, cursor, count=BODY_BATCH)  # type: ignore[misc]
            for raw_key, raw in part.items():
                yield raw_key.decode(), raw
            if cursor == 0:
                break

    def dump_index_parts(self, index: Prints) -> Iterator[tuple[str, bytes]]:
        """The index as (field, JSON) parts of at most `index_part_keys` keys each, made one at
        a time, prints in hex; every scope (empty ones too) is in some part."""
        step = self.index_part_keys
        part: Index = {}
        n_keys = 0
        n = 0
        for scope, types in index.items():
            into = part.setdefault(scope, {})
            for typ, items in types.items():
                if not items:
                    into[typ] = {}
                it = iter(items.items())
                while True:
                    piece = {k: fp.hex() for k, fp in islice(it, step - n_keys)}
                    if not piece:
                        break
                    into[typ] = piece
                    n_keys += len(piece)
                    if n_keys >= step:
                        yield f"p{n}", orjson.dumps(part)
                        n, part, n_keys = n + 1, {scope: {}}, 0
                        into = part[scope]
        if part or n == 0:
            yield f"p{n}", orjson.dumps(part)

    # -- small keys --------------------------------------------------------------------------
    def generation(self, tenant: str) -> int:
        """The current snapshot generation (0: none yet)."""
        raw: Any = self.client.get(self.key(tenant, "gen"))
        return int(raw) if raw else 0

    def last_event_generation(self, tenant: str) -> int:
        """The generation carried by the tenant's newest stored event (0: none)."""
        last: Any = self.client.xrevrange(stream_key(self.prefix, tenant), count=1)
        if not last:
            return 0
        try:
            event = entry_event(last[0][1]) or {}
            return int(event.get("data", {}).get("generation") or 0)
        except (ValueError, TypeError, AttributeError):
            return 0

    def known_scopes(self, tenant: str) -> set[str]:
        """Scopes that were fetched completely at least once."""
        raw: Any = self.client.get(self.key(tenant, "scopes"))
        return set(orjson.loads(raw)) if raw else set()

    def guard_counts(self, tenant: str) -> dict[str, int]:
        """`_type` -> consecutive syncs whose large drop of that type was held."""
        raw: Any = self.client.get(self.key(tenant, "guard"))
        data: dict[str, int] = orjson.loads(raw) if raw else {}
        return data

    def meta(self, tenant: str) -> dict[str, Any] | None:
        """The last sync's metadata (status, times, per-scope status, requests), or None."""
        raw: Any = self.client.get(self.key(tenant, "meta"))
        if not raw:
            return None
        data: dict[str, Any] = orjson.loads(raw)
        return data

    def history(self, tenant: str, limit: int = HISTORY_LENGTH) -> list[dict[str, Any]]:
        """Metadata of recent syncs, newest first."""
        raw: Any = self.client.lrange(self.key(tenant, "history"), 0, max(0, limit - 1))
        return [orjson.loads(r) for r in raw]

    def tenants(self) -> list[str]:
        """Tenants that have sync metadata stored."""
        found = set()
        pat = f"{self.prefix}:snap:*:meta"
        for k in self.client.scan_iter(match=pat, count=1000):
            name = k.decode() if isinstance(k, bytes) else str(k)
            found.add(name[len(self.prefix) + len(":snap:") : -len(":meta")])
        return sorted(found)

    # -- whole graph -------------------------------------------------------------------------
    def load_graph(self, tenant: str) -> Graph | None:
        """The stored snapshot as a Graph (scope statuses from the last sync's metadata)."""
        version, index = self.load_versioned_index(tenant)
        if index is None:
            return None
        graph = Graph()
        meta = self.meta(tenant) or {}
        for scope, status in (meta.get("scopes") or {}).items():
            graph.scopes[scope] = ScopeStatus(
                ScopeState(status["state"]), status.get("count", 0), status.get("error")
            )
        scope_of: dict[str, str] = {}
        for scope, types in index.items():
            graph.scopes.setdefault(scope, ScopeStatus(ScopeState.COMPLETE))
            for items in types.values():
                for k in items:
                    scope_of[k] = scope
        for k, raw in self.scan_bodies(tenant, version):
            if k not in scope_of:
                continue
            item = self.decode_body(raw)
            if "_fromEntityKey" in item or "_mapping" in item:
                graph.add_relationship(item, scope_of[k])
            else:
                graph.add_entity(item, scope_of[k])
        for scope, status in graph.scopes.items():
            if status.count == 0:
                status.count = sum(len(v) for v in index.get(scope, {}).values())
        return graph

    def drop(self, tenant: str) -> None:
        """Remove the tenant's snapshot (every version), metadata and guard state (not its
        events); UNLINK, so a large snapshot is freed in the background."""
        keys = set(self.tenant_keys(tenant)) | set(self.versioned_keys(tenant))
        self.client.unlink(*sorted(keys))


def _glob_escape(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
