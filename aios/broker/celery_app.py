"""The Celery application, configured from AIOS settings.

Settings that matter for delivery, and why:

* JSON only, in and out: pickle is remote code execution for anyone who can write to the broker
  (CVE-2020-11981, CVE-2021-23727). A pickled message is rejected by the worker, never run.
* ``task_acks_late`` + ``task_reject_on_worker_lost`` + prefetch 1: a message is acked only after its
  task finished, so a crash redelivers it instead of losing it (at-least-once). The task row's
  dispatch fence makes the extra delivery harmless.
* The embedded default ``sqlite:///var/broker.db`` is AIOS's own transport (:mod:`aios.broker.sqlite_transport`),
  with the same ten priority levels, acks and visibility timeout as Redis.
* Redis priorities: ``queue_order_strategy=priority`` with all ten ``priority_steps`` so ten levels
  really are ten (the default folds them into four lists).
* ``visibility_timeout`` is set everywhere Celery reads it and is checked (in the config loader)
  to exceed the longest task timeout, or Redis would redeliver tasks that are still running.
* Worker events on (``worker_send_task_events``): Flower and ``celery events`` see AIOS agents as
  ordinary Celery workers. The publisher's ``task-sent`` event is off unless
  ``broker.send_task_sent_events`` (a second publish per task; the ledger records the moment anyway).
* ``worker_pool_restarts``: the ``pool_restart`` control command (Flower's and AIOS's
  ``pool/restart``) is refused without it. AIOS sends it with no modules to reload, so it only asks
  each pool process to exit after its current task and be replaced: nothing running is killed.
* Publishing retries a bounded number of times; past that the caller keeps the task ``PENDING``.
* Redis Sentinel (``sentinel://`` URLs): kombu gets the master's name and how to reach the Sentinels
  in its transport options, and the URL with the password and TLS options on every part
  (:func:`aios.broker.redis_clients.kombu_url`).

``celery -A aios.broker.celery_app inspect ping`` works: the module-level ``app`` is built lazily from the
environment on first access, not at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from aios.broker import sqlite_transport
from aios.broker.priority import PRIORITY_STEPS, to_transport
from aios.broker.redis_clients import kombu_url, sentinel_kwargs
from aios.config import Settings, load_settings

# ``sqlite://`` broker URLs (the embedded default) open AIOS's transport in every process that builds
# the app: API, agents, beat, and ``celery -A aios.broker.celery_app`` / Flower.
sqlite_transport.install()

#: The one Celery task AIOS publishes; its only argument is the dispatch fence.
RUN_TASK_NAME = "aios.run"


def queue_name(settings: Settings, queue: str) -> str:
    """The broker queue for an AIOS queue name (namespaced so deployments can share a Redis)."""
    return f"{settings.broker.namespace}.{queue}"


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    broker = settings.broker
    if broker.is_sqlite:
        return {
            "visibility_timeout": broker.visibility_timeout_s,
            "polling_interval": broker.polling_interval_s,
            "busy_timeout": settings.database.sqlite_busy_timeout_s,
        }
    if broker.is_filesystem:
        root = Path(broker.data_dir)
        folders = {"queue": root / "queue", "control": root / "control", "processed": root / "processed"}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            "processed_folder": str(folders["processed"]),
            "polling_interval": broker.polling_interval_s,
        }
    options: dict[str, Any] = {
        "visibility_timeout": broker.visibility_timeout_s,
        "socket_connect_timeout": broker.publish_timeout_s,
        "socket_timeout": broker.socket_timeout_s,
        "polling_interval": broker.polling_interval_s,
    }
    if broker.is_redis:
        options.update(
            queue_order_strategy="priority",
            priority_steps=PRIORITY_STEPS,
            sep=":",
            # The sweep that returns unacked messages of dead workers to their queues. kombu >= 5.6 scans
            # only on every ``unacked_restore_throttle``-th sweep (default 10): 1 makes the interval real.
            unacked_restore_interval=min(60, broker.visibility_timeout_s),
            unacked_restore_throttle=1,
        )
        if broker.key_prefix:
            options["global_keyprefix"] = broker.key_prefix
    if broker.is_sentinel:
        # kombu asks these Sentinels for the master on every (re)connection: after a failover the
        # consumer's reconnect and the next publish reach the new master (aios.broker.redis_clients).
        options["master_name"] = broker.sentinel_master
        options["sentinel_kwargs"] = sentinel_kwargs(broker)
    return options


def celery_config(settings: Settings) -> dict[str, Any]:
    broker = settings.broker
    transport_options = broker_transport_options(settings)
    publish_retry_policy = {
        "max_retries": broker.publish_max_retries,
        "interval_start": 0,
        "interval_step": min(0.5, broker.publish_timeout_s / max(1, broker.publish_max_retries) / 2),
        "interval_max": broker.publish_timeout_s / 2,
    }
    return {
        "broker_url": kombu_url(broker),
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": broker.publish_timeout_s,
        "broker_channel_error_retry": True,
        # --- serialization: JSON only, in both directions ---
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # --- delivery ---
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "visibility_timeout": broker.visibility_timeout_s,
        "result_backend_transport_options": {"visibility_timeout": broker.visibility_timeout_s},
        # Results live in the AIOS database, not in a Celery result backend.
        "task_ignore_result": True,
        "result_backend": None,
        # --- routing and priority ---
        "task_default_queue": queue_name(settings, settings.orchestrator.default_queue),
        "task_default_exchange": queue_name(settings, settings.orchestrator.default_queue),
        "task_default_routing_key": queue_name(settings, settings.orchestrator.default_queue),
        "task_create_missing_queues": True,
        "task_default_priority": to_transport(settings.orchestrator.default_priority),
        "task_queue_max_priority": 9,
        "control_exchange": broker.namespace,
        "event_exchange": f"{broker.namespace}.ev",
        # --- publishing: bounded, never hangs the API (celery#6046) ---
        "task_publish_retry": True,
        "task_publish_retry_policy": publish_retry_policy,
        # --- monitoring: Flower and `celery events` see AIOS agents ---
        "worker_send_task_events": True,
        "task_send_sent_event": broker.send_task_sent_events,
        "task_track_started": False,
        "worker_pool_restarts": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
        "timezone": "UTC",
    }


def create_celery_app(settings: Settings) -> Celery:
    """Build a Celery app for ``settings`` (tests build their own; nothing global is touched)."""
    app = Celery("aios", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.aios_settings = settings
    return app


_lazy_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """``celery -A aios.broker.celery_app`` looks up ``app``; build it from the environment on demand."""
    global _lazy_app
    if name in ("app", "celery"):
        if _lazy_app is None:
            _lazy_app = create_celery_app(load_settings())
        return _lazy_app
    raise AttributeError(name)
