"""Redis 6.2 is enough: AIOS sends no command or option newer (README's minimum versions).

Two proofs, both on a private ``redis-server`` (the shared one is never reconfigured):

* Every command Redis runs while the API limits, locks out, leases and takes a task, and while a
  real agent consumes, runs and acks it (Lua script calls included), is read back with ``MONITOR``
  and checked against the server's own ``COMMAND DOCS``: the command, and every option token it
  carries, must date from 6.2.0 or earlier. ``EXPIRE … NX`` (7.0) is exactly what this catches.
* On a server whose default user may not run EXPIRE at all (ACL, Redis 6.0+; Lua scripts obey it
  too), the limiter still refuses past its limit and counts again once its window is over, and a
  username is still locked out after its failed logins and let in once the lockout ends.
"""

from __future__ import annotations

import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aios.config import BrokerSettings
from aios.security.store import RedisStore
from tests.conftest import REPO_ROOT, require_program, wait_for
from tests.support.private_redis import PrivateRedis, running_private_redis

pytestmark = pytest.mark.integration

#: The oldest Redis AIOS supports (README, docs/deploy.md).
MINIMUM = (6, 2, 0)
#: Commands sent that are newer, and why that is harmless: redis-py names itself on every new
#: connection and ignores the error an older server answers (redis/connection.py,
#: ``_read_optional_setinfo``).
TOLERATED = {"client|setinfo": "redis-py ignores the error of a server without it"}
EXPIRE_FAMILY = ("expire", "pexpire", "expireat", "pexpireat")


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    with running_private_redis(tmp_path / "redis.log") as server:
        yield server


def redis_client(server: PrivateRedis) -> Any:
    import redis

    return redis.Redis.from_url(server.url, decode_responses=True)


def app_on(server: PrivateRedis, tmp_path: Path, **security: str) -> Any:
    """The real Flask app (a migrated SQLite ledger) whose broker and counters are ``server``."""
    from aios import migrate
    from aios.config import load_settings
    from webapi.app import create_app

    settings = load_settings(
        environ={
            "AIOS_CONFIG": str(REPO_ROOT / "config" / "aios.toml"),
            "AIOS_DATABASE__URL": f"sqlite:///{tmp_path / 'ledger.db'}",
            "AIOS_BROKER__URL": server.url,
            "AIOS_SECURITY__JWT_SECRET": uuid.uuid4().hex + uuid.uuid4().hex,
            # Polling logins must not reach the per-address login limit (a test of its own).
            "AIOS_SECURITY__RATE_LIMIT_LOGIN_PER_MINUTE": "1000",
            **{f"AIOS_SECURITY__{name.upper()}": value for name, value in security.items()},
        }
    )
    assert settings.broker.is_redis
    migrate.upgrade(settings.database)
    app = create_app(settings)
    assert isinstance(app.extensions["aios_security_store"], RedisStore)
    return app


def make_user_on(app: Any, role: str) -> tuple[str, str, str]:
    """(name, password, API key) of a new user in the app's ledger."""
    from aios.db import session_scope
    from aios.security import api_keys
    from aios.security.users import create_user

    settings = app.extensions["aios"].settings
    name, password = f"{role}-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    with session_scope(settings.database) as session:
        user = create_user(session, name, password, role, bcrypt_cost=settings.security.bcrypt_cost)
        key = api_keys.generate(session, name=f"{name}-key", role=role, owner_id=user.id, expires_at=None)
        return name, password, key.plaintext


def login(test_client: Any, name: str, password: str) -> Any:
    return test_client.post("/api/v1/auth/token", json={"username": name, "password": password})


@pytest.fixture()
def watch(tmp_path: Path) -> Iterator[Any]:
    """``watch(server)``: a started Monitor of ``server``, killed at teardown if the test failed first."""
    started: list[Monitor] = []

    def start(server: PrivateRedis) -> Monitor:
        started.append(Monitor(server, tmp_path / f"monitor-{len(started)}.log"))
        return started[-1]

    yield start
    for monitor in started:
        if monitor.process.poll() is None:
            monitor.process.kill()
            monitor.process.wait()
        monitor.output.close()


