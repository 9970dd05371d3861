"""Alembic, driven from code: no alembic.ini to keep in step with the config loader."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from aios.config import DatabaseSettings
from aios.db import get_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(settings: DatabaseSettings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not an option: ConfigParser would choke on '%' in passwords.
    config.attributes["aios_database"] = settings
    return config


def head_revision() -> str:
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    return script.get_current_head() or ""


def current_revision(settings: DatabaseSettings) -> str | None:
    with get_engine(settings).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(settings: DatabaseSettings, revision: str = "head") -> None:
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: DatabaseSettings, revision: str) -> None:
    command.downgrade(alembic_config(settings), revision)
