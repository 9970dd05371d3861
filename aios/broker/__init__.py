"""The broker side: Celery and the queues tasks travel through.

- :mod:`aios.broker.celery_app` — the Celery application configured from AIOS settings, queue names
- :mod:`aios.broker.publish` — ``aios.run`` messages put on the broker, batched, failures reported
- :mod:`aios.broker.priority` — 0-9 API priorities mapped to the transport's order
- :mod:`aios.broker.queues` — queue depth per priority, oldest message, consumers; purge
- :mod:`aios.broker.inspection` — live worker inspection and remote control (Flower's view)
- :mod:`aios.broker.sqlite_transport` — the embedded broker: a kombu transport in one SQLite file
"""
