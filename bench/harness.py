"""What every benchmark shares: a private PostgreSQL schema and Redis key prefix per run, real ``aios api``
(gunicorn, as shipped) and ``aios worker`` subprocesses, an admin API key made straight in the database,
a raw Celery app for the comparisons, a small HTTP load generator and the repeat/median helpers.

Nothing here is mocked: the figures come from the same processes a deployment runs, on the PostgreSQL
(``AIOS_DATABASE__URL``, default ``postgresql://postgres@127.0.0.1:5432/test``) and Redis
(``AIOS_BROKER__URL``, default ``redis://127.0.0.1:6379/0``) on localhost.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import sqlalchemy as sa  # noqa: E402

DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def driver_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- statistics


@dataclass
class Stat:
    """Median and range of one figure over its repetitions, in the figure's unit."""

    values: list[float]
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, digits: int = 1) -> str:
        return (
            f"{self.median:,.{digits}f} {self.unit} (min {min(self.values):,.{digits}f}, "
            f"max {max(self.values):,.{digits}f}, n={len(self.values)})"
        )

    def short(self, digits: int = 1) -> str:
        return f"{self.median:,.{digits}f} {self.unit}"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


class CpuMeter:
    """CPU seconds spent by named groups of processes between :meth:`start` and :meth:`stop`.

    Groups are given as callables returning their processes at that moment (a Proc's tree, or every
    PostgreSQL/Redis server process): a process that appears in between (a new database backend)
    counts from zero, one that exits in between is not counted. Where a figure is CPU-bound on the two
    shared cores, this says which process the time went to.
    """

    def __init__(self, groups: dict[str, Callable[[], list[Any]]]) -> None:
        self.groups = groups
        self.before: dict[str, dict[int, float]] = {}
        self.spent: dict[str, float] = {name: 0.0 for name in groups}

    @staticmethod
    def _times(processes: list[Any]) -> dict[int, float]:
        times = {}
        for process in processes:
            try:
                cpu = process.cpu_times()
                times[process.pid] = cpu.user + cpu.system
            except Exception:  # noqa: BLE001 - gone meanwhile
                continue
        return times

    def start(self) -> None:
        self.before = {name: self._times(group()) for name, group in self.groups.items()}

    def stop(self) -> None:
        for name, group in self.groups.items():
            now, before = self._times(group()), self.before.get(name, {})
            self.spent[name] += sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())


def server_processes(command: str) -> Callable[[], list[Any]]:
    """Every process whose name is ``command`` (``postgres``, ``redis-server``): the services' side."""
    import psutil

    def find() -> list[Any]:
        return [p for p in psutil.process_iter(["name"]) if p.info["name"] == command]

    return find


def this_process() -> list[Any]:
    import psutil

    return [psutil.Process()]


def repeat(measure: Callable[[int], float], times: int, unit: str, label: str = "") -> Stat:
    values = []
    for n in range(times):
        value = measure(n)
        values.append(value)
        print(f"  {label} rep {n + 1}/{times}: {value:,.2f} {unit}", flush=True)
    return Stat(values, unit)


# --------------------------------------------------------------------------- HTTP load


