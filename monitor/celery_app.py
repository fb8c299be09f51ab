"""The Celery app: Redis broker and result backend, three queues, reliability settings, redbeat.

`celery -A monitor.celery_app worker` / `celery -A monitor.celery_app beat` (or `mde-monitor worker`
/ `mde-monitor beat`). The Redis URL comes from $REDIS_URL, else the config file's `redis_url`
($MDE_MONITOR_CONFIG, default config/monitor.yaml); a missing config file is not an error here,
but a config file that exists and does not load stops the process (exit 2) with the error.
Every key (broker, results, beat schedule) lives under the config's `redis_prefix`, so several
deployments - or tests - can share one Redis. Tuning knobs are environment variables (`RunOptions`);
docs/operations.md explains each choice.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from celery import Celery, signals
from kombu import Exchange, Queue
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

from monitor.config import (
    CONFIG_ENV,
    DEFAULT_REDIS_URL,
    ConfigError,
    Settings,
    config_path,
    load_settings,
    redis_url_with_tls,
)
from monitor.memory import pin_mmap_threshold
from monitor.redis_conn import tls_options, with_password_file

log = logging.getLogger(__name__)

SYNC_QUEUE = "sync"
DISPATCH_QUEUE = "dispatch"
DELIVER_QUEUE = "deliver"
QUERY_QUEUE = "query"  # query alert rules: one long-lived process (monitor.alerts.query_evaluator)
QUEUES = (SYNC_QUEUE, DISPATCH_QUEUE, DELIVER_QUEUE, QUERY_QUEUE)
DEFAULT_WORKER_QUEUES = (SYNC_QUEUE, DISPATCH_QUEUE, DELIVER_QUEUE)

SYNC_TASK = "monitor.tasks.sync_tenant"
DISPATCH_TASK = "monitor.tasks.dispatch"
DELIVER_TASK = "monitor.tasks.deliver"
QUERY_TASK = "monitor.tasks.evaluate_queries"

TASK_ROUTES = {
    SYNC_TASK: {"queue": SYNC_QUEUE},
    DISPATCH_TASK: {"queue": DISPATCH_QUEUE},
    DELIVER_TASK: {"queue": DELIVER_QUEUE},
    QUERY_TASK: {"queue": QUERY_QUEUE},
}


@dataclass(frozen=True)
class RedisUrls:
    """One Redis, spelled for each client: kombu/Celery and redis-py disagree on unix sockets."""

    broker: str  # kombu transport URL (redis://, rediss://, redis+socket://)
    backend: str  # Celery result backend URL
    client: str  # redis-py URL (redis://, rediss://, unix://) for redbeat and our own modules


def redis_urls(url: str) -> RedisUrls:
    """Translate a Redis URL for kombu, Celery's backend and redis-py.

    `unix:///path/redis.sock?db=N` and `redis+socket:///path/redis.sock?virtual_host=N` are both
    accepted (the embedded-Redis case); TCP URLs are used as they are.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("unix", "redis+socket", "socket"):
        query = dict(parse_qsl(parts.query))
        db = query.pop("db", None) or query.pop("virtual_host", None) or "0"
        path = parts.path
        if not path:
            raise ValueError(f"Redis socket URL without a path: {scheme}://...")
        kombu_q = urlencode({**query, "virtual_host": db})
        client_q = urlencode({**query, "db": db})
        kombu = f"redis+socket://{path}?{kombu_q}"
        return RedisUrls(broker=kombu, backend=kombu, client=f"unix://{path}?{client_q}")
    if scheme in ("redis", "rediss"):
        return RedisUrls(broker=url, backend=url, client=url)
    raise ValueError(
        f"unsupported Redis URL scheme {scheme!r} (use redis://, rediss:// or unix://)"
    )


_LOST = (AttributeError, OSError, *kombu_redis.Transport.connection_errors)


class _QoS(kombu_redis.QoS):
    """kombu's Redis QoS, surviving a Redis that goes away while tasks are unacknowledged.

    On connection loss the worker closes its channel, which pushes the unacknowledged messages
    back at once, and tasks that finish afterwards acknowledge on that closed channel; with Redis
    gone both raise (kombu 5.7: AttributeError from the released connection) and Celery stops the
    worker as "unrecoverable". The messages are safe in Redis anyway: whatever was not
    acknowledged returns after the visibility timeout, and our tasks are idempotent.
    """

    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)
        except _LOST as exc:
            _lost("restore", exc)

    def ack(self, delivery_tag: Any) -> None:
        try:
            super().ack(delivery_tag)
        except _LOST as exc:
            _lost("ack", exc)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except _LOST as exc:
            _lost("reject", exc)


