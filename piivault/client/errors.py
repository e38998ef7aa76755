"""One exception class per error code the vault answers, all made from one table.

Every class derives from VaultError, which carries the code, the HTTP status, whether the same
request may succeed later unchanged (`retryable`), the message, the field it names and the
request id (to quote to the vault's operators, who find it in the audit trail and the logs).
"""

from __future__ import annotations

from typing import Any


class VaultError(Exception):
    """An error the vault answered (or a connection that failed: `ConnectionFailed`)."""

    code: str = "unknown_error"
    status: int | None = None
    retryable: bool = False

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        status: int | None = None,
        field: str | None = None,
        request_id: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if retryable is not None:
            self.retryable = retryable
        self.field = field
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, status={self.status}, field={self.field!r}, "
            f"retryable={self.retryable}, request_id={self.request_id!r})"
        )


# The table: class name, code, status, retryable, what it means. Retryable: the same request
# may succeed later unchanged (a dependency down for now, throttling, a key still in flight).
ERROR_TABLE: tuple[tuple[str, str, int | None, bool, str], ...] = (
    ("InvalidInput", "invalid_input", 422, False, "the request is not valid; `field` names what"),
    ("InvalidValue", "invalid_value", 422, False, "the value does not match its data type"),
    ("UnknownDataType", "unknown_data_type", 422, False, "the data type is not registered"),
    ("LookupNotEnabled", "lookup_not_enabled", 422, False, "the data type's lookup flag is off"),
    ("IdempotencyKeyReused", "idempotency_key_reused", 422, False, "the key was used with another body"),
    ("PayloadTooLarge", "too_large", 413, False, "the request, a value or a batch is too large"),
    ("Unauthenticated", "unauthenticated", 401, False, "no valid API key"),
    ("Forbidden", "forbidden", 403, False, "this principal may not do that"),
    ("GrantRequired", "grant_required", 403, False, "no active grant covers this record"),
    ("AccessReasonRequired", "access_reason_required", 400, False, "send an access reason"),
    ("BadRequest", "bad_request", 400, False, "the request is malformed"),
    ("NotFound", "not_found", 404, False, "no such token or resource"),
    ("MethodNotAllowed", "method_not_allowed", 405, False, "the path does not serve this method"),
    ("Conflict", "conflict", 409, False, "the request conflicts with the current state"),
    ("IdempotencyInFlight", "idempotency_in_flight", 409, True, "the first request with this key runs"),
    ("Erased", "erased", 410, False, "the record was erased"),
    ("Expired", "expired", 410, False, "the record's retention has passed"),
    ("RetentionExceeded", "retention_exceeded", 422, False, "expires_at is beyond the type's retention"),
    ("SecondAdminRequired", "second_admin_required", 403, False, "a second admin must approve"),
    ("KeyIssuerConflict", "key_issuer_conflict", 403, False, "a party holds a key the other admin issued"),
    ("GranteeHoldsGrants", "grantee_holds_grants", 403, False, "the principal rotates its own keys"),
    ("DataTypeInUse", "data_type_in_use", 409, False, "records of the type exist"),
    ("BuiltinDataType", "builtin_data_type", 409, False, "a built-in type changes only in retention"),
    ("NotPending", "not_pending", 409, False, "the request is no longer pending"),
    ("Gone", "gone", 410, False, "the record is gone"),
    ("RequestTimeout", "request_timeout", 408, False, "the request was not sent in time"),
    ("HeadersTooLarge", "headers_too_large", 431, False, "the request's headers are too large"),
    ("RateLimited", "rate_limited", 429, True, "too many requests; slow down"),
    ("DatabaseUnavailable", "database_unavailable", 503, True, "the vault's database is down for now"),
    ("KeyServiceUnavailable", "key_service_unavailable", 503, True, "KMS is down or throttling"),
    ("AuditUnavailable", "audit_unavailable", 503, True, "the audit trail could not be written"),
    ("KeyAccessDenied", "key_access_denied", 503, False, "KMS refuses the vault: an operator must act"),
    ("KeyNotAllowed", "key_not_allowed", 503, False, "the record's key is outside the allow-list"),
    (
        "KeyServiceInvalidResponse",
        "key_service_invalid_response",
        503,
        False,
        "KMS answered nonsense: an operator must act",
    ),
    ("RecordIntegrity", "record_integrity", 500, False, "the record failed its integrity check"),
    ("InternalError", "internal_error", 500, False, "the vault failed unexpectedly"),
    ("ConnectionFailed", "connection_failed", None, True, "no answer: the connection failed or timed out"),
)

