"""Tokenize and detokenize."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, status
from pydantic import ValidationError

from app.api.deps import DataCallDep, VaultDep
from app.api.errors import error_body, validation_problem
from app.api.schemas import (
    BatchTokenizeItemResult,
    BatchTokenizeRequest,
    BatchTokenizeResponse,
    DetokenizeItemResult,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ItemErrorBody,
    RevealedOut,
    TokenizeRequest,
    TokenOut,
)
from app.datatypes import Reveal
from app.errors import DependencyUnavailable, InvalidInput, Misconfigured, PayloadTooLarge, VaultError
from app.services.tokens import ItemError, Revealed, Tokenized, TokenizeItem

router = APIRouter(
    prefix="/v1/tokens",
    tags=["tokens"],
    responses={
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse, "description": "no active grant covers this record"},
        503: {"model": ErrorResponse, "description": "a dependency is down; see Retry-After"},
    },
)


def _check_batch_size(count: int, limit: int, field: str) -> None:
    if count > limit:
        raise PayloadTooLarge(f"{field} has {count} entries; at most {limit} are allowed", field=field)


def _parse_item(index: int, raw: dict[str, object]) -> TokenizeItem | VaultError:
    try:
        item = TokenizeRequest.model_validate(raw)
    except ValidationError as err:
        field, message, _ = validation_problem(err)
        return InvalidInput(f"items[{index}].{message}", field=f"items[{index}].{field}")
    return TokenizeItem(item.customer_id, item.data_type, item.value)


def _item_error(err: VaultError) -> ItemErrorBody:
    return ItemErrorBody.model_validate({**error_body(err), "retryable": err.retryable})


# A batch's own 503 (see whole_batch_failure).
_BATCH_503: dict[str, Any] = {
    "model": ErrorResponse,
    "description": "every item failed at the same dependency, so nothing was stored: "
    "with Retry-After when it is down for now (send the batch again later), "
    "without when it refuses the vault (an operator must act)",
}


def whole_batch_failure(results: Sequence[Tokenized | Revealed | ItemError]) -> VaultError | None:
    """The error a batch answers with as a whole: when every item failed with the same dependency
    error, nothing was stored or revealed, and the batch is what to retry (or what an operator must
    fix), as for one item; a 200 would read as done. Otherwise None: 200, each item its own."""
    errors = [result.error for result in results if isinstance(result, ItemError)]
    if not errors or len(errors) < len(results):
        return None
    first = errors[0]
    if not isinstance(first, DependencyUnavailable | Misconfigured):
        return None
    return first if all(err.code == first.code for err in errors) else None


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    name="Tokenize",
    responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)
async def tokenize(body: TokenizeRequest, call: DataCallDep) -> TokenOut:
    """Store a value and get its token. Needs an active Encrypt grant matching
    {"customerID": customer_id, "dataType": data_type}."""
    item = TokenizeItem(body.customer_id, body.data_type, body.value)
    result = await call.tokens.tokenize_one(presented=call.presented, item=item, ctx=call.ctx)
    return TokenOut(
        token=result.token,
        customer_id=result.customer_id,
        data_type=result.data_type,
        created_at=result.created_at,
    )


@router.post(
    "/batch",
    name="TokenizeBatch",
    response_model_exclude_none=True,
    responses={413: {"model": ErrorResponse}, 503: _BATCH_503},
)
async def tokenize_batch(
    body: BatchTokenizeRequest, vault: VaultDep, call: DataCallDep
) -> BatchTokenizeResponse:
    """Tokenize many values; results come in request order, each a token or its own error, which
    says whether it is retryable. When every item failed at the same dependency, 503 instead."""
    _check_batch_size(len(body.items), vault.settings.max_batch_items, "items")
    items = [_parse_item(index, raw) for index, raw in enumerate(body.items)]
    results = await call.tokens.tokenize(presented=call.presented, items=items, ctx=call.ctx)
    if (failure := whole_batch_failure(results)) is not None:
        raise failure
    return BatchTokenizeResponse(
        results=[
            BatchTokenizeItemResult(error=_item_error(r.error))
            if isinstance(r, ItemError)
            else BatchTokenizeItemResult(
                token=r.token,
                customer_id=r.customer_id,
                data_type=r.data_type,
                created_at=r.created_at,
            )
            for r in results
        ]
    )


@router.post(
    "/detokenize",
    name="DetokenizeBatch",
    response_model_exclude_none=True,
    responses={413: {"model": ErrorResponse}, 503: _BATCH_503},
)
async def detokenize_batch(body: DetokenizeRequest, vault: VaultDep, call: DataCallDep) -> DetokenizeResponse:
    """Reveal many tokens; each result is the value or its own error (not_found, grant_required…),
    which says whether it is retryable. When every item failed at the same dependency, 503 instead."""
    _check_batch_size(len(body.tokens), vault.settings.max_batch_items, "tokens")
    results = await call.tokens.detokenize(
        presented=call.presented, tokens=body.tokens, ctx=call.ctx, reveal=body.reveal
    )
    if (failure := whole_batch_failure(results)) is not None:
        raise failure
    return DetokenizeResponse(
        results=[
            DetokenizeItemResult(token=r.token or "", error=_item_error(r.error))
            if isinstance(r, ItemError)
            else DetokenizeItemResult(
                token=r.token,
                customer_id=r.customer_id,
                data_type=r.data_type,
                value=r.value,
                value_masked=r.value_masked,
            )
            for r in results
        ]
    )


@router.get(
    "/{token}",
    name="Detokenize",
    response_model_exclude_none=True,
    responses={404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 500: {"model": ErrorResponse}},
)
async def detokenize(
    token: Annotated[str, Path(max_length=128, examples=["tok_3q2-7wEvmn8CRTfF1ZrPuS9QoHgH4kDy"])],
    call: DataCallDep,
    reveal: Annotated[
        Reveal,
        Query(description="`masked`: value_masked instead of value (a masked grant gets it always)."),
    ] = "plain",
) -> RevealedOut:
    """Reveal a token's value (or, with reveal=masked or under a masked grant, only its mask).
    Needs an active Decrypt grant matching the record's context; send X-Access-Reason to record why."""
    revealed = await call.tokens.detokenize_one(
        presented=call.presented, token=token, ctx=call.ctx, reveal=reveal
    )
    return RevealedOut(
        token=revealed.token,
        customer_id=revealed.customer_id,
        data_type=revealed.data_type,
        value=revealed.value,
        value_masked=revealed.value_masked,
    )
