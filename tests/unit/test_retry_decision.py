"""The one retry-or-give-up decision (aios.tasks.retries.after_failure), for failed attempts and lost runs."""

from __future__ import annotations

import random

import pytest

from aios.config import Settings
from aios.tasks.retries import Decision, after_failure, backoff_s
from aios.tasks.states import TaskState


def settings_with(base: float = 1.0, cap: float = 600.0) -> Settings:
    return Settings.model_validate({"orchestrator": {"retry_backoff_base_s": base, "retry_backoff_max_s": cap}})


@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_a_failed_attempt_with_retries_left_is_retried_after_the_backoff_of_that_attempt(attempts):
    # Given a task allowed three retries, failing on attempt 1, 2 or 3
    settings = settings_with()
    # When the decision is made with a seeded random source
    decision = after_failure(
        settings, attempts=attempts, max_retries=3, error="ValueError: boom", rng=random.Random(attempts)
    )
    # Then it is retried, keeping the error as it is, after exactly backoff_s's delay for that attempt
    expected = backoff_s(settings, attempts, rng=random.Random(attempts))
    assert decision == Decision(TaskState.RETRYING, "ValueError: boom", retry_in_s=expected)


def test_a_failed_attempt_with_no_retries_left_is_dead_with_its_error_as_it_is():
    # Given a task on its fourth attempt of 1 + 3 allowed
    decision = after_failure(settings_with(), attempts=4, max_retries=3, error="ValueError: boom")
    # Then it is DEAD, its error unchanged, and nothing is retried
    assert decision == Decision(TaskState.DEAD, "ValueError: boom", retry_in_s=None)


def test_a_task_allowed_no_retries_is_dead_after_its_first_failed_attempt():
    assert after_failure(settings_with(), attempts=1, max_retries=0, error="x").state is TaskState.DEAD


def test_on_agent_lost_does_not_change_the_decision_for_a_failed_attempt():
    # Given a task that asked to fail if its agent is lost, whose run raised instead
    decision = after_failure(
        settings_with(), attempts=1, max_retries=2, error="boom", on_agent_lost="fail", rng=random.Random(1)
    )
    # Then it is retried like any failed attempt
    assert decision.state is TaskState.RETRYING and decision.error == "boom"


def test_a_lost_run_with_retries_left_is_retried_at_once():
    decision = after_failure(
        settings_with(), attempts=1, max_retries=1, error="agent a@h was lost", run_lost=True, on_agent_lost="retry"
    )
    assert decision == Decision(TaskState.RETRYING, "agent a@h was lost while running it", retry_in_s=0.0)


def test_a_lost_run_with_no_retries_left_is_dead_and_says_so():
    decision = after_failure(
        settings_with(), attempts=1, max_retries=0, error="agent a@h was lost", run_lost=True, on_agent_lost="retry"
    )
    assert decision == Decision(TaskState.DEAD, "agent a@h was lost; no retries left", retry_in_s=None)


@pytest.mark.parametrize("attempts", [1, 5])
def test_a_lost_run_of_a_task_that_asked_to_fail_is_failed_whatever_retries_are_left(attempts):
    decision = after_failure(
        settings_with(),
        attempts=attempts,
        max_retries=3,
        error="agent a@h was lost",
        run_lost=True,
        on_agent_lost="fail",
    )
    assert decision == Decision(TaskState.FAILED, "agent a@h was lost while running it", retry_in_s=None)
