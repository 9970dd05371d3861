"""Alembic, driven from code: no alembic.ini to keep in step with the config loader.

The revisions (``current_revision``, ``head_revision``) are read in :mod:`aios.db`, whose schema guard
needs them; they are part of this module's vocabulary too, for ``aios db`` and the tests.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from aios.config import DatabaseSettings
from aios.db import MIGRATIONS_DIR, current_revision, head_revision

__all__ = ["MIGRATIONS_DIR", "alembic_config", "current_revision", "downgrade", "head_revision", "upgrade"]


def alembic_config(settings: DatabaseSettings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not an option: ConfigParser would choke on '%' in passwords.
    config.attributes["aios_database"] = settings
    return config


def upgrade(settings: DatabaseSettings, revision: str = "head") -> None:
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: DatabaseSettings, revision: str) -> None:
    command.downgrade(alembic_config(settings), revision)
