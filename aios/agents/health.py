"""Agent health: one pure function decides an agent's status, with a reason a person can read.

Order of precedence (first match wins): DISABLED (an operator said so) → OFFLINE (no heartbeat for
``heartbeat_timeout_s``) → DRAINING (an operator said so; finishes its work, takes no new) →
DEGRADED (a resource threshold exceeded) → BUSY (at max concurrency) → ONLINE.

Only ONLINE and BUSY agents receive new work (a BUSY agent's queue simply waits a little).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class AgentStatus(enum.StrEnum):
    ONLINE = "ONLINE"
    BUSY = "BUSY"
    DEGRADED = "DEGRADED"
    DRAINING = "DRAINING"
    DISABLED = "DISABLED"
    OFFLINE = "OFFLINE"


#: Statuses that receive new work.
ROUTABLE: frozenset[AgentStatus] = frozenset({AgentStatus.ONLINE, AgentStatus.BUSY})
#: What an operator can set with PATCH /agents/{name}.
ADMIN_STATUSES = ("ACTIVE", "DRAINING", "DISABLED")


@dataclass(frozen=True)
class Thresholds:
    cpu_pct: float
    memory_pct: float
    disk_pct: float


@dataclass(frozen=True)
class Verdict:
    status: AgentStatus
    reason: str


def decide(
    *,
    admin_status: str,
    last_heartbeat_at: datetime | None,
    now: datetime,
    heartbeat_timeout_s: float,
    resources: dict[str, Any] | None,
    active: int,
    max_concurrency: int,
    thresholds: Thresholds,
) -> Verdict:
    if admin_status == "DISABLED":
        return Verdict(AgentStatus.DISABLED, "disabled by an operator")
    if last_heartbeat_at is None:
        return Verdict(AgentStatus.OFFLINE, "no heartbeat yet")
    age = (now - last_heartbeat_at).total_seconds()
    if age > heartbeat_timeout_s:
        return Verdict(AgentStatus.OFFLINE, f"no heartbeat for {age:.0f}s (timeout {heartbeat_timeout_s:g}s)")
    if admin_status == "DRAINING":
        return Verdict(AgentStatus.DRAINING, "draining: finishing its tasks, taking no new ones")
    over = exceeded(resources or {}, thresholds)
    if over:
        return Verdict(AgentStatus.DEGRADED, "; ".join(over))
    if max_concurrency and active >= max_concurrency:
        return Verdict(AgentStatus.BUSY, f"running {active} of {max_concurrency} tasks")
    return Verdict(AgentStatus.ONLINE, "healthy")


def exceeded(resources: dict[str, Any], thresholds: Thresholds) -> list[str]:
    """Human-readable descriptions of every threshold the figures exceed."""
    checks = (
        ("cpu_pct", "cpu", thresholds.cpu_pct, "agents.cpu_degraded_pct"),
        ("memory_pct", "memory", thresholds.memory_pct, "agents.memory_degraded_pct"),
        ("disk_pct", "disk", thresholds.disk_pct, "agents.disk_degraded_pct"),
    )
    found = []
    for key, label, limit, setting in checks:
        value = resources.get(key)
        if isinstance(value, int | float) and value > limit:
            found.append(f"{label} {value:.0f}% is above the threshold {setting} = {limit:g}%")
    return found
