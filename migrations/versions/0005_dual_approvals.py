"""dual control: the approval queue, pending grants and who issued each API key

Existing API keys get issued_by NULL (unknown): dual control counts an unknown issuer as a
conflict, so a principal holding such a key must mint its own (and revoke the old one) before a
data grant for it, or a request it is party to, can be approved. Existing grants are not waiting
for approval (awaiting_approval false): they stay as active as they were.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "approvals",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("requested_by", sa.UUID(), nullable=False),
        sa.Column("target_id", sa.String(length=128), nullable=True),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_by", sa.UUID(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "kind IN ('grant', 'create_admin', 'disable_admin', 'revoke_admin_key')",
            name="approval_kind_known",
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'approved', 'rejected', 'expired', 'withdrawn')",
            name="approval_status_known",
        ),
        sa.ForeignKeyConstraint(["requested_by"], ["principals.id"]),
        sa.ForeignKeyConstraint(["decided_by"], ["principals.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_approvals_status_expires_at", "approvals", ["status", "expires_at"], unique=False)
    op.create_index("ix_approvals_created_at_id", "approvals", ["created_at", "id"], unique=False)
    op.add_column("api_keys", sa.Column("issued_by", sa.UUID(), nullable=True))
    op.create_foreign_key("api_keys_issued_by_fkey", "api_keys", "principals", ["issued_by"], ["id"])
    op.add_column(
        "grants",
        sa.Column("awaiting_approval", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column("grants", sa.Column("approval_id", sa.UUID(), nullable=True))
    op.add_column("grants", sa.Column("approved_by", sa.UUID(), nullable=True))
    op.add_column("grants", sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True))
    op.create_foreign_key("grants_approval_id_fkey", "grants", "approvals", ["approval_id"], ["id"])
    op.create_foreign_key("grants_approved_by_fkey", "grants", "principals", ["approved_by"], ["id"])


def downgrade() -> None:
    op.drop_constraint("grants_approved_by_fkey", "grants", type_="foreignkey")
    op.drop_constraint("grants_approval_id_fkey", "grants", type_="foreignkey")
    op.drop_column("grants", "approved_at")
    op.drop_column("grants", "approved_by")
    op.drop_column("grants", "approval_id")
    op.drop_column("grants", "awaiting_approval")
    op.drop_constraint("api_keys_issued_by_fkey", "api_keys", type_="foreignkey")
    op.drop_column("api_keys", "issued_by")
    op.drop_index("ix_approvals_created_at_id", table_name="approvals")
    op.drop_index("ix_approvals_status_expires_at", table_name="approvals")
    op.drop_table("approvals")
