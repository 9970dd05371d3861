"""Backups: a round trip on PostgreSQL and on SQLite restores every task row and event exactly;
``verify`` catches a flipped byte and a file that is not a dump; retention keeps exactly ``keep``
files; restore refuses a database that is not empty unless forced; the CLI's exit codes; the API
(admin only); and a failed backup is a row, an ERROR log line, a metric and a 5xx, never silent.

Real PostgreSQL (the session's schema as the source, fresh databases as restore targets), real
pg_dump/pg_restore, real SQLite files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.pool import NullPool

from aios import migrate
from aios.config import Settings, load_settings
from aios.db import session_scope
from aios.errors import BackupFailed, BackupInvalid, Conflict
from aios.models import Backup, Task, TaskEvent
from aios.ops.backup import create_backup, list_backups, restore_backup, sha256_path, verify_backup
from aios.ops.cluster_metrics import ClusterCollector
from aios.tasks.create import create_tasks
from aios.tasks.spec import TaskSpec
from aios.tasks.states import TaskState, transition_many
from tests.conftest import PG_URL, REPO_ROOT, Stack, authorize, make_user

pytestmark = pytest.mark.integration

TASKS = 1000


# --------------------------------------------------------------------------- helpers


def add_tasks(settings: Settings, count: int, tag: str) -> list[str]:
    """``count`` tasks, each with its creation event; half of them also move to QUEUED (a second event)."""
    specs = [
        TaskSpec(
            type="echo",
            parameters={"tag": tag, "i": i, "text": f"héllo {i}"},
            priority=i % 10,
            max_retries=i % 4,
            timeout_s=60,
            queue="backup-test",
        )
        for i in range(count)
    ]
    ids = create_tasks(None, settings, specs, actor="test-backup", publish=False).ids
    with session_scope(settings.database) as session:
        transition_many(
            session, ids[::2], TaskState.PENDING, TaskState.QUEUED, actor="test-backup", detail={"why": "round trip"}
        )
    return ids


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of tasks and task_events, all columns, in a stable order (its own connection, no pool)."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return {
                "tasks": [tuple(row) for row in connection.execute(sa.select(Task.__table__).order_by(Task.id))],
                "task_events": [
                    tuple(row) for row in connection.execute(sa.select(TaskEvent.__table__).order_by(TaskEvent.id))
                ],
            }
    finally:
        engine.dispose()


def flip_byte(source: Path, destination: Path) -> Path:
    """A copy of a backup (with its .sha256) in which one byte in the middle is flipped."""
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0x01
    destination.write_bytes(bytes(data))
    shutil.copy(sha256_path(source), sha256_path(destination))
    return destination


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aios.cli", "backup", *args],
        env=env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )


def failed_count(settings: Any) -> float:
    """aios_backups_total{status="failed"} as /metrics reports it (read from the backups table)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(settings, None))
    return registry.get_sample_value("aios_backups_total", {"status": "failed"}) or 0.0


@pytest.fixture()
def backup_stack(stack: Stack, tmp_path: Path) -> Stack:
    """The session's PostgreSQL stack with backups in a folder of this test's own."""
    return stack.override(backup={"dir": str(tmp_path / "backups"), "keep": 50})


@pytest.fixture()
def empty_database() -> Iterator[Any]:
    """Make fresh, empty PostgreSQL databases (``make(schema)`` → URL); dropped afterwards."""
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    made: list[str] = []

    def make(schema: str | None) -> str:
        name = f"aios_bk_{uuid.uuid4().hex[:10]}"
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
        return f"{url}?options=-csearch_path%3D{schema}" if schema else url

    yield make
    from aios.db import dispose_engines

    dispose_engines()
    with admin.connect() as connection:
        for name in made:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def sqlite_settings(tmp_path: Path, name: str, **backup: Any) -> Settings:
    return load_settings(
        environ={
            "AIOS_CONFIG": str(REPO_ROOT / "config" / "aios.toml"),
            "AIOS_DATABASE__URL": f"sqlite:///{tmp_path / name}",
        },
        overrides={"backup": {"dir": str(tmp_path / "backups"), **backup}},
    )


# --------------------------------------------------------------------------- PostgreSQL round trip


