"""AIOS queues in the broker: depth per priority level, oldest message, consumers; and purge.

How a queue lives in Redis (kombu's Redis transport with ``queue_order_strategy=priority``): one
list per priority step, named ``<key_prefix><namespace>.<queue>`` for kombu priority 0 and
``...<queue>:<n>`` for step ``n`` (``sep=":"``). AIOS priority ``p`` (9 most urgent) is kombu
priority ``9 - p`` (:mod:`aios.broker.priority`), and ``priority_steps`` has all ten values, so every AIOS
level has a list of its own: AIOS 9 → ``<queue>``, 8 → ``<queue>:1``, ..., 0 → ``<queue>:9``.
Publishers ``LPUSH``, consumers ``RPOP``, so the oldest message of a level is at index -1.

Messages a worker has already taken (prefetched or running, held in kombu's ``unacked`` hash) are
no longer in these lists: the depth counts what waits for a worker, and purge never touches work
a worker holds.

On the embedded broker (:mod:`aios.broker.sqlite_transport`) a queue is the rows of one ``messages`` table
with that queue name, each with its kombu priority; a row an agent took stays (held) until acked.

Purge keeps the ledger and the broker in agreement: it takes the messages out in one step (Redis:
one ``MULTI`` of ``LRANGE`` + ``DEL``; SQLite: one transaction), then in one database transaction
moves each message's task ``QUEUED → CANCELLED`` fenced on the message's dispatch id. If that transaction fails, the
messages are put back where they were (the oldest end, or their old row ids), so either both sides
changed or neither.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from sqlalchemy import func, select

from aios.agents.registry import agent_queue, capability_queue
from aios.broker import sqlite_transport
from aios.broker.celery_app import queue_name
from aios.broker.inspection import consumers_by_queue
from aios.broker.priority import MAX_PRIORITY, MIN_PRIORITY, to_transport
from aios.broker.publish import PUBLISHED_AT_HEADER
from aios.broker.redis_clients import read_twice
from aios.config import Settings
from aios.db import session_scope
from aios.errors import ConfigError, NotFound, ServiceUnavailable, UnsupportedOnBroker
from aios.models import Agent, Task
from aios.tasks.states import TaskState, transition
from aios.timeutil import isoformat, parse_iso, utcnow

logger = logging.getLogger(__name__)

#: Highest first, as workers take them.
LEVELS: tuple[int, ...] = tuple(range(MAX_PRIORITY, MIN_PRIORITY - 1, -1))


@dataclass(frozen=True)
class Level:
    priority: int
    depth: int
    oldest_published_at: datetime | None

    def to_dict(self, now: datetime) -> dict[str, Any]:
        oldest = self.oldest_published_at
        return {
            "priority": self.priority,
            "depth": self.depth,
            "oldest_published_at": isoformat(oldest),
            "oldest_age_s": round((now - oldest).total_seconds(), 3) if oldest else None,
        }


@dataclass(frozen=True)
class QueueInfo:
    name: str
    broker_queue: str
    levels: list[Level]
    consumers: list[str]
    queued_in_ledger: int

    def to_dict(self, now: datetime) -> dict[str, Any]:
        oldest = [level.oldest_published_at for level in self.levels if level.oldest_published_at]
        first = min(oldest) if oldest else None
        return {
            "name": self.name,
            "broker_queue": self.broker_queue,
            "depth": sum(level.depth for level in self.levels),
            "oldest_published_at": isoformat(first),
            "oldest_age_s": round((now - first).total_seconds(), 3) if first else None,
            "levels": [level.to_dict(now) for level in self.levels],
            "consumers": self.consumers,
            "queued_in_ledger": self.queued_in_ledger,
        }


@dataclass
class PurgeOutcome:
    queue: str
    priority: int | None
    #: Messages taken out of the broker.
    purged: int = 0
    #: Their tasks moved QUEUED → CANCELLED.
    cancelled: int = 0
    #: Messages whose task was no longer QUEUED under that message's dispatch (already cancelled,
    #: a stale duplicate, or unknown): dropped, nothing in the ledger changed.
    dropped: int = 0
    #: Messages that were not AIOS task messages (no task id): dropped.
    unreadable: int = 0
    cancelled_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "priority": self.priority,
            "purged": self.purged,
            "cancelled": self.cancelled,
            "dropped": self.dropped,
            "unreadable": self.unreadable,
        }


class _Broker:
    """Where an AIOS queue's waiting messages are; one implementation per broker kind."""

    def levels(self, queues: Sequence[str]) -> list[list[tuple[int, bytes | str | None]]]:
        """Per queue, per level of :data:`LEVELS`: (waiting messages, the oldest raw message)."""
        raise NotImplementedError

    def take(self, queue: str, levels: Sequence[int]) -> tuple[Any, list[bytes | str]]:
        """Take the waiting messages of ``levels`` out: (what :meth:`put_back` needs, raw messages
        in the order workers would have taken them)."""
        raise NotImplementedError

    def put_back(self, taken: Any) -> None:
        raise NotImplementedError


