"""Operations: running AIOS itself rather than tasks.

- :mod:`aios.ops.backup` — database backups, verification, restore and retention
- :mod:`aios.ops.limits` — the resource thresholds that make an agent DEGRADED, default command limits
- :mod:`aios.ops.resources` — psutil figures of this host and process tree
- :mod:`aios.ops.log` — logging set-up shared by every process (text or JSON lines)
- :mod:`aios.ops.cluster_metrics` — cluster-wide Prometheus metrics read from the ledger and the broker
- :mod:`aios.ops.supervisor` — ``aios up``: API, agent and beat under one foreground command
"""
