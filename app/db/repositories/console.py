"""Console sessions, in the caller's session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import ApiKey, ConsoleSession, Principal


@dataclass(frozen=True, slots=True)
class LiveSession:
    session: ConsoleSession
    principal: Principal


class ConsoleSessionRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, row: ConsoleSession) -> None:
        self.session.add(row)

    def live(self, secret_hash: bytes, now: datetime, idle_since: datetime) -> LiveSession | None:
        """The session if it has not ended, expired or idled out, and its key and principal still
        stand; else None."""
        row = self.session.execute(
            select(ConsoleSession, Principal)
            .join(Principal, Principal.id == ConsoleSession.principal_id)
            .join(ApiKey, ApiKey.id == ConsoleSession.api_key_id)
            .where(
                ConsoleSession.secret_hash == secret_hash,
                ConsoleSession.ended_at.is_(None),
                ConsoleSession.expires_at > now,
                ConsoleSession.last_seen_at > idle_since,
                Principal.disabled_at.is_(None),
                ApiKey.revoked_at.is_(None),
            )
        ).first()
        return LiveSession(row[0], row[1]) if row else None

    def touch(self, secret_hash: bytes, now: datetime) -> None:
        self.session.execute(
            update(ConsoleSession).where(ConsoleSession.secret_hash == secret_hash).values(last_seen_at=now)
        )

    def end(self, secret_hash: bytes, now: datetime) -> bool:
        result = self.session.execute(
            update(ConsoleSession)
            .where(ConsoleSession.secret_hash == secret_hash, ConsoleSession.ended_at.is_(None))
            .values(ended_at=now)
            .returning(ConsoleSession.principal_id)
        )
        return result.first() is not None
