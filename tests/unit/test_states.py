"""The task state machine: which changes are legal, and what a change writes to the ledger.

The transition tests run on a real (temporary) SQLite database built by the real migrations.
"""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aios.config import DatabaseSettings, Settings
from aios.db import get_engine, session_scope
from aios.errors import IllegalTransition
from aios.models import Task, TaskEvent
from aios.tasks import states
from aios.tasks.create import create_tasks
from aios.tasks.spec import TaskSpec
from aios.tasks.states import TERMINAL, TaskState, check_transition, transition, transition_many

S = TaskState

#: The state machine as specified (aios/tasks/states.py docstring), written out independently of ALLOWED.
SPEC: set[tuple[TaskState, TaskState]] = {
    (S.SCHEDULED, S.PENDING),  # its run_at came
    (S.SCHEDULED, S.CANCELLED),
    (S.PENDING, S.QUEUED),
    (S.PENDING, S.CANCELLED),
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.PENDING),  # publish failed: back to PENDING
    (S.QUEUED, S.CANCELLED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.TIMED_OUT),
    (S.RUNNING, S.RETRYING),
    (S.RUNNING, S.DEAD),
    (S.RETRYING, S.QUEUED),
    (S.RETRYING, S.PENDING),
    (S.RETRYING, S.CANCELLED),
}
ILLEGAL = sorted(set(itertools.product(S, S)) - SPEC)


def _id(pair: tuple[TaskState, TaskState]) -> str:
    return f"{pair[0]}->{pair[1]}"


# --------------------------------------------------------------------------- check_transition (pure)


@pytest.mark.parametrize("pair", sorted(SPEC), ids=_id)
def test_every_allowed_transition_passes_the_check(pair):
    # Given a transition the state machine allows
    current, target = pair
    # When it is checked / Then nothing is raised
    check_transition(current, target)


@pytest.mark.parametrize("pair", ILLEGAL, ids=_id)
def test_every_other_transition_is_illegal(pair):
    # Given a pair of states the state machine does not connect
    current, target = pair
    # When it is checked / Then IllegalTransition is raised
    with pytest.raises(IllegalTransition):
        check_transition(current, target)


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_a_terminal_state_can_go_nowhere(terminal):
    # Given a task in a terminal state
    # When any move out of it is checked, even to itself
    for target in S:
        # Then it is refused, and the message says the state is terminal
        with pytest.raises(IllegalTransition, match="terminal"):
            check_transition(terminal, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.QUEUED, S.SUCCEEDED),
        (S.PENDING, S.RUNNING),
        (S.SUCCEEDED, S.QUEUED),
        (S.PENDING, S.RETRYING),
        (S.RETRYING, S.RUNNING),
        (S.DEAD, S.QUEUED),
        (S.CANCELLED, S.PENDING),
    ],
    ids=lambda s: str(s),
)
def test_well_known_shortcuts_are_refused(current, target):
    # Given a shortcut that skips a step (or leaves a terminal state)
    # When it is checked / Then it raises IllegalTransition, an HTTP 409 error
    with pytest.raises(IllegalTransition) as caught:
        check_transition(current, target)
    assert caught.value.status == 409


def test_the_terminal_set_is_exactly_the_five_final_states():
    # Given the documented final states / Then TERMINAL is exactly those
    assert {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMED_OUT, S.DEAD} == TERMINAL


def test_states_given_as_plain_strings_are_checked_the_same_way():
    # Given state names as strings (as stored in the database)
    # When checked / Then legal ones pass and illegal ones raise
    check_transition("PENDING", "QUEUED")
    with pytest.raises(IllegalTransition):
        check_transition("SUCCEEDED", "RUNNING")


# --------------------------------------------------------------------------- transition (real SQLite)


def new_task(db: DatabaseSettings) -> str:
    """Insert one PENDING task the way the API does (it writes one PENDING event)."""
    spec = TaskSpec(type="echo", parameters={"x": 1}, priority=5, max_retries=3, timeout_s=60, queue="default")
    (task_id,) = create_tasks(None, Settings(database=db), [spec], actor="test", publish=False).ids
    return task_id


def move(db: DatabaseSettings, task_id: str, current: TaskState, target: TaskState, **kwargs) -> bool:
    with session_scope(db) as session:
        return transition(session, task_id, current, target, actor="test", **kwargs)


