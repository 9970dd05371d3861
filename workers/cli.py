"""``aios worker``: an agent (a Celery worker with AIOS's configuration)."""

from __future__ import annotations

import argparse
from typing import Any

from aios.config import Settings
from workers.agent import AgentOptions, run_agent


def _run(args: argparse.Namespace, settings: Settings) -> int:
    run_agent(
        settings,
        AgentOptions(
            name=args.name,
            queues=[q for q in (args.queues or "").split(",") if q],
            concurrency=args.concurrency,
        ),
    )
    return 0


def register(subparsers: Any) -> Any:
    """Entry point for ``aios.commands``: adds ``aios worker``."""
    parser = subparsers.add_parser("worker", help="run an agent (a Celery worker)")
    parser.add_argument("--name", help="agent name; the Celery hostname becomes NAME@host")
    parser.add_argument("--queues", help="comma-separated AIOS queues (default: [agents] queues)")
    parser.add_argument("--concurrency", type=int, help="pool processes (default: [agents] concurrency)")
    return _run
