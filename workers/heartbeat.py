"""The agent's heartbeat: a worker bootstep that registers the agent and reports every interval.

Each heartbeat carries psutil figures (CPU %, memory %, load average, disk % of the work dir, RSS of
the worker and its pool) and the active and processed counts; the ledger turns them into a status
(aios.agents.health). The same loop sweeps for agents that stopped beating (their work is re-routed once,
by :func:`aios.recovery.reroute.sweep_offline`) and, when this agent becomes routable, dispatches the
tasks that were waiting for it. A clean stop marks the agent OFFLINE and re-routes what waits in its
queue (:func:`aios.recovery.reroute.agent_stopped`).

Celery's own heartbeats and events stay on: Flower and ``celery inspect`` keep seeing the agent.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from aios.agents import registry as agents
from aios.agents.health import ROUTABLE
from aios.config import Settings
from aios.db import session_scope
from aios.ops.resources import prime as prime_cpu_reading
from aios.ops.resources import resource_figures
from aios.recovery.reroute import agent_stopped, sweep_offline
from aios.sandbox.run import COMMAND_TYPE
from aios.tasks.create import dispatch
from aios.tasktypes import get_registry

logger = logging.getLogger(__name__)


def capabilities_of(settings: Settings) -> list[str]:
    """The registered task types and the configured capabilities; ``command`` only with a non-empty
    ``command_allowlist``, so routing never sends a command to an agent that would refuse every one."""
    names = set(get_registry().names()) | set(settings.agents.capabilities)
    if not settings.agents.command_allowlist:
        names.discard(COMMAND_TYPE)
    return sorted(names)


class Heartbeat(bootsteps.StartStopStep):
    """Worker bootstep: register on start, beat every interval, go OFFLINE on a clean stop."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        #: Set by each heartbeat: time for the housekeeping thread to look for work to move.
        self.housekeeping_due = threading.Event()
        self.housekeeper: threading.Thread | None = None
        self.routable = False

    def start(self, worker: Any) -> None:
        settings: Settings = worker.app.aios_settings
        self.worker, self.settings, self.name = worker, settings, worker.hostname
        prime_cpu_reading()
        with session_scope(settings.database) as session:
            agents.register(
                session,
                agents.AgentSpec(
                    name=self.name,
                    capabilities=capabilities_of(settings),
                    labels=settings.agents.labels,
                    weight=settings.agents.weight,
                    max_concurrency=worker.concurrency,
                ),
                max_agents=settings.orchestrator.max_agents,
                live=True,
            )
        self.beat()
        self.thread = threading.Thread(target=self._loop, name="aios-heartbeat", daemon=True)
        self.thread.start()
        self.housekeeper = threading.Thread(target=self._housekeeping_loop, name="aios-housekeeping", daemon=True)
        self.housekeeper.start()

    def _loop(self) -> None:
        while not self.stopping.wait(self.settings.agents.heartbeat_interval_s):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a database blip must not kill the heartbeat thread
                logger.exception("heartbeat of %s failed", self.name)

    def _housekeeping_loop(self) -> None:
        """Moving work (publishing to the broker) runs apart from the heartbeat: with the broker down a
        publish waits out its retries, and a heartbeat held up behind it would make this healthy agent
        look dead to its peers."""
        interval = self.settings.agents.heartbeat_interval_s
        while not self.stopping.is_set():
            if not self.housekeeping_due.wait(interval) or self.stopping.is_set():
                continue
            self.housekeeping_due.clear()
            try:
                self.housekeep()
            except Exception:  # noqa: BLE001 - the broker or the database may be away; try next beat
                logger.exception("housekeeping of %s failed", self.name)

    def beat(self) -> None:
        outcome = agents.record_heartbeat(
            self.settings,
            self.name,
            resources=resource_figures(self.settings.agents.work_dir),
            active=len(worker_state.active_requests),
            processed=sum(worker_state.total_count.values()),
        )
        if outcome.old is not None:
            logger.info("agent %s is now %s (was %s)", self.name, outcome.new, outcome.old)
            agents.forget_healthy_cache()
        self.routable = outcome.new in ROUTABLE
        self.housekeeping_due.set()

    def housekeep(self) -> None:
        """Dispatch tasks waiting for a healthy agent (if this one is routable); sweep silent agents."""
        if self.routable:
            # Tasks that found no healthy agent wait PENDING; a routable agent picks them up at once.
            waiting = agents.waiting_task_ids(self.settings, capabilities_of(self.settings))
            if waiting:
                logger.info("agent %s is routable: dispatching %d waiting task(s)", self.name, len(waiting))
                agents.forget_healthy_cache()
                dispatch(self.worker.app, self.settings, waiting, actor=f"worker:{self.name}")
        sweep_offline(self.settings, self.worker.app)

    def stop(self, worker: Any) -> None:
        self.stopping.set()
        self.housekeeping_due.set()
        for thread in (self.thread, self.housekeeper):
            if thread is not None:
                thread.join(timeout=10)
        try:
            agent_stopped(self.settings, worker.app, self.name, "stopped cleanly")
        except Exception:  # noqa: BLE001
            logger.exception("could not mark %s offline", self.name)

    def shutdown(self, worker: Any) -> None:
        if not self.stopping.is_set():
            self.stop(worker)
