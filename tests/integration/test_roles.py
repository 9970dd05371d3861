"""Who may call what, on PostgreSQL + Redis: one table of every API route and the roles it allows.

Each role (admin, operator, viewer, agent) is one user with one API key of that role. For every
route × role the call gets what it needs (a task of that same user in a state the call accepts, a key
of that user, a throwaway target user), so an allowed call is a 2xx and a refused one is a 403 for
its role, never a 404 or 409 for a missing or unfit object; a refused call changes nothing.

The table is also checked against the app: every route under /api/v1 has a row (a new route without
one fails here), and each view's declared ``@policy`` roles are exactly the table's.
Object level: operators change only their own tasks; the owner of a task is whoever submitted it.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import delete

from aios.db import session_scope
from aios.security.roles import ADMIN, AGENT, OPERATOR, ROLES, VIEWER
from aios.timeutil import utcnow
from tests.conftest import Credentials, authorize, make_user
from tests.support.rows import (
    count_keys,
    count_tasks,
    key_snapshot,
    make_key,
    make_plain_user,
    make_task,
    task_snapshot,
    user_id,
    user_snapshot,
)

pytestmark = pytest.mark.integration

ALL = frozenset(ROLES)
#: The only routes under /api/v1 that answer without credentials (they are how credentials are got).
PUBLIC_ROUTES = frozenset({"/api/v1/auth/token", "/api/v1/auth/refresh", "/api/v1/openapi.json"})


@dataclass(frozen=True)
class Person:
    role: str
    name: str
    password: str
    key: str
    id: int


@dataclass
class World:
    """The app, one person per role, a queue no worker consumes, and this module's client address."""

    stack: Any
    app: Any
    people: dict[str, Person]
    queue: str
    ip: str

    def client(self, person: Person | None = None) -> Any:
        test_client = self.app.test_client()
        test_client.environ_base["REMOTE_ADDR"] = self.ip
        return authorize(test_client, person.key) if person else test_client

    def token(self, person: Person) -> str:
        answer = self.client().post("/api/v1/auth/token", json={"username": person.name, "password": person.password})
        assert answer.status_code == 200, answer.get_json()
        return str(answer.get_json()["access_token"])


def person(stack: Any, credentials: Credentials, role: str) -> Person:
    return Person(
        role=role,
        name=credentials.user,
        password=credentials.password,
        key=credentials.key,
        id=user_id(stack, credentials.user),
    )


@pytest.fixture(scope="module")
def world(stack: Any, api_app: Any) -> World:
    people = {role: person(stack, make_user(stack, role), role) for role in ROLES}
    # A client address of its own: login counters per address are not shared with other modules.
    ip = f"10.{random.randrange(1, 255)}.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    return World(stack=stack, app=api_app, people=people, queue=f"q{uuid.uuid4().hex[:12]}", ip=ip)


@pytest.fixture(scope="module")
def other_operator(world: World) -> Person:
    return person(world.stack, make_user(world.stack, OPERATOR), OPERATOR)


# --------------------------------------------------------------------------- the table


@dataclass
class Call:
    """One concrete request for a route: its path and body, and what a refused call must not change."""

    path: str
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: False: send no API key (logout needs a token session, sent in ``headers``).
    with_key: bool = True
    unchanged: Callable[[], Any] | None = None
    #: Run after the call, whatever happened (e.g. forget an agent: orchestrator.max_agents is global).
    cleanup: Callable[[], None] | None = None


Prepare = Callable[[World, Person], Call]


@dataclass(frozen=True)
class Route:
    method: str
    rule: str
    roles: frozenset[str]
    prepare: Prepare = field(compare=False)
    #: What an allowed role gets, when not a 2xx: worker control on a worker that does not exist is a
    #: 404 — it passed the role check, which is what this table tests (test_inspect.py runs them live).
    allowed_status: frozenset[int] | None = field(default=None, compare=False)
    #: An endless event stream: an allowed call is checked by its status, and closed unread.
    endless: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        return f"{self.method} {self.rule}"


def _logout(w: World, p: Person) -> Call:
    return Call("/api/v1/auth/logout", headers={"Authorization": f"Bearer {w.token(p)}"}, with_key=False)