def event_count(session: Session, task_id: str) -> int:
    return session.scalar(select(func.count()).select_from(TaskEvent).where(TaskEvent.task_id == task_id))


def snapshot(db: DatabaseSettings, task_id: str) -> tuple[Task, int]:
    with session_scope(db) as session:
        return session.get(Task, task_id), event_count(session, task_id)


def test_a_transition_moves_the_task_and_writes_exactly_one_event(db):
    # Given a PENDING task with its creation event
    task_id = new_task(db)
    _, events_before = snapshot(db, task_id)
    # When it moves to QUEUED
    moved = move(db, task_id, S.PENDING, S.QUEUED, detail={"why": "test"})
    # Then the row changed and exactly one event describes the change
    task, events_after = snapshot(db, task_id)
    assert moved is True
    assert task.state == "QUEUED"
    assert task.queued_at is not None
    assert events_after == events_before + 1
    with session_scope(db) as session:
        newest = select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id.desc())
        last = session.scalars(newest).first()
        assert (last.from_state, last.to_state, last.actor) == ("PENDING", "QUEUED", "test")
        assert last.detail == {"why": "test"}


def test_a_transition_from_the_wrong_current_state_changes_nothing_and_returns_false(db):
    # Given a task that is PENDING
    task_id = new_task(db)
    before, events_before = snapshot(db, task_id)
    # When a caller believes it is QUEUED and tries to start it
    moved = move(db, task_id, S.QUEUED, S.RUNNING)
    # Then nothing moved and no event was written
    after, events_after = snapshot(db, task_id)
    assert moved is False
    assert after.state == "PENDING"
    assert after.updated_at == before.updated_at
    assert after.started_at is None
    assert events_after == events_before


def test_a_fenced_transition_needs_the_current_dispatch_id(db):
    # Given a task QUEUED under dispatch "d-1"
    task_id = new_task(db)
    assert move(db, task_id, S.PENDING, S.QUEUED, values={"dispatch_id": "d-1"})
    _, events_before = snapshot(db, task_id)
    # When a holder of an older dispatch tries to claim it
    stale = move(db, task_id, S.QUEUED, S.RUNNING, fence="d-0")
    # Then it is refused and nothing is written
    task, events_after = snapshot(db, task_id)
    assert stale is False
    assert task.state == "QUEUED"
    assert events_after == events_before
    # When the holder of the current dispatch claims it
    # Then it moves
    assert move(db, task_id, S.QUEUED, S.RUNNING, fence="d-1") is True
    task, events_final = snapshot(db, task_id)
    assert task.state == "RUNNING"
    assert events_final == events_before + 1


def test_a_terminal_state_is_never_overwritten(db):
    # Given a task that SUCCEEDED with a result
    task_id = new_task(db)
    assert move(db, task_id, S.PENDING, S.QUEUED, values={"dispatch_id": "d-1"})
    assert move(db, task_id, S.QUEUED, S.RUNNING, fence="d-1")
    assert move(db, task_id, S.RUNNING, S.SUCCEEDED, fence="d-1", values={"result": {"x": 1}})
    before, events_before = snapshot(db, task_id)
    # When a late report still believes the task is RUNNING and says it failed
    late = move(db, task_id, S.RUNNING, S.FAILED, fence="d-1", values={"error": "boom"})
    # Then nothing changes
    after, events_after = snapshot(db, task_id)
    assert late is False
    assert (after.state, after.result, after.error) == ("SUCCEEDED", {"x": 1}, None)
    assert after.finished_at == before.finished_at
    assert events_after == events_before
    # And an attempt to move it out of SUCCEEDED is refused before anything is written
    with pytest.raises(IllegalTransition), session_scope(db) as session:
        transition(session, task_id, S.SUCCEEDED, S.QUEUED, actor="test")
    assert snapshot(db, task_id)[0].state == "SUCCEEDED"


def test_an_illegal_transition_raises_even_if_the_row_would_match(db):
    # Given a PENDING task
    task_id = new_task(db)
    # When someone tries to jump straight to SUCCEEDED
    with pytest.raises(IllegalTransition), session_scope(db) as session:
        transition(session, task_id, S.PENDING, S.SUCCEEDED, actor="test")
    # Then the task is still PENDING
    assert snapshot(db, task_id)[0].state == "PENDING"


