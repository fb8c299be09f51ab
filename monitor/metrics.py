"""Prometheus metrics, computed from Redis so every worker process and the CLI agree.

Celery runs tasks in forked pool processes, so a counter incremented in a task is invisible to the
HTTP server in the worker's main process. Instead:

- counters the tasks produce (syncs, API requests, events, deliveries) are kept in Redis hashes
  (`record_sync`, `record_delivery`: one pipelined HINCRBY batch per task), fleet-wide;
- gauges (last sync, entity counts, stream lag, dead letters, API budget use, next run) are read from
  Redis at scrape time by `RedisStateCollector`.

Every worker therefore exposes the same fleet-wide numbers: scrape one of them (or aggregate with
`max without (instance)`). Importing this module has no side effects (no registry, no connection).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from monitor.model.schema import LANE_FULL

log = logging.getLogger(__name__)

NAMESPACE = "mde"

# Redis-held counters: metric name -> (help, label names)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "syncs": ("Syncs run by workers, by outcome and lane", ("tenant", "status", "lane")),
    "api_requests": ("Requests sent to Microsoft APIs", ("tenant", "endpoint")),
    "api_retries": ("Retried requests to Microsoft APIs", ("tenant", "endpoint")),
    "api_throttled": ("429 answers from Microsoft APIs", ("tenant", "endpoint")),
    "events": ("Change events produced", ("tenant", "type")),
    "deliveries": ("Delivery attempts, by sink and outcome", ("sink", "outcome")),
    "events_lost": (
        "Unread events trimmed from the event stream at its memory cap, by consumer group",
        ("group",),
    ),
}


# labels added to a counter after series were stored: the value an older series had (a sync
# before lanes was a full sync)
ADDED_LABELS: dict[str, tuple[str, ...]] = {"syncs": (LANE_FULL,)}


def counter_key(prefix: str, metric: str) -> str:
    """Redis hash holding one counter's series (field = JSON list of label values)."""
    return f"{prefix}:metrics:{metric}"


def duration_key(prefix: str) -> str:
    """Redis hash of sync duration sums and counts per tenant and lane
    (`["<tenant>","<lane>"]:sum|count`; `<tenant>:sum|count` before lanes)."""
    return f"{prefix}:metrics:sync_duration"


def _field(*labels: str) -> str:
    return json.dumps(list(labels), separators=(",", ":"))


def record_sync(client: redis.Redis, prefix: str, summary: Mapping[str, Any]) -> None:
    """Count one sync (a `SyncSummary.to_dict()`, or {tenant, status} for busy/error) in Redis."""
    tenant = str(summary["tenant"])
    status = str(summary["status"])
    lane = str(summary.get("lane") or LANE_FULL)
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(counter_key(prefix, "syncs"), _field(tenant, status, lane), 1)
    duration = summary.get("duration_seconds")
    if status in ("ok", "degraded", "failed") and isinstance(duration, int | float):
        series = _field(tenant, lane)
        pipe.hincrbyfloat(duration_key(prefix), f"{series}:sum", float(duration))
        pipe.hincrby(duration_key(prefix), f"{series}:count", 1)
    requests = summary.get("requests") or {}
    for stat, metric in (
        ("requests", "api_requests"),
        ("retries", "api_retries"),
        ("throttled", "api_throttled"),
    ):
        for endpoint, n in (requests.get(stat) or {}).items():
            if n:
                pipe.hincrby(counter_key(prefix, metric), _field(tenant, endpoint), int(n))
    for typ, n in (summary.get("events") or {}).items():
        if n:
            pipe.hincrby(counter_key(prefix, "events"), _field(tenant, typ), int(n))
    pipe.execute()


def record_delivery(client: redis.Redis, prefix: str, sink: str, outcome: str) -> None:
    """Count one delivery attempt's outcome (sent, retry, dead, skipped, ...) for a sink."""
    client.hincrby(counter_key(prefix, "deliveries"), _field(sink, outcome), 1)