class Monitor:
    """``redis-cli monitor`` on a server, into a file: every command it runs, from scripts too."""

    END = "aios-monitor-end"

    def __init__(self, server: PrivateRedis, path: Path) -> None:
        require_program("redis-cli", "apt-get install redis-tools")
        self.server, self.path = server, path
        self.output = path.open("wb")
        self.process = subprocess.Popen(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(server.port), "monitor"], stdout=self.output
        )
        wait_for(lambda: path.read_bytes().startswith(b"OK"), timeout=15, what="MONITOR attached")

    def commands(self) -> list[list[str]]:
        """Stop watching; every command seen, as its arguments (the monitor's own marker left out)."""
        client = redis_client(self.server)
        try:
            client.echo(self.END)
        finally:
            client.close()
        wait_for(lambda: self.END in self.path.read_text(errors="replace"), timeout=15, what="the end marker")
        self.process.terminate()
        self.process.wait(timeout=10)
        self.output.close()
        seen = []
        for line in self.path.read_text(errors="replace").splitlines()[1:]:
            # 1700000000.123456 [0 127.0.0.1:41234] "INCR" "key"  (or [0 lua] inside a script)
            arguments = shlex.split(line.split("] ", 1)[1])
            if arguments[:2] != ["echo", self.END] and arguments[:2] != ["ECHO", self.END]:
                seen.append(arguments)
        return seen


def newer_than_minimum(arguments: list[str], docs: dict[str, Any]) -> list[str]:
    """What in this one command (name, subcommand, option tokens) dates from after MINIMUM."""
    name = arguments[0].lower()
    doc = docs[name]
    if "subcommands" in doc and len(arguments) > 1:
        name = f"{name}|{arguments[1].lower()}"
        doc = doc["subcommands"].get(name, doc)
    if name in TOLERATED:
        return []
    found = [f"{name} (since {doc['since']})"] if version(doc["since"]) > MINIMUM else []
    tokens = {argument.upper() for argument in arguments[1:]}

    def walk(specs: list[dict[str, Any]], inherited: str) -> None:
        for spec in specs:
            since = spec.get("since", inherited)
            if spec.get("token", "").upper() in tokens and version(since) > MINIMUM:
                found.append(f"{name} … {spec['token']} (since {since})")
            walk(spec.get("arguments", []), since)

    walk(doc.get("arguments", []), doc["since"])
    # SET's NX and GET together: both 6.2 tokens, but the pair only from 7.0 (SET's history).
    if name == "set" and {"NX", "GET"} <= tokens:
        found.append("set … NX GET (together since 7.0.0)")
    return found


def newer_commands(server: PrivateRedis, seen: list[list[str]]) -> list[str]:
    """What in ``seen`` is newer than MINIMUM, by ``server``'s COMMAND DOCS. A server older than 7.0
    has no COMMAND DOCS, but then it is the check itself: the tests' outcomes show it ran them."""
    client = redis_client(server)
    try:
        if version(client.info("server")["redis_version"]) < (7, 0, 0):
            return []
        names = {arguments[0].lower() for arguments in seen}
        docs = {command: client.execute_command("COMMAND DOCS", command)[command] for command in names}
    finally:
        client.close()
    return sorted({item for arguments in seen for item in newer_than_minimum(arguments, docs)})


