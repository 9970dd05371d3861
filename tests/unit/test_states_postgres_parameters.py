"""The PostgreSQL strategy's fenced writes (aios.tasks.states_postgres) run on the driver's cursor: what they
send must be what SQLAlchemy would have sent."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg2
import pytest
from sqlalchemy.dialects.postgresql import psycopg2 as pg_psycopg2
from sqlalchemy.exc import OperationalError

from aios.tasks import states_postgres
from aios.tasks.states import CLAIM_COLUMNS, TaskState, _move

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
#: The statements aios.tasks.states.claim and record_outcome hand to the strategy.
CLAIM = states_postgres._claim_statement(_move(TaskState.QUEUED, TaskState.RUNNING), CLAIM_COLUMNS)


def outcome(target):
    return _move(TaskState.RUNNING, target)


BASE = {"task_id": "t-1", "fence": "d-1", "now": NOW, "actor": "worker:a@h", "detail": {"attempt": 1, "x": [1, "y"]}}


def sqlalchemy_parameters(statement, given):
    dialect = pg_psycopg2.dialect()
    compiled = statement.compile(dialect=dialect)
    params = compiled.construct_params(given)
    for name, process in compiled._bind_processors.items():
        params[name] = process(params[name])
    return compiled.string, params


@pytest.mark.parametrize(
    ("statement", "given"),
    [
        (CLAIM, {**BASE, "v_agent": "a@h"}),
        (
            states_postgres._outcome_statement(outcome(TaskState.SUCCEEDED), ("result",), ("error",)),
            {**BASE, "v_result": {"r": [1]}},
        ),
        (
            states_postgres._outcome_statement(outcome(TaskState.FAILED), ("error",), ("result",)),
            {**BASE, "v_error": "boom"},
        ),
        (
            states_postgres._outcome_statement(outcome(TaskState.DEAD), ("error", "result"), ()),
            {**BASE, "v_error": "boom", "v_result": {"exit_code": 3}},
        ),
    ],
)
def test_a_fenced_write_sends_the_sql_and_parameters_sqlalchemy_would(statement, given):
    compiled = states_postgres._compiled(statement, pg_psycopg2.dialect())

    assert (compiled.sql, compiled.parameters(given)) == sqlalchemy_parameters(statement, given)


def test_a_driver_error_is_raised_as_sqlalchemys_so_the_run_retries_it():
    class Cursor:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, sql, params):
            raise psycopg2.OperationalError("server closed the connection unexpectedly")

    class Proxied:
        dbapi_connection = type("DBAPIConnection", (), {"cursor": lambda self: Cursor()})()

    class Connection:
        dialect = pg_psycopg2.dialect(dbapi=psycopg2)
        connection = Proxied()

    with pytest.raises(OperationalError):
        states_postgres._fetch_one(Connection(), CLAIM, {**BASE, "v_agent": "a@h"})
