"""One typed configuration loader for every AIOS process.

Layers, later wins: the defaults in this module, then ``config/aios.toml`` (or the file that
``AIOS_CONFIG`` names), then environment variables ``AIOS_<SECTION>__<KEY>``. Values given in the
environment for list or table settings are JSON (``AIOS_AGENTS__COMMAND_ALLOWLIST='["echo"]'``).

Settings are validated once, at start, into frozen pydantic models. A bad value raises
:class:`ConfigError` naming the key; the CLI turns that into exit status 2, so a process never runs
half-configured.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aios.errors import ConfigError, ValidationFailed
from aios.timing.cron import parse_cron

ENV_PREFIX = "AIOS_"
#: The repository's default config file, used when AIOS_CONFIG is not set and the file exists.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "aios.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    #: gunicorn worker processes and threads per process behind `aios api`.
    workers: int = Field(2, ge=1, le=64)
    threads: int = Field(4, ge=1, le=64)
    #: Bodies above this size are refused with 413 before they are parsed.
    max_body_bytes: int = Field(1_048_576, ge=1024)
    #: Most tasks accepted by one POST /tasks/batch.
    batch_max_tasks: int = Field(1000, ge=1, le=10_000)
    #: Largest page a list endpoint returns.
    page_max: int = Field(500, ge=1, le=10_000)
    #: Largest page a task list asks for with ``fields=`` (whole results, parameters or errors).
    page_max_with_bodies: int = Field(50, ge=1, le=10_000)
    #: A task list page stops before the task that would take its JSON past this size (at least one task
    #: is always shown); its next_cursor resumes there, so nothing is skipped.
    max_response_bytes: int = Field(4_194_304, ge=65_536)
    #: How long worker inspection and control wait for the workers' replies (Celery broadcast timeout).
    inspect_timeout_s: float = Field(1.0, gt=0, le=30)
    #: Longest life of one Server-Sent Events stream (/api/v1/tasks/<id>/events, /api/v1/events); the
    #: client then reconnects with Last-Event-ID and misses nothing (docs/events.md).
    sse_max_s: float = Field(3600.0, gt=0, le=86_400)
    #: Most event streams one API process serves at once (503 beyond). Each stream holds one of the
    #: process's ``threads``, and streams never take the last one: the real cap is min(this, threads - 1).
    sse_max_streams: int = Field(64, ge=0, le=10_000)
    #: Longest a client may take to send one whole request, headers and body, from its connection (or
    #: its first byte on a kept-alive one); then 408 and the connection is closed. `aios api` reads each
    #: request in full before a thread serves it, so a slow client holds a socket, never a thread.
    request_read_timeout_s: float = Field(15.0, gt=0, le=600)
    #: Most open connections from one client address to one API process (429 and close beyond);
    #: 0 = no cap. Behind a proxy every client shares the proxy's address: raise it or set 0 there.
    max_connections_per_client: int = Field(200, ge=0, le=100_000)
    #: Most event streams one user (all their keys and tokens) holds open across every API process
    #: (429 beyond), so one viewer cannot take every stream slot.
    sse_max_streams_per_principal: int = Field(4, ge=1, le=10_000)
    #: Most POST /commands calls with ``wait_s`` one user has waiting at once across every API process
    #: (429 beyond). Waits and streams together never hold more than threads - 1 threads of a process;
    #: past that a wait answers 202 at once instead of waiting.
    max_waits_per_principal: int = Field(2, ge=1, le=10_000)


class DatabaseSettings(_Section):
    #: SQLAlchemy URL. The embedded default is a SQLite file under ./var.
    url: str = "sqlite:///var/aios.db"
    pool_size: int = Field(5, ge=1, le=200)
    #: Seconds a SQLite writer waits for the lock before it gives up.
    sqlite_busy_timeout_s: float = Field(15.0, gt=0)
    echo: bool = False

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


class BrokerSettings(_Section):
    #: kombu URL. ``sqlite:///var/broker.db`` is the embedded default that needs no server (AIOS's
    #: own transport, :mod:`aios.broker.sqlite_transport`: priorities, acks, visibility timeout, fanout);
    #: production uses ``redis://`` or ``rediss://``, or Redis Sentinel in kombu's form
    #: ``sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379`` with ``sentinel_master``.
    #: kombu's ``filesystem://`` is still accepted (FIFO, no queue depths).
    url: str = "sqlite:///var/broker.db"
    #: The name Sentinel monitors the Redis master under (``sentinel monitor <name> ...``); required with
    #: a ``sentinel://`` URL, which names the Sentinels, not the master: every AIOS process and Redis
    #: client asks them for the current master, so a failover needs no restart.
    sentinel_master: str = Field("", pattern=r"^[A-Za-z0-9._-]{0,64}$")
    #: The Sentinels' own password (``requirepass`` in sentinel.conf), if they have one. The master's
    #: password goes in the URL, as for ``redis://``.
    sentinel_password: str = ""
    #: Where the filesystem transport keeps its messages (``filesystem://`` only).
    data_dir: str = "var/broker"
    #: Prefix of every AIOS queue name, control and event exchange: lets several AIOS
    #: deployments (or test runs) share one Redis without seeing each other.
    namespace: str = Field("aios", pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    #: Prepended to every Redis key kombu writes (kombu ``global_keyprefix``); empty = none.
    key_prefix: str = ""
    #: Redis and the SQLite transport redeliver a message not acked within this time. Must exceed
    #: the longest task timeout, or long tasks run twice (celery redis caveats; kombu#337).
    visibility_timeout_s: int = Field(7200, ge=10)
    #: Publish attempts after the first, and the longest a publish may take in all. A broker
    #: outage must not hang the API (celery#6046): past this the task stays PENDING.
    publish_max_retries: int = Field(2, ge=0, le=10)
    publish_timeout_s: float = Field(3.0, gt=0, le=30)
    #: A Redis command with no answer within this fails (kombu's ``socket_timeout``). Without it a broker
    #: that hangs, or vanished without closing the connection (a failover, a NAT or firewall timeout),
    #: held a publish, and the API thread making it, forever: now one attempt costs at most this, a
    #: publish at most (publish_max_retries + 1) times this. Keep it above the slowest command.
    socket_timeout_s: float = Field(5.0, gt=0, le=300)
    #: Seconds between polls for transports without blocking reads (sqlite, filesystem): an idle
    #: agent sees a new message within this time.
    polling_interval_s: float = Field(0.2, gt=0, le=10)
    #: Celery's ``task-sent`` event for every publish (``task_send_sent_event``). Off by default: it is
    #: a second Redis publish per task, nearly half of a submit's publishing cost, and AIOS's ledger
    #: already records the moment. The agents' own events (received, started, succeeded, heartbeats)
    #: stay on either way, so Flower and ``celery events`` still see every agent and every run.
    send_task_sent_events: bool = False

    @model_validator(mode="after")
    def _sentinel_url_has_a_master(self) -> BrokerSettings:
        if self.is_sentinel:
            if not self.sentinel_master:
                raise ValueError(
                    "a sentinel:// broker.url names the Sentinels, not the master: set broker.sentinel_master "
                    "(env AIOS_BROKER__SENTINEL_MASTER) to the name in their 'sentinel monitor <name> ...' line"
                )
            parts = self.url.split(";")
            if any(not part.startswith("sentinel://") or not part[len("sentinel://") :].strip("/") for part in parts):
                raise ValueError(
                    "broker.url: every part of a Sentinel URL is sentinel://host:port, separated by ';' "
                    "(sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379)"
                )
        elif self.sentinel_master:
            raise ValueError(
                f"broker.sentinel_master ({self.sentinel_master!r}) is set but broker.url is not a sentinel:// URL; "
                "list the Sentinels there (sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379) or unset it"
            )
        return self

    @property
    def is_redis(self) -> bool:
        return self.url.startswith(("redis://", "rediss://", "sentinel://", "redis+socket://"))

    @property
    def is_sentinel(self) -> bool:
        """Redis found through Sentinel (``sentinel://`` URLs, with ``sentinel_master``)."""
        return self.url.startswith("sentinel://")

    @property
    def is_sqlite(self) -> bool:
        """AIOS's SQLite transport (:mod:`aios.broker.sqlite_transport`)."""
        return self.url.startswith("sqlite://")

    @property
    def is_filesystem(self) -> bool:
        """kombu's ``filesystem://`` transport."""
        return self.url.startswith("filesystem://")

    @property
    def is_embedded(self) -> bool:
        """A broker inside AIOS's own processes, no server: sqlite:// or kombu's filesystem://."""
        return self.is_sqlite or self.is_filesystem

    @property
    def redelivers_after_visibility_timeout(self) -> bool:
        """Brokers that hand an unacked message out again after ``visibility_timeout_s``."""
        return self.is_redis or self.is_sqlite

    @property
    def has_queue_depths(self) -> bool:
        """Brokers :mod:`aios.broker.queues` reads depths from and purges (Redis lists, the SQLite table)."""
        return self.is_redis or self.is_sqlite


class OrchestratorSettings(_Section):
    #: Longest any task may run; per-task ``timeout_s`` may only be lower.
    task_timeout_s: int = Field(3600, ge=1)
    default_priority: int = Field(5, ge=0, le=9)
    max_retries: int = Field(3, ge=0, le=100)
    sync_interval_s: int = Field(60, ge=1)
    #: The sync job re-dispatches a QUEUED task whose message is in no broker queue and held by no agent
    #: for this long (a lost message), and a PENDING task nobody dispatched for this long.
    lost_message_grace_s: int = Field(60, ge=1)
    #: Exponential backoff between retries: base * 2**(attempt-1), capped, with full jitter.
    retry_backoff_base_s: float = Field(1.0, ge=0)
    retry_backoff_max_s: float = Field(600.0, ge=0)
    #: A task that ignores its soft time limit is killed this many seconds later.
    timeout_grace_s: int = Field(5, ge=1, le=600)
    #: The queue of tasks that name a queue explicitly but none in particular (legacy path).
    default_queue: str = Field("default", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    #: How tasks find an agent (aios.agents.routing): round_robin, weighted_round_robin, least_loaded, shared.
    routing_policy: Literal["round_robin", "weighted_round_robin", "least_loaded", "shared"] = "round_robin"
    #: Most agents that may be registered; 0 = no limit.
    max_agents: int = Field(10, ge=0)


class AgentSettings(_Section):
    #: Pool processes per agent (Celery prefork concurrency).
    concurrency: int = Field(2, ge=1, le=256)
    #: Queues an agent consumes when started without --queues.
    queues: list[str] = Field(default_factory=lambda: ["default"])
    heartbeat_interval_s: float = Field(5.0, gt=0)
    #: An agent without a heartbeat for this long is OFFLINE; default 3 heartbeat intervals.
    heartbeat_timeout_s: float | None = Field(None, gt=0)
    #: Capabilities this agent announces besides the task types it has registered.
    capabilities: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    weight: int = Field(1, ge=1, le=1000)
    #: Above 0, the pool autoscales between ``concurrency`` and this many processes (Celery ``--autoscale``);
    #: pool grow/shrink are then refused by Celery, and /workers/{name}/pool/autoscale changes the range.
    autoscale_max: int = Field(0, ge=0, le=256)
    #: Resource use above which an agent is DEGRADED (percent). CPU defaults to 100 (never): a busy
    #: agent running CPU-bound work is working, not sick; set it lower to steer work off hot hosts.
    cpu_degraded_pct: float = Field(100.0, gt=0, le=100)
    memory_degraded_pct: float = Field(90.0, gt=0, le=100)
    disk_degraded_pct: float = Field(95.0, gt=0, le=100)
    #: The directory whose disk use heartbeats report.
    work_dir: str = "."
    #: argv[0] values agents may run for the `command` task type; empty = none.
    command_allowlist: list[str] = Field(default_factory=list)
    #: The unprivileged user commands run as (neither root nor the agent's own user); required
    #: with a non-empty allowlist, checked at agent start (aios.sandbox.identity).
    command_user: str = ""
    #: Default limits of a command (an admin changes them at run time through /system/limits; a
    #: request may lower them): CPU seconds and memory of the whole command (its cgroup; else
    #: RLIMIT_CPU and RLIMIT_AS per process), wall time, captured output per stream, processes
    #: (pids.max, else RLIMIT_NPROC) and the largest file it may write (RLIMIT_FSIZE).
    command_cpu_s: int = Field(300, ge=1)
    command_memory_mb: int = Field(2048, ge=16)
    command_wall_s: int = Field(600, ge=1)
    command_output_kb: int = Field(1024, ge=1)
    command_pids: int = Field(256, ge=1, le=1_000_000)
    command_file_size_mb: int = Field(1024, ge=1, le=1_048_576)

    @property
    def effective_heartbeat_timeout_s(self) -> float:
        return self.heartbeat_timeout_s or 3 * self.heartbeat_interval_s


class BeatSettings(_Section):
    #: A standby beat takes over within this long after the leader dies.
    lock_ttl_s: float = Field(15.0, ge=1, le=3600)
    #: Period of the short job that starts scheduled tasks and fires periodic schedules.
    tick_s: float = Field(1.0, gt=0, le=60)


class BackupSettings(_Section):
    #: Where backup files and their ``.sha256`` files are written (created if missing).
    dir: str = "var/backups"
    #: How many good backups in ``dir`` retention keeps; older files are deleted.
    keep: int = Field(7, ge=1, le=10_000)
    #: When beat takes a backup: a 5-field cron expression in UTC; empty = never (manual only).
    schedule: str = "0 3 * * *"
    #: pg_dump / pg_restore to run on PostgreSQL (a path, or a name looked up on PATH). Their major
    #: version must be at least the server's: pg_dump refuses to dump a newer server.
    pg_dump: str = "pg_dump"
    pg_restore: str = "pg_restore"

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        value = value.strip()
        if value:
            try:
                parse_cron(value)
            except ValidationFailed as exc:
                raise ValueError(f"not a valid cron expression: {exc.message.removeprefix('cron: ')}") from exc
        return value


class MetricsSettings(_Section):
    #: Where ``aios metrics`` serves the cluster metrics (no credentials: bind it to a private address).
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=1, le=65535)
    #: Folder for the per-process metric files of the API's gunicorn workers (emptied at each start).
    multiproc_dir: str = "var/prometheus"


class TaskSettings(_Section):
    #: Extra modules imported at start that register task types (besides entry points).
    modules: list[str] = Field(default_factory=list)
    #: A running task writes its progress at most this often; a report in between is held, and the latest
    #: held one is written by the next report after the interval or when the run ends. 100 % is always
    #: written at once. Protects the database from a handler that reports in a tight loop.
    progress_interval_s: float = Field(0.2, ge=0, le=60)


class SecuritySettings(_Section):
    #: HS256 signing key for JWTs, at least 32 bytes; or a file holding it (readable by its owner only).
    #: Give it in the environment (AIOS_SECURITY__JWT_SECRET) or as a file, never in the committed TOML.
    jwt_secret: str | None = Field(None, repr=False)
    jwt_secret_file: str | None = None
    jwt_issuer: str = "aios"
    jwt_audience: str = "aios-api"
    access_token_ttl_s: int = Field(900, ge=30, le=86_400)
    refresh_token_ttl_s: int = Field(604_800, ge=60, le=90 * 86_400)
    #: bcrypt work factor (OWASP: at least 10; AIOS insists on 12).
    bcrypt_cost: int = Field(12, ge=12, le=16)
    #: How long a rotated API key keeps working beside its successor (0 to 7 days).
    key_rotation_grace_s: int = Field(86_400, ge=0, le=7 * 86_400)
    #: Usable API keys a viewer or operator may hold at once (0 = no limit; admins are not capped).
    max_keys_per_user: int = Field(100, ge=0)
    #: Requests per user (an agent key: per key) per minute, by route class; logins per client IP per minute.
    rate_limit_read_per_minute: int = Field(1200, ge=1)
    rate_limit_write_per_minute: int = Field(300, ge=1)
    rate_limit_login_per_minute: int = Field(30, ge=1)
    #: Wrong passwords for one username before it is locked, and for how long.
    login_max_failures: int = Field(20, ge=1)
    login_lockout_s: int = Field(900, ge=1)
    #: Origins allowed by CORS; empty = CORS off.
    cors_origins: list[str] = Field(default_factory=list)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    #: Folder of ``aios.ops.log`` (everything) and ``aios.error.log`` (ERROR and worse); empty: no files.
    dir: str = "logs"
    #: Each file is rotated at this size, keeping ``backup_count`` old ones (safe with many processes).
    max_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    backup_count: int = Field(5, ge=0, le=1000)

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(_Section):
    api: ApiSettings = Field(default_factory=ApiSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    orchestrator: OrchestratorSettings = Field(default_factory=OrchestratorSettings)
    agents: AgentSettings = Field(default_factory=AgentSettings)
    tasks: TaskSettings = Field(default_factory=TaskSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    beat: BeatSettings = Field(default_factory=BeatSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    backup: BackupSettings = Field(default_factory=BackupSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _visibility_timeout_exceeds_task_timeout(self) -> Settings:
        agents = self.agents
        if agents.heartbeat_timeout_s is not None and agents.heartbeat_timeout_s <= agents.heartbeat_interval_s:
            raise ValueError(
                f"agents.heartbeat_timeout_s ({agents.heartbeat_timeout_s:g}) must be larger than "
                f"agents.heartbeat_interval_s ({agents.heartbeat_interval_s:g})"
            )
        longest = self.orchestrator.task_timeout_s + self.orchestrator.timeout_grace_s
        if self.broker.redelivers_after_visibility_timeout and self.broker.visibility_timeout_s <= longest:
            raise ValueError(
                f"broker.visibility_timeout_s ({self.broker.visibility_timeout_s}) must be larger than "
                f"orchestrator.task_timeout_s + timeout_grace_s ({longest}), or the broker redelivers "
                "long tasks while they still run"
            )
        if (
            self.broker.redelivers_after_visibility_timeout
            and self.orchestrator.retry_backoff_max_s >= self.broker.visibility_timeout_s
        ):
            raise ValueError(
                f"orchestrator.retry_backoff_max_s ({self.orchestrator.retry_backoff_max_s:g}) must be less than "
                f"broker.visibility_timeout_s ({self.broker.visibility_timeout_s}): a retry waits in the broker as a "
                "countdown message, which the broker redelivers once it outlives the visibility timeout (kombu#337)"
            )
        if self.orchestrator.retry_backoff_max_s < self.orchestrator.retry_backoff_base_s:
            raise ValueError(
                f"orchestrator.retry_backoff_max_s ({self.orchestrator.retry_backoff_max_s}) must be at "
                f"least retry_backoff_base_s ({self.orchestrator.retry_backoff_base_s})"
            )
        return self


def _env_layer(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Turn AIOS_<SECTION>__<KEY> variables into a nested dict, JSON-decoding lists and tables."""
    layer: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        if section not in Settings.model_fields:
            # AIOS_CONFIG and friends are not settings; unknown sections are typos.
            raise ConfigError(f"{name}: unknown section [{section}]")
        field = Settings.model_fields[section].annotation.model_fields.get(key)  # type: ignore[union-attr]
        if field is None:
            raise ConfigError(f"{name}: unknown key {section}.{key}")
        value: Any = raw
        origin = getattr(field.annotation, "__origin__", field.annotation)
        if origin in (list, dict):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name}: {section}.{key} must be JSON ({exc.msg})") from exc
        layer.setdefault(section, {})[key] = value
    return layer


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _file_layer(path: Path | None, explicit: bool) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.exists():
        if explicit:
            raise ConfigError(f"AIOS_CONFIG: file {path} does not exist")
        return {}
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def load_settings(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, the TOML file and the environment (later wins).

    ``overrides`` (a nested dict) is applied last; tests use it instead of mutating globals.
    """
    environ = os.environ if environ is None else environ
    explicit = environ.get("AIOS_CONFIG")
    path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    data = _file_layer(path, explicit=bool(explicit))
    data = _merge(data, _env_layer(environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        given = error.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        lines.append(f"{key}: {message}{shown}")
    return "invalid configuration: " + "; ".join(lines)


def redact_url(url: str) -> str:
    """Hide the password in a database or broker URL before it reaches a log or an API answer."""
    from sqlalchemy.engine import make_url

    if ";" in url:  # kombu's list of alternatives (a Sentinel URL): each part its own URL
        return ";".join(redact_url(part) for part in url.split(";"))
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL we cannot parse is shown without its credentials part
        return url.split("@")[-1]
