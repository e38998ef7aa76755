"""Request and response bodies. Unknown fields are rejected; every example is fictitious."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    model_validator,
)

from app.access import ApprovalKind, ApprovalState, GrantStatus, Role
from app.datatypes import MAX_PATTERN_LENGTH, Mask, Normalize, Reveal
from app.services.context import OPERATIONS, Operation

CUSTOMER_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
DATA_TYPE_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
PRINCIPAL_NAME_PATTERN = r"^[A-Za-z0-9._@-]{1,128}$"

CustomerId = Annotated[
    StrictStr,
    Field(
        pattern=CUSTOMER_ID_PATTERN,
        max_length=128,
        examples=["12345"],
        description="1 to 128 characters of [A-Za-z0-9._:-]",
    ),
]
DataType = Annotated[
    StrictStr,
    Field(
        pattern=DATA_TYPE_PATTERN,
        max_length=64,
        examples=["DriverLicense"],
        description="1 to 64 characters, a letter first, then [A-Za-z0-9_]",
    ),
]
PrincipalName = Annotated[StrictStr, Field(pattern=PRINCIPAL_NAME_PATTERN, examples=["kyc-app"])]


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: refused here, naming the field, not by the database.
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


# Free text that reaches the database: any character PostgreSQL can store.
Text = Annotated[StrictStr, AfterValidator(_no_nul)]


def _in_utc(value: datetime) -> datetime:
    """The time in UTC (one without an offset is taken as UTC), if it falls in years 1 to 9999
    there: the range Python and the database can both hold."""
    try:
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    except OverflowError:
        raise ValueError("must fall between the years 1 and 9999 in UTC") from None


UtcDatetime = Annotated[datetime, AfterValidator(_in_utc)]
AwareUtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]
# A bigint column's largest value: cursors and sequence numbers above it are refused here.
MAX_BIGINT = 2**63 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Errors


def examples(*values: dict[str, Any]) -> ConfigDict:
    """A model's examples, shown in the OpenAPI document for its request or response body."""
    return ConfigDict(json_schema_extra={"examples": list(values)})


# Fictitious values the examples share.
_TOK = "tok_3q2-7wEvmn8CRTfF1ZrPuS9QoHgH4kDy"
_PRINCIPAL_ID = "6f1c2b4e-2f5a-4c1e-9a57-0e8f3d1b2c4a"
_GRANT_ID = "0b9e4d2a-7c3f-4e8b-a1d6-5f2c9e8b7a34"
_KEY_ID = "k_7Qm2xR9vLp4T"
_API_KEY = "pv_k_7Qm2xR9vLp4T.Zx8cVb6nM4qW2eR0tY7uI5oP3aS1dF9g"
_TIME = "2026-01-15T09:30:00Z"


class Problem(BaseModel):
    field: str = Field(description="Where: `items[0].value`, `customer_id`, a header's or parameter's name.")
    message: str
    type: str = Field(description="Pydantic's error type, e.g. string_pattern_mismatch.")


class ErrorBody(BaseModel):
    code: str = Field(examples=["grant_required"], description="Stable and machine-readable; branch on this.")
    message: str = Field(description="For people; never quotes a submitted value.")
    request_id: str = Field(description="The response's X-Request-ID, also in the audit trail.")
    field: str | None = Field(default=None, description="The request field at fault, if one is.")
    problems: list[Problem] | None = Field(
        default=None, description="422 from schema validation only: every bad field."
    )


class ErrorResponse(BaseModel):
    """Every error the vault answers has this shape, whatever its status."""

    error: ErrorBody


# Principals


class PrincipalCreate(Strict):
    name: PrincipalName
    role: Role = Field(examples=["service"])

    model_config = ConfigDict(extra="forbid", **examples({"name": "kyc-app", "role": "service"}))


_KEY_OUT = {"key_id": _KEY_ID, "created_at": _TIME, "revoked_at": None, "issued_by": _PRINCIPAL_ID}
_PRINCIPAL_OUT = {
    "id": _PRINCIPAL_ID,
    "name": "kyc-app",
    "role": "service",
    "created_at": _TIME,
    "disabled_at": None,
    "keys": [_KEY_OUT],
    "rate_limit": None,
}


PRINCIPAL_CREATED_EXAMPLE = {**_PRINCIPAL_OUT, "key_id": _KEY_ID, "api_key": _API_KEY}
KEY_OUT_EXAMPLE = _KEY_OUT
PRINCIPAL_EXAMPLE = _PRINCIPAL_OUT


