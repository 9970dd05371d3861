"""Database backups: take one, list them, verify a file, restore it; retention.

A backup is one file in ``backup.dir``: ``pg_dump --format=custom`` on PostgreSQL, a copy made with
SQLite's online backup API on the embedded default. Either is taken while AIOS runs and is a
consistent snapshot (pg_dump runs in one repeatable-read transaction; the SQLite backup API copies
a consistent set of pages). Beside each file is ``<file>.sha256`` in ``sha256sum`` format, so
``sha256sum -c`` checks it without AIOS, and each attempt — good or failed — is a ``backups`` row.

Promises:

* A file appears under its final name only when it is complete (written to a hidden temporary name,
  fsynced, then renamed), so a crash never leaves a half-written file that looks like a backup.
* A failed attempt is never silent: it is a ``failed`` row with the error, an ERROR log line, the
  ``aios_backups_total{status="failed"}`` counter, and :class:`~aios.errors.BackupFailed` to the caller.
* Retention keeps the newest ``backup.keep`` good backups in ``backup.dir``; older files and their
  ``.sha256`` are deleted and their rows marked ``deleted``.
* Restore verifies the file first and refuses a target that holds any tasks or users unless forced.
  On PostgreSQL it runs in one transaction: the target is either untouched or fully restored.

On PostgreSQL, when the database URL sets a ``search_path`` (``?options=-csearch_path%3Dname``), only
that schema is dumped, and a restore puts the tables into the target URL's schema.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

from sqlalchemy import Connection, create_engine, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from aios.config import Settings
from aios.db import libpq_connect_args, libpq_params, session_scope
from aios.errors import BackupFailed, BackupInvalid, Conflict
from aios.models import Backup
from aios.timeutil import isoformat, utcnow

logger = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
PGDUMP_MAGIC = b"PGDMP"
#: Tables whose rows make a database "not empty" for restore.
GUARDED_TABLES = ("tasks", "users")
#: Longest error text stored in a row or shown to a client.
MAX_ERROR_CHARS = 2000


def backup_to_dict(row: Backup) -> dict[str, Any]:
    return {
        "id": row.id,
        "created_at": isoformat(row.created_at),
        "path": row.path,
        "file": Path(row.path).name if row.path else None,
        "kind": row.kind,
        "size_bytes": row.size_bytes,
        "sha256": row.sha256,
        "status": row.status,
        "error": row.error,
    }


def dialect_of(settings: Settings) -> str:
    return "sqlite" if settings.database.is_sqlite else "postgresql"


def sha256_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# --------------------------------------------------------------------------- create


def create_backup(settings: Settings) -> dict[str, Any]:
    """Take one backup of the configured database, record it, apply retention; return its row.

    Raises :class:`BackupFailed` (after recording the failure) when no good backup was made.
    """
    kind = dialect_of(settings)
    directory = Path(settings.backup.dir).expanduser().resolve()
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    final = directory / f"aios-{kind}-{stamp}-{uuid.uuid4().hex[:6]}.{'sqlite3' if kind == 'sqlite' else 'dump'}"
    started = time.monotonic()
    try:
        digest, size = _write_backup(settings, final)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, counted and re-raised below
        _fail(settings, kind, final, _describe(exc))
    try:
        with session_scope(settings.database) as session:
            row = Backup(path=str(final), kind=kind, size_bytes=size, sha256=digest, status="ok", created_at=utcnow())
            session.add(row)
            session.flush()
            result = backup_to_dict(row)
    except Exception as exc:  # noqa: BLE001 - a file nobody knows of is not a backup: remove it
        final.unlink(missing_ok=True)
        sha256_path(final).unlink(missing_ok=True)
        _fail(settings, kind, final, f"the backup was written but its row could not be: {_describe(exc)}", record=False)
    logger.info("backup %s written (%d bytes, %.1fs)", final, size, time.monotonic() - started)
    try:
        apply_retention(settings)
    except Exception:  # noqa: BLE001 - the backup is good; a retention problem must not hide that
        logger.exception("backup retention in %s failed", directory)
    return result


def _fail(settings: Settings, kind: str, final: Path, error: str, *, record: bool = True) -> NoReturn:
    """Record, log and count a failed attempt, then raise BackupFailed (never returns)."""
    error = error[:MAX_ERROR_CHARS]
    logger.error("backup to %s failed: %s", final, error)
    row: dict[str, Any] | None = None
    if record:
        try:
            with session_scope(settings.database) as session:
                failed = Backup(path=str(final), kind=kind, status="failed", error=error, created_at=utcnow())
                session.add(failed)
                session.flush()
                row = backup_to_dict(failed)
        except Exception as exc:  # noqa: BLE001 - the failure is still logged, counted and raised
            logger.error("could not record the failed backup either: %s", _describe(exc))
    raise BackupFailed(f"backup failed: {error}", backup=row)


def _write_backup(settings: Settings, final: Path) -> tuple[str, int]:
    # A dump is the whole ledger (password hashes, API key hashes, results): the directory is 700
    # and each file 600, owned by the agent's user; a command's user reads neither (docs/security.md).
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = final.with_name(f".{final.name}.partial")
    try:
        if settings.database.is_sqlite:
            _sqlite_copy(
                _sqlite_path(settings), partial, busy_timeout_s=settings.database.sqlite_busy_timeout_s, standalone=True
            )
        else:
            _pg_dump(settings, partial)
        os.chmod(partial, 0o600)
        _fsync(partial)
        digest, size = file_sha256(partial), partial.stat().st_size
        if size == 0:
            raise BackupFailed("the dump is empty")
        _atomic_write(sha256_path(final), f"{digest}  {final.name}\n")
        os.replace(partial, final)
        _fsync(final.parent)
        return digest, size
    finally:
        partial.unlink(missing_ok=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BackupFailed | BackupInvalid | Conflict):
        return exc.message.removeprefix("backup failed: ")
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- retention and listing


def apply_retention(settings: Settings) -> list[str]:
    """Delete the good backups in ``backup.dir`` past the newest ``backup.keep``; return their paths."""
    directory = Path(settings.backup.dir).expanduser().resolve()
    prefix = str(directory) + os.sep
    with session_scope(settings.database) as session:
        rows = session.execute(
            select(Backup.id, Backup.path)
            .where(Backup.status == "ok", Backup.path.startswith(prefix, autoescape=True))
            .order_by(Backup.created_at.desc(), Backup.id.desc())
        ).all()
    removed: list[str] = []
    for row_id, path in rows[settings.backup.keep :]:
        assert path is not None  # the query matched it with startswith(prefix)
        try:
            Path(path).unlink(missing_ok=True)
            sha256_path(Path(path)).unlink(missing_ok=True)
        except OSError as exc:
            logger.error("retention could not delete backup %s: %s", path, exc)
            continue
        with session_scope(settings.database) as session:
            session.execute(update(Backup).where(Backup.id == row_id, Backup.status == "ok").values(status="deleted"))
        removed.append(path)
        logger.info("retention deleted backup %s (keeping the newest %d)", path, settings.backup.keep)
    return removed


def list_backups(settings: Settings, *, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` backup rows (good, failed and deleted), newest first."""
    with session_scope(settings.database) as session:
        rows = session.scalars(select(Backup).order_by(Backup.created_at.desc(), Backup.id.desc()).limit(limit))
        return [backup_to_dict(row) for row in rows]


