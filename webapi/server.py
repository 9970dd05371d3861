"""``aios api``: the API under gunicorn (never Flask's development server)."""

from __future__ import annotations

import logging
import os
import shutil
import ssl
from pathlib import Path
from typing import Any

import click
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from aios.cli import server_command
from aios.config import Settings
from aios.db import ensure_migrated
from aios.errors import ConfigError
from aios.ops.log import redact
from aios.security.tls import check_tls_files


class _Redacted(logging.Formatter):
    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


class RedactingGunicornLogger(GunicornLogger):
    """gunicorn's error and access logs through the same redactor as every AIOS log line: the access
    log's request line carries the query string, where a client may have put a key or a token."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False) and not isinstance(handler.formatter, _Redacted):
                    handler.setFormatter(_Redacted(handler.formatter or logging.Formatter()))


def prepare_multiprocess_metrics(settings: Settings) -> Path:
    """Put prometheus_client in multiprocess mode before any gunicorn worker exists.

    Each worker then writes its counters to files in this folder and a scrape of any worker adds all
    of them up. The folder is emptied first: files of a previous run would be counted again.
    """
    from prometheus_client import values

    directory = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.metrics.multiproc_dir).resolve()
    directory = directory / f"api-{settings.api.port}"
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    # prometheus_client picks its value class when first imported; pick again now the folder is set.
    values.ValueClass = values.get_value_class()
    return directory


def _worker_exited(server: Any, worker: Any) -> None:
    """gunicorn ``child_exit``: a dead worker's live gauges must not be reported any more."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


class ApiServer(BaseApplication):
    """gunicorn, configured from AIOS settings; each worker process builds its own app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        api = self.settings.api
        self.cfg.set("bind", f"{api.host}:{api.port}")
        self.cfg.set("workers", api.workers)
        self.cfg.set("threads", api.threads)
        # gthread, with each request read whole by the worker's poller before a thread serves it: a slow
        # client holds a socket, not a thread (webapi/buffered_worker.py).
        self.cfg.set("worker_class", "webapi.buffered_worker.BufferedThreadWorker")
        self.cfg.set("timeout", 60)
        # Below `aios up`'s own grace (aios/ops/supervisor.py STOP_GRACE_S): the master must get to SIGKILL a
        # stuck worker itself before `aios up` has to kill the master, which would orphan that worker.
        self.cfg.set("graceful_timeout", 10)
        self.cfg.set("accesslog", "-")
        # gunicorn's default access line, plus the request id the app put in the response header.
        self.cfg.set(
            "access_log_format",
            '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" request=%({x-request-id}o)s',
        )
        self.cfg.set("logger_class", RedactingGunicornLogger)
        self.cfg.set("loglevel", self.settings.logging.level.lower())
        # Request-line and header limits: part of bounding what one client can make us do.
        self.cfg.set("limit_request_line", 8190)
        self.cfg.set("limit_request_fields", 100)
        self.cfg.set("child_exit", _worker_exited)
        if api.tls_enabled:
            self.cfg.set("certfile", api.tls_cert)
            self.cfg.set("keyfile", api.tls_key)
            if api.tls_client_ca:
                self.cfg.set("ca_certs", api.tls_client_ca)
                self.cfg.set("cert_reqs", ssl.CERT_REQUIRED)
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn >= 24 opens a control socket in $HOME shared by every instance; AIOS does not use it.
            self.cfg.set("control_socket_disable", True)

    def load(self) -> Any:
        from webapi.app import create_app

        return create_app(self.settings)


@click.command("api", help="serve the REST API (gunicorn)")
@click.option("--host", help="overrides [api] host")
@click.option("--port", type=int, help="overrides [api] port")
@click.option("--certfile", help="serve HTTPS with this certificate (PEM); overrides [api] tls_cert")
@click.option("--keyfile", help="the certificate's private key (PEM, mode 600); overrides [api] tls_key")
@server_command
def serve_api(settings: Settings, host: str | None, port: int | None, certfile: str | None, keyfile: str | None) -> int:
    overrides: dict[str, Any] = {}
    if host:
        overrides["host"] = host
    if port:
        overrides["port"] = port
    if bool(certfile) != bool(keyfile):
        raise ConfigError("--certfile and --keyfile go together (TLS needs both)")
    if certfile:
        overrides.update(tls_cert=certfile, tls_key=keyfile)
    if overrides:
        settings = settings.model_copy(update={"api": settings.api.model_copy(update=overrides)})
    # A missing file or a key others can read stops the command here, with exit 2, not in each worker.
    check_tls_files("api", settings.api)
    ensure_migrated(settings.database)
    prepare_multiprocess_metrics(settings)
    # Build one app up front so a bad setting (a weak JWT secret) stops the command with exit 2,
    # instead of every gunicorn worker failing to boot.
    from webapi.app import create_app

    create_app(settings)
    ApiServer(settings).run()
    return 0


def register(group: click.Group) -> None:
    """Entry point for ``aios.commands``: adds ``aios api``."""
    group.add_command(serve_api)
