"""After a run failed: retry the task or give up. The one place that decides it.

Two kinds of failure come here, and they differ only in what the task may ask for and in the wait:

* **a failed attempt**: the task raised, or its pool process died under it (OOM, SIGKILL, a task that
  kills its own process). Its agent saw the run end. Retried after :func:`backoff_s`
  while retries are left, else DEAD. Applied by :func:`workers.runner.fail_or_retry`.
* **a lost run**: the run is gone with no outcome (its agent died, went silent, lost its broker
  connection, or no longer holds it). The task's ``on_agent_lost`` decides first (``fail``: FAILED);
  else it is retried at once (the wait was the time it took to notice) while retries are left, else
  DEAD. Applied by :func:`aios.recovery.lost_runs.settle_lost_run`.

"Retries left" is the same for both: ``attempts`` counts the runs claimed so far (this one included),
so a task with ``max_retries`` N runs at most N + 1 times.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from aios.config import Settings
from aios.tasks.states import TaskState

#: ``on_agent_lost`` values: retry a lost run (the default) or fail it.
ON_AGENT_LOST_RETRY, ON_AGENT_LOST_FAIL = "retry", "fail"


def backoff_s(settings: Settings, attempt: int, *, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, full jitter."""
    orchestrator = settings.orchestrator
    ceiling = min(orchestrator.retry_backoff_max_s, orchestrator.retry_backoff_base_s * 2 ** (attempt - 1))
    return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Decision:
    """What becomes of a task whose run failed."""

    #: RETRYING, DEAD or FAILED.
    state: TaskState
    #: The task's ``error`` column.
    error: str
    #: RETRYING: seconds to wait before it is dispatched again (0: at once); None otherwise.
    retry_in_s: float | None = None


def after_failure(
    settings: Settings,
    *,
    attempts: int,
    max_retries: int,
    error: str,
    run_lost: bool = False,
    on_agent_lost: str = ON_AGENT_LOST_RETRY,
    rng: random.Random | None = None,
) -> Decision:
    """Decide what becomes of a task whose run failed (``run_lost`` False) or was lost (True).

    ``error`` says what happened: the error of a failed attempt is kept as it is; a lost run's reads
    "<error> while running it", or "<error>; no retries left" when it ends DEAD. ``on_agent_lost``
    counts only for a lost run. ``rng`` picks the backoff's jitter (tests pass a seeded one).
    """
    if run_lost:
        if on_agent_lost == ON_AGENT_LOST_FAIL:
            return Decision(TaskState.FAILED, f"{error} while running it")
        if attempts > max_retries:
            return Decision(TaskState.DEAD, f"{error}; no retries left")
        return Decision(TaskState.RETRYING, f"{error} while running it", retry_in_s=0.0)
    if attempts > max_retries:
        return Decision(TaskState.DEAD, error)
    return Decision(TaskState.RETRYING, error, retry_in_s=backoff_s(settings, attempts, rng=rng))
