"""Who may do what: the roles, every access rule as a pure function, and "active grant" in Python
and in SQL. No database, no FastAPI: models, schemas, services and routes all import this.

Data access (tokenize, detokenize) is decided by grants, not roles: GrantSet below."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal, Protocol

from sqlalchemy import ColumnElement, SQLColumnExpression, and_, or_


class Role(StrEnum):
    ADMIN = "admin"
    SERVICE = "service"
    AUDITOR = "auditor"


# Role gates of the admin routes (principals and grants) and of the audit trail.
ADMINS: frozenset[Role] = frozenset({Role.ADMIN})
AUDIT_READERS: frozenset[Role] = frozenset({Role.ADMIN, Role.AUDITOR})
# Separation of duties: data access goes to service principals only, never to admins (who could
# otherwise grant themselves) or auditors.
GRANTEES: frozenset[Role] = frozenset({Role.SERVICE})


class Party(Protocol):
    """A principal as the rules see it: a caller, or the principal it acts on."""

    @property
    def id(self) -> uuid.UUID: ...

    @property
    def role(self) -> str: ...


def may_manage_principals(role: str) -> bool:
    """Create, list, show and disable principals."""
    return role in ADMINS


def may_manage_grants(role: str) -> bool:
    """Create, list, show and revoke grants."""
    return role in ADMINS


def may_read_audit(role: str) -> bool:
    """Search the audit trail and verify its chain."""
    return role in AUDIT_READERS


def may_receive_grant(grantee_role: str) -> bool:
    return grantee_role in GRANTEES


KeyIssueRefusal = Literal["role_required", "other_admin", "grantee_holds_grants"]


def key_issue_refusal(actor: Party, target: Party, target_holds_grants: bool) -> KeyIssueRefusal | None:
    """Why `actor` may not issue a new API key to `target` (the audit reason), or None if it may.

    A principal rotates its own keys. An admin may issue keys to others only if they are not admins
    and hold no active grant: holding another's key, it could act as that principal."""
    if actor.id == target.id:
        return None
    if actor.role not in ADMINS:
        return "role_required"
    if target.role in ADMINS:
        return "other_admin"
    if target_holds_grants:
        return "grantee_holds_grants"
    return None


def may_issue_key(actor: Party, target: Party, target_holds_grants: bool) -> bool:
    return key_issue_refusal(actor, target, target_holds_grants) is None


def may_revoke_key(actor: Party, owner_id: uuid.UUID) -> bool:
    """An admin, or the key's own principal."""
    return actor.id == owner_id or actor.role in ADMINS


def may_disable(actor: Party, target_id: uuid.UUID) -> bool:
    """An admin disables others, never itself (the last admin could lock everyone out)."""
    return actor.role in ADMINS and actor.id != target_id


def may_retire_grant(actor: Party, grantee_id: uuid.UUID) -> bool:
    """Only the grantee gives up its grant; not even an admin (who revokes instead)."""
    return actor.id == grantee_id


# "Active grant", once in Python and once in SQL: neither revoked nor retired, and not expired at
# `now` (a grant expiring exactly at `now` is expired). tests/test_access_rules.py checks they agree.


class GrantState(Protocol):
    @property
    def expires_at(self) -> datetime | None: ...

    @property
    def revoked_at(self) -> datetime | None: ...

    @property
    def retired_at(self) -> datetime | None: ...


class GrantTerms(GrantState, Protocol):
    """What a data-access decision reads of a grant (a plain row on the data path)."""

    @property
    def id(self) -> uuid.UUID: ...

    @property
    def constraint_kind(self) -> str | None: ...

    @property
    def constraint_context(self) -> dict[str, str] | None: ...

    @property
    def reveal(self) -> str: ...


def grant_active(grant: GrantState, now: datetime) -> bool:
    return (
        grant.revoked_at is None
        and grant.retired_at is None
        and (grant.expires_at is None or grant.expires_at > now)
    )


def grant_active_clause(
    expires_at: SQLColumnExpression[datetime | None],
    revoked_at: SQLColumnExpression[datetime | None],
    retired_at: SQLColumnExpression[datetime | None],
    now: datetime,
) -> ColumnElement[bool]:
    # Never unknown (a NULL expires_at makes the OR true), so its NOT is exactly the inactive grants.
    return and_(
        revoked_at.is_(None),
        retired_at.is_(None),
        or_(expires_at.is_(None), expires_at > now),
    )


# Data access: a caller's grants for one operation, decided per record context.

SUBSET = "encryption_context_subset"
EQUALS = "encryption_context_equals"
# A grant's reveal: "plain" (the value) or "masked" (only its mask, whatever the caller asks).
# Anything but "plain" counts as masked: fail closed.
PLAIN = "plain"


def constraints_match(grant: GrantTerms, context: Mapping[str, str]) -> bool:
    """KMS semantics: subset = every pair is in the context; equals = the context is exactly this."""
    wanted = grant.constraint_context or {}
    if grant.constraint_kind == EQUALS:
        return dict(context) == wanted
    if grant.constraint_kind == SUBSET:
        return all(context.get(key) == value for key, value in wanted.items())
    return True


@dataclass(frozen=True, slots=True)
class Decision:
    """Allowed under grant_id, or denied for deny_reason (for the audit trail only). masked: the
    grant allowing it reveals only the masked form of a value."""

    grant_id: uuid.UUID | None
    deny_reason: str = ""
    masked: bool = False

    @property
    def allowed(self) -> bool:
        return self.grant_id is not None


class GrantSet:
    """One principal's grants for one operation, read once per request and evaluated per record."""

    def __init__(self, grants: Sequence[GrantTerms], now: datetime) -> None:
        self._grants = grants
        self._now = now

    @property
    def any_active(self) -> bool:
        return any(grant_active(grant, self._now) for grant in self._grants)

    def decide(self, context: Mapping[str, str]) -> Decision:
        matching = [grant for grant in self._grants if constraints_match(grant, context)]
        active = [grant for grant in matching if grant_active(grant, self._now)]
        if active:
            # A plain grant covering the record wins over a masked one: its holder may ask either.
            chosen = next((grant for grant in active if grant.reveal == PLAIN), active[0])
            return Decision(chosen.id, masked=chosen.reveal != PLAIN)
        # Deny: say why, for the audit trail only (the caller always sees grant_required).
        if any(g.revoked_at is None and g.retired_at is None for g in matching):
            return Decision(None, "grant_expired")
        if matching:
            return Decision(None, "grant_revoked")
        if self.any_active:
            return Decision(None, "context_mismatch")
        return Decision(None, "no_grant")
