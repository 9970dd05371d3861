"""``aios api``: the API under gunicorn (never Flask's development server)."""

from __future__ import annotations

import argparse
from typing import Any

from gunicorn.app.base import BaseApplication

from aios.config import Settings
from aios.db import ensure_migrated


class ApiServer(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured from AIOS settings; each worker process builds its own app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        api = self.settings.api
        self.cfg.set("bind", f"{api.host}:{api.port}")
        self.cfg.set("workers", api.workers)
        self.cfg.set("threads", api.threads)
        self.cfg.set("worker_class", "gthread")
        self.cfg.set("timeout", 60)
        self.cfg.set("graceful_timeout", 20)
        self.cfg.set("accesslog", "-")
        self.cfg.set("loglevel", self.settings.logging.level.lower())
        # Request-line and header limits: part of bounding what one client can make us do.
        self.cfg.set("limit_request_line", 8190)
        self.cfg.set("limit_request_fields", 100)
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn >= 24 opens a control socket in $HOME shared by every instance; AIOS does not use it.
            self.cfg.set("control_socket_disable", True)

    def load(self) -> Any:
        from webapi.app import create_app

        return create_app(self.settings)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    if overrides:
        settings = settings.model_copy(update={"api": settings.api.model_copy(update=overrides)})
    ensure_migrated(settings.database)
    ApiServer(settings).run()
    return 0


def register(subparsers: Any) -> Any:
    """Entry point for ``aios.commands``: adds ``aios api``."""
    parser = subparsers.add_parser("api", help="serve the REST API (gunicorn)")
    parser.add_argument("--host", help="overrides [api] host")
    parser.add_argument("--port", type=int, help="overrides [api] port")
    return _run
