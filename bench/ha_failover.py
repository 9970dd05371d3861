"""Site A lost (docs/ha.md): how long until site B takes writes and runs tasks again, and what is lost.

Each repetition builds the two-site pair of ``tests/ha`` (:mod:`tests.support.ha_sites`: two network
namespaces; PostgreSQL primary on A with a synchronous standby on B; Redis master on A, replica on B,
three Sentinels; an API, an agent and a beat on each site), streams ``test.effect`` submissions to both
APIs, then SIGKILLs every process of site A and cuts its link. The standby is promoted at once (as Patroni
does after its leader key expires: add Patroni's ``ttl``, 30 s by default, to the figures for a
Patroni-run pair) and Sentinel elects B's replica by itself. Measured from the moment of the kill: the
first ``202`` site B's API gives, the first ``RUNNING`` event in the ledger (a task run on B), and,
once everything has settled, the tasks answered ``202`` that did not end ``SUCCEEDED`` exactly once.

Needs root and ``ip netns``. ``python bench/ha_failover.py`` prints the figures alone; ``make bench``
writes them to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Figure, Stat  # noqa: E402

#: Load runs this long before the loss and this long after it.
BEFORE_S = 3.0
AFTER_S = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ha-reps", type=int, default=3, help="site-A-lost repetitions (a fresh pair each)")


def lose_site_a_once(base_env: dict[str, str], root: Path) -> dict[str, float]:
    """One repetition on a fresh pair: seconds to the first 202 and first run on B, tasks lost, doubles."""
    from aios.config import load_settings
    from tests.conftest import BEAT_TEST_ENV, make_user, wait_for
    from tests.faults.conftest import FAST_SYNC, Effects, read_tasks, wait_terminal
    from tests.support.agent_helpers import FAST_BEATS
    from tests.support.ha_sites import (
        first_run_after,
        first_write_after,
        start_pair,
        timed_submitter,
        two_sites,
    )

    env = {**base_env, **FAST_BEATS, **BEAT_TEST_ENV, **FAST_SYNC}
    with two_sites() as sites:
        pair = start_pair(sites, root, env, f"ha{uuid.uuid4().hex[:10]}")
        try:
            settings = load_settings(environ=pair.env)
            admin = make_user(SimpleNamespace(settings=settings), "admin")  # type: ignore[arg-type]
            effects = Effects(root / "effects.txt")
            submitters = [timed_submitter(aios.url, admin.key, effects, pair.queue) for aios in pair.aios.values()]
            for submitter in submitters:
                submitter.start()
            try:
                wait_for(lambda: len(effects.counts()) >= 2, timeout=60, what="the first tasks to run")
                time.sleep(BEFORE_S)
                lost_at = time.time()
                pair.lose_site_a()
                pair.promote("b")
                time.sleep(AFTER_S)
            finally:
                for submitter in submitters:
                    submitter.stop()
            b = next(s for s in submitters if s.url == pair.aios["b"].url)
            first_202 = first_write_after(b, lost_at)
            first_run = first_run_after(settings.database, lost_at, pair.aios["b"].hostname)
            ids = [task_id for submitter in submitters for task_id in submitter.accepted]
            try:
                tasks = wait_terminal(settings.database, ids, timeout=240)
            except AssertionError:
                tasks = read_tasks(settings.database, ids)
            unfinished = {
                i: tasks.get(i, {}).get("transitions") for i in ids if tasks.get(i, {}).get("state") != "SUCCEEDED"
            }
            if unfinished:
                print(f"  not SUCCEEDED (logs kept in {root}): {unfinished}", flush=True)
            lost = len(unfinished)
            doubles = sum(1 for t in tasks.values() if t["transitions"].count("SUCCEEDED") > 1)
            if first_202 is None or first_run is None:
                raise RuntimeError(f"site B took no write or ran nothing in {AFTER_S}s after the loss")
            return {
                "first_202_s": first_202 - lost_at,
                "first_run_s": first_run - lost_at,
                "lost": lost,
                "doubles": doubles,
                "accepted": len(ids),
            }
        finally:
            from aios.db import dispose_engines

            dispose_engines()
            pair.stop()


def measure(run: Any, api: Any, args: argparse.Namespace) -> list[Figure]:
    base_env = {**run.env, "AIOS_TASKS__MODULES": '["tests.support.task_types"]'}
    return figures(base_env, args.ha_reps)


def figures(base_env: dict[str, str], reps: int) -> list[Figure]:
    results = []
    for rep in range(reps):
        root = Path(tempfile.mkdtemp(prefix=f"aios-bench-ha{rep}-"))
        results.append(lose_site_a_once(base_env, root))
        if not results[-1]["lost"]:  # a loss keeps its logs for a look
            shutil.rmtree(root, ignore_errors=True)
        print(f"  site A lost, rep {rep + 1}: {results[-1]}", flush=True)
    first_202 = Stat([r["first_202_s"] for r in results], "s")
    first_run = Stat([r["first_run_s"] for r in results], "s")
    lost = sum(int(r["lost"]) for r in results)
    doubles = sum(int(r["doubles"]) for r in results)
    accepted = sum(int(r["accepted"]) for r in results)
    command = f"`.venv/bin/python bench/ha_failover.py --ha-reps {reps}` (as root)"
    details = (
        "Site A (PostgreSQL primary, Redis master, one Sentinel, an API, an agent and a beat) is SIGKILLed "
        "whole and its link cut while both sites' APIs take a submission every 0.3 s each; B's standby is "
        "promoted at once (Patroni would first wait out its leader key's `ttl`, 30 s by default) and "
        "Sentinel elects B's replica (`down-after-milliseconds` 1000). Times from the kill. The first write "
        f"waits for libpq to give up on A (`connect_timeout`) and for Sentinel. {accepted} tasks were "
        f"accepted in all; {lost} of them did not end SUCCEEDED, {doubles} have two SUCCEEDED events "
        "(bench/ha_failover.py's docstring)."
    )
    return [
        Figure("HA: site A lost, first write accepted on B", first_202.fmt(1), "-", "-", "-", None, command, details),
        Figure("HA: site A lost, first task run on B", first_run.fmt(1), "-", "-", "-", None, command, details),
        Figure("HA: site A lost, tasks lost", f"{lost} of {accepted}", "-", "-", "0", lost == 0 and doubles == 0,
               command, details),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    from bench.harness import create_run, destroy_run

    run = create_run(Path(tempfile.mkdtemp(prefix="aios-bench-")))
    try:
        for figure in measure(run, None, args):
            print(f"{figure.name}: {figure.aios} (target {figure.target})")
        print(figure.details)
    finally:
        destroy_run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
