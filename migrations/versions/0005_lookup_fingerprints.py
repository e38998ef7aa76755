"""fingerprints for lookup by value, and vault_keys for the vault's own keys (the fingerprint key)

A record's fingerprint is an HMAC of its normalised value under a key KMS wraps, so equal values
can be found without decrypting anything and the database alone cannot test guesses.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "vault_keys",
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("kms_key_id", sa.String(length=2048), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("purpose"),
    )
    op.add_column("records", sa.Column("fingerprint", sa.LargeBinary(), nullable=True))
    # Lookups name a type and a fingerprint; most records of types without lookup have none.
    op.create_index(
        "ix_records_fingerprint",
        "records",
        ["data_type", "fingerprint"],
        postgresql_where=sa.text("fingerprint IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_records_fingerprint", table_name="records")
    op.drop_column("records", "fingerprint")
    op.drop_table("vault_keys")
