"""Shared fixtures.

Integration tests run against the real PostgreSQL (127.0.0.1:5432, database ``test``) and Redis
(127.0.0.1:6379) and real ``aios worker`` processes. Each test session gets its own PostgreSQL
schema and its own Redis key prefix and queue namespace, so runs never see each other.

A missing service, tool or kernel feature skips the tests that need it on a laptop and fails them
under CI (any truthy ``CI``: ``true``, ``1``, ``yes``…): one rule, in :func:`requirement_missing`, which
every such test calls (``tests/unit/test_requirements_rule.py`` checks no test skips another way).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from aios.config import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def in_ci() -> bool:
    """Whether this run is CI's: ``CI`` set to anything but empty, ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


IN_CI = in_ci()
PG_URL = os.environ.get("AIOS_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AIOS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:10]
#: The JWT signing key of this test session (tests grep logs for it: it must never appear).
TEST_JWT_SECRET = f"test-jwt-secret-{uuid.uuid4().hex}{uuid.uuid4().hex}"


def requirement_missing(what: str, why: str) -> NoReturn:
    """The one rule for a test that needs a service, a tool or a kernel feature this machine lacks:
    fail under CI (which must provide it: .ci/run installs and starts what the suite needs), skip
    with the reason elsewhere."""
    message = f"{what}: {why}"
    if in_ci():
        pytest.fail(f"{message}; CI requires it", pytrace=False)
    pytest.skip(message)


def service_missing(what: str, error: Exception) -> NoReturn:
    requirement_missing(what, f"not reachable ({type(error).__name__}: {error})")


def require_program(program: str, hint: str) -> str:
    """The path of ``program``; else the test skips or, under CI, fails (``hint`` says how to get it)."""
    found = shutil.which(program)
    if found is None:
        requirement_missing(program, f"not installed ({hint})")
    return found


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- services


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL schema for this session; dropped afterwards."""
    import sqlalchemy as sa

    schema = f"aios_t_{RUN_ID}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001
        admin.dispose()
        service_missing(f"PostgreSQL at {PG_URL}", exc)
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    from aios import migrate
    from aios.config import DatabaseSettings

    migrate.upgrade(DatabaseSettings(url=url))
    yield url
    from aios.db import dispose_engines

    dispose_engines()
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix for this session; its keys are deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        service_missing(f"Redis at {REDIS_URL}", exc)
    prefix = f"aios-t-{RUN_ID}:"
    yield prefix
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    except Exception:  # noqa: BLE001 - a test may have left Redis stopped
        pass


@dataclass
class Stack:
    """Settings for the real services plus the same settings as environment variables."""

    settings: Settings
    env: dict[str, str]
    tmp: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def override(self, **sections: dict[str, Any]) -> Stack:
        """A copy with some settings changed, in both the Settings and the env form."""
        env = dict(self.env)
        for section, values in sections.items():
            for key, value in values.items():
                import json

                env[f"AIOS_{section.upper()}__{key.upper()}"] = (
                    json.dumps(value) if isinstance(value, list | dict) else str(value)
                )
        return Stack(settings=settings_from_env(env), env=env, tmp=self.tmp)


def settings_from_env(env: dict[str, str]) -> Settings:
    return load_settings(environ=env)


@pytest.fixture(scope="session")
def stack(pg_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    tmp = tmp_path_factory.mktemp("stack")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIOS_")}
    env.update(
        {
            "AIOS_CONFIG": str(REPO_ROOT / "config" / "aios.toml"),
            "AIOS_DATABASE__URL": pg_url,
            "AIOS_BROKER__URL": REDIS_URL,
            "AIOS_BROKER__KEY_PREFIX": redis_prefix,
            "AIOS_BROKER__NAMESPACE": f"t{RUN_ID}",
            "AIOS_TASKS__MODULES": '["tests.support.task_types"]',
            "AIOS_ORCHESTRATOR__RETRY_BACKOFF_BASE_S": "0.2",
            "AIOS_ORCHESTRATOR__RETRY_BACKOFF_MAX_S": "1.0",
            "AIOS_ORCHESTRATOR__TIMEOUT_GRACE_S": "2",
            "AIOS_LOGGING__LEVEL": "INFO",
            "AIOS_SECURITY__JWT_SECRET": TEST_JWT_SECRET,
            # Every started worker registers an agent; a whole session makes more than the default 10.
            "AIOS_ORCHESTRATOR__MAX_AGENTS": "0",
            # Backups of the test schema go to this session's folder, and no beat takes one at 03:00.
            "AIOS_BACKUP__DIR": str(tmp / "backups"),
            "AIOS_BACKUP__SCHEDULE": "",
            "AIOS_METRICS__MULTIPROC_DIR": str(tmp / "prometheus"),
            "AIOS_LOGGING__DIR": str(tmp / "logs"),
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
    )
    return Stack(settings=settings_from_env(env), env=env, tmp=tmp)


@pytest.fixture(scope="session")
def celery_client(stack: Stack) -> Any:
    from aios.broker.celery_app import create_celery_app

    return create_celery_app(stack.settings)


@pytest.fixture(scope="session")
def api_app(stack: Stack, celery_client: Any) -> Any:
    from webapi.app import create_app

    return create_app(stack.settings, celery_client)


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str
    key: str


def make_user(stack: Stack, role: str, *, name: str | None = None) -> Credentials:
    """A user with ``role`` and an API key of that role, straight in the database."""
    from aios.db import session_scope
    from aios.security import api_keys
    from aios.security.users import create_user

    name = name or f"{role}-{uuid.uuid4().hex[:8]}"
    password = f"pw-{uuid.uuid4().hex}"
    with session_scope(stack.settings.database) as session:
        user = create_user(session, name, password, role, bcrypt_cost=stack.settings.security.bcrypt_cost)
        key = api_keys.generate(session, name=f"{name}-test", role=role, owner_id=user.id, expires_at=None)
        return Credentials(user=name, password=password, key=key.plaintext)


@pytest.fixture(scope="session")
def admin(stack: Stack, pg_url: str) -> Credentials:
    return make_user(stack, "admin")


def authorize(test_client: Any, key: str) -> Any:
    """Send ``key`` (X-API-Key) with every request of a Flask test client."""
    test_client.environ_base["HTTP_X_API_KEY"] = key
    return test_client


@pytest.fixture()
def client(api_app: Any, admin: Credentials) -> Any:
    """A test client of the real app, authenticated as an admin (role tests use their own)."""
    return authorize(api_app.test_client(), admin.key)


@pytest.fixture()
def anonymous(api_app: Any) -> Any:
    return api_app.test_client()


@pytest.fixture()
def queue() -> str:
    """A queue of its own for one test, so its tasks meet no other test's workers."""
    return f"q{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- workers


@dataclass
class WorkerProcess:
    name: str
    hostname: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture()
def start_worker(stack: Stack, celery_client: Any, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real ``aios worker`` processes; each is stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[WorkerProcess] = []

    def start(
        queues: list[str],
        *,
        name: str | None = None,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        ready_timeout: float = 60.0,
    ) -> WorkerProcess:
        name = name or f"w{uuid.uuid4().hex[:8]}"
        hostname = f"{name}@aios-test"
        log_path = tmp_path / f"{name}.log"
        handle = log_path.open("wb")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aios.cli",
                "worker",
                "--name",
                hostname,
                "--queues",
                ",".join(queues),
                "--concurrency",
                str(concurrency),
            ],
            env={**stack.env, **(env or {})},
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
        )
        worker = WorkerProcess(name=name, hostname=hostname, process=process, log_path=log_path)
        started.append(worker)

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"worker {name} exited with {process.returncode}:\n{worker.log()[-3000:]}")
            return " ready." in worker.log()

        wait_for(ready, timeout=ready_timeout, interval=0.2, what=f"worker {name} to be ready")
        return worker

    yield start
    for worker in started:
        worker.stop()


