"""fingerprints for lookup by value, and vault_keys for the vault's own keys (the fingerprint key)

A record's fingerprint is an HMAC of its normalised value under a key KMS wraps, so equal values
can be found without decrypting anything and the database alone cannot test guesses.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The tombstone rule of 0006, without its closing parenthesis.
_TOMBSTONE = (
    "(erased_at IS NULL AND format_version IS NOT NULL AND ciphertext IS NOT NULL"
    " AND wrapped_key IS NOT NULL AND kms_key_id IS NOT NULL)"
    " OR (erased_at IS NOT NULL AND ciphertext IS NULL AND wrapped_key IS NULL"
    " AND kms_key_id IS NULL"
)


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
    # A tombstone holds no fingerprint either: erasure clears it with the ciphertext.
    op.drop_constraint("records_tombstone_holds_no_secret", "records", type_="check")
    op.create_check_constraint(
        "records_tombstone_holds_no_secret", "records", _TOMBSTONE + " AND fingerprint IS NULL)"
    )


def downgrade() -> None:
    op.drop_constraint("records_tombstone_holds_no_secret", "records", type_="check")
    op.create_check_constraint("records_tombstone_holds_no_secret", "records", _TOMBSTONE + ")")
    op.drop_index("ix_records_fingerprint", table_name="records")
    op.drop_column("records", "fingerprint")
    op.drop_table("vault_keys")
