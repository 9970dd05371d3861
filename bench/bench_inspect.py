"""Inspection at scale: ``GET /api/v1/tasks`` with a state + type filter and with ``q=`` search, and
``GET /api/v1/tasks/{id}``, on a ledger of 1,000,000 task rows (bulk-loaded with PostgreSQL ``COPY``
into the run's private schema); p50/p95 latency and the API processes' RSS. Beside it, Flower's RSS
holding tasks it learnt from worker events (Flower ``--max_tasks`` raised to hold them; the events are
replayed in a worker's exact format, see ``flower_figure``).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from bench.harness import (
    BIN,
    Client,
    Figure,
    Run,
    free_port,
    percentile,
    raw_app,
    wait_for,
    wait_http,
)

TYPES = ["echo", "sleep", "etl.load", "report.build", "mail.send", "image.resize", "index.rebuild", "backup.copy"]
STATES = [("SUCCEEDED", 0.80), ("FAILED", 0.06), ("CANCELLED", 0.04), ("DEAD", 0.02), ("TIMED_OUT", 0.02),
          ("QUEUED", 0.04), ("SCHEDULED", 0.02)]
COLUMNS = ["id", "type", "parameters", "priority", "queue", "state", "result", "error", "attempts", "max_retries",
           "timeout_s", "owner", "routing", "on_agent_lost", "created_at", "updated_at", "queued_at", "started_at",
           "finished_at"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inspect-rows", type=int, default=1_000_000)
    parser.add_argument("--inspect-requests", type=int, default=20, help="requests per query per repetition")
    parser.add_argument("--flower-tasks", type=int, default=100_000,
                        help="tasks whose worker events are replayed to Flower")


def fill(run: Run, rows: int) -> float:
    """COPY ``rows`` tasks of a realistic mix into the run's schema; returns seconds taken.

    The search index (migration 0007, a GIN trigram index) is dropped for the load and built again
    after it, as an operator would for a bulk import: maintained row by row it makes the load about
    2.5 times longer, and the figure is about reading, not loading."""
    with run.engine().connect() as connection:
        trigram = [tuple(row) for row in connection.execute(sa.text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = 'tasks' AND indexdef ILIKE '%gin_trgm_ops%'"))]
    rng = random.Random(11)
    states = [s for s, _ in STATES]
    weights = [w for _, w in STATES]
    now = datetime.now(UTC)
    began = time.perf_counter()
    raw = run.engine().raw_connection()
    try:
        cursor = raw.cursor()
        for name, _ in trigram:
            cursor.execute(f'DROP INDEX "{name}"')
        raw.commit()
        for start in range(0, rows, 100_000):
            buffer = io.StringIO()
            for n in range(start, min(rows, start + 100_000)):
                state = rng.choices(states, weights)[0]
                created = now - timedelta(seconds=30 * 86_400 * (1 - n / rows) + rng.random())
                error = f"timeout talking to upstream host-{n % 97}" if state in ("FAILED", "DEAD", "TIMED_OUT") \
                    else "\\N"
                result = json.dumps({"rows": n % 1000}) if state == "SUCCEEDED" else "\\N"
                finished = (created + timedelta(seconds=1)).isoformat() if state not in ("QUEUED", "SCHEDULED") \
                    else "\\N"
                started = created.isoformat() if finished != "\\N" else "\\N"
                params = json.dumps({"customer": f"customer-{n % 50_000}", "n": n})
                fields = [str(uuid.UUID(int=rng.getrandbits(128), version=4)), rng.choice(TYPES), params,
                          str(rng.randint(0, 9)), "default", state, result, error, "1", "3", "3600", "bench",
                          "queue", "retry", created.isoformat(), created.isoformat(), created.isoformat(), started,
                          finished]
                buffer.write("\t".join(f.replace("\t", " ") for f in fields) + "\n")
            buffer.seek(0)
            cursor.copy_expert(f"COPY tasks ({', '.join(COLUMNS)}) FROM STDIN", buffer)
            raw.commit()
        for _, definition in trigram:
            cursor.execute(definition)
        cursor.execute("ANALYZE tasks")
        raw.commit()
    finally:
        raw.close()
    return time.perf_counter() - began


def api_rss_mb(api: Any) -> tuple[float, float]:
    """(largest gunicorn worker RSS, master RSS) in MB."""
    tree = api.tree()
    workers = [p.memory_info().rss / 2**20 for p in tree[1:]]
    return (max(workers) if workers else 0.0), tree[0].memory_info().rss / 2**20


def measure(run: Run, api: Any, args: argparse.Namespace) -> list[Figure]:
    figures = inspect_figure(run, api, args)
    try:
        figures.append(flower_figure(run, args, figures[-1]))
    except Exception as exc:  # noqa: BLE001
        figures.append(Figure("Flower memory", "not measured", "-", "-", "-", None, "-",
                              f"Not measured: `{type(exc).__name__}: {exc}`"))
    return figures


def inspect_figure(run: Run, api: Any, args: argparse.Namespace) -> list[Figure]:
    rss_before, _ = api_rss_mb(api)
    existing = int(run.scalar("SELECT count(*) FROM tasks"))
    took = fill(run, args.inspect_rows)
    total = int(run.scalar("SELECT count(*) FROM tasks"))
    print(f"  filled {args.inspect_rows:,} rows in {took:.0f}s ({total:,} in tasks)", flush=True)
    ids = [r for r in run.engine().connect().exec_driver_sql(
        "SELECT id FROM tasks ORDER BY random() LIMIT 2000").scalars()]
    client = Client(api.url, run.headers())
    queries = {
        "list state=FAILED&type=etl.load": lambda i: "/api/v1/tasks?state=FAILED&type=etl.load&limit=50",
        "list q=customer-4242 (≈20 matches)": lambda i: "/api/v1/tasks?q=customer-4242&limit=50",
        "list q=upstream (≈10 % of rows)": lambda i: "/api/v1/tasks?q=upstream&limit=50",
        "GET /tasks/{id}": lambda i: f"/api/v1/tasks/{ids[i % len(ids)]}",
    }
    for make in queries.values():  # warm-up
        client.json("GET", make(0))
    samples: dict[str, list[float]] = {k: [] for k in queries}
    p95s: dict[str, list[float]] = {k: [] for k in queries}
    for rep in range(args.reps):
        for name, make in queries.items():
            times: list[float] = []
            started = time.perf_counter()
            for i in range(args.inspect_requests):
                if len(times) >= 5 and time.perf_counter() - started > 5:
                    break  # a slow query: at least 5 samples, at most about 5 s per repetition
                began = time.perf_counter()
                client.json("GET", make(rep * 1000 + i))
                times.append((time.perf_counter() - began) * 1000)
            samples[name] += times
            p95s[name].append(percentile(times, 95))
        print(f"  inspect rep {rep + 1}: " + ", ".join(f"{k} p95 {v[-1]:.0f} ms" for k, v in p95s.items()),
              flush=True)
    rss_after, master = api_rss_mb(api)
    rows = []
    worst = 0.0
    for name in queries:
        p50, p95 = percentile(samples[name], 50), percentile(samples[name], 95)
        worst = max(worst, p95)
        rows.append(f"| {name} | {p50:.1f} | {p95:.1f} | {min(p95s[name]):.1f}–{max(p95s[name]):.1f} |")
    if worst > 50:
        details_why = (" Missed: see the p95 column for which query. `q=` uses the trigram index of migration 0007 "
                       "(aios/task_search.py, docs/api.md): a rare term is looked up in the index, a common one walks "
                       "the newest-first index until 50 matches. That walk is slow when the term is common overall "
                       "but absent from the newest rows: here the newest rows are the ones earlier figures left "
                       "(none of them says `upstream`), so `q=upstream` reads all of them before its first match. "
                       "Terms in between (roughly 0.1-3 % of the rows) are the other slow case. Closing it needs "
                       "the planner to know where matches lie (e.g. the index lookup plus a top-N sort once the walk "
                       "has read more than a few thousand rows).")
    else:
        details_why = ""
    summary = " / ".join(f"{percentile(samples[n], 95):.0f}" for n in queries)
    cmd = f"`.venv/bin/python bench/run_all.py --only inspect --inspect-rows {args.inspect_rows}`"
    details = (f"{args.inspect_rows:,} rows COPYed in {took:.0f} s (the search index dropped for the load and rebuilt "
               f"after it, included; plus {existing:,} left by earlier figures), "
               f"8 task types, {', '.join(f'{s} {w:.0%}' for s, w in STATES)}, created over 30 days, then ANALYZE. "
               f"One client, sequential requests on one keep-alive connection, {args.inspect_requests} requests per "
               f"query per repetition "
               f"(fewer, but at least 5, once a query has taken 5 s in a repetition) × {args.reps} repetitions; "
               f"`limit=50`. Latency is the client's (HTTP "
               f"included), in ms.\n\n| query | p50 | p95 | p95 range over reps |\n|---|---|---|---|\n"
               + "\n".join(rows)
               + f"\n\nAPI RSS (largest gunicorn worker): {rss_before:.0f} MB before the rows were loaded, "
                 f"{rss_after:.0f} MB after the queries on {total:,} rows (master {master:.0f} MB).{details_why}")
    return [
        Figure(f"Inspection p95, {total:,} rows (state+type / q rare / q common / by id)", f"{summary} ms",
               "-", "-", "p95 ≤ 50 ms", worst <= 50, cmd, details),
        Figure("API memory with the big ledger (RSS per API process)", f"{rss_after:.0f} MB (before: "
               f"{rss_before:.0f} MB)", "Flower: see next row", "-", "flat, ≤ 150 MB",
               rss_after <= 150 and rss_after - rss_before < 30, cmd, "Measured with the figure above (psutil RSS "
               "of each gunicorn worker process; the largest is reported)."),
    ]


FLOWER_WORKERS = ("raw-flower-1@bench", "raw-flower-2@bench")
EVENTS_PER_TASK = 3  # task-received, task-started, task-succeeded
REPLAY_CHUNK_TASKS = 500
HEARTBEAT_INTERVAL_S = 2.0  # a worker's default (celery/worker/heartbeat.py)


class FlowerProgress:
    """How many task events Flower has applied to its state, read from its own ``/metrics``
    (``flower_events_total`` is counted in the same IOLoop callback that updates the task list)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def task_events(self) -> int:
        status, payload = self.client.request("GET", "/metrics")
        if status != 200:
            return 0
        total = 0.0
        for line in payload.decode().splitlines():
            if line.startswith("flower_events_total{") and 'type="task-' in line:
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def worker_online(self, hostname: str) -> bool:
        status, payload = self.client.request("GET", "/metrics")
        return status == 200 and f'flower_worker_online{{worker="{hostname}"}} 1.0' in payload.decode()


