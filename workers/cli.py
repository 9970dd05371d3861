"""``aios worker``: an agent (a Celery worker with AIOS's configuration)."""

from __future__ import annotations

import click

from aios.cli import server_command
from aios.config import Settings
from workers.agent import AgentOptions, run_agent


@click.command("worker", help="run an agent (a Celery worker)")
@click.option("--name", help="agent name; the Celery hostname becomes NAME@host")
@click.option("--queues", help="comma-separated AIOS queues (default: [agents] queues)")
@click.option("--concurrency", type=int, help="pool processes (default: [agents] concurrency)")
@server_command
def run_worker(settings: Settings, name: str | None, queues: str | None, concurrency: int | None) -> int:
    run_agent(
        settings,
        AgentOptions(name=name, queues=[q for q in (queues or "").split(",") if q], concurrency=concurrency),
    )
    return 0


def register(group: click.Group) -> None:
    """Entry point for ``aios.commands``: adds ``aios worker``."""
    group.add_command(run_worker)
