"""Tables. Values are stored only as ciphertext; nothing here holds a secret in clear."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ColumnElement,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.ext.hybrid import hybrid_method
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship

from app.access import (
    APPROVAL_KINDS,
    APPROVAL_STATES,
    ApprovalState,
    GrantStatus,
    Role,
    approval_status,
    grant_active,
    grant_active_clause,
    grant_status,
)


class Base(DeclarativeBase):
    pass


def _now() -> Any:
    return func.now()


class Principal(Base):
    __tablename__ = "principals"
    __table_args__ = (
        CheckConstraint(f"role IN ({', '.join(repr(str(role)) for role in Role)})", name="role_known"),
        CheckConstraint(
            "(rate_limit_rps IS NULL) = (rate_limit_burst IS NULL)"
            " AND (rate_limit_rps IS NULL OR (rate_limit_rps >= 1 AND rate_limit_burst >= rate_limit_rps))",
            name="rate_limit_positive",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set by an admin for this principal; NULL: the vault's defaults (both or neither).
    rate_limit_rps: Mapped[int | None] = mapped_column(Integer)
    rate_limit_burst: Mapped[int | None] = mapped_column(Integer)

    def __repr__(self) -> str:
        return f"Principal(id={self.id}, name={self.name!r}, role={self.role!r})"


class ApiKey(Base):
    __tablename__ = "api_keys"

    # The public half of the key; the secret half is stored only as a hash.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    principal_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("principals.id"), index=True)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Who was shown the key when it was issued: an admin, or the principal itself (rotation, and
    # the CLI's bootstrap admins). NULL: issued before this was recorded, so unknown; dual control
    # treats an unknown issuer as a conflict (app.access.approval_refusal).
    issued_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("principals.id"))

    def __repr__(self) -> str:
        return f"ApiKey(id={self.id!r}, principal_id={self.principal_id})"


class Approval(Base):
    """A four-eyes request: made by one admin, carried out only when another approves it."""

    __tablename__ = "approvals"
    __table_args__ = (
        CheckConstraint(
            f"kind IN ({', '.join(repr(k) for k in APPROVAL_KINDS)})", name="approval_kind_known"
        ),
        CheckConstraint(
            f"status IN ({', '.join(repr(s) for s in APPROVAL_STATES)})", name="approval_status_known"
        ),
        # The sweep's work list: pending requests by deadline.
        Index("ix_approvals_status_expires_at", "status", "expires_at"),
        Index("ix_approvals_created_at_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(32))
    # As stored: a pending request past expires_at is expired whatever this says (approval_status).
    status: Mapped[str] = mapped_column(String(16))
    requested_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("principals.id"))
    # The grant, principal or key the request is about (for create_admin: the admin, once made).
    target_id: Mapped[str | None] = mapped_column(String(128))
    # What is asked, in identifiers and names only: never a key or a value.
    details: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("principals.id"))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    def status_at(self, now: datetime) -> ApprovalState:
        return approval_status(self, now)

    def __repr__(self) -> str:
        return f"Approval(id={self.id}, kind={self.kind!r}, status={self.status!r})"


class Grant(Base):
    __tablename__ = "grants"
    __table_args__ = (
        CheckConstraint(
            "constraint_kind IS NULL OR constraint_kind IN "
            "('encryption_context_subset', 'encryption_context_equals')",
            name="constraint_kind_known",
        ),
        CheckConstraint("cardinality(operations) > 0", name="operations_not_empty"),
        CheckConstraint("reveal IN ('plain', 'masked')", name="reveal_known"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    name: Mapped[str | None] = mapped_column(String(256))
    grantee_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("principals.id"), index=True)
    operations: Mapped[list[str]] = mapped_column(ARRAY(Text))
    constraint_kind: Mapped[str | None] = mapped_column(String(32))
    constraint_context: Mapped[dict[str, str] | None] = mapped_column(JSONB)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    created_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("principals.id"))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    kms_grant_id: Mapped[str | None] = mapped_column(String(128))
    # Set once the KMS mirror is revoked (after revoke, retire or expiry), so sweeps skip it.
    kms_revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set once the expiry has its audit event, so it is recorded exactly once.
    expiry_audited_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What its Decrypt reveals: the value, or only the value's mask ("masked").
    reveal: Mapped[str] = mapped_column(String(8), server_default=text("'plain'"))
    # Dual control: a data grant waits for a second admin and matches nothing until approved.
    # (Default false: grants made before dual control, or needing no approval, are not waiting.)
    awaiting_approval: Mapped[bool] = mapped_column(Boolean, server_default=text("false"), default=False)
    approval_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("approvals.id"))
    approved_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("principals.id"))
    approved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    approval: Mapped[Approval | None] = relationship(lazy="selectin", foreign_keys=[approval_id])

    def _active_at(self, now: datetime) -> bool:
        return grant_active(self, now)

    @classmethod
    def _active_at_clause(cls, now: datetime) -> ColumnElement[bool]:
        return grant_active_clause(
            cls.expires_at, cls.revoked_at, cls.retired_at, now, awaiting_approval=cls.awaiting_approval
        )

    def status_at(self, now: datetime) -> GrantStatus:
        return grant_status(self, self.approval.status_at(now) if self.approval else None, now)

    # grant.active_at(now) in Python, Grant.active_at(now) in a query: app.access has both twins.
    active_at = hybrid_method(_active_at, _active_at_clause)

    def __repr__(self) -> str:
        return f"Grant(id={self.id}, grantee_id={self.grantee_id}, operations={self.operations})"


class KmsGrantMirror(Base):
    """One KMS grant mirroring a vault grant, on one master key: made on the current key when the
    grant becomes active, and on a rewrap's target key (a grant has one per key it covers). Revoked
    with the grant, on the key that holds it. `kms_key_arn` is None for mirrors made before keys
    were recorded (migration 0011): those are looked for on every allowed key."""

    __tablename__ = "grant_mirrors"
    __table_args__ = (
        # One mirror per grant and key: a rewrap run again finds it and makes no second one.
        Index(
            "uq_grant_mirrors_grant_key",
            "grant_id",
            "kms_key_arn",
            unique=True,
            postgresql_where=text("kms_key_arn IS NOT NULL"),
        ),
    )

    grant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("grants.id", ondelete="CASCADE"), primary_key=True)
    kms_grant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kms_key_arn: Mapped[str | None] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    def __repr__(self) -> str:
        return f"KmsGrantMirror(grant_id={self.grant_id}, kms_key_arn={self.kms_key_arn!r})"


class Record(Base):
    """A stored value, or once erased its tombstone: the secret columns are NULL then (a CHECK
    holds both ways), and erased_at and erasure_reason say when and why."""

    __tablename__ = "records"
    __table_args__ = (
        Index("ix_records_customer_id", "customer_id"),
        # The retention sweeper's work list.
        Index(
            "ix_records_expires_at_live",
            "expires_at",
            postgresql_where=text("erased_at IS NULL AND expires_at IS NOT NULL"),
        ),
        CheckConstraint(
            "(erased_at IS NULL AND format_version IS NOT NULL AND ciphertext IS NOT NULL"
            " AND wrapped_key IS NOT NULL AND kms_key_id IS NOT NULL)"
            " OR (erased_at IS NOT NULL AND ciphertext IS NULL AND wrapped_key IS NULL"
            " AND kms_key_id IS NULL AND fingerprint IS NULL)",
            name="records_tombstone_holds_no_secret",
        ),
        Index(
            "ix_records_fingerprint",
            "data_type",
            "fingerprint",
            postgresql_where=text("fingerprint IS NOT NULL"),
        ),
    )

    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(128))
    data_type: Mapped[str] = mapped_column(String(64))
    format_version: Mapped[int | None] = mapped_column(SmallInteger)
    ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    kms_key_id: Mapped[str | None] = mapped_column(String(2048))
    # Retention: refused from this time on, then erased by the sweeper.
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Why it was erased: the eraser's access reason, or the retention expiry. Never a value.
    erasure_reason: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    # The principal who stored it. Not a foreign key on purpose: the check would lock the
    # principal's row (FOR KEY SHARE) on every tokenize, one hot row for all of a service's
    # requests. Principals are never deleted (only disabled), so the reference cannot dangle.
    created_by: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    # HMAC of the normalised value under the fingerprint key (lookup by value); NULL for types
    # without lookup and for records written before fingerprints (`piivault fingerprints backfill`).
    fingerprint: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)

    def __repr__(self) -> str:
        return f"Record(token={self.token!r}, data_type={self.data_type!r})"


class DataType(Base):
    """A registered data type (app/datatypes.py has its rules): tokenize refuses any other."""

    __tablename__ = "data_types"
    __table_args__ = (
        CheckConstraint(
            "normalize IN ('none', 'strip_separators', 'lowercase', 'digits')", name="normalize_known"
        ),
        CheckConstraint("mask IN ('last4', 'ssn', 'email', 'year', 'none')", name="mask_known"),
        CheckConstraint(
            "max_retention_days IS NULL OR max_retention_days > 0", name="max_retention_days_positive"
        ),
    )

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    builtin: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    pattern: Mapped[str | None] = mapped_column(Text)
    normalize: Mapped[str] = mapped_column(String(32), server_default=text("'none'"))
    mask: Mapped[str] = mapped_column(String(16), server_default=text("'none'"))
    lookup: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    max_retention_days: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    def __repr__(self) -> str:
        return f"DataType(name={self.name!r})"


class AuditChainLink(Base):
    """An event's place in the audit chain, written once by the sealer: its sequence number, the
    previous link's MAC and the chain MAC binding the two to the event's own MAC. Links live apart
    from the events so that an event row, once written, is never updated."""

    __tablename__ = "audit_chain"
    __table_args__ = (CheckConstraint("seq >= 1", name="audit_chain_seq_positive"),)

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_row_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    prev_mac: Mapped[bytes] = mapped_column(LargeBinary)
    mac: Mapped[bytes] = mapped_column(LargeBinary)


# The writing transaction's id, as a plain bigint (xid8 has no SQLAlchemy type): the sealer
# finds its work by comparing it with its horizon (audit_chain_head.sealed_below, pending_xids).
CURRENT_TRANSACTION_ID = "(pg_current_xact_id()::text)::bigint"


class AuditEvent(Base):
    """One allow, deny or error. Never holds a value, a data key or an API key. Written once,
    never updated: its place in the chain is an AuditChainLink."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_time", "time"),
        Index("ix_audit_events_customer_id", "customer_id"),
        Index("ix_audit_events_token", "token"),
        Index("ix_audit_events_principal_id", "principal_id"),
        Index("ix_audit_events_action_outcome", "action", "outcome"),
        # The sealer's work list, paged in (written_xid, id) order.
        Index("ix_audit_events_written_xid", "written_xid", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), unique=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    request_id: Mapped[str | None] = mapped_column(String(128))
    principal_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    principal_name: Mapped[str | None] = mapped_column(String(128))
    # Which of the principal's keys was used: a key issued to someone else shows here.
    api_key_id: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64))
    token: Mapped[str | None] = mapped_column(String(64))
    customer_id: Mapped[str | None] = mapped_column(String(128))
    data_type: Mapped[str | None] = mapped_column(String(64))
    grant_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    target_id: Mapped[str | None] = mapped_column(String(128))
    access_reason: Mapped[str | None] = mapped_column(String(512))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    kms_request_id: Mapped[str | None] = mapped_column(String(128))
    # This event stands for this many more identical failed authentications (NULL: just itself).
    repeat_count: Mapped[int | None] = mapped_column(Integer)
    # Tamper evidence, at write: the MAC key's version and a MAC over every field. Nullable on
    # purpose: a row inserted behind the vault's back is found, not refused.
    key_version: Mapped[int | None] = mapped_column(SmallInteger)
    event_mac: Mapped[bytes | None] = mapped_column(LargeBinary)
    written_xid: Mapped[int] = mapped_column(BigInteger, server_default=text(CURRENT_TRANSACTION_ID))
    # Its place in the chain, once sealed (None before).
    chain_seq: Mapped[int | None] = column_property(
        select(AuditChainLink.seq)
        .where(AuditChainLink.event_row_id == id)
        .correlate_except(AuditChainLink)
        .scalar_subquery()
    )


