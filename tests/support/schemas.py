"""A PostgreSQL schema of a test's own, migrated to head, dropped afterwards.

The session schema holds what every other test left behind (QUEUED rows without messages, stale
agents, PENDING tasks of an outage test): a test that runs the sync job and counts what it found needs
a ledger holding only its own rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from tests.conftest import PG_URL


@contextmanager
def private_schema(tag: str = "p") -> Iterator[str]:
    """Yield a database URL whose search_path is a fresh, migrated schema."""
    from aios import migrate
    from aios.config import DatabaseSettings
    from aios.db import dispose_engines

    schema = f"aios_{tag}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        try:
            migrate.upgrade(DatabaseSettings(url=url))
            yield url
        finally:
            dispose_engines()
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()
