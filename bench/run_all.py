"""``make bench``: every benchmark figure in one run, written whole to BENCHMARKS.md.

    .venv/bin/python bench/run_all.py                 # all figures, the spec's sizes
    .venv/bin/python bench/run_all.py --only submit,e2e --reps 5 --e2e-tasks 20000

One private PostgreSQL schema and Redis key prefix for the run (dropped/deleted at the end), one
``aios api`` shared by the figures, and each figure's own workers. A figure that fails is reported as
"not measured" with its error, never left out. See each module's docstring for what it measures.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (  # noqa: E402
    bench_e2e,
    bench_embedded,
    bench_failover,
    bench_fairness,
    bench_inspect,
    bench_priority,
    bench_submit,
    ha_failover,
)
from bench.harness import REPO_ROOT, Figure, create_run, destroy_run, machine, met_text  # noqa: E402

MODULES = {
    "submit": bench_submit,
    "e2e": bench_e2e,
    "priority": bench_priority,
    "fairness": bench_fairness,
    "failover": bench_failover,
    "sync": None,
    "inspect": bench_inspect,
    "embedded": bench_embedded,
    "ha": ha_failover,  # two sites in network namespaces, site A lost (root and `ip netns`)
}


def versions(pg_version: str) -> str:
    from importlib.metadata import version

    import redis

    try:
        server = redis.Redis().info("server")["redis_version"]
    except Exception:  # noqa: BLE001
        server = "?"
    names = ["celery", "kombu", "flask", "gunicorn", "sqlalchemy", "psycopg2-binary", "redis", "flower"]
    libs = ", ".join(f"{n} {version(n)}" for n in names)
    return f"PostgreSQL {pg_version}, Redis {server}; {libs}"


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # BENCHMARKS.md itself (written by an earlier run) does not make the code "uncommitted".
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!BENCHMARKS.md"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except Exception:  # noqa: BLE001
        return "?"


def sync_figure(args: argparse.Namespace) -> list[Figure]:
    """bench/bench_sync.py in a subprocess (it makes a schema of its own), its figure parsed."""
    argv = [
        sys.executable,
        str(REPO_ROOT / "bench" / "bench_sync.py"),
        "--no-write",
        "--tasks",
        str(args.sync_tasks),
        "--runs",
        str(args.reps),
    ]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    out = done.stdout
    runs_line = next((line for line in out.splitlines() if line.startswith("wall runs ms:")), "")
    walls = [float(x) for x in runs_line.split(":", 1)[1].split()] if runs_line else []
    if done.returncode != 0 or not walls:
        raise RuntimeError(f"bench_sync.py exited {done.returncode}: {(done.stderr or out)[-800:]}")
    from bench.harness import Stat

    stat = Stat([w / 1000 for w in walls], "s")
    summary = next((line for line in out.splitlines() if line.startswith("sync run on")), "")
    return [
        Figure(
            f"Sync run, {args.sync_tasks:,} rows, nothing to fix",
            stat.fmt(3),
            "-",
            "-",
            "≤ 1 s",
            stat.median <= 1.0,
            f"`.venv/bin/python bench/bench_sync.py --no-write --tasks {args.sync_tasks} --runs {args.reps}`",
            f"{summary}. Every SELECT it issued was run again under EXPLAIN ANALYZE: "
            f"{'no sequential scan of tasks' if 'FAIL' not in done.stderr else done.stderr.strip()}. "
            f"The live agent is a real `aios worker`: the wall time includes the broker check and its "
            f"`inspect active` reply (bench_sync.py's docstring)."
            + (
                ""
                if stat.median <= 1.0
                else " Missed: the SQL time above is the database's share; the rest "
                "is the broker (the connection check and the live agent's `inspect active` reply)."
            ),
        )
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma list of " + ", ".join(MODULES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sync-tasks", type=int, default=100_000)
    parser.add_argument("--output", default=str(REPO_ROOT / "BENCHMARKS.md"))
    for module in MODULES.values():
        if module is not None:
            module.add_arguments(parser)
    args = parser.parse_args()
    chosen = [name for name in MODULES if not args.only or name in args.only.split(",")]

    began = time.monotonic()
    load_start = os.getloadavg()
    figures: list[Figure] = []
    timings: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="aios-bench-"))
    run = create_run(tmp)
    header_versions = versions(run.pg_version)
    try:
        api = run.start_api()
        for name in chosen:
            print(f"== {name}", flush=True)
            started = time.monotonic()
            try:
                if name == "sync":
                    figures += sync_figure(args)
                else:
                    figures += MODULES[name].measure(run, api, args)
            except Exception as exc:  # noqa: BLE001 - one figure's failure must not hide the others
                traceback.print_exc()
                figures.append(
                    Figure(
                        name,
                        "not measured",
                        "-",
                        "-",
                        "-",
                        None,
                        "-",
                        f"Not measured: the figure failed with `{type(exc).__name__}: {exc}`"[:1500],
                    )
                )
            timings[name] = time.monotonic() - started
            print(f"== {name} took {timings[name]:.0f}s", flush=True)
    finally:
        destroy_run(run)
    total = time.monotonic() - began
    load = f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    write(Path(args.output), figures, header_versions, total, args, load, timings)
    if not args.only or "submit" in args.only.split(","):
        try:  # where a submit's time goes: explains the submit figures (bench/profile_submit.py)
            from bench import profile_submit

            profile_run = create_run(Path(tempfile.mkdtemp(prefix="aios-profile-")))
            try:
                section = profile_submit.profile(profile_run)
            finally:
                destroy_run(profile_run)
            profile_submit.replace_section(Path(args.output), section)
        except Exception:  # noqa: BLE001 - the figures are written already
            traceback.print_exc()
    print(f"wrote {args.output} in {time.monotonic() - began:.0f}s")
    return 0


def write(
    path: Path,
    figures: list[Figure],
    header_versions: str,
    total: float,
    args: argparse.Namespace,
    load: str,
    timings: dict[str, float],
) -> None:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        "Written whole by `make bench` (`.venv/bin/python bench/run_all.py`); do not edit by hand.",
        "",
        f"- Date: {date}; whole run {total / 60:.1f} min ("
        + ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in timings.items())
        + " min)",
        f"- Commit: {commit()}",
        f"- Machine: {machine()}; {load} (the two cores are shared with whatever else runs: other "
        "processes on the machine inflate every figure, AIOS's and the comparisons' alike)",
        f"- Versions: {header_versions}",
        "- Services: PostgreSQL and Redis on localhost (TCP), shared with nothing else of this run; a private "
        "schema and Redis key prefix per run.",
        f"- Figures: median over {args.reps} repetitions (min–max beside it); every ratio compares figures "
        "measured in the same run.",
        "",
        "## Summary",
        "",
        "| figure | AIOS | comparison | ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        lines.append(f"| {f.name} | {f.aios} | {f.comparison} | {f.ratio} | {f.target} | {met_text(f.met)} |")
    for f in figures:
        lines += ["", f"## {f.name}", "", f"Command: {f.command}", "", f.details]
        if f.note:
            lines += ["", f.note]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