def test_transition_many_moves_only_the_tasks_still_in_the_expected_state(db):
    # Given three PENDING tasks, one of which was cancelled meanwhile
    ids = [new_task(db) for _ in range(3)]
    assert move(db, ids[1], S.PENDING, S.CANCELLED)
    # When all three are moved PENDING -> QUEUED in one call
    with session_scope(db) as session:
        moved = transition_many(session, ids, S.PENDING, S.QUEUED, actor="test")
    # Then only the two still PENDING moved, each with one new event; the cancelled one is untouched
    assert sorted(moved) == sorted([ids[0], ids[2]])
    with session_scope(db) as session:
        states = dict(session.execute(select(Task.id, Task.state).where(Task.id.in_(ids))).all())
        queued_events = session.scalar(
            select(func.count()).select_from(TaskEvent).where(TaskEvent.to_state == "QUEUED")
        )
    assert states == {ids[0]: "QUEUED", ids[1]: "CANCELLED", ids[2]: "QUEUED"}
    assert queued_events == 2


def test_transition_many_with_per_task_values_gives_each_row_its_own_values(db):
    # Given two PENDING tasks
    ids = [new_task(db) for _ in range(2)]
    # When they are queued with a different dispatch id each
    with session_scope(db) as session:
        moved = transition_many(
            session,
            ids,
            S.PENDING,
            S.QUEUED,
            actor="test",
            per_task_values={ids[0]: {"dispatch_id": "a"}, ids[1]: {"dispatch_id": "b"}},
        )
    # Then both moved and carry their own dispatch id
    assert sorted(moved) == sorted(ids)
    with session_scope(db) as session:
        fences = dict(session.execute(select(Task.id, Task.dispatch_id).where(Task.id.in_(ids))).all())
    assert fences == {ids[0]: "a", ids[1]: "b"}


def test_transition_many_of_no_tasks_writes_nothing(db):
    # Given no task ids / When they are "moved" / Then nothing is written
    with session_scope(db) as session:
        assert transition_many(session, [], S.PENDING, S.QUEUED, actor="test") == []
        assert session.scalar(select(func.count()).select_from(TaskEvent)) == 0


# --------------------------------------------------------------------------- insert_new (real SQLite)


def new_row(state: str | None, **columns) -> dict:
    """The columns of one new task row, as a creator hands them to insert_new."""
    row = {
        "id": f"t-{state}-{len(columns)}",
        "type": "echo",
        "parameters": {},
        "priority": 5,
        "queue": "default",
        "attempts": 0,
        "max_retries": 0,
        "timeout_s": 60,
        "on_agent_lost": "retry",
        **columns,
    }
    if state is not None:
        row["state"] = state
    return row


def stored_states(db: DatabaseSettings) -> dict[str, str]:
    with session_scope(db) as session:
        return dict(session.execute(select(Task.id, Task.state)).all())


def test_a_task_is_born_only_scheduled_pending_or_queued():
    # Given the state machine's diagram (a task is held SCHEDULED, waits PENDING, or is queued at once)
    # Then those are exactly its initial states
    assert {S.SCHEDULED, S.PENDING, S.QUEUED} == states.INITIAL


def test_insert_new_stores_rows_in_each_initial_state_through_a_session(db):
    # Given one new row in each initial state
    rows = [new_row("PENDING"), new_row("SCHEDULED", run_at=None), new_row("QUEUED", dispatch_id="d-1")]
    # When they are inserted through a session
    with session_scope(db) as session:
        states.insert_new(session, rows)
    # Then each is stored in its state
    assert stored_states(db) == {row["id"]: row["state"] for row in rows}


def test_insert_new_works_on_a_connection_too(db):
    # Given a new PENDING row (its state given as the enum)
    row = new_row(S.PENDING)
    # When it is inserted through a Core connection
    with get_engine(db).begin() as connection:
        states.insert_new(connection, [row])
    # Then it is stored PENDING
    assert stored_states(db) == {row["id"]: "PENDING"}


