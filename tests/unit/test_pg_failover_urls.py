"""The plain logic of PostgreSQL failover: how a multi-host URL becomes libpq parameters, and how a
standby's refusal to write becomes an outage (the servers themselves: tests/integration/test_pg_failover.py)."""

from __future__ import annotations

from sqlalchemy.exc import InternalError, OperationalError

from aios.db import LIBPQ_DEFAULTS, ReadOnlyServer, as_outage, libpq_hosts, libpq_params
from workers import runner

FAILOVER_URL = "postgresql+psycopg2://aios:s3cret@/aios?host=db-a:5432&host=db-b:5433&target_session_attrs=read-write"


def test_a_multi_host_url_becomes_one_libpq_host_list_with_its_ports_in_order():
    params, password = libpq_params(FAILOVER_URL)
    assert (params["host"], params["port"]) == ("db-a,db-b", "5432,5433")
    assert params["target_session_attrs"] == "read-write" and params["dbname"] == "aios"
    assert password == "s3cret" and "s3cret" not in params.values()
    assert libpq_hosts(params) == [("db-a", "5432"), ("db-b", "5433")]


def test_one_port_serves_every_host_and_a_missing_host_is_libpqs_default():
    assert libpq_hosts({"host": "a,b,c", "port": "6432"}) == [("a", "6432"), ("b", "6432"), ("c", "6432")]
    assert libpq_hosts({}) == [("localhost", "5432")]


def test_the_connect_timeout_and_keepalives_apply_unless_the_url_sets_its_own():
    params, _ = libpq_params(FAILOVER_URL)
    assert {key: params[key] for key in LIBPQ_DEFAULTS} == LIBPQ_DEFAULTS
    params, _ = libpq_params(FAILOVER_URL + "&connect_timeout=2")
    assert params["connect_timeout"] == "2"


class _DriverError(Exception):
    def __init__(self, pgcode: str) -> None:
        super().__init__(f"SQLSTATE {pgcode}")
        self.pgcode = pgcode


def test_a_write_refused_by_a_read_only_server_is_an_outage_and_drops_its_connection():
    # Given the error SQLAlchemy makes of psycopg2's ReadOnlySqlTransaction (an InternalError)
    refused = InternalError("UPDATE tasks SET ...", {}, _DriverError("25006"))
    # Then AIOS raises it as an outage whose connection is not reused
    error = as_outage(refused)
    assert isinstance(error, ReadOnlyServer) and isinstance(error, OperationalError)
    assert error.connection_invalidated and error.orig is refused.orig
    # And any other database error is left as it was
    other = InternalError("UPDATE tasks SET ...", {}, _DriverError("XX000"))
    assert as_outage(other) is other


def test_an_agents_write_refused_as_read_only_is_tried_again_like_an_outage(monkeypatch):
    monkeypatch.setattr(runner.time, "sleep", lambda _s: None)
    calls = []

    def write() -> str:
        calls.append(1)
        if len(calls) < 2:
            raise as_outage(InternalError("UPDATE tasks SET ...", {}, _DriverError("25006")))
        return "written on the new primary"

    assert runner.with_db_retry(write, "testing") == "written on the new primary"
    assert len(calls) == 2


def test_a_url_with_one_server_gives_that_server_alone():
    params, password = libpq_params("postgresql+psycopg2://u@db:6543/d")
    assert libpq_hosts(params) == [("db", "6543")] and password is None
