"""System limits: the resource thresholds that make an agent DEGRADED, and the default command limits.

Defaults come from the config (``[agents] cpu_degraded_pct``, ``command_cpu_s``, …). An admin may
change them at run time (``PUT /api/v1/system/limits``); the change is one row in the database, so
every agent applies it at its next heartbeat and every API process at its next request — no
restart, no config file to edit on every host. Clearing a value (``null``) returns it to the
config's default.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from aios.agents.health import Thresholds
from aios.config import Settings
from aios.models import SystemLimitsRow
from aios.timeutil import utcnow

ROW_ID = 1


class SystemLimits(BaseModel):
    """Every limit, with its unit in its name."""

    model_config = ConfigDict(extra="forbid")

    cpu_degraded_pct: float = Field(gt=0, le=100)
    memory_degraded_pct: float = Field(gt=0, le=100)
    disk_degraded_pct: float = Field(gt=0, le=100)
    command_cpu_s: int = Field(ge=1, le=7 * 86_400)
    command_memory_mb: int = Field(ge=16, le=1_048_576)
    command_wall_s: int = Field(ge=1, le=7 * 86_400)
    command_output_kb: int = Field(ge=1, le=1_048_576)
    command_pids: int = Field(256, ge=1, le=1_000_000)
    command_file_size_mb: int = Field(1024, ge=1, le=1_048_576)

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(
            cpu_pct=self.cpu_degraded_pct, memory_pct=self.memory_degraded_pct, disk_pct=self.disk_degraded_pct
        )


class LimitsChange(BaseModel):
    """The body of PUT /system/limits: any subset; ``null`` clears an override."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cpu_degraded_pct: float | None = Field(None, gt=0, le=100)
    memory_degraded_pct: float | None = Field(None, gt=0, le=100)
    disk_degraded_pct: float | None = Field(None, gt=0, le=100)
    command_cpu_s: int | None = Field(None, ge=1, le=7 * 86_400)
    command_memory_mb: int | None = Field(None, ge=16, le=1_048_576)
    command_wall_s: int | None = Field(None, ge=1, le=7 * 86_400)
    command_output_kb: int | None = Field(None, ge=1, le=1_048_576)
    command_pids: int | None = Field(None, ge=1, le=1_000_000)
    command_file_size_mb: int | None = Field(None, ge=1, le=1_048_576)


def defaults(settings: Settings) -> dict[str, Any]:
    agents = settings.agents
    return {name: getattr(agents, name) for name in SystemLimits.model_fields}


def overrides(session: Session) -> dict[str, Any]:
    row = session.get(SystemLimitsRow, ROW_ID)
    return dict(row.values) if row is not None else {}


def current(session: Session, settings: Settings) -> SystemLimits:
    """The limits in force: the config's defaults, overlaid with what an admin set."""
    return SystemLimits(**{**defaults(settings), **overrides(session)})


def change(session: Session, settings: Settings, body: LimitsChange, *, actor: str) -> SystemLimits:
    """Apply the fields present in ``body`` (``null`` = back to the default); returns the new limits."""
    given = body.model_dump(exclude_unset=True)
    stored = overrides(session)
    for name, value in given.items():
        if value is None:
            stored.pop(name, None)
        else:
            stored[name] = value
    limits = SystemLimits(**{**defaults(settings), **stored})  # validates the combination
    row = session.get(SystemLimitsRow, ROW_ID, with_for_update=True)
    if row is None:
        session.add(SystemLimitsRow(id=ROW_ID, values=stored, updated_at=utcnow(), updated_by=actor))
    else:
        row.values, row.updated_at, row.updated_by = stored, utcnow(), actor
    return limits