class Client:
    """One keep-alive HTTP/1.1 connection (http.client: lighter than requests, so the load generator
    spends less of the two shared cores than the servers it measures)."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, timeout: float = 60.0) -> None:
        host_port = base_url.split("://", 1)[1]
        self.host, port = host_port.split(":")
        self.port = int(port)
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=self.headers)
                response = self.conn.getresponse()
                payload = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return response.status, payload
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None, expect: tuple[int, ...] = (200, 201, 202)) -> Any:
        status, payload = self.request(method, path, body)
        if status not in expect:
            raise RuntimeError(f"{method} {path} -> {status}: {payload[:300]!r}")
        return json.loads(payload) if payload else None


def load(
    base_url: str,
    headers: dict[str, str],
    method: str,
    path: str,
    body: Any,
    *,
    concurrency: int,
    duration_s: float,
    ok: tuple[int, ...] = (200, 201, 202),
) -> float:
    """Requests per second that ``concurrency`` threads, each on its own keep-alive connection, get
    through in ``duration_s`` (after a short warm-up); any non-``ok`` answer aborts the figure."""
    stop = threading.Event()
    counting = threading.Event()
    counts = [0] * concurrency
    errors: list[str] = []
    encoded = json.dumps(body).encode() if body is not None else None

    def run(slot: int) -> None:
        client = Client(base_url, headers)
        while not stop.is_set():
            try:
                status, payload = client.request(method, path, encoded)
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
                return
            if status not in ok:
                errors.append(f"{status}: {payload[:200]!r}")
                return
            if counting.is_set():
                counts[slot] += 1

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    counting.set()
    began = time.perf_counter()
    time.sleep(duration_s)
    counting.clear()
    took = time.perf_counter() - began
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise RuntimeError(f"load on {method} {path} failed: {errors[0]}")
    return sum(counts) / took


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def tree(self) -> list[Any]:
        import psutil

        try:
            parent = psutil.Process(self.process.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_tree(self) -> None:
        """SIGKILL the process and every child (an agent "lost" outright, pool included)."""
        for proc in self.tree():
            try:
                proc.send_signal(signal.SIGKILL)
            except Exception:  # noqa: BLE001
                pass
        self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill_tree()


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One benchmark run: its schema, Redis prefix, env for subprocesses and the processes it started."""

    schema: str
    prefix: str
    namespace: str
    env: dict[str, str]
    settings: Any
    tmp: Path
    admin_engine: sa.Engine
    procs: list[Proc] = field(default_factory=list)
    pg_version: str = ""
    _celery: Any = None
    _key: str | None = None

    @property
    def redis_url(self) -> str:
        return self.settings.broker.url

    @property
    def db_url(self) -> str:
        return self.settings.database.url

    @property
    def celery(self) -> Any:
        if self._celery is None:
            from aios.broker.celery_app import create_celery_app

            self._celery = create_celery_app(self.settings)
        return self._celery

    def engine(self) -> sa.Engine:
        from aios.db import get_engine

        return get_engine(self.settings.database)

    def admin_key(self) -> str:
        """An admin user and API key straight in the database (as tests/conftest.py make_user does)."""
        if self._key is None:
            from aios.db import session_scope
            from aios.security import api_keys
            from aios.security.users import create_user

            with session_scope(self.settings.database) as session:
                user = create_user(
                    session,
                    "bench-admin",
                    f"pw-{uuid.uuid4().hex}",
                    "admin",
                    bcrypt_cost=self.settings.security.bcrypt_cost,
                )
                key = api_keys.generate(session, name="bench", role="admin", owner_id=user.id, expires_at=None)
                self._key = key.plaintext
        return self._key

    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.admin_key()}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, url: str = "") -> Proc:
        log_path = self.tmp / f"{name}.log"
        with log_path.open("wb") as handle:
            process = subprocess.Popen(
                argv,
                env={**self.env, **(env or {})},
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=str(REPO_ROOT),
                start_new_session=True,
            )
        proc = Proc(name, process, log_path, url)
        self.procs.append(proc)
        return proc

    def start_api(self, name: str = "api", env: dict[str, str] | None = None) -> Proc:
        """``python -m aios.cli api``: gunicorn with the shipped workers/threads (config/aios.toml)."""
        port = free_port()
        proc = self.spawn(
            name,
            [PYTHON, "-m", "aios.cli", "api"],
            {"AIOS_API__PORT": str(port), **(env or {})},
            url=f"http://127.0.0.1:{port}",
        )
        wait_http(proc, "/healthz")
        return proc

    def start_worker(
        self, name: str, *, concurrency: int = 2, env: dict[str, str] | None = None, queues: str = ""
    ) -> Proc:
        return self.start_workers([name], concurrency=concurrency, env=env, queues=queues)[0]

    def start_workers(
        self, names: list[str], *, concurrency: int = 2, env: dict[str, str] | None = None, queues: str = ""
    ) -> list[Proc]:
        """``python -m aios.cli worker`` per name, all spawned before any is waited for: their start-ups
        (imports, broker connection, first heartbeat) overlap instead of adding up."""
        procs = []
        for name in names:
            hostname = f"{name}@bench"
            argv = [PYTHON, "-m", "aios.cli", "worker", "--name", hostname, "--concurrency", str(concurrency)]
            if queues:
                argv += ["--queues", queues]
            proc = self.spawn(name, argv, env)
            proc.url = hostname
            procs.append(proc)
        for proc in procs:

            def ready(proc: Proc = proc) -> bool:
                if not proc.alive():
                    raise RuntimeError(f"worker {proc.name} exited:\n{proc.log()[-3000:]}")
                return self.agent_status(proc.url) == "ONLINE"

            # The agent row turns ONLINE at its first heartbeat, once the worker consumes (logging is WARNING).
            wait_for(ready, 90, 0.1, f"agent {proc.url} ONLINE")
        return procs

    def agent_status(self, hostname: str) -> str | None:
        with self.engine().connect() as connection:
            return connection.execute(sa.text("SELECT status FROM agents WHERE name = :n"), {"n": hostname}).scalar()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine().connect() as connection:
            return connection.execute(sa.text(sql), params).scalar()

    def execute(self, sql: str, **params: Any) -> None:
        with self.engine().begin() as connection:
            connection.execute(sa.text(sql), params)

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)

    def raw_env(self, queue: str) -> dict[str, str]:
        """Env for the raw Celery app (bench/rawapp.py): same Redis, its own key prefix and queue."""
        return {"BENCH_REDIS_URL": self.redis_url, "BENCH_PREFIX": self.prefix + "raw:", "BENCH_QUEUE": queue}