@pytest.mark.parametrize("target_schema", ["same", "renamed", "none"])
def test_postgresql_round_trip_restores_every_task_and_event(
    backup_stack: Stack, empty_database: Any, target_schema: str
) -> None:
    # Given 1,000 tasks with events in the session's schema, and a backup of it
    tag = uuid.uuid4().hex
    ids = add_tasks(backup_stack.settings, TASKS, tag)
    row = create_backup(backup_stack.settings)
    before = snapshot(backup_stack.settings.database.url)
    assert {t[0] for t in before["tasks"]} >= set(ids)
    assert row["status"] == "ok" and row["kind"] == "postgresql"
    assert Path(row["path"]).is_file() and row["size_bytes"] == Path(row["path"]).stat().st_size
    # When it is restored into an empty database: into a schema of the same name, into another name,
    # or without a search_path (a whole-database dump would go to public; a schema dump is refused)
    schema = {"same": backup_stack.settings.database.url.split("%3D")[1], "renamed": "restored", "none": None}
    target_url = empty_database(schema[target_schema])
    target = backup_stack.override(database={"url": target_url}).settings
    if target_schema == "none":
        with pytest.raises(BackupInvalid, match="search_path"):
            restore_backup(row["path"], target)
        return
    restore_backup(row["path"], target)
    # Then every task row and every event is equal, and the schema is at the same revision
    assert snapshot(target_url) == before
    assert len([t for t in before["tasks"] if t[0] in set(ids)]) == TASKS
    assert migrate.current_revision(target.database) == migrate.current_revision(backup_stack.settings.database)


def test_restore_refuses_a_database_with_tasks_unless_forced(backup_stack: Stack, empty_database: Any) -> None:
    # Given a backup, restored once into an empty database that then gets another task
    add_tasks(backup_stack.settings, 3, uuid.uuid4().hex)
    row = create_backup(backup_stack.settings)
    before = snapshot(backup_stack.settings.database.url)
    target_url = empty_database("restored")
    target = backup_stack.override(database={"url": target_url}).settings
    restore_backup(row["path"], target)
    extra = add_tasks(target, 1, "after-restore")
    # When it is restored again without --force, then it is refused and nothing changes
    with pytest.raises(Conflict, match="not empty .* --force"):
        restore_backup(row["path"], target)
    assert extra[0] in {t[0] for t in snapshot(target_url)["tasks"]}
    # ... and the live source is refused too
    with pytest.raises(Conflict):
        restore_backup(row["path"], backup_stack.settings)
    # When forced, then the target holds exactly the backup again
    restore_backup(row["path"], target, force=True)
    assert snapshot(target_url) == before


# --------------------------------------------------------------------------- SQLite round trip


def test_sqlite_round_trip_restores_every_task_and_event(tmp_path: Path) -> None:
    # Given an embedded (SQLite) database with 1,000 tasks and their events, and a backup of it
    source = sqlite_settings(tmp_path, "source.db")
    migrate.upgrade(source.database)
    ids = add_tasks(source, TASKS, "sqlite")
    row = create_backup(source)
    before = snapshot(source.database.url)
    assert row["kind"] == "sqlite" and row["file"].endswith(".sqlite3")
    assert verify_backup(row["path"], source)["ok"]
    # When it is restored into a database file that does not exist yet
    target = sqlite_settings(tmp_path, "restored.db")
    restore_backup(row["path"], target)
    # Then every task row and event is equal
    after = snapshot(target.database.url)
    assert after == before
    assert len(after["tasks"]) == TASKS and {t[0] for t in after["tasks"]} == set(ids)
    assert len(after["task_events"]) == TASKS + TASKS // 2
    # And the restored database is not empty any more: a second restore is refused, a forced one works
    with pytest.raises(Conflict):
        restore_backup(row["path"], target)
    add_tasks(target, 1, "extra")
    restore_backup(row["path"], target, force=True)
    assert snapshot(target.database.url) == before
    # And a PostgreSQL database is not a target for a SQLite backup
    with pytest.raises(BackupInvalid, match="sqlite backup"):
        restore_backup(row["path"], load_settings(environ={"AIOS_DATABASE__URL": PG_URL}))