def test_the_limiter_lockout_and_leases_send_only_commands_redis_6_2_has(private_redis, watch, tmp_path: Path):
    # Given the real app on a private Redis, every command that Redis runs watched
    app = app_on(private_redis, tmp_path, rate_limit_write_per_minute="2", login_max_failures="2")
    name, password, key = make_user_on(app, "operator")
    store = app.extensions["aios_security_store"]
    monitor = watch(private_redis)

    # When the rate limiter counts writes past its limit, a username is locked out after failed
    # logins, a right login is taken, and a lease is taken, refused, renewed and dropped
    test_client = app.test_client()
    statuses = [
        test_client.post(
            "/api/v1/tasks", json={"type": "echo", "parameters": {"n": n}}, headers={"X-API-Key": key}
        ).status_code
        for n in range(3)
    ]
    failed = [login(test_client, name, "wrong").status_code for _ in range(3)]
    other, other_password, _ = make_user_on(app, "viewer")
    assert login(test_client, other, other_password).status_code == 200
    scope = f"lease:{uuid.uuid4().hex}"
    leases = [
        store.take_lease(scope, "a", 30, 1),
        store.take_lease(scope, "b", 30, 1),
        store.take_lease(scope, "a", 30, None),
    ]
    store.drop_lease(scope, "a")
    seen = monitor.commands()

    # Then none of them, nor any option they carry, is newer than Redis 6.2
    assert not newer_commands(private_redis, seen)
    names = {arguments[0].lower() for arguments in seen}
    # and each did its job (so its commands ran rather than failed)
    assert statuses == [202, 202, 429], statuses
    assert failed == [401, 401, 429], failed
    assert [granted for granted, _ in leases] == [True, False, True]
    # and what was watched is what the limiter, lockout and leases send (the check saw them)
    assert {"evalsha", "incr", "set", "ttl", "zadd"} <= names, sorted(names)


@pytest.mark.slow
def test_a_task_submitted_run_and_acked_by_a_real_agent_sends_only_commands_redis_6_2_has(
    stack, start_worker, private_redis, watch, queue
):
    from aios.broker.celery_app import create_celery_app
    from tests.conftest import authorize, make_user, settings_from_env
    from webapi.app import create_app

    # Given the API and a real agent on a private Redis (PostgreSQL as the other tests), watched
    broker = {"AIOS_BROKER__URL": private_redis.url}
    settings = settings_from_env({**stack.env, **broker})
    app = create_app(settings, create_celery_app(settings))
    client = authorize(app.test_client(), make_user(stack, "operator").key)
    monitor = watch(private_redis)

    # When a task is submitted, consumed, run and acked
    start_worker([queue], env=broker)
    submitted = client.post("/api/v1/tasks", json={"type": "echo", "parameters": {"x": 1}, "queue": queue})
    assert submitted.status_code == 202, submitted.json
    task = f"/api/v1/tasks/{submitted.json['id']}"
    wait_for(lambda: client.get(task).json["state"] == "SUCCEEDED", timeout=60, interval=0.2, what="the task")
    seen = monitor.commands()

    # Then the broker saw the publish and the consume, and nothing newer than Redis 6.2
    # (lpush: the publish; brpop: the consume; zadd/hset/hdel: kombu's unacked index and the ack)
    names = {arguments[0].lower() for arguments in seen}
    assert {"lpush", "brpop", "zadd", "hset", "hdel"} <= names, sorted(names)
    assert not newer_commands(private_redis, seen)


def test_the_check_itself_finds_expire_nx(private_redis):
    # Given the docs Redis 7 gives for EXPIRE (its options date from 7.0.0)
    client = redis_client(private_redis)
    try:
        if version(client.info("server")["redis_version"]) < (7, 0, 0):
            return  # no COMMAND DOCS to check with, and no EXPIRE … NX to catch
        docs = {"expire": client.execute_command("COMMAND DOCS", "expire")["expire"]}
    finally:
        client.close()
    # Then EXPIRE with NX is caught and plain EXPIRE is not
    assert newer_than_minimum(["EXPIRE", "k", "60", "NX"], docs) == ["expire … NX (since 7.0.0)"]
    assert newer_than_minimum(["EXPIRE", "k", "60"], docs) == []


