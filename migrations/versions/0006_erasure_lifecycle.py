"""erasure and retention: tombstones and per-record expiry

A record can now be erased (GDPR Art. 17): its ciphertext, wrapped data key and key id are set to
NULL in the same transaction as its audit event, and what stays is a tombstone (token,
customer_id, data_type, created_at, erased_at, erasure_reason). A CHECK keeps a tombstone from
holding any of the secret columns, and a live record from lacking them. A record may carry an
expiry, after which it is refused and the retention sweeper erases it.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for column in ("format_version", "ciphertext", "wrapped_key", "kms_key_id"):
        op.alter_column("records", column, nullable=True)
    op.add_column("records", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("records", sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("records", sa.Column("erasure_reason", sa.String(length=512), nullable=True))
    op.create_check_constraint(
        "records_tombstone_holds_no_secret",
        "records",
        "(erased_at IS NULL AND format_version IS NOT NULL AND ciphertext IS NOT NULL"
        " AND wrapped_key IS NOT NULL AND kms_key_id IS NOT NULL)"
        " OR (erased_at IS NOT NULL AND ciphertext IS NULL AND wrapped_key IS NULL AND kms_key_id IS NULL)",
    )
    # The retention sweeper's work list: live records with an expiry, soonest first.
    op.create_index(
        "ix_records_expires_at_live",
        "records",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("erased_at IS NULL AND expires_at IS NOT NULL"),
    )


def downgrade() -> None:
    # Tombstones cannot go back to a schema that requires a ciphertext: they are dropped.
    op.drop_index("ix_records_expires_at_live", table_name="records")
    op.drop_constraint("records_tombstone_holds_no_secret", "records", type_="check")
    op.execute("DELETE FROM records WHERE erased_at IS NOT NULL")
    op.drop_column("records", "erasure_reason")
    op.drop_column("records", "erased_at")
    op.drop_column("records", "expires_at")
    for column in ("format_version", "ciphertext", "wrapped_key", "kms_key_id"):
        op.alter_column("records", column, nullable=False)
