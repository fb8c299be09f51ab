"""The HTTP layer shared by the Graph and Defender clients: auth, budgets, retries, paging, counts."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from httpx import USE_CLIENT_DEFAULT

from monitor import __version__
from monitor.collect.budget import Budget
from monitor.collect.errors import (
    FEATURE_DISABLED_CODES,
    ApiError,
    FeatureDisabled,
    NotFound,
    PageError,
    PermissionMissing,
    Throttled,
)
from monitor.config import HttpSettings, Settings, origin

if TYPE_CHECKING:  # monitor.auth imports parse_retry_after from here
    from monitor.auth import TokenProvider

Json = dict[str, Any]

log = logging.getLogger(__name__)


def build_http_client(settings: Settings) -> httpx.Client:
    """One httpx client for sign-in and APIs: system CAs plus `ca_bundle`, timeouts, proxy."""
    ctx = ssl.create_default_context()
    if settings.ca_bundle is not None:
        ctx.load_verify_locations(cafile=str(settings.ca_bundle))
    return httpx.Client(
        verify=ctx,
        timeout=httpx.Timeout(settings.http.timeout_seconds),
        proxy=settings.http.proxy,
        trust_env=False,  # proxies and CAs come from our config only
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        headers={"User-Agent": f"mde-monitor/{__version__}"},
    )


@dataclass
class RequestStats:
    """What one sync asked of Microsoft, per endpoint key (e.g. `defender:/api/machines`)."""

    requests: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    throttled: Counter[str] = field(default_factory=Counter)  # 429 answers
    budget_wait_seconds: float = 0.0  # summed over threads
    _waits: list[tuple[float, float]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, counter: Counter[str], endpoint: str) -> None:
        with self._lock:
            counter[endpoint] += 1

    def add_budget_wait(self, seconds: float) -> None:
        """One thread waited `seconds`, ending now."""
        end = time.monotonic()
        with self._lock:
            self.budget_wait_seconds += seconds
            self._waits.append((end - seconds, end))

    @property
    def budget_wait_wall_seconds(self) -> float:
        """Wall-clock time during which at least one thread waited (overlaps counted once)."""
        with self._lock:
            spans = sorted(self._waits)
        total, cur_start, cur_end = 0.0, None, 0.0
        for start, end in spans:
            if cur_start is None or start > cur_end:
                if cur_start is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        if cur_start is not None:
            total += cur_end - cur_start
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(sorted(self.requests.items())),
            "requests_total": sum(self.requests.values()),
            "retries": dict(sorted(self.retries.items())),
            "retries_total": sum(self.retries.values()),
            "throttled": dict(sorted(self.throttled.items())),
            "throttled_total": sum(self.throttled.values()),
            "budget_wait_seconds": round(self.budget_wait_wall_seconds, 3),  # wall clock
            "budget_wait_thread_seconds": round(self.budget_wait_seconds, 3),
        }


@dataclass(frozen=True)
class _Request:
    method: str
    url: str
    params: dict[str, str | int] | None
    body: Json | None
    timeout: float | None  # None: the client's configured timeout


class _Retry(Exception):
    def __init__(self, error: ApiError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def parse_retry_after(resp: httpx.Response) -> float | None:
    """Seconds to wait per the answer's Retry-After (delta-seconds or HTTP-date); None if absent
    or unreadable."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class ErrorBody:
    """Microsoft's `{"error": {...}}` (Graph and Defender share the shape), `json` False when
    the body was not JSON at all."""

    code: str | None
    message: str
    support: str | None  # Defender `target`, Graph `innerError` request-id and date
    json: bool = True


def _error_body(resp: httpx.Response) -> ErrorBody:
    try:
        body = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return ErrorBody(None, resp.reason_phrase or "error", None, json=False)
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        support: list[str] = []
        target = err.get("target")
        if isinstance(target, str) and target:
            support.append(f"target {target[:100]}")
        inner = err.get("innerError") or err.get("innererror")
        if isinstance(inner, dict):
            for key in ("request-id", "date"):
                value = inner.get(key)
                if isinstance(value, str) and value:
                    support.append(f"{key} {value[:100]}")
        code = err.get("code")
        return ErrorBody(
            code if isinstance(code, str) else None,
            str(err.get("message") or "")[:300],
            ", ".join(support) or None,
        )
    if isinstance(err, str):
        return ErrorBody(err, str(body.get("error_description") or "")[:300], None)
    return ErrorBody(None, resp.reason_phrase or "error", None)


# A 404 with one of these codes (or with no JSON body) on a list's first page means "no items"
# (Defender answers so when a tenant has no recently seen machines).
EMPTY_LIST_CODES = frozenset({"NotFound", "ResourceNotFound"})