def _lost(what: str, exc: BaseException) -> None:
    log.warning(
        "broker connection lost: the task returns after the visibility timeout",
        extra={"operation": what, "error": type(exc).__name__},
    )


class _Channel(kombu_redis.Channel):
    QoS = _QoS


class RedisTransport(kombu_redis.Transport):
    """The Redis transport with `_QoS` (used for redis:// and rediss:// broker URLs)."""

    Channel = _Channel


# Registered under kombu's own `redis`/`rediss` names (not a custom transport string), so the broker
# URL keeps its scheme for every tool that reads it - Flower's broker view in particular.
TRANSPORT = f"{__name__}:RedisTransport"
kombu_transport.TRANSPORT_ALIASES["redis"] = TRANSPORT
kombu_transport.TRANSPORT_ALIASES["rediss"] = TRANSPORT


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"environment: {name}: not a number: {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"environment: {name}: must be > 0, got {raw!r}")
    return value


@dataclass(frozen=True)
class RunOptions:
    """Worker/beat tuning from the environment (defaults are the production choices)."""

    visibility_timeout: float = 7200.0  # > sync hard limit: a running sync is never redelivered
    sync_time_limit: float = 3600.0  # hard; soft = 95% (the sync gets a chance to record failure)
    dispatch_time_limit: float = 300.0
    deliver_time_limit: float = 120.0
    dispatch_every: float = 30.0  # beat: flush alert groups, enqueue due (retried) deliveries
    beat_max_interval: float = 5.0  # beat tick; redbeat's lock expires after 5 ticks
    metrics_port: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RunOptions:
        env = os.environ if env is None else env
        port = env.get("MDE_MONITOR_METRICS_PORT")
        return cls(
            visibility_timeout=_env_float(env, "MDE_MONITOR_VISIBILITY_TIMEOUT", 7200.0),
            sync_time_limit=_env_float(env, "MDE_MONITOR_SYNC_TIME_LIMIT", 3600.0),
            dispatch_time_limit=_env_float(env, "MDE_MONITOR_DISPATCH_TIME_LIMIT", 300.0),
            deliver_time_limit=_env_float(env, "MDE_MONITOR_DELIVER_TIME_LIMIT", 120.0),
            dispatch_every=_env_float(env, "MDE_MONITOR_DISPATCH_EVERY", 30.0),
            beat_max_interval=_env_float(env, "MDE_MONITOR_BEAT_MAX_INTERVAL", 5.0),
            metrics_port=_env_port(port),
        )


def _env_port(raw: str | None) -> int | None:
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"environment: MDE_MONITOR_METRICS_PORT: not a TCP port: {raw!r}")
    return int(raw)


def soft_limit(hard: float) -> float:
    """The soft time limit for a hard one: 5% earlier (at least 0.5 s, at most 60 s)."""
    return hard - max(0.5, min(60.0, hard * 0.05))


def load_settings_if_present() -> Settings | None:
    """The config file's settings, or None when it does not exist.

    A file that exists but does not load raises ConfigError: falling back to defaults would
    connect to another Redis database (or another Redis) and write there.
    """
    path = config_path()
    if not path.exists():
        return None
    return load_settings(path)


def _startup_settings() -> Settings | None:
    """`load_settings_if_present` for the module-level app: a broken config stops the process."""
    try:
        return load_settings_if_present()
    except ConfigError as exc:
        sys.stderr.write(f"config error: {exc}\n")
        raise SystemExit(2) from None


