"""The vault's one error hierarchy. Its mapping to HTTP statuses is in api/errors.py, nowhere else.

Messages are written for the caller and never carry a value, a key or a secret.
"""

from __future__ import annotations

from typing import Any, ClassVar


class VaultError(Exception):
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "the vault could not complete the request"
    # Whether the same request may succeed later unchanged: only a dependency that is down for now.
    retryable: ClassVar[bool] = False

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        self.message = message or self.default_message
        self.field = field
        super().__init__(self.message)

    def details(self) -> dict[str, Any]:
        return {"field": self.field} if self.field else {}


class InvalidInput(VaultError):
    code = "invalid_input"
    default_message = "the request is not valid"


class UnknownDataType(InvalidInput):
    """A data type that is not registered (GET /v1/data-types lists those that are)."""

    code = "unknown_data_type"
    default_message = "the data type is not registered"


class InvalidValue(InvalidInput):
    """A value that is not of its data type. The message names the field and the type, never the value."""

    code = "invalid_value"
    default_message = "the value does not match its data type"


class LookupNotEnabled(InvalidInput):
    """A lookup (or a deduplicating tokenize) on a data type whose `lookup` flag is off: its
    records carry no fingerprint."""

    code = "lookup_not_enabled"
    default_message = "lookup by value is not enabled for this data type"


class PayloadTooLarge(VaultError):
    code = "too_large"
    default_message = "the request is too large"


class HeadersTooLarge(VaultError):
    code = "headers_too_large"
    default_message = "the request line and headers are larger than this vault accepts"


class RequestTimeout(VaultError):
    code = "request_timeout"
    default_message = "the request was not received in time; the connection is closed"


class RateLimited(VaultError):
    """Too many requests (a principal's rate, or failed authentications from one source): the
    same request succeeds later, after `retry_after_s`."""

    code = "rate_limited"
    default_message = "too many requests; retry after the time given in Retry-After"
    retryable = True

    def __init__(self, retry_after_s: int, message: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, retry_after_s)


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


class SecondAdminRequired(Forbidden):
    """Dual control: the approver of a four-eyes request is the admin who made it."""

    code = "second_admin_required"
    default_message = "a second admin, not the one who made the request, must approve it"


class KeyIssuerConflict(Forbidden):
    """Dual control: a party to the request holds a valid API key the other admin issued (or one
    whose issuer is unknown), so one person could act as two."""

    code = "key_issuer_conflict"
    default_message = (
        "a party to this request holds a valid API key issued by the requester or the approver: "
        "it must mint its own key and revoke that one first"
    )


class GranteeHoldsGrants(Forbidden):
    """An admin may not mint a key for a principal holding an active or pending grant."""

    code = "grantee_holds_grants"
    default_message = (
        "this principal holds an active or pending grant: only it can mint its own keys "
        "(POST /v1/principals/{id}/keys with its own key)"
    )


class AccessReasonRequired(VaultError):
    code = "access_reason_required"
    default_message = "this vault requires an X-Access-Reason header on detokenize"


class NotFound(VaultError):
    code = "not_found"
    default_message = "no such resource"


class Gone(VaultError):
    """A record that no longer answers with its value (410). Told only to a caller whose grant
    covers the record; anyone else gets the unknown-token answer."""

    code = "gone"
    default_message = "this record is gone"


class RecordErased(Gone):
    code = "erased"
    default_message = "this record was erased"


class RecordExpired(Gone):
    code = "expired"
    default_message = "this record's retention period has ended"


class RetentionExceeded(InvalidInput):
    """expires_at beyond the data type's max_retention_days."""

    code = "retention_exceeded"
    default_message = "expires_at is beyond this data type's maximum retention"


class Conflict(VaultError):
    code = "conflict"
    default_message = "the request conflicts with the current state"


class DataTypeInUse(Conflict):
    """A type's normaliser cannot change once records of it exist: their fingerprints depend on it."""

    code = "data_type_in_use"
    default_message = "records of this data type exist, so its normaliser cannot change"


class BuiltinDataType(Conflict):
    code = "builtin_data_type"
    default_message = "a built-in data type can change only in max_retention_days"


class NotPending(Conflict):
    """A four-eyes request already approved, rejected, expired or withdrawn."""

    code = "not_pending"
    default_message = "the request is no longer pending"


class IdempotencyKeyReused(InvalidInput):
    """The Idempotency-Key was already used with another body (for this caller, method and path)."""

    code = "idempotency_key_reused"
    default_message = "this Idempotency-Key was used with a different request body; use a new key"


class IdempotencyInFlight(Conflict):
    """The first request with this Idempotency-Key has not answered yet: retry shortly (409 with
    Retry-After). Its lease expires, so a request that crashed does not block its key for long."""

    code = "idempotency_in_flight"
    default_message = "a request with this Idempotency-Key is still in progress; retry shortly"
    retryable = True


class DependencyUnavailable(VaultError):
    """A dependency is down for now; the caller should retry later (503 with Retry-After)."""

    retryable = True


class DatabaseUnavailable(DependencyUnavailable):
    code = "database_unavailable"
    default_message = "the vault's database is unavailable; retry later"


class KeyServiceUnavailable(DependencyUnavailable):
    code = "key_service_unavailable"
    default_message = "the key service is unavailable or throttling; retry later"


class Misconfigured(VaultError):
    """A dependency refuses the vault itself, and will until an operator acts: 503 without
    Retry-After, so that no client retries for ever. Each subclass's code is one to search for."""


class KeyAccessDenied(Misconfigured):
    """KMS refused the vault (disabled or missing key, key policy, no credentials)."""

    code = "key_access_denied"
    default_message = "the key service refused the vault's request; an operator must check the key"


class KeyNotAllowed(Misconfigured):
    """The record names a master key outside this vault's allow-list
    (PIIVAULT_KMS_KEY_ID and PIIVAULT_KMS_DECRYPT_KEY_IDS): not a sign of tampering."""

    code = "key_not_allowed"
    default_message = (
        "the record was encrypted under a key this vault is not configured to use; "
        "an operator must add it to PIIVAULT_KMS_DECRYPT_KEY_IDS"
    )


class KeyServiceInvalidResponse(Misconfigured):
    """The key service answered with something that is not a valid answer (a missing field, a
    data key of the wrong size, another key than the one asked for)."""

    code = "key_service_invalid_response"
    default_message = "the key service's answer was not valid; an operator must check the key service"


class AuditUnavailable(DependencyUnavailable):
    code = "audit_unavailable"
    default_message = "the audit trail could not be written, so the operation did not happen"


class IntegrityFailure(VaultError):
    """A stored record failed authentication: tampered, moved or corrupted. Deliberately opaque."""

    code = "record_integrity"
    default_message = "the record failed its integrity check and was not returned"
