"""``aios up``: the API, one agent and beat as child processes of one supervisor.

For a laptop or a demo. The supervisor runs in the foreground, or (``--detach``) in the background with
its children's output in ``logs/``; :mod:`aios.ops.services` has the pid file and what ``down``, ``ps``
and ``logs`` read. Either way, before the children start it migrates (if asked), creates the first
admin and the API key of the ``try:`` hint, so the printed ``curl`` works as printed.

Ctrl-C or SIGTERM stops the children cleanly (SIGTERM, then SIGKILL after a grace period); each
child also gets SIGTERM from the kernel if this process dies without cleaning up
(``PR_SET_PDEATHSIG``), so no orphans are left either way. If one child exits on its own, the others
are stopped too and ``aios up`` exits non-zero.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from aios.config import Settings, redact_url
from aios.errors import NotFound
from aios.ops import services
from aios.security.secrets import ensure_secret_file

logger = logging.getLogger(__name__)

#: Seconds children get to finish after SIGTERM before they are killed.
STOP_GRACE_S = 20.0
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "aios.cli", *args]


@dataclass(frozen=True)
class UpOptions:
    """How ``aios up`` runs (see :mod:`aios.ops.services` for the pid file and the logs)."""

    migrate_first: bool = False
    agent_name: str = "agent-1"
    pid_file: Path = Path(services.DEFAULT_PID_FILE)
    log_dir: Path = Path(services.DEFAULT_LOG_DIR)
    #: The detached supervisor: each child's output goes to ``log_dir/<name>.log``, not to ours.
    to_log_files: bool = False


def api_url(settings: Settings) -> str:
    # The API child reads the same [api] tls_* settings, so HTTPS needs nothing more than the scheme here.
    return f"{'https' if settings.api.tls_enabled else 'http'}://{settings.api.host}:{settings.api.port}"


def api_trust(settings: Settings) -> str | None:
    """The certificate a client must trust to reach this API: ``[api] tls_cert`` when self-signed."""
    from aios.security.certs import trust_for

    return trust_for(settings.api.tls_cert) if settings.api.tls_enabled else None


def prepare(settings: Settings, options: UpOptions) -> dict[str, str]:
    """Everything before the children start, in the foreground (so a detached start still shows the
    admin password and the hint on the terminal): migrate, create the first admin and the hint's key.
    Returns the children's environment."""
    if options.migrate_first:
        from aios import migrate

        migrate.upgrade(settings.database)
    from aios.db import ensure_migrated

    ensure_migrated(settings.database)
    child_env = dict(os.environ)
    if settings.security.jwt_secret is None and settings.security.jwt_secret_file is None:
        # The embedded default makes its own signing key once, kept beside the database.
        secret_file = ensure_secret_file(state_dir(settings) / "jwt_secret")
        child_env["AIOS_SECURITY__JWT_SECRET_FILE"] = str(secret_file.resolve())
    bootstrap_admin(settings)
    return child_env


def state_dir(settings: Settings) -> Path:
    """Where ``aios up`` keeps what it makes for itself (the embedded default's JWT key, the hint's API
    key): beside the embedded broker's files, ``var/`` by default."""
    return Path(settings.broker.data_dir).parent


def hint(settings: Settings) -> str:
    """The lines printed once AIOS is up: a command that works as printed (it reads the API key
    :func:`ensure_hint_key` keeps in a file, so nothing secret is printed or logged)."""
    url = api_url(settings)
    key_file = ensure_hint_key(settings)
    if key_file is None:
        auth = "-H 'Authorization: Bearer <token>'   (no user 'admin' to make a key for: log in first)"
    else:
        auth = f'-H "X-API-Key: $(cat {key_file.resolve()})"'
    trust = api_trust(settings)
    if trust:
        auth = f"--cacert {Path(trust).resolve()} {auth}"
    return (
        f"AIOS is up: API {url}  (database {redact_url(settings.database.url)}, "
        f"broker {redact_url(settings.broker.url)})\n"
        f"  try: curl -sS --fail-with-body -X POST {url}/api/v1/tasks {auth} "
        '-H \'Content-Type: application/json\' -d \'{"type":"echo","parameters":{"x":1}}\''
    )