@dataclass
class BeatProcess:
    """A real ``aios beat`` subprocess (its log tells whether it leads)."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def is_leader(self) -> bool:
        return "is now the LEADER" in self.log()


#: Beat settings for tests: a short lease (fast failover) and a half-second tick.
#: Short lease and tick; no sync run during a beat test (it would act on other tests' leftover rows
#: in the session's schema — the sync job has tests of its own, each on a schema of its own).
BEAT_TEST_ENV = {
    "AIOS_BEAT__LOCK_TTL_S": "3.0",
    "AIOS_BEAT__TICK_S": "0.5",
    "AIOS_ORCHESTRATOR__SYNC_INTERVAL_S": "86400",
}


@pytest.fixture()
def start_beat(stack: Stack, tmp_path: Path) -> Iterator[Callable[..., BeatProcess]]:
    """Start real ``python -m aios.cli beat`` processes (settings of the session + ``BEAT_TEST_ENV`` +
    ``env``); each is stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[BeatProcess] = []

    def start(*, env: dict[str, str] | None = None) -> BeatProcess:
        log_path = tmp_path / f"beat-{len(started)}.log"
        with log_path.open("wb") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "aios.cli", "beat"],
                env={**stack.env, **BEAT_TEST_ENV, **(env or {})},
                cwd=str(REPO_ROOT),
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        beat = BeatProcess(process, log_path)
        started.append(beat)
        return beat

    yield start
    for beat in started:
        if beat.process.poll() is None:
            beat.process.send_signal(signal.SIGTERM)
            try:
                beat.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                beat.process.kill()
                beat.process.wait()


