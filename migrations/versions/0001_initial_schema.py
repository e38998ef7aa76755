"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 11:51:02.003547
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("mac", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("id = 1", name="single_row"),
        sa.PrimaryKeyConstraint("id"),
    )
    # The chain starts from a genesis link: sequence 0, an all-zero MAC.
    op.execute("INSERT INTO audit_chain_head (id, seq, mac) VALUES (1, 0, decode(repeat('00', 32), 'hex'))")
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.UUID(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("principal_id", sa.UUID(), nullable=True),
        sa.Column("principal_name", sa.String(length=128), nullable=True),
        sa.Column("api_key_id", sa.String(length=32), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("token", sa.String(length=64), nullable=True),
        sa.Column("customer_id", sa.String(length=128), nullable=True),
        sa.Column("data_type", sa.String(length=64), nullable=True),
        sa.Column("grant_id", sa.UUID(), nullable=True),
        sa.Column("target_id", sa.String(length=128), nullable=True),
        sa.Column("access_reason", sa.String(length=512), nullable=True),
        sa.Column("source_ip", sa.String(length=64), nullable=True),
        sa.Column("user_agent", sa.String(length=512), nullable=True),
        sa.Column("kms_request_id", sa.String(length=128), nullable=True),
        sa.Column("key_version", sa.SmallInteger(), nullable=True),
        sa.Column("event_mac", sa.LargeBinary(), nullable=True),
        sa.Column("chain_seq", sa.BigInteger(), nullable=True),
        sa.Column("prev_mac", sa.LargeBinary(), nullable=True),
        sa.Column("mac", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint("chain_seq >= 1", name="chain_seq_positive"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("chain_seq"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_audit_events_action_outcome", "audit_events", ["action", "outcome"], unique=False)
    op.create_index("ix_audit_events_customer_id", "audit_events", ["customer_id"], unique=False)
    op.create_index("ix_audit_events_principal_id", "audit_events", ["principal_id"], unique=False)
    op.create_index("ix_audit_events_time", "audit_events", ["time"], unique=False)
    op.create_index("ix_audit_events_token", "audit_events", ["token"], unique=False)
    op.create_index(
        "ix_audit_events_unsealed",
        "audit_events",
        ["id"],
        unique=False,
        postgresql_where=sa.text("chain_seq IS NULL"),
    )
    op.create_table(
        "audit_keys",
        sa.Column("version", sa.SmallInteger(), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("kms_key_id", sa.String(length=2048), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "principals",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('admin', 'service', 'auditor')", name="role_known"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("principal_id", sa.UUID(), nullable=False),
        sa.Column("secret_hash", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["principal_id"],
            ["principals.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_api_keys_principal_id"), "api_keys", ["principal_id"], unique=False)
    op.create_table(
        "grants",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("grantee_id", sa.UUID(), nullable=False),
        sa.Column("operations", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("constraint_kind", sa.String(length=32), nullable=True),
        sa.Column("constraint_context", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("created_by", sa.UUID(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("kms_grant_id", sa.String(length=128), nullable=True),
        sa.Column("kms_revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expiry_audited_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "constraint_kind IS NULL OR constraint_kind IN ('encryption_context_subset', 'encryption_context_equals')",
            name="constraint_kind_known",
        ),
        sa.CheckConstraint("cardinality(operations) > 0", name="operations_not_empty"),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["principals.id"],
        ),
        sa.ForeignKeyConstraint(
            ["grantee_id"],
            ["principals.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_grants_grantee_id"), "grants", ["grantee_id"], unique=False)
    op.create_table(
        "records",
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("data_type", sa.String(length=64), nullable=False),
        sa.Column("format_version", sa.SmallInteger(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("kms_key_id", sa.String(length=2048), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("created_by", sa.UUID(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["principals.id"],
        ),
        sa.PrimaryKeyConstraint("token"),
    )
    op.create_index("ix_records_customer_id", "records", ["customer_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_records_customer_id", table_name="records")
    op.drop_table("records")
    op.drop_index(op.f("ix_grants_grantee_id"), table_name="grants")
    op.drop_table("grants")
    op.drop_index(op.f("ix_api_keys_principal_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("principals")
    op.drop_table("audit_keys")
    op.drop_index(
        "ix_audit_events_unsealed", table_name="audit_events", postgresql_where=sa.text("chain_seq IS NULL")
    )
    op.drop_index("ix_audit_events_token", table_name="audit_events")
    op.drop_index("ix_audit_events_time", table_name="audit_events")
    op.drop_index("ix_audit_events_principal_id", table_name="audit_events")
    op.drop_index("ix_audit_events_customer_id", table_name="audit_events")
    op.drop_index("ix_audit_events_action_outcome", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("audit_chain_head")