class ReplayedWorkers:
    """The event stream two ``celery worker -E`` (prefork, so with the event loop) would send Flower
    for ``noop`` tasks, published with Celery's own event dispatcher.

    Same fields and same wire format as the worker: ``task-received`` (celery/worker/strategy.py:
    uuid, name, args/kwargs as their reprs, root_id, parent_id, retries, eta, expires), ``task-started``
    (celery/worker/request.py ``on_accepted``: uuid), ``task-succeeded`` (``on_success``: uuid, the
    result's repr, runtime); the dispatcher adds hostname, utcoffset, pid, clock and timestamp, and,
    as the worker's does (celery/worker/consumer/events.py), buffers task events and publishes them in
    lists of up to 24 (routing key ``task.multi``). ``worker-online`` and a ``worker-heartbeat`` every
    2 s carry the fields of celery/worker/heartbeat.py."""

    def __init__(self, app: Any, hostnames: tuple[str, ...], events_per_message: int = 24) -> None:
        self.connection = app.connection_for_write()
        self.dispatchers = [app.events.Dispatcher(self.connection, hostname=h, buffer_group=["task"],
                                                  buffer_limit=events_per_message) for h in hostnames]
        self.processed = [0] * len(hostnames)
        self.last_beat = 0.0
        self.rng = random.Random(7)

    def beat(self, kind: str = "worker-heartbeat") -> None:
        from celery.utils.sysinfo import load_average
        from celery.worker.state import SOFTWARE_INFO

        for dispatcher, processed in zip(self.dispatchers, self.processed, strict=True):
            dispatcher.send(kind, freq=HEARTBEAT_INTERVAL_S, active=0, processed=processed,
                            loadavg=load_average(), **SOFTWARE_INFO)
        self.last_beat = time.monotonic()

    def beat_if_due(self) -> None:
        if time.monotonic() - self.last_beat >= HEARTBEAT_INTERVAL_S:
            self.beat()

    def run_tasks(self, count: int, first: int) -> None:
        """``count`` tasks, alternating between the workers as two consumers of one queue would."""
        for n in range(first, first + count):
            slot = n % len(self.dispatchers)
            dispatcher = self.dispatchers[slot]
            task_id = str(uuid.uuid4())
            dispatcher.send("task-received", uuid=task_id, name="bench.noop", args="()", kwargs="{}",
                            root_id=task_id, parent_id=None, retries=0, eta=None, expires=None)
            dispatcher.send("task-started", uuid=task_id)
            dispatcher.send("task-succeeded", uuid=task_id, result="None",
                            runtime=self.rng.uniform(0.0003, 0.002))
            self.processed[slot] += 1
        for dispatcher in self.dispatchers:
            dispatcher.flush()
        self.beat_if_due()

    def close(self) -> None:
        self.beat("worker-offline")
        for dispatcher in self.dispatchers:
            dispatcher.close()
        self.connection.release()