# --------------------------------------------------------------------------- ledger helpers


@pytest.fixture()
def ledger(stack: Stack) -> Any:
    """Read tasks and events straight from the database."""
    from sqlalchemy import select

    from aios.db import session_scope
    from aios.models import Task, TaskEvent

    class Ledger:
        def task(self, task_id: str) -> Task:
            with session_scope(stack.settings.database) as session:
                return session.get(Task, task_id)

        def states(self, task_ids: list[str]) -> dict[str, str]:
            with session_scope(stack.settings.database) as session:
                rows = session.execute(select(Task.id, Task.state).where(Task.id.in_(task_ids))).all()
                return {row.id: row.state for row in rows}

        def events(self, task_id: str) -> list[TaskEvent]:
            with session_scope(stack.settings.database) as session:
                return list(
                    session.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id))
                )

        def wait_state(self, task_id: str, *states: str, timeout: float = 30.0) -> Task:
            return wait_for(
                lambda: (t := self.task(task_id)) is not None and t.state in states and t,
                timeout=timeout,
                what=f"task {task_id} to reach {states}",
            )

    return Ledger()


# --------------------------------------------------------------------------- API processes


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ApiProcess:
    """A real ``aios api`` (gunicorn) on its own port, in its own process group."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    #: The certificate an HTTPS API serves, which its clients trust.
    ca: Path | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60.0) -> ApiProcess:
        import requests

        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"API {self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                verify = str(self.ca) if self.ca else True
                return requests.get(f"{self.url}/healthz", timeout=1, verify=verify).status_code == 200
            except requests.RequestException:
                return False

        wait_for(healthy, timeout=timeout, interval=0.1, what=f"API {self.name} to answer /healthz")
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to gunicorn's master; if it does not exit in time, SIGKILL to its process group."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()


@pytest.fixture()
def start_api(stack: Stack, tmp_path: Path) -> Iterator[Callable[..., ApiProcess]]:
    """Start real ``python -m aios.cli api`` processes (one gunicorn worker each) on free ports, with
    the session's settings plus ``env`` (``tls``: serve HTTPS with that certificate and key); waits for
    /healthz; stops each one at teardown."""
    started: list[ApiProcess] = []

    def start(
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        ready_timeout: float = 60.0,
        tls: tuple[Path, Path] | None = None,
    ) -> ApiProcess:
        name = name or f"api{len(started) + 1}"
        port = free_port()
        log_path = tmp_path / f"{name}.log"
        tls_args = ["--certfile", str(tls[0]), "--keyfile", str(tls[1])] if tls else []
        with log_path.open("wb") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "aios.cli", "api", *tls_args],
                env={
                    **stack.env,
                    "AIOS_API__PORT": str(port),
                    "AIOS_API__WORKERS": "1",
                    "PYTHONUNBUFFERED": "1",
                    **(env or {}),
                },
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=str(REPO_ROOT),
                start_new_session=True,
            )
        api = ApiProcess(
            name=name,
            url=f"{'https' if tls else 'http'}://127.0.0.1:{port}",
            process=process,
            log_path=log_path,
            ca=tls[0] if tls else None,
        )
        started.append(api)
        return api.wait_ready(ready_timeout) if wait else api

    yield start
    for api in started:
        api.stop()
