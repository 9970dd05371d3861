"""Priority under backlog: a backlog of priority-0 no-op tasks waits in the queue of a busy agent, then
one priority-9 task is submitted: the time until it starts. Raw Celery with its defaults beside it
(the same backlog of priority-0 ``noop`` and one priority-9 task on a prefork ``-c 2`` worker).

The backlog is topped up to its size before each repetition, so every repetition sees it whole.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from bench.harness import Client, Figure, Run, raw_app, repeat, start_raw_worker, submit_batches

REDIS_ORDER_NOTE = (
    " Read the comparison with this in mind: on Redis, kombu serves its priority lists 0, 3, 6, 9 in that order "
    "(kombu/transport/redis.py, `_brpop_start`), so to raw Celery priority 9 is the lowest and the same numbers "
    "put its task behind the backlog by construction. A raw Celery task sent with priority 0 over a priority-9 "
    "backlog is served next after what the worker has prefetched; this figure does not measure that case.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--priority-backlog", type=int, default=10_000,
                        help="priority-0 tasks queued (the spec's 10,000)")
    parser.add_argument("--priority-celery-cap-s", type=float, default=10.0,
                        help="give up waiting for raw Celery's priority-9 task after this long (its figure is then "
                             "a lower bound)")


def measure(run: Run, api: Any, args: argparse.Namespace) -> list[Figure]:
    backlog = args.priority_backlog
    worker = run.start_worker("prio", concurrency=2)
    client = Client(api.url, run.headers())
    seen_backlog: list[int] = []

    from aios.agents import agent_queue

    def queued() -> int:
        return int(run.scalar("SELECT count(*) FROM tasks WHERE state = 'QUEUED' AND queue = :q",
                              q=agent_queue(worker.url)))

    def aios(rep: int) -> float:
        while (missing := backlog - queued()) > 0:  # the agent drains it while it is topped up
            submit_batches(client, missing + 100, priority=0)
        seen_backlog.append(queued())
        began = time.perf_counter()
        task_id = client.json("POST", "/api/v1/tasks", {"type": "echo", "parameters": {}, "priority": 9})["id"]
        deadline = began + 120
        while run.scalar("SELECT started_at FROM tasks WHERE id = :i", i=task_id) is None:
            if time.perf_counter() > deadline:
                raise TimeoutError("the priority-9 task did not start within 120 s")
            time.sleep(0.01)
        return time.perf_counter() - began

    a = repeat(aios, args.reps, "s", "priority aios")
    worker.stop()
    run.execute("UPDATE tasks SET state = 'CANCELLED', finished_at = now() WHERE state IN ('QUEUED', 'PENDING')")

    queue = f"{run.namespace}-prio"
    app = raw_app(run, queue)
    r = run.redis()
    # kombu's Redis transport keeps priority 0 in the list named after the queue ("<queue>\x06\x16<step>" for
    # steps 3, 6, 9): the backlog's list.
    backlog_key = app.PREFIX + queue
    # One real apply_async before the worker starts: its message, as kombu serialised it, is the template.
    template_id = app.noop.apply_async(priority=0).id
    template = r.lindex(backlog_key, 0).decode()
    template_tag = json.loads(template)["properties"]["delivery_tag"]
    raw_worker = start_raw_worker(run, "raw-prio", queue)
    cap = args.priority_celery_cap_s
    left_at_cap: list[int] = []  # priority-0 messages still ahead of the capped task
    celery_backlog: list[int] = []

    def backlog_len() -> int:
        """Priority-0 messages waiting: the backlog proper. A capped repetition's priority-9 task stays in its
        own list (behind them, to Celery) and is not counted."""
        return int(r.llen(backlog_key))

    def top_up(count: int) -> None:
        """``count`` more priority-0 ``noop`` messages, each the bytes ``noop.apply_async(priority=0)``
        pushes (the template) with its own fresh task id and delivery tag, as apply_async would give it,
        LPUSHed in pipelines of 1,000. Through apply_async a message took about 9 ms one by one, still 3 ms
        with kombu's ``Producer.batch`` (measured once on the loaded shared cores): the worker drained much
        of the backlog while it was being filled, and filling cost more than measuring."""
        for start in range(0, count, 1000):
            with r.pipeline(transaction=False) as pipe:
                for _ in range(min(1000, count - start)):
                    task_id, tag = str(uuid.uuid4()), str(uuid.uuid4())
                    pipe.lpush(backlog_key, template.replace(template_id, task_id).replace(template_tag, tag))
                pipe.execute()

    def raw(rep: int) -> float:
        while (missing := backlog - backlog_len()) > 0:  # the worker drains it while it is topped up
            top_up(missing + 100)
        celery_backlog.append(backlog_len())
        key = f"stamp-{uuid.uuid4().hex}"
        began = time.time()
        app.stamp.apply_async(args=[key], priority=9)
        while (value := r.get(app.PREFIX + key)) is None:
            if time.time() - began > cap:
                left_at_cap.append(backlog_len())
                return cap
            time.sleep(0.01)
        return float(value) - began

    c = repeat(raw, args.reps, "s", "priority celery")
    raw_worker.stop()
    capped = len(left_at_cap)
    lower_bound = c.median >= cap
    capped_note = (f" Raw Celery's wait is capped at {cap:g} s (`--priority-celery-cap-s`): its task starts only once "
                   f"the worker has drained the backlog ahead of it (23 s median uncapped in the run of 2026-11-25, "
                   f"longer when the cores are busier), so each repetition would otherwise cost that whole drain. In "
                   f"{capped} of {args.reps} repetitions it had not started at the cap, with "
                   f"{', '.join(f'{x:,}' for x in left_at_cap)} priority-0 messages still waiting in Redis; those "
                   f"count as {cap:g} s" + (", so Celery's median and the ratio are lower bounds." if lower_bound else
                                   "; the median is not affected.")) if capped else ""
    scaled = "" if backlog == 10_000 else f" **Backlog scaled down from the spec's 10,000 to {backlog:,}** " \
        "(`--priority-backlog`) to keep `make bench` within its time budget."
    return [Figure(f"Priority-9 task start under a {backlog:,}-task priority-0 backlog", a.fmt(3),
                   "raw Celery (defaults) " + ("> " if lower_bound else "") + c.fmt(2)
                   + (f" ({capped} of {args.reps} capped at {cap:g} s)" if capped else ""),
                   ("> " if lower_bound else "") + f"{c.median / a.median:.0f}× sooner" if a.median else "-",
                   "≤ 1 s (AIOS)", a.median <= 1.0 and max(a.values) <= 1.0,
                   f"`.venv/bin/python bench/run_all.py --only priority --priority-backlog {backlog}`",
                   f"AIOS: one `aios worker --concurrency 2` working through priority-0 `echo` tasks, the backlog "
                   f"topped up through `/tasks/batch` before each repetition (QUEUED in its queue at submit of the "
                   f"priority-9 "
                   f"task: {', '.join(f'{x:,}' for x in seen_backlog)}); time = `POST /api/v1/tasks` with "
                   f"`priority: 9` → its `started_at` is set in PostgreSQL (polled every 10 ms). Met means every "
                   f"repetition ≤ 1 s. Raw Celery: `noop.apply_async(priority=0)` × backlog (after one real call, "
                   f"its message with a fresh task id and delivery tag each, LPUSHed in pipelines: bench_priority.py "
                   f"`top_up`; priority-0 messages in Redis at each submit: "
                   f"{', '.join(f'{x:,}' for x in celery_backlog)}), then "
                   f"`stamp.apply_async(priority=9)`, which writes its start time to Redis; Celery's default Redis "
                   f"transport options (no `priority_steps`/`queue_order_strategy` set, prefetch multiplier 4)."
                   f"{capped_note}{scaled}{REDIS_ORDER_NOTE}")]