# --------------------------------------------------------------------------- verify


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_kind(path: Path) -> str | None:
    with path.open("rb") as handle:
        head = handle.read(len(SQLITE_MAGIC))
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if head.startswith(PGDUMP_MAGIC):
        return "postgresql"
    return None


def verify_backup(path: str | Path, settings: Settings) -> dict[str, Any]:
    """Check a backup file against its ``.sha256`` and that it is a readable dump.

    Raises :class:`BackupInvalid` naming the problem; returns what was checked.
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise BackupInvalid(f"{file}: no such backup file")
    checksum = sha256_path(file)
    if not checksum.is_file():
        raise BackupInvalid(f"{file}: {checksum.name} is missing beside it, so the file cannot be verified")
    fields = checksum.read_text(errors="replace").split()
    expected = fields[0].lower() if fields else ""
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise BackupInvalid(f"{checksum}: not a sha256sum line")
    actual = file_sha256(file)
    if actual != expected:
        raise BackupInvalid(f"{file}: sha256 is {actual}, but {checksum.name} says {expected}: the file is damaged")
    kind = file_kind(file)
    if kind == "sqlite":
        _sqlite_integrity_check(file)
    elif kind == "postgresql":
        _pg_restore_list(file, settings)
    else:
        raise BackupInvalid(f"{file}: neither a pg_dump custom-format archive nor a SQLite database")
    return {"path": str(file), "kind": kind, "sha256": actual, "size_bytes": file.stat().st_size, "ok": True}


# --------------------------------------------------------------------------- restore


def restore_backup(path: str | Path, settings: Settings, *, force: bool = False) -> dict[str, Any]:
    """Restore a verified backup into the configured database.

    The target must hold no tasks and no users, unless ``force``: then its contents are replaced.
    """
    checked = verify_backup(path, settings)
    file = Path(checked["path"])
    target = dialect_of(settings)
    if checked["kind"] != target:
        raise BackupInvalid(f"{file} is a {checked['kind']} backup; the configured database is {target}")
    counts = _guarded_counts(settings)
    if any(counts.values()) and not force:
        held = ", ".join(f"{count} {table}" for table, count in counts.items())
        raise Conflict(
            f"the target database is not empty ({held}): restore into an empty database, "
            "or pass --force to replace its contents"
        )
    started = time.monotonic()
    if target == "sqlite":
        _sqlite_copy(
            file, _sqlite_path(settings), busy_timeout_s=settings.database.sqlite_busy_timeout_s, standalone=False
        )
    else:
        _pg_restore(file, settings)
    logger.warning(
        "database restored from %s (%s, forced=%s) in %.1fs", file, checked["sha256"], force, time.monotonic() - started
    )
    return {**checked, "restored": True, "replaced": counts}


def _guarded_counts(settings: Settings) -> dict[str, int]:
    """Rows in the guarded tables of the target (a missing table counts as empty)."""
    with _scratch_connection(settings) as connection:
        counts = {}
        for table in GUARDED_TABLES:
            if settings.database.is_sqlite:
                exists = connection.execute(
                    text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name"), {"name": table}
                ).first()
            else:
                exists = connection.execute(text("SELECT to_regclass(:name)"), {"name": table}).scalar()
            counts[table] = connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() if exists else 0
        return counts


@contextmanager
def _scratch_connection(settings: Settings) -> Iterator[Connection]:
    """A connection of its own (no pool), so a restore's checks never hold a pooled one open; on
    PostgreSQL to the primary only (``target_session_attrs=read-write``), where pg_restore writes."""
    if settings.database.is_sqlite:
        if not _sqlite_path(settings).exists():
            engine = create_engine("sqlite://", poolclass=NullPool)  # no file yet: empty
        else:
            engine = create_engine(settings.database.url, poolclass=NullPool)
    else:
        engine = create_engine(
            settings.database.url,
            poolclass=NullPool,
            hide_parameters=True,
            connect_args=libpq_connect_args(settings.database.url, target_session_attrs="read-write"),
        )
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- SQLite


def _sqlite_path(settings: Settings) -> Path:
    database = make_url(settings.database.url).database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        raise BackupFailed(
            f"cannot back up or restore the SQLite database {database or '(in memory)'!r}: set database.url to a file"
        )
    return Path(database).expanduser().resolve()


def _sqlite_copy(source: Path, destination: Path, *, busy_timeout_s: float, standalone: bool) -> None:
    """Copy one SQLite database onto another with the online backup API (safe while either is in use).

    ``standalone``: the copy is a backup file, switched out of WAL so it needs no -wal/-shm beside it.
    A restored live database keeps its journal mode (AIOS's connections open it in WAL).
    """
    if not source.is_file():
        raise BackupFailed(f"the SQLite database {source} does not exist")
    destination.parent.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(source, timeout=busy_timeout_s)
    try:
        dst = sqlite3.connect(destination, timeout=busy_timeout_s)
        try:
            src.backup(dst)
            if standalone:
                dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()


def _sqlite_integrity_check(file: Path) -> None:
    try:
        connection = sqlite3.connect(f"file:{quote(str(file))}?mode=ro&immutable=1", uri=True)
        try:
            result = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise BackupInvalid(f"{file}: not a readable SQLite database ({exc})") from exc
    if result != ["ok"]:
        raise BackupInvalid(f"{file}: SQLite integrity_check failed: {'; '.join(result)[:500]}")


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class PgTarget:
    """How pg_dump/pg_restore reach the configured database: one libpq conninfo, the password apart.

    The conninfo is the one SQLAlchemy's psycopg2 dialect builds from the URL, so pg_dump connects
    where the engines connect: every host of a multi-host URL (``?host=h1:5432&host=h2:5432``, libpq's
    ``host=h1,h2 port=5432,5432``), with its ``target_session_attrs`` and TLS settings. The password
    goes in ``PGPASSWORD``, never on the command line. The URL's ``options`` are left out (a
    ``statement_timeout`` there must not cut a dump short); its search_path picks the schema instead."""

    #: libpq parameters without the password (``host``, ``port``, ``dbname``, ``user``, ``sslmode``, ...).
    params: dict[str, str]
    password: str | None
    #: The first schema of the URL's search_path, or None when the URL sets none.
    schema: str | None

    @classmethod
    def from_url(cls, url_text: str) -> PgTarget:
        params, password = libpq_params(url_text)
        return cls(params=params, password=password, schema=search_path_schema(params.pop("options", "")))

    @property
    def dbname(self) -> str:
        return self.params.get("dbname", "")

    def primary(self) -> PgTarget:
        """This target, connecting only to a server that takes writes (what a restore must reach)."""
        return PgTarget({**self.params, "target_session_attrs": "read-write"}, self.password, self.schema)

    def conninfo(self) -> str:
        from psycopg2.extensions import make_dsn  # local: only PostgreSQL backups need the driver

        return make_dsn(**self.params)

    def args(self) -> list[str]:
        return ["--no-password", "--dbname", self.conninfo()]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        return env


def search_path_schema(options: str) -> str | None:
    """The first schema named by ``-c search_path=...`` in libpq ``options``, if any."""
    match = re.search(r"-c\s*search_path\s*=\s*([^\s]+)", options)
    if not match:
        return None
    first = match.group(1).split(",")[0].strip().strip('"')
    return first or None


def _run(argv: list[str], env: dict[str, str], what: str) -> str:
    try:
        completed = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise BackupFailed(
            f"{argv[0]} not found: install the PostgreSQL client (postgresql-client) or set backup.{what} to its path"
        ) from exc
    except PermissionError as exc:
        raise BackupFailed(f"{argv[0]} cannot be run: {exc}") from exc
    if completed.returncode != 0:
        detail = " ".join(completed.stderr.split())[-MAX_ERROR_CHARS:] or "no message"
        raise BackupFailed(f"{Path(argv[0]).name} exited with status {completed.returncode}: {detail}")
    return completed.stdout


def _pg_dump(settings: Settings, partial: Path) -> None:
    target = PgTarget.from_url(settings.database.url)
    argv = [settings.backup.pg_dump, "--format=custom", "--file", str(partial), *target.args()]
    if target.schema:
        argv += ["--schema", target.schema]
    _run(argv, target.env(), "pg_dump")


def _pg_restore_list(file: Path, settings: Settings) -> str:
    try:
        return _run([settings.backup.pg_restore, "--list", str(file)], dict(os.environ), "pg_restore")
    except BackupFailed as exc:
        raise BackupInvalid(f"{file}: not a readable pg_dump archive ({exc.message})") from exc


def dump_schemas(file: Path, settings: Settings) -> set[str]:
    """The schemas that hold the tables of a pg_dump archive (read from its table of contents)."""
    schemas = set()
    for line in _pg_restore_list(file, settings).splitlines():
        match = re.match(r"^\d+; \d+ \d+ TABLE (\S+) (\S+) (\S+)$", line.strip())
        if match:
            schemas.add(match.group(1))
    return schemas


#: Extensions an archive's index needs that a one-schema dump leaves out (pg_dump --schema dumps no
#: extension): the task search index uses pg_trgm's operator class (migration 0007), in schema public,
#: and, keyed by creation hour (migration 0009), btree_gin's default one for timestamptz. Creating
#: btree_gin where the dump's index does not use it costs nothing.
_INDEX_EXTENSIONS = {"ix_tasks_search_trgm": ("pg_trgm", "btree_gin")}


def _create_extensions(file: Path, settings: Settings) -> None:
    """Create in the target, as migration 0007 does, the extensions the archive's indexes need; where this
    role may not, pg_restore then fails naming the missing operator class (docs/backup.md)."""
    listing = _pg_restore_list(file, settings)
    for index, extensions in _INDEX_EXTENSIONS.items():
        if not re.search(rf"^\d+; \d+ \d+ INDEX \S+ {re.escape(index)} ", listing, re.MULTILINE):
            continue
        for extension in extensions:
            try:
                with _scratch_connection(settings) as connection:
                    connection.execute(text(f"CREATE EXTENSION IF NOT EXISTS {extension} SCHEMA public"))
            except Exception as exc:  # noqa: BLE001 - pg_restore reports what is missing
                logger.warning("restore: %s could not be created in the target (%s)", extension, _describe(exc))


def _pg_restore(file: Path, settings: Settings) -> None:
    """pg_restore in one transaction, into the target URL's schema (renaming the dump's if they differ).

    Only ever into the primary: ``target_session_attrs=read-write`` whatever the URL says."""
    target = PgTarget.from_url(settings.database.url).primary()
    wanted = target.schema or "public"
    schemas = dump_schemas(file, settings)
    _create_extensions(file, settings)
    base = [
        settings.backup.pg_restore,
        "--single-transaction",
        "--exit-on-error",
        "--no-owner",
        "--no-privileges",
        *target.args(),
    ]
    if schemas <= {wanted}:
        _run([*base, "--clean", "--if-exists", str(file)], target.env(), "pg_restore")
        return
    if len(schemas) != 1 or target.schema is None:
        raise BackupInvalid(
            f"{file} holds schemas {', '.join(sorted(schemas))}; the target database's search_path "
            f"is {wanted}: set options=-csearch_path%3D<schema> in database.url to the one to fill"
        )
    (source,) = schemas
    with _scratch_connection(settings) as connection:
        if connection.execute(text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": source}).first():
            raise Conflict(
                f"{file} holds schema {source}, which already exists in the target database: to restore "
                f"it as schema {wanted}, restore into a database without a schema {source}"
            )
    # The dump creates its own schema (it did not exist: checked above); then, in one transaction, the
    # target schema is replaced by it. Until that commits the target is untouched.
    _run([*base, str(file)], target.env(), "pg_restore")
    try:
        with _scratch_connection(settings) as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {_ident(wanted)} CASCADE"))
            connection.execute(text(f"ALTER SCHEMA {_ident(source)} RENAME TO {_ident(wanted)}"))
    except Exception as exc:
        with _scratch_connection(settings) as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {_ident(source)} CASCADE"))
        raise BackupFailed(f"restored schema {source} could not be renamed to {wanted}: {_describe(exc)}") from exc


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --------------------------------------------------------------------------- files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, content: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
