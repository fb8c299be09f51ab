"""Graph delta rounds, shared by groups and users: a round's pages, 410 resync, the Redis state.

A round starts from the stored delta link (only the changes since) or from the resource's delta
URL (a full read) and follows `@odata.nextLink` to the page that carries `@odata.deltaLink`.
A 410 (the token expired, `syncStateNotFound`) restarts with a full read into a fresh state, so
nothing the old state knew is taken as deleted; so does a stored link that points to another
endpoint than the tenant's Graph (it would never be followed).

The state (what the rounds so far said, with the delta link) is one compressed value per tenant,
saved only AFTER the snapshot commit, so a sync that dies re-reads the same changes next time.
The link has a key of its own: a round that brought no changes writes only the new link.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import orjson
import redis

from monitor.collect.errors import ApiError, PageError
from monitor.collect.graph_api import GraphClient
from monitor.collect.http import Json, page_value
from monitor.config import origin
from monitor.memory import gc_paused

log = logging.getLogger(__name__)

MAX_PAGES = 100_000  # a runaway link chain is an error, not an endless loop
USER_TYPE = "#microsoft.graph.user"  # @odata.type of a user (a group member, a manager)
STATE_VERSION = 1


def pack_state(doc: dict[str, Any]) -> bytes:
    """A delta state's document as stored: versioned, JSON, zlib level 1."""
    return zlib.compress(orjson.dumps({"v": STATE_VERSION, **doc}), 1)


def unpack_state(blob: bytes, what: str) -> dict[str, Any]:
    """The document `pack_state` stored; ValueError for another version (`what`: its name)."""
    doc = orjson.loads(zlib.decompress(blob))
    if not isinstance(doc, dict) or doc.get("v") != STATE_VERSION:
        raise ValueError(f"unknown {what} state version")
    return doc


class DeltaState(Protocol):
    delta_link: str | None
    changed: bool  # differs from what was saved (the link aside)

    def dumps(self) -> bytes: ...


S = TypeVar("S", bound=DeltaState)


class DeltaStateStore(Generic[S]):
    """One tenant's state of one delta resource in Redis (`{prefix}:{name}:{tenant}`)."""

    def __init__(
        self,
        client: redis.Redis | None,
        prefix: str,
        tenant: str,
        name: str,
        loads: Callable[[bytes], S],
    ) -> None:
        self._client = client
        self._name = name
        self._loads = loads
        self.key = f"{prefix}:{name}:{tenant}"
        self.link_key = f"{prefix}:{name}_link:{tenant}"  # newer than the state's own

    def load(self) -> S | None:
        """The saved state (None: none, or unreadable: then a full read)."""
        if self._client is None:
            return None
        blob, link = self._client.mget(self.key, self.link_key)  # type: ignore[misc]
        if blob is None:
            return None
        try:
            with gc_paused():  # many small dicts, no cycles: GC passes would only slow this
                state = self._loads(blob)
        except (ValueError, zlib.error, orjson.JSONDecodeError) as exc:
            log.warning(
                f"{self._name} state unreadable; doing a full read", extra={"error": str(exc)}
            )
            return None
        if link:
            state.delta_link = link.decode()
        return state

    def save(self, state: S) -> None:
        """Call after the snapshot commit: the link, and the state when it changed."""
        if self._client is None:
            return
        pipe = self._client.pipeline(transaction=True)
        if state.changed:
            pipe.set(self.key, state.dumps())
        pipe.set(self.link_key, state.delta_link or "")
        pipe.execute()
        state.changed = False


@dataclass(frozen=True)
class DeltaQuery:
    """Where a resource's rounds start: endpoint key, delta path, first request's parameters."""

    endpoint: str  # e.g. "graph:/users/delta"
    path: str  # e.g. "/v1.0/users/delta"
    params: dict[str, str | int]
    permission: str = "Directory.Read.All"


def delta_pages(graph: GraphClient, query: DeltaQuery, start: str | None) -> Iterator[Json]:
    """Response bodies of one round, from `start` (a delta link) or from the beginning."""
    url = start or query.path
    params: dict[str, str | int] | None = None if start else query.params
    for _ in range(MAX_PAGES):
        body = graph.api.get_json(query.endpoint, url, params, permission=query.permission)
        yield body
        if body.get("@odata.deltaLink"):
            return
        nxt = body.get("@odata.nextLink")
        if not isinstance(nxt, str) or not nxt:
            raise PageError(query.endpoint, "page has neither nextLink nor deltaLink", status=200)
        url, params = nxt, None
    raise PageError(query.endpoint, f"more than {MAX_PAGES} pages in one round", status=200)


def delta_round(
    graph: GraphClient,
    query: DeltaQuery,
    state: S,
    apply: Callable[[S, list[Json]], None],
    on_page: Callable[[S], None] = lambda _: None,
) -> S:
    """Fold one round's pages into `state` (`apply` per page); it ends with the new link."""
    for body in delta_pages(graph, query, state.delta_link):
        apply(state, page_value(query.endpoint, body))
        on_page(state)
        link = body.get("@odata.deltaLink")
        if isinstance(link, str) and link:
            state.delta_link = link
    return state


def read_delta(
    graph: GraphClient,
    query: DeltaQuery,
    previous: S | None,
    fresh: Callable[[], S],
    apply: Callable[[S, list[Json]], None],
    on_page: Callable[[S], None] = lambda _: None,
) -> tuple[S, bool]:
    """Bring `previous` (None: nothing stored) up to date: (state, whether a full read replaced
    it). Raises CollectError when a round fails; `previous` may then be half-updated: drop it."""
    what = query.endpoint.removeprefix("graph:")
    link = previous.delta_link if previous is not None else None
    if previous is not None and (not link or not _same_origin(link, graph.api.base_url)):
        log.info(f"{what}: stored delta link unusable for this endpoint; full read")
        return delta_round(graph, query, fresh(), apply, on_page), True
    try:
        return delta_round(graph, query, previous or fresh(), apply, on_page), False
    except ApiError as exc:
        if exc.status != 410 or previous is None:
            raise
        log.info(f"{what}: delta token expired (410); full read", extra={"code": exc.code})
        return delta_round(graph, query, fresh(), apply, on_page), True


def _same_origin(url: str, base: str) -> bool:
    try:
        return origin(url) == origin(base)
    except ValueError:
        return False
