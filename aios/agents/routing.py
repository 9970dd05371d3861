"""Routing: which agent gets a task. Pure functions over the healthy set, unit-tested on their own.

Policies:

* ``round_robin`` (default): the next capable agent after the last one chosen, in name order. The
  cursor is the *name* of the last agent (shared by every API process), not an index, so agents
  joining or leaving never make the rotation skip or repeat anyone.
* ``weighted_round_robin``: smooth weighted round robin (as nginx does it): over any window each
  agent gets its share of ``weight / total weight``, interleaved rather than in bursts.
* ``least_loaded``: fewest tasks in flight per unit of weight (from the ledger, plus those assigned
  in the same batch).
* ``shared``: no agent is chosen; the task goes to its capability's queue and Celery's competing
  consumers decide (``cap.<capability>``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

POLICIES = ("round_robin", "weighted_round_robin", "least_loaded", "shared")


@dataclass(frozen=True)
class Candidate:
    name: str
    capabilities: frozenset[str]
    weight: int = 1
    #: Tasks in flight (queued or running) on this agent.
    load: int = 0


def capable(agents: Sequence[Candidate], capability: str) -> list[Candidate]:
    return sorted((a for a in agents if capability in a.capabilities), key=lambda a: a.name)


def next_round_robin(names: Sequence[str], last: str | None) -> str:
    """The first name after ``last`` in sorted order (wrapping); ``last`` need not be in ``names``."""
    ordered = sorted(names)
    if last is not None:
        for name in ordered:
            if name > last:
                return name
    return ordered[0]


def round_robin(names: Sequence[str], last: str | None, count: int) -> tuple[list[str], str | None]:
    """``count`` picks continuing the rotation after ``last``; returns (picks, new last)."""
    picks: list[str] = []
    for _ in range(count):
        last = next_round_robin(names, last)
        picks.append(last)
    return picks, last


def smooth_weighted(
    weights: Mapping[str, int], current: Mapping[str, int], count: int
) -> tuple[list[str], dict[str, int]]:
    """Smooth weighted round robin: ``count`` picks and the new per-agent credit.

    Each step every agent gains its weight in credit; the one with the most credit (ties: by name)
    is picked and pays the total weight. Agents that left drop out; new ones start at 0.
    """
    credit = {name: int(current.get(name, 0)) for name in weights}
    total = sum(weights.values())
    picks: list[str] = []
    for _ in range(count):
        for name, weight in weights.items():
            credit[name] += weight
        chosen = max(sorted(credit), key=lambda name: credit[name])
        credit[chosen] -= total
        picks.append(chosen)
    return picks, credit


def least_loaded(agents: Sequence[Candidate], count: int) -> list[str]:
    """Assign ``count`` tasks one by one to the agent with the lowest (load + assigned) / weight."""
    load = {a.name: a.load for a in agents}
    weight = {a.name: max(1, a.weight) for a in agents}
    picks: list[str] = []
    for _ in range(count):
        chosen = min(sorted(load), key=lambda name: (load[name] / weight[name], name))
        load[chosen] += 1
        picks.append(chosen)
    return picks


@dataclass
class Assignment:
    """Where each task goes: an agent queue, or a shared capability queue."""

    agent_for: dict[str, str] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)
    unroutable: list[str] = field(default_factory=list)
