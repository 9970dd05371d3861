"""Tasks: everything about one task's life in the ledger.

- :mod:`aios.tasks.spec` — the spec of a new task: a request's body validated, defaults applied
- :mod:`aios.tasks.create` — the one function that creates tasks (then publishes them); dispatch of stored ones
- :mod:`aios.tasks.states` — the state machine, the only writer of ``tasks.state``
- :mod:`aios.tasks.states_postgres` — its one-statement fenced claim and outcome on PostgreSQL (private)
- :mod:`aios.tasks.retries` — the one retry-or-give-up decision after a failed or lost run
- :mod:`aios.tasks.actions` — find, cancel and retry one task
- :mod:`aios.tasks.bulk` — cancel or retry every task a filter selects
- :mod:`aios.tasks.search` — the list filter, sort orders and keyset cursor
- :mod:`aios.tasks.view` — what a reader is shown of a task (bodies, previews, private fields)
- :mod:`aios.tasks.progress` — progress reported by a running task
- :mod:`aios.tasks.events` — task and agent events as ordered, resumable feeds
- :mod:`aios.tasks.stats` — cluster-wide task counts and histograms from the ledger
"""
