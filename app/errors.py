"""The vault's one error hierarchy. Its mapping to HTTP statuses is in api/errors.py, nowhere else.

Messages are written for the caller and never carry a value, a key or a secret.
"""

from __future__ import annotations

from typing import Any, ClassVar


class VaultError(Exception):
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "the vault could not complete the request"

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        self.message = message or self.default_message
        self.field = field
        super().__init__(self.message)

    def details(self) -> dict[str, Any]:
        return {"field": self.field} if self.field else {}


class InvalidInput(VaultError):
    code = "invalid_input"
    default_message = "the request is not valid"


class PayloadTooLarge(VaultError):
    code = "too_large"
    default_message = "the request is too large"


class Unauthenticated(VaultError):
    code = "unauthenticated"
    default_message = "a valid API key is required: Authorization: Bearer <api key>"


class Forbidden(VaultError):
    code = "forbidden"
    default_message = "this principal may not do that"


class Denied(Forbidden):
    """A data operation refused by the grant check; carries the audit reason, never shown to the caller."""

    code = "grant_required"
    default_message = "no active grant allows this operation on this record"

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class AccessReasonRequired(VaultError):
    code = "access_reason_required"
    default_message = "this vault requires an X-Access-Reason header on detokenize"


class NotFound(VaultError):
    code = "not_found"
    default_message = "no such resource"


class Conflict(VaultError):
    code = "conflict"
    default_message = "the request conflicts with the current state"


class DependencyUnavailable(VaultError):
    """A dependency is down; the caller should retry later."""


class DatabaseUnavailable(DependencyUnavailable):
    code = "database_unavailable"
    default_message = "the vault's database is unavailable; retry later"


class KeyServiceUnavailable(DependencyUnavailable):
    code = "key_service_unavailable"
    default_message = "the key service is unavailable or throttling; retry later"


class KeyAccessDenied(DependencyUnavailable):
    """KMS refused the vault itself (disabled key, key policy): an operator must act."""

    code = "key_access_denied"
    default_message = "the key service refused the vault's request; an operator must check the key"


class AuditUnavailable(DependencyUnavailable):
    code = "audit_unavailable"
    default_message = "the audit trail could not be written, so the operation did not happen"


class IntegrityFailure(VaultError):
    """A stored record failed authentication: tampered, moved or corrupted. Deliberately opaque."""

    code = "record_integrity"
    default_message = "the record failed its integrity check and was not returned"
