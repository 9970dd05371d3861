"""Live worker inspection and remote control, through Celery's broadcast mailbox.

What Flower shows and does to workers, as plain functions: every call is one broadcast over the
broker's control exchange, bounded by ``api.inspect_timeout_s``, so a dead or wedged worker costs
the caller one timeout, never a hang. Nothing here is cached in the database: the answers are what
the workers say right now (the ledger's view of agents is :mod:`aios.agents.registry`).

Errors are AIOS errors: a worker that answers nothing is :class:`WorkerNotFound` (404) unless it
still answers pings (then the command timed out, :class:`WorkerTimeout`, 504); a worker that answers
with an error (``autoscale`` on a fixed pool, ``rate_limit`` for an unknown task) is
:class:`WorkerRefused` (409, with the worker's own message).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from aios.broker.redis_clients import read_twice
from aios.config import Settings, redact_url
from aios.errors import ServiceUnavailable, WorkerNotFound, WorkerRefused, WorkerTimeout

#: The inspect commands behind one worker's full description (Flower's /api/workers has the same).
INSPECT_FIELDS: tuple[str, ...] = (
    "stats",
    "active",
    "reserved",
    "scheduled",
    "revoked",
    "registered",
    "active_queues",
    "conf",
)
#: Task attributes ``registered`` reports next to each name, so rate and time limits set through
#: control commands can be read back.
TASK_INFO_ITEMS = ["rate_limit", "time_limit", "soft_time_limit"]
#: Seconds the consumers of every queue (``active_queues`` of every worker) are reused by GET /queues.
CONSUMERS_CACHE_S = 1.0


def _timeout(settings: Settings) -> float:
    return settings.api.inspect_timeout_s


def broadcast(
    celery: Celery,
    settings: Settings,
    command: str,
    *,
    arguments: dict[str, Any] | None = None,
    destination: Sequence[str] | None = None,
    limit: int | None = None,
    reply: bool = True,
) -> dict[str, Any]:
    """Send one control command; returns ``{worker hostname: its reply}`` (empty without replies).

    With ``destination`` and ``limit`` the call returns as soon as that many workers answered;
    otherwise it waits the whole ``api.inspect_timeout_s`` (who else might answer is unknown).
    """

    def send() -> Any:
        return celery.control.broadcast(
            command,
            arguments=arguments or {},
            destination=list(destination) if destination else None,
            reply=reply,
            timeout=_timeout(settings),
            limit=limit,
        )

    try:
        # An inspection only reads, so it is sent again if it met a pooled connection to a Redis master
        # that is gone (after a Sentinel failover or a restart); a control command is not repeated.
        replies = read_twice(send) if _is_inspection(command) else send()
    except (OperationalError, redis.ConnectionError) as exc:
        raise ServiceUnavailable(f"the broker did not take the {command} command: {exc}") from exc
    merged: dict[str, Any] = {}
    for item in replies or []:
        merged.update(item)
    return merged


def _is_inspection(command: str) -> bool:
    from celery.worker.control import Panel

    meta = Panel.meta.get(command)
    return meta is not None and meta.type == "inspect"


def _arguments(command: str) -> dict[str, Any]:
    return {"taskinfoitems": TASK_INFO_ITEMS} if command == "registered" else {}


def ping(celery: Celery, settings: Settings, name: str | None = None) -> list[str]:
    """Names of the workers that answer (``name`` alone if given); waits at most the timeout."""
    replies = broadcast(celery, settings, "ping", destination=[name] if name else None, limit=1 if name else None)
    return sorted(replies)


def _clean(field: str, value: Any) -> Any:
    """Celery already masks secret-looking settings in ``conf``; URLs lose their password here too."""
    if field != "conf" or not isinstance(value, dict):
        return value
    return {
        key: redact_url(item) if isinstance(item, str) and "://" in item and "@" in item else item
        for key, item in value.items()
    }


def describe_workers(
    celery: Celery, settings: Settings, *, name: str | None = None, fields: Sequence[str] = INSPECT_FIELDS
) -> dict[str, dict[str, Any]]:
    """``{worker: {field: answer}}`` for every live worker (or only ``name``).

    The workers are found with one ``ping`` (waiting the full timeout when no name is given);
    each field is then one broadcast that ends as soon as every one of them answered.
    """
    workers = ping(celery, settings, name)
    if not workers:
        if name:
            raise WorkerNotFound(f"no worker named {name!r} answered within {_timeout(settings):g}s", worker=name)
        return {}
    described: dict[str, dict[str, Any]] = {worker: {"name": worker, "online": True} for worker in workers}
    for field in fields:
        replies = broadcast(
            celery, settings, field, arguments=_arguments(field), destination=workers, limit=len(workers)
        )
        for worker in workers:
            described[worker][field] = _clean(field, replies.get(worker))
    return described


def describe_worker(
    celery: Celery, settings: Settings, name: str, fields: Sequence[str] = INSPECT_FIELDS
) -> dict[str, Any]:
    return describe_workers(celery, settings, name=name, fields=fields)[name]


def control(
    celery: Celery, settings: Settings, name: str, command: str, arguments: dict[str, Any] | None = None
) -> Any:
    """Run a control command on one worker and return its ``ok`` reply (or raise, see module doc)."""
    replies = broadcast(celery, settings, command, arguments=arguments, destination=[name], limit=1)
    if name not in replies:
        if not ping(celery, settings, name):
            raise WorkerNotFound(f"no worker named {name!r} answered within {_timeout(settings):g}s", worker=name)
        raise WorkerTimeout(
            f"worker {name!r} answers pings but did not answer {command} within "
            f"{_timeout(settings):g}s; raise api.inspect_timeout_s or try again",
            worker=name,
            command=command,
        )
    answer = replies[name]
    if isinstance(answer, dict) and "error" in answer:
        raise WorkerRefused(f"worker {name!r} refused {command}: {answer['error']}", worker=name, command=command)
    return answer.get("ok", answer) if isinstance(answer, dict) else answer


def shutdown(celery: Celery, settings: Settings, name: str) -> None:
    """Ask one worker to shut down warm (finish its running tasks, give back its prefetched messages).

    The worker exits without replying (Celery raises SystemExit inside the command), so only its
    presence is checked first.
    """
    if not ping(celery, settings, name):
        raise WorkerNotFound(f"no worker named {name!r} answered within {_timeout(settings):g}s", worker=name)
    broadcast(celery, settings, "shutdown", destination=[name], reply=False)


_consumers_lock = threading.Lock()
_consumers_cache: dict[int, tuple[float, dict[str, list[str]]]] = {}


def consumers_by_queue(celery: Celery, settings: Settings) -> dict[str, list[str]]:
    """``{broker queue name: [worker, ...]}`` from every worker's ``active_queues``, reused for
    :data:`CONSUMERS_CACHE_S` so a dashboard polling GET /queues costs one broadcast a second."""
    key = id(celery)
    with _consumers_lock:
        cached = _consumers_cache.get(key)
        if cached and time.monotonic() - cached[0] < CONSUMERS_CACHE_S:
            return cached[1]
    replies = broadcast(celery, settings, "active_queues")
    consumers: dict[str, list[str]] = {}
    for worker, queues in sorted(replies.items()):
        for queue in queues or []:
            if isinstance(queue, dict) and queue.get("name"):
                consumers.setdefault(queue["name"], []).append(worker)
    with _consumers_lock:
        _consumers_cache[key] = (time.monotonic(), consumers)
    return consumers


def forget_consumers_cache() -> None:
    with _consumers_lock:
        _consumers_cache.clear()
