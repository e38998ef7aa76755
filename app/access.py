"""Who may do what: the roles, every access rule as a pure function, and "active grant" in Python
and in SQL. No database, no FastAPI: models, schemas, services and routes all import this.

Data access (tokenize, detokenize) is decided by grants, not roles: GrantSet below."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal, Protocol, get_args

from sqlalchemy import ColumnElement, SQLColumnExpression, and_, or_


class Role(StrEnum):
    ADMIN = "admin"
    SERVICE = "service"
    AUDITOR = "auditor"


# Role gates of the admin routes (principals and grants) and of the audit trail.
ADMINS: frozenset[Role] = frozenset({Role.ADMIN})
AUDIT_READERS: frozenset[Role] = frozenset({Role.ADMIN, Role.AUDITOR})
# The console is for the roles that hold no data access.
CONSOLE_USERS: frozenset[Role] = frozenset({Role.ADMIN, Role.AUDITOR})
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


def may_decide_approvals(role: str) -> bool:
    """List, approve and reject four-eyes requests (who may approve which: approval_refusal)."""
    return role in ADMINS


def may_read_audit(role: str) -> bool:
    """Search the audit trail and verify its chain."""
    return role in AUDIT_READERS


def may_read_customer_report(role: str) -> bool:
    """The subject-access report (GDPR Art. 15): records and accesses, never a value. Read like
    the audit trail it is drawn from."""
    return may_read_audit(role)


def may_receive_grant(grantee_role: str) -> bool:
    return grantee_role in GRANTEES


KeyIssueRefusal = Literal["role_required", "other_admin", "grantee_holds_grants"]


def key_issue_refusal(actor: Party, target: Party, target_holds_grants: bool) -> KeyIssueRefusal | None:
    """Why `actor` may not issue a new API key to `target` (the audit reason), or None if it may.

    A principal rotates its own keys. An admin may issue keys to others only if they are not admins
    and hold no active or pending grant: holding another's key, it could act as that principal."""
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


# Dual control (four eyes): what waits for a second admin, and who may approve it.

# A grant of any of these reads, finds or destroys data, so it waits for a second admin.
APPROVAL_REQUIRED_OPERATIONS: frozenset[str] = frozenset({"Decrypt", "Lookup", "Erase"})

ApprovalKind = Literal["grant", "create_admin", "disable_admin", "revoke_admin_key"]
APPROVAL_KINDS: tuple[ApprovalKind, ...] = get_args(ApprovalKind)
# withdrawn: a pending grant revoked before anyone decided on it.
ApprovalState = Literal["pending", "approved", "rejected", "expired", "withdrawn"]
APPROVAL_STATES: tuple[ApprovalState, ...] = get_args(ApprovalState)
GrantStatus = Literal["pending", "active", "rejected", "revoked", "retired", "expired"]
GRANT_STATUSES: tuple[GrantStatus, ...] = get_args(GrantStatus)

ApprovalRefusal = Literal["second_admin_required", "key_issuer_conflict"]


def grant_needs_approval(operations: Iterable[str], dual_control: bool) -> bool:
    return dual_control and not APPROVAL_REQUIRED_OPERATIONS.isdisjoint(operations)


def admin_creation_needs_approval(role: str, dual_control: bool) -> bool:
    return dual_control and role in ADMINS


def disabling_needs_approval(target_role: str, dual_control: bool) -> bool:
    return dual_control and target_role in ADMINS


def key_revocation_needs_approval(actor: Party, owner: Party, dual_control: bool) -> bool:
    """Revoking another admin's key waits; one's own key, or a service's, is revoked at once."""
    return dual_control and owner.role in ADMINS and actor.id != owner.id


@dataclass(frozen=True, slots=True)
class KeyIssuers:
    """Who issued the valid (unrevoked) keys of the parties to an approval. None: not recorded
    (a key older than the record), which counts as anyone, so as a conflict."""

    requester: Collection[uuid.UUID | None]
    approver: Collection[uuid.UUID | None]
    # The grantee's keys, for a grant; empty for the other kinds.
    grantee: Collection[uuid.UUID | None] = ()


def approval_refusal(
    approver_id: uuid.UUID, requester_id: uuid.UUID, issuers: KeyIssuers
) -> ApprovalRefusal | None:
    """Why `approver_id` may not approve a request of `requester_id` (the error code), or None.

    Two distinct admins, and neither can act as another party through a key it was shown: the
    grantee holds no valid key the requester or the approver issued, and neither admin holds a
    valid key the other issued (an admin made through the API holds one until it rotates its own).
    A key issued by its holder itself is fine; an unknown issuer is not."""
    if approver_id == requester_id:
        return "second_admin_required"
    pair = {approver_id, requester_id}
    grantee_conflict = any(issuer is None or issuer in pair for issuer in issuers.grantee)
    approver_conflict = any(issuer is None or issuer == requester_id for issuer in issuers.approver)
    requester_conflict = any(issuer is None or issuer == approver_id for issuer in issuers.requester)
    if grantee_conflict or approver_conflict or requester_conflict:
        return "key_issuer_conflict"
    return None