class ApiKeyOut(BaseModel):
    key_id: str
    created_at: datetime
    revoked_at: datetime | None = None
    issued_by: uuid.UUID | None = Field(
        default=None,
        description="The principal that was shown the key: an admin, or the principal itself "
        "(a key it minted). Null: issued before issuers were recorded (unknown).",
    )

    model_config = examples(_KEY_OUT)


class RateLimitIn(Strict):
    rps: int = Field(ge=1, le=1_000_000, description="Requests per second, on average.", examples=[50])
    burst: int = Field(ge=1, le=10_000_000, description="Requests at once; at least `rps`.", examples=[100])

    @model_validator(mode="after")
    def _burst_covers_rps(self) -> RateLimitIn:
        if self.burst < self.rps:
            raise ValueError("burst must be at least rps")
        return self


class RateLimitSet(Strict):
    rate_limit: RateLimitIn | None = Field(
        description="This principal's own limit; null: the vault's defaults "
        "(PIIVAULT_RATE_LIMIT_RPS, PIIVAULT_RATE_LIMIT_BURST)."
    )

    model_config = ConfigDict(extra="forbid", **examples({"rate_limit": {"rps": 50, "burst": 100}}))


class RateLimitOut(BaseModel):
    model_config = examples({"rps": 50, "burst": 100})

    rps: int
    burst: int


class PrincipalOut(BaseModel):
    id: uuid.UUID
    name: str
    role: Role
    created_at: datetime
    disabled_at: datetime | None = None
    keys: list[ApiKeyOut] = []
    rate_limit: RateLimitOut | None = Field(
        default=None, description="Its own request rate, set by an admin; null: the vault's defaults."
    )

    model_config = examples(_PRINCIPAL_OUT)


class PrincipalCreated(PrincipalOut):
    key_id: str
    api_key: str | None = Field(
        repr=False,
        description="Shown this once; store it in your secret manager. null in an Idempotency-Key "
        "replay: mint another with POST /v1/principals/{id}/keys.",
    )

    model_config = examples(PRINCIPAL_CREATED_EXAMPLE)


class ApiKeyCreated(BaseModel):
    key_id: str
    api_key: str = Field(repr=False, description="Shown this once; store it in your secret manager.")

    model_config = examples({"key_id": _KEY_ID, "api_key": _API_KEY})


class PrincipalList(BaseModel):
    principals: list[PrincipalOut] = Field(description="Oldest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")

    model_config = examples({"principals": [_PRINCIPAL_OUT], "next_cursor": None})


# Grants

ContextKey = Literal["customerID", "dataType"]
# As long as the longest customer id; what is longer could match no record.
ContextValue = Annotated[Text, Field(max_length=128)]


class GrantConstraintsIn(Strict):
    encryption_context_subset: dict[ContextKey, ContextValue] | None = Field(
        default=None, examples=[{"dataType": "DriverLicense"}]
    )
    encryption_context_equals: dict[ContextKey, ContextValue] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> GrantConstraintsIn:
        given = [c for c in (self.encryption_context_subset, self.encryption_context_equals) if c is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of encryption_context_subset or encryption_context_equals")
        if not given[0]:
            raise ValueError("the encryption context constraint must name at least one pair")
        return self


class GrantCreate(Strict):
    grantee: Text = Field(max_length=128, description="A principal's id or name.", examples=["kyc-app"])
    operations: list[Operation] = Field(min_length=1, max_length=len(OPERATIONS), examples=[["Decrypt"]])
    constraints: GrantConstraintsIn | None = None
    expires_at: AwareUtcDatetime | None = Field(default=None, description="RFC 3339, with offset.")
    name: Text | None = Field(default=None, max_length=256)
    reveal: Reveal = Field(
        default="plain",
        description="What its Decrypt reveals: the value (`plain`) or only the value's mask "
        "(`masked`), whatever the caller asks.",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "grantee": "kyc-app",
                    "operations": ["Decrypt"],
                    "constraints": {"encryption_context_subset": {"dataType": "DriverLicense"}},
                    "expires_at": "2027-01-01T00:00:00Z",
                    "name": "kyc reads licences",
                }
            ]
        },
    )


_GRANT_OUT = {
    "id": _GRANT_ID,
    "name": "kyc reads licences",
    "grantee": _PRINCIPAL_ID,
    "operations": ["Decrypt"],
    "constraints": {"encryption_context_subset": {"dataType": "DriverLicense"}},
    "expires_at": "2027-01-01T00:00:00Z",
    "created_at": _TIME,
    "revoked_at": None,
    "retired_at": None,
    "active": True,
    "kms_grant_id": None,
    "reveal": "plain",
    "status": "active",
    "approval_id": None,
    "approved_by": None,
    "approved_at": None,
}


