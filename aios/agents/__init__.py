"""Agents: the workers that run tasks, as the ledger knows them.

- :mod:`aios.agents.registry` — registration, heartbeats, health transitions, the healthy set
- :mod:`aios.agents.health` — the pure verdict of an agent's status, with a reason a person can read
- :mod:`aios.agents.placement` — which queue a task goes to (routing policy, rotation state, placement)

Moving a dead agent's work elsewhere is :mod:`aios.recovery`'s job, not this package's.
"""
