"""Principals and their API keys, in the caller's ORM session."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, tuple_, update
from sqlalchemy.orm import Session

from app.db.models import ApiKey, Principal
from app.db.repositories.data_path import KeyCredentials


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

    def list(
        self, *, after: tuple[datetime, uuid.UUID] | None = None, limit: int | None = None
    ) -> Sequence[Principal]:
        """In (created_at, id) order, from just after `after`; `limit` rows at most."""
        query = select(Principal).order_by(Principal.created_at, Principal.id).limit(limit)
        if after is not None:
            query = query.where(tuple_(Principal.created_at, Principal.id) > tuple_(*after))
        return self.session.scalars(query).all()


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
                Principal.rate_limit_rps,
                Principal.rate_limit_burst,
            )
            .join(Principal, Principal.id == ApiKey.principal_id)
            .where(ApiKey.id == key_id)
        ).first()
        return None if row is None else KeyCredentials(*row)

    def valid_key_issuers(self, principal_id: uuid.UUID) -> set[uuid.UUID | None]:
        """Who issued each unrevoked key of the principal (None: not recorded)."""
        query = select(ApiKey.issued_by).where(
            ApiKey.principal_id == principal_id, ApiKey.revoked_at.is_(None)
        )
        return set(self.session.scalars(query).all())

    def list_for(self, principal_id: uuid.UUID) -> Sequence[ApiKey]:
        query = select(ApiKey).where(ApiKey.principal_id == principal_id).order_by(ApiKey.created_at)
        return self.session.scalars(query).all()

    def revoke_all_for(self, principal_id: uuid.UUID, now: datetime) -> None:
        self.session.execute(
            update(ApiKey)
            .where(ApiKey.principal_id == principal_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=now)
        )