# --------------------------------------------------------------------------- verify


def test_verify_detects_a_flipped_byte_on_postgresql_and_sqlite(backup_stack: Stack, tmp_path: Path) -> None:
    source = sqlite_settings(tmp_path, "v.db")
    migrate.upgrade(source.database)
    add_tasks(source, 10, "verify")
    for settings in (backup_stack.settings, source):
        row = create_backup(settings)
        good = Path(row["path"])
        assert verify_backup(good, settings)["sha256"] == row["sha256"]
        # sha256sum can check it without AIOS
        assert (
            subprocess.run(["sha256sum", "--check", "--status", sha256_path(good).name], cwd=good.parent).returncode
            == 0
        )
        bad = flip_byte(good, tmp_path / f"flipped-{good.name}")
        with pytest.raises(BackupInvalid, match="sha256 .* damaged"):
            verify_backup(bad, settings)
        with pytest.raises(BackupInvalid, match="damaged"):
            restore_backup(bad, settings, force=True)


def test_verify_rejects_a_file_that_is_not_a_readable_dump(backup_stack: Stack, tmp_path: Path) -> None:
    # Given files whose .sha256 matches but that are not dumps: garbage, and a truncated pg_dump archive
    row = create_backup(backup_stack.settings)
    truncated = tmp_path / "truncated.dump"
    truncated.write_bytes(Path(row["path"]).read_bytes()[:200])
    garbage = tmp_path / "garbage.dump"
    garbage.write_bytes(b"not a backup at all" * 100)
    for file in (truncated, garbage):
        sha256_path(file).write_text(f"{hashlib.sha256(file.read_bytes()).hexdigest()}  {file.name}\n")
        with pytest.raises(BackupInvalid, match="not a readable pg_dump archive|neither"):
            verify_backup(file, backup_stack.settings)
    # And a file without its .sha256 is not taken on trust
    lone = tmp_path / "lone.dump"
    shutil.copy(row["path"], lone)
    with pytest.raises(BackupInvalid, match="missing"):
        verify_backup(lone, backup_stack.settings)


# --------------------------------------------------------------------------- retention


def test_retention_keeps_exactly_keep_files(backup_stack: Stack, tmp_path: Path) -> None:
    # Given keep = 3
    settings = backup_stack.override(backup={"dir": str(tmp_path / "kept"), "keep": 3}).settings
    # When 5 backups are taken
    rows = [create_backup(settings) for _ in range(5)]
    # Then exactly the newest 3 files remain, each with its .sha256; the 2 oldest rows are marked deleted
    directory = tmp_path / "kept"
    assert sorted(p.name for p in directory.glob("*.dump")) == sorted(r["file"] for r in rows[2:])
    assert sorted(p.name for p in directory.glob("*.sha256")) == sorted(r["file"] + ".sha256" for r in rows[2:])
    assert not list(directory.glob(".*"))  # no temporary files left behind
    with session_scope(settings.database) as session:
        status = {
            b.id: b.status for b in session.scalars(sa.select(Backup).where(Backup.id.in_([r["id"] for r in rows])))
        }
    assert [status[r["id"]] for r in rows] == ["deleted", "deleted", "ok", "ok", "ok"]


# --------------------------------------------------------------------------- failures are loud


def test_a_failed_backup_is_a_row_an_error_log_and_a_metric(
    backup_stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases = {
        "pg_dump fails": backup_stack.override(backup={"pg_dump": "/bin/false"}).settings,
        "pg_dump missing": backup_stack.override(backup={"pg_dump": str(tmp_path / "no-such-pg_dump")}).settings,
        "dir unusable": backup_stack.override(backup={"dir": str(blocker / "backups")}).settings,
    }
    expected = {
        "pg_dump fails": "false exited with status 1",
        "pg_dump missing": "not found: install",
        "dir unusable": "NotADirectoryError",
    }
    for case, settings in cases.items():
        counted = failed_count(settings)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="aios.ops.backup"), pytest.raises(BackupFailed) as raised:
            create_backup(settings)
        assert expected[case] in raised.value.message, case
        row = raised.value.extra["backup"]
        assert row["status"] == "failed" and expected[case] in row["error"], case
        assert list_backups(settings, limit=5)[0]["id"] == row["id"]
        assert any(r.levelno == logging.ERROR and expected[case] in r.getMessage() for r in caplog.records), case
        assert failed_count(settings) == counted + 1, case
    # and no partial file is left where the dumps failed
    assert list((tmp_path / "backups").iterdir()) == []


