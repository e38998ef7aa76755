"""piivault_grants_unchanged: the release's re-check answers one boolean

The same check as piivault_hold_grants (0012), in the form the release statement needs: the grants
held in shared advisory locks until the calling transaction ends, then counted in a snapshot of
the function's own (volatile: a revoke that committed while the release waited for its lock is
seen). Answering true or false, rather than the grants' rows for the caller to count, spares the
statement a materialized row set and an aggregate. The ids come sorted and distinct (the caller
sorts them), so the locks are taken in one order without a sort here.

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
CREATE FUNCTION piivault_grants_unchanged(namespace integer, grant_ids uuid[], at timestamptz)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(namespace, hashtext(held::text)) FROM unnest(grant_ids) AS held;
    RETURN (SELECT count(*) FROM grants g
             WHERE g.id = ANY(grant_ids) AND NOT g.awaiting_approval AND g.revoked_at IS NULL
               AND g.retired_at IS NULL AND (g.expires_at IS NULL OR g.expires_at > at))
           = cardinality(grant_ids);
END
$$
""")


def downgrade() -> None:
    op.execute("DROP FUNCTION piivault_grants_unchanged(integer, uuid[], timestamptz)")