def run_all_in_one(settings: Settings, options: UpOptions) -> int:
    """``aios up``: the supervisor, in the foreground or (``to_log_files``) as the detached one."""
    pid_file = services.PidFile(options.pid_file)
    try:
        pid_file.claim()
    except services.AlreadyRunning as exc:
        print(f"aios: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        child_env = prepare(settings, options) if not options.to_log_files else dict(os.environ)
        text = hint(settings) if not options.to_log_files else ""
        return _supervise(settings, options, pid_file, child_env, text)
    finally:
        pid_file.release()


def start_detached(settings: Settings, options: UpOptions, *, wait_s: float) -> int:
    """``aios up --detach``: prepare in the foreground, start the supervisor in a session of its own
    (output in ``log_dir/up.log``), and return 0 once every child is up and healthy (what ``aios ps``
    checks). 1 if another ``aios up`` runs from the same pid file, or if the start fails or does not
    become healthy within ``wait_s`` (then what was started is stopped again)."""
    found = services.find(options.pid_file)
    if found.status == "running":
        print(f"aios: {services.AlreadyRunning(options.pid_file, found.pid)}", file=sys.stderr)
        return 1
    if found.status == "stale":
        killed = services.clean_stale(found)
        print(
            f"removed the stale pid file {options.pid_file} (supervisor pid {found.pid} was gone"
            + (f"; killed its leftover processes {killed})" if killed else ")"),
            flush=True,
        )
    child_env = prepare(settings, options)
    text = hint(settings)
    options.log_dir.mkdir(parents=True, exist_ok=True)
    argv = _command("up", "--supervise", "--agent-name", options.agent_name)
    argv += ["--pid-file", str(options.pid_file), "--log-dir", str(options.log_dir)]
    with (options.log_dir / f"{services.SUPERVISOR_LOG}.log").open("ab") as log:
        supervisor = subprocess.Popen(
            argv, env=child_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + wait_s
    while True:
        code = supervisor.poll()
        if code is not None:
            tail = "\n".join(services.last_lines(options.log_dir / f"{services.SUPERVISOR_LOG}.log", 20))
            print(f"aios: the detached aios up exited with status {code}; the end of its log:\n{tail}", file=sys.stderr)
            return 1
        found = services.find(options.pid_file)
        rows = services.health(settings, found) if found.status == "running" else []
        if len(rows) == 1 + len(services.CHILD_NAMES) and all(row.healthy for row in rows):
            break
        if time.monotonic() > deadline:
            print(
                f"aios: not healthy after {wait_s:.0f}s, stopping it again:\n{services.render(found, rows)}",
                file=sys.stderr,
            )
            services.stop(found, services.DOWN_GRACE_S)
            return 1
        time.sleep(0.25)
    supervisor.returncode = 0  # it is no child of ours to wait for: it outlives this process on purpose
    print(
        f"\n{text}\n  running in the background: supervisor pid {supervisor.pid}, pid file {options.pid_file}, "
        f"logs in {options.log_dir}/\n  see: aios ps · aios logs -f · stop: aios down\n",
        flush=True,
    )
    return 0


def _supervise(
    settings: Settings, options: UpOptions, pid_file: services.PidFile, child_env: dict[str, str], text: str
) -> int:
    children = [
        Child("api", _command("api")),
        Child("agent", _command("worker", "--name", options.agent_name)),
        Child("beat", _command("beat")),
    ]
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    state = services.UpState(
        supervisor=services.ProcessRef.of("up", os.getpid()),
        url=api_url(settings),
        ca_file=api_trust(settings),
        agent_name=options.agent_name,
        log_dir=str(options.log_dir.resolve()),
    )
    for child in children:
        output = None
        if options.to_log_files:
            options.log_dir.mkdir(parents=True, exist_ok=True)
            output = (options.log_dir / f"{child.name}.log").open("ab")
            child_env["PYTHONUNBUFFERED"] = "1"  # so `aios logs -f` shows lines as they are written
        try:
            child.process = subprocess.Popen(  # noqa: PLW1509 - preexec only sets PDEATHSIG
                child.argv,
                preexec_fn=preexec,
                env=child_env,
                stdin=subprocess.DEVNULL if options.to_log_files else None,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
            )
        finally:
            if output is not None:
                output.close()
        state.children.append(services.ProcessRef.of(child.name, child.process.pid))
        logger.info("started %s (pid %d)", child.name, child.process.pid)
    pid_file.write_state(state)
    if text:
        print(f"\n{text}\n  stop: Ctrl-C\n", flush=True)
    exit_code = 0
    while not stopping:
        for child in children:
            assert child.process is not None
            code = child.process.poll()
            if code is not None:
                logger.error("%s exited with status %s; stopping the others", child.name, code)
                exit_code = code or 1
                stopping = True
                break
        time.sleep(0.2)
    _stop(children)
    return exit_code


def bootstrap_admin(settings: Settings) -> None:
    """On first start (no users yet) create the user ``admin``.

    Its password is ``AIOS_ADMIN_PASSWORD`` if set, else a random one printed here once.
    """
    from aios.db import session_scope
    from aios.security.users import count_users, create_user

    with session_scope(settings.database) as session:
        if count_users(session):
            return
        given = os.environ.get("AIOS_ADMIN_PASSWORD")
        password = given or secrets.token_urlsafe(18)
        create_user(session, "admin", password, "admin", bcrypt_cost=settings.security.bcrypt_cost)
    if given:
        print("created the first user 'admin' with the password from AIOS_ADMIN_PASSWORD", flush=True)
    else:
        print(f"\ncreated the first user 'admin'; its password (shown once): {password}\n", flush=True)


#: The file (in :func:`state_dir`) holding the API key the hint uses, and that key's name and role.
HINT_KEY_FILE = "api_key"
HINT_KEY_NAME = "aios-up"
HINT_KEY_ROLE = "operator"


def ensure_hint_key(settings: Settings) -> Path | None:
    """The file holding a working API key of the user ``admin`` (role operator), made once (mode 600)
    and made again if its key no longer works (revoked, expired, another database). None when there is
    no user ``admin`` to own it. The key is audited as ``key.create`` by ``aios up``, like one made
    over the API."""
    from aios.db import get_engine, session_scope
    from aios.security import api_keys, audit
    from aios.security.users import get_user

    path = state_dir(settings) / HINT_KEY_FILE
    if path.exists():
        with get_engine(settings.database).begin() as connection:
            if api_keys.authenticate(connection, path.read_text(encoding="utf-8").strip(), source_ip=None):
                return path
    with session_scope(settings.database) as session:
        try:
            owner = get_user(session, "admin")
        except NotFound:
            return None
        key = api_keys.generate(session, name=HINT_KEY_NAME, role=HINT_KEY_ROLE, owner_id=owner.id, expires_at=None)
        audit.record(
            session,
            principal="aios up",
            role=None,
            source_ip=None,
            action="key.create",
            target=key.row.id,
            outcome=audit.SUCCESS,
            detail={"name": HINT_KEY_NAME, "role": HINT_KEY_ROLE, "owner": "admin"},
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(key.plaintext + "\n")
    return path


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child and its descendants: PDEATHSIG covers only our direct children, so killing an
    API master alone would orphan a gunicorn worker it had not yet reaped."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    process.kill()
    for descendant in descendants:
        try:
            descendant.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(descendants, timeout=5)


def _stop(children: list[Child]) -> None:
    for child in children:
        if child.process and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0fs; killing it and every process under it", child.name, STOP_GRACE_S)
            _kill_tree(child.process)
    logger.info("all processes stopped")
