"""The dashboard (/ui) through the real Flask app: sign-in, sessions, CSRF, roles, every page.

Runs against the real PostgreSQL and Redis with Flask's test client (the browser test,
test_ui_browser.py, drives the same pages in Chromium). Tasks are submitted through the API on a
queue no worker consumes, so they wait QUEUED for as long as a test needs them.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from sqlalchemy import select, update

from aios.db import session_scope
from aios.models import ApiKey, AuditEntry, Task, User
from tests.conftest import Credentials, authorize, make_user
from tests.support.browser import CSRF, Browser, signed_in

pytestmark = pytest.mark.integration


def submit(app: Any, who: Credentials, queue: str) -> str:
    """A task QUEUED on ``queue`` (no worker consumes it), submitted through the API as ``who``."""
    api = authorize(app.test_client(), who.key)
    answer = api.post("/api/v1/tasks", json={"type": "test.flaky", "parameters": {"fail_times": 0}, "queue": queue})
    assert answer.status_code == 202, answer.json
    return str(answer.json["id"])


def state_of(stack: Any, task_id: str) -> str:
    with session_scope(stack.settings.database) as session:
        return str(session.get(Task, task_id).state)


def audit_rows(stack: Any, action: str, target: str) -> list[AuditEntry]:
    with session_scope(stack.settings.database) as session:
        rows = session.scalars(
            select(AuditEntry).where(AuditEntry.action == action, AuditEntry.target == target).order_by(AuditEntry.id)
        ).all()
        session.expunge_all()
        return list(rows)


# --------------------------------------------------------------------------- sign in


def test_a_wrong_password_shows_one_error_sets_no_session_and_is_audited(api_app, stack):
    # Given an operator
    operator = make_user(stack, "operator")
    browser = Browser(api_app)

    # When someone signs in with a wrong password, and with a name that does not exist
    wrong = browser.sign_in(operator.user, "not-the-password")
    unknown = browser.sign_in(f"nobody-{uuid.uuid4().hex[:6]}", "not-the-password")

    # Then both answer 401 with the same message: nothing says whether the user exists
    for answer in (wrong, unknown):
        assert answer.status_code == 401
        assert "Wrong username or password." in answer.get_data(as_text=True)
    assert "not-the-password" not in wrong.get_data(as_text=True)
    # And there is no session: the dashboard still sends them to sign in
    assert browser.get("/ui").status_code == 303
    # And the failure is in the audit log
    (row,) = audit_rows(stack, "auth.login", operator.user)
    assert (row.outcome, row.principal, row.detail["via"]) == ("denied", operator.user, "ui")


def test_sign_in_counts_toward_the_same_lockout_as_the_token_endpoint(api_app, stack):
    # Given a viewer whose name took login_max_failures wrong passwords through the API
    viewer = make_user(stack, "viewer")
    api = api_app.test_client()
    api.environ_base["REMOTE_ADDR"] = "10.250.1.1"
    for _ in range(stack.settings.security.login_max_failures):
        assert api.post("/api/v1/auth/token", json={"username": viewer.user, "password": "nope"}).status_code == 401

    # When they sign in to the dashboard with the right password
    answer = Browser(api_app).sign_in(viewer.user, viewer.password)

    # Then the dashboard refuses too (429, locked) and sets no session
    assert answer.status_code == 429
    assert "locked" in answer.get_data(as_text=True)


def test_sign_in_needs_the_forms_csrf_token(api_app, stack):
    viewer = make_user(stack, "viewer")
    browser = Browser(api_app)
    browser.get("/ui/login")
    assert browser.post("/ui/login", {"username": viewer.user, "password": viewer.password}, csrf="").status_code == 403
    assert browser.get("/ui").status_code == 303


def test_after_sign_in_only_a_local_next_page_is_followed(api_app, stack):
    viewer = make_user(stack, "viewer")
    for target, expected in (
        ("/ui/agents", "/ui/agents"),
        ("//evil.example/ui", "/ui"),
        ("https://evil.example/ui", "/ui"),
        ("/api/v1/tasks", "/ui"),
    ):
        answer = Browser(api_app).sign_in(viewer.user, viewer.password, next=target)
        assert answer.status_code == 303
        assert answer.headers["Location"] == expected, target


def test_an_agent_account_cannot_sign_in(api_app, stack):
    agent = make_user(stack, "agent")
    answer = Browser(api_app).sign_in(agent.user, agent.password)
    assert answer.status_code == 403


def test_without_a_session_pages_redirect_to_sign_in_and_the_fragment_is_401(api_app):
    browser = Browser(api_app)
    page = browser.get("/ui/tasks?state=QUEUED")
    assert page.status_code == 303
    assert page.headers["Location"].startswith("/ui/login?next=")
    assert browser.get("/ui/overview/fragment").status_code == 401
    # and a POST without a session changes nothing: it is sent to sign in
    assert browser.post("/ui/tasks/whatever/cancel").status_code == 303


# --------------------------------------------------------------------------- sessions


def test_the_session_cookie_is_httponly_samesite_and_scoped_to_the_dashboard(api_app, stack):
    viewer = make_user(stack, "viewer")
    answer = Browser(api_app).sign_in(viewer.user, viewer.password)
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("aios_ui=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain HTTP here

    # Over HTTPS the same cookie is Secure
    secure = Browser(api_app)
    secure.client.get("/ui/login", base_url="https://localhost")
    over_tls = secure.client.post(
        "/ui/login",
        base_url="https://localhost",
        data={
            "username": viewer.user,
            "password": viewer.password,
            "csrf_token": CSRF.search(
                secure.client.get("/ui/login", base_url="https://localhost").get_data(as_text=True)
            ).group(1),
        },
    )
    assert over_tls.status_code == 303
    assert "Secure" in over_tls.headers["Set-Cookie"]


def test_a_disabled_users_session_stops_working_at_once(api_app, stack):
    # Given a signed-in operator
    operator = make_user(stack, "operator")
    browser = signed_in(api_app, operator)
    assert browser.get("/ui").status_code == 200

    # When an admin disables them
    with session_scope(stack.settings.database) as session:
        session.execute(update(User).where(User.name == operator.user).values(disabled=True))

    # Then the next page sends them to sign in, and the session is gone for good
    assert browser.get("/ui/tasks").status_code == 303
    with session_scope(stack.settings.database) as session:
        session.execute(update(User).where(User.name == operator.user).values(disabled=False))
    assert browser.get("/ui/tasks").status_code == 303


def test_a_role_change_applies_to_the_next_request(api_app, stack, queue):
    # Given an operator looking at their own queued task (with its cancel button)
    operator = make_user(stack, "operator")
    task_id = submit(api_app, operator, queue)
    browser = signed_in(api_app, operator)
    assert 'id="cancel"' in browser.get(f"/ui/tasks/{task_id}").get_data(as_text=True)

    # When they are demoted to viewer
    with session_scope(stack.settings.database) as session:
        session.execute(update(User).where(User.name == operator.user).values(role="viewer"))

    # Then the button is gone and pressing it anyway is refused
    page = browser.get(f"/ui/tasks/{task_id}")
    assert page.status_code == 200 and 'id="cancel"' not in page.get_data(as_text=True)
    assert browser.post(f"/ui/tasks/{task_id}/cancel").status_code == 403
    assert state_of(stack, task_id) == "QUEUED"


def test_a_signed_out_session_cookie_is_dead_even_if_kept(api_app, stack):
    # Given a signed-in viewer whose cookie someone copied
    viewer = make_user(stack, "viewer")
    browser = signed_in(api_app, viewer)
    copied = browser.client.get_cookie("aios_ui", path="/ui").value
    # When they sign out
    assert browser.post("/ui/logout").status_code == 303
    # Then the copied cookie no longer opens the dashboard
    thief = Browser(api_app)
    thief.client.set_cookie("aios_ui", copied, path="/ui")
    assert thief.get("/ui").status_code == 303


def test_a_changed_password_ends_older_sessions(api_app, stack):
    from aios.security.passwords import hash_password

    viewer = make_user(stack, "viewer")
    browser = signed_in(api_app, viewer)
    with session_scope(stack.settings.database) as session:
        session.execute(
            update(User)
            .where(User.name == viewer.user)
            .values(password_hash=hash_password(f"new-{uuid.uuid4().hex}", cost=12))
        )
    assert browser.get("/ui").status_code == 303


# --------------------------------------------------------------------------- CSRF and roles on actions


def test_a_post_with_a_missing_or_wrong_csrf_token_is_refused_and_changes_nothing(api_app, stack, queue):
    # Given an operator signed in, and their QUEUED task
    operator = make_user(stack, "operator")
    task_id = submit(api_app, operator, queue)
    browser = signed_in(api_app, operator)
    browser.get(f"/ui/tasks/{task_id}")

    # When cancel is posted without the token, and with another session's token
    other = signed_in(api_app, make_user(stack, "operator"))
    other.get("/ui")
    missing = browser.client.post(f"/ui/tasks/{task_id}/cancel", data={})
    wrong = browser.post(f"/ui/tasks/{task_id}/cancel", csrf=other.csrf)

    # Then both are 403 and the task is still QUEUED; both refusals are audited
    assert missing.status_code == 403 and wrong.status_code == 403
    assert "CSRF" in wrong.get_data(as_text=True)
    assert state_of(stack, task_id) == "QUEUED"
    assert [r.outcome for r in audit_rows(stack, "task.cancel", task_id)] == ["denied", "denied"]

    # And with the right token the same button cancels it
    done = browser.post(f"/ui/tasks/{task_id}/cancel", {"next": f"/ui/tasks/{task_id}"})
    assert done.status_code == 303 and done.headers["Location"] == f"/ui/tasks/{task_id}"
    assert state_of(stack, task_id) == "CANCELLED"
    page = browser.get(f"/ui/tasks/{task_id}").get_data(as_text=True)
    assert f"Task {task_id} cancelled." in page and "state-cancelled" in page
    rows = audit_rows(stack, "task.cancel", task_id)
    assert (rows[-1].outcome, rows[-1].principal, rows[-1].role) == ("success", operator.user, "operator")


def test_a_refused_action_answers_its_status_and_is_audited_as_a_failure(api_app, stack, queue):
    # Given an operator's task that is already cancelled
    operator = make_user(stack, "operator")
    task_id = submit(api_app, operator, queue)
    browser = signed_in(api_app, operator)
    assert browser.post(f"/ui/tasks/{task_id}/cancel").status_code == 303

    # When cancel is pressed again (a second tab, say)
    again = browser.post(f"/ui/tasks/{task_id}/cancel", {"next": f"/ui/tasks/{task_id}"})

    # Then the answer is the 409 of the API, as a page that leads back to the task, and the audit says so
    assert again.status_code == 409 and again.mimetype == "text/html"
    page = again.get_data(as_text=True)
    assert "already CANCELLED" in page and f'href="/ui/tasks/{task_id}"' in page
    assert [r.outcome for r in audit_rows(stack, "task.cancel", task_id)] == ["success", "failure"]


def test_an_operator_may_not_cancel_another_users_task(api_app, stack, queue):
    owner, other = make_user(stack, "operator"), make_user(stack, "operator")
    task_id = submit(api_app, owner, queue)
    browser = signed_in(api_app, other)
    assert 'id="cancel"' not in browser.get(f"/ui/tasks/{task_id}").get_data(as_text=True)
    assert browser.post(f"/ui/tasks/{task_id}/cancel").status_code == 403
    assert state_of(stack, task_id) == "QUEUED"


def test_a_viewer_sees_no_action_and_every_action_is_refused(api_app, stack, queue):
    # Given a viewer and an operator's queued task
    task_id = submit(api_app, make_user(stack, "operator"), queue)
    viewer = signed_in(api_app, make_user(stack, "viewer"))

    # Then the pages they may read show no buttons
    task_page = viewer.get(f"/ui/tasks/{task_id}").get_data(as_text=True)
    assert 'id="cancel"' not in task_page and 'id="retry"' not in task_page
    assert "Purge" not in viewer.get("/ui/queues").get_data(as_text=True)
    # And the admin pages are 403
    for path in ("/ui/backups", "/ui/keys", "/ui/audit"):
        assert viewer.get(path).status_code == 403, path
    # And every action, even with a valid CSRF token, is 403 and changes nothing
    for path, form in (
        (f"/ui/tasks/{task_id}/cancel", {}),
        (f"/ui/tasks/{task_id}/retry", {}),
        ("/ui/agents/nobody/status", {"status": "DISABLED"}),
        (f"/ui/queues/{queue}/purge", {}),
        ("/ui/backups", {}),
        ("/ui/keys/nothing/revoke", {}),
        ("/ui/schedules/nothing/enabled", {"enabled": "false"}),
    ):
        assert viewer.post(path, form).status_code == 403, path
    assert state_of(stack, task_id) == "QUEUED"


def test_an_operator_may_not_purge_a_queue(api_app, stack, queue):
    task_id = submit(api_app, make_user(stack, "operator"), queue)
    operator = signed_in(api_app, make_user(stack, "operator"))
    assert "Purge" not in operator.get("/ui/queues").get_data(as_text=True)
    assert operator.post(f"/ui/queues/{queue}/purge").status_code == 403
    assert state_of(stack, task_id) == "QUEUED"


def test_an_admin_purges_a_queue_from_the_dashboard(api_app, stack, queue, admin):
    task_id = submit(api_app, make_user(stack, "operator"), queue)
    browser = signed_in(api_app, admin)
    page = browser.get("/ui/queues").get_data(as_text=True)
    assert queue in page and "Purge all" in page
    assert browser.post(f"/ui/queues/{queue}/purge", {"priority": "12"}).status_code == 422
    assert state_of(stack, task_id) == "QUEUED"
    answer = browser.post(f"/ui/queues/{queue}/purge", {"next": "/ui/queues"})
    assert answer.status_code == 303
    assert state_of(stack, task_id) == "CANCELLED"
    assert "1 task(s) cancelled" in browser.get("/ui/queues").get_data(as_text=True)
    refused, done = audit_rows(stack, "queue.purge", queue)
    assert refused.outcome == "failure"
    assert done.outcome == "success" and done.detail["cancelled"] == 1


def test_retry_from_the_dashboard_makes_a_new_task(api_app, stack, queue):
    operator = make_user(stack, "operator")
    task_id = submit(api_app, operator, queue)
    browser = signed_in(api_app, operator)
    browser.get(f"/ui/tasks/{task_id}")
    assert browser.post(f"/ui/tasks/{task_id}/cancel").status_code == 303
    page = browser.get(f"/ui/tasks/{task_id}").get_data(as_text=True)
    assert 'id="retry"' in page and 'id="cancel"' not in page
    answer = browser.post(f"/ui/tasks/{task_id}/retry")
    assert answer.status_code == 303
    new_id = answer.headers["Location"].rsplit("/", 1)[1]
    assert new_id != task_id
    with session_scope(stack.settings.database) as session:
        new = session.get(Task, new_id)
        assert (new.retry_of, new.owner, new.state) == (task_id, operator.user, "QUEUED")


def test_drain_and_enable_an_agent_and_pause_a_schedule_from_the_dashboard(api_app, stack):
    from aios.models import Agent, Schedule

    # Given an operator, an agent registered through the API and the operator's own schedule
    operator = make_user(stack, "operator")
    api = authorize(api_app.test_client(), operator.key)
    agent = f"ui-agent-{uuid.uuid4().hex[:6]}"
    assert api.post("/api/v1/agents", json={"name": agent, "capabilities": ["test.flaky"]}).status_code == 201
    made = api.post(
        "/api/v1/schedules",
        json={
            "name": f"ui-{uuid.uuid4().hex[:6]}",
            "interval_s": 3600,
            "task": {"type": "test.flaky", "parameters": {"fail_times": 0}},
        },
    )
    assert made.status_code == 201, made.json
    schedule_id = made.json["id"]
    browser = signed_in(api_app, operator)
    assert "Drain" in browser.get("/ui/agents").get_data(as_text=True)

    # When they drain the agent, then enable it again, and pause and resume their schedule
    def admin_status() -> str:
        with session_scope(stack.settings.database) as session:
            return str(session.get(Agent, agent).admin_status)

    def enabled() -> bool:
        with session_scope(stack.settings.database) as session:
            return bool(session.get(Schedule, schedule_id).enabled)

    assert browser.post(f"/ui/agents/{agent}/status", {"status": "DRAINING"}).status_code == 303
    assert admin_status() == "DRAINING"
    assert browser.post(f"/ui/agents/{agent}/status", {"status": "ONLINE"}).status_code == 303
    assert admin_status() == "ACTIVE"
    assert browser.post(f"/ui/agents/{agent}/status", {"status": "GONE"}).status_code == 422
    assert browser.post(f"/ui/schedules/{schedule_id}/enabled", {"enabled": "false"}).status_code == 303
    assert enabled() is False
    # Then another operator may not resume it, and its owner may
    other = signed_in(api_app, make_user(stack, "operator"))
    assert other.post(f"/ui/schedules/{schedule_id}/enabled", {"enabled": "true"}).status_code == 403
    assert enabled() is False
    assert browser.post(f"/ui/schedules/{schedule_id}/enabled", {"enabled": "true"}).status_code == 303
    assert enabled() is True
    assert [r.outcome for r in audit_rows(stack, "agent.update", agent)] == ["success", "success", "failure"]
    # And each row keeps the status asked for (detail.status is the HTTP status, as everywhere)
    assert [r.detail.get("agent_status") for r in audit_rows(stack, "agent.update", agent)] == [
        "DRAINING",
        "ONLINE",
        "GONE",
    ]


def test_an_admin_revokes_a_key_and_the_api_refuses_it_at_once(api_app, stack, admin):
    viewer = make_user(stack, "viewer")
    api = authorize(api_app.test_client(), viewer.key)
    assert api.get("/api/v1/tasks?limit=1").status_code == 200
    browser = signed_in(api_app, admin)
    with session_scope(stack.settings.database) as session:
        key_id = session.scalars(
            select(ApiKey.id).join(User, ApiKey.owner_id == User.id).where(User.name == viewer.user)
        ).one()
    assert f"/ui/keys/{key_id}/revoke" in browser.get("/ui/keys").get_data(as_text=True)
    assert browser.post(f"/ui/keys/{key_id}/revoke", {"next": "/ui/keys"}).status_code == 303
    assert api.get("/api/v1/tasks?limit=1").status_code == 401
    assert browser.post(f"/ui/keys/{key_id}/revoke").status_code == 409


def test_an_admin_takes_a_backup_from_the_dashboard(api_app, stack, admin):
    browser = signed_in(api_app, admin)
    answer = browser.post("/ui/backups", {"next": "/ui/backups"})
    assert answer.status_code == 303, answer.get_data(as_text=True)[:800]
    page = browser.get("/ui/backups").get_data(as_text=True)
    assert "Backup written: aios-postgresql-" in page
    from aios.ops.backup import list_backups

    newest = list_backups(stack.settings, limit=1)[0]
    assert newest["status"] == "ok" and newest["file"] in page


# --------------------------------------------------------------------------- pages


def test_every_page_renders_for_an_admin_under_a_strict_csp(api_app, stack, admin, queue):
    task_id = submit(api_app, admin, queue)
    browser = signed_in(api_app, admin)
    for path in (
        "/ui",
        "/ui/overview/fragment",
        "/ui/tasks",
        "/ui/tasks?state=QUEUED&q=flaky&sort=priority",
        f"/ui/tasks/{task_id}",
        "/ui/agents",
        "/ui/queues",
        "/ui/schedules",
        "/ui/backups",
        "/ui/keys",
        "/ui/audit",
        "/ui/audit?action=auth.login",
    ):
        answer = browser.get(path)
        assert answer.status_code == 200, (path, answer.get_data(as_text=True)[:500])
        assert answer.headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'")
        html = answer.get_data(as_text=True)
        assert "<script>" not in html and " on" + "click=" not in html
    # (the overview and GET /api/v1/status share one function)
    status = authorize(api_app.test_client(), admin.key).get("/api/v1/status")
    assert status.status_code == 200 and status.json["tasks_last_hour"].get("QUEUED", 0) >= 1
    static = browser.get("/ui/static/ui.js")
    assert static.status_code == 200 and b"data-refresh" in static.data


def test_the_task_list_searches_filters_and_pages(api_app, stack, queue):
    # Given 51 tasks whose parameters carry a marker, one of them cancelled
    operator = make_user(stack, "operator")
    marker = f"m{uuid.uuid4().hex[:10]}"
    api = authorize(api_app.test_client(), operator.key)
    batch = api.post(
        "/api/v1/tasks/batch",
        json={
            "tasks": [
                {"type": "test.touch", "parameters": {"path": f"/nonexistent/{marker}/{i}"}, "queue": queue}
                for i in range(51)
            ]
        },
    )
    assert batch.status_code == 202, batch.json
    ids = batch.json["ids"]
    assert api.delete(f"/api/v1/tasks/{ids[0]}").status_code == 200
    browser = signed_in(api_app, operator)
    listed = re.compile(r'href="/ui/tasks/([0-9a-f-]{36})"')

    # When the list is searched for the marker: 50 on the first page, the 51st after "Next page"
    first = browser.get(f"/ui/tasks?q={marker}").get_data(as_text=True)
    page1 = listed.findall(first)
    assert len(page1) == 50 and set(page1) <= set(ids)
    next_url = re.search(r'id="next-page" href="([^"]+)"', first).group(1).replace("&amp;", "&")
    assert f"q={marker}" in next_url
    second = browser.get(next_url).get_data(as_text=True)
    page2 = listed.findall(second)
    assert len(page2) == 1 and set(page1) | set(page2) == set(ids)
    assert 'id="next-page"' not in second

    # And a state filter narrows it to the cancelled one
    cancelled = listed.findall(browser.get(f"/ui/tasks?q={marker}&state=CANCELLED").get_data(as_text=True))
    assert cancelled == [ids[0]]
    # And a type filter that matches none shows none
    assert listed.findall(browser.get(f"/ui/tasks?q={marker}&type=test.flaky").get_data(as_text=True)) == []
    # And nonsense is said, not a 500
    bad = browser.get("/ui/tasks?state=NOPE")
    assert bad.status_code == 200 and "unknown state" in bad.get_data(as_text=True)
    assert browser.get("/ui/tasks?cursor=garbage").status_code == 422


def test_a_missing_task_is_a_404_page(api_app, stack):
    browser = signed_in(api_app, make_user(stack, "viewer"))
    answer = browser.get(f"/ui/tasks/{uuid.uuid4()}")
    assert answer.status_code == 404
    assert answer.mimetype == "text/html" and "no task with id" in answer.get_data(as_text=True)
