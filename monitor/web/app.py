"""The console's ASGI app: server-rendered pages with JSON twins under /api/, operator actions
next to what they act on (Datasette's shape, Alertmanager's "silence this")."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import redis
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitor.alerts import portal
from monitor.alerts.deliver import DeliveryQueue
from monitor.alerts.dispatch import firing_key
from monitor.alerts.rules import RuleSet, build_sinks, load_rules, sink_rows
from monitor.alerts.silences import SilenceStore
from monitor.config import ConfigError, Settings, TenantConfig
from monitor.durations import parse_duration
from monitor.events.history import summarize_changes
from monitor.query import QueryError, run_query
from monitor.redis_conn import connect, mask_url
from monitor.snapshot.store import SnapshotStore
from monitor.status import collect_status, iso_to_ts, read_state, ts_to_iso
from monitor.web import oidc, plots
from monitor.web.data import ChangeFilter, EventIndex, GraphCache, changes_page, row
from monitor.web.live import Broadcaster, frame, sid_key, wanted
from monitor.web.security import COOKIE, LOCAL_USER, SECURITY_HEADERS, Guard, User, is_loopback

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
GRAPH_NODE_CAP = 150
JSON_DUMPS: Callable[[Any], str] = lambda data: json.dumps(data, default=str)  # noqa: E731


def q(value: Any) -> str:
    """URL-encode one path segment or query value (keys carry `|`, `:` and `/`)."""
    return quote(str(value), safe="")


def when(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(float(ts)))
    except (TypeError, ValueError):
        return str(ts or "")


def age(iso: Any) -> str:
    ts = iso_to_ts(iso)
    if ts is None:
        return "never"
    s = max(0, int(time.time() - ts))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit} ago"
    return f"{s}s ago"


@dataclass
class Ctx:
    """Who is asking, and the browser session the answer belongs to."""

    user: User | None
    sid: str | None
    new_sid: str | None = None  # set the cookie on the way out
    bearer: bool = False

    @property
    def cookie_sid(self) -> str | None:
        return self.new_sid or self.sid


class SecurityHeaders:
    """Adds the CSP and friends to every response (pure ASGI: streaming stays streaming)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in SECURITY_HEADERS.items():
                    if k.lower().encode() not in names:
                        headers.append((k.lower().encode(), v.encode()))
                if not scope["path"].startswith("/static/"):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_wrapper)


class Console:
    """State shared by the requests of one console process."""

    def __init__(self, settings: Settings, *, host: str = "127.0.0.1") -> None:
        self.settings = settings
        self.client: redis.Redis = connect(settings.redis_url)
        self.prefix = settings.redis_prefix
        self.guard = Guard(settings, self.client, host=host)
        self.store = SnapshotStore(self.client, self.prefix)
        self.graphs = GraphCache(self.client, self.prefix)
        self.index = EventIndex(self.client, self.prefix, settings.events.retention_days)
        self.broadcaster = Broadcaster(settings.redis_url, self.prefix)
        self.env = Environment(
            loader=FileSystemLoader(str(HERE / "templates")),
            autoescape=select_autoescape(("html", "svg", "xml")),
        )
        self.env.filters.update(q=q, when=when, age=age, summarize_changes=summarize_changes)
        self.env.globals.update(
            json_dumps=lambda v: json.dumps(v, indent=2, default=str, sort_keys=True),
            isinstance=isinstance,
            dict=dict,
            list=list,
        )

    # -- helpers ----------------------------------------------------------------------------
    def tenant_names(self) -> list[str]:
        names = [t.name for t in self.settings.tenants]
        return names or self.store.tenants()

    def tenant_config(self, name: str | None) -> TenantConfig | None:
        if not name:
            return None
        try:
            return self.settings.tenant(name)
        except ConfigError:
            return None

    def render(
        self, request: Request, ctx: Ctx, name: str, status: int = 200, **values: Any
    ) -> HTMLResponse:
        sid = ctx.cookie_sid
        csrf = self.guard.csrf_token(sid) if sid else ""
        html = self.env.get_template(name).render(
            request=request,
            user=ctx.user,
            csrf=csrf,
            auth_required=self.guard.auth_required,
            oidc=self.guard.oidc is not None,
            path=request.url.path,
            **values,
        )
        return HTMLResponse(html, status_code=status)


# ------------------------------------------------------------------------------ auth plumbing


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    if h[:7].lower() == "bearer ":
        return h[7:].strip()
    return None


