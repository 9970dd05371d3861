"""Guarantees of the API that only a failure shows: the app refuses to start with a route that
declares no access policy, and a submit whose audit row cannot be written commits nothing."""

from __future__ import annotations

import types
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Blueprint

from tests.conftest import authorize, make_user
from tests.support.schemas import private_schema

pytestmark = pytest.mark.integration


def extra_blueprint(*, guard_it: bool) -> Blueprint:
    """A blueprint with one declared route and one that, unless ``guard_it``, declares nothing."""
    from aios.security.roles import OPERATOR
    from webapi.security import policy, public

    bp = Blueprint("extra", __name__)

    @bp.get("/api/v1/extra/declared")
    @public()
    def declared() -> Any:
        return {"ok": True}

    def unguarded() -> Any:
        return {"ok": True}

    bp.add_url_rule("/api/v1/extra/unguarded", view_func=policy(OPERATOR)(unguarded) if guard_it else unguarded)
    return bp


def test_the_app_refuses_to_start_when_a_route_declares_no_access_policy(stack, celery_client, monkeypatch):
    import webapi.app
    from webapi.app import create_app

    # Given the app's blueprints plus one whose route has neither @policy nor @public
    monkeypatch.setattr(webapi.app, "system", types.SimpleNamespace(bp=extra_blueprint(guard_it=False)))

    # Then building the app fails, naming that route (and only it)
    with pytest.raises(RuntimeError) as refused:
        create_app(stack.settings, celery_client)
    assert str(refused.value) == "routes without an access policy: extra.unguarded"


def test_the_same_app_starts_once_that_route_declares_its_policy(stack, celery_client, monkeypatch):
    import webapi.app
    from webapi.app import create_app

    monkeypatch.setattr(webapi.app, "system", types.SimpleNamespace(bp=extra_blueprint(guard_it=True)))
    app = create_app(stack.settings, celery_client)
    assert {"extra.declared", "extra.unguarded"} <= set(app.view_functions)


REFUSE_SUBMIT_AUDIT = """
CREATE FUNCTION refuse_submit_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.action = 'task.submit' AND NEW.outcome = 'success' THEN
        RAISE EXCEPTION 'audit row refused (test trigger)';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_submit_audit BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION refuse_submit_audit();
"""


def test_a_submit_whose_audit_row_cannot_be_written_answers_an_error_and_commits_and_publishes_nothing(
    stack, start_worker, queue
):
    import redis

    from aios.broker.celery_app import create_celery_app
    from aios.db import session_scope
    from aios.models import AuditEntry, Task
    from webapi.app import create_app

    with private_schema("audit") as url:
        # Given a ledger of its own where the database refuses the audit row of a successful submit
        own = stack.override(database={"url": url})
        engine = sa.create_engine(url)
        try:
            with engine.begin() as connection:
                connection.execute(sa.text(REFUSE_SUBMIT_AUDIT))
        finally:
            engine.dispose()
        # And a real agent on it, so a committed task would be QUEUED and published at once
        own_env = {key: value for key, value in own.env.items() if stack.env.get(key) != value}
        start_worker([queue], concurrency=1, env=own_env)
        client = authorize(
            create_app(own.settings, create_celery_app(own.settings)).test_client(), make_user(own, "admin").key
        )

        # When a task is submitted
        response = client.post("/api/v1/tasks", json={"type": "echo", "parameters": {"n": 1}, "queue": queue})

        # Then the API answers a server error in the JSON error shape
        assert response.status_code >= 500, (response.status_code, response.json)
        assert set(response.json) >= {"error", "message"} and response.json["error"], response.json
        assert "audit row refused" not in response.json["message"]  # the database's words stay in the log

        # And no task row was committed, and nothing reached the broker
        with session_scope(own.settings.database) as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(Task)) == 0
            rows = session.execute(sa.select(AuditEntry.action, AuditEntry.outcome)).all()
        broker = redis.Redis.from_url(own.settings.broker.url)
        try:
            base = f"{own.settings.broker.key_prefix}{own.settings.broker.namespace}.{queue}"
            assert [k for k in broker.scan_iter(match=f"{base}*", count=1000)] == []
        finally:
            broker.close()
        # And the refused submit is still audited, as a failure
        assert [tuple(row) for row in rows] == [("task.submit", "failure")], rows
