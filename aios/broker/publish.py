"""Publishing ``aios.run`` messages: one per queued task, over one producer connection.

The ledger decides what to publish (:mod:`aios.tasks.create`: a task is QUEUED with a fresh dispatch
id, committed, and only then published); this module only puts the messages on the broker, fast, and
reports which did not make it, so the caller can move those tasks back to PENDING. A message's Celery
task id is the task's id and its only argument is the dispatch id (:mod:`workers.runner` fences on it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from aios.broker.celery_app import RUN_TASK_NAME, queue_name
from aios.broker.priority import to_transport
from aios.config import Settings
from aios.timeutil import isoformat, utcnow

logger = logging.getLogger(__name__)

#: Message header with the publish time (ISO 8601, UTC); Celery's own headers carry none.
PUBLISHED_AT_HEADER = "aios_published_at"
#: Messages per Redis pipeline round trip when several are published at once.
PUBLISH_CHUNK = 500


@dataclass(frozen=True)
class Dispatch:
    """What one publish needs to know about a task."""

    task_id: str
    dispatch_id: str
    queue: str
    priority: int
    timeout_s: int
    countdown_s: float | None = None


def publish(celery: Celery, settings: Settings, dispatches: Sequence[Dispatch]) -> dict[str, str]:
    """Publish one message per dispatch over one producer connection; returns failures (id → error).

    Several messages go in chunks of :data:`PUBLISH_CHUNK` through kombu's publish batch (one Redis
    pipeline round trip per chunk instead of one per message; transports without batches publish each
    at once). A chunk whose flush fails counts as failed whole, even if Redis took part of it: those
    tasks go back to PENDING and are dispatched again under a new dispatch id, so a message that did
    land is fenced off when it arrives (:mod:`workers.runner`). A single message retries a bounded number
    of times (``broker.publish_max_retries`` within ``publish_timeout_s``); once the broker has failed,
    the rest are not even tried, so a batch against a dead broker costs one timeout, not one per task.
    """
    failures: dict[str, str] = {}
    if not dispatches:
        return failures
    chunks = [dispatches[start : start + PUBLISH_CHUNK] for start in range(0, len(dispatches), PUBLISH_CHUNK)]
    try:
        with celery.producer_or_acquire() as producer:
            queues = _BoundQueues(celery, settings, producer)
            for index, chunk in enumerate(chunks):
                try:
                    if len(chunk) == 1:
                        _send(celery, settings, producer, queues, chunk[0])
                    else:
                        with producer.batch(max_size=len(chunk) * 2):
                            for item in chunk:
                                if queues.connected and item.countdown_s is None:
                                    _send_in_batch(celery, settings, producer, queues, item)
                                else:
                                    _send(celery, settings, producer, queues, item)
                except Exception as exc:  # noqa: BLE001 - any broker error leaves the rest PENDING
                    message = f"{type(exc).__name__}: {exc}"
                    rest = [item for later in chunks[index:] for item in later]
                    logger.warning("publish failed, %d task(s) stay PENDING: %s", len(rest), message)
                    for item in rest:
                        failures[item.task_id] = message
                    break
    except Exception as exc:  # noqa: BLE001 - could not even get a connection
        message = f"{type(exc).__name__}: {exc}"
        logger.warning("broker unavailable, %d task(s) stay PENDING: %s", len(dispatches), message)
        for item in dispatches:
            failures.setdefault(item.task_id, message)
    return failures


class _BoundQueues:
    """Each broker queue of one publish, bound to the producer's channel once.

    Given a queue by name, Celery hands kombu an unbound Queue, which kombu copies and binds for every
    message only to find it already declared (a fifth of a batch's publish time). A bound one skips
    that; kombu's own per-connection declaration cache decides as before whether to declare it.
    Binding needs the channel, and getting it connects: so the first message goes unbound, through
    the publish's bounded retry policy, and only later ones are bound (a dead broker still costs one
    bounded try, not kombu's connection retries).
    """

    def __init__(self, celery: Celery, settings: Settings, producer: Any) -> None:
        self.celery, self.settings, self.producer = celery, settings, producer
        self.bound: dict[str, Any] = {}
        #: Set once a message went out: the producer's channel exists from then on.
        self.connected = False

    def __getitem__(self, queue: str) -> Any:
        bound = self.bound.get(queue)
        if bound is not None:
            return bound
        declared = self.celery.amqp.queues[queue_name(self.settings, queue)]
        if not self.connected:
            return declared
        bound = self.bound[queue] = declared.bind(self.producer.channel)
        return bound


def _kwargsrepr(item: Dispatch) -> str:
    # Given, so Celery need not saferepr() the kwargs for every message (a tenth of a publish's time).
    return f"{{'dispatch_id': '{item.dispatch_id}'}}"


def _send(celery: Celery, settings: Settings, producer: Any, queues: _BoundQueues, item: Dispatch) -> None:
    grace = settings.orchestrator.timeout_grace_s
    celery.send_task(
        RUN_TASK_NAME,
        kwargs={"dispatch_id": item.dispatch_id},
        argsrepr="()",
        kwargsrepr=_kwargsrepr(item),
        task_id=item.task_id,
        queue=queues[item.queue],
        priority=to_transport(item.priority),
        soft_time_limit=item.timeout_s,
        time_limit=item.timeout_s + grace,
        countdown=item.countdown_s,
        # Lets GET /queues tell how long the oldest message has waited.
        headers={PUBLISHED_AT_HEADER: isoformat(utcnow())},
        producer=producer,
        retry=True,
        retry_policy=celery.conf.task_publish_retry_policy,
    )
    queues.connected = True


def _send_in_batch(celery: Celery, settings: Settings, producer: Any, queues: _BoundQueues, item: Dispatch) -> None:
    """What :func:`_send` publishes, for a message inside a publish batch once the connection is up.

    The message is built and published by Celery's own ``app.amqp.create_task_message`` and
    ``app.amqp.send_task_message`` (its publish signals included), as ``send_task`` does, but without
    ``send_task``'s per-call work: merging task options, routing a queue already given, looking for a
    parent task, and building a result object (about half of a batch's publish time). No retry wrapper:
    in a batch a publish only buffers; the flush is what can fail, and a failed flush fails the chunk.
    tests/integration/test_batch.py checks the messages equal ``send_task``'s.
    """
    grace = settings.orchestrator.timeout_grace_s
    kwargsrepr = _kwargsrepr(item)
    amqp = celery.amqp
    message = amqp.create_task_message(
        item.task_id,
        RUN_TASK_NAME,
        (),
        {"dispatch_id": item.dispatch_id},
        reply_to=celery.thread_oid,
        time_limit=item.timeout_s + grace,
        soft_time_limit=item.timeout_s,
        create_sent_event=celery.conf.task_send_sent_event,
        argsrepr="()",
        kwargsrepr=kwargsrepr,
        ignore_result=None,  # what send_task passes when not told
    )
    amqp.send_task_message(
        producer,
        RUN_TASK_NAME,
        message,
        queue=queues[item.queue],
        priority=to_transport(item.priority),
        argsrepr="()",
        kwargsrepr=kwargsrepr,
        headers={PUBLISHED_AT_HEADER: isoformat(utcnow())},
        retry=False,
    )