class AuditChainHead(Base):
    """The last link of the audit chain, advanced only by the sealer."""

    __tablename__ = "audit_chain_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    mac: Mapped[bytes] = mapped_column(LargeBinary)
    # Every event written by a transaction older than sealed_below and not in pending_xids (those
    # still running when the sealer last looked) is sealed, or can never be.
    sealed_below: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    pending_xids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), server_default=text("'{}'"))


class AuditKey(Base):
    """The audit chain's HMAC key, wrapped by the key provider: the database alone cannot forge MACs."""

    __tablename__ = "audit_keys"

    version: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    kms_key_id: Mapped[str] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    def __repr__(self) -> str:
        return f"AuditKey(version={self.version})"


class IdempotencyKey(Base):
    """An Idempotency-Key entry: claimed under a lease, then completed with the answer to replay.
    The body is kept only as an HMAC under a vault key; the answer holds no plaintext and no API
    key. No foreign key to principals, for the reason records.created_by has none."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        Index("ix_idempotency_keys_created_at", "created_at"),
        Index("ix_idempotency_keys_tokens", "tokens", postgresql_using="gin"),
    )

    principal_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    method: Mapped[str] = mapped_column(String(8), primary_key=True)
    path: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    body_mac: Mapped[bytes] = mapped_column(LargeBinary)
    mac_key_version: Mapped[int] = mapped_column(SmallInteger)
    lease_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    response_status: Mapped[int | None] = mapped_column(SmallInteger)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary)
    tokens: Mapped[list[str]] = mapped_column(ARRAY(String(64)), server_default=text("'{}'"))

    def __repr__(self) -> str:
        return f"IdempotencyKey(method={self.method!r}, path={self.path!r})"


class ConsoleSession(Base):
    """A console sign-in: the cookie's secret is stored only as its SHA-256. Bound to the API key
    it was exchanged for, so revoking the key or disabling the principal ends it."""

    __tablename__ = "console_sessions"

    secret_hash: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    principal_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("principals.id"), index=True)
    api_key_id: Mapped[str] = mapped_column(String(32))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    def __repr__(self) -> str:
        return f"ConsoleSession(principal_id={self.principal_id})"


class VaultKey(Base):
    """One of the vault's own secret keys (the fingerprint key, ...), one per purpose, wrapped by
    the key provider under the context {"purpose": "piivault-<purpose>"}."""

    __tablename__ = "vault_keys"

    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    kms_key_id: Mapped[str] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    def __repr__(self) -> str:
        return f"VaultKey(purpose={self.purpose!r})"
