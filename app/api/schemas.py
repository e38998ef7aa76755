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

from app.access import Role
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


class ErrorBody(BaseModel):
    code: str = Field(examples=["grant_required"])
    message: str
    request_id: str | None = None
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# Principals


class PrincipalCreate(Strict):
    name: PrincipalName
    role: Role = Field(examples=["service"])


class ApiKeyOut(BaseModel):
    key_id: str
    created_at: datetime
    revoked_at: datetime | None = None


class PrincipalOut(BaseModel):
    id: uuid.UUID
    name: str
    role: Role
    created_at: datetime
    disabled_at: datetime | None = None
    keys: list[ApiKeyOut] = []


class PrincipalCreated(PrincipalOut):
    key_id: str
    api_key: str = Field(repr=False, description="Shown this once; store it in your secret manager.")


class ApiKeyCreated(BaseModel):
    key_id: str
    api_key: str = Field(repr=False, description="Shown this once; store it in your secret manager.")


class PrincipalList(BaseModel):
    principals: list[PrincipalOut] = Field(description="Oldest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


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


class GrantOut(BaseModel):
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
    kms_grant_id: str | None
    reveal: Reveal


class GrantList(BaseModel):
    grants: list[GrantOut] = Field(description="Oldest first.")
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


class TokenOut(BaseModel):
    token: str = Field(examples=["tok_3q2-7wEvmn8CRTfF1ZrPuS9QoHgH4kDy"])
    customer_id: str
    data_type: str
    created_at: datetime


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
        description="Each item as for POST /v1/tokens; a bad item fails alone.",
        examples=[[{"customer_id": "12345", "data_type": "SSN", "value": "078-05-1120"}]],
    )


class BatchTokenizeItemResult(BaseModel):
    token: str | None = None
    customer_id: str | None = None
    data_type: str | None = None
    created_at: datetime | None = None
    error: ItemErrorBody | None = None


class BatchTokenizeResponse(BaseModel):
    results: list[BatchTokenizeItemResult]


class RevealedOut(BaseModel):
    token: str
    customer_id: str
    data_type: str
    value: str | None = Field(default=None, repr=False, description="The value (a plain reveal).")
    value_masked: str | None = Field(
        default=None, repr=False, description="Only the value's mask (a masked reveal), instead of value."
    )


class DetokenizeRequest(Strict):
    tokens: list[StrictStr] = Field(min_length=1, examples=[["tok_3q2-7wEvmn8CRTfF1ZrPuS9QoHgH4kDy"]])
    reveal: Reveal = Field(
        default="plain",
        description="`masked`: each result carries value_masked instead of value. A caller whose "
        "grant is masked gets value_masked whatever it asks.",
    )


class DetokenizeItemResult(BaseModel):
    token: str
    customer_id: str | None = None
    data_type: str | None = None
    value: str | None = Field(default=None, repr=False)
    value_masked: str | None = Field(default=None, repr=False)
    error: ItemErrorBody | None = None


class DetokenizeResponse(BaseModel):
    results: list[DetokenizeItemResult]


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


class DataTypeOut(BaseModel):
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
    data_types: list[DataTypeOut]


class LimitsOut(BaseModel):
    max_batch_items: int = Field(description="The most items (or tokens) one batch request may hold.")
    max_value_bytes: int = Field(description="The largest value, in UTF-8 bytes.")


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


class AuditEventPage(BaseModel):
    events: list[AuditEventOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null at the end."
    )


class AuditVerifyOut(BaseModel):
    ok: bool
    events_checked: int
    head_seq: int
    head_mac: str | None = None
    first_bad_event: dict[str, Any] | None = None


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