def _gauge(name: str, help_text: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", help_text, labels=list(labels))


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class RedisStateCollector(Collector):
    """Reads counters and current state from Redis at scrape time.

    `tenants` returns the configured tenant names (re-evaluated per scrape, so config changes show).
    `extra` are optional providers of more families (e.g. dead letters from the alert stage).
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        tenants: Callable[[], Iterable[str]],
        extra: Iterable[Callable[[], Iterable[Metric]]] = (),
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._tenants = tenants
        self._extra = list(extra)

    def collect(self) -> Iterator[Metric]:
        up = _gauge("redis_up", "1 when Redis answered this scrape")
        try:
            families = list(self._families())
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: Redis unavailable", extra={"error": type(exc).__name__})
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        from monitor.status import read_state

        yield from self._counters()
        state = read_state(self._client, self._prefix, list(self._tenants()))
        last_status = _gauge(
            "sync_last_status", "1 for the outcome of the tenant's last sync", "tenant", "status"
        )
        last_finished = _gauge(
            "sync_last_finished_timestamp_seconds",
            "When the tenant's last sync finished (unix time)",
            "tenant",
        )
        last_duration = _gauge(
            "sync_last_duration_seconds", "Duration of the tenant's last sync", "tenant"
        )
        generation = _gauge("snapshot_generation", "Snapshot generation of the tenant", "tenant")
        entities = _gauge(
            "entities", "Items per type in the tenant's latest snapshot", "tenant", "type"
        )
        next_run = _gauge(
            "sync_next_run_timestamp_seconds",
            "When beat will next enqueue the tenant's sync (unix time)",
            "tenant",
        )
        for t in state.tenants:
            last = t.last_completed
            if last is not None:
                last_status.add_metric([t.name, last.status], 1)
                if last.finished_ts is not None:
                    last_finished.add_metric([t.name], last.finished_ts)
                if last.duration_seconds is not None:
                    last_duration.add_metric([t.name], last.duration_seconds)
                for typ, n in last.counts.items():
                    entities.add_metric([t.name, typ], n)
            if t.generation is not None:
                generation.add_metric([t.name], t.generation)
            if t.next_run_ts is not None:
                next_run.add_metric([t.name], t.next_run_ts)
        yield from (last_status, last_finished, last_duration, generation, entities, next_run)

        length = _gauge("event_stream_length", "Entries in the all-tenants event stream")
        length.add_metric([], state.stream_length)
        yield length
        pending = _gauge(
            "event_consumer_pending",
            "Events delivered to a consumer group but not acknowledged",
            "group",
        )
        lag = _gauge(
            "event_consumer_lag", "Events in the stream not yet read by a consumer group", "group"
        )
        for g in state.groups:
            pending.add_metric([g.name], g.pending)
            if g.lag is not None:
                lag.add_metric([g.name], g.lag)
        yield pending
        yield lag
        if state.dead_letters is not None:
            dead = _gauge("dead_letters", "Deliveries that gave up (dead-letter entries)")
            dead.add_metric([], state.dead_letters)
            yield dead
        blocked = _gauge(
            "dispatch_blocked",
            "1 while alert dispatch is blocked: rules not loaded (events wait in the stream)",
        )
        blocked.add_metric([], 1 if state.dispatch_blocked is not None else 0)
        yield blocked
        budget = _gauge(
            "api_budget_used_ratio",
            "Share of Microsoft's documented per-minute limit used in the last minute",
            "tenant",
            "endpoint",
        )
        for (tenant, endpoint), ratio in state.budget_minute_ratio.items():
            budget.add_metric([tenant, endpoint], ratio)
        yield budget
        queues = _gauge(
            "celery_queue_length", "Tasks waiting in a Celery queue (all priorities)", "queue"
        )
        for queue, n in celery_queue_lengths(self._client, self._prefix).items():
            queues.add_metric([queue], n)
        yield queues
        for provider in self._extra:
            yield from provider()

    def _counters(self) -> Iterator[Metric]:
        pipe = self._client.pipeline(transaction=False)
        for metric in COUNTERS:
            pipe.hgetall(counter_key(self._prefix, metric))
        pipe.hgetall(duration_key(self._prefix))
        results = pipe.execute()
        for (metric, (help_text, labels)), raw in zip(COUNTERS.items(), results, strict=False):
            fam = CounterMetricFamily(f"{NAMESPACE}_{metric}", help_text, labels=list(labels))
            for field, value in sorted((_s(k), _s(v)) for k, v in raw.items()):
                try:
                    values = json.loads(field)
                except ValueError:
                    continue
                if not isinstance(values, list):
                    continue
                added = ADDED_LABELS.get(metric, ())
                if len(values) + len(added) == len(labels):  # stored before those labels
                    values = [*values, *added]
                if len(values) == len(labels):
                    fam.add_metric([str(v) for v in values], float(value))
            yield fam
        durations: dict[tuple[str, str], dict[str, float]] = {}
        for k, v in results[-1].items():
            head, _, part = _s(k).rpartition(":")
            series = _duration_series(head)
            if series is not None:
                into = durations.setdefault(series, {})
                into[part] = into.get(part, 0.0) + float(_s(v))
        summary = SummaryMetricFamily(
            f"{NAMESPACE}_sync_duration_seconds",
            "Duration of syncs run by workers, by lane",
            labels=["tenant", "lane"],
        )
        for (tenant, lane), parts in sorted(durations.items()):
            summary.add_metric(
                [tenant, lane],
                count_value=int(parts.get("count", 0)),
                sum_value=parts.get("sum", 0),
            )
        yield summary


def _duration_series(head: str) -> tuple[str, str] | None:
    """(tenant, lane) of a duration field's head: `["t","lane"]`, or a plain tenant name as
    stored before lanes (a full sync)."""
    if not head.startswith("["):
        return (head, LANE_FULL) if head else None
    try:
        values = json.loads(head)
    except ValueError:
        return None
    if isinstance(values, list) and len(values) == 2:
        return str(values[0]), str(values[1])
    return None


# kombu's Redis transport keeps one list per queue and priority step: `<queue>`, `<queue>\x06\x163`...
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def celery_queue_lengths(client: redis.Redis, prefix: str) -> dict[str, int]:
    """Messages waiting per Celery queue (the broker lists under `<prefix>:celery:`)."""
    from monitor.celery_app import QUEUES

    pipe = client.pipeline(transaction=False)
    for queue in QUEUES:
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(f"{prefix}:celery:{queue}{suffix}")
    counts = pipe.execute()
    n = len(_PRIORITY_SUFFIXES)
    return {q: sum(int(c) for c in counts[i * n : (i + 1) * n]) for i, q in enumerate(QUEUES)}


class BuildInfoCollector(Collector):
    """`mde_build_info{version, python}` 1: which release a scrape came from."""

    def collect(self) -> Iterator[Metric]:
        import platform

        from monitor import package_version

        info = _gauge(
            "build_info", "mde-monitor version and Python of this process", "version", "python"
        )
        info.add_metric([package_version(), platform.python_version()], 1)
        yield info


def build_registry(
    client: redis.Redis,
    prefix: str,
    tenants: Callable[[], Iterable[str]],
    extra: Iterable[Callable[[], Iterable[Metric]]] = (),
    process: bool = False,
) -> CollectorRegistry:
    """A fresh registry: the Redis-backed collector and build info; with `process`, also the
    serving process's own collectors (CPU, memory, file descriptors, GC, platform)."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisStateCollector(client, prefix, tenants, extra))
    registry.register(BuildInfoCollector())
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def exposition(client: redis.Redis, prefix: str, tenants: Callable[[], Iterable[str]]) -> str:
    """The Prometheus text exposition, computed from Redis once (`mde-monitor metrics`)."""
    return generate_latest(build_registry(client, prefix, tenants)).decode()


def _only_metrics(app: Callable[..., Any]) -> Callable[..., Any]:
    """A WSGI app serving `app` at /metrics and 404 everywhere else."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") not in ("/metrics", "/metrics/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics is served here\n"]
        return app(environ, start_response)

    return wrapped


def start_metrics_server(
    port: int,
    client: redis.Redis,
    prefix: str,
    tenants: Callable[[], Iterable[str]],
    addr: str = "0.0.0.0",
) -> Any:
    """Serve /metrics (nothing else) on `addr:port` in a daemon thread; returns the server
    (call .shutdown()). `port` 0 picks a free port (`server.server_port`)."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
            pass

    registry = build_registry(client, prefix, tenants, process=True)
    # a thread per request (as prometheus_client's own server): a stalled client never holds
    # up the next scrape
    server = make_server(
        addr,
        port,
        _only_metrics(make_wsgi_app(registry)),
        ThreadingWSGIServer,
        handler_class=_Quiet,
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info(
        "metrics: serving", extra={"addr": addr, "port": server.server_port, "since": time.time()}
    )
    return server