def wait_http(proc: Proc, path: str, timeout: float = 90) -> None:
    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        try:
            status, _ = Client(proc.url, timeout=2).request("GET", path)
            return status < 500
        except OSError:
            return False

    wait_for(up, timeout, 0.2, f"{proc.name} to answer {path}")


def create_run(tmp: Path) -> Run:
    from aios import migrate
    from aios.config import load_settings

    base_url = driver_url(os.environ.get("AIOS_DATABASE__URL", DEFAULT_DB))
    token = uuid.uuid4().hex[:8]
    schema = f"aios_bench_{token}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        pg_version = connection.execute(sa.text("SHOW server_version")).scalar()
    url = f"{base_url}{'&' if '?' in base_url else '?'}options=-csearch_path%3D{schema}"
    prefix = f"aios-bench-{token}:"
    namespace = f"b{token}"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOS_")}
    env.update(
        {
            "AIOS_CONFIG": str(REPO_ROOT / "config" / "aios.toml"),
            "AIOS_DATABASE__URL": url,
            "AIOS_BROKER__URL": os.environ.get("AIOS_BROKER__URL", DEFAULT_BROKER),
            "AIOS_BROKER__KEY_PREFIX": prefix,
            "AIOS_BROKER__NAMESPACE": namespace,
            "AIOS_SECURITY__JWT_SECRET": f"bench-{uuid.uuid4().hex}{uuid.uuid4().hex}",
            # A benchmark would otherwise measure the per-key rate limiter's 429s (300 writes a minute).
            "AIOS_SECURITY__RATE_LIMIT_WRITE_PER_MINUTE": "100000000",
            "AIOS_SECURITY__RATE_LIMIT_READ_PER_MINUTE": "100000000",
            "AIOS_ORCHESTRATOR__MAX_AGENTS": "0",
            "AIOS_LOGGING__LEVEL": "WARNING",
            "AIOS_LOGGING__DIR": str(tmp / "logs"),
            "AIOS_METRICS__MULTIPROC_DIR": str(tmp / "prometheus"),
            "AIOS_BACKUP__DIR": str(tmp / "backups"),
            "AIOS_BACKUP__SCHEDULE": "",
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
        }
    )
    settings = load_settings(environ=env)
    migrate.upgrade(settings.database)
    return Run(
        schema=schema,
        prefix=prefix,
        namespace=namespace,
        env=env,
        settings=settings,
        tmp=tmp,
        admin_engine=admin,
        pg_version=str(pg_version),
    )


def destroy_run(run: Run) -> None:
    from aios.db import dispose_engines

    run.stop_all()
    dispose_engines()
    with run.admin_engine.connect() as connection:
        connection.execute(sa.text(f'DROP SCHEMA "{run.schema}" CASCADE'))
    run.admin_engine.dispose()
    try:
        client = run.redis()
        keys = list(client.scan_iter(match=f"{run.prefix}*", count=5000))
        for start in range(0, len(keys), 5000):
            client.delete(*keys[start : start + 5000])
    except Exception:  # noqa: BLE001
        pass


def iter_chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} CPU ({cpu}), {mem:.0f} GiB RAM, "
        f"Python {platform.python_version()}"
    )


# --------------------------------------------------------------------------- results


