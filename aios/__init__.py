"""AIOS: an orchestrator for AI and batch workloads on Celery, with a durable PostgreSQL (or SQLite) ledger.

The vocabulary, one package per noun (a concept's home is guessable from its name):

- :mod:`aios.tasks` — a task's life: its spec, the one creation function, the state machine (the
  one writer of ``tasks.state``), search, reads, progress, bulk actions and the event feeds.
- :mod:`aios.agents` — agents: the registry, heartbeat verdicts (health) and placement.
- :mod:`aios.recovery` — every repair of lost or stuck work (the sync job).
- :mod:`aios.timing` — time: cron (a leaf), periodic schedules, delayed tasks, beat and its lease.
- :mod:`aios.broker` — the Celery app, queue depths and purge, inspection, priorities, the SQLite transport.
- :mod:`aios.security` — users, passwords, tokens, API keys, roles, audit, secrets.
- :mod:`aios.ops` — running AIOS: backups, limits, resources, logging, cluster metrics, ``aios up``.
- :mod:`aios.sandbox` — how a command runs: its unprivileged user, its cgroup, its limits.
- :mod:`aios.tasktypes` — what a task of a given ``type`` does: the registry and the built-ins.

Beside them, the modules everything shares: :mod:`aios.config` (typed settings; the original
system's config file is recognised by :mod:`aios.original_config`), :mod:`aios.errors`
(the one error tree), :mod:`aios.db` and :mod:`aios.models` (the ledger), :mod:`aios.migrate`,
:mod:`aios.timeutil` and :mod:`aios.text`. ``webapi`` and ``workers`` import ``aios``; ``aios`` imports
neither, and the client (:mod:`aios_client`) imports nothing of the server.
"""
