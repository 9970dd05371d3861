"""/api/v1/status: one answer to "how is the cluster doing?"."""

from __future__ import annotations

from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from celery import Celery
from flask import Blueprint, jsonify
from sqlalchemy import func, select

from aios.config import Settings
from aios.db import session_scope
from aios.errors import AiosError
from aios.models import Agent, Backup, SyncRun, Task
from aios.security.roles import OPERATOR, VIEWER
from aios.timeutil import isoformat, utcnow
from aios.timing import lease
from aios.timing.beat import LEASE_NAME
from webapi.context import ctx
from webapi.security import policy

bp = Blueprint("status", __name__, url_prefix="/api/v1/status")


def _version() -> str:
    try:
        return version("aios")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
        return "unknown"


@bp.get("")
@policy(VIEWER, OPERATOR)
def status() -> Any:
    return jsonify(cluster_status(ctx().settings, ctx().celery))


def _ha(settings: Settings) -> dict[str, Any] | None:
    """The pair's view (``aios ha status``), or None on the embedded default, which has no replication."""
    from aios.ops.ha import ha_status, has_replication

    return ha_status(settings).to_dict() if has_replication(settings) else None


def cluster_status(settings: Settings, celery: Celery) -> dict[str, Any]:
    """The figures of GET /api/v1/status, also shown (and refreshed) by the dashboard's overview."""
    since = utcnow() - timedelta(hours=1)
    with session_scope(settings.database) as session:
        agents = dict(session.execute(select(Agent.status, func.count()).group_by(Agent.status)).all())
        tasks = dict(
            session.execute(select(Task.state, func.count()).where(Task.updated_at >= since).group_by(Task.state)).all()
        )
        finished = session.scalar(select(func.count()).select_from(Task).where(Task.finished_at >= since)) or 0
        last_sync = session.scalars(select(SyncRun).order_by(SyncRun.id.desc()).limit(1)).first()
        last_backup = session.scalars(select(Backup).order_by(Backup.id.desc()).limit(1)).first()
    leader = lease.current(settings, LEASE_NAME)
    queues: dict[str, Any] | None
    queues_error: str | None
    try:
        from aios.broker.queues import describe_queues

        queues = {
            info.name: {
                "depth": sum(level.depth for level in info.levels),
                "by_priority": {str(level.priority): level.depth for level in info.levels if level.depth},
            }
            for info in describe_queues(celery, settings)
        }
    except AiosError as exc:  # the embedded broker has no lists to count; a broker outage is not a 500 here
        queues = None
        queues_error = exc.message
    else:
        queues_error = None
    return {
        "version": _version(),
        "ha": _ha(settings),
        "beat_leader": {"holder": leader.holder, "expires_at": isoformat(leader.expires_at)}
        if leader and leader.live
        else None,
        "agents": agents,
        "queues": queues,
        **({"queues_error": queues_error} if queues_error else {}),
        "tasks_last_hour": tasks,
        "throughput_per_minute": round(finished / 60, 2),
        "last_sync_run": {
            "id": last_sync.id,
            "started_at": isoformat(last_sync.started_at),
            "duration_s": last_sync.duration_s,
            "errors": last_sync.errors,
        }
        if last_sync
        else None,
        "last_backup": {
            "id": last_backup.id,
            "created_at": isoformat(last_backup.created_at),
            "status": last_backup.status,
            "path": last_backup.path,
        }
        if last_backup
        else None,
    }