def _submit(w: World, p: Person) -> Call:
    return Call(
        "/api/v1/tasks",
        json={"type": "echo", "parameters": {"by": p.name}, "queue": w.queue},
        unchanged=lambda: count_tasks(w.stack, p.name),
    )


def _batch(w: World, p: Person) -> Call:
    return Call(
        "/api/v1/tasks/batch",
        json={"tasks": [{"type": "echo", "queue": w.queue}] * 2},
        unchanged=lambda: count_tasks(w.stack, p.name),
    )


def _read_task(w: World, p: Person) -> Call:
    task_id = make_task(w.stack, owner=p.name, queue=w.queue, state="SUCCEEDED")
    return Call(f"/api/v1/tasks/{task_id}")


def _cancel(w: World, p: Person) -> Call:
    task_id = make_task(w.stack, owner=p.name, queue=w.queue, state="QUEUED")
    return Call(f"/api/v1/tasks/{task_id}", unchanged=lambda: task_snapshot(w.stack, task_id))


def _retry(w: World, p: Person) -> Call:
    task_id = make_task(w.stack, owner=p.name, queue=w.queue, state="FAILED")
    return Call(f"/api/v1/tasks/{task_id}/retry", unchanged=lambda: task_snapshot(w.stack, task_id))


def _create_key(w: World, p: Person) -> Call:
    role = VIEWER if p.role == AGENT else p.role  # a role the caller could grant, were it allowed at all
    return Call(
        "/api/v1/keys", json={"name": "from-the-table", "role": role}, unchanged=lambda: count_keys(w.stack, p.id)
    )


def _key_route(suffix: str, *, revoked: bool = False, body: Any = None) -> Prepare:
    def prepare(w: World, p: Person) -> Call:
        key_id = make_key(w.stack, owner_id=p.id, role=p.role, revoked=revoked)
        return Call(f"/api/v1/keys/{key_id}{suffix}", json=body, unchanged=lambda: key_snapshot(w.stack, key_id))

    return prepare


def _create_user(w: World, p: Person) -> Call:
    name = f"new-{uuid.uuid4().hex[:8]}"
    return Call(
        "/api/v1/users",
        json={"name": name, "password": f"pw-{uuid.uuid4().hex}", "role": VIEWER},
        unchanged=lambda: user_snapshot(w.stack, name),
    )


def _update_user(w: World, p: Person) -> Call:
    name = make_plain_user(w.stack, VIEWER)  # never one of the shared per-role users
    return Call(f"/api/v1/users/{name}", json={"role": OPERATOR}, unchanged=lambda: user_snapshot(w.stack, name))


def _get(path: str) -> Prepare:
    return lambda w, p: Call(path)


def _agent_snapshot(stack: Any, name: str) -> dict[str, Any] | None:
    from aios.models import Agent

    with session_scope(stack.settings.database) as session:
        agent = session.get(Agent, name)
        return (
            None
            if agent is None
            else {
                "weight": agent.weight,
                "status": agent.status,
                "admin_status": agent.admin_status,
                "updated_at": agent.updated_at,
            }
        )


def _forget_agent(stack: Any, name: str) -> Callable[[], None]:
    def forget() -> None:
        from aios.models import Agent

        with session_scope(stack.settings.database) as session:
            session.execute(delete(Agent).where(Agent.name == name))

    return forget


def _register_agent(w: World, p: Person) -> Call:
    name = f"{p.name}@roles-{uuid.uuid4().hex[:8]}"  # an agent key may register only agents named after its user
    return Call(
        "/api/v1/agents",
        json={"name": name, "capabilities": ["echo"]},
        unchanged=lambda: _agent_snapshot(w.stack, name),
        cleanup=_forget_agent(w.stack, name),
    )


def _agent_route(body: Any = None) -> Prepare:
    """A call on a registered agent that has sent no heartbeat (so it is OFFLINE, and may be deleted)."""

    def prepare(w: World, p: Person) -> Call:
        from aios.models import Agent

        name = f"roles-{uuid.uuid4().hex[:8]}@test"
        with session_scope(w.stack.settings.database) as session:
            session.add(
                Agent(
                    name=name,
                    capabilities=["echo"],
                    labels={},
                    status="OFFLINE",
                    admin_status="ACTIVE",
                    registered_at=utcnow(),
                    updated_at=utcnow(),
                )
            )
        return Call(
            f"/api/v1/agents/{name}",
            json=body,
            unchanged=lambda: _agent_snapshot(w.stack, name),
            cleanup=_forget_agent(w.stack, name),
        )

    return prepare