@dataclass
class Figure:
    """One row of the summary table and its section in BENCHMARKS.md."""

    name: str
    aios: str
    comparison: str
    ratio: str
    target: str
    met: bool | None
    command: str
    details: str
    note: str = ""


def met_text(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


class FakeAgent:
    """An agent row with a fresh heartbeat and no process behind it: submits are routed and published
    to its queue (as with a live agent) while no worker competes for the two cores being measured."""

    def __init__(self, run: Run, name: str = "bench-fake@bench") -> None:
        self.run, self.name = run, name
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> FakeAgent:
        from aios.models import Agent
        from aios.timeutil import utcnow

        now = utcnow()
        with self.run.engine().begin() as connection:
            connection.execute(
                sa.insert(Agent),
                [
                    {
                        "name": self.name,
                        "capabilities": ["echo", "sleep"],
                        "labels": {},
                        "weight": 1,
                        "max_concurrency": 2,
                        "admin_status": "ACTIVE",
                        "status": "ONLINE",
                        "status_reason": None,
                        "last_heartbeat_at": now,
                        "resources": None,
                        "active": 0,
                        "processed": 0,
                        "registered_at": now,
                        "updated_at": now,
                    }
                ],
            )
        self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.stopping.wait(1.0):
            self.run.execute("UPDATE agents SET last_heartbeat_at = now() WHERE name = :n", n=self.name)

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.run.execute("UPDATE agents SET status = 'OFFLINE', admin_status = 'DISABLED' WHERE name = :n", n=self.name)
        from aios.agents.registry import agent_queue

        # Its tasks will never run: cancel them, so no later figure counts them as a backlog.
        self.run.execute(
            "UPDATE tasks SET state = 'CANCELLED', finished_at = now() WHERE state = 'QUEUED' AND queue = :q",
            q=agent_queue(self.name),
        )
        from aios.agents.registry import forget_healthy_cache

        forget_healthy_cache()
        # What was published to its queue is nobody's work: drop it so later figures start clean.
        client = self.run.redis()
        for key in client.scan_iter(match=f"{self.run.prefix}*fake*", count=1000):
            client.delete(key)


# --------------------------------------------------------------------------- raw Celery


def start_raw_worker(run: Run, name: str, queue: str, *, events: bool = False, concurrency: int = 2) -> Proc:
    """``celery -A bench.rawapp worker -P prefork -c 2`` with Celery's defaults (events only if asked)."""
    argv = [
        str(BIN / "celery"),
        "-A",
        "bench.rawapp",
        "worker",
        "-P",
        "prefork",
        "-c",
        str(concurrency),
        "-Q",
        queue,
        "-n",
        f"{name}@bench",
        "--loglevel=INFO",
    ]
    if events:
        argv.append("-E")
    proc = run.spawn(name, argv, run.raw_env(queue))
    wait_for(
        lambda: proc.alive() and " ready." in proc.log() or (not proc.alive() and _raise(proc)),
        90,
        0.1,
        f"raw worker {name}",
    )
    return proc


def _raise(proc: Proc) -> bool:
    raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")


def raw_app(run: Run, queue: str) -> Any:
    """bench/rawapp.py's app configured for this run (it reads the environment at import)."""
    os.environ.update(run.raw_env(queue))
    import importlib

    import bench.rawapp as rawapp

    return importlib.reload(rawapp)


def wait_results(run: Run, ids: list[str], prefix: str, timeout: float) -> None:
    """Until every id has a SUCCESS result in the Redis result backend (MGET in chunks)."""
    client = run.redis()
    remaining = list(ids)
    deadline = time.monotonic() + timeout
    while remaining:
        left = []
        for chunk in iter_chunks(remaining, 2000):
            values = client.mget([f"{prefix}celery-task-meta-{i}" for i in chunk])
            left += [i for i, v in zip(chunk, values, strict=True) if v is None or b'"SUCCESS"' not in v]
        remaining = left
        if remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(remaining)} raw Celery tasks not done after {timeout}s")
            time.sleep(0.1)


def submit_batches(
    client: Client, count: int, *, priority: int | None = None, batch: int = 1000, task_type: str = "echo"
) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, batch):
        size = min(batch, count - start)
        item: dict[str, Any] = {"type": task_type, "parameters": {}}
        if priority is not None:
            item["priority"] = priority
        answer = client.json("POST", "/api/v1/tasks/batch", {"tasks": [item] * size})
        ids += answer["ids"]
    return ids
