"""The audit sealer's SQL, on a plain psycopg connection in the transaction
Database.raw_transaction holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row

from app.db.repositories.data_path import EVENT_COLUMNS

# One page of the sealer's work: the next `limit` events in (written_xid, id) order after the
# given pair, among those written by transactions in [low, high), each with whether the chain
# already holds it. A page is bounded by the rows it reads, linked or not, so that no statement
# walks far whatever the backlog. The link lookup is a scalar subquery, so that it probes the
# event_row_id index once per row: as EXISTS, the planner may hash the whole chain instead.
EVENT_COLUMNS_OF_E = ", ".join("e." + column for column in EVENT_COLUMNS)
_SEAL_PAGE = (
    f"SELECT e.id, e.written_xid, {EVENT_COLUMNS_OF_E},"  # noqa: S608 (constant column names)
    " (SELECT c.seq FROM audit_chain c WHERE c.event_row_id = e.id) IS NOT NULL AS linked"
    " FROM (SELECT * FROM audit_events"
    "        WHERE written_xid >= %s AND written_xid < %s AND (written_xid, id) > (%s, %s)"
    "        ORDER BY written_xid, id LIMIT %s) e"
    " ORDER BY e.written_xid, e.id"
)


class SealRepository:
    """The audit sealer's SQL, on a connection in a transaction of its own."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection

    def lock_head(self) -> tuple[int, bytes, int, list[int]] | None:
        """The chain head (seq, mac, sealed_below, pending_xids), locked for this transaction;
        None if another sealer holds it."""
        row = self.connection.execute(
            "SELECT seq, mac, sealed_below, pending_xids FROM audit_chain_head WHERE id = 1"
            " FOR UPDATE SKIP LOCKED"
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2], list(row[3]))

    def horizon(self) -> tuple[int, list[int]]:
        """This moment's first unassigned transaction id and the transactions still running:
        every other one has ended, so its events, if it committed, are visible to any later
        statement."""
        row = self.connection.execute(
            "SELECT (pg_snapshot_xmax(s)::text)::bigint,"
            " ARRAY(SELECT (x::text)::bigint FROM pg_snapshot_xip(s) x)"
            " FROM pg_current_snapshot() s"
        ).fetchone()
        assert row is not None  # noqa: S101 (one row, always)
        return row[0], list(row[1])

    def seal_page(self, low: int, high: int, after: tuple[int, int], limit: int) -> list[Any]:
        """The next `limit` events written by transactions in [low, high), in (written_xid, id)
        order after the given pair, each with `linked`: whether the chain holds it already."""
        with self.connection.cursor(binary=True, row_factory=namedtuple_row) as cursor:
            # Planned for these values every time: a generic plan cannot know the range is recent.
            parameters = (low, high, *after, limit)
            return cursor.execute(_SEAL_PAGE, parameters, prepare=False).fetchall()

    def link(self, links: Sequence[tuple[int, int, bytes, bytes]]) -> None:
        """Chain links (seq, event row id, prev_mac, mac), inserted by COPY."""
        if links:
            with (
                self.connection.cursor() as cursor,
                cursor.copy("COPY audit_chain (seq, event_row_id, prev_mac, mac) FROM STDIN") as copy,
            ):
                for link in links:
                    copy.write_row(link)

    def move_head(self, seq: int, mac: bytes, sealed_below: int, pending_xids: Sequence[int]) -> None:
        self.connection.execute(
            "UPDATE audit_chain_head SET seq = %s, mac = %s, sealed_below = %s, pending_xids = %s"
            " WHERE id = 1",
            (seq, mac, sealed_below, list(pending_xids)),
        )

    def oldest_unsealed_age_s(self) -> float:
        """Seconds since the first event (in written_xid order, close to time order) of a
        transaction the head has not passed (at or past sealed_below, or among pending_xids) was
        written; 0 if there is none. Each side is one probe of the (written_xid, id) index: by
        time, the planner would walk every sealed event to find none."""
        row = self.connection.execute(
            "WITH head AS (SELECT sealed_below, pending_xids FROM audit_chain_head WHERE id = 1)"
            " SELECT COALESCE(EXTRACT(EPOCH FROM now() - LEAST("
            "   (SELECT time FROM audit_events WHERE written_xid >= (SELECT sealed_below FROM head)"
            "     ORDER BY written_xid, id LIMIT 1),"
            "   (SELECT time FROM audit_events"
            "     WHERE written_xid = ANY(CAST((SELECT pending_xids FROM head) AS bigint[]))"
            "     ORDER BY written_xid, id LIMIT 1)"
            " )), 0)::float8"
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else 0.0