def build_app(
    settings: Settings | None = None,
    options: RunOptions | None = None,
    env: Mapping[str, str] | None = None,
) -> Celery:
    """A configured Celery app for these settings (None: $REDIS_URL and defaults)."""
    env = os.environ if env is None else env
    options = options or RunOptions.from_env(env)
    url = env.get("REDIS_URL") or (settings.redis_url if settings else DEFAULT_REDIS_URL)
    if settings is not None:
        url = redis_url_with_tls(settings, url)
    else:
        try:
            url = with_password_file(url, env)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    prefix = settings.redis_prefix if settings else "mde"
    # rediss://: one set of TLS options for kombu, the result backend and redbeat (kombu alone
    # would otherwise fall back to CERT_NONE); our own clients re-read them from the full URL
    plain, tls = tls_options(url)
    urls = redis_urls(plain)
    keyprefix = f"{prefix}:celery:"
    app = Celery("mde-monitor", include=["monitor.tasks"])
    app.conf.update(
        broker_url=urls.broker,
        result_backend=urls.backend,
        broker_transport_options={
            "visibility_timeout": options.visibility_timeout,
            "global_keyprefix": keyprefix,
            "socket_keepalive": True,
            "health_check_interval": 25,
        },
        result_backend_transport_options={"global_keyprefix": keyprefix},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep reconnecting while Redis restarts
        worker_cancel_long_running_tasks_on_connection_loss=False,
        result_expires=86400,
        result_extended=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        enable_utc=True,
        timezone="UTC",
        # reliability: see docs/operations.md
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue=SYNC_QUEUE,
        task_routes=TASK_ROUTES,
        task_create_missing_queues=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        # beat: redbeat keeps the schedule in Redis and holds a lock so one beat is active
        beat_scheduler="monitor.schedule:MonitorScheduler",
        beat_max_loop_interval=options.beat_max_interval,
        redbeat_redis_url=urls.client,
        redbeat_key_prefix=f"{prefix}:redbeat:",
        redbeat_lock_timeout=int(max(options.beat_max_interval * 5, 15)),
        redbeat_redis_options={"retry_period": 600, "socket_connect_timeout": 5},
        beat_schedule={
            "dispatch": {
                "task": DISPATCH_TASK,
                "schedule": options.dispatch_every,
                "options": {"queue": DISPATCH_QUEUE, "expires": options.dispatch_every * 4},
            }
        },
        mde_prefix=prefix,
        mde_redis_url=url if tls else urls.client,
        mde_options=options,
    )
    if tls:
        app.conf.update(
            broker_use_ssl=dict(tls),
            redis_backend_use_ssl=dict(tls),
            redbeat_redis_use_ssl=dict(tls),
        )
    return app


class SettingsCache:
    """The config file, re-read when its mtime or size changes (workers read it per task)."""

    def __init__(self) -> None:
        self._key: tuple[str, int, int] | None = None
        self._settings: Settings | None = None

    def get(self) -> Settings:
        """Current settings; ConfigError when the file is missing or invalid."""
        path = config_path()
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found (set ${CONFIG_ENV})") from None
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key != self._key or self._settings is None:
            self._settings = load_settings(path)
            self._key = key
        return self._settings


settings_cache = SettingsCache()

pin_mmap_threshold()  # before the pool forks: its processes inherit it
app = build_app(_startup_settings())


@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    """Our JSON-lines (or human, on a TTY) logging instead of Celery's."""
    from monitor.logs import setup_logging

    level = (
        loglevel if isinstance(loglevel, str) else logging.getLevelName(loglevel or logging.INFO)
    )
    setup_logging(str(level), os.environ.get("MDE_MONITOR_LOG_FORMAT") or None)


@signals.worker_ready.connect
def _start_metrics_server(sender: Any = None, **_: Any) -> None:
    """Serve /metrics from the worker's main process when a port is configured."""
    celery_app = getattr(sender, "app", None) or app
    options: RunOptions = celery_app.conf.mde_options
    try:
        settings = load_settings_if_present()
    except ConfigError as exc:
        log.error("metrics: config error", extra={"error": str(exc)})
        settings = None
    port = options.metrics_port or (settings.metrics_port if settings else None)
    if not port:
        return
    from monitor.metrics import start_metrics_server
    from monitor.redis_conn import connect

    prefix = celery_app.conf.mde_prefix

    def tenants() -> list[str]:
        try:
            return [t.name for t in settings_cache.get().tenants]
        except ConfigError:
            return []

    addr = os.environ.get("MDE_MONITOR_METRICS_ADDR") or "0.0.0.0"
    try:
        start_metrics_server(port, connect(celery_app.conf.mde_redis_url), prefix, tenants, addr)
    except OSError as exc:
        log.error("metrics: cannot listen", extra={"addr": addr, "port": port, "error": str(exc)})
        return
    log.info("metrics: listening", extra={"addr": addr, "port": port, "host": socket.gethostname()})


_heartbeat: Any = None


@signals.worker_ready.connect
def _start_query_heartbeat(sender: Any = None, **_: Any) -> None:
    """A worker consuming queue `query` says so (syncs then leave query rules to it)."""
    global _heartbeat
    celery_app = getattr(sender, "app", None) or app
    if QUERY_QUEUE not in celery_app.amqp.queues.consume_from:
        return
    from monitor.alerts.query_evaluator import Heartbeat
    from monitor.redis_conn import connect

    pool = getattr(getattr(sender, "controller", None), "concurrency", None)
    if isinstance(pool, int) and pool > 1:
        log.warning(
            "queue %s is best consumed by one pool process (--concurrency 1): each process"
            " keeps its own tenants' query graphs",
            QUERY_QUEUE,
            extra={"concurrency": pool},
        )
    _heartbeat = Heartbeat(connect(celery_app.conf.mde_redis_url), celery_app.conf.mde_prefix)
    _heartbeat.start()
    log.info("query evaluator: consuming queue %s", QUERY_QUEUE, extra={"as": _heartbeat.me})


@signals.worker_shutdown.connect
def _stop_query_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
