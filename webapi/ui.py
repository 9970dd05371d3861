"""/ui: the web dashboard, server-rendered from the core library (no HTTP calls to the API).

Who may see and do what is declared per view with :func:`webapi.ui_auth.ui_view` (browser session,
CSRF on every POST, roles re-read from the database on every request); buttons are only shown to
roles that may use them, and every POST checks again. Actions are audited like their API
counterparts (same action names, detail ``via: ui``). Pages answer HTML, errors included.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, flash, redirect, render_template, request, send_from_directory, url_for
from flask.sansio.blueprints import BlueprintSetupState
from sqlalchemy import select
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

from aios.agents import registry as agent_ledger
from aios.broker import queues as queue_ledger
from aios.broker.inspection import consumers_by_queue
from aios.db import session_scope
from aios.errors import AiosError, Conflict, Forbidden, NotFound, TooManyRequests, Unauthorized, ValidationFailed
from aios.models import Agent, ApiKey, AuditEntry, Schedule, User
from aios.ops.backup import create_backup, list_backups
from aios.recovery.reroute import admin_status_changed
from aios.security import api_keys
from aios.security.roles import ADMIN, OPERATOR, VIEWER
from aios.tasks.actions import cancel_task, get_task, retry_task
from aios.tasks.search import SORTS, TaskFilter, check_q, list_tasks
from aios.tasks.states import RETRYABLE, TERMINAL, TaskState
from aios.tasks.view import Reader, bodies_left_out, redact
from aios.tasktypes import get_registry
from aios.timeutil import isoformat, utcnow
from aios.timing.periodic import set_enabled
from webapi.auth import count_login_attempt, verify_login
from webapi.context import ctx
from webapi.security import public, set_audit
from webapi.status import cluster_status
from webapi.ui_auth import (
    CSRF_FIELD,
    HUMAN_ROLES,
    actor,
    check_csrf,
    csrf_token,
    init_ui_sessions,
    sign_in,
    sign_out,
    signed_in_user,
    ui_view,
)

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static" / "ui"
PAGE_SIZE = 50
AUDIT_PAGE_SIZE = 100
#: The dashboard's pages may load scripts, styles and fragments from this origin only; no inline code.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

bp = Blueprint("ui", __name__, url_prefix="/ui", root_path=str(HERE), template_folder="templates")


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    init_ui_sessions(cast(Flask, state.app))  # BlueprintSetupState types the sansio App


@bp.after_request
def _headers(response: Response) -> Response:
    # Runs before the app's security headers, which only fill in what is missing.
    response.headers["Content-Security-Policy"] = CSP
    return response


@bp.app_template_filter("when")
def _when(value: Any) -> str:
    """A time as ``2025-01-31 12:00:05Z`` (UTC, to the second)."""
    text = isoformat(value) if value is not None and not isinstance(value, str) else value
    return f"{text[:19].replace('T', ' ')}Z" if text else "—"


@bp.app_template_filter("pretty_json")
def _pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@bp.context_processor
def _globals() -> dict[str, Any]:
    return {
        "user": signed_in_user(),
        "csrf_token": csrf_token,
        "csrf_field": CSRF_FIELD,
        "ADMIN": ADMIN,
        "OPERATOR": OPERATOR,
        "VIEWER": VIEWER,
    }


def _error_page(status: int, title: str, message: str, headers: dict[str, str] | None = None) -> Response:
    back = _next_page(url_for("ui.overview")) if request.method == "POST" else url_for("ui.overview")
    response = Response(
        render_template("ui/error.html", status=status, title=title, message=message, back=back),
        status=status,
        mimetype="text/html",
    )
    response.headers.update(headers or {})
    return response


@bp.errorhandler(AiosError)
def _aios_error(exc: AiosError) -> Response:
    if exc.status >= 500:
        logger.error("%s: %s", exc.code, exc.message)
    return _error_page(exc.status, exc.code.replace("_", " ").capitalize(), exc.message, exc.headers)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return _error_page(exc.code or 500, exc.name, exc.description or exc.name)


@bp.errorhandler(Exception)
def _unexpected(exc: Exception) -> Response:
    logger.exception("unhandled error in the dashboard")
    return _error_page(500, "Internal error", "Something went wrong; the server log has the details.")


@bp.get("/static/<path:filename>")
@public()
def static_file(filename: str) -> Response:
    """The dashboard's CSS and script (a route of its own so it declares its access like every view)."""
    return send_from_directory(STATIC_DIR, filename, max_age=300)


