"""The agent's Celery consumer: Celery's own, made to survive the loss of a Redis broker.

Celery 5.7's ``Consumer.on_connection_error_after_connected`` calls ``connection.collect()`` and then
``connection.close()``. Closing the collected connection closes its channel, which tries to give back
the messages the agent holds (``restore_unacked_once``) through a transport whose client ``collect()``
already dropped: kombu raises ``AttributeError: 'NoneType' object has no attribute 'hostname'``, which
``ignore_errors`` does not ignore, and the worker dies with "Unrecoverable error" instead of
reconnecting — but only when the broker went away while the agent held a message (a task running), so
it looks random. Found by ``tests/faults/test_redis_outage.py``.

The broker is gone at that moment anyway, so the restore could not have reached it; the messages stay
in kombu's ``unacked`` hash (when Redis kept them) and come back after the visibility timeout, and the
task rows are repaired by the sync job. Treating that error like the connection errors around it is
therefore safe, and keeps the agent alive to reconnect by itself.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

logger = logging.getLogger(__name__)


class AiosConsumer(Consumer):
    """Celery's consumer; a broker connection that cannot be closed cleanly after a loss is dropped."""

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        if connection is not None:
            close = connection.close

            def close_collected() -> None:
                try:
                    close()
                except AttributeError as error:  # the collected transport has no client left
                    logger.warning("dropped the lost broker connection without closing it cleanly: %s", error)

            connection.close = close_collected  # type: ignore[method-assign]
        super().on_connection_error_after_connected(exc)


def install(app: Any) -> None:
    """Make ``app``'s workers use :class:`AiosConsumer`."""
    app.conf.worker_consumer = f"{__name__}:AiosConsumer"
