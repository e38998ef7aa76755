"""Console sign-in: an admin's or auditor's API key exchanged once for a short server-side session.

The browser holds only a random session secret (the cookie) and never the API key. The session is
bound to the key: revoking the key, or disabling the principal, ends it. Every state-changing form
carries the session's CSRF token, compared in constant time. The console acts through the same
services, with the same rules and audit, as the JSON API.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from app.access import CONSOLE_USERS
from app.db.models import ConsoleSession
from app.db.repositories import ConsoleSessionRepository
from app.services.audit import Auditor, Subject, build_event
from app.services.context import Caller, RequestContext, utcnow
from app.services.principals import PrincipalService

SIGN_IN = "ConsoleSignIn"
SIGN_OUT = "ConsoleSignOut"
# Longer than any secret we make: a longer cookie is not one of ours and is not looked up.
_MAX_SECRET_CHARS = 128


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class ConsoleLogin:
    """Who a console request acts as, and the token its forms must carry."""

    caller: Caller
    csrf_token: str

    def __repr__(self) -> str:
        return f"ConsoleLogin(caller={self.caller.name!r})"

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf_token.encode())


class ConsoleSessions:
    def __init__(
        self, principals: PrincipalService, auditor: Auditor, *, idle_s: int, absolute_s: int
    ) -> None:
        self._principals = principals
        self._auditor = auditor
        self._idle = timedelta(seconds=idle_s)
        self._absolute = timedelta(seconds=absolute_s)

    def sign_in(self, session: Session, api_key: str | None, ctx: RequestContext) -> tuple[str, ConsoleLogin]:
        """The new session's secret (for the cookie) and login. A bad key is refused as the API
        refuses it (Unauthenticated, audited); a service principal's key is refused (Denied,
        audited): the console is for the roles that hold no data access."""
        caller = self._principals.authenticate(session, api_key, ctx)
        self._principals.require_role(caller, CONSOLE_USERS, SIGN_IN, ctx)
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = utcnow()
        assert caller.key_id is not None  # noqa: S101 (authenticate names the key it admitted)
        ConsoleSessionRepository(session).add(
            ConsoleSession(
                secret_hash=_hash(secret),
                principal_id=caller.id,
                api_key_id=caller.key_id,
                csrf_token=csrf,
                created_at=now,
                last_seen_at=now,
                expires_at=now + self._absolute,
            )
        )
        event = build_event(SIGN_IN, "allowed", ctx, caller, Subject(target_id=caller.key_id), None)
        self._auditor.record(session, [event])
        return secret, ConsoleLogin(caller, csrf)

    def resume(self, session: Session, secret: str | None) -> ConsoleLogin | None:
        """The login a cookie names, if its session still stands; its idle clock restarts."""
        if not secret or len(secret) > _MAX_SECRET_CHARS:
            return None
        now = utcnow()
        repository = ConsoleSessionRepository(session)
        live = repository.live(_hash(secret), now, now - self._idle)
        if live is None:
            return None
        repository.touch(live.session.secret_hash, now)
        principal = live.principal
        caller = Caller(principal.id, principal.name, principal.role, live.session.api_key_id)
        return ConsoleLogin(caller, live.session.csrf_token)

    def sign_out(self, session: Session, secret: str, login: ConsoleLogin, ctx: RequestContext) -> None:
        if ConsoleSessionRepository(session).end(_hash(secret), utcnow()):
            subject = Subject(target_id=login.caller.key_id)
            self._auditor.record(
                session, [build_event(SIGN_OUT, "allowed", ctx, login.caller, subject, None)]
            )
