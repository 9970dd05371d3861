"""Recovery: every repair of lost or stuck work.

- :mod:`aios.recovery.sync` — the sync job: make the broker and the agents agree with the ledger again
"""
