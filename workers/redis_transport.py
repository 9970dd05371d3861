"""kombu's Redis transport for agents, with each ack written together with the next delivery.

kombu emulates acks on Redis: every delivered message is copied to the ``unacked`` hash and index (one
MULTI/EXEC round trip) and removed from them when acked (another). Both run on the worker's single event
loop, which also fetches each message and hands it to a pool process; at an agent's pace they are most
of that loop's time (py-spy, BENCHMARKS.md "End to end"), and while the loop waits on Redis a pool
process that has finished waits for its next task.

Here an ack frees the prefetch slot at once, as before, but its removal from the hash and index is kept
until the next write this channel makes anyway: the next delivery's own MULTI/EXEC carries it, so a busy
agent pays one round trip per message instead of two. An idle agent writes what is left at most
:data:`ACK_FLUSH_S` later (a timer on the event loop), and everything is written before the channel
gives its unacked messages back (shutdown, connection loss).

What a kept ack risks: a worker killed in that interval leaves the acked message in the hash, and the
visibility-timeout sweep later delivers it again. AIOS already expects redelivery (acks are late, so a
crash during a task redelivers it too): the task row is finished and its dispatch fence no longer
matches, so the runner drops the copy without running it (:mod:`workers.runner`). Nothing is lost:
a message is only ever removed *later* than kombu would remove it, never earlier.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

logger = logging.getLogger(__name__)

#: The URL schemes that mean these transports in an agent's process (socket URLs keep kombu's).
SCHEMES = {"redis": "Transport", "rediss": "Transport", "sentinel": "SentinelTransport"}

#: Longest an ack waits for a delivery to travel with (seconds), when the agent is idle.
ACK_FLUSH_S = 0.05


class DeferredAckQoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, with acks written in the same transaction as the next delivery."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # kombu's QoS is unannotated, and untyped_calls_exclude does not cover calls through super().
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        #: Delivery tags acked but still in the unacked hash and index.
        self.acked: list[str] = []

    def _queue_removals(self, pipe: Any) -> list[str]:
        tags = list(self.acked)
        if tags:
            pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags)
        return tags

    def _written(self, tags: list[str]) -> None:
        # Only what this write carried: an ack added meanwhile stays for the next one.
        del self.acked[: len(tags)]

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        with self.pipe_or_acquire() as pipe:
            tags = self._queue_removals(pipe)
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                self.unacked_key, delivery_tag, dumps([message._raw, exchange, routing_key])
            ).execute()
            self._written(tags)
            virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self.acked.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def flush_acks(self) -> None:
        """Write every kept ack now (the idle timer, and before unacked messages are given back)."""
        if not self.acked:
            return
        with self.pipe_or_acquire() as pipe:
            tags = self._queue_removals(pipe)
            pipe.execute()
            self._written(tags)

    def _flush_before_restore(self) -> None:
        """Write the kept acks before unacked messages are given back. If the broker cannot take them
        now, they are dropped, not retried: the channel is closing (or recovering), and the visibility
        sweep redelivers those messages, which the dispatch fence skips. Dropping them also keeps the
        close from trying the dead broker twice (``restore_unacked_once`` calls ``restore_unacked``)."""
        try:
            self.flush_acks()
        except Exception as exc:  # noqa: BLE001 - the broker is likely gone
            logger.warning(
                "could not write %d kept acks before restoring unacked messages (the visibility "
                "sweep redelivers them; the dispatch fence skips them): %s",
                len(self.acked),
                exc,
            )
            self.acked.clear()

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        # The channel's close: kombu skips the restore when nothing is unacked, so flush here too.
        self._flush_before_restore()
        return super().restore_unacked_once(stderr)  # type: ignore[no-untyped-call]  # as in __init__

    def restore_unacked(self, client: Any = None) -> None:
        self._flush_before_restore()
        super().restore_unacked(client)  # type: ignore[no-untyped-call]  # as in __init__


class Channel(kombu_redis.Channel):
    QoS = DeferredAckQoS


class SentinelChannel(kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (master found through Sentinel on every connection) with the same acks."""

    QoS = DeferredAckQoS


class _AckFlushTimer:
    """The idle ack flush on the worker's event loop, for both transports below."""

    channels: list[Any]

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[misc]  # kombu's Transport, next in the MRO
        # One timer, whatever the number of reconnects (each registers the transport again).
        previous = getattr(self, "_ack_flush_tref", None)
        if previous is not None:
            previous.cancel()
        self._ack_flush_tref = loop.call_repeatedly(ACK_FLUSH_S, self._flush_acks)

    #: Set while the idle flush fails (a broker outage): it retries every tick but warns only once.
    _ack_flush_failing = False

    def _flush_acks(self) -> None:
        for channel in list(self.channels):
            qos = channel._qos  # never create a QoS just to flush it
            if isinstance(qos, DeferredAckQoS) and qos.acked:
                try:
                    qos.flush_acks()
                except Exception as exc:  # noqa: BLE001 - retried on the next tick or delivery
                    if not self._ack_flush_failing:
                        logger.warning(
                            "could not write %d kept acks (retrying every %g s): %s", len(qos.acked), ACK_FLUSH_S, exc
                        )
                    self._ack_flush_failing = True
                else:
                    self._ack_flush_failing = False


class Transport(_AckFlushTimer, kombu_redis.Transport):
    """The agent's Redis transport (what ``redis://`` and ``rediss://`` mean once :func:`install` ran)."""

    Channel = Channel


class SentinelTransport(_AckFlushTimer, kombu_redis.SentinelTransport):
    """The agent's transport behind Redis Sentinel (what ``sentinel://`` means once :func:`install` ran).

    Acks kept in a :class:`DeferredAckQoS` when the master fails over are written to the new master
    with the next delivery, or dropped if the write fails: the old master's unacked hash is gone with
    its unreplicated writes anyway, and the ledger's dispatch fence skips any redelivered copy."""

    Channel = SentinelChannel


def install() -> None:
    """Make ``redis://``, ``rediss://`` and ``sentinel://`` mean these transports in this process (an agent's).

    Through kombu's alias table rather than Celery's ``broker_transport``, so the worker still logs
    and reports its broker as ``redis://host:port/db``."""
    from kombu import transport

    for scheme, name in SCHEMES.items():
        transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:{name}"
        getattr(transport, "_transport_cache", {}).pop(scheme, None)