def _next_page(default: str) -> str:
    """The /ui page named by the form's ``next`` (the page the button was on), else ``default``."""
    target = request.form.get("next", "")
    parts = urlsplit(target)
    if not target.startswith("/ui") or parts.scheme or parts.netloc or "\\" in target:
        return default
    return target


def _done(message: str, default: str) -> WerkzeugResponse:
    """After an action: back to the page the button was on, which says what happened (POST/redirect/GET).

    A refused or failed action raises instead, and the error page answers with the action's status
    (403, 404, 409, ...), so the audit row records the outcome the API would have.
    """
    flash(message, "ok")
    return redirect(_next_page(default), code=303)


# --------------------------------------------------------------------------- sign in and out


@bp.route("/login", methods=["GET", "POST"])
@public()
def login() -> Any:
    """The sign-in form; the same checks as POST /api/v1/auth/token (rate limit per address, lockout)."""
    if request.method == "GET":
        if signed_in_user() is not None:
            return redirect(url_for("ui.overview"), code=303)
        return render_template("ui/login.html", error=None, username="", next=request.args.get("next", ""))
    set_audit(action="auth.login", via="ui")
    check_csrf()
    username = request.form.get("username", "")[:64]
    password = request.form.get("password", "")
    set_audit(target=username or None, principal=username or "anonymous")
    status, error = 200, None
    try:
        count_login_attempt()
        if not username or not password:
            raise Unauthorized("wrong username or password")
        found = verify_login(username, password)
        with session_scope(ctx().settings.database) as session:
            row = session.get(User, found.id)
            password_hash = row.password_hash if row else ""
        if found.role not in HUMAN_ROLES:
            raise Forbidden("an agent account cannot sign in to the dashboard")
    except Unauthorized:
        status, error = 401, "Wrong username or password."
    except (TooManyRequests, Forbidden) as exc:
        status, error = exc.status, exc.message
    if error is not None:
        return render_template(
            "ui/login.html", error=error, username=username, next=request.form.get("next", "")
        ), status
    sign_in(found.id, password_hash)
    return redirect(_next_page(url_for("ui.overview")), code=303)


@bp.post("/logout")
@ui_view(*HUMAN_ROLES, audit="auth.logout")
def logout() -> Any:
    sign_out()
    flash("Signed out.", "ok")
    return redirect(url_for("ui.login"), code=303)


# --------------------------------------------------------------------------- overview


@bp.get("")
@ui_view(*HUMAN_ROLES)
def overview() -> Any:
    return render_template("ui/overview.html", status=cluster_status(ctx().settings, ctx().celery), at=utcnow())


@bp.get("/overview/fragment")
@ui_view(*HUMAN_ROLES, fragment=True)
def overview_fragment() -> Any:
    """The overview's figures alone, HTML, for the page's 5-second refresh (ui.js)."""
    return render_template("ui/_overview_body.html", status=cluster_status(ctx().settings, ctx().celery), at=utcnow())


# --------------------------------------------------------------------------- tasks


