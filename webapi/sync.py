"""/api/v1/sync: the sync job's recent runs, and running it now (admin).

The job itself (:mod:`aios.recovery.sync`) runs in the beat leader every ``orchestrator.sync_interval_s``;
``POST /run`` runs the same steps at once in this API process, e.g. right after a broker outage.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ConfigDict, Field

from aios.errors import ValidationFailed
from aios.recovery.sync import list_runs, run_sync
from aios.security.roles import OPERATOR, VIEWER
from webapi.context import ctx
from webapi.requests import validate
from webapi.security import current_principal, policy, set_audit
from webapi.workers import NoFields, optional_body

bp = Blueprint("sync", __name__, url_prefix="/api/v1/sync")


class RunsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(20, ge=1)
    #: The id of the last run of the previous page (its ``next_before``).
    before: int | None = Field(None, ge=1)


@bp.get("/runs")
@policy(VIEWER, OPERATOR)
def runs() -> Any:
    """Newest first; pass ``next_before`` back as ``before`` for the next page."""
    settings = ctx().settings
    raw = request.args.to_dict(flat=True)
    query = validate(RunsQuery, raw)
    if query.limit > settings.api.page_max:
        raise ValidationFailed(f"limit: at most {settings.api.page_max}", field="limit")
    page, next_before = list_runs(settings, limit=query.limit, before=query.before)
    return jsonify({"runs": page, "next_before": next_before})


@bp.post("/run")
@policy(audit_action="sync.run")
def run_now() -> Any:
    """Run the sync job once, now, in this process; answers with the recorded run (admin only). It
    takes no fields: a body other than empty or ``{}`` is a 422."""
    optional_body(NoFields)
    context = ctx()
    result = run_sync(context.celery, context.settings, runner=f"api:{current_principal().name}")
    set_audit(
        target=str(result["id"]),
        changed={k: v for k, v in result["changed"].items() if v},
        errors=len(result["errors"]),
    )
    return jsonify(result), 200