class _RedisLists(_Broker):
    """The Redis lists of AIOS queues, named exactly as the transport names them."""

    def __init__(self, settings: Settings, channel: Any) -> None:
        self.settings = settings
        self.channel = channel
        # Plain client on kombu's own connection pool (TLS, Sentinel and credentials as configured):
        # kombu's prefixing client does not prefix LRANGE/LINDEX, so this one prefixes nothing and
        # :meth:`key` adds the prefix itself.
        self.redis = redis.Redis(connection_pool=channel.client.connection_pool)
        steps = [channel.priority(to_transport(level)) for level in LEVELS]
        if len(set(steps)) != len(steps):  # pragma: no cover - aios.broker.priority.PRIORITY_STEPS has all ten
            raise ConfigError(
                f"the broker transport's priority_steps {channel.priority_steps} merge AIOS priority levels; "
                f"each of the ten needs its own (aios.broker.priority.PRIORITY_STEPS)"
            )

    def key(self, queue: str, priority: int) -> str:
        broker_queue = queue_name(self.settings, queue)
        return f"{self.channel.global_keyprefix}{self.channel._q_for_pri(broker_queue, to_transport(priority))}"

    def levels(self, queues: Sequence[str]) -> list[list[tuple[int, bytes | str | None]]]:
        def read() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for queue in queues:
                for level in LEVELS:
                    pipe.llen(self.key(queue, level))
                    pipe.lindex(self.key(queue, level), -1)
            return pipe.execute()

        answers = read_twice(read)
        return [
            [(int(answers[base + 2 * i]), answers[base + 2 * i + 1]) for i in range(len(LEVELS))]
            for base in range(0, len(answers), 2 * len(LEVELS))
        ]

    def take(self, queue: str, levels: Sequence[int]) -> tuple[Any, list[bytes | str]]:
        keys = [self.key(queue, level) for level in levels]
        pipe = self.redis.pipeline(transaction=True)
        for key in keys:
            pipe.lrange(key, 0, -1)
            pipe.delete(key)
        answers = pipe.execute()
        taken: dict[str, list[bytes]] = {key: answers[2 * i] for i, key in enumerate(keys)}
        # LRANGE lists newest first: the oldest of each level comes first here.
        return taken, [raw for messages in taken.values() for raw in reversed(messages)]

    def put_back(self, taken: dict[str, list[bytes]]) -> None:
        """Return messages to the oldest end of their lists, in their order."""
        pipe = self.redis.pipeline(transaction=True)
        for key, messages in taken.items():
            if messages:
                pipe.rpush(key, *messages)
        pipe.execute()


class _SqliteTable(_Broker):
    """The messages table of the embedded broker (:mod:`aios.broker.sqlite_transport`)."""

    def __init__(self, settings: Settings, store: sqlite_transport.Store) -> None:
        self.settings = settings
        self.store = store

    def levels(self, queues: Sequence[str]) -> list[list[tuple[int, bytes | str | None]]]:
        found = self.store.levels([queue_name(self.settings, queue) for queue in queues])
        return [
            [found[queue_name(self.settings, queue)].get(to_transport(level), (0, None)) for level in LEVELS]
            for queue in queues
        ]

    def take(self, queue: str, levels: Sequence[int]) -> tuple[Any, list[bytes | str]]:
        rows = self.store.take_waiting(queue_name(self.settings, queue), [to_transport(level) for level in levels])
        rows.sort(key=lambda row: (row.priority, row.id))
        return rows, [row.payload for row in rows]

    def put_back(self, taken: list[sqlite_transport.Row]) -> None:
        self.store.put_back(taken)


@contextmanager
def _broker(celery: Celery, settings: Settings) -> Iterator[_Broker]:
    if not settings.broker.has_queue_depths:
        raise UnsupportedOnBroker(
            "queue depths and purge read the broker's queues; kombu's filesystem broker keeps none that can be "
            "read (use broker.url = sqlite:///var/broker.db, the embedded default, or redis://...)",
            broker=settings.broker.url.split(":", 1)[0],
        )
    try:
        with celery.connection_for_read() as connection:
            channel = connection.default_channel
            if settings.broker.is_sqlite:
                yield _SqliteTable(settings, channel.store)
            else:
                yield _RedisLists(settings, channel)
    except (redis.RedisError, OSError, OperationalError, sqlite3.Error) as exc:
        raise ServiceUnavailable(f"the broker cannot be read: {type(exc).__name__}: {exc}") from exc


def known_queues(settings: Settings, consumers: dict[str, list[str]]) -> list[str]:
    """Every AIOS queue worth reporting: the configured ones, each registered agent's own and
    capability queues, every queue a QUEUED task was sent to, and every queue of this namespace a
    live worker consumes."""
    names = {settings.orchestrator.default_queue, *settings.agents.queues}
    with session_scope(settings.database) as session:
        for agent_name, capabilities in session.execute(select(Agent.name, Agent.capabilities)):
            names.add(agent_queue(agent_name))
            names.update(capability_queue(c) for c in capabilities or [])
        names.update(session.scalars(select(Task.queue).where(Task.state == TaskState.QUEUED.value).distinct()))
    prefix = f"{settings.broker.namespace}."
    names.update(broker[len(prefix) :] for broker in consumers if broker.startswith(prefix))
    return sorted(name for name in names if name)


