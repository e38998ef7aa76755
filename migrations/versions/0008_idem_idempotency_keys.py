"""idempotency_keys: Idempotency-Key entries (claim, lease, stored answer), kept 24 hours

One row per (principal, method, path, key): the primary key is what makes a claim race-free
across replicas (INSERT ... ON CONFLICT). The body is kept only as an HMAC under a vault key, the
answer without plaintext or API keys; `tokens` lists the records an entry produced, so erasing a
record can purge the entries that name it.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("principal_id", sa.UUID(), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=128), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("body_mac", sa.LargeBinary(), nullable=False),
        sa.Column("mac_key_version", sa.SmallInteger(), nullable=False),
        sa.Column("lease_id", sa.UUID(), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("response_status", sa.SmallInteger(), nullable=True),
        sa.Column("response_body", sa.LargeBinary(), nullable=True),
        sa.Column(
            "tokens",
            postgresql.ARRAY(sa.String(length=64)),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("principal_id", "method", "path", "key"),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])
    op.create_index("ix_idempotency_keys_tokens", "idempotency_keys", ["tokens"], postgresql_using="gin")


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_tokens", table_name="idempotency_keys")
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