@pytest.mark.parametrize("state", sorted(set(S) - {S.SCHEDULED, S.PENDING, S.QUEUED}) + [None])
def test_insert_new_refuses_a_task_born_in_any_other_state_and_writes_nothing(db, state):
    # Given a batch with one legal new row and one born RUNNING, DEAD, ... or with no state at all
    rows = [new_row("PENDING"), new_row(state, id="t-bad")]
    # When it is inserted / Then the state machine's error is raised, naming the task and the state
    with pytest.raises(IllegalTransition, match=f"task t-bad cannot be created {state}") as caught:
        with session_scope(db) as session:
            states.insert_new(session, rows)
    assert caught.value.status == 409
    # And nothing was stored, not even the legal row
    assert stored_states(db) == {}


def test_insert_new_of_no_rows_writes_nothing(db):
    # Given no rows / When they are inserted / Then nothing is stored
    with session_scope(db) as session:
        states.insert_new(session, [])
    assert stored_states(db) == {}


# --------------------------------------------------------------------------- claim and record_outcome (SQLite: the
# portable path; PostgreSQL's one-statement strategy is covered by the integration tests and
# test_states_postgres_parameters.py)


def queued_task(db: DatabaseSettings, dispatch_id: str = "d-1") -> str:
    task_id = new_task(db)
    assert move(db, task_id, S.PENDING, S.QUEUED, values={"dispatch_id": dispatch_id})
    return task_id


def test_a_claim_moves_a_task_queued_for_its_dispatch_to_running_and_hands_over_the_run(db):
    # Given a task QUEUED under dispatch d-1
    task_id = queued_task(db)
    _, events_before = snapshot(db, task_id)
    # When the holder of d-1 claims it
    row = states.claim(Settings(database=db), task_id, "d-1", "a@h", actor="worker:a@h", detail={"dispatch_id": "d-1"})
    # Then the run gets its type, parameters and attempt, and the row is RUNNING on that agent with one event
    assert row == states.ClaimRow(id=task_id, type="echo", parameters={"x": 1}, attempts=1, max_retries=3)
    task, events_after = snapshot(db, task_id)
    assert (task.state, task.agent, task.attempts) == ("RUNNING", "a@h", 1)
    assert task.started_at is not None
    assert events_after == events_before + 1


def test_a_claim_for_another_dispatch_moves_nothing(db):
    # Given a task QUEUED under dispatch d-1
    task_id = queued_task(db)
    before, events_before = snapshot(db, task_id)
    # When a stale delivery (d-0) claims it / Then nothing moves and nothing is written
    assert states.claim(Settings(database=db), task_id, "d-0", "a@h", actor="worker:a@h", detail={}) is None
    after, events_after = snapshot(db, task_id)
    assert (after.state, after.attempts, events_after) == ("QUEUED", before.attempts, events_before)


def test_an_outcome_is_recorded_once_and_only_for_the_running_dispatch(db):
    # Given a task RUNNING under dispatch d-1
    settings = Settings(database=db)
    task_id = queued_task(db)
    assert states.claim(settings, task_id, "d-1", "a@h", actor="worker:a@h", detail={}) is not None
    # When another dispatch reports an outcome / Then it is refused
    assert not states.record_outcome(settings, task_id, "d-0", S.FAILED, {"error": "x"}, actor="worker:b@h", detail={})
    # When the run reports SUCCEEDED / Then it is recorded with its result, its error NULL
    assert states.record_outcome(
        settings, task_id, "d-1", S.SUCCEEDED, {"result": {"r": 1}, "error": None}, actor="worker:a@h", detail={}
    )
    task, events = snapshot(db, task_id)
    assert (task.state, task.result, task.error) == ("SUCCEEDED", {"r": 1}, None)
    # When a later report of the same run comes / Then it moves nothing: an outcome is recorded once
    assert not states.record_outcome(
        settings, task_id, "d-1", S.FAILED, {"error": "late"}, actor="worker:a@h", detail={}
    )
    after, events_after = snapshot(db, task_id)
    assert (after.state, events_after) == ("SUCCEEDED", events)


def test_an_illegal_outcome_is_refused_before_anything_is_written(db):
    # Given a task RUNNING under dispatch d-1
    settings = Settings(database=db)
    task_id = queued_task(db)
    assert states.claim(settings, task_id, "d-1", "a@h", actor="worker:a@h", detail={}) is not None
    # When a run reports an end the machine does not allow from RUNNING / Then it raises
    with pytest.raises(IllegalTransition):
        states.record_outcome(settings, task_id, "d-1", S.QUEUED, {}, actor="worker:a@h", detail={})
    assert snapshot(db, task_id)[0].state == "RUNNING"
