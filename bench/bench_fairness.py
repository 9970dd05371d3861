"""Routing fairness: three live agents, 3,000 tasks submitted through ``/tasks/batch`` under the
``round_robin`` policy; the share of each agent (the agent queue each task was dispatched to, read
from PostgreSQL); figure = max share / min share.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.harness import Client, Figure, Run, Stat, repeat, submit_batches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fairness-tasks", type=int, default=3000)


def measure(run: Run, api: Any, args: argparse.Namespace) -> list[Figure]:
    n = args.fairness_tasks
    workers = run.start_workers([f"fair{i}" for i in range(3)], concurrency=1)
    client = Client(api.url, run.headers())
    shares: list[dict[str, int]] = []

    def one(rep: int) -> float:
        since = run.scalar("SELECT clock_timestamp()")
        submit_batches(client, n)
        with run.engine().connect() as connection:
            import sqlalchemy as sa

            rows = connection.execute(
                sa.text("SELECT queue, count(*) FROM tasks WHERE created_at >= :t GROUP BY queue"), {"t": since}
            ).all()
        counts = {q: int(c) for q, c in rows}
        shares.append(counts)
        if len(counts) != 3 or sum(counts.values()) != n:
            raise RuntimeError(f"expected {n} tasks over 3 agent queues, got {counts}")
        return max(counts.values()) / min(counts.values())

    stat = repeat(one, args.reps, "", "fairness")
    for worker in workers:
        worker.stop()
    run.execute("UPDATE tasks SET state = 'CANCELLED', finished_at = now() WHERE state IN ('QUEUED', 'PENDING')")
    rows = "\n".join(
        f"| {i + 1} | {' / '.join(str(v) for v in sorted(s.values(), reverse=True))} | {r:.3f} |"
        for i, (s, r) in enumerate(zip(shares, stat.values, strict=True))
    )
    return [
        Figure(
            f"Routing fairness, 3 agents, {n:,} tasks, round robin (max/min share)",
            Stat(stat.values, "").fmt(3).strip(),
            "-",
            "-",
            "≤ 1.01",
            max(stat.values) <= 1.01,
            f"`.venv/bin/python bench/run_all.py --only fairness --fairness-tasks {n}`",
            f"Three `aios worker --concurrency 1`, `orchestrator.routing_policy = round_robin` (shipped "
            f"default), {n:,} `echo` tasks in batches of 1,000 per repetition; tasks per agent queue read from "
            f"PostgreSQL. Met means every repetition ≤ 1.01.\n\n| rep | tasks per agent | max/min |\n"
            f"|---|---|---|\n{rows}",
        )
    ]