class ApiClient:
    """GETs JSON from one API (Graph or Defender) with its token, budget, retries and counts."""

    def __init__(
        self,
        name: str,
        base_url: str,
        scope: str,
        tokens: TokenProvider,
        http: httpx.Client,
        settings: HttpSettings,
        budget: Budget,
        stats: RequestStats,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.scope = scope
        self._origin = origin(self.base_url)
        self._tokens = tokens
        self._http = http
        self._settings = settings
        self._budget = budget
        self.stats = stats
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"ApiClient({self.name!r}, {self.base_url!r})"

    @property
    def timeout_seconds(self) -> float:
        """The configured per-request timeout."""
        return self._settings.timeout_seconds

    def get_json(
        self,
        endpoint: str,
        url: str,
        params: dict[str, str | int] | None = None,
        *,
        permission: str,
        empty_on_not_found: bool = False,
        wait_on_throttle: bool = True,
    ) -> Json:
        """GET `url` (absolute or relative to the base) and return the JSON object.

        Retries 429 (honouring Retry-After, which also holds the shared budget), 5xx, timeouts,
        connection errors and unparsable bodies with capped exponential backoff and jitter,
        within `max_attempts` and `max_retry_seconds`; a 401 refreshes the token once. 403
        raises FeatureDisabled (DisabledFeature / DisallowedOperation) or PermissionMissing;
        404 raises NotFound, unless `empty_on_not_found` and the answer carries NotFound,
        ResourceNotFound or no JSON body (then an empty list). With `wait_on_throttle` False a
        429 raises Throttled at once (per-machine loops stop their batch instead of waiting).
        """
        return self._request_json(
            "GET",
            endpoint,
            url,
            params,
            None,
            permission=permission,
            empty_on_not_found=empty_on_not_found,
            wait_on_throttle=wait_on_throttle,
            timeout=None,
        )

    def post_json(
        self,
        endpoint: str,
        url: str,
        body: Json,
        *,
        permission: str,
        timeout: float | None = None,
    ) -> Json:
        """POST a JSON body to a read-only endpoint (a query) and return the JSON object.

        Retried like `get_json` (the call changes nothing, so sending it again is safe);
        `timeout` (seconds) replaces the configured per-request timeout for slow queries.
        """
        return self._request_json(
            "POST",
            endpoint,
            url,
            None,
            body,
            permission=permission,
            empty_on_not_found=False,
            wait_on_throttle=True,
            timeout=timeout,
        )

    def _request_json(
        self,
        method: str,
        endpoint: str,
        url: str,
        params: dict[str, str | int] | None,
        body: Json | None,
        *,
        permission: str,
        empty_on_not_found: bool,
        wait_on_throttle: bool,
        timeout: float | None,
    ) -> Json:
        if not url.startswith("http"):
            url = f"{self.base_url}{url}"
        if origin(url) != self._origin:  # never send our token to another host
            raise ApiError(endpoint, f"refusing to follow a link to another host ({origin(url)})")
        s = self._settings
        deadline = time.monotonic() + s.max_retry_seconds
        attempt = 0
        refreshed_token = False
        request = _Request(method, url, params, body, timeout)
        while True:
            attempt += 1
            try:
                return self._attempt(endpoint, request, permission, empty_on_not_found, deadline)
            except _TokenRejected as rejected:
                if refreshed_token:
                    raise rejected.error from None
                refreshed_token = True
                self._tokens.invalidate(self.scope)
                attempt -= 1
                continue
            except _Retry as r:
                err = r.error
                if err.status == 429 and not wait_on_throttle:
                    raise Throttled(
                        endpoint,
                        err.detail,
                        retry_after=r.retry_after,
                        code=err.code,
                        support=err.support,
                    ) from None
                remaining = deadline - time.monotonic()
                wait = r.retry_after if r.retry_after is not None else s.backoff(attempt)
                if attempt >= s.max_attempts or wait > remaining:
                    raise ApiError(
                        endpoint,
                        f"gave up after {attempt} attempt(s): {err.args[0]}",
                        status=err.status,
                        code=err.code,
                        retryable=True,
                    ) from None
                self.stats.count(self.stats.retries, endpoint)
                self._sleep(wait)

    def _attempt(
        self,
        endpoint: str,
        request: _Request,
        permission: str,
        empty_on_not_found: bool,
        deadline: float,
    ) -> Json:
        # BudgetExhausted propagates: the caller decides (logon users: skip the rest this sync)
        waited = self._budget.acquire(endpoint, max_wait=max(0.0, deadline - time.monotonic()))
        if waited:
            self.stats.add_budget_wait(waited)
        token = self._tokens.token(self.scope)  # AuthError (naming the scope) propagates
        self.stats.count(self.stats.requests, endpoint)
        try:
            resp = self._http.request(
                request.method,
                request.url,
                params=request.params,
                json=request.body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=request.timeout if request.timeout is not None else USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException as exc:
            raise _Retry(ApiError(endpoint, f"timed out ({type(exc).__name__})")) from None
        except httpx.TransportError as exc:
            raise _Retry(ApiError(endpoint, f"connection failed ({type(exc).__name__})")) from None
        status = resp.status_code
        if status == 200:
            try:
                body = orjson.loads(resp.content)
            except orjson.JSONDecodeError:
                raise _Retry(
                    PageError(endpoint, "malformed JSON in the response", status=200)
                ) from None
            if not isinstance(body, dict):
                raise _Retry(PageError(endpoint, "response is not a JSON object", status=200))
            return body
        err = _error_body(resp)
        code, message, support = err.code, err.message, err.support
        if status >= 400:
            log.info(
                "api error",
                extra={
                    "endpoint": endpoint,
                    "status": status,
                    "code": code,
                    "support": support,
                    "error": message,
                },
            )
        if status == 401:
            raise _TokenRejected(
                ApiError(
                    endpoint, f"token rejected: {message}", status=401, code=code, support=support
                )
            )
        if status == 403:
            if code in FEATURE_DISABLED_CODES:
                raise FeatureDisabled(endpoint, message, code=code, support=support)
            raise PermissionMissing(endpoint, permission, code=code, support=support)
        if status == 404:
            if empty_on_not_found and (not err.json or code in EMPTY_LIST_CODES):
                return {"value": []}
            raise NotFound(endpoint, message, status=404, code=code, support=support)
        if status == 429:
            self.stats.count(self.stats.throttled, endpoint)
            retry_after = parse_retry_after(resp)
            if retry_after is not None:
                self._budget.block(endpoint, retry_after)  # every worker of this tenant waits
            raise _Retry(
                ApiError(endpoint, f"throttled: {message}", status=429, code=code, support=support),
                retry_after,
            )
        if status >= 500 or status == 408:
            raise _Retry(
                ApiError(endpoint, message, status=status, code=code, support=support),
                parse_retry_after(resp),
            )
        raise ApiError(endpoint, message, status=status, code=code, support=support)

    def iter_next_link_pages(
        self, endpoint: str, path: str, params: dict[str, str | int], *, permission: str
    ) -> Iterator[list[Json]]:
        """Graph paging: follow `@odata.nextLink` until absent (pages may be shorter than $top).

        When the first page carries `@odata.count`, a list that ends with fewer items is an
        error (PageError) instead of a complete list.
        """
        url: str | None = path
        page_params: dict[str, str | int] | None = params
        expected: int | None = None
        fetched = 0
        while url:
            body = self.get_json(endpoint, url, page_params, permission=permission)
            items = page_value(endpoint, body)
            count = body.get("@odata.count")
            if expected is None and isinstance(count, int) and not isinstance(count, bool):
                expected = count
            fetched += len(items)
            url = body.get("@odata.nextLink")
            if not url and expected is not None and fetched < expected:
                raise PageError(
                    endpoint,
                    f"short list: {fetched} items of @odata.count {expected} and no nextLink",
                    status=200,
                )
            yield items
            page_params = None  # the link carries them

    def iter_skip_pages(
        self,
        endpoint: str,
        path: str,
        top: int,
        *,
        permission: str,
        params: dict[str, str | int] | None = None,
        empty_on_not_found: bool = False,
    ) -> Iterator[list[Json]]:
        """Defender paging: `$top`/`$skip`, and `@odata.nextLink` whenever the server sends one.

        A same-host nextLink is always followed (a link to another host is an error). Without
        one, a full page asks for the next `$skip`; a short page ends the list when the server
        has been paging with links, when `@odata.count` confirms it, or else when a confirming
        request for the next `$skip` comes back empty (a server that answers fewer items than
        `$top` without a link must not look like the end of the list). With `@odata.count`, a
        list that ends short is an error.
        """
        fetched = 0
        next_link: str | None = None
        confirming = False
        links_seen = False
        expected: int | None = None
        while True:
            if next_link:
                body = self.get_json(endpoint, next_link, None, permission=permission)
            else:
                page_params: dict[str, str | int] = {
                    **(params or {}),
                    "$top": top,
                    "$skip": fetched,
                }
                body = self.get_json(
                    endpoint,
                    path,
                    page_params,
                    permission=permission,
                    # the first page, and the request confirming a short last page
                    empty_on_not_found=empty_on_not_found and (fetched == 0 or confirming),
                )
            items = page_value(endpoint, body)
            count = body.get("@odata.count")
            if isinstance(count, int) and not isinstance(count, bool):
                expected = count
            fetched += len(items)
            link = body.get("@odata.nextLink")
            next_link = link if isinstance(link, str) and link else None
            links_seen = links_seen or next_link is not None
            if items:
                yield items
            if next_link:
                confirming = False
                continue
            if not items or (expected is not None and fetched >= expected):
                if expected is not None and fetched < expected:
                    raise PageError(
                        endpoint,
                        f"short list: {fetched} items of @odata.count {expected}",
                        status=200,
                    )
                return
            if len(items) >= top:
                confirming = False
                continue
            if links_seen:  # a server that pages with links ends the list by leaving it out
                return
            # a short page without a link: ask for the next $skip to be sure the list ended
            confirming = True


class _TokenRejected(Exception):
    def __init__(self, error: ApiError) -> None:
        super().__init__(str(error))
        self.error = error


def page_value(endpoint: str, body: Json) -> list[Json]:
    value = body.get("value")
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PageError(endpoint, "page has no `value` list", status=200)
    return value
