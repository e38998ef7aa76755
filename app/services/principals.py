"""Principals and their API keys. Keys are shown once and stored only as a hash."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NoReturn, overload

from sqlalchemy.orm import Session

from app.access import (
    ADMINS,
    Role,
    admin_creation_needs_approval,
    disabling_needs_approval,
    key_issue_refusal,
    key_revocation_needs_approval,
    may_disable,
    may_revoke_key,
)
from app.db.models import ApiKey, Approval, Principal
from app.db.repositories import ApiKeyRepository, GrantRepository, PrincipalRepository
from app.db.repositories.data_path import EventRow, KeyCredentials
from app.db.session import Database
from app.errors import (
    Conflict,
    Forbidden,
    GranteeHoldsGrants,
    InvalidInput,
    NotFound,
    RateLimited,
    Unauthenticated,
)
from app.logs import bind_principal
from app.services.approvals import ApprovalQueue
from app.services.audit import Auditor, Subject, build_event
from app.services.context import Caller, RequestContext, utcnow
from app.services.limits import FailedAuthentications, PrincipalLimits

API_KEY_PREFIX = "pv_"
_KEY_ID_HEX = 16
# pv_<16 hex key id>_<43 url-safe chars of secret (256 bits)>
_API_KEY = re.compile(r"^pv_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
# Hashing a key that was never issued costs the same as hashing a real one.
_DUMMY_HASH = hashlib.sha256(b"piivault.apikey.dummy").digest()


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A freshly issued API key. `repr` never shows the secret."""

    key_id: str
    principal_id: uuid.UUID
    secret_key: str

    def __repr__(self) -> str:
        return f"IssuedKey(key_id={self.key_id!r}, principal_id={self.principal_id})"


@dataclass(frozen=True, slots=True)
class PresentedKey:
    """A bearer key split into its public id and its secret. `repr` never shows the secret."""

    key_id: str
    secret: str = field(repr=False)


def parse_api_key(presented: str | None) -> PresentedKey | None:
    match = _API_KEY.fullmatch(presented or "")
    return PresentedKey(match.group(1), match.group(2)) if match else None


def _hash_secret(key_id: str, secret: str) -> bytes:
    # The secret has 256 bits of entropy, so one SHA-256 is enough; no slow KDF needed.
    return hashlib.sha256(f"piivault.apikey.v1:{key_id}:{secret}".encode()).digest()


def _new_key(principal_id: uuid.UUID, issued_by: uuid.UUID) -> tuple[ApiKey, IssuedKey]:
    """A new key for `principal_id`, recording who is shown it (`issued_by`): dual control
    refuses approvals while a party holds a key the other admin was shown."""
    key_id = secrets.token_hex(_KEY_ID_HEX // 2)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(
        id=key_id, principal_id=principal_id, secret_hash=_hash_secret(key_id, secret), issued_by=issued_by
    )
    return row, IssuedKey(key_id, principal_id, f"{API_KEY_PREFIX}{key_id}_{secret}")


