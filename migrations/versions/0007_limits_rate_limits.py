"""per-principal rate limits, and a count on audit events that stand for repeated failures

principals.rate_limit_rps / rate_limit_burst: an admin's setting for one principal (NULL: the
vault's defaults). audit_events.repeat_count: an event that stands for this many more failed
authentications of the same key id, source and reason within a window (NULL: a single event).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("principals", sa.Column("rate_limit_rps", sa.Integer(), nullable=True))
    op.add_column("principals", sa.Column("rate_limit_burst", sa.Integer(), nullable=True))
    op.create_check_constraint(
        "rate_limit_positive",
        "principals",
        "(rate_limit_rps IS NULL) = (rate_limit_burst IS NULL)"
        " AND (rate_limit_rps IS NULL OR (rate_limit_rps >= 1 AND rate_limit_burst >= rate_limit_rps))",
    )
    op.add_column("audit_events", sa.Column("repeat_count", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("audit_events", "repeat_count")
    op.drop_constraint("rate_limit_positive", "principals", type_="check")
    op.drop_column("principals", "rate_limit_burst")
    op.drop_column("principals", "rate_limit_rps")
