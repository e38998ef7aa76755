"""piivault_hold_grants: a detokenize's release re-checks its grants in the statement that writes
its events

The function holds the grants in shared advisory locks (the lock a revoke or retire takes
exclusively) until the calling transaction ends, then reads them in a snapshot of its own: a
volatile function's statements each take a fresh one under READ COMMITTED, so a revoke that
committed while the release waited for its lock is seen. The release is then one autocommit
statement: the events are inserted only if every grant is still as it was decided on.

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Locks in a fixed order (ids sorted), as a revoke takes one at a time: no deadlock.
    op.execute("""
CREATE FUNCTION piivault_hold_grants(namespace integer, grant_ids uuid[])
RETURNS TABLE (grant_id uuid, expires_at timestamptz, revoked_at timestamptz,
               retired_at timestamptz, awaiting_approval boolean)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(namespace, hashtext(held.id::text))
       FROM (SELECT DISTINCT unnest(grant_ids) AS id ORDER BY 1) AS held;
    RETURN QUERY
        SELECT g.id, g.expires_at, g.revoked_at, g.retired_at, g.awaiting_approval
          FROM grants g WHERE g.id = ANY(grant_ids);
END
$$
""")


def downgrade() -> None:
    op.execute("DROP FUNCTION piivault_hold_grants(integer, uuid[])")