class GrantOut(BaseModel):
    model_config = examples(_GRANT_OUT)

    id: uuid.UUID
    name: str | None
    grantee: uuid.UUID
    operations: list[Operation]
    constraints: dict[str, dict[str, str]] | None
    expires_at: datetime | None
    created_at: datetime
    revoked_at: datetime | None
    retired_at: datetime | None
    active: bool
    status: GrantStatus = Field(
        description="pending (waiting for a second admin), active, rejected, revoked, retired or expired."
    )
    approval_id: uuid.UUID | None = Field(description="Its four-eyes request, if it needed one.")
    approved_by: uuid.UUID | None = Field(description="The second admin who approved it.")
    approved_at: datetime | None
    kms_grant_id: str | None
    reveal: Reveal


class GrantList(BaseModel):
    grants: list[GrantOut] = Field(description="Oldest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")

    model_config = examples({"grants": [_GRANT_OUT], "next_cursor": None})


# Approvals (dual control)


_APPROVAL_OUT = {
    "id": "3c1d9f0e-8b2a-4f6d-9e7c-1a2b3c4d5e6f",
    "kind": "grant",
    "status": "pending",
    "requester": _PRINCIPAL_ID,
    "target": _GRANT_ID,
    "details": {"grantee": "kyc-app", "operations": ["Decrypt"]},
    "created_at": _TIME,
    "expires_at": "2026-12-04T09:30:00Z",
    "decided_by": None,
    "decided_at": None,
}


class ApprovalOut(BaseModel):
    model_config = examples(_APPROVAL_OUT)

    id: uuid.UUID
    kind: ApprovalKind
    status: ApprovalState = Field(description="A pending request past expires_at is expired.")
    requester: uuid.UUID
    target: str | None = Field(
        description="The grant, principal or key it is about (create_admin: the new admin, once made)."
    )
    details: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    decided_by: uuid.UUID | None
    decided_at: datetime | None


class ApprovalDecided(ApprovalOut):
    model_config = examples(
        {
            **_APPROVAL_OUT,
            "status": "approved",
            "decided_by": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            "decided_at": _TIME,
            "api_key": None,
        }
    )

    api_key: str | None = Field(
        default=None,
        repr=False,
        description="create_admin only: the new admin's first key, shown to the approver this once. "
        "The new admin should mint its own key and revoke this one.",
    )