def authenticate(console: Console, request: Request) -> tuple[Ctx, Response | None]:
    """The caller's identity; a 401 response for a bad bearer token."""
    token = _bearer(request)
    if token is not None:
        user = console.guard.check_token(token)
        if user is None:
            return Ctx(None, None, bearer=True), JSONResponse(
                {"error": "invalid bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="mde-monitor"'},
            )
        return Ctx(user, None, bearer=True), None
    sid = request.cookies.get(COOKIE)
    user = console.guard.session_user(sid)
    ctx = Ctx(user, sid)
    if not sid:
        ctx.new_sid = console.guard.new_sid()
    if user is None and not console.guard.auth_required:
        ctx.user = LOCAL_USER
    return ctx, None


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def set_cookie(request: Request, response: Response, sid: str) -> None:
    plain_local = request.url.scheme == "http" and is_loopback(request.url.hostname or "")
    response.set_cookie(
        COOKIE,
        sid,
        httponly=True,
        secure=not plain_local,
        samesite="lax",
        path="/",
    )


def _same_origin(request: Request, public_url: str | None = None) -> bool:
    """The request comes from one of our own pages (this origin, or web.public_url's when a
    TLS-terminating proxy sits in front)."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        referer = request.headers.get("referer")
        if not referer:
            return origin is None  # no Origin and no Referer: not a browser form post
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    own = {f"{request.url.scheme}://{request.url.netloc}"}
    if public_url:
        parts = urlsplit(public_url)
        own.add(f"{parts.scheme}://{parts.netloc}")
    return origin in own


async def _body(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "")
    raw = await request.body()
    if "application/json" in ctype:
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}
    parsed = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v if len(v) > 1 else v[0] for k, v in parsed.items()}


Handler = Callable[[Console, Request, Ctx, dict[str, Any]], Response]


async def _admit(
    console: Console, request: Request, role: str | None, write: bool, api: bool
) -> tuple[Ctx, dict[str, Any], Response | None]:
    """The one gate of every route: authenticate, check CSRF on writes, authorise `role`.
    Returns the caller, the form/JSON body of a write, and the refusal when there is one."""
    ctx, failed = authenticate(console, request)
    if failed is not None:
        return ctx, {}, failed
    data: dict[str, Any] = {}
    if write:
        data = await _body(request)
        if not ctx.bearer:
            token = request.headers.get("x-csrf-token") or data.get("csrf")
            if not _same_origin(request, console.settings.web.public_url) or not (
                console.guard.csrf_ok(ctx.sid, str(token) if token else None)
            ):
                resp: Response = _error(
                    console, request, ctx, 403, "CSRF check failed: reload the page"
                )
                return ctx, data, _finish(request, ctx, resp)
    if role is not None and ctx.user is None:
        if api:
            resp = JSONResponse({"error": "authentication required"}, status_code=401)
        else:
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            resp = RedirectResponse(f"/login?{urlencode({'next': nxt})}", status_code=303)
        return ctx, data, _finish(request, ctx, resp)
    if role == "operator" and ctx.user is not None and not ctx.user.operator:
        if write:
            console.guard.audit(
                ctx.user, request.url.path, "", "refused: operator role needed", ok=False
            )
        resp = _error(console, request, ctx, 403, "this needs the operator role")
        return ctx, data, _finish(request, ctx, resp)
    return ctx, data, None


def endpoint(
    role: str | None = "viewer", write: bool = False
) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a sync handler: pass `_admit`, run it in a thread, set the session cookie when one
    was created."""

    def deco(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            console: Console = request.app.state.console
            ctx, data, refused = await _admit(console, request, role, write, _wants_json(request))
            if refused is not None:
                return refused
            resp = await run_in_threadpool(fn, console, request, ctx, data)
            return _finish(request, ctx, resp)

        handler.__name__ = fn.__name__
        handler.__doc__ = fn.__doc__
        return handler

    return deco


def _finish(request: Request, ctx: Ctx, resp: Response) -> Response:
    if ctx.new_sid and not ctx.bearer:
        set_cookie(request, resp, ctx.new_sid)
    return resp


def _error(console: Console, request: Request, ctx: Ctx, status: int, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": message}, status_code=status)
    return console.render(request, ctx, "error.html", status=status, message=message)


def _json(data: Any, status: int = 200) -> Response:
    return Response(JSON_DUMPS(data), status_code=status, media_type="application/json")


def _back(data: dict[str, Any], default: str) -> str:
    """Where a form post returns: its `next` when it is a local path."""
    nxt = str(data.get("next") or "")
    if nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt:
        return nxt
    return default


# ------------------------------------------------------------------------------ overview


def overview_data(console: Console) -> dict[str, Any]:
    if console.settings.tenants:
        st = collect_status(console.settings, console.client)
    else:  # no tenants configured: those with stored syncs
        st = read_state(console.client, console.prefix, console.store.tenants())
    doc = st.to_dict()
    firing = firing_summary(console, load_rules(console.settings.alerts_dir))
    per_tenant_firing: dict[str, int] = {}
    for alerts in firing.values():
        for a in alerts:
            per_tenant_firing[a["tenant"]] = per_tenant_firing.get(a["tenant"], 0) + 1
    health = {"ok": 0, "degraded": 0, "failed": 0, "never": 0}
    for t in doc["tenants"]:
        last = t["last_completed_sync"]
        status = (last or {}).get("status")
        key = (
            "never"
            if not last
            else "ok"
            if status == "ok"
            else "degraded"
            if status == "degraded"
            else "failed"
        )
        health[key] += 1
        t["health"] = key
        t["firing"] = per_tenant_firing.get(t["name"], 0)
        t["age"] = age((last or {}).get("finished"))
    return {
        "status": doc,
        "health": health,
        "firing_total": sum(len(v) for v in firing.values()),
        "dead_letters": doc["dead_letters"],
    }


def tenant_plots(recent: list[dict[str, Any]]) -> list[str]:
    """SVG plots over a tenant's recent sync metadata (`store.history`, newest first)."""
    history = list(reversed(recent))
    labels = [str(h.get("finished") or "")[:16].replace("T", " ") for h in history]
    out: list[str] = []

    def agg(h: dict[str, Any]) -> dict[str, Any]:
        return h.get("aggregates") or {}

    for fld, title in (
        ("riskScore", "machines by risk score"),
        ("exposureLevel", "machines by exposure level"),
        ("healthStatus", "machines by health"),
    ):
        values = sorted({v for h in history for v in (agg(h).get("machines") or {}).get(fld, {})})
        if values:
            series: dict[str, list[float | None]] = {
                v: [
                    ((agg(h).get("machines") or {}).get(fld) or {}).get(v, 0)
                    if "machines" in agg(h)
                    else None
                    for h in history
                ]
                for v in values
            }
            out.append(plots.line_chart(title, series, labels))
    if any("criticalCves" in agg(h) for h in history):
        out.append(
            plots.line_chart(
                "open critical CVEs",
                {"critical": [agg(h).get("criticalCves") for h in history]},
                labels,
            )
        )
    if history:
        out.append(
            plots.line_chart(
                "events per sync",
                {"events": [float(sum((h.get("eventCounts") or {}).values())) for h in history]},
                labels,
            )
        )
    return out


@endpoint()
def overview_view(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    doc = overview_data(console)
    if _wants_json(request):
        return _json(doc)
    plot_svgs = {}
    for t in doc["status"]["tenants"]:
        svgs = tenant_plots(console.store.history(t["name"]))
        plot_svgs[t["name"]] = [Markup(s) for s in svgs]  # built from numbers + escaped text
    return console.render(request, ctx, "overview.html", doc=doc, plots=plot_svgs)


@endpoint()
def status_api(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    """Exactly `mde-monitor status --json`."""
    return _json(collect_status(console.settings, console.client).to_dict())


def tenant_data(console: Console, name: str, recent: list[dict[str, Any]]) -> dict[str, Any]:
    """The tenant page's document; `recent` is its `store.history`, newest first."""
    meta = console.store.meta(name) or {}
    graph = console.graphs.get(name)
    cfg = console.tenant_config(name)
    return {
        "name": name,
        "description": cfg.description if cfg else "",
        "cloud": cfg.cloud.value if cfg else None,
        "polling_interval": cfg.polling_interval.value if cfg else None,
        "generation": graph.generation if graph else None,
        "counts": graph.counts() if graph else {},
        "last_sync": meta,
        "history": [
            {
                "finished": h.get("finished"),
                "status": h.get("status"),
                "generation": h.get("generation"),
                "events": sum((h.get("eventCounts") or {}).values()),
                "aggregates": h.get("aggregates"),
                "error": h.get("error"),
            }
            for h in recent
        ],
    }


@endpoint()
def tenant_view(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    name = request.path_params["name"]
    if name not in console.tenant_names():
        return _error(console, request, ctx, 404, f"no tenant {name!r}")
    recent = console.store.history(name)
    doc = tenant_data(console, name, recent)
    if _wants_json(request):
        return _json(doc)
    svgs = tenant_plots(recent)
    return console.render(request, ctx, "tenant.html", t=doc, plots=[Markup(s) for s in svgs])


# ------------------------------------------------------------------------------ changes


def _newest_id(console: Console) -> str:
    """The all-tenants stream's newest id: the live feed of a page rendered now starts there."""
    from monitor.events import stream

    newest: Any = console.client.xrevrange(stream.stream_key(console.prefix), count=1)
    if not newest:
        return "0-0"
    sid = newest[0][0]
    return sid.decode() if isinstance(sid, bytes) else str(sid)


def _filter(request: Request) -> ChangeFilter:
    p = request.query_params
    return ChangeFilter(
        tenant=p.get("tenant") or None,
        type_glob=p.get("type") or None,
        field=p.get("field") or None,
        text=p.get("q") or None,
    )


def _limit(request: Request, default: int = 50, cap: int = 500) -> int:
    try:
        return max(1, min(cap, int(request.query_params.get("limit", default))))
    except ValueError:
        return default


@endpoint()
def changes_view(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    flt = _filter(request)
    page = changes_page(
        console.client,
        console.prefix,
        flt,
        before=request.query_params.get("before") or None,
        limit=_limit(request),
    )
    if _wants_json(request):
        return _json(page)
    nxt = None
    if page["next"]:
        nxt = "/changes?" + urlencode({**flt.query(), "before": page["next"]})
    return console.render(
        request,
        ctx,
        "changes.html",
        page=page,
        flt=flt,
        next_url=nxt,
        tenants=console.tenant_names(),
        live=not request.query_params.get("before"),
        stream_url="/changes/stream?" + urlencode({**flt.query(), "after": _newest_id(console)}),
    )


def _replay(console: Console, after: str, limit: int = 1_000) -> list[tuple[str, Any]]:
    """All-tenants stream entries after `after` (what a reconnecting browser missed)."""
    from monitor.events import stream

    try:
        batch: Any = console.client.xrange(
            stream.stream_key(console.prefix), min=f"({after}", max="+", count=limit
        )
    except redis.ResponseError:  # not a stream id
        return []
    return list(stream.entries(batch))


async def changes_stream(request: Request) -> Response:
    """Server-Sent Events: new timeline rows as they are committed. `after` (or the browser's
    Last-Event-ID on reconnect) replays what was committed since that id first."""
    console: Console = request.app.state.console
    *_, refused = await _admit(console, request, "viewer", write=False, api=True)
    if refused is not None:
        return refused
    flt = _filter(request)
    after = request.headers.get("last-event-id") or request.query_params.get("after") or ""
    queue = await console.broadcaster.subscribe()
    unfiltered = not flt.query()

    async def events() -> Any:
        last_sent = (0, 0)
        try:
            yield "retry: 3000\n\n"
            if after:
                for sid, ev in await run_in_threadpool(_replay, console, after):
                    replayed = {"row": row(sid, ev), "event": ev}
                    last_sent = sid_key(sid)
                    if wanted(flt, replayed):
                        yield frame(replayed["row"])
            while True:
                try:
                    batches = [await asyncio.wait_for(queue.get(), timeout=15)]
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                while not queue.empty():  # coalesce what piled up: one write per wake-up
                    batches.append(queue.get_nowait())
                frames = []
                for batch in batches:
                    if batch is None:
                        return
                    if unfiltered and sid_key(batch[0]["row"]["id"]) > last_sent:
                        frames.append(batch[0]["joined"])  # the common case: one join per read
                        continue
                    for item in batch:
                        key = sid_key(item["row"]["id"])
                        if key > last_sent and wanted(flt, item):
                            frames.append(item["frame"])
                if frames:
                    yield "".join(frames)
        finally:
            console.broadcaster.unsubscribe(queue)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# ------------------------------------------------------------------------------ entities


def _field_history(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per field change (an update and its risk_raised twin are one row, two types)."""
    rows: dict[str, dict[str, Any]] = {}
    for ev in events:
        data = ev.get("data") or {}
        for path, c in (data.get("changes") or {}).items():
            key = json.dumps([ev.get("time"), path, c], sort_keys=True, default=str)
            found = rows.get(key)
            if found is not None:
                found["types"].append(ev.get("type"))
                continue
            rows[key] = {
                "time": ev.get("time"),
                "type": ev.get("type"),
                "types": [ev.get("type")],
                "field": path,
                "old": c.get("old"),
                "new": c.get("new"),
                "added": c.get("added"),
                "removed": c.get("removed"),
            }
    return list(rows.values())


def entity_data(console: Console, key: str, tenant: str | None) -> dict[str, Any] | None:
    tenant = tenant or console.graphs.find_tenant(key, console.tenant_names())
    if tenant is None:
        return None
    graph = console.graphs.get(tenant)
    body = console.store.load_bodies(tenant, [key]).get(key)
    events = console.index.history(tenant, key)
    if body is None and not events:
        return None
    rels = []
    for e in (graph.edges.get(key, []) if graph else [])[:500]:
        other = e.target if e.source == key else e.source
        rels.append(
            {
                "key": e.key,
                "type": e.type,
                "class": e.rel_class,
                "direction": "out" if e.source == key else "in",
                "other": other,
                "other_type": graph.type_of.get(other) if graph else None,
            }
        )
    cfg = console.tenant_config(tenant)
    props = {k: v for k, v in (body or {}).items() if k != "_rawData"}
    return {
        "tenant": tenant,
        "key": key,
        "type": (body or {}).get("_type") or (graph.type_of.get(key) if graph else None),
        "exists": body is not None,
        "entity": props,
        "raw": (body or {}).get("_rawData"),
        "relationships": rels,
        "relationship_count": len(graph.edges.get(key, [])) if graph else 0,
        "history": [
            {
                "time": ev.get("time"),
                "type": ev.get("type"),
                "id": ev.get("id"),
                "summary": summarize_changes((ev.get("data") or {}).get("changes") or {}),
            }
            for ev in events
        ],
        "field_history": _field_history(events),
        "portal": portal.links(body or {}, cfg),
    }


@endpoint()
def entity_view(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    key = request.path_params["key"]
    doc = entity_data(console, key, request.query_params.get("tenant") or None)
    if doc is None:
        return _error(console, request, ctx, 404, f"no entity {key!r} in any tenant")
    if _wants_json(request):
        return _json(doc)
    return console.render(request, ctx, "entity.html", e=doc, silence_hours=8)


def neighbourhood(console: Console, key: str, tenant: str | None) -> dict[str, Any] | None:
    """Cytoscape elements: the entity, its neighbours (capped) and the edges between them."""
    tenant = tenant or console.graphs.find_tenant(key, console.tenant_names())
    graph = console.graphs.get(tenant) if tenant else None
    if graph is None or tenant is None or key not in graph.type_of:
        return None
    edges = graph.edges.get(key, [])
    shown = edges[:GRAPH_NODE_CAP]
    keys = [key] + [e.target if e.source == key else e.source for e in shown]
    bodies = console.store.load_bodies(tenant, [k for k in keys if k in graph.type_of])
    nodes = []
    for k in dict.fromkeys(keys):
        b = bodies.get(k) or {}
        nodes.append(
            {
                "data": {
                    "id": k,
                    "label": str(b.get("displayName") or k)[:60],
                    "type": graph.type_of.get(k) or k.split(":", 1)[0],
                    "center": k == key,
                    "href": f"/entities/{q(k)}?tenant={q(tenant)}",
                }
            }
        )
    return {
        "tenant": tenant,
        "key": key,
        "nodes": nodes,
        "edges": [
            {"data": {"id": e.key, "source": e.source, "target": e.target, "label": e.rel_class}}
            for e in shown
        ],
        "truncated": max(0, len(edges) - len(shown)),
    }


@endpoint()
def graph_api(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    key = request.query_params.get("key", "")
    doc = neighbourhood(console, key, request.query_params.get("tenant") or None)
    if doc is None:
        return _json({"error": f"no entity {key!r}"}, 404)
    return _json(doc)


# ------------------------------------------------------------------------------ explore


def _run_query(console: Console, request: Request) -> tuple[dict[str, Any] | None, str | None]:
    text = request.query_params.get("q", "").strip()
    if not text:
        return None, None
    p = request.query_params
    try:
        limit = int(p["limit"]) if p.get("limit") else None
    except ValueError:
        return None, "limit: expected a number"
    try:
        return (
            run_query(
                console.client,
                console.settings,
                text,
                p.get("tenant") or None,
                include_raw=p.get("raw") in ("1", "true"),
                limit=limit if limit is None else max(1, limit),
            ),
            None,
        )
    except QueryError as exc:
        return None, str(exc)  # "line L, column C: message"


@endpoint()
def query_api(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    """Exactly what `mde-monitor query --json` prints."""
    if not request.query_params.get("q", "").strip():
        return _json({"error": "give a query: ?q=FIND ..."}, 400)
    result, err = _run_query(console, request)
    if err is not None:
        return _json({"error": err}, 400)
    return _json(result)


def _flatten(rows: list[Any]) -> tuple[list[str], list[list[str]]]:
    cols: list[str] = []
    for r in rows[:200]:
        if isinstance(r, dict):
            for k in r:
                if k not in cols:
                    cols.append(k)
    out = []
    for r in rows:
        if isinstance(r, dict):
            out.append(
                [
                    v if isinstance(v, str) else json.dumps(v, default=str)
                    for v in (r.get(c, "") for c in cols)
                ]
            )
        else:
            out.append([json.dumps(r, default=str)])
    return cols or ["value"], out


@endpoint()
def explore_page(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    result, err = _run_query(console, request)
    cols, rows = _flatten(result["data"]) if result else ([], [])
    return console.render(
        request,
        ctx,
        "explore.html",
        text=request.query_params.get("q", ""),
        tenant=request.query_params.get("tenant", ""),
        tenants=console.tenant_names(),
        result=result,
        error=err,
        cols=cols,
        rows=rows[:1000],
        csv_url="/explore.csv?"
        + urlencode({k: v for k, v in request.query_params.items() if k in ("q", "tenant")}),
    )


@endpoint()
def explore_csv(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    result, err = _run_query(console, request)
    if err is not None or result is None:
        return _json({"error": err or "give a query"}, 400)
    cols, rows = _flatten(result["data"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        # cells starting with = + - @ are prefixed so spreadsheets do not run them
        w.writerow(["'" + c if c[:1] in ("=", "+", "-", "@") else c for c in r])
    return Response(
        buf.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="query.csv"'},
    )


# ------------------------------------------------------------------------------ alerts


def firing_summary(console: Console, ruleset: RuleSet) -> dict[str, list[dict[str, Any]]]:
    """rule -> firing alerts (tenant, subject, group key, labels), from the dispatcher's state."""
    pipe = console.client.pipeline(transaction=False)
    for r in ruleset.rules:
        pipe.hgetall(firing_key(console.prefix, r.name))
    out: dict[str, list[dict[str, Any]]] = {}
    for r, raw in zip(ruleset.rules, pipe.execute(), strict=True):
        alerts = []
        for field_, value in (raw or {}).items():
            tenant, _, subject = field_.decode().partition("\x1f")
            try:
                info = json.loads(value)
            except ValueError:
                info = {}
            alerts.append(
                {
                    "tenant": tenant,
                    "subject": subject,
                    "group": info.get("g"),
                    "labels": info.get("l"),
                }
            )
        if alerts:
            out[r.name] = sorted(alerts, key=lambda a: (a["tenant"], a["subject"]))
    return out


def sinks_rows(console: Console, ruleset: RuleSet) -> list[dict[str, Any]]:
    """What `mde-monitor sinks list --json` prints."""
    sinks, errors = build_sinks(
        ruleset,
        redis_client=console.client,
        redis_prefix=console.prefix,
        ca_bundle=console.settings.ca_bundle,
    )
    disabled = DeliveryQueue(console.client, console.prefix).disabled_sinks()
    rows = sink_rows(ruleset, sinks, [*ruleset.errors, *errors], disabled)
    for s in sinks.values():
        close = getattr(s, "close", None)
        if callable(close):
            close()
    return rows


def alerts_data(console: Console, ruleset: RuleSet) -> dict[str, Any]:
    queue = DeliveryQueue(console.client, console.prefix)
    deliveries = queue.records(limit=100)
    last_fired: dict[str, float] = {}
    for d in deliveries:
        try:
            ts = float(d.get("created_at") or 0)
        except ValueError:
            continue
        rule = d.get("rule", "")
        last_fired[rule] = max(last_fired.get(rule, 0.0), ts)
    now = time.time()
    return {
        "rules": [
            {**r.summary(), "last_fired": ts_to_iso(last_fired.get(r.name))} for r in ruleset.rules
        ],
        "errors": [e.to_dict() for e in ruleset.errors],
        "firing": firing_summary(console, ruleset),
        "disabled_sinks": queue.disabled_sinks(),
        "deliveries": deliveries,
        "dead_letters": queue.dead_letters(50),
        "silences": [
            {**s.to_dict(), "active": s.active(now)}
            for s in SilenceStore(console.client, console.prefix).all(now)
        ],
    }


@endpoint()
def alerts_page(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    ruleset = load_rules(console.settings.alerts_dir)  # once per request: the files as they are now
    doc = alerts_data(console, ruleset)
    p = request.query_params
    prefill = {
        "matchers": "\n".join(p.getlist("match")),
        "duration": p.get("for", "8h"),
        "comment": p.get("comment", ""),
    }
    return console.render(
        request,
        ctx,
        "alerts.html",
        a=doc,
        sinks=sinks_rows(console, ruleset),
        audit=console.guard.audit_entries(20),
        prefill=prefill,
    )


@endpoint()
def alerts_api(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    doc = alerts_data(console, load_rules(console.settings.alerts_dir))
    return _json({k: doc[k] for k in ("rules", "errors", "firing", "disabled_sinks")})


@endpoint()
def deliveries_api(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    """What `mde-monitor deliveries list --json` prints."""
    queue = DeliveryQueue(console.client, console.prefix)
    failed = request.query_params.get("failed") in ("1", "true")
    return _json(
        {
            "disabled_sinks": queue.disabled_sinks(),
            "deliveries": queue.records(failed_only=failed, limit=_limit(request)),
        }
    )


def delivery_data(console: Console, did: str) -> dict[str, Any] | None:
    queue = DeliveryQueue(console.client, console.prefix)
    rec = queue.get(did)
    if rec is None:
        return None
    rec.pop("notification", None)
    attempts = [e for e in queue.log_entries(2_000) if e.get("delivery") == did]
    return {"delivery": rec, "attempts": attempts}


@endpoint()
def delivery_view(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    did = request.path_params["did"]
    doc = delivery_data(console, did)
    if doc is None:
        return _error(console, request, ctx, 404, f"no delivery {did!r}")
    if _wants_json(request):
        return _json(doc)
    return console.render(request, ctx, "delivery.html", d=doc)


@endpoint()
def dead_letters_api(
    console: Console, request: Request, ctx: Ctx, data: dict[str, Any]
) -> Response:
    return _json(DeliveryQueue(console.client, console.prefix).dead_letters(_limit(request)))


@endpoint()
def sinks_api(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    return _json(sinks_rows(console, load_rules(console.settings.alerts_dir)))


@endpoint()
def silences_api(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    """What `mde-monitor silence list --all --json` prints."""
    now = time.time()
    return _json(
        [
            {**s.to_dict(), "active": s.active(now)}
            for s in SilenceStore(console.client, console.prefix).all(now)
        ]
    )


def _done(
    request: Request, data: dict[str, Any], doc: Any, default: str, status: int = 200
) -> Response:
    if _wants_json(request):
        return _json(doc, status)
    return RedirectResponse(_back(data, default), status_code=303)


@endpoint(role="operator", write=True)
def silence_create(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    assert ctx.user is not None
    raw = data.get("matchers") or data.get("match") or []
    matchers = [raw] if isinstance(raw, str) else list(raw)
    matchers = [m.strip() for part in matchers for m in str(part).splitlines() if m.strip()]
    try:
        seconds = parse_duration(str(data.get("duration") or data.get("for") or ""))
        s = SilenceStore(console.client, console.prefix).add(
            matchers, seconds, str(data.get("comment") or ""), ctx.user.name
        )
    except ValueError as exc:
        console.guard.audit(ctx.user, "silence.create", " ".join(matchers), str(exc), ok=False)
        return _error(console, request, ctx, 400, str(exc))
    console.guard.audit(ctx.user, "silence.create", s.id, " ".join(s.matchers))
    return _done(request, data, {**s.to_dict(), "active": True}, "/alerts#silences", 201)


@endpoint(role="operator", write=True)
def silence_expire(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    assert ctx.user is not None
    sid = request.path_params["sid"]
    s = SilenceStore(console.client, console.prefix).expire(sid)
    console.guard.audit(ctx.user, "silence.expire", sid, ok=s is not None)
    if s is None:
        return _error(console, request, ctx, 404, f"no silence {sid!r}")
    return _done(request, data, {**s.to_dict(), "active": False}, "/alerts#silences")


@endpoint(role="operator", write=True)
def delivery_retry(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    """Queue a failed delivery again (fresh retry budget); the running dispatcher sends it."""
    assert ctx.user is not None
    did = request.path_params["did"]
    ok = DeliveryQueue(console.client, console.prefix).requeue(did)
    console.guard.audit(ctx.user, "delivery.retry", did, ok=ok)
    if not ok:
        return _error(console, request, ctx, 404, f"no failed delivery {did!r}")
    return _done(request, data, {"requeued": [did]}, "/alerts#dead")


@endpoint(role="operator", write=True)
def sink_enable(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    assert ctx.user is not None
    name = request.path_params["name"]
    queue = DeliveryQueue(console.client, console.prefix)
    if name not in queue.disabled_sinks():
        return _error(console, request, ctx, 409, f"sink {name!r} is not disabled")
    n = queue.enable_sink(name)
    console.guard.audit(ctx.user, "sink.enable", name, f"{n} held deliveries queued again")
    return _done(request, data, {"sink": name, "requeued": n}, "/alerts#sinks")


@endpoint(role="operator", write=True)
def sync_trigger(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    """Enqueue a sync of one tenant now (workers pick it up)."""
    assert ctx.user is not None
    name = request.path_params["name"]
    if console.tenant_config(name) is None:
        return _error(console, request, ctx, 404, f"no tenant {name!r}")
    from monitor.celery_app import SYNC_QUEUE, SYNC_TASK, build_app

    accept = str(data.get("accept_drop") or "") in ("1", "true", "True")
    res = build_app(console.settings).send_task(
        SYNC_TASK,
        args=[name],
        kwargs={"origin": "console", "accept_drop": accept},
        queue=SYNC_QUEUE,
    )
    action = "sync.accept_drop" if accept else "sync.trigger"
    console.guard.audit(ctx.user, action, name, f"task {res.id}")
    return _done(
        request,
        data,
        {"tenant": name, "task_id": res.id, "accept_drop": accept},
        f"/tenants/{q(name)}",
        202,
    )


def config_doc(settings: Settings) -> dict[str, Any]:
    """The loaded configuration with every secret shown as `***` (URL passwords included)."""
    doc = settings.model_dump(mode="json")

    def mask(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: mask(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v, key) for v in value]
        if value is not None and any(w in key.lower() for w in ("secret", "token", "password")):
            return "***"
        if isinstance(value, str) and "://" in value and ("@" in value or "password=" in value):
            return mask_url(value)  # redis_url, http.proxy: userinfo or ?password=
        return value

    masked: dict[str, Any] = mask(doc)
    return masked


@endpoint()
def config_view(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    doc = config_doc(console.settings)
    if _wants_json(request):
        return _json(doc)
    return console.render(request, ctx, "config.html", doc=doc)


@endpoint()
def audit_view(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    entries = console.guard.audit_entries(_limit(request, 100, 1000))
    if _wants_json(request):
        return _json(entries)
    return console.render(request, ctx, "audit.html", entries=entries)


@endpoint()
def me_api(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    assert ctx.user is not None
    return _json({**ctx.user.to_dict(), "auth_required": console.guard.auth_required})


# ------------------------------------------------------------------------------ sign-in


@endpoint(role=None)
def login_page(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    return console.render(
        request,
        ctx,
        "login.html",
        next=_back(dict(request.query_params), "/"),
        message=request.query_params.get("error", ""),
    )


def _signed_in(console: Console, request: Request, ctx: Ctx, user: User, nxt: str) -> Response:
    console.guard.end_session(ctx.sid)  # a fresh id at sign-in: no session fixation
    ctx.new_sid = console.guard.start_session(user)
    console.guard.audit(user, "login", user.via)
    return RedirectResponse(nxt, status_code=303)


@endpoint(role=None, write=True)
def login_post(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    user = console.guard.check_token(str(data.get("token") or ""))
    if user is None:
        return console.render(
            request,
            ctx,
            "login.html",
            status=401,
            next=_back(data, "/"),
            message="that token is not valid",
        )
    return _signed_in(console, request, ctx, user, _back(data, "/"))


@endpoint(role=None, write=True)
def logout_post(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    if ctx.user is not None and ctx.user.via.startswith("session"):
        console.guard.audit(ctx.user, "logout", "")
    console.guard.end_session(ctx.sid)
    ctx.new_sid = console.guard.new_sid()
    return RedirectResponse("/login" if console.guard.auth_required else "/", status_code=303)


@endpoint(role=None)
def login_entra(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    if console.guard.oidc is None:
        return _error(console, request, ctx, 404, "Entra ID sign-in is not configured")
    sid = ctx.cookie_sid
    assert sid is not None
    url = oidc.start(console, request, sid, _back(dict(request.query_params), "/"))
    return RedirectResponse(url, status_code=303)


@endpoint(role=None)
def auth_callback(console: Console, request: Request, ctx: Ctx, data: dict[str, Any]) -> Response:
    if console.guard.oidc is None or not ctx.sid:
        return _error(console, request, ctx, 400, "no sign-in in progress")
    try:
        user, nxt = oidc.finish(console, ctx.sid, dict(request.query_params))
    except oidc.SignInError as exc:
        return console.render(request, ctx, "login.html", status=403, next="/", message=str(exc))
    return _signed_in(console, request, ctx, user, nxt)


# ------------------------------------------------------------------------------ the app


def create_app(settings: Settings, *, host: str = "127.0.0.1") -> Starlette:
    """The console for `settings`, bound (or about to be) on `host`."""
    console = Console(settings, host=host)
    routes = [
        Route("/", overview_view),
        Route("/api/overview", overview_view),
        Route("/api/status", status_api),
        Route("/tenants/{name}", tenant_view),
        Route("/api/tenants/{name}", tenant_view),
        Route("/tenants/{name}/sync", sync_trigger, methods=["POST"]),
        Route("/api/tenants/{name}/sync", sync_trigger, methods=["POST"]),
        Route("/changes", changes_view),
        Route("/api/changes", changes_view),
        Route("/changes/stream", changes_stream),
        Route("/entities/{key:path}", entity_view),
        Route("/api/entities/{key:path}", entity_view),
        Route("/api/graph", graph_api),
        Route("/explore", explore_page),
        Route("/explore.csv", explore_csv),
        Route("/api/query", query_api),
        Route("/alerts", alerts_page),
        Route("/api/alerts", alerts_api),
        Route("/api/deliveries", deliveries_api),
        Route("/alerts/deliveries/{did}", delivery_view),
        Route("/api/deliveries/{did}", delivery_view),
        Route("/alerts/deliveries/{did}/retry", delivery_retry, methods=["POST"]),
        Route("/api/deliveries/{did}/retry", delivery_retry, methods=["POST"]),
        Route("/api/dead-letters", dead_letters_api),
        Route("/api/sinks", sinks_api),
        Route("/alerts/sinks/{name}/enable", sink_enable, methods=["POST"]),
        Route("/api/sinks/{name}/enable", sink_enable, methods=["POST"]),
        Route("/api/silences", silences_api),
        Route("/alerts/silences", silence_create, methods=["POST"]),
        Route("/api/silences", silence_create, methods=["POST"]),
        Route("/alerts/silences/{sid}/expire", silence_expire, methods=["POST"]),
        Route("/api/silences/{sid}/expire", silence_expire, methods=["POST"]),
        Route("/config", config_view),
        Route("/api/config", config_view),
        Route("/audit", audit_view),
        Route("/api/audit", audit_view),
        Route("/api/me", me_api),
        Route("/login", login_page),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", logout_post, methods=["POST"]),
        Route("/login/entra", login_entra),
        Route("/auth/callback", auth_callback),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]

    def warm() -> None:
        """Build each tenant's graph cache and catch its event index up, off the request path."""
        for t in console.tenant_names():
            try:
                console.graphs.get(t)
                console.index.catch_up(t)
            except (redis.RedisError, OSError) as exc:
                log.warning("console warm-up of %s failed: %s", t, exc)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=warm, name="console-warm-up", daemon=True).start()
        yield
        await console.broadcaster.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.console = console
    app.add_middleware(SecurityHeaders)
    return app