def _schedule_snapshot(stack: Any, schedule_id: str) -> dict[str, Any] | None:
    from aios.models import Schedule

    with session_scope(stack.settings.database) as session:
        row = session.get(Schedule, schedule_id)
        return (
            None
            if row is None
            else {"interval_s": row.interval_s, "enabled": row.enabled, "updated_at": row.updated_at}
        )


def _create_schedule(w: World, p: Person) -> Call:
    from aios.models import Schedule

    name = f"roles-{uuid.uuid4().hex[:8]}"

    def count() -> int:
        with session_scope(w.stack.settings.database) as session:
            return len(session.query(Schedule).filter(Schedule.name == name).all())

    return Call(
        "/api/v1/schedules",
        json={"name": name, "interval_s": 3600, "enabled": False, "task": {"type": "echo", "queue": w.queue}},
        unchanged=count,
    )


def _schedule_route(body: Any = None) -> Prepare:
    """A call on a disabled schedule owned by the caller (so it never fires)."""

    def prepare(w: World, p: Person) -> Call:
        from aios.models import Schedule

        schedule_id = str(uuid.uuid4())
        with session_scope(w.stack.settings.database) as session:
            session.add(
                Schedule(
                    id=schedule_id,
                    name=f"roles-{schedule_id[:8]}",
                    interval_s=3600,
                    enabled=False,
                    task={"type": "echo", "parameters": {}, "queue": w.queue},
                    owner=p.name,
                    created_at=utcnow(),
                    updated_at=utcnow(),
                )
            )
        return Call(
            f"/api/v1/schedules/{schedule_id}", json=body, unchanged=lambda: _schedule_snapshot(w.stack, schedule_id)
        )

    return prepare


def _count_backups(stack: Any) -> int:
    from aios.models import Backup

    with session_scope(stack.settings.database) as session:
        return session.query(Backup).count()


def _create_backup(w: World, p: Person) -> Call:
    return Call("/api/v1/backups", unchanged=lambda: _count_backups(w.stack))


NO_WORKER = "nobody@no-such-host"
ABSENT = frozenset({404})


def _worker_control(suffix: str, body: Any = None) -> Prepare:
    return lambda w, p: Call(f"/api/v1/workers/{NO_WORKER}{suffix}", json=body)


def _queue_route(suffix: str = "") -> Prepare:
    """A queue of its own, known to AIOS through one QUEUED task (nothing in the broker)."""

    def prepare(w: World, p: Person) -> Call:
        queue = f"roles-{uuid.uuid4().hex[:8]}"
        task_id = make_task(w.stack, owner=p.name, queue=queue, state="QUEUED")
        return Call(f"/api/v1/queues/{queue}{suffix}", unchanged=lambda: task_snapshot(w.stack, task_id))

    return prepare


def _sync_now(w: World, p: Person) -> Call:
    """A sync run acts on the whole schema; what a refused one must not leave is a sync_runs row."""

    def count_runs() -> int:
        from aios.models import SyncRun

        with session_scope(w.stack.settings.database) as session:
            return session.query(SyncRun).count()

    return Call("/api/v1/sync/run", unchanged=count_runs)


def _bulk(w: World, p: Person) -> Call:
    task_id = make_task(w.stack, owner=p.name, queue=w.queue, state="QUEUED")
    return Call(
        "/api/v1/tasks/bulk",
        json={"action": "cancel", "filter": {"ids": [task_id]}},
        unchanged=lambda: task_snapshot(w.stack, task_id),
    )


def _task_events(w: World, p: Person) -> Call:
    """The stream of a finished task: it replays the timeline and ends."""
    task_id = make_task(w.stack, owner=p.name, queue=w.queue, state="SUCCEEDED")
    return Call(f"/api/v1/tasks/{task_id}/events")


