"""Timing: what happens at a time rather than on a request.

- :mod:`aios.timing.cron` — the 5-field cron parser and next firing time (a leaf: anything may import it)
- :mod:`aios.timing.periodic` — periodic schedules stored in the database, fired by the beat leader
- :mod:`aios.timing.delayed` — tasks submitted with ``run_at``/``delay_s``, held until their time
- :mod:`aios.timing.beat` — ``aios beat``: Celery beat running AIOS's jobs behind a leader lease
- :mod:`aios.timing.lease` — the named, expiring lock that picks the beat leader
"""
