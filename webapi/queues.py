"""/api/v1/queues: depth per priority level, oldest message and consumers; purge (admin).

The depths are read from the broker's Redis lists at the moment of the request (``aios.broker.queues``);
``queued_in_ledger`` is the database's count of QUEUED tasks for the queue, which also counts the
messages workers have already prefetched.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ConfigDict, Field

from aios.broker import queues
from aios.broker.inspection import consumers_by_queue
from aios.security.roles import OPERATOR, VIEWER
from webapi.context import ctx
from webapi.requests import json_body, validate
from webapi.security import current_principal, policy, set_audit

bp = Blueprint("queues", __name__, url_prefix="/api/v1/queues")


@bp.get("")
@policy(VIEWER, OPERATOR)
def index() -> Any:
    """Every AIOS queue (configured, per agent, per capability, with QUEUED tasks, or consumed)."""
    context = ctx()
    infos = queues.describe_queues(context.celery, context.settings)
    return jsonify({"queues": queues.queues_as_dicts(infos)})


def _known(name: str) -> None:
    context = ctx()
    queues.check_queue_known(context.settings, name, consumers_by_queue(context.celery, context.settings))


@bp.get("/<name>")
@policy(VIEWER, OPERATOR)
def read(name: str) -> Any:
    context = ctx()
    _known(name)
    (info,) = queues.queues_as_dicts([queues.describe_queue(context.celery, context.settings, name)])
    return jsonify(info)


class PurgeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: Only this level (0-9, 9 most urgent); all levels when absent.
    priority: int | None = Field(None, ge=0, le=9)


@bp.post("/<name>/purge")
@policy(audit_action="queue.purge")
def purge(name: str) -> Any:
    """Drop the waiting messages of a queue (or one level) and mark their tasks CANCELLED."""
    context = ctx()
    body = validate(PurgeRequest, json_body() if request.content_length else {})
    _known(name)
    principal = current_principal()
    outcome = queues.purge(
        context.celery, context.settings, name, priority=body.priority, actor=f"api:{principal.name}"
    )
    set_audit(target=name, **outcome.to_dict())
    return jsonify(outcome.to_dict())
