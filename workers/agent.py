"""Starting an agent: a Celery worker with AIOS's configuration, task and checks."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

from celery import Celery
from celery.signals import worker_process_init

from aios.agents.registry import agent_queue, capability_queue
from aios.broker.celery_app import create_celery_app, queue_name
from aios.config import Settings
from aios.db import dispose_engines, ensure_migrated
from aios.sandbox import cgroups
from aios.sandbox.identity import check_agent_config
from aios.tasktypes import load_task_types
from workers import consumer, redis_transport
from workers.heartbeat import Heartbeat, capabilities_of
from workers.tasks import register_tasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    name: str | None = None
    queues: list[str] = field(default_factory=list)
    concurrency: int | None = None
    loglevel: str | None = None


def hostname_for(name: str | None) -> str:
    """The Celery hostname (and agent name): ``name@host`` unless ``name`` already has an ``@``."""
    name = name or "agent"
    return name if "@" in name else f"{name}@{socket.gethostname()}"


@worker_process_init.connect
def _fresh_engines_in_child(**_kwargs: object) -> None:
    # A forked pool child must not reuse the parent's database connections.
    dispose_engines()


def build_worker_app(settings: Settings) -> Celery:
    load_task_types(settings.tasks.modules)
    app = create_celery_app(settings)
    register_tasks(app, settings)
    consumer.install(app)
    app.steps["worker"].add(Heartbeat)
    return app


def run_agent(settings: Settings, options: AgentOptions) -> None:
    """Run a Celery worker in the foreground until it is told to stop."""
    # An agent that would run commands as itself (or as root) does not start: ConfigError, exit 2.
    command_user = check_agent_config(settings)
    if command_user is not None:
        logger.info("commands run as %s (uid %d)", command_user.name, command_user.uid)
        cgroups.prepare_agent_group()  # before the pool exists: its processes are then in the leaf too
        cgroups.reap_orphan_groups()  # commands of an agent process killed hard before it could clean up
    ensure_migrated(settings.database)
    # This process's redis:// and rediss:// brokers use kombu's Redis transport with each ack written
    # along with the next delivery (one round trip per message instead of two on the event loop).
    redis_transport.install()
    app = build_worker_app(settings)
    hostname = hostname_for(options.name)
    # Its own queue (round robin, least loaded, pinned), its capabilities' queues (shared), and
    # any named queues (tasks submitted with an explicit queue).
    queues = [
        agent_queue(hostname),
        *(capability_queue(c) for c in capabilities_of(settings)),
        *(options.queues or settings.agents.queues),
    ]
    concurrency = options.concurrency or settings.agents.concurrency
    argv = [
        "worker",
        "--hostname",
        hostname,
        "--queues",
        ",".join(queue_name(settings, q) for q in queues),
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--loglevel",
        options.loglevel or settings.logging.level,
        "--task-events",
        "--without-mingle",
        "--without-gossip",
    ]
    if settings.agents.autoscale_max:
        # The pool starts at `concurrency` processes and grows under load up to autoscale_max.
        argv += ["--autoscale", f"{max(settings.agents.autoscale_max, concurrency)},{concurrency}"]
    logger.info("starting agent %s on queues %s", hostname, queues)
    app.worker_main(argv)
