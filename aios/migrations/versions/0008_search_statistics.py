"""search statistics: a 1000-value sample of the search text, so the planner can tell 0.1 % from 3 %

Revision ID: 0008_search_statistics
Revises: 0007_search_index

``q=`` search picks its plan from how many rows hold the text (aios.tasks.search). ANALYZE keeps a
sample of the indexed search text (the histogram of the index expression), 100 values by default: a
text in 1 % of the rows is in none or one of them, so the planner took it for a rare one and read
every candidate row the trigram index named. 1000 values tell 0.1 % from 3 %. The cost: ANALYZE of
``tasks`` samples 300,000 rows instead of 30,000 (about 10 s more per run on a million rows; the
table's other columns keep their own targets).

PostgreSQL only, and only where migration 0007 built the index; SQLite has neither.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_search_statistics"
down_revision = "0007_search_index"
branch_labels = None
depends_on = None

INDEX = "ix_tasks_search_trgm"
#: Values ANALYZE keeps of the search text (PostgreSQL's default_statistics_target is 100).
STATISTICS = 1000


def _set(target: int) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or bind.scalar(sa.text("SELECT to_regclass(:name)"), {"name": INDEX}) is None:
        return
    op.execute(f"ALTER INDEX {INDEX} ALTER COLUMN 1 SET STATISTICS {target}")


def upgrade() -> None:
    _set(STATISTICS)


def downgrade() -> None:
    _set(-1)
