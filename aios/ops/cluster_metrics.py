"""Cluster metrics: what the whole installation looks like, read from the database and the broker.

These are not per-process counters. Each scrape reads the shared state once — task totals rolled up
from the ledger (:mod:`aios.tasks.stats`), queue depths from the broker, agents, sync runs and
backups from their tables — so every API process (and ``aios metrics``) gives the same answer, and
nothing resets when a process restarts. Labels hold task types, states, queues, priority levels and
agent names; never a task id or a user.

A part that cannot be read (the broker is down, say) is left out of that scrape and counted in
``aios_scrape_errors_total{part}``; the rest is still served.

``aios metrics`` serves them alone (:func:`serve`): over TLS from ``[metrics] tls_*``, behind a bearer
token or basic auth, and never beyond loopback without credentials.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from aios.agents.health import AgentStatus
from aios.config import MetricsSettings, Settings
from aios.db import session_scope
from aios.errors import ConfigError
from aios.models import Agent, Backup, SyncRun
from aios.security.secrets import read_secret
from aios.tasks.stats import BUCKETS, FINISHED, read_stats, rollup
from aios.timeutil import utcnow

logger = logging.getLogger(__name__)


def _histogram(name: str, documentation: str, rows: list[Any]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["type"])
    for row in rows:
        cumulative, running = [], 0
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], row.buckets, strict=True):
            running += count
            cumulative.append((_bound(bound), running))
        family.add_metric([row.type], cumulative, sum_value=row.sum)
    return family


def _bound(text: str) -> str:
    return text if text == "+Inf" else repr(float(text))


class ClusterCollector(Collector):
    """A prometheus_client collector over AIOS's shared state (register it in a registry)."""

    def __init__(self, settings: Settings, celery: Celery | None) -> None:
        self.settings = settings
        self.celery = celery
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()
        #: The PostgreSQL primary and Redis master of the previous scrape, and how often they changed.
        self.primaries: dict[str, str] = {}
        self.primary_changes: dict[str, int] = {"postgresql": 0, "redis": 0}

    def collect(self) -> Iterator[Metric]:
        for part in (self._tasks, self._queues, self._agents, self._sync, self._backups, self._ha):
            try:
                yield from list(part())
            except Exception as exc:  # noqa: BLE001 - one unreadable part must not hide the others
                name = part.__name__.lstrip("_")
                logger.warning("metrics: cannot read %s: %s", name, exc)
                with self.lock:
                    self.errors[name] = self.errors.get(name, 0) + 1
        errors = CounterMetricFamily("aios_scrape_errors", "Parts of a scrape that could not be read.", labels=["part"])
        with self.lock:
            for name, count in sorted(self.errors.items()):
                errors.add_metric([name], count)
        yield errors

    def _tasks(self) -> Iterator[Metric]:
        rollup(self.settings)
        rows = read_stats(self.settings)
        finished = CounterMetricFamily(
            "aios_tasks_finished", "Tasks that reached a final state, by type and state.", labels=["type", "state"]
        )
        for row in rows:
            if row.series.startswith(FINISHED):
                finished.add_metric([row.type, row.series[len(FINISHED) :]], row.count)
        yield finished
        yield _histogram(
            "aios_task_run_seconds",
            "Run time of task attempts, from start to end.",
            [row for row in rows if row.series == "run"],
        )
        yield _histogram(
            "aios_task_queue_wait_seconds",
            "Time tasks waited in a queue before an agent started them.",
            [row for row in rows if row.series == "wait"],
        )

    def _queues(self) -> Iterator[Metric]:
        if self.celery is None or not self.settings.broker.has_queue_depths:
            return
        from aios.broker.queues import describe_queues

        now = utcnow()
        depth = GaugeMetricFamily(
            "aios_queue_depth",
            "Messages waiting in a queue, by priority level (9 first).",
            labels=["queue", "priority"],
        )
        oldest = GaugeMetricFamily(
            "aios_queue_oldest_message_age_seconds",
            "Age of the oldest waiting message of a queue (0 when empty).",
            labels=["queue"],
        )
        for info in describe_queues(self.celery, self.settings):
            stamps = [level.oldest_published_at for level in info.levels if level.oldest_published_at]
            for level in info.levels:
                depth.add_metric([info.name, str(level.priority)], level.depth)
            oldest.add_metric([info.name], max(0.0, (now - min(stamps)).total_seconds()) if stamps else 0.0)
        yield depth
        yield oldest

    def _agents(self) -> Iterator[Metric]:
        with session_scope(self.settings.database) as session:
            rows = session.execute(select(Agent.name, Agent.status, Agent.resources)).all()
        by_state = collections.Counter(row.status for row in rows)  # the same rows feed the per-agent figures
        states = GaugeMetricFamily("aios_agents", "Registered agents, by health state.", labels=["state"])
        for state in AgentStatus:
            states.add_metric([state.value], by_state.get(state.value, 0))
        yield states
        cpu = GaugeMetricFamily(
            "aios_agent_cpu_percent", "CPU use of an agent host, from its last heartbeat.", labels=["agent"]
        )
        memory = GaugeMetricFamily(
            "aios_agent_memory_percent", "Memory use of an agent host, from its last heartbeat.", labels=["agent"]
        )
        for row in rows:
            resources = row.resources or {}
            if row.status == AgentStatus.OFFLINE.value:
                continue  # its last figures are stale; aios_agents says it is offline
            if isinstance(resources.get("cpu_pct"), int | float):
                cpu.add_metric([row.name], float(resources["cpu_pct"]))
            if isinstance(resources.get("memory_pct"), int | float):
                memory.add_metric([row.name], float(resources["memory_pct"]))
        yield cpu
        yield memory

    def _sync(self) -> Iterator[Metric]:
        with session_scope(self.settings.database) as session:
            total = session.scalar(select(func.count()).select_from(SyncRun)) or 0
            # Errors are a JSON list: look at the recent runs (bounded) rather than compare JSON in SQL.
            recent = session.execute(
                select(SyncRun.started_at, SyncRun.duration_s, SyncRun.errors).order_by(SyncRun.id.desc()).limit(100)
            ).all()
        runs = CounterMetricFamily("aios_sync_runs", "Runs of the sync job.")
        runs.add_metric([], total)
        yield runs
        last_errors = GaugeMetricFamily("aios_sync_last_run_errors", "Errors of the latest sync run.")
        last_errors.add_metric([], len(recent[0].errors or []) if recent else 0)
        yield last_errors
        good = next((run for run in recent if not run.errors), None)
        success = GaugeMetricFamily(
            "aios_sync_last_success_timestamp_seconds",
            "Unix time of the end of the last sync run without errors (0: none yet).",
        )
        success.add_metric([], good.started_at.timestamp() + good.duration_s if good else 0.0)
        yield success

    def _backups(self) -> Iterator[Metric]:
        with session_scope(self.settings.database) as session:
            by_status = dict(session.execute(select(Backup.status, func.count()).group_by(Backup.status)).all())
            last_ok = session.scalar(select(func.max(Backup.created_at)).where(Backup.status.in_(["ok", "deleted"])))
        backups = CounterMetricFamily("aios_backups", "Database backups attempted, by outcome.", labels=["status"])
        backups.add_metric(["ok"], by_status.get("ok", 0) + by_status.get("deleted", 0))
        backups.add_metric(["failed"], by_status.get("failed", 0))
        yield backups
        success = GaugeMetricFamily(
            "aios_last_good_backup_timestamp_seconds", "Unix time of the last successful database backup (0: none yet)."
        )
        success.add_metric([], last_ok.timestamp() if last_ok else 0.0)
        yield success

    def _ha(self) -> Iterator[Metric]:
        """Replication and failover (aios.ops.ha): PostgreSQL's standbys and the Sentinel-watched Redis.
        Not on the embedded default, which has neither."""
        from aios.ops.ha import ha_status, has_replication

        if not has_replication(self.settings):
            return
        status = ha_status(self.settings)
        db, broker = status.database, status.broker
        primary = GaugeMetricFamily(
            "aios_ha_primary",
            "The PostgreSQL primary and the Redis master now (1), by engine.",
            labels=["engine", "addr"],
        )
        for engine, addr in (("postgresql", db.primary), ("redis", broker.master)):
            if addr is None:
                continue
            primary.add_metric([engine, addr], 1)
            with self.lock:
                before = self.primaries.get(engine)
                if before is not None and before != addr:
                    self.primary_changes[engine] += 1
                self.primaries[engine] = addr
        yield primary
        changes = CounterMetricFamily(
            "aios_ha_primary_changes",
            "Changes of the PostgreSQL primary or Redis master seen by this process between scrapes.",
            labels=["engine"],
        )
        with self.lock:
            for engine, count in sorted(self.primary_changes.items()):
                changes.add_metric([engine], count)
        yield changes
        lag_s = GaugeMetricFamily(
            "aios_pg_replication_lag_seconds",
            "How far each standby's replay is behind the primary.",
            labels=["standby"],
        )
        lag_bytes = GaugeMetricFamily(
            "aios_pg_replication_lag_bytes", "WAL the standby has not replayed yet.", labels=["standby"]
        )
        sync = GaugeMetricFamily(
            "aios_pg_standby_synchronous",
            "1 while the standby streams synchronously (a commit waits for it), else 0.",
            labels=["standby"],
        )
        for standby in db.standbys:
            name = standby.application_name
            lag_s.add_metric([name], standby.replay_lag_s or 0.0)
            if standby.lag_bytes is not None:
                lag_bytes.add_metric([name], standby.lag_bytes)
            streaming_sync = standby.state == "streaming" and standby.sync_state in ("sync", "quorum")
            sync.add_metric([name], 1.0 if streaming_sync else 0.0)
        yield from (lag_s, lag_bytes, sync)
        replica_lag = GaugeMetricFamily(
            "aios_redis_replica_lag_bytes", "Replication stream a Redis replica has not confirmed.", labels=["replica"]
        )
        for replica in broker.replicas:
            if replica.lag_bytes is not None:
                replica_lag.add_metric([replica.addr], replica.lag_bytes)
        yield replica_lag
        problems = GaugeMetricFamily(
            "aios_ha_problems", "Problems between the pair and a failover that loses nothing (aios ha status)."
        )
        problems.add_metric([], len(status.problems))
        yield problems


