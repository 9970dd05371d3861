"""/api/v1/backups: take a database backup now, and list backups (admin only).

Restore is deliberately not here: it replaces the database under the running API, so it is a CLI
command (``aios backup restore``) run by someone with shell access, with the API stopped.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ConfigDict, Field

from aios.ops.backup import create_backup, list_backups
from aios.security.roles import ADMIN
from webapi.context import ctx
from webapi.requests import validate
from webapi.security import policy, set_audit
from webapi.workers import NoFields, optional_body

bp = Blueprint("backups", __name__, url_prefix="/api/v1/backups")


class BackupQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(100, ge=1, le=1000)


@bp.post("")
@policy(ADMIN, audit_action="backup.create")
def create() -> Any:
    """Back up now, synchronously: 201 with the row; a failure is 500 ``backup_failed`` with its row.
    It takes no fields: a body other than empty or ``{}`` is a 422 (like every endpoint)."""
    optional_body(NoFields)
    row = create_backup(ctx().settings)
    set_audit(target=row["file"], size_bytes=row["size_bytes"])
    return jsonify(row), 201


@bp.get("")
@policy(ADMIN)
def index() -> Any:
    """Backups rows (good, failed and deleted by retention), newest first."""
    raw = request.args.to_dict(flat=True)
    query = validate(BackupQuery, raw)
    return jsonify({"backups": list_backups(ctx().settings, limit=query.limit)})
