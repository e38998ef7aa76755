"""All SQL lives here. Repositories read and write rows in the caller's session; they never commit."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from app.db.models import ApiKey, AuditChainHead, AuditEvent, AuditKey, Base, Grant, Principal, Record


class PrincipalRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, principal: Principal) -> Principal:
        self.session.add(principal)
        self.session.flush()
        return principal

    def get(self, principal_id: uuid.UUID) -> Principal | None:
        return self.session.get(Principal, principal_id)

    def get_by_name(self, name: str) -> Principal | None:
        return self.session.scalar(select(Principal).where(Principal.name == name))

    def name_taken(self, name: str) -> bool:
        return self.session.scalar(select(Principal.id).where(Principal.name == name)) is not None

    def list(self) -> Sequence[Principal]:
        return self.session.scalars(select(Principal).order_by(Principal.created_at, Principal.name)).all()


def _row(instance: Base, skip: tuple[str, ...] = ()) -> dict[str, object]:
    """An unsaved model instance's column values, for a Core INSERT."""
    return {
        column.key: getattr(instance, column.key)
        for column in instance.__table__.columns
        if column.key not in skip
    }


@dataclass(frozen=True, slots=True)
class KeyCredentials:
    secret_hash: bytes
    key_revoked_at: datetime | None
    principal_id: uuid.UUID
    principal_name: str
    role: str
    principal_disabled_at: datetime | None


@dataclass(frozen=True, slots=True)
class GrantTerms:
    """The part of a grant an access decision reads; a plain row, not an ORM object."""

    id: uuid.UUID
    constraint_kind: str | None
    constraint_context: dict[str, str] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    retired_at: datetime | None


class ApiKeyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        self.session.flush()
        return key

    def get(self, key_id: str) -> ApiKey | None:
        return self.session.get(ApiKey, key_id)

    def credentials(self, key_id: str) -> KeyCredentials | None:
        """What authentication needs, in one round trip and without ORM objects (the hot path)."""
        row = self.session.execute(
            select(
                ApiKey.secret_hash,
                ApiKey.revoked_at,
                Principal.id,
                Principal.name,
                Principal.role,
                Principal.disabled_at,
            )
            .join(Principal, Principal.id == ApiKey.principal_id)
            .where(ApiKey.id == key_id)
        ).first()
        return None if row is None else KeyCredentials(*row)

    def list_for(self, principal_id: uuid.UUID) -> Sequence[ApiKey]:
        query = select(ApiKey).where(ApiKey.principal_id == principal_id).order_by(ApiKey.created_at)
        return self.session.scalars(query).all()

    def revoke_all_for(self, principal_id: uuid.UUID, now: datetime) -> None:
        self.session.execute(
            update(ApiKey)
            .where(ApiKey.principal_id == principal_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=now)
        )


class GrantRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, grant: Grant) -> Grant:
        self.session.add(grant)
        self.session.flush()
        return grant

    def get(self, grant_id: uuid.UUID, *, for_update: bool = False) -> Grant | None:
        return self.session.get(Grant, grant_id, with_for_update=for_update)

    def for_grantee(self, grantee_id: uuid.UUID, operation: str) -> list[GrantTerms]:
        """Every grant of this principal naming this operation, active or not (the caller decides)."""
        query = (
            select(
                Grant.id,
                Grant.constraint_kind,
                Grant.constraint_context,
                Grant.expires_at,
                Grant.revoked_at,
                Grant.retired_at,
            )
            .where(Grant.grantee_id == grantee_id, Grant.operations.any_() == operation)
            .order_by(Grant.created_at, Grant.id)
        )
        return [GrantTerms(*row) for row in self.session.execute(query)]

    def list(self, *, grantee_id: uuid.UUID | None, active: bool | None, now: datetime) -> Sequence[Grant]:
        query = select(Grant).order_by(Grant.created_at, Grant.id)
        if grantee_id is not None:
            query = query.where(Grant.grantee_id == grantee_id)
        is_active = (
            Grant.revoked_at.is_(None)
            & Grant.retired_at.is_(None)
            & or_(Grant.expires_at.is_(None), Grant.expires_at > now)
        )
        if active is True:
            query = query.where(is_active)
        elif active is False:
            query = query.where(~is_active)
        return self.session.scalars(query).all()

    def any_active_for(self, grantee_id: uuid.UUID, now: datetime) -> bool:
        query = select(Grant.id).where(
            Grant.grantee_id == grantee_id,
            Grant.revoked_at.is_(None),
            Grant.retired_at.is_(None),
            or_(Grant.expires_at.is_(None), Grant.expires_at > now),
        )
        return self.session.scalar(query.limit(1)) is not None

    def expired_unaudited(self, now: datetime, limit: int) -> Sequence[Grant]:
        """Grants that expired and whose expiry has no audit event yet; locked, one replica each."""
        query = (
            select(Grant)
            .where(
                Grant.expires_at <= now,
                Grant.expiry_audited_at.is_(None),
                Grant.revoked_at.is_(None),
                Grant.retired_at.is_(None),
            )
            .order_by(Grant.expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalars(query).all()

    def mirrors_to_revoke(self, now: datetime, limit: int) -> Sequence[Grant]:
        """Inactive grants whose KMS mirror still stands; locked so that one replica handles each."""
        query = (
            select(Grant)
            .where(
                Grant.kms_grant_id.is_not(None),
                Grant.kms_revoked_at.is_(None),
                or_(
                    Grant.revoked_at.is_not(None),
                    Grant.retired_at.is_not(None),
                    Grant.expires_at <= now,
                ),
            )
            .order_by(Grant.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalars(query).all()


class RecordRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add_all(self, records: Sequence[Record]) -> None:
        # One multi-row INSERT, without the ORM's unit of work (the hot path).
        if records:
            self.session.execute(insert(Record), [_row(record) for record in records])

    def get(self, token: str) -> Record | None:
        return self.session.get(Record, token)

    def get_many(self, tokens: Sequence[str]) -> dict[str, Record]:
        if not tokens:
            return {}
        rows = self.session.scalars(select(Record).where(Record.token.in_(tokens))).all()
        return {row.token: row for row in rows}


@dataclass(frozen=True, slots=True)
class AuditFilter:
    principal_id: uuid.UUID | None = None
    principal_name: str | None = None
    action: str | None = None
    outcome: str | None = None
    customer_id: str | None = None
    token: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before_id: int | None = None


class AuditRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add_all(self, events: Sequence[AuditEvent]) -> None:
        # One multi-row INSERT, without the ORM's unit of work (the hot path).
        if events:
            self.session.execute(insert(AuditEvent), [_row(event, skip=("id",)) for event in events])

    def lock_head(self) -> AuditChainHead | None:
        """The chain head, locked for this transaction; None if another sealer holds it."""
        return self.session.scalar(
            select(AuditChainHead)
            .where(AuditChainHead.id == 1)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        )

    def unsealed_rows(self, limit: int, after_id: int) -> Sequence[Any]:
        """Like unsealed, as plain rows (the sealer reads many; ORM objects would cost more)."""
        query = (
            select(*AuditEvent.__table__.columns)
            .where(AuditEvent.chain_seq.is_(None), AuditEvent.id > after_id)
            .order_by(AuditEvent.id)
            .limit(limit)
        )
        return self.session.execute(query).all()

    def set_links(self, links: Sequence[dict[str, object]]) -> None:
        """Chain positions for many events in one executemany (id, chain_seq, prev_mac, mac)."""
        if links:
            self.session.execute(update(AuditEvent), list(links))

    def unsealed(self, limit: int, after_id: int) -> Sequence[AuditEvent]:
        """Committed events not yet in the chain, oldest first, after the given row id."""
        query = (
            select(AuditEvent)
            .where(AuditEvent.chain_seq.is_(None), AuditEvent.id > after_id)
            .order_by(AuditEvent.id)
            .limit(limit)
        )
        return self.session.scalars(query).all()

    def head(self) -> AuditChainHead | None:
        return self.session.get(AuditChainHead, 1, populate_existing=True)

    def latest_key(self) -> AuditKey | None:
        return self.session.scalar(select(AuditKey).order_by(AuditKey.version.desc()).limit(1))

    def key(self, version: int) -> AuditKey | None:
        return self.session.get(AuditKey, version)

    def add_key_if_absent(self, key: AuditKey) -> None:
        """Several processes may race to create the first key: one wins, the others read it."""
        self.session.execute(
            pg_insert(AuditKey)
            .values(version=key.version, wrapped_key=key.wrapped_key, kms_key_id=key.kms_key_id)
            .on_conflict_do_nothing(index_elements=[AuditKey.version])
        )

    def search(self, where: AuditFilter, limit: int) -> Sequence[AuditEvent]:
        """Newest first (by insertion), sealed or not yet."""
        query = select(AuditEvent)
        if where.principal_id is not None:
            query = query.where(AuditEvent.principal_id == where.principal_id)
        if where.principal_name is not None:
            query = query.where(AuditEvent.principal_name == where.principal_name)
        for column, value in (
            (AuditEvent.action, where.action),
            (AuditEvent.outcome, where.outcome),
            (AuditEvent.customer_id, where.customer_id),
            (AuditEvent.token, where.token),
        ):
            if value is not None:
                query = query.where(column == value)
        if where.since is not None:
            query = query.where(AuditEvent.time >= where.since)
        if where.until is not None:
            query = query.where(AuditEvent.time < where.until)
        if where.before_id is not None:
            query = query.where(AuditEvent.id < where.before_id)
        return self.session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit)).all()

    def seq_bounds(self, since: datetime | None, until: datetime | None) -> tuple[int | None, int | None]:
        query = select(func.min(AuditEvent.chain_seq), func.max(AuditEvent.chain_seq))
        if since is not None:
            query = query.where(AuditEvent.time >= since)
        if until is not None:
            query = query.where(AuditEvent.time < until)
        low, high = self.session.execute(query).one()
        return low, high

    def at_seq(self, seq: int) -> AuditEvent | None:
        return self.session.scalar(select(AuditEvent).where(AuditEvent.chain_seq == seq))

    def walk(self, first_seq: int, last_seq: int, batch: int = 1000) -> Iterator[AuditEvent]:
        """Events in chain order, streamed."""
        query = (
            select(AuditEvent)
            .where(AuditEvent.chain_seq >= first_seq, AuditEvent.chain_seq <= last_seq)
            .order_by(AuditEvent.chain_seq)
            .execution_options(yield_per=batch)
        )
        yield from self.session.scalars(query)
