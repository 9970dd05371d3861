"""/api/v1/commands: run a program on an agent under resource limits (the ``command`` task type).

A command is an ordinary task (same ledger, routing, cancel and idempotency as POST /tasks) whose
parameters this endpoint checks against the limits in force: a request may lower a limit, only an
admin may raise one. With ``wait_s`` the call waits for the task to finish, so a short command is
one round trip. A wait holds a thread, so waits are capped (:mod:`webapi.holds`): per user across
all API processes (``api.max_waits_per_principal``, 429 before anything is accepted), and per process
together with the event streams (``api.threads - 1``; past that the command is accepted and answered
at once with 202, as without ``wait_s``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Annotated, Any

from flask import Blueprint, jsonify, url_for
from pydantic import ConfigDict, Field, StringConstraints

from aios.config import Settings
from aios.db import session_scope
from aios.errors import ValidationFailed
from aios.ops.limits import current
from aios.sandbox.run import COMMAND_TYPE, CommandLimits, CommandParameters, raised_limits, task_timeout_for
from aios.security.roles import ADMIN, OPERATOR
from aios.tasks.actions import get_task, task_to_dict
from aios.tasks.spec import TaskRequest, to_spec
from aios.tasks.states import TERMINAL
from aios.tasks.view import Reader
from webapi.context import ctx
from webapi.holds import WAIT, hold, thread_budget
from webapi.requests import json_body, validate
from webapi.security import current_principal, policy, reader, set_audit
from webapi.tasks import accept, idempotency_key

bp = Blueprint("commands", __name__, url_prefix="/api/v1/commands")

#: Longest a call may wait for its command to finish.
MAX_WAIT_S = 60
#: Polling the ledger while waiting: first pause, growth, longest pause.
FIRST_POLL_S, POLL_GROWTH, MAX_POLL_S = 0.05, 1.5, 0.5
#: A wait's per-user lease outlives its wait by this much (the last ledger read), then expires by itself.
LEASE_SLACK_S = 10
#: The fields of the body that become the task's parameters.
PARAMETER_FIELDS = frozenset(CommandParameters.model_fields)


class StrictLimits(CommandLimits):
    model_config = ConfigDict(extra="forbid", strict=True)


class CommandRequest(CommandParameters):
    """The body of POST /commands: the command's parameters and how to submit (and wait for) its task."""

    model_config = ConfigDict(extra="forbid", strict=True)

    limits: StrictLimits = Field(default_factory=StrictLimits)
    agent: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    priority: int | None = Field(None, ge=0, le=9)
    wait_s: float = Field(0, ge=0, le=MAX_WAIT_S, allow_inf_nan=False)


@bp.post("")
@policy(OPERATOR, audit_action="command.submit")
def submit() -> Any:
    """Accept one command: 202 with its task, or 200 with the finished task when it ended within ``wait_s``."""
    context = ctx()
    settings = context.settings
    body = validate(CommandRequest, json_body())
    principal = current_principal()
    with session_scope(settings.database) as session:
        system = current(session, settings)
    raised = raised_limits(body, system)
    if raised and principal.role != ADMIN:
        field, message = raised[0]
        raise ValidationFailed(f"{message}; a request may lower a limit, only an admin may raise it", field=field)
    task_timeout_max_s = settings.orchestrator.task_timeout_s
    if body.timeout_s is not None and body.timeout_s > task_timeout_max_s:
        raise ValidationFailed(
            f"timeout_s: must be at most orchestrator.task_timeout_s ({task_timeout_max_s})", field="timeout_s"
        )
    params = CommandParameters.model_validate(body.model_dump(include=set(PARAMETER_FIELDS)))
    task_request = TaskRequest(
        type=COMMAND_TYPE,
        parameters=params.model_dump(mode="json", exclude_none=True),
        priority=body.priority,
        timeout_s=task_timeout_for(body.timeout_s or system.command_wall_s, task_timeout_max_s),
        agent=body.agent,
    )
    spec = replace(to_spec(settings, task_request, idempotency_key=idempotency_key()), owner=principal.name)
    lease = release_thread = None
    if body.wait_s:
        # The per-user cap first: a 429 must come before the task is accepted, so a retry is no duplicate.
        lease = hold(
            WAIT,
            principal,
            settings.api.max_waits_per_principal,
            body.wait_s + LEASE_SLACK_S,
            setting="api.max_waits_per_principal",
        )
    try:
        task, created = accept(spec)
        set_audit(argv0=body.argv[0][:200], wait_s=body.wait_s)  # not the whole argv: it may hold secrets
        if body.wait_s and task["state"] not in TERMINAL:
            release_thread = thread_budget(settings).take(WAIT)
            if release_thread is None:
                set_audit(wait_skipped=True)  # api.threads - 1 threads already wait or stream
            else:
                task = wait_finished(settings, task["id"], body.wait_s, reader=reader())
    finally:
        if release_thread is not None:
            release_thread()
        if lease is not None:
            lease.release()
    response = jsonify(task)
    response.headers["Location"] = url_for("tasks.read", task_id=task["id"])
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return response, 200 if task["state"] in TERMINAL else 202


def wait_finished(settings: Settings, task_id: str, wait_s: float, *, reader: Reader) -> dict[str, Any]:
    """The task once it is in a terminal state, or as it is after ``wait_s`` seconds, as ``reader`` sees it."""
    deadline = time.monotonic() + wait_s
    pause = FIRST_POLL_S
    while True:
        with session_scope(settings.database) as session:
            task = task_to_dict(get_task(session, task_id), reader=reader)
        left = deadline - time.monotonic()
        if task["state"] in TERMINAL or left <= 0:
            return task
        time.sleep(min(pause, left))
        pause = min(pause * POLL_GROWTH, MAX_POLL_S)