@bp.get("/tasks")
@ui_view(*HUMAN_ROLES)
def tasks() -> Any:
    """Newest first (or another sort), filtered by state, type and search text; keyset paging."""
    args = {name: request.args.get(name, "").strip() for name in ("state", "type", "q", "sort", "cursor")}
    sort = args["sort"] if args["sort"] in SORTS else SORTS[0]
    problems = []
    state = args["state"].upper()
    if state and state not in TaskState.__members__:
        problems.append(f"unknown state {state!r}")
        state = ""
    q = args["q"]
    if q:
        try:
            check_q(q)
        except AiosError as exc:
            problems.append(exc.message)
            q = ""
    where = TaskFilter(states=(state,) if state else (), type=args["type"] or None, q=q or None)
    with session_scope(ctx().settings.database) as session:
        with bodies_left_out(session):  # the page shows no bodies
            rows, next_cursor = list_tasks(session, where, limit=PAGE_SIZE, cursor=args["cursor"] or None, sort=sort)
        items = [
            {
                "id": t.id,
                "type": t.type,
                "state": t.state,
                "priority": t.priority,
                "owner": t.owner,
                "agent": t.agent,
                "created_at": t.created_at,
                "updated_at": t.updated_at,
            }
            for t in rows
        ]
    # Any: url_for's own keywords (_external: bool, ...) refuse a **dict[str, str] to mypy.
    kept: dict[str, Any] = {"state": state, "type": args["type"], "q": q, "sort": sort if sort != SORTS[0] else ""}
    kept = {name: value for name, value in kept.items() if value}
    return render_template(
        "ui/tasks.html",
        tasks=items,
        problems=problems,
        filters=kept,
        sorts=SORTS,
        states=list(TaskState),
        types=get_registry().names(),
        paged=bool(args["cursor"]),
        next_url=url_for("ui.tasks", **kept, cursor=next_cursor) if next_cursor else None,
        first_url=url_for("ui.tasks", **kept),
    )


@bp.get("/tasks/<task_id>")
@ui_view(*HUMAN_ROLES)
def task(task_id: str) -> Any:
    with session_scope(ctx().settings.database) as session:
        row = get_task(session, task_id, with_events=True)
        events = [
            {"at": e.at, "actor": e.actor, "from_state": e.from_state, "to_state": e.to_state, "detail": e.detail}
            for e in row.events
        ]
        data = {
            column: getattr(row, column)
            for column in (
                "id",
                "type",
                "state",
                "priority",
                "queue",
                "attempts",
                "max_retries",
                "timeout_s",
                "agent",
                "owner",
                "routing",
                "pinned_agent",
                "on_agent_lost",
                "retry_of",
                "pending_reason",
                "parameters",
                "result",
                "error",
                "created_at",
                "queued_at",
                "started_at",
                "finished_at",
                "run_at",
                "updated_at",
            )
        }
    user = signed_in_user()
    redact(data, owner=data["owner"], reader=Reader(user.name if user else None, is_admin=bool(user and user.is_admin)))
    state = TaskState(data["state"])
    return render_template(
        "ui/task.html", task=data, events=events, can_cancel=state not in TERMINAL, can_retry=state in RETRYABLE
    )


def _only_owner() -> str | None:
    user = signed_in_user()
    return None if user is None or user.is_admin else user.name


@bp.post("/tasks/<task_id>/cancel")
@ui_view(OPERATOR, audit="task.cancel")
def cancel(task_id: str) -> Any:
    cancel_task(ctx().celery, ctx().settings, task_id, actor=actor(), only_owner=_only_owner())
    return _done(f"Task {task_id} cancelled.", url_for("ui.task", task_id=task_id))


@bp.post("/tasks/<task_id>/retry")
@ui_view(OPERATOR, audit="task.retry")
def retry(task_id: str) -> Any:
    """Run a finished task again, as a new task; the page of the new task follows."""
    user = signed_in_user()
    new = retry_task(
        ctx().celery,
        ctx().settings,
        task_id,
        actor=actor(),
        only_owner=_only_owner(),
        owner=user.name if user else None,
    )
    set_audit(new_task=new.id)
    flash(f"Retrying as task {new.id}.", "ok")
    return redirect(url_for("ui.task", task_id=new.id), code=303)


# --------------------------------------------------------------------------- agents


