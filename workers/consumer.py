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

The consumer also publishes task events (received, started, succeeded: Flower's view of every run) in
batches. Celery buffers them and publishes the buffer on the next turn of the event loop, which at an
agent's pace means one Redis publish per event, about three per task, in the process that also fetches,
hands out and acks every message. Here the first buffered event schedules the publish
:data:`EVENT_BATCH_S` later, so the events of that interval go out as one ``task.multi`` message (which
Flower and ``celery events`` read like single events). Celery still publishes at once when 24 are
buffered, and the batch in hand is published when the consumer stops.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

logger = logging.getLogger(__name__)

#: Longest a task event waits to be published with the others of its batch (seconds).
EVENT_BATCH_S = 0.1


class AiosConsumer(Consumer):
    """Celery's consumer; a broker connection that cannot be closed cleanly after a loss is dropped, and
    task events are published in batches."""

    _event_batch_due = False

    def on_send_event_buffered(self) -> None:
        if self.hub is not None and not self._event_batch_due:
            self._event_batch_due = True
            self.hub.call_later(EVENT_BATCH_S, self._publish_event_batch)

    def _publish_event_batch(self) -> None:
        self._event_batch_due = False
        self._flush_events()

    def stop(self) -> None:
        try:
            self._flush_events()  # before the dispatcher closes with the batch in hand
        except Exception as error:  # noqa: BLE001 - the broker may be gone; the events are only monitoring
            logger.warning("could not publish the last task events: %s", error)
        super().stop()

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        if connection is not None:
            close = connection.close

            def close_collected() -> None:
                try:
                    close()
                except AttributeError as error:  # the collected transport has no client left
                    logger.warning("dropped the lost broker connection without closing it cleanly: %s", error)

            connection.close = close_collected
        super().on_connection_error_after_connected(exc)


def install(app: Any) -> None:
    """Make ``app``'s workers use :class:`AiosConsumer`."""
    app.conf.worker_consumer = f"{__name__}:AiosConsumer"
