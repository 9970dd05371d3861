"""The [backup] settings and the parts of aios.ops.backup that need no database."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg2.extensions import parse_dsn

from aios.config import Settings, load_settings
from aios.db import LIBPQ_DEFAULTS
from aios.errors import ConfigError
from aios.ops.backup import PgTarget, search_path_schema

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "aios.toml"


def settings(**env: str) -> Settings:
    return load_settings(environ={"AIOS_CONFIG": str(REPO_CONFIG), **env})


def test_defaults_match_the_committed_file() -> None:
    backup = settings().backup
    assert (backup.dir, backup.keep, backup.schedule) == ("var/backups", 7, "0 3 * * *")


@pytest.mark.parametrize("schedule", ["61 * * * *", "* * *", "every day", "0 3 * * 8"])
def test_a_bad_schedule_is_a_config_error_naming_the_key(schedule: str) -> None:
    with pytest.raises(ConfigError, match=r"backup\.schedule"):
        settings(AIOS_BACKUP__SCHEDULE=schedule)


def test_an_empty_schedule_turns_scheduled_backups_off() -> None:
    assert settings(AIOS_BACKUP__SCHEDULE="").backup.schedule == ""
    assert settings(AIOS_BACKUP__SCHEDULE="  */15 * * * 1-5 ").backup.schedule == "*/15 * * * 1-5"


def test_keep_must_be_at_least_one() -> None:
    with pytest.raises(ConfigError, match=r"backup\.keep"):
        settings(AIOS_BACKUP__KEEP="0")


@pytest.mark.parametrize(
    ("options", "schema"),
    [
        ("-csearch_path=aios_t_1", "aios_t_1"),
        ("-c search_path=tenant,public", "tenant"),
        ('-csearch_path="Quoted"', "Quoted"),
        ("-cstatement_timeout=5000", None),
        ("", None),
    ],
)
def test_the_dumped_schema_is_the_first_of_the_urls_search_path(options: str, schema: str | None) -> None:
    assert search_path_schema(options) == schema


def test_the_password_goes_to_the_environment_never_to_argv() -> None:
    target = PgTarget.from_url(
        "postgresql+psycopg2://aios:s3cr%40t@db:5433/aios?sslmode=require&options=-csearch_path%3Dtenant"
    )
    assert "s3cr@t" not in " ".join(target.args())
    assert target.args()[:2] == ["--no-password", "--dbname"]
    assert parse_dsn(target.args()[2]) == {
        "host": "db",
        "port": "5433",
        "dbname": "aios",
        "user": "aios",
        "sslmode": "require",
        **LIBPQ_DEFAULTS,  # a connect timeout and keepalives, as the engines have
    }
    env = target.env()
    assert env["PGPASSWORD"] == "s3cr@t"
    assert target.schema == "tenant"


def test_a_multi_host_url_gives_pg_dump_every_host_and_a_restore_only_the_primary() -> None:
    # Given the failover form of the URL (docs/ha.md), which SQLAlchemy turns into one libpq conninfo
    url = "postgresql+psycopg2://aios:pw@/aios?host=h1:5432&host=h2:5433&target_session_attrs=read-write"
    target = PgTarget.from_url(url)
    # Then pg_dump gets both hosts, in order, and the session attribute: it reaches the primary
    conninfo = target.args()[-1]
    assert "host=h1,h2" in conninfo and "port=5432,5433" in conninfo
    assert "target_session_attrs=read-write" in conninfo and "pw" not in conninfo
    # And a restore is sent to the primary even when the URL does not ask for it
    plain = PgTarget.from_url("postgresql+psycopg2://aios@/aios?host=h1:5432&host=h2:5433")
    assert "target_session_attrs" not in plain.args()[-1]
    assert "target_session_attrs=read-write" in plain.primary().args()[-1]
