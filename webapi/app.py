"""The Flask application factory."""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from flask import Flask

from aios.broker.celery_app import create_celery_app
from aios.config import Settings, load_settings
from aios.db import ensure_migrated
from aios.ops.log import configure_logging
from aios.tasktypes import load_task_types
from webapi import (
    agents,
    audit,
    auth,
    backups,
    commands,
    events,
    health,
    keys,
    metrics,
    openapi,
    queues,
    schedules,
    status,
    sync,
    system,
    tasks,
    ui,
    users,
    workers,
)
from webapi.context import ApiContext
from webapi.errors import register_error_handlers
from webapi.request_ids import init_request_ids
from webapi.requests import refuse_unstorable_request_text
from webapi.security import check_every_view_declares_access, init_security


def create_app(settings: Settings | None = None, celery: Celery | None = None, *, check_schema: bool = True) -> Flask:
    """Build the API for ``settings`` (default: loaded from config file and environment).

    Refuses to build on an unmigrated database (``NotMigrated`` names the command to run).
    """
    settings = settings or load_settings()
    configure_logging(settings.logging)
    if check_schema:
        ensure_migrated(settings.database)
    load_task_types(settings.tasks.modules)
    # root_path given explicitly: editable installs hide the package file from Flask's lookup.
    here = Path(__file__).resolve().parent
    app = Flask(__name__, root_path=str(here), instance_path=str(here / "instance"))
    app.config.update(MAX_CONTENT_LENGTH=settings.api.max_body_bytes, JSON_SORT_KEYS=False)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["aios"] = ApiContext(settings=settings, celery=celery or create_celery_app(settings))
    register_error_handlers(app)
    init_request_ids(app)
    metrics.init_metrics(app)
    # Before authentication: text no route can handle is refused before anything reads it.
    app.before_request(refuse_unstorable_request_text)
    init_security(app, settings)
    for blueprint in (
        health.bp,
        auth.bp,
        tasks.bp,
        agents.bp,
        keys.bp,
        users.bp,
        audit.bp,
        schedules.bp,
        status.bp,
        sync.bp,
        backups.bp,
        workers.bp,
        queues.bp,
        metrics.bp,
        system.bp,
        commands.bp,
        events.bp,
        openapi.bp,
        ui.bp,
    ):
        app.register_blueprint(blueprint)
    check_every_view_declares_access(app)
    return app