class ApprovalList(BaseModel):
    model_config = examples({"approvals": [_APPROVAL_OUT], "next_cursor": None})

    approvals: list[ApprovalOut] = Field(description="Oldest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


# Tokens


class TokenizeRequest(Strict):
    customer_id: CustomerId
    data_type: DataType
    value: StrictStr = Field(
        repr=False,
        min_length=1,
        description="The PII, as UTF-8 text; at most the configured size (4 KiB by default).",
        examples=["D1234-56789-01234"],
    )
    expires_at: AwareUtcDatetime | None = Field(
        default=None,
        description="RFC 3339, with offset, in the future: the record is refused from then on and "
        "erased by the retention sweeper. Within the data type's max_retention_days, which also "
        "applies when this is absent.",
        examples=["2033-01-01T00:00:00Z"],
    )
    deduplicate: bool = Field(
        default=False,
        description="If the customer already has a live record of this type with the same "
        "(normalised) value, answer its token (200, deduplicated: true) and store nothing. Needs a "
        "Lookup grant covering the record as well as Encrypt (else grant_required), and a type "
        "whose lookup flag is on (else lookup_not_enabled).",
        examples=[True],
    )

    model_config = ConfigDict(
        extra="forbid",
        **examples({"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}),
    )


class LookupRequest(Strict):
    data_type: DataType
    value: StrictStr = Field(
        repr=False,
        min_length=1,
        description="The value to find, compared after the type's normaliser (D1234 56789 finds "
        "D1234-56789).",
        examples=["D1234-56789-01234"],
    )
    customer_id: CustomerId | None = Field(default=None, description="Only this customer's records.")

    model_config = ConfigDict(
        extra="forbid",
        **examples(
            {"data_type": "DriverLicense", "value": "D1234-56789-01234"},
            {"data_type": "SSN", "value": "078-05-1120", "customer_id": "12345"},
        ),
    )


class LookupMatch(BaseModel):
    """A live record holding the value, covered by one of the caller's Lookup grants."""

    token: str = Field(examples=[_TOK])
    customer_id: str
    created_at: datetime

    model_config = examples({"token": _TOK, "customer_id": "12345", "created_at": _TIME})


class LookupResponse(BaseModel):
    matches: list[LookupMatch] = Field(description="Oldest first; at most 1000.")

    model_config = examples(
        {"matches": [{"token": _TOK, "customer_id": "12345", "created_at": _TIME}]}, {"matches": []}
    )


_TOKEN_OUT = {"token": _TOK, "customer_id": "12345", "data_type": "DriverLicense", "created_at": _TIME}
_REVEALED = {
    "token": _TOK,
    "customer_id": "12345",
    "data_type": "DriverLicense",
    "value": "D1234-56789-01234",
}
_ITEM_ERROR = {
    "code": "grant_required",
    "message": "no active grant allows this operation on this record",
    "retryable": False,
}


class TokenOut(BaseModel):
    token: str = Field(examples=[_TOK])
    customer_id: str
    data_type: str
    created_at: datetime
    expires_at: datetime | None = None
    deduplicated: bool = Field(
        default=False,
        description="true (with 200): the customer's existing record (deduplicate); nothing was stored.",
    )

    model_config = examples(_TOKEN_OUT)


class ItemErrorBody(BaseModel):
    code: str = Field(examples=["key_service_unavailable"])
    message: str
    field: str | None = None
    retryable: bool = Field(
        description="True when the item failed only because a dependency (database, key service, "
        "audit trail) is down for now: the same item may succeed if sent again later, in a new "
        "batch. False for everything else, including a key service that refuses the vault "
        "(key_access_denied, key_not_allowed, key_service_invalid_response), which needs an operator."
    )


class BatchTokenizeRequest(Strict):
    items: list[dict[str, Any]] = Field(
        min_length=1,
        description="Each item as for POST /v1/tokens (TokenizeRequest); a bad item fails alone.",
        examples=[[{"customer_id": "12345", "data_type": "SSN", "value": "078-05-1120"}]],
    )

    model_config = ConfigDict(
        extra="forbid",
        **examples(
            {
                "items": [
                    {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"},
                    {"customer_id": "12345", "data_type": "SSN", "value": "078-05-1120"},
                ]
            }
        ),
    )


class BatchTokenized(BaseModel):
    """An item that was stored: its token."""

    model_config = ConfigDict(extra="forbid", **examples(_TOKEN_OUT))

    token: str
    customer_id: str
    data_type: str
    created_at: datetime
    expires_at: datetime | None = Field(default=None, description="When the record expires (retention).")
    deduplicated: bool | None = Field(
        default=None, description="true: the customer's existing record (deduplicate); nothing was stored."
    )


class BatchTokenizeFailed(BaseModel):
    """An item that was not stored, and why."""

    model_config = ConfigDict(extra="forbid", **examples({"error": _ITEM_ERROR}))

    error: ItemErrorBody


# One result per item, in request order: a token, or the item's own error.
BatchTokenizeItemResult = BatchTokenized | BatchTokenizeFailed


class BatchTokenizeResponse(BaseModel):
    results: list[BatchTokenizeItemResult]

    model_config = examples({"results": [_TOKEN_OUT, {"error": _ITEM_ERROR}]})


class RevealedOut(BaseModel):
    token: str
    customer_id: str
    data_type: str
    value: str | None = Field(default=None, repr=False, description="The value (a plain reveal).")
    value_masked: str | None = Field(
        default=None, repr=False, description="Only the value's mask (a masked reveal), instead of value."
    )

    model_config = examples(_REVEALED)


class DetokenizeRequest(Strict):
    tokens: list[StrictStr] = Field(min_length=1, examples=[[_TOK]])
    reveal: Reveal = Field(
        default="plain",
        description="`masked`: each result carries value_masked instead of value. A caller whose "
        "grant is masked gets value_masked whatever it asks.",
    )

    model_config = ConfigDict(extra="forbid", **examples({"tokens": [_TOK, "tok_" + "A" * 32]}))


class BatchRevealed(BaseModel):
    """A token whose value the caller may read: the value."""

    model_config = ConfigDict(extra="forbid", **examples(_REVEALED))

    token: str
    customer_id: str
    data_type: str
    value: str | None = Field(default=None, repr=False, description="The value (a plain reveal).")
    value_masked: str | None = Field(
        default=None, repr=False, description="Only the value's mask (a masked reveal), instead of value."
    )


class BatchDetokenizeFailed(BaseModel):
    """A token whose value was not revealed, and why (not_found, grant_required, ...)."""

    model_config = ConfigDict(extra="forbid", **examples({"token": _TOK, "error": _ITEM_ERROR}))

    token: str
    error: ItemErrorBody


# One result per token, in request order: the value, or the token's own error.
DetokenizeItemResult = BatchRevealed | BatchDetokenizeFailed


class DetokenizeResponse(BaseModel):
    results: list[DetokenizeItemResult]

    model_config = examples(
        {
            "results": [
                _REVEALED,
                {
                    "token": "tok_" + "A" * 32,
                    "error": {"code": "not_found", "message": "no record for this token", "retryable": False},
                },
            ]
        }
    )


# Data types and limits


class DataTypePut(Strict):
    """Fields left out keep their value (a new type: no pattern, normalize none, mask none,
    lookup false, no retention limit); null clears pattern or max_retention_days."""

    pattern: Text | None = Field(
        default=None,
        max_length=MAX_PATTERN_LENGTH,
        description="A regular expression (RE2 syntax) the whole value must match; null: any value.",
        examples=[r"[A-Z]{2}\d{6}"],
    )
    normalize: Normalize = Field(default="none", description="Fixed once records of the type exist.")
    mask: Mask = "none"
    lookup: bool = False
    max_retention_days: int | None = Field(default=None, ge=1, le=365_000)

    model_config = ConfigDict(
        extra="forbid",
        **examples({"pattern": "[A-Z]{2}[0-9]{6}", "normalize": "none", "mask": "last4", "lookup": True}),
    )


_DATA_TYPE = {
    "name": "DriverLicense",
    "builtin": True,
    "pattern": "[A-Za-z0-9](?:[A-Za-z0-9 -]{0,30}[A-Za-z0-9])?",
    "normalize": "strip_separators",
    "mask": "last4",
    "lookup": True,
    "max_retention_days": None,
    "created_at": "2026-12-01T09:30:00Z",
    "updated_at": "2026-12-01T09:30:00Z",
}


class DataTypeOut(BaseModel):
    model_config = examples(_DATA_TYPE)

    name: str
    builtin: bool
    pattern: str | None
    normalize: Normalize
    mask: Mask
    lookup: bool
    max_retention_days: int | None
    created_at: datetime
    updated_at: datetime


class DataTypeList(BaseModel):
    model_config = examples({"data_types": [_DATA_TYPE]})

    data_types: list[DataTypeOut]


class LimitsOut(BaseModel):
    model_config = examples({"max_batch_items": 1000, "max_value_bytes": 4096})

    max_batch_items: int = Field(description="The most items (or tokens) one batch request may hold.")
    max_value_bytes: int = Field(description="The largest value, in UTF-8 bytes.")


# Erasure and subject access


class CustomerEraseRequest(Strict):
    data_types: list[DataType] | None = Field(
        default=None,
        min_length=1,
        description="Only records of these types; absent: every type the caller's Erase grants cover.",
        examples=[["DriverLicense"]],
    )
    reason: Text = Field(
        min_length=1,
        max_length=512,
        description="Why (recorded in every audit event and tombstone).",
        examples=["GDPR Art. 17 request 2026-118"],
    )

    model_config = ConfigDict(
        extra="forbid",
        **examples({"data_types": ["DriverLicense"], "reason": "GDPR Art. 17 request 2026-118"}),
    )


class CustomerErasureOut(BaseModel):
    model_config = examples({"erased": 1, "tokens": [_TOK]})

    erased: int = Field(description="Records erased by this request (already erased ones count 0).")
    tokens: list[str] = Field(description="Their tokens.")


class ReportRecordOut(BaseModel):
    token: str
    data_type: str
    created_at: datetime
    expires_at: datetime | None
    erased_at: datetime | None
    erasure_reason: str | None


class ReportAccessOut(BaseModel):
    time: datetime
    action: str
    outcome: str
    principal_id: str | None
    principal_name: str | None
    token: str | None
    data_type: str | None
    access_reason: str | None = Field(description="Why, as the caller said (X-Access-Reason, reason).")
    reason: str | None = Field(description="Why a request was refused, or what an allowed one found.")
    grant_id: str | None
    request_id: str | None


class CustomerReportOut(BaseModel):
    model_config = examples(
        {
            "customer_id": "12345",
            "generated_at": _TIME,
            "records": [
                {
                    "token": _TOK,
                    "data_type": "DriverLicense",
                    "created_at": _TIME,
                    "expires_at": None,
                    "erased_at": None,
                    "erasure_reason": None,
                }
            ],
            "accesses": [
                {
                    "time": _TIME,
                    "action": "Detokenize",
                    "outcome": "allowed",
                    "principal_id": _PRINCIPAL_ID,
                    "principal_name": "kyc-app",
                    "token": _TOK,
                    "data_type": "DriverLicense",
                    "access_reason": "KYC review",
                    "reason": None,
                    "grant_id": _GRANT_ID,
                    "request_id": "b5edc7fb-64c3-4325-aa86-1781c3e18e06",
                }
            ],
        }
    )

    customer_id: str
    generated_at: datetime
    records: list[ReportRecordOut] = Field(description="Every record, erased ones as tombstones.")
    accesses: list[ReportAccessOut] = Field(description="Every audit event about them, oldest first.")


# Audit


class AuditEventOut(BaseModel):
    id: uuid.UUID
    chain_seq: int | None
    time: datetime
    request_id: str | None
    principal_id: uuid.UUID | None
    principal_name: str | None
    api_key_id: str | None
    action: str
    outcome: str
    reason: str | None
    token: str | None
    customer_id: str | None
    data_type: str | None
    grant_id: uuid.UUID | None
    target_id: str | None
    access_reason: str | None
    source_ip: str | None
    user_agent: str | None
    kms_request_id: str | None
    repeat_count: int | None = Field(
        default=None,
        description="Set on a failed authentication that stands for this many more of the same key id, "
        "source and reason within a window (they were counted, not written one by one).",
    )


_EVENT = {
    "id": "9a3e1f5c-2b7d-4c8e-8f1a-6d5b4c3a2e10",
    "chain_seq": 42,
    "time": _TIME,
    "request_id": "3f0c7c1e-6b1e-4c55-9d4e-1f6f2b0f7a11",
    "principal_id": _PRINCIPAL_ID,
    "principal_name": "kyc-app",
    "api_key_id": _KEY_ID,
    "action": "Detokenize",
    "outcome": "allowed",
    "reason": None,
    "token": _TOK,
    "customer_id": "12345",
    "data_type": "DriverLicense",
    "grant_id": _GRANT_ID,
    "target_id": None,
    "access_reason": "KYC check for application 881",
    "source_ip": "10.0.4.17",
    "user_agent": "kyc-app/2.3",
    "kms_request_id": None,
}


class AuditEventPage(BaseModel):
    events: list[AuditEventOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null at the end."
    )

    model_config = examples({"events": [_EVENT], "next_cursor": "41"})


class AuditVerifyOut(BaseModel):
    ok: bool
    events_checked: int
    head_seq: int
    head_mac: str | None = None
    first_bad_event: dict[str, Any] | None = None

    model_config = examples(
        {
            "ok": True,
            "events_checked": 42,
            "head_seq": 42,
            "head_mac": "5d41402abc4b2a76b9719d911017c592ae1b7c9e3f1d2c4b6a8e0f1a2b3c4d5e",
            "first_bad_event": None,
        }
    )


class KeyUsageOut(BaseModel):
    key_id: str = Field(description="The master key's ARN (with the local provider, its local id).")
    records: int = Field(description="Records whose data key this key wraps.")
    audit_keys: int = Field(description="The vault's own audit-chain keys this key wraps.")
    vault_keys: int = Field(description="The vault's other own keys (the fingerprint key) this key wraps.")
    current: bool = Field(description="New records go under this key (PIIVAULT_KMS_KEY_ID).")
    decrypt_allowed: bool = Field(
        description="On the allow-list (the current key or PIIVAULT_KMS_DECRYPT_KEY_IDS): its records "
        "can be read. A key that wraps anything must stay on it."
    )


class KeyList(BaseModel):
    keys: list[KeyUsageOut]

    model_config = examples(
        {
            "keys": [
                {
                    "key_id": "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                    "records": 1204,
                    "audit_keys": 1,
                    "vault_keys": 1,
                    "current": True,
                    "decrypt_allowed": True,
                }
            ]
        }
    )


class HealthOut(BaseModel):
    status: Literal["ok"]

    model_config = examples({"status": "ok"})


class ReadinessOut(BaseModel):
    status: Literal["ready"]
    database: Literal["ok"]
    key_service: Literal["ok"]

    model_config = examples({"status": "ready", "database": "ok", "key_service": "ok"})
