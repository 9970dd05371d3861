"""Alembic environment: runs migrations on the engine AIOS would use for the same settings."""

from __future__ import annotations

from alembic import context

from aios.db import get_engine
from aios.models import Base

settings = context.config.attributes["aios_database"]
engine = get_engine(settings)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