# --------------------------------------------------------------------------- CLI


def test_cli_exit_codes(backup_stack: Stack, empty_database: Any, tmp_path: Path) -> None:
    env = backup_stack.env
    # create: 0 and the row as JSON
    created = cli(env, "create")
    assert created.returncode == 0, created.stderr
    row = json.loads(created.stdout)
    assert row["status"] == "ok" and Path(row["path"]).is_file()
    # list: 0, newest first, this row among them
    listed = cli(env, "list", "--limit", "5")
    assert listed.returncode == 0 and json.loads(listed.stdout.splitlines()[0])["id"] == row["id"]
    # verify: 0 for the file, 1 and one line on stderr for a flipped copy
    assert cli(env, "verify", row["path"]).returncode == 0
    bad = cli(env, "verify", str(flip_byte(Path(row["path"]), tmp_path / "bad.dump")))
    assert bad.returncode == 1 and "damaged" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    # restore: 1 into the session's (non-empty) database, 0 into an empty one
    refused = cli(env, "restore", row["path"])
    assert refused.returncode == 1 and "--force" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    target_url = empty_database("restored")
    restored = cli({**env, "AIOS_DATABASE__URL": target_url}, "restore", row["path"])
    assert restored.returncode == 0, restored.stderr
    assert len(snapshot(target_url)["tasks"]) > 0
    # a failed backup: 1 and one line naming the cause
    failed = cli({**env, "AIOS_BACKUP__PG_DUMP": "/bin/false"}, "create")
    assert failed.returncode == 1 and "backup failed: false exited with status 1" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("aios: backup failed")
    # a bad schedule is a configuration error: 2
    bad_config = cli({**env, "AIOS_BACKUP__SCHEDULE": "61 * * * *"}, "list")
    assert bad_config.returncode == 2 and "backup.schedule" in bad_config.stderr


# --------------------------------------------------------------------------- API


def test_api_creates_and_lists_backups_for_admins_only(backup_stack: Stack, celery_client: Any) -> None:
    from webapi.app import create_app

    app = create_app(backup_stack.settings, celery_client)
    admin = authorize(app.test_client(), make_user(backup_stack, "admin").key)
    created = admin.post("/api/v1/backups")
    assert created.status_code == 201, created.json
    row = created.json
    assert row["status"] == "ok" and verify_backup(row["path"], backup_stack.settings)["sha256"] == row["sha256"]
    listed = admin.get("/api/v1/backups?limit=3")
    assert listed.status_code == 200 and listed.json["backups"][0]["id"] == row["id"]
    assert admin.get("/api/v1/backups?limit=0").status_code == 422
    for role in ("operator", "viewer", "agent"):
        other = authorize(app.test_client(), make_user(backup_stack, role).key)
        assert other.post("/api/v1/backups").status_code == 403, role
        assert other.get("/api/v1/backups").status_code == 403, role
    assert app.test_client().get("/api/v1/backups").status_code == 401


def test_api_answers_a_failed_backup_with_500_and_its_row(
    backup_stack: Stack, celery_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from webapi.app import create_app

    settings = backup_stack.override(backup={"pg_dump": "/bin/false"}).settings
    app = create_app(settings, celery_client)
    admin = authorize(app.test_client(), make_user(backup_stack, "admin").key)
    counted = failed_count(settings)
    with caplog.at_level(logging.ERROR):
        response = admin.post("/api/v1/backups")
    assert response.status_code == 500
    body = response.json
    assert body["error"] == "backup_failed" and "false exited with status 1" in body["message"]
    assert body["backup"]["status"] == "failed" and body["backup"]["error"]
    assert admin.get("/api/v1/backups").json["backups"][0]["id"] == body["backup"]["id"]
    assert failed_count(settings) == counted + 1
    assert any(r.name == "aios.ops.backup" and r.levelno == logging.ERROR for r in caplog.records)
