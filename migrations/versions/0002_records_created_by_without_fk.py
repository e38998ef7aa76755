"""records.created_by without a foreign key

The foreign key's check locked the principal's row (FOR KEY SHARE) on every tokenize: one hot
row shared by all of a service's requests. Principals are never deleted, only disabled.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("records_created_by_fkey", "records", type_="foreignkey")


def downgrade() -> None:
    op.create_foreign_key("records_created_by_fkey", "records", "principals", ["created_by"], ["id"])
