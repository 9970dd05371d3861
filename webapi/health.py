"""Liveness and readiness probes (no authentication: load balancers and orchestrators call them)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from aios.config import redact_url
from aios.db import ensure_migrated, ping
from webapi.context import ctx
from webapi.security import public

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@public()
def healthz() -> Any:
    """The process is up and serving requests; says nothing about its dependencies."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@public()
def readyz() -> Any:
    """Ready to accept work: the database answers (and is migrated) and the broker accepts connections."""
    context = ctx()
    checks: dict[str, dict[str, Any]] = {}
    try:
        ping(context.settings.database)
        ensure_migrated(context.settings.database)
        checks["database"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks["database"] = {"ok": False, "error": _describe(exc)}
    try:
        with context.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=2)
            connection.default_channel  # noqa: B018 - opens the channel: the real round trip
        checks["broker"] = {"ok": True, "url": redact_url(context.settings.broker.url)}
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = {"ok": False, "error": _describe(exc)}
    ready = all(check["ok"] for check in checks.values())
    return jsonify({"status": "ready" if ready else "not_ready", "checks": checks}), 200 if ready else 503


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"
