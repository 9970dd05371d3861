"""How long a sync run takes on a big ledger with nothing to fix, and whether its queries use indexes.

    .venv/bin/python bench/bench_sync.py            # AIOS_DATABASE__URL, default postgresql://postgres@127.0.0.1:5432/test

Creates a PostgreSQL schema of its own, migrates it, bulk-inserts ``--tasks`` task rows (default 100,000:
mostly finished, some QUEUED a moment ago, some RUNNING on a live agent, some SCHEDULED for later: the
normal state of a busy installation, which sync must leave alone), then runs :func:`aios.recovery.sync.run_sync`
a few times and reports the wall time of a run and the time spent in SQL (measured with SQLAlchemy's
``before_cursor_execute``/``after_cursor_execute`` events). Every SELECT a run issued is then run again
under ``EXPLAIN ANALYZE``; a sequential scan of ``tasks`` is reported as a failure. The schema is dropped
at the end. A section with the figures replaces its earlier one in ``BENCHMARKS.md`` (``--no-write`` to skip).

The broker is ``AIOS_BROKER__URL`` (default the local Redis, under a key prefix of its own). The live
agent is a real ``aios worker`` process (started before the rows are loaded, so it registers itself the
way every agent does), which answers the run's ``inspect active`` as a live agent would: a run waits for
its reply, not for the inspect timeout.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import sqlalchemy as sa  # noqa: E402
from sqlalchemy import event, insert  # noqa: E402

from bench.harness import machine  # noqa: E402

#: Share of each state in the generated ledger (the rest of the rows are SUCCEEDED).
MIX = {
    "FAILED": 0.05,
    "CANCELLED": 0.03,
    "DEAD": 0.02,
    "TIMED_OUT": 0.01,
    "QUEUED": 0.05,
    "RUNNING": 0.01,
    "SCHEDULED": 0.03,
}


def fill(engine: sa.Engine, count: int, agent: str) -> dict[str, int]:
    """Bulk-insert ``count`` tasks in a realistic mix of states (those RUNNING on ``agent``, a live agent
    already registered); returns the count per state."""
    from aios.models import Task
    from aios.timeutil import utcnow

    rng = random.Random(7)
    now = utcnow()
    states = [s for s, share in MIX.items() for _ in range(int(count * share))]
    states += ["SUCCEEDED"] * (count - len(states))
    rng.shuffle(states)
    with engine.begin() as connection:
        batch: list[dict[str, Any]] = []
        for n, state in enumerate(states):
            created = (
                now - timedelta(seconds=rng.uniform(0, 30 * 86_400))
                if state not in ("QUEUED", "RUNNING")
                else now - timedelta(seconds=rng.uniform(0, 10))
            )
            row: dict[str, Any] = {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "type": "echo",
                "parameters": {"n": n},
                "priority": rng.randint(0, 9),
                "queue": "default",
                "state": state,
                "result": None,
                "error": None,
                "attempts": 0 if state in ("QUEUED", "SCHEDULED", "CANCELLED") else 1,
                "max_retries": 3,
                "timeout_s": 3600,
                "dispatch_id": str(uuid.uuid4()),
                "agent": None,
                "owner": "bench",
                "routing": "queue",
                "on_agent_lost": "retry",
                "created_at": created,
                "updated_at": created,
                "queued_at": None,
                "started_at": None,
                "finished_at": None,
                "run_at": None,
            }
            if state == "SCHEDULED":
                row.update(run_at=now + timedelta(hours=1), dispatch_id=None)
            if state not in ("SCHEDULED",):
                row["queued_at"] = created
            if state not in ("SCHEDULED", "QUEUED", "CANCELLED"):
                row.update(started_at=created, agent=agent)
            if state not in ("SCHEDULED", "QUEUED", "RUNNING"):
                row.update(finished_at=created + timedelta(seconds=1), updated_at=created + timedelta(seconds=1))
            batch.append(row)
            if len(batch) == 10_000:
                connection.execute(insert(Task), batch)
                batch = []
        if batch:
            connection.execute(insert(Task), batch)
        connection.exec_driver_sql("ANALYZE")
    return {state: states.count(state) for state in sorted(set(states))}


class SqlTimer:
    """Time spent in the database driver, per statement, via SQLAlchemy's cursor events."""

    def __init__(self, engine: sa.Engine) -> None:
        self.statements: list[tuple[str, Any, float]] = []
        self.enabled = False
        event.listen(engine, "before_cursor_execute", self.before)
        event.listen(engine, "after_cursor_execute", self.after)

    def before(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    def after(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        took = time.perf_counter() - conn.info["bench_started"].pop()
        if self.enabled:
            self.statements.append((statement, parameters, took))

    def reset(self) -> None:
        self.statements = []

    @property
    def total_s(self) -> float:
        return sum(took for _, _, took in self.statements)


def explain_selects(engine: sa.Engine, statements: list[tuple[str, Any, float]]) -> list[tuple[str, str, bool]]:
    """EXPLAIN ANALYZE each distinct SELECT on ``tasks``; (query, plan, uses a seq scan of tasks)."""
    seen: set[str] = set()
    plans = []
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for statement, parameters, _ in statements:
            text = " ".join(statement.split())
            if not text.upper().startswith("SELECT") or "FROM tasks" not in text or text in seen:
                continue
            seen.add(text)
            cursor.execute("EXPLAIN ANALYZE " + statement, parameters)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            state = (parameters or {}).get("state_1") if isinstance(parameters, dict) else None
            plans.append((f"[{state}] {text}" if state else text, plan, "Seq Scan on tasks" in plan))
        raw.rollback()
    finally:
        raw.close()
    return plans


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()

    from aios.broker.celery_app import create_celery_app
    from aios.db import get_engine
    from bench.harness import create_run, destroy_run

    run = create_run(Path(tempfile.mkdtemp(prefix="aios-bench-sync-")))
    settings, pg_version = run.settings, run.pg_version
    celery = create_celery_app(settings)
    failures: list[str] = []
    try:
        engine = get_engine(settings.database)
        # The live agent: a real worker, registered and beating before the rows arrive.
        agent = run.start_worker("bench-agent", concurrency=1).url
        began = time.perf_counter()
        mix = fill(engine, args.tasks, agent)
        print(f"inserted {args.tasks} tasks in {time.perf_counter() - began:.1f}s: {mix}")

        from aios.recovery import sync

        timer = SqlTimer(engine)
        warmup = sync.run_sync(celery, settings, runner="bench-warmup")
        walls, sqls, counts = [], [], []
        last: dict[str, Any] = {}
        for _ in range(args.runs):
            timer.reset()
            timer.enabled = True
            began = time.perf_counter()
            last = sync.run_sync(celery, settings, runner="bench")
            walls.append(time.perf_counter() - began)
            timer.enabled = False
            sqls.append(timer.total_s)
            counts.append(len(timer.statements))
        if any(v for k, v in warmup["changed"].items()):
            failures.append(f"the warm-up run changed something: {warmup['changed']}")
        found = {k: v for k, v in last["found"].items() if k != "notes" and v}
        changed = {k: v for k, v in last["changed"].items() if v}
        if found or changed or last["errors"]:
            failures.append(f"the run was not a no-op: found {found}, changed {changed}, errors {last['errors']}")
        plans = explain_selects(engine, timer.statements)
        for text, plan, seq in plans:
            print(f"\n-- {text[:200]}\n{plan}")
            if seq:
                failures.append(f"sequential scan of tasks in: {text[:160]}")
        wall, sql = statistics.median(walls), statistics.median(sqls)
        print("wall runs ms: " + " ".join(f"{w * 1000:.1f}" for w in walls))
        print(
            f"\nsync run on {args.tasks} tasks: wall {wall * 1000:.1f} ms (median of {args.runs}), "
            f"SQL {sql * 1000:.1f} ms in {counts[-1]} statements"
        )
        if not args.no_write:
            write_section(args.tasks, mix, wall, sql, counts[-1], walls, sqls, plans, pg_version, failures)
    finally:
        celery.pool.force_close_all()
        destroy_run(run)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def write_section(
    count: int,
    mix: dict[str, int],
    wall: float,
    sql: float,
    statements: int,
    walls: list[float],
    sqls: list[float],
    plans: list[tuple[str, str, bool]],
    pg_version: str,
    failures: list[str],
) -> None:
    path = REPO_ROOT / "BENCHMARKS.md"
    head = "" if path.exists() else "# Benchmarks\n\nFigures measured on the machine named in each section.\n"
    index_lines = []
    for text, plan, _seq in plans:
        scans = sorted(
            {
                line.strip().split(" on ")[0].lstrip("-> ").strip()
                + " on "
                + line.strip().split(" on ", 1)[1].split(" ")[0]
                for line in plan.splitlines()
                if " on " in line and "Scan" in line
            }
        )
        label = text.split("] ", 1)[0] + "] " if text.startswith("[") else ""
        what = label + (text.split(" WHERE ", 1)[1][:110] if " WHERE " in text else text[:110])
        index_lines.append(f"| `{what}` | {', '.join(scans) or '-'} |")
    section = f"""
## Sync run with nothing to fix (`bench/bench_sync.py`)

{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {machine()}, PostgreSQL {pg_version} (same host, over TCP).

{count:,} task rows ({", ".join(f"{n:,} {s}" for s, n in mix.items())}), one live agent (a real worker), nothing to fix.
Median of {len(walls)} runs after a warm-up run:

| measure | value |
|---|---|
| wall time of `run_sync` | {wall * 1000:.1f} ms (runs: {", ".join(f"{w * 1000:.0f}" for w in walls)} ms) |
| time in SQL (cursor events) | {sql * 1000:.1f} ms (runs: {", ".join(f"{s * 1000:.1f}" for s in sqls)} ms) |
| SQL statements per run | {statements} |

The rest of the wall time is the broker: a connection check and one `inspect active` answered by the
live agent (a real `aios worker`). Every SELECT on `tasks` a run made, under `EXPLAIN ANALYZE`:

| query (WHERE …) | scans |
|---|---|
{chr(10).join(index_lines)}

{"Result: every query uses an index." if not failures else "Problems: " + "; ".join(failures)}
"""
    replace_section(path, head, section)
    print(f"written to {path}")


def replace_section(path: Path, head: str, section: str) -> None:
    """Put ``section`` in BENCHMARKS.md in place of the one with the same heading (a re-run replaces
    its figures, it does not pile up old ones); other sections stay as they are."""
    title = section.strip().splitlines()[0]
    text = path.read_text(encoding="utf-8") if path.exists() else head
    parts = text.split("\n## ")
    kept = [parts[0]] + [part for part in parts[1:] if not ("## " + part).startswith(title)]
    path.write_text("\n## ".join(kept).rstrip("\n") + "\n" + section, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
