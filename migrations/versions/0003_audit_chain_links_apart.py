"""audit chain links in a table of their own: events are written once and never updated

The sealer used to update every event with its chain position. Each such update rewrote the
whole row and every index on it (the chain's sequence number is indexed) and left a dead row for
vacuum. Links are now inserted, a narrow row each, and the sealer finds its work by transaction
id: it looks only at events of transactions that had not ended when it last looked.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_chain",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_row_id", sa.BigInteger(), nullable=False),
        sa.Column("prev_mac", sa.LargeBinary(), nullable=False),
        sa.Column("mac", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("seq >= 1", name="audit_chain_seq_positive"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("event_row_id"),
    )
    # A link whose MACs were blanked behind the vault's back moves over as a broken link, for
    # verify to name, rather than failing the upgrade.
    op.execute(
        "INSERT INTO audit_chain (seq, event_row_id, prev_mac, mac)"
        " SELECT chain_seq, id, coalesce(prev_mac, ''::bytea), coalesce(mac, ''::bytea)"
        " FROM audit_events WHERE chain_seq IS NOT NULL"
    )
    # Existing rows count as written by transaction 0, already looked at (sealed_below = 1), but
    # for those not yet sealed, which get this migration's transaction id: the sealer's first
    # pass reads them, not the whole table. (A constant default adds the column without a rewrite.)
    op.add_column(
        "audit_events", sa.Column("written_xid", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.alter_column(
        "audit_events", "written_xid", server_default=sa.text("(pg_current_xact_id()::text)::bigint")
    )
    op.execute(
        "UPDATE audit_events SET written_xid = (pg_current_xact_id()::text)::bigint WHERE chain_seq IS NULL"
    )
    op.create_index("ix_audit_events_written_xid", "audit_events", ["written_xid", "id"], unique=False)
    op.add_column(
        "audit_chain_head",
        sa.Column("sealed_below", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    op.execute("UPDATE audit_chain_head SET sealed_below = 1")
    op.add_column(
        "audit_chain_head",
        sa.Column(
            "pending_xids", postgresql.ARRAY(sa.BigInteger()), server_default=sa.text("'{}'"), nullable=False
        ),
    )
    # Their constraints and the unsealed-events index go with them.
    for column in ("chain_seq", "prev_mac", "mac"):
        op.drop_column("audit_events", column)


def downgrade() -> None:
    op.add_column("audit_events", sa.Column("chain_seq", sa.BigInteger(), nullable=True))
    op.add_column("audit_events", sa.Column("prev_mac", sa.LargeBinary(), nullable=True))
    op.add_column("audit_events", sa.Column("mac", sa.LargeBinary(), nullable=True))
    op.execute(
        "UPDATE audit_events e SET chain_seq = c.seq, prev_mac = c.prev_mac, mac = c.mac"
        " FROM audit_chain c WHERE c.event_row_id = e.id"
    )
    op.create_unique_constraint("audit_events_chain_seq_key", "audit_events", ["chain_seq"])
    op.create_check_constraint("chain_seq_positive", "audit_events", "chain_seq >= 1")
    op.create_index(
        "ix_audit_events_unsealed",
        "audit_events",
        ["id"],
        unique=False,
        postgresql_where=sa.text("chain_seq IS NULL"),
    )
    op.drop_column("audit_chain_head", "pending_xids")
    op.drop_column("audit_chain_head", "sealed_below")
    op.drop_index("ix_audit_events_written_xid", table_name="audit_events")
    op.drop_column("audit_events", "written_xid")
    op.drop_table("audit_chain")