class PrincipalService:
    def __init__(
        self,
        database: Database,
        auditor: Auditor,
        queue: ApprovalQueue,
        limits: PrincipalLimits,
        failures: FailedAuthentications,
    ) -> None:
        self._database = database
        self._auditor = auditor
        self._queue = queue
        self._limits = limits
        self._failures = failures

    def authenticate(self, session: Session, presented: str | None, ctx: RequestContext) -> Caller:
        """Resolve a bearer key to its principal, in constant time for the secret part."""
        screened = self.screen(ctx)
        if screened is not None:
            refused, event = screened
            if event is not None:
                self._auditor.record_on_its_own([event])
            raise refused
        key = parse_api_key(presented)
        found = ApiKeyRepository(session).credentials(key.key_id) if key else None
        caller, refusal = self.admit(presented, key, found, ctx)
        if caller is None:
            if refusal is not None:
                self._auditor.record_on_its_own([refusal])
            raise Unauthenticated()
        return caller

    def screen(self, ctx: RequestContext) -> tuple[RateLimited, EventRow | None] | None:
        """Before any lookup: a source over its failed-authentication limit is refused (429), with
        the event to write now, if this is the first such refusal of its window (the rest are
        counted into one event). Keyed by source alone, so varying key ids adds no rows."""
        try:
            self._failures.refuse_if_over(ctx.source_ip)
        except RateLimited as refused:
            event = build_event("Authenticate", "denied", ctx, None, Subject(), "rate_limited")
            return refused, (event if self._failures.failed(event) else None)
        return None

    def flush_failed_authentications(self, everything: bool = False) -> int:
        """Write the aggregate events of repeated failed authentications whose window has ended."""
        events = self._failures.flush(everything)
        if events:
            self._auditor.record_on_its_own(events)
        return len(events)

    def admit(
        self,
        presented: str | None,
        key: PresentedKey | None,
        found: KeyCredentials | None,
        ctx: RequestContext,
    ) -> tuple[Caller | None, EventRow | None]:
        """The caller the presented key names, or None and the refusal to record now (None when
        it was counted into an aggregate event instead); the secret is compared in constant time,
        and hashed even for a key id nobody was issued. RateLimited if the caller is over its
        request rate."""
        expected = found.secret_hash if found else _DUMMY_HASH
        given = _hash_secret(key.key_id, key.secret) if key else b""
        secret_ok = hmac.compare_digest(expected, given)
        reason: str | None = None
        if key is None:
            reason = "malformed_key" if presented else "no_key"
        elif found is None or not secret_ok:
            reason = "unknown_key"
        elif found.key_revoked_at is not None:
            reason = "key_revoked"
        elif found.principal_disabled_at is not None:
            reason = "principal_disabled"
        if reason is not None or found is None or key is None:
            known = found if found and secret_ok else None
            caller = Caller(known.principal_id, known.principal_name, known.role) if known else None
            subject = Subject(target_id=key.key_id if key else None)
            event = build_event("Authenticate", "denied", ctx, caller, subject, reason)
            return None, (event if self._failures.failed(event) else None)
        bind_principal(found.principal_id)  # for this request's log lines
        self._limits.check(found.principal_id, found.rate_limit_rps, found.rate_limit_burst)
        return Caller(found.principal_id, found.principal_name, found.role, key.key_id), None

    @overload
    def create(
        self, session: Session, actor: None, name: str, role: str, ctx: RequestContext
    ) -> tuple[Principal, IssuedKey]: ...

    @overload
    def create(
        self, session: Session, actor: Caller, name: str, role: str, ctx: RequestContext
    ) -> tuple[Principal, IssuedKey] | Approval: ...

    def create(
        self, session: Session, actor: Caller | None, name: str, role: str, ctx: RequestContext
    ) -> tuple[Principal, IssuedKey] | Approval:
        """Create a principal with its first key, shown to `actor`. An admin made by an admin
        waits for a second admin under dual control (an Approval is returned instead). No actor:
        made outside the API, by someone with database credentials (see create_break_glass_admin)."""
        if actor is not None and admin_creation_needs_approval(role, self._queue.enabled):
            if PrincipalRepository(session).name_taken(name):
                raise Conflict(f"a principal named {name!r} already exists", field="name")
            return self._queue.open(session, actor, "create_admin", None, {"name": name, "role": role}, ctx)
        return self.create_approved(session, actor, name, role, ctx)

    def create_approved(
        self, session: Session, actor: Caller | None, name: str, role: str, ctx: RequestContext
    ) -> tuple[Principal, IssuedKey]:
        """Create now: for create() and for the approval of a create_admin request."""
        principal, issued, _ = self._create_now(session, actor, name, role, ctx)
        return principal, issued

    def create_break_glass_admin(self, name: str, ctx: RequestContext) -> tuple[Principal, IssuedKey]:
        """`piivault admin create`: an admin made with database credentials, outside dual control
        (bootstrap or break-glass). Audited in its own transaction, then an alert naming the
        audit event: someone must look at it."""
        with self._database.transaction() as session:
            principal, issued, events = self._create_now(session, None, name, Role.ADMIN, ctx)
        self._auditor.alert("break_glass", events[:1])
        return principal, issued

    def _create_now(
        self, session: Session, actor: Caller | None, name: str, role: str, ctx: RequestContext
    ) -> tuple[Principal, IssuedKey, list[EventRow]]:
        principals = PrincipalRepository(session)
        if principals.name_taken(name):
            raise Conflict(f"a principal named {name!r} already exists", field="name")
        principal = principals.add(Principal(id=uuid.uuid4(), name=name, role=role))
        # No actor (the CLI): the admin is shown its own key, so it issued it to itself.
        row, issued = _new_key(principal.id, actor.id if actor is not None else principal.id)
        ApiKeyRepository(session).add(row)
        events = [
            build_event("CreatePrincipal", "allowed", ctx, actor, Subject(target_id=str(principal.id))),
            build_event("CreateApiKey", "allowed", ctx, actor, Subject(target_id=row.id)),
        ]
        self._auditor.record(session, events)
        return principal, issued, events

    def get(self, session: Session, principal_id: uuid.UUID) -> Principal:
        principal = PrincipalRepository(session).get(principal_id)
        if principal is None:
            raise NotFound("no principal with this id", field="id")
        return principal

    def resolve(self, session: Session, reference: str) -> Principal:
        """A principal by id or by name."""
        principals = PrincipalRepository(session)
        principal: Principal | None
        try:
            principal = principals.get(uuid.UUID(reference))
        except ValueError:
            principal = principals.get_by_name(reference)
        if principal is None:
            raise InvalidInput("no principal with this id or name", field="grantee")
        return principal

    def list(
        self, session: Session, *, after: tuple[datetime, uuid.UUID] | None = None, limit: int | None = None
    ) -> Sequence[Principal]:
        return PrincipalRepository(session).list(after=after, limit=limit)

    def keys_of(self, session: Session, principal_id: uuid.UUID) -> Sequence[ApiKey]:
        return ApiKeyRepository(session).list_for(principal_id)

    def add_key(
        self, session: Session, actor: Caller, principal_id: uuid.UUID, ctx: RequestContext
    ) -> IssuedKey:
        principal = self.get(session, principal_id)
        if principal.disabled_at is not None:
            raise Conflict("the principal is disabled", field="id")
        if actor.id != principal.id:
            holds_grants = GrantRepository(session).any_active_or_pending_for(principal.id, utcnow())
            reason = key_issue_refusal(actor, principal, holds_grants)
            if reason is not None:
                refused = build_event(
                    "CreateApiKey", "denied", ctx, actor, Subject(target_id=str(principal.id)), reason
                )
                self._auditor.record_on_its_own([refused])
                if reason == "grantee_holds_grants":
                    raise GranteeHoldsGrants()
                raise Forbidden(
                    "only an admin itself can get a new key for it"
                    if reason == "other_admin"
                    else "this action needs the admin role"
                )
        row, issued = _new_key(principal.id, actor.id)
        ApiKeyRepository(session).add(row)
        self._auditor.record(
            session, [build_event("CreateApiKey", "allowed", ctx, actor, Subject(target_id=row.id))]
        )
        return issued

    def revoke_key(
        self,
        session: Session,
        actor: Caller,
        principal_id: uuid.UUID,
        key_id: str,
        ctx: RequestContext,
    ) -> ApiKey | Approval:
        """Revoke a key at once; another admin's key waits for a second admin under dual control
        (an Approval is returned instead). A principal revokes its own keys at once."""
        if not may_revoke_key(actor, principal_id):
            self._refuse_role(actor, ADMINS, "RevokeApiKey", ctx)
        key = ApiKeyRepository(session).get(key_id)
        if key is None or key.principal_id != principal_id:
            raise NotFound("no such key for this principal", field="key_id")
        owner = self.get(session, principal_id)
        if key.revoked_at is None and key_revocation_needs_approval(actor, owner, self._queue.enabled):
            details = {"principal_id": str(owner.id), "principal_name": owner.name, "key_id": key.id}
            return self._queue.open(session, actor, "revoke_admin_key", key.id, details, ctx)
        return self.revoke_key_approved(session, actor, principal_id, key_id, ctx)

    def revoke_key_approved(
        self, session: Session, actor: Caller, principal_id: uuid.UUID, key_id: str, ctx: RequestContext
    ) -> ApiKey:
        """Revoke now: for revoke_key() and for the approval of a revoke_admin_key request."""
        key = ApiKeyRepository(session).get(key_id)
        if key is None or key.principal_id != principal_id:
            raise NotFound("no such key for this principal", field="key_id")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            self._auditor.record(
                session, [build_event("RevokeApiKey", "allowed", ctx, actor, Subject(target_id=key_id))]
            )
        return key

    def disable(
        self, session: Session, actor: Caller, principal_id: uuid.UUID, ctx: RequestContext
    ) -> Principal | Approval:
        """Disable at once; an admin waits for a second admin under dual control (an Approval is
        returned instead)."""
        principal = self.get(session, principal_id)
        if not may_disable(actor, principal.id):
            raise Forbidden("an admin cannot disable itself")
        if principal.disabled_at is None and disabling_needs_approval(principal.role, self._queue.enabled):
            details = {"principal_id": str(principal.id), "name": principal.name}
            return self._queue.open(session, actor, "disable_admin", str(principal.id), details, ctx)
        return self.disable_approved(session, actor, principal_id, ctx)

    def disable_approved(
        self, session: Session, actor: Caller, principal_id: uuid.UUID, ctx: RequestContext
    ) -> Principal:
        """Disable now: for disable() and for the approval of a disable_admin request."""
        principal = self.get(session, principal_id)
        if principal.disabled_at is None:
            now = utcnow()
            principal.disabled_at = now
            ApiKeyRepository(session).revoke_all_for(principal.id, now)
            self._auditor.record(
                session,
                [
                    build_event(
                        "DisablePrincipal", "allowed", ctx, actor, Subject(target_id=str(principal.id))
                    )
                ],
            )
        return principal

    def set_rate_limit(
        self,
        session: Session,
        actor: Caller,
        principal_id: uuid.UUID,
        limit: tuple[int, int] | None,
        ctx: RequestContext,
    ) -> Principal:
        """Set a principal's own request rate (rps, burst), or None for the vault's defaults.
        Effective at once on every replica: it is read with the key on each request."""
        principal = self.get(session, principal_id)
        rps, burst = limit if limit is not None else (None, None)
        if rps is not None and burst is not None and burst < rps:
            raise InvalidInput("burst must be at least rps", field="burst")
        principal.rate_limit_rps, principal.rate_limit_burst = rps, burst
        # Which limit was set is on the principal; the event says who set it, when and for whom.
        self._auditor.record(
            session,
            [build_event("SetRateLimit", "allowed", ctx, actor, Subject(target_id=str(principal.id)))],
        )
        return principal

    def require_role(self, caller: Caller, roles: Collection[Role], action: str, ctx: RequestContext) -> None:
        """Refuse (and audit) a caller whose role does not allow this action."""
        if caller.role not in roles:
            self._refuse_role(caller, roles, action, ctx)

    def _refuse_role(
        self, caller: Caller, roles: Collection[Role], action: str, ctx: RequestContext
    ) -> NoReturn:
        self._auditor.record_on_its_own(
            [build_event(action, "denied", ctx, caller, Subject(), "role_required")]
        )
        raise Forbidden(f"this action needs the {' or '.join(sorted(roles))} role")
