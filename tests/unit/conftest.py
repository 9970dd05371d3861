"""Fixtures shared by the unit tests (no services: SQLite in a temporary folder)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aios import migrate
from aios.config import DatabaseSettings
from aios.db import get_engine


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[DatabaseSettings]:
    """A fresh SQLite file migrated to head."""
    settings = DatabaseSettings(url=f"sqlite:///{tmp_path}/t.db")
    migrate.upgrade(settings)
    yield settings
    get_engine(settings).dispose()