#: Every API route and the roles allowed to call it (admin may call everything).
TABLE: tuple[Route, ...] = (
    Route("POST", "/api/v1/auth/logout", ALL, _logout),
    Route("POST", "/api/v1/tasks", frozenset({ADMIN, OPERATOR}), _submit),
    Route("POST", "/api/v1/tasks/batch", frozenset({ADMIN, OPERATOR}), _batch),
    Route("POST", "/api/v1/tasks/bulk", frozenset({ADMIN, OPERATOR}), _bulk),
    Route(
        "POST",
        "/api/v1/commands",
        frozenset({ADMIN, OPERATOR}),
        lambda w, p: Call(
            "/api/v1/commands", json={"argv": ["echo", "roles"]}, unchanged=lambda: count_tasks(w.stack, p.name)
        ),
    ),
    Route("GET", "/api/v1/tasks", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/tasks?limit=1")),
    Route("GET", "/api/v1/tasks/<task_id>", frozenset({ADMIN, OPERATOR, VIEWER}), _read_task),
    Route("GET", "/api/v1/tasks/<task_id>/events", frozenset({ADMIN, OPERATOR, VIEWER}), _task_events),
    Route("GET", "/api/v1/events", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/events"), endless=True),
    Route("DELETE", "/api/v1/tasks/<task_id>", frozenset({ADMIN, OPERATOR}), _cancel),
    Route("POST", "/api/v1/tasks/<task_id>/retry", frozenset({ADMIN, OPERATOR}), _retry),
    Route("POST", "/api/v1/keys", frozenset({ADMIN, OPERATOR, VIEWER}), _create_key),
    Route("GET", "/api/v1/keys", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/keys")),
    Route("POST", "/api/v1/keys/<key_id>/revoke", frozenset({ADMIN, OPERATOR, VIEWER}), _key_route("/revoke")),
    Route("POST", "/api/v1/keys/<key_id>/activate", frozenset({ADMIN}), _key_route("/activate", revoked=True)),
    Route(
        "POST",
        "/api/v1/keys/<key_id>/rotate",
        frozenset({ADMIN, OPERATOR, VIEWER}),
        _key_route("/rotate", body={"grace_s": 0}),
    ),
    Route("DELETE", "/api/v1/keys/<key_id>", frozenset({ADMIN, OPERATOR, VIEWER}), _key_route("")),
    Route("GET", "/api/v1/users", frozenset({ADMIN}), _get("/api/v1/users")),
    Route("GET", "/api/v1/users/me", ALL, _get("/api/v1/users/me")),
    Route("POST", "/api/v1/users", frozenset({ADMIN}), _create_user),
    Route("PATCH", "/api/v1/users/<name>", frozenset({ADMIN}), _update_user),
    Route("GET", "/api/v1/audit", frozenset({ADMIN}), _get("/api/v1/audit?limit=1")),
    Route("POST", "/api/v1/agents", frozenset({ADMIN, OPERATOR, AGENT}), _register_agent),
    Route("GET", "/api/v1/agents", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/agents")),
    Route("GET", "/api/v1/agents/<path:name>", frozenset({ADMIN, OPERATOR, VIEWER}), _agent_route()),
    Route("PATCH", "/api/v1/agents/<path:name>", frozenset({ADMIN, OPERATOR}), _agent_route({"weight": 2})),
    Route("PUT", "/api/v1/agents/<path:name>", frozenset({ADMIN, OPERATOR}), _agent_route({"status": "OFFLINE"})),
    Route("DELETE", "/api/v1/agents/<path:name>", frozenset({ADMIN}), _agent_route()),
    Route("POST", "/api/v1/schedules", frozenset({ADMIN, OPERATOR}), _create_schedule),
    Route("GET", "/api/v1/schedules", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/schedules")),
    Route("GET", "/api/v1/schedules/<schedule_id>", frozenset({ADMIN, OPERATOR, VIEWER}), _schedule_route()),
    Route(
        "PATCH", "/api/v1/schedules/<schedule_id>", frozenset({ADMIN, OPERATOR}), _schedule_route({"interval_s": 7200})
    ),
    Route("DELETE", "/api/v1/schedules/<schedule_id>", frozenset({ADMIN, OPERATOR}), _schedule_route()),
    Route("GET", "/api/v1/status", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/status")),
    Route("GET", "/api/v1/sync/runs", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/sync/runs?limit=1")),
    Route("POST", "/api/v1/sync/run", frozenset({ADMIN}), _sync_now),
    Route("POST", "/api/v1/backups", frozenset({ADMIN}), _create_backup),
    Route("GET", "/api/v1/backups", frozenset({ADMIN}), _get("/api/v1/backups")),
    Route("GET", "/api/v1/tasks/types", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/tasks/types")),
    Route("GET", "/api/v1/workers", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/workers")),
    Route(
        "GET",
        "/api/v1/workers/<name>",
        frozenset({ADMIN, OPERATOR, VIEWER}),
        _worker_control(""),
        allowed_status=ABSENT,
    ),
    Route(
        "POST",
        "/api/v1/workers/<name>/pool/grow",
        frozenset({ADMIN, OPERATOR}),
        _worker_control("/pool/grow", {"n": 1}),
        allowed_status=ABSENT,
    ),
    Route(
        "POST",
        "/api/v1/workers/<name>/pool/shrink",
        frozenset({ADMIN, OPERATOR}),
        _worker_control("/pool/shrink", {"n": 1}),
        allowed_status=ABSENT,
    ),
    Route(
        "POST",
        "/api/v1/workers/<name>/pool/autoscale",
        frozenset({ADMIN, OPERATOR}),
        _worker_control("/pool/autoscale", {"max": 3, "min": 1}),
        allowed_status=ABSENT,
    ),
    Route(
        "POST",
        "/api/v1/workers/<name>/pool/restart",
        frozenset({ADMIN, OPERATOR}),
        _worker_control("/pool/restart"),
        allowed_status=ABSENT,
    ),
    Route(
        "POST",
        "/api/v1/workers/<name>/queues/add-consumer",
        frozenset({ADMIN, OPERATOR}),
        _worker_control("/queues/add-consumer", {"queue": "roles"}),
        allowed_status=ABSENT,
    ),
    Route(
        "POST",
        "/api/v1/workers/<name>/queues/cancel-consumer",
        frozenset({ADMIN, OPERATOR}),
        _worker_control("/queues/cancel-consumer", {"queue": "roles"}),
        allowed_status=ABSENT,
    ),
    Route(
        "POST",
        "/api/v1/workers/<name>/rate-limit",
        frozenset({ADMIN, OPERATOR}),
        _worker_control("/rate-limit", {"rate_limit": "10/m"}),
        allowed_status=ABSENT,
    ),
    Route(
        "POST",
        "/api/v1/workers/<name>/time-limit",
        frozenset({ADMIN, OPERATOR}),
        _worker_control("/time-limit", {"soft_s": 10, "hard_s": 20}),
        allowed_status=ABSENT,
    ),
    Route(
        "POST",
        "/api/v1/workers/<name>/shutdown",
        frozenset({ADMIN, OPERATOR}),
        _worker_control("/shutdown"),
        allowed_status=ABSENT,
    ),
    Route("GET", "/api/v1/queues", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/queues")),
    Route("GET", "/api/v1/queues/<name>", frozenset({ADMIN, OPERATOR, VIEWER}), _queue_route()),
    Route("POST", "/api/v1/queues/<name>/purge", frozenset({ADMIN}), _queue_route("/purge")),
    Route("GET", "/api/v1/system/resources", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/system/resources")),
    Route("GET", "/api/v1/system/limits", frozenset({ADMIN, OPERATOR, VIEWER}), _get("/api/v1/system/limits")),
    Route(
        "PUT",
        "/api/v1/system/limits",
        frozenset({ADMIN}),
        lambda w, p: Call("/api/v1/system/limits", json={"command_output_kb": None}),
    ),
)


def served_routes(app: Any) -> dict[tuple[str, str], str]:
    """(method, rule) → endpoint for every route under /api/v1 that needs credentials."""
    routes = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1") and rule.rule not in PUBLIC_ROUTES:
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                routes[(method, rule.rule)] = rule.endpoint
    return routes


def test_every_api_route_has_exactly_one_row_in_the_role_table(api_app):
    # Given the routes the app serves under /api/v1 (login and refresh aside) and the table's rows
    served = set(served_routes(api_app))
    tabled = [(route.method, route.rule) for route in TABLE]

    # Then each served route has a row, each row is a served route, and no route has two rows
    assert sorted(served - set(tabled)) == [], "routes without a row in TABLE: add them with their roles"
    assert sorted(set(tabled) - served) == [], "rows in TABLE for routes the app no longer serves"
    assert len(tabled) == len(set(tabled))


def test_only_login_and_refresh_answer_without_credentials_under_api_v1(api_app):
    # Given every route under /api/
    public = {
        rule.rule
        for rule in api_app.url_map.iter_rules()
        if rule.rule.startswith("/api/") and getattr(api_app.view_functions[rule.endpoint], "aios_public", False)
    }

    # Then only the two routes that hand out credentials are public
    assert public == PUBLIC_ROUTES


def test_the_roles_declared_on_each_view_are_exactly_the_roles_in_the_table(api_app):
    # Given the endpoint behind each route
    endpoints = served_routes(api_app)

    # When the roles declared with @policy on each view are read
    declared = {
        (route.method, route.rule): api_app.view_functions[endpoints[(route.method, route.rule)]].aios_roles
        for route in TABLE
    }

    # Then they equal the table's (drift in either the code or the table fails here)
    drift = {
        str(route): (sorted(declared[(route.method, route.rule)]), sorted(route.roles))
        for route in TABLE
        if declared[(route.method, route.rule)] != route.roles
    }
    assert drift == {}, "route: (declared by @policy, in TABLE)"


@pytest.mark.parametrize(
    ("route", "role"),
    [(route, role) for route in TABLE for role in ROLES],
    ids=[f"{route} as {role}" for route in TABLE for role in ROLES],
)
def test_each_role_gets_2xx_on_the_routes_it_may_call_and_403_on_the_others(world, route, role):
    # Given a user with this role, and what the call needs (owned by that same user)
    caller = world.people[role]
    call = route.prepare(world, caller)
    before = call.unchanged() if call.unchanged else None

    # When they call the route
    client = world.client(caller if call.with_key else None)
    try:
        answer = client.open(call.path, method=route.method, json=call.json, headers=call.headers, buffered=False)
        if route.endless and answer.status_code == 200:
            answer.close()
            assert role in route.roles
            return
        after = call.unchanged() if call.unchanged else None
    finally:
        if call.cleanup:
            call.cleanup()

    # Then an allowed role gets a 2xx, any other a 403 in the JSON error shape, and nothing changed
    body = answer.get_json()
    if role in route.roles and route.allowed_status is not None:
        assert answer.status_code in route.allowed_status, (answer.status_code, body)
    elif role in route.roles:
        assert 200 <= answer.status_code < 300, (answer.status_code, body)
    else:
        assert answer.status_code == 403, (answer.status_code, body)
        assert body["error"] == "forbidden"
        assert isinstance(body["message"], str) and repr(role) in body["message"]
        assert answer.headers["Content-Type"] == "application/json"
        assert after == before


# --------------------------------------------------------------------------- object level


def test_an_operator_cannot_cancel_or_retry_another_operators_task_and_the_task_is_unchanged(world, other_operator):
    # Given a QUEUED task and a FAILED task of one operator
    operator = world.people[OPERATOR]
    queued = make_task(world.stack, owner=other_operator.name, queue=world.queue, state="QUEUED")
    failed = make_task(world.stack, owner=other_operator.name, queue=world.queue, state="FAILED")
    before = {task_id: task_snapshot(world.stack, task_id) for task_id in (queued, failed)}

    # When another operator cancels the first and retries the second
    cancelled = world.client(operator).delete(f"/api/v1/tasks/{queued}")
    retried = world.client(operator).post(f"/api/v1/tasks/{failed}/retry")

    # Then both are 403 (the task belongs to another user), and neither task changed nor was retried
    for answer in (cancelled, retried):
        assert answer.status_code == 403, answer.get_json()
        assert answer.get_json()["error"] == "forbidden"
        assert "belongs to another user" in answer.get_json()["message"]
    assert {task_id: task_snapshot(world.stack, task_id) for task_id in (queued, failed)} == before

    # And the owner itself may do both
    assert world.client(other_operator).delete(f"/api/v1/tasks/{queued}").get_json()["state"] == "CANCELLED"
    again = world.client(other_operator).post(f"/api/v1/tasks/{failed}/retry")
    assert again.status_code == 202, again.get_json()
    assert again.get_json()["retry_of"] == failed
    assert again.get_json()["owner"] == other_operator.name


def test_an_admin_can_cancel_and_retry_any_users_task(world):
    # Given an operator's QUEUED task and FAILED task
    owner = world.people[OPERATOR].name
    queued = make_task(world.stack, owner=owner, queue=world.queue, state="QUEUED")
    failed = make_task(world.stack, owner=owner, queue=world.queue, state="FAILED")

    # When an admin cancels the first and retries the second
    admin = world.client(world.people[ADMIN])
    cancelled = admin.delete(f"/api/v1/tasks/{queued}")
    retried = admin.post(f"/api/v1/tasks/{failed}/retry")

    # Then both succeed: the first is CANCELLED (still the operator's), the second has a new run
    assert cancelled.status_code == 200, cancelled.get_json()
    assert cancelled.get_json()["state"] == "CANCELLED"
    assert cancelled.get_json()["owner"] == owner
    assert retried.status_code == 202, retried.get_json()
    assert retried.get_json()["retry_of"] == failed
    assert task_snapshot(world.stack, failed)["retries"] == 1


def test_a_viewer_cannot_submit_a_task_or_a_batch_and_nothing_is_stored(world):
    # Given a viewer
    viewer = world.people[VIEWER]
    before = count_tasks(world.stack, viewer.name)

    # When it submits a task, and a batch, with its API key and with a token
    token = world.token(viewer)
    answers = [
        world.client(viewer).post("/api/v1/tasks", json={"type": "echo", "queue": world.queue}),
        world.client(viewer).post("/api/v1/tasks/batch", json={"tasks": [{"type": "echo", "queue": world.queue}]}),
        world.client().post(
            "/api/v1/tasks", json={"type": "echo", "queue": world.queue}, headers={"Authorization": f"Bearer {token}"}
        ),
    ]

    # Then each is a 403 and no task of the viewer exists
    assert [answer.status_code for answer in answers] == [403, 403, 403]
    assert {answer.get_json()["error"] for answer in answers} == {"forbidden"}
    assert count_tasks(world.stack, viewer.name) == before


def test_a_submitted_task_is_owned_by_the_user_who_submitted_it_through_a_key_or_a_token(world):
    # Given an operator, with its API key and with a token from its password
    operator = world.people[OPERATOR]
    token = world.token(operator)
    by_token = {"Authorization": f"Bearer {token}"}

    # When it submits a task through each, and a batch
    via_key = world.client(operator).post("/api/v1/tasks", json={"type": "echo", "queue": world.queue})
    via_token = world.client().post("/api/v1/tasks", json={"type": "echo", "queue": world.queue}, headers=by_token)
    batch = world.client(operator).post(
        "/api/v1/tasks/batch", json={"tasks": [{"type": "echo", "queue": world.queue}] * 2}
    )
    assert (via_key.status_code, via_token.status_code, batch.status_code) == (202, 202, 202)

    # Then every one of them reads back (as a viewer too) with owner = the operator's name
    ids = [via_key.get_json()["id"], via_token.get_json()["id"], *batch.get_json()["ids"]]
    assert via_key.get_json()["owner"] == via_token.get_json()["owner"] == operator.name
    for task_id in ids:
        read = world.client(world.people[VIEWER]).get(f"/api/v1/tasks/{task_id}")
        assert read.status_code == 200
        assert read.get_json()["owner"] == operator.name


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("state", "SUCCEEDED"),
        ("owner", "someone-else"),
        ("attempts", 7),
        ("role", "admin"),
        ("result", {"forged": True}),
        ("id", "00000000-0000-0000-0000-000000000000"),
    ],
)
def test_a_submit_body_that_sets_a_server_side_field_is_refused_with_422_naming_it(world, name, value):
    # Given an operator
    operator = world.people[OPERATOR]
    before = count_tasks(world.stack, operator.name)

    # When it submits a task that also sets a field only the server sets, alone and in a batch
    item = {"type": "echo", "queue": world.queue, name: value}
    single = world.client(operator).post("/api/v1/tasks", json=item)
    batch = world.client(operator).post("/api/v1/tasks/batch", json={"tasks": [item]})

    # Then both are 422 naming that field, and no task was stored
    assert single.status_code == 422, single.get_json()
    assert single.get_json()["error"] == "validation_failed"
    assert single.get_json()["field"] == name
    assert batch.status_code == 422, batch.get_json()
    assert batch.get_json()["field"] == f"tasks.0.{name}"
    assert count_tasks(world.stack, operator.name) == before


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("owner_id", 1),
        ("owner", "someone-else"),
        ("state", "ACTIVE"),
        ("secret_hash", "0" * 64),
        ("prefix", "abcdef0123"),
        ("id", "00000000-0000-0000-0000-000000000000"),
    ],
)
def test_a_key_create_body_that_sets_a_server_side_field_is_refused_with_422_naming_it(world, name, value):
    # Given an operator
    operator = world.people[OPERATOR]
    before = count_keys(world.stack, operator.id)

    # When it creates a key whose body also sets a field only the server sets
    answer = world.client(operator).post("/api/v1/keys", json={"name": "k", "role": OPERATOR, name: value})

    # Then it is a 422 naming that field, and no key was made
    assert answer.status_code == 422, answer.get_json()
    assert answer.get_json()["error"] == "validation_failed"
    assert answer.get_json()["field"] == name
    assert count_keys(world.stack, operator.id) == before


@pytest.mark.parametrize(
    ("role", "asked"),
    [
        (VIEWER, OPERATOR),
        (VIEWER, ADMIN),
        (VIEWER, AGENT),
        (OPERATOR, ADMIN),
        (OPERATOR, AGENT),
    ],
)
def test_a_key_create_body_cannot_ask_for_a_role_above_the_callers(world, role, asked):
    # Given a viewer or an operator ("role" is a field of a key, but never above its creator's)
    caller = world.people[role]
    before = count_keys(world.stack, caller.id)

    # When it asks for a key with a role it does not hold
    answer = world.client(caller).post("/api/v1/keys", json={"name": "k", "role": asked})

    # Then it is a 403 and no key was made
    assert answer.status_code == 403, answer.get_json()
    assert answer.get_json()["error"] == "forbidden"
    assert count_keys(world.stack, caller.id) == before


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("name", "renamed-user"),
        ("id", 1),
        ("password_hash", "$2b$12$" + "a" * 53),
        ("created_at", "2020-01-01T00:00:00Z"),
    ],
)
def test_a_user_patch_that_renames_or_sets_a_server_side_field_is_refused_with_422_naming_it(world, name, value):
    # Given a user
    target = make_plain_user(world.stack, VIEWER)
    before = user_snapshot(world.stack, target)

    # When an admin PATCHes it with a field that cannot be changed
    answer = world.client(world.people[ADMIN]).patch(f"/api/v1/users/{target}", json={name: value})

    # Then it is a 422 naming that field, and the user is as it was
    assert answer.status_code == 422, answer.get_json()
    assert answer.get_json()["error"] == "validation_failed"
    assert answer.get_json()["field"] == name
    assert user_snapshot(world.stack, target) == before
    assert user_snapshot(world.stack, "renamed-user") is None


def test_a_role_change_takes_effect_at_once_on_the_users_existing_api_keys(world):
    # Given an operator with an operator API key, which can submit
    operator = person(world.stack, make_user(world.stack, OPERATOR), OPERATOR)
    submit = {"type": "echo", "queue": world.queue}
    assert world.client(operator).post("/api/v1/tasks", json=submit).status_code == 202
    admin = world.client(world.people[ADMIN])

    # When an admin demotes the user to viewer
    assert admin.patch(f"/api/v1/users/{operator.name}", json={"role": VIEWER}).status_code == 200

    # Then the old key acts as a viewer from the next request on: it reads, but cannot submit
    me = world.client(operator).get("/api/v1/users/me")
    assert me.status_code == 200
    assert me.get_json()["role"] == VIEWER
    assert world.client(operator).get("/api/v1/tasks?limit=1").status_code == 200
    refused = world.client(operator).post("/api/v1/tasks", json=submit)
    assert refused.status_code == 403, refused.get_json()

    # And when the user becomes an admin, the key keeps no more than its own role (operator)
    assert admin.patch(f"/api/v1/users/{operator.name}", json={"role": ADMIN}).status_code == 200
    assert world.client(operator).get("/api/v1/users/me").get_json()["role"] == OPERATOR
    assert world.client(operator).get("/api/v1/users").status_code == 403
    assert world.client(operator).post("/api/v1/tasks", json=submit).status_code == 202

    # And when the user becomes an agent, a human-role key of theirs no longer works at all
    assert admin.patch(f"/api/v1/users/{operator.name}", json={"role": AGENT}).status_code == 200
    assert world.client(operator).get("/api/v1/users/me").status_code == 401
