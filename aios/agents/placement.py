"""Placement: the AIOS queue each task is published to, by its routing policy and the healthy agents.

Pure policy lives in :mod:`aios.agents.routing`; this module feeds it the healthy set (cached about a second)
and the shared rotation state, one call per dispatch batch — not per task.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aios.agents import routing
from aios.agents.registry import agent_queue, capability_queue, healthy_agents
from aios.agents.rotation import with_state
from aios.config import Settings

#: Routing values that mean "publish to the task's own queue" (explicit queue, or tasks from before routing).
QUEUE_ROUTING = (None, "queue")


@dataclass(frozen=True)
class Placeable:
    id: str
    type: str
    routing: str | None
    pinned_agent: str | None
    queue: str


def place(settings: Settings, rows: Sequence[Placeable]) -> dict[str, str | None]:
    """Task id → AIOS queue, or None when no healthy agent can take it now."""
    placed: dict[str, str | None] = {}
    by_policy: dict[tuple[str, str], list[Placeable]] = defaultdict(list)
    healthy: list[routing.Candidate] | None = None
    for row in rows:
        if row.routing in QUEUE_ROUTING:
            placed[row.id] = row.queue
            continue
        healthy = healthy if healthy is not None else healthy_agents(settings)
        candidates = routing.capable(healthy, row.type)
        if row.routing == "pinned":
            ok = any(c.name == row.pinned_agent for c in candidates)
            placed[row.id] = agent_queue(row.pinned_agent) if ok and row.pinned_agent else None
        elif not candidates:
            placed[row.id] = None
        elif row.routing == "shared":
            placed[row.id] = capability_queue(row.type)
        else:
            by_policy[(row.routing or settings.orchestrator.routing_policy, row.type)].append(row)
    for (policy, capability), group in by_policy.items():
        candidates = routing.capable(healthy or [], capability)
        picks = _picks(settings, policy, capability, candidates, len(group))
        for row, agent in zip(group, picks, strict=True):
            placed[row.id] = agent_queue(agent)
    return placed


def _picks(
    settings: Settings, policy: str, capability: str, candidates: list[routing.Candidate], count: int
) -> list[str]:
    if policy == "least_loaded":
        return routing.least_loaded(candidates, count)
    if policy == "weighted_round_robin":
        weights = {c.name: c.weight for c in candidates}

        def weighted(state: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
            picks, credit = routing.smooth_weighted(weights, state.get("credit", {}), count)
            return picks, {"credit": credit}

        return with_state(settings, f"wrr:{capability}", weighted)
    names = [c.name for c in candidates]

    def round_robin(state: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        picks, last = routing.round_robin(names, state.get("last"), count)
        return picks, {"last": last}

    return with_state(settings, f"rr:{capability}", round_robin)