#: Shortest bearer token ``aios metrics`` accepts: a short one can be guessed over the network.
MIN_TOKEN_BYTES = 16
#: A client gets this long to finish the TLS handshake and send its request.
CLIENT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class MetricsCredentials:
    """What a scraper of ``aios metrics`` must send: a bearer token, or basic auth (either is accepted)."""

    bearer_token: str | None = field(default=None, repr=False)
    basic_auth_user: str = ""
    basic_auth_password: str | None = field(default=None, repr=False)

    @property
    def required(self) -> bool:
        return bool(self.bearer_token or self.basic_auth_user)

    def accept(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries these credentials (compared in constant time)."""
        scheme, _, value = (authorization or "").strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.bearer_token:
            return hmac.compare_digest(value.encode(), self.bearer_token.encode())
        if scheme.lower() == "basic" and self.basic_auth_user and self.basic_auth_password:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            same_user = hmac.compare_digest(user.encode(), self.basic_auth_user.encode())
            same_password = hmac.compare_digest(password.encode(), self.basic_auth_password.encode())
            return same_user and same_password
        return False


def metrics_credentials(metrics: MetricsSettings) -> MetricsCredentials:
    """The credentials of ``[metrics]``, their secrets read from the environment or an owner-only file."""
    token, source = read_secret("metrics.bearer_token", metrics.bearer_token, metrics.bearer_token_file)
    token = token or None  # an empty variable (compose's ${AIOS_METRICS_TOKEN:-}) is no token
    if token is not None and len(token.encode()) < MIN_TOKEN_BYTES:
        raise ConfigError(
            f"{source}: must be at least {MIN_TOKEN_BYTES} bytes (got {len(token.encode())}); e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    password, source = read_secret(
        "metrics.basic_auth_password", metrics.basic_auth_password, metrics.basic_auth_password_file
    )
    if metrics.basic_auth_user and not password:
        raise ConfigError(f"{source}: empty; basic auth needs a password")
    return MetricsCredentials(token or None, metrics.basic_auth_user, password)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only listens to this machine: 127.0.0.0/8, ::1, localhost."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to anything, so it counts as beyond loopback


def check_exposure(metrics: MetricsSettings, credentials: MetricsCredentials) -> None:
    """Refuse to serve beyond loopback without credentials or client certificates (ConfigError: exit 2);
    warn when credentials would cross the network in clear text."""
    if is_loopback(metrics.host):
        return
    if not credentials.required and not metrics.tls_client_ca:
        raise ConfigError(
            f"metrics.host ({metrics.host}) is beyond loopback, and aios metrics has no authentication: set "
            "AIOS_METRICS__BEARER_TOKEN (or metrics.bearer_token_file, or metrics.basic_auth_user with "
            "AIOS_METRICS__BASIC_AUTH_PASSWORD), or metrics.tls_client_ca; or listen on 127.0.0.1"
        )
    if not metrics.tls_enabled:
        logger.warning(
            "metrics: credentials cross the network in clear text on %s; set metrics.tls_cert and metrics.tls_key",
            metrics.host,
        )


def _guarded(app: Any, credentials: MetricsCredentials) -> Any:
    """The WSGI ``app`` behind ``credentials``: without them, 401 and the usual JSON error."""
    challenges = [("WWW-Authenticate", 'Bearer realm="aios metrics"')] if credentials.bearer_token else []
    if credentials.basic_auth_user:
        challenges.append(("WWW-Authenticate", 'Basic realm="aios metrics", charset="UTF-8"'))
    refusal = json.dumps(
        {"error": "unauthorized", "message": "aios metrics needs credentials: a bearer token or basic auth"}
    ).encode()

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        if credentials.accept(environ.get("HTTP_AUTHORIZATION")):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "application/json"), ("Content-Length", str(len(refusal))), *challenges],
        )
        return [refusal]

    return guarded


def serve(settings: Settings) -> None:
    """``aios metrics``: the cluster metrics alone, on ``metrics.host:metrics.port``, until SIGTERM.

    One scrape target for the whole installation, independent of the API (scrape this, or the API's
    ``/metrics``, not both: the cluster part is the same in each). Over TLS when ``metrics.tls_cert``
    is set; behind a bearer token or basic auth when configured, and never beyond loopback without one.
    """
    import signal
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app

    from aios.broker.celery_app import create_celery_app
    from aios.db import ensure_migrated
    from aios.security.tls import check_tls_files, server_context

    metrics = settings.metrics
    credentials = metrics_credentials(metrics)
    check_exposure(metrics, credentials)
    check_tls_files("metrics", metrics)
    tls = server_context("metrics", metrics) if metrics.tls_enabled else None

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            logger.debug("metrics: " + format, *args)

    class Server(ThreadingMixIn, WSGIServer):
        """One thread per connection, and the TLS handshake in that thread: a client that stalls its
        handshake holds its own thread for at most CLIENT_TIMEOUT_S, never the accept loop."""

        daemon_threads = True

        def finish_request(self, request: Any, client_address: Any) -> None:
            request.settimeout(CLIENT_TIMEOUT_S)
            if tls is None:
                super().finish_request(request, client_address)
                return
            with tls.wrap_socket(request, server_side=True) as wrapped:
                super().finish_request(wrapped, client_address)

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A failed handshake (plain HTTP, no client certificate) or a dropped client: not our error.
            logger.debug("metrics: connection from %s failed", client_address, exc_info=True)

    ensure_migrated(settings.database)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(settings, create_celery_app(settings)))
    app = make_wsgi_app(registry)
    if credentials.required:
        app = _guarded(app, credentials)
    server = make_server(metrics.host, metrics.port, app, server_class=Server, handler_class=QuietHandler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    scheme = "https" if tls else "http"
    guard = "credentials required" if credentials.required else "no credentials"
    if metrics.tls_client_ca:
        guard += ", client certificates required"
    logger.warning("serving cluster metrics on %s://%s:%d/metrics (%s)", scheme, metrics.host, metrics.port, guard)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