@bp.get("/agents")
@ui_view(*HUMAN_ROLES)
def agents() -> Any:
    with session_scope(ctx().settings.database) as session:
        rows = [
            {
                "name": a.name,
                "status": a.status,
                "status_reason": a.status_reason,
                "admin_status": a.admin_status,
                "capabilities": a.capabilities or [],
                "weight": a.weight,
                "active": a.active,
                "max_concurrency": a.max_concurrency,
                "processed": a.processed,
                "resources": a.resources or {},
                "last_heartbeat_at": a.last_heartbeat_at,
            }
            for a in session.scalars(select(Agent).order_by(Agent.name))
        ]
    return render_template("ui/agents.html", agents=rows)


@bp.post("/agents/<path:name>/status")
@ui_view(OPERATOR, audit="agent.update")
def agent_status(name: str) -> Any:
    """Drain, disable or re-enable (ONLINE) an agent, as PATCH /api/v1/agents/{name} does."""
    status = request.form.get("status", "")
    set_audit(target=name, agent_status=status)

    health = agent_ledger.set_admin_status(ctx().settings, name, status)
    admin_status_changed(ctx().settings, ctx().celery, name, status)
    return _done(f"Agent {name}: {status.lower()} (now {health}).", url_for("ui.agents"))


# --------------------------------------------------------------------------- queues


@bp.get("/queues")
@ui_view(*HUMAN_ROLES)
def queues() -> Any:
    error = None
    try:
        rows = queue_ledger.queues_as_dicts(queue_ledger.describe_queues(ctx().celery, ctx().settings))
    except AiosError as exc:  # the embedded broker has no lists to count; a broker outage is no 500 here
        rows, error = [], exc.message
    return render_template("ui/queues.html", queues=rows, error=error)


#: The priority levels a purge form may name, as the form sends them.
PRIORITY_LEVELS = frozenset(str(level) for level in range(10))


@bp.post("/queues/<name>/purge")
@ui_view(audit="queue.purge")
def purge(name: str) -> Any:
    """Drop a queue's waiting messages (one level, or all) and cancel their tasks (admin)."""
    raw = request.form.get("priority", "")
    set_audit(target=name)
    if raw and raw not in PRIORITY_LEVELS:
        raise ValidationFailed(f"priority: must be 0-9 (got {raw[:20]!r})", field="priority")
    context = ctx()
    queue_ledger.check_queue_known(context.settings, name, consumers_by_queue(context.celery, context.settings))
    outcome = queue_ledger.purge(
        context.celery, context.settings, name, priority=int(raw) if raw else None, actor=actor()
    )
    set_audit(**outcome.to_dict())
    return _done(
        f"Queue {name}: {outcome.purged} message(s) purged, {outcome.cancelled} task(s) cancelled.",
        url_for("ui.queues"),
    )


# --------------------------------------------------------------------------- schedules


@bp.get("/schedules")
@ui_view(*HUMAN_ROLES)
def schedules() -> Any:
    with session_scope(ctx().settings.database) as session:
        rows = [
            {
                "id": s.id,
                "name": s.name,
                "cron": s.cron,
                "interval_s": s.interval_s,
                "type": s.task.get("type"),
                "enabled": s.enabled,
                "owner": s.owner,
                "last_run_at": s.last_slot_at,
                "next_run_at": s.next_run_at if s.enabled else None,
                "last_task_id": s.last_task_id,
            }
            for s in session.scalars(select(Schedule).order_by(Schedule.name))
        ]
    return render_template("ui/schedules.html", schedules=rows)


@bp.post("/schedules/<schedule_id>/enabled")
@ui_view(OPERATOR, audit="schedule.update")
def schedule_enabled(schedule_id: str) -> Any:
    """Pause or resume a schedule (operators: their own; admins: any)."""
    enabled = request.form.get("enabled") == "true"
    set_audit(target=schedule_id, enabled=enabled)

    row = set_enabled(ctx().settings, schedule_id, enabled, only_owner=_only_owner())
    return _done(f"Schedule {row.name} {'resumed' if enabled else 'paused'}.", url_for("ui.schedules"))