@pytest.fixture()
def redis_without_expire(private_redis: PrivateRedis) -> PrivateRedis:
    """The private Redis, its default user (the one AIOS connects as) refused the EXPIRE family."""
    import redis

    client = redis_client(private_redis)
    try:
        client.execute_command("ACL", "SETUSER", "default", *(f"-{command}" for command in EXPIRE_FAMILY))
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.expire("anything", 10)
        with pytest.raises(redis.ResponseError, match="can't run this command"):
            client.eval("return redis.call('EXPIRE', KEYS[1], 10)", 1, "anything")
    finally:
        client.close()
    return private_redis


def redis_store(url: str) -> RedisStore:
    """The security store's Redis counters alone (no database fallback), under a prefix of their own."""
    broker = BrokerSettings(url=url, key_prefix=f"t{uuid.uuid4().hex[:8]}:")
    return RedisStore(broker, database=None)  # type: ignore[arg-type]


def test_the_limiter_refuses_past_its_limit_and_counts_again_after_its_window_without_expire(
    redis_without_expire, tmp_path: Path
):
    # Given the counters on a Redis that refuses EXPIRE
    store = redis_store(redis_without_expire.url)
    key = f"rl:write:user:{uuid.uuid4().hex}"

    # When a principal is counted three times in a 1 s window
    hits = [store.hit(key, 1) for _ in range(3)]

    # Then the count rises (a limit of 2 refuses the third) and the window has a time left
    assert [count for count, _ in hits] == [1, 2, 3]
    assert [left for _, left in hits] == [1, 1, 1], hits
    assert store.peek(key)[0] == 3
    # and the counter expires by itself: the window is over, and the next hit starts a new one
    wait_for(lambda: store.peek(key) == (0, 0), timeout=15, what="the window to end")
    assert store.hit(key, 60)[0] == 1
    assert 1 <= store.peek(key)[1] <= 60


def test_a_counter_left_without_an_expiry_gets_one_and_keeps_counting(redis_without_expire):
    # Given a counter written without an expiry (by hand, or an older AIOS that crashed mid-way)
    store = redis_store(redis_without_expire.url)
    client = redis_client(redis_without_expire)
    try:
        client.set(store.prefix + "login-fail:pat", 4)
        # When it is hit
        count, left = store.hit("login-fail:pat", 30)
        # Then it counts on from where it was and now ends with the window
        assert (count, left) == (5, 30)
        assert 0 < client.ttl(store.prefix + "login-fail:pat") <= 30
    finally:
        client.close()


def test_login_lockout_locks_and_lets_in_again_on_a_redis_without_expire(redis_without_expire, tmp_path: Path):
    # Given the real app, a lockout after 2 failed logins lasting 2 s, on a Redis refusing EXPIRE
    app = app_on(redis_without_expire, tmp_path, login_max_failures="2", login_lockout_s="2")
    name, password, _ = make_user_on(app, "viewer")
    test_client = app.test_client()

    # When the password is wrong twice
    assert [login(test_client, name, "wrong").status_code for _ in range(2)] == [401, 401]

    # Then even the right password is refused with 429 and a Retry-After while the lock lasts
    locked = login(test_client, name, password)
    assert locked.status_code == 429, locked.json
    assert locked.json["error"] == "too_many_requests"
    assert 1 <= int(locked.headers["Retry-After"]) <= 2
    # and once the lock is over the right password is let in again
    wait_for(lambda: login(test_client, name, password).status_code == 200, timeout=20, interval=0.5, what="unlock")


def test_a_redis_refusing_the_counter_is_logged_as_an_error_not_a_warning(private_redis, caplog):
    # Given a Redis whose default user may not run scripts (as a server refusing a command would)
    client = redis_client(private_redis)
    try:
        client.execute_command("ACL", "SETUSER", "default", "-evalsha", "-eval")
    finally:
        client.close()
    store = redis_store(private_redis.url)

    # When a hit is counted
    with caplog.at_level("WARNING", logger="aios.security.store"):
        counted = store.hit("rl:write:user:pat", 60)

    # Then the request is not refused (fail open), but the log says, as an ERROR, that limits are off
    assert counted == (0, 0)
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert errors and "rate limits and login lockout are OFF" in errors[0].getMessage(), caplog.records