def flower_figure(run: Run, args: argparse.Namespace, api_rss: Figure) -> Figure:
    """Flower's RSS once it holds ``--flower-tasks`` tasks learnt from worker events.

    What Flower holds depends only on the events it receives, so the harness replays the stream two
    workers would send (ReplayedWorkers) instead of running the tasks: a real run of 100,000 tasks costs
    about 8 minutes of the 20-minute budget and changes nothing in Flower's memory. The replay is paced
    so that at most about one chunk of events waits in Flower unapplied, as in a real run where events
    trickle in at the workers' rate; otherwise a queue of pending events could inflate the RSS read."""
    import psutil

    n = args.flower_tasks
    queue = f"{run.namespace}-flower-mem"
    app = raw_app(run, queue)
    port = free_port()
    flower = run.spawn("flower-mem", [str(BIN / "celery"), "-A", "bench.rawapp", "flower", f"--port={port}",
                                      "--address=127.0.0.1", f"--max_tasks={max(n, 100_000)}"],
                       {**run.raw_env(queue), "FLOWER_UNAUTHENTICATED_API": "true"}, url=f"http://127.0.0.1:{port}")
    wait_http(flower, "/healthcheck")
    client = Client(flower.url)
    progress = FlowerProgress(client)
    workers = ReplayedWorkers(app.app, FLOWER_WORKERS)

    def subscribed() -> bool:  # events published before Flower subscribes are lost (Redis pub/sub)
        workers.beat("worker-online")
        return all(progress.worker_online(h) for h in FLOWER_WORKERS)

    wait_for(subscribed, 60, 0.5, "Flower to see the replayed workers")
    base = psutil.Process(flower.process.pid).memory_info().rss / 2**20
    began = time.perf_counter()
    for first in range(0, n, REPLAY_CHUNK_TASKS):
        workers.run_tasks(min(REPLAY_CHUNK_TASKS, n - first), first)
        # At most one chunk in flight: Flower applies the previous one while this one is published.
        behind = first * EVENTS_PER_TASK
        deadline = time.monotonic() + 120
        while progress.task_events() < behind:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Flower applied {progress.task_events():,} of {behind:,} task events in 120 s")
            workers.beat_if_due()
            time.sleep(0.01)

    def known() -> int:
        status, payload = client.request("GET", f"/api/tasks?limit=1&offset={n - 1}")
        return len(json.loads(payload)) if status == 200 else 0

    deadline = time.monotonic() + 60
    while not known() and time.monotonic() < deadline:
        workers.beat_if_due()
        time.sleep(0.5)
    held = known()
    applied = progress.task_events()
    rss = psutil.Process(flower.process.pid).memory_info().rss / 2**20
    took = time.perf_counter() - began
    workers.close()
    flower.stop()
    print(f"  flower: {rss:.0f} MB holding {n:,} tasks ({applied:,} task events applied) after {took:.0f}s "
          f"(idle {base:.0f} MB)", flush=True)
    label = f"{rss:.0f} MB holding {n:,} tasks" if held else f"{rss:.0f} MB (it had not caught up with all {n:,})"
    extrapolated = ""
    if n < 100_000:
        per = (rss - base) / n
        extrapolated = (f" **Measured with {n:,} tasks (`--flower-tasks`), not 100,000; extrapolated linearly to "
                        f"100,000: about {base + per * 100_000:.0f} MB** (an estimate, not a measurement).")
    return Figure("Flower memory holding tasks (vs AIOS API RSS above)", api_rss.aios,
                  f"Flower {label} (idle: {base:.0f} MB)", "-", "AIOS flat, ≤ 150 MB", api_rss.met,
                  f"`.venv/bin/python bench/run_all.py --only inspect --flower-tasks {n}`",
                  f"`celery flower --max_tasks={max(n, 100_000)}` on the raw Celery app; RSS of the Flower process "
                  f"by psutil after its task list reached {n:,} entries. Flower keeps every task it learns from "
                  f"events in memory, so its RSS grows with the task count; AIOS keeps tasks in PostgreSQL. "
                  f"**The events were replayed by the harness, not produced by running tasks**: for {n:,} `noop` "
                  f"tasks on two worker hostnames, the `task-received`, `task-started` and `task-succeeded` events "
                  f"(plus `worker-online` and a `worker-heartbeat` every 2 s) in the exact format a `celery worker "
                  f"-E` emits (same fields, published with Celery's own event dispatcher, buffered into "
                  f"`task.multi` lists of up to 24 as the worker does), paced so Flower never had more than "
                  f"{REPLAY_CHUNK_TASKS * EVENTS_PER_TASK:,} events waiting ({took:.0f} s; {applied:,} task events "
                  f"applied). Why: what Flower holds depends only on the events it receives, and running "
                  f"100,000 real tasks through two workers took about 8 minutes (471 s in the run of 2026-11-25, "
                  f"which read 633 MB) of the 20-minute budget without changing that.{extrapolated}")