class ApprovalRow(Protocol):
    @property
    def status(self) -> str: ...

    @property
    def expires_at(self) -> datetime: ...


def approval_status(approval: ApprovalRow, now: datetime) -> ApprovalState:
    """A pending request past its deadline is expired at once, whether or not the sweep has run."""
    if approval.status == "pending" and approval.expires_at <= now:
        return "expired"
    return approval.status  # type: ignore[return-value]  # checked by the table's constraint


# "Active grant", once in Python and once in SQL: approved if it needed approval, neither revoked
# nor retired, and not expired at `now` (a grant expiring exactly at `now` is expired).
# tests/test_access_rules.py checks they agree.


class GrantState(Protocol):
    @property
    def expires_at(self) -> datetime | None: ...

    @property
    def revoked_at(self) -> datetime | None: ...

    @property
    def retired_at(self) -> datetime | None: ...

    @property
    def awaiting_approval(self) -> bool: ...


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
        not grant.awaiting_approval
        and grant.revoked_at is None
        and grant.retired_at is None
        and (grant.expires_at is None or grant.expires_at > now)
    )


def grant_active_clause(
    expires_at: SQLColumnExpression[datetime | None],
    revoked_at: SQLColumnExpression[datetime | None],
    retired_at: SQLColumnExpression[datetime | None],
    now: datetime,
    *,
    awaiting_approval: SQLColumnExpression[bool],
) -> ColumnElement[bool]:
    # Never unknown (a NULL expires_at makes the OR true; awaiting_approval is NOT NULL), so its
    # NOT is exactly the inactive grants.
    return and_(
        awaiting_approval.is_(False),
        revoked_at.is_(None),
        retired_at.is_(None),
        or_(expires_at.is_(None), expires_at > now),
    )


def grant_status(grant: GrantState, approval: ApprovalState | None, now: datetime) -> GrantStatus:
    """What a grant response says: `approval` is the status of its four-eyes request, if any."""
    if grant.revoked_at is not None:
        return "revoked"
    if grant.retired_at is not None:
        return "retired"
    if grant.awaiting_approval:
        if approval == "rejected":
            return "rejected"
        if approval in ("expired", "withdrawn") or (grant.expires_at is not None and grant.expires_at <= now):
            return "expired"
        return "pending"
    if grant.expires_at is not None and grant.expires_at <= now:
        return "expired"
    return "active"


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


def may_learn_gone(decrypt: Decision, erase: Decision) -> bool:
    """Whether a caller is told that a record is erased or expired (410): only if its Decrypt or
    Erase grant covers the record. Anyone else gets exactly the answer for an unknown token, so a
    tombstone tells a stranger nothing (not even that the token once existed)."""
    return decrypt.allowed or erase.allowed


def grants_for(grants: Sequence[OperationGrant], operation: str) -> list[OperationGrant]:
    """The grants that name this operation, out of those read for several at once."""
    return [grant for grant in grants if operation in grant.operations]


class OperationGrant(GrantTerms, Protocol):
    @property
    def operations(self) -> Sequence[str]: ...


class GrantSet:
    """One principal's grants for one operation, read once per request and evaluated per record."""

    def __init__(self, grants: Sequence[GrantTerms], now: datetime) -> None:
        self._grants = grants
        self._now = now

    @property
    def any_active(self) -> bool:
        return any(grant_active(grant, self._now) for grant in self._grants)

    @property
    def active(self) -> list[GrantTerms]:
        """The grants an allowed decision may rest on: those active when the set was read (a
        revoked, retired or expired grant never becomes active again)."""
        return [grant for grant in self._grants if grant_active(grant, self._now)]

    def decide(self, context: Mapping[str, str]) -> Decision:
        matching = [grant for grant in self._grants if constraints_match(grant, context)]
        active = [grant for grant in matching if grant_active(grant, self._now)]
        if active:
            # A plain grant covering the record wins over a masked one: its holder may ask either.
            chosen = next((grant for grant in active if grant.reveal == PLAIN), active[0])
            return Decision(chosen.id, masked=chosen.reveal != PLAIN)
        # Deny: say why, for the audit trail only (the caller always sees grant_required).
        if any(g.awaiting_approval and g.revoked_at is None and g.retired_at is None for g in matching):
            return Decision(None, "grant_pending")
        if any(g.revoked_at is None and g.retired_at is None for g in matching):
            return Decision(None, "grant_expired")
        if any(g.revoked_at is not None for g in matching):
            return Decision(None, "grant_revoked")
        if matching:
            return Decision(None, "grant_retired")
        if self.any_active:
            return Decision(None, "context_mismatch")
        return Decision(None, "no_grant")
