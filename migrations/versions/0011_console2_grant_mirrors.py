"""grant_mirrors: a grant's KMS mirrors, one per master key that holds one

A rewrap to a new key mirrors every active mirrored grant there too, so a grant can have several
KMS grants; revoking, retiring or expiring it revokes each on its own key. The existing mirrors
(grants.kms_grant_id) are copied in with no key recorded: they are looked for on every allowed
key, as before. grants.kms_grant_id stays (the first mirror, shown by the API).

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "grant_mirrors",
        sa.Column("grant_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("kms_grant_id", sa.String(length=128), nullable=False),
        sa.Column("kms_key_arn", sa.String(length=2048), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["grant_id"], ["grants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("grant_id", "kms_grant_id"),
    )
    # One mirror per grant and key: a rewrap run again finds it and makes no second one.
    op.create_index(
        "uq_grant_mirrors_grant_key",
        "grant_mirrors",
        ["grant_id", "kms_key_arn"],
        unique=True,
        postgresql_where=sa.text("kms_key_arn IS NOT NULL"),
    )
    op.execute(
        "INSERT INTO grant_mirrors (grant_id, kms_grant_id, kms_key_arn, created_at, revoked_at)"
        " SELECT id, kms_grant_id, NULL, created_at, kms_revoked_at FROM grants"
        " WHERE kms_grant_id IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_index("uq_grant_mirrors_grant_key", table_name="grant_mirrors")
    op.drop_table("grant_mirrors")