BY_CODE: dict[str, type[VaultError]] = {}
# The classes, by name (re-exported by piivault.client; a test checks it against the table).
__all__ = [
    "BY_CODE",
    "ERROR_TABLE",
    "AccessReasonRequired",
    "AuditUnavailable",
    "BadRequest",
    "BuiltinDataType",
    "Conflict",
    "ConnectionFailed",
    "DataTypeInUse",
    "DatabaseUnavailable",
    "Erased",
    "Expired",
    "Forbidden",
    "Gone",
    "GrantRequired",
    "GranteeHoldsGrants",
    "HeadersTooLarge",
    "IdempotencyInFlight",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidInput",
    "InvalidValue",
    "KeyAccessDenied",
    "KeyIssuerConflict",
    "KeyNotAllowed",
    "KeyServiceInvalidResponse",
    "KeyServiceUnavailable",
    "LookupNotEnabled",
    "MethodNotAllowed",
    "NotFound",
    "NotPending",
    "PayloadTooLarge",
    "RateLimited",
    "RecordIntegrity",
    "RequestTimeout",
    "RetentionExceeded",
    "SecondAdminRequired",
    "Unauthenticated",
    "UnknownDataType",
    "VaultError",
    "error_from",
]


def _make(name: str, code: str, status: int | None, retryable: bool, doc: str) -> type[VaultError]:
    cls = type(name, (VaultError,), {"code": code, "status": status, "retryable": retryable, "__doc__": doc})
    cls.__module__ = __name__
    BY_CODE[code] = cls
    return cls


_CLASSES = {row[0]: _make(*row) for row in ERROR_TABLE}
# Module attributes, for `except piivault.client.GrantRequired` (typed as VaultError classes).
InvalidInput = _CLASSES["InvalidInput"]
InvalidValue = _CLASSES["InvalidValue"]
UnknownDataType = _CLASSES["UnknownDataType"]
LookupNotEnabled = _CLASSES["LookupNotEnabled"]
IdempotencyKeyReused = _CLASSES["IdempotencyKeyReused"]
PayloadTooLarge = _CLASSES["PayloadTooLarge"]
Unauthenticated = _CLASSES["Unauthenticated"]
Forbidden = _CLASSES["Forbidden"]
GrantRequired = _CLASSES["GrantRequired"]
AccessReasonRequired = _CLASSES["AccessReasonRequired"]
BadRequest = _CLASSES["BadRequest"]
NotFound = _CLASSES["NotFound"]
MethodNotAllowed = _CLASSES["MethodNotAllowed"]
Conflict = _CLASSES["Conflict"]
IdempotencyInFlight = _CLASSES["IdempotencyInFlight"]
Erased = _CLASSES["Erased"]
Expired = _CLASSES["Expired"]
RateLimited = _CLASSES["RateLimited"]
RetentionExceeded = _CLASSES["RetentionExceeded"]
SecondAdminRequired = _CLASSES["SecondAdminRequired"]
KeyIssuerConflict = _CLASSES["KeyIssuerConflict"]
GranteeHoldsGrants = _CLASSES["GranteeHoldsGrants"]
DataTypeInUse = _CLASSES["DataTypeInUse"]
BuiltinDataType = _CLASSES["BuiltinDataType"]
NotPending = _CLASSES["NotPending"]
Gone = _CLASSES["Gone"]
RequestTimeout = _CLASSES["RequestTimeout"]
HeadersTooLarge = _CLASSES["HeadersTooLarge"]
DatabaseUnavailable = _CLASSES["DatabaseUnavailable"]
KeyServiceUnavailable = _CLASSES["KeyServiceUnavailable"]
AuditUnavailable = _CLASSES["AuditUnavailable"]
KeyAccessDenied = _CLASSES["KeyAccessDenied"]
KeyNotAllowed = _CLASSES["KeyNotAllowed"]
KeyServiceInvalidResponse = _CLASSES["KeyServiceInvalidResponse"]
RecordIntegrity = _CLASSES["RecordIntegrity"]
InternalError = _CLASSES["InternalError"]
ConnectionFailed = _CLASSES["ConnectionFailed"]


def error_from(
    body: Any, status: int | None, request_id: str | None = None, retry_after: bool = False
) -> VaultError:
    """The exception for an error body ({"code", "message", "field"?, "retryable"?, ...}). An
    unknown code keeps its code and status; it is retryable if the status says so (429, or a 503
    with Retry-After)."""
    error = body if isinstance(body, dict) else {}
    code = str(error.get("code") or f"http_{status}")
    cls = BY_CODE.get(code, VaultError)
    retryable: bool | None = error.get("retryable") if isinstance(error.get("retryable"), bool) else None
    if cls is VaultError and retryable is None:
        retryable = status == 429 or (status == 503 and retry_after)
    return cls(
        str(error.get("message") or code),
        code=code,
        status=status,
        field=error.get("field") if isinstance(error.get("field"), str) else None,
        request_id=error.get("request_id") or request_id,
        retryable=retryable,
    )