def _published_at(raw: bytes | str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        stamp = json.loads(raw)["headers"].get(PUBLISHED_AT_HEADER)
        return parse_iso(stamp) if isinstance(stamp, str) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def describe_queues(celery: Celery, settings: Settings, names: Sequence[str] | None = None) -> list[QueueInfo]:
    """Depth per level, oldest message and consumers of ``names`` (default: :func:`known_queues`)."""
    with _broker(celery, settings) as broker:
        consumers = consumers_by_queue(celery, settings)
        queues = list(names) if names is not None else known_queues(settings, consumers)
        answers = broker.levels(queues)
    with session_scope(settings.database) as session:
        in_ledger = dict(
            session.execute(
                select(Task.queue, func.count())
                .where(Task.state == TaskState.QUEUED.value, Task.queue.in_(queues))
                .group_by(Task.queue)
            ).all()
        )
    infos = []
    for queue, counts in zip(queues, answers, strict=True):
        levels = [
            Level(priority=level, depth=depth, oldest_published_at=_published_at(oldest))
            for level, (depth, oldest) in zip(LEVELS, counts, strict=True)
        ]
        broker_queue = queue_name(settings, queue)
        infos.append(
            QueueInfo(
                name=queue,
                broker_queue=broker_queue,
                levels=levels,
                consumers=consumers.get(broker_queue, []),
                queued_in_ledger=in_ledger.get(queue, 0),
            )
        )
    return infos


def describe_queue(celery: Celery, settings: Settings, name: str) -> QueueInfo:
    (info,) = describe_queues(celery, settings, [name])
    return info


def queues_as_dicts(infos: Sequence[QueueInfo]) -> list[dict[str, Any]]:
    now = utcnow()
    return [info.to_dict(now) for info in infos]


def _read_message(raw: bytes | str) -> tuple[str | None, str | None]:
    """(task id, dispatch id) of a raw kombu message; (None, None) if it is not an AIOS task message."""
    try:
        message = json.loads(raw)
        task_id = message["headers"]["id"]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        dispatch_id = kwargs.get("dispatch_id")
        if not isinstance(task_id, str):
            return None, None
        return task_id, dispatch_id if isinstance(dispatch_id, str) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, None


def purge(celery: Celery, settings: Settings, queue: str, *, priority: int | None = None, actor: str) -> PurgeOutcome:
    """Take every waiting message of ``queue`` (or of one priority level) out of the broker and mark
    its task CANCELLED (reason "purged"); see the module docstring for why both agree."""
    outcome = PurgeOutcome(queue=queue, priority=priority)
    levels = LEVELS if priority is None else (priority,)
    with _broker(celery, settings) as broker:
        taken, messages = broker.take(queue, levels)
        try:
            _cancel_purged(settings, queue, messages, outcome, actor=actor)
        except Exception:
            _put_back(broker, taken, len(messages))
            raise
    logger.info(
        "purged %d message(s) from queue %s (priority %s): %d task(s) cancelled, %d dropped",
        outcome.purged,
        queue,
        "all" if priority is None else priority,
        outcome.cancelled,
        outcome.dropped,
    )
    return outcome


def _cancel_purged(
    settings: Settings, queue: str, messages: list[bytes | str], outcome: PurgeOutcome, *, actor: str
) -> None:
    detail = {"reason": "purged", "queue": queue}
    with session_scope(settings.database) as session:
        for raw in messages:  # oldest first, as the workers would have taken them
            outcome.purged += 1
            task_id, dispatch_id = _read_message(raw)
            if task_id is None:
                outcome.unreadable += 1
                continue
            # Fenced: a stale copy of a task that was dispatched again since must not cancel it.
            if dispatch_id and transition(
                session, task_id, TaskState.QUEUED, TaskState.CANCELLED, actor=actor, detail=detail, fence=dispatch_id
            ):
                outcome.cancelled += 1
                outcome.cancelled_ids.append(task_id)
            else:
                outcome.dropped += 1


def _put_back(broker: _Broker, taken: Any, count: int) -> None:
    """Return purged messages where they were, after the ledger refused to cancel their tasks."""
    try:
        broker.put_back(taken)
    except Exception:  # noqa: BLE001 - the original error is the one to report
        logger.exception(
            "purge: could not put %d message(s) back after a database error; the sync job "
            "re-dispatches their QUEUED tasks",
            count,
        )


def check_queue_known(settings: Settings, name: str, consumers: dict[str, list[str]]) -> None:
    if name not in known_queues(settings, consumers):
        raise NotFound(f"no AIOS queue named {name!r} (GET /api/v1/queues lists them)", field="name")
