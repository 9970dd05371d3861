"""Where a submit's time goes: SQL statements, transactions (pool checkouts), time in the database
driver and Redis publishes per ``POST /api/v1/tasks`` and per ``POST /api/v1/tasks/batch`` of 1,000,
measured in-process (the real app through Flask's test client, no HTTP server) with SQLAlchemy's
cursor and pool events. The section "Why submit is slower than the ceiling" in BENCHMARKS.md is its
output; ``run_all.py`` runs it after the figures, and it can run alone:

    .venv/bin/python bench/profile_submit.py          # replaces its section in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import event  # noqa: E402

from bench.harness import REPO_ROOT, FakeAgent, Run, create_run, destroy_run  # noqa: E402

TITLE = "## Why submit is slower than the ceiling (profile)"


def shape(statement: str) -> str:
    text = " ".join(statement.split())
    verb = text.split(" ", 1)[0].upper()
    table = re.search(r"(?:FROM|INTO|UPDATE)\s+\"?(\w+)", text, re.IGNORECASE)
    return f"{verb} {table.group(1) if table else ''}".strip()


def profile(run: Run, requests: int = 30) -> str:
    from kombu import Producer

    from webapi.app import create_app

    os.environ.update({k: v for k, v in run.env.items() if k.startswith("AIOS_")})
    app = create_app(run.settings, run.celery)
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = run.admin_key()
    engine = run.engine()
    seen: dict[str, Any] = {"on": False, "statements": [], "checkouts": 0, "sql_s": 0.0, "publishes": 0}

    def before(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        conn.info["t"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if seen["on"]:
            seen["statements"].append(shape(statement))
            seen["sql_s"] += time.perf_counter() - conn.info.pop("t", time.perf_counter())

    def checkout(*_: Any) -> None:
        if seen["on"]:
            seen["checkouts"] += 1

    original = Producer.publish

    def publish(self: Any, *args: Any, **kwargs: Any) -> Any:
        if seen["on"]:
            seen["publishes"] += 1
        return original(self, *args, **kwargs)

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine.pool, "checkout", checkout)
    Producer.publish = publish  # counting only; the real publish runs
    lines = []
    try:
        with FakeAgent(run):
            batch = {"tasks": [{"type": "echo", "parameters": {"n": n}} for n in range(1000)]}
            for label, path, body, count, per in (
                ("`POST /api/v1/tasks`", "/api/v1/tasks", {"type": "echo", "parameters": {"n": 1}}, requests, 1),
                ("`POST /api/v1/tasks/batch` (1,000)", "/api/v1/tasks/batch", batch, 3, 1000),
            ):
                client.post(path, json=body)  # warm-up
                seen.update(on=True, statements=[], checkouts=0, sql_s=0.0, publishes=0)
                began = time.perf_counter()
                for _ in range(count):
                    answer = client.post(path, json=body)
                    assert answer.status_code == 202, answer.get_json()
                wall = (time.perf_counter() - began) / count
                seen["on"] = False
                kinds = collections.Counter(seen["statements"])
                top = ", ".join(f"{k} ×{v / count:.3g}" for k, v in kinds.most_common(8))
                lines.append(
                    f"| {label} | {wall * 1000:.1f} ms ({wall * 1000 / per:.2f} ms/task) | "
                    f"{len(seen['statements']) / count:.1f} | {seen['checkouts'] / count:.1f} | "
                    f"{seen['sql_s'] / count * 1000:.1f} ms | {seen['publishes'] / count:.1f} | {top} |"
                )
    finally:
        Producer.publish = original
    return (
        f"{TITLE}\n\nMeasured in-process (Flask test client, no HTTP, no gunicorn) on the same PostgreSQL "
        f"and Redis, per request, with SQLAlchemy cursor/pool events and a count of kombu publishes. The "
        f"ceiling (bench/ceiling.py) does 1 statement, 1 transaction and 1 publish per task. Publishes "
        f"count every kombu `Producer.publish` (task messages and any event messages sent with them).\n\n"
        f"| request | wall | SQL statements | transactions (pool checkouts) | time in SQL | publishes | "
        f"statements by kind |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )


def replace_section(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    parts = text.split("\n## ")
    kept = [parts[0]] + [p for p in parts[1:] if not ("## " + p).startswith(TITLE)]
    path.write_text("\n## ".join(kept).rstrip("\n") + "\n\n" + section, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO_ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    run = create_run(Path(tempfile.mkdtemp(prefix="aios-profile-")))
    try:
        section = profile(run)
    finally:
        destroy_run(run)
    print(section)
    replace_section(Path(args.output), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