# --------------------------------------------------------------------------- admin: backups, keys, audit


@bp.get("/backups")
@ui_view()
def backups() -> Any:
    return render_template("ui/backups.html", backups=list_backups(ctx().settings, limit=100))


@bp.post("/backups")
@ui_view(audit="backup.create")
def backup_create() -> Any:
    """Back up now (synchronously, as POST /api/v1/backups does); a failure is a 500 page and a failed row."""
    row = create_backup(ctx().settings)
    set_audit(target=row["file"], size_bytes=row["size_bytes"])
    return _done(f"Backup written: {row['file']} ({row['size_bytes']} bytes).", url_for("ui.backups"))


@bp.get("/keys")
@ui_view()
def keys() -> Any:
    now = utcnow()
    with session_scope(ctx().settings.database) as session:
        rows = [
            {
                "id": k.id,
                "name": k.name,
                "prefix": k.prefix,
                "role": k.role,
                "owner": k.owner.name if k.owner else None,
                "state": "EXPIRED" if k.state == api_keys.ACTIVE and not api_keys.is_usable(k, now) else k.state,
                "expires_at": k.expires_at,
                "created_at": k.created_at,
                "last_used_at": k.last_used_at,
                "last_used_ip": k.last_used_ip,
            }
            for k in session.scalars(select(ApiKey).order_by(ApiKey.created_at.desc()))
        ]
    return render_template("ui/keys.html", keys=rows, ACTIVE=api_keys.ACTIVE)


@bp.post("/keys/<key_id>/revoke")
@ui_view(audit="key.revoke")
def key_revoke(key_id: str) -> Any:
    """Revoke any key (admin), as POST /api/v1/keys/{id}/revoke does; it stops working on every API process."""
    with session_scope(ctx().settings.database) as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no API key with id {key_id!r}", field="id")
        if row.state == api_keys.REVOKED:
            raise Conflict(f"key {row.prefix} is already revoked", state=row.state)
        row.state, row.revoked_at = api_keys.REVOKED, utcnow()
        message = f"Key {row.prefix} ({row.name}) revoked."
    return _done(message, url_for("ui.keys"))


@bp.get("/audit")
@ui_view()
def audit() -> Any:
    """The audit log, newest first, optionally one principal's or one action's; keyset paging on id."""
    principal, action = request.args.get("principal", "").strip(), request.args.get("action", "").strip()
    before = request.args.get("before", "")
    statement = select(AuditEntry)
    if principal:
        statement = statement.where(AuditEntry.principal == principal[:128])
    if action:
        statement = statement.where(AuditEntry.action == action[:64])
    # ASCII digits only ("²" is a digit to str.isdigit, not to int()), and within a bigint.
    if before.isascii() and before.isdigit() and len(before) <= 18:
        statement = statement.where(AuditEntry.id < int(before))
    with session_scope(ctx().settings.database) as session:
        rows = list(session.scalars(statement.order_by(AuditEntry.id.desc()).limit(AUDIT_PAGE_SIZE + 1)))
        entries = [
            {
                "id": e.id,
                "at": e.at,
                "principal": e.principal,
                "role": e.role,
                "source_ip": e.source_ip,
                "action": e.action,
                "target": e.target,
                "outcome": e.outcome,
                "detail": e.detail,
            }
            for e in rows[:AUDIT_PAGE_SIZE]
        ]
    kept: dict[str, Any] = {  # Any: as in tasks(), for url_for
        name: value for name, value in (("principal", principal), ("action", action)) if value
    }
    next_url = (
        url_for("ui.audit", **kept, before=entries[-1]["id"]) if len(rows) > AUDIT_PAGE_SIZE and entries else None
    )
    return render_template("ui/audit.html", entries=entries, filters=kept, next_url=next_url)
