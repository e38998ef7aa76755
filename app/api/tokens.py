"""Tokenize and detokenize."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, get_args

from fastapi import APIRouter, Path, Request, Response, status
from pydantic import ValidationError

from app.api.deps import DataCallDep, KeyedDataCallDep, VaultDep
from app.api.errors import error_body, validation_problem
from app.api.idempotency import (
    IDEMPOTENCY_409,
    REPLAYED_HEADER,
    error_answer,
    idempotent_tokenize,
    model_answer,
)
from app.api.openapi import AUTHENTICATED, documented
from app.api.schemas import (
    BatchDetokenizeFailed,
    BatchRevealed,
    BatchTokenized,
    BatchTokenizeFailed,
    BatchTokenizeRequest,
    BatchTokenizeResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ItemErrorBody,
    LookupMatch,
    LookupRequest,
    LookupResponse,
    RevealedOut,
    TokenizeRequest,
    TokenOut,
)
from app.datatypes import Reveal
from app.errors import DependencyUnavailable, InvalidInput, Misconfigured, PayloadTooLarge, VaultError
from app.metrics import batch_items
from app.services.idempotency import Answer
from app.services.tokens import ItemError, Revealed, Tokenized, TokenizeItem

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


def _check_batch_size(count: int, limit: int, field: str) -> None:
    if count > limit:
        raise PayloadTooLarge(f"{field} has {count} entries; at most {limit} are allowed", field=field)


def _parse_item(index: int, raw: dict[str, object]) -> TokenizeItem | VaultError:
    try:
        item = TokenizeRequest.model_validate(raw)
    except ValidationError as err:
        field, message, _ = validation_problem(err)
        return InvalidInput(f"items[{index}].{message}", field=f"items[{index}].{field}")
    return TokenizeItem(item.customer_id, item.data_type, item.value, item.expires_at, item.deduplicate)


def _item_error(err: VaultError) -> ItemErrorBody:
    return ItemErrorBody.model_validate({**error_body(err), "retryable": err.retryable})


# A batch's own 503 (see whole_batch_failure); its caller's key is checked per item, so an
# unknown key is a 401 but a missing grant is each item's grant_required.
_BATCH_ERRORS = (*AUTHENTICATED, 413)
_BATCH_503 = {
    503: "When every item failed at the same dependency, nothing was stored or revealed: "
    "with Retry-After when it is down for now (send the batch again later), "
    "without when it refuses the vault (an operator must act)."
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


def _token_out(result: Tokenized) -> TokenOut:
    return TokenOut(
        token=result.token,
        customer_id=result.customer_id,
        data_type=result.data_type,
        created_at=result.created_at,
        expires_at=result.expires_at,
        deduplicated=result.deduplicated,
    )


def _tokenize_status(result: Tokenized) -> int:
    """201: a record was stored; 200: the customer's existing one answered (deduplicate)."""
    return status.HTTP_200_OK if result.deduplicated else status.HTTP_201_CREATED


def _batch_out(results: Sequence[Tokenized | ItemError]) -> BatchTokenizeResponse:
    return BatchTokenizeResponse(
        results=[
            BatchTokenizeFailed(error=_item_error(r.error))
            if isinstance(r, ItemError)
            else BatchTokenized(
                token=r.token,
                customer_id=r.customer_id,
                data_type=r.data_type,
                created_at=r.created_at,
                expires_at=r.expires_at,
                deduplicated=r.deduplicated or None,
            )
            for r in results
        ]
    )


def _one_answer(request_id: str | None) -> Callable[[Sequence[Tokenized | ItemError]], Answer | None]:
    """How a tokenize's result is stored under its Idempotency-Key: as the route answers it."""

    def render(results: Sequence[Tokenized | ItemError]) -> Answer | None:
        (result,) = results
        if isinstance(result, ItemError):
            return error_answer(result.error, request_id)
        return model_answer(_tokenize_status(result), _token_out(result))

    return render


def _batch_answer(request_id: str | None) -> Callable[[Sequence[Tokenized | ItemError]], Answer | None]:
    def render(results: Sequence[Tokenized | ItemError]) -> Answer | None:
        if (failure := whole_batch_failure(results)) is not None:
            return error_answer(failure, request_id)
        return model_answer(status.HTTP_200_OK, _batch_out(results), exclude_none=True)

    return render


_REVEAL_DESCRIPTION = "`masked`: value_masked instead of value (a masked grant gets it always)."
_REVEAL_PARAMETER = {
    "name": "reveal",
    "in": "query",
    "required": False,
    "schema": {
        "enum": list(get_args(Reveal)),
        "type": "string",
        "description": _REVEAL_DESCRIPTION,
        "default": "plain",
        "title": "Reveal",
    },
    "description": _REVEAL_DESCRIPTION,
}


_REVEALS: dict[str, Reveal] = {form: form for form in get_args(Reveal)}


def _reveal_asked(request: Request) -> Reveal:
    """GET /v1/tokens/{token}'s ?reveal= (the last one, as a declared parameter takes). Read here
    and documented by _REVEAL_PARAMETER rather than declared as a Query parameter, which FastAPI
    validates at a cost the hot path feels (counted by bench/instructions.py)."""
    asked = _REVEALS.get(request.query_params.get("reveal", "plain"))
    if asked is not None:
        return asked
    raise InvalidInput("query.reveal: Input should be 'plain' or 'masked'", field="query.reveal")


# Detokenize, then tokenize, before the other routes: routes are matched in order, and these two
# carry nearly all the traffic. (A GET, /{token} shadows no POST route of this prefix.)
@router.get(
    "/{token}",
    name="Detokenize",
    response_model_exclude_none=True,
    **documented(
        "detokenize",
        "Reveal one token's value",
        errors=(*AUTHENTICATED, 400, 404, 410, 422, 500),
        descriptions={410: "Erased or expired (told only to a caller whose grant covers the record)."},
    ),
    openapi_extra={"parameters": [_REVEAL_PARAMETER]},
)
async def detokenize(
    token: Annotated[str, Path(max_length=128, examples=["tok_3q2-7wEvmn8CRTfF1ZrPuS9QoHgH4kDy"])],
    call: DataCallDep,
    request: Request,
) -> RevealedOut:
    """Reveal a token's value (or, with reveal=masked or under a masked grant, only its mask).
    Needs an active Decrypt grant matching the record's context; send X-Access-Reason to record why."""
    revealed = await call.tokens.detokenize_one(
        presented=call.presented, token=token, ctx=call.ctx, reveal=_reveal_asked(request)
    )
    return RevealedOut(
        token=revealed.token,
        customer_id=revealed.customer_id,
        data_type=revealed.data_type,
        value=revealed.value,
        value_masked=revealed.value_masked,
    )


_TOKENIZE_DOC = documented(
    "tokenize",
    "Tokenize one value",
    errors=(*AUTHENTICATED, 409, 413),
    descriptions=IDEMPOTENCY_409,
    status=201,
    headers=REPLAYED_HEADER,
)
# With deduplicate: the customer's existing record, nothing stored.
_TOKENIZE_DOC["responses"][200] = {
    "model": TokenOut,
    "description": "deduplicate: the customer already had a live record of this type with this "
    "value; its token, with deduplicated: true. Nothing was stored.",
    "headers": dict(REPLAYED_HEADER),
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    name="Tokenize",
    **_TOKENIZE_DOC,
)
async def tokenize(body: TokenizeRequest, call: KeyedDataCallDep, response: Response) -> TokenOut:
    """Store a value and get its token. Needs an active Encrypt grant matching
    {"customerID": customer_id, "dataType": data_type} (and with deduplicate, a Lookup grant
    too). With an Idempotency-Key, a retry gets the first answer again and stores nothing."""
    item = TokenizeItem(body.customer_id, body.data_type, body.value, body.expires_at, body.deduplicate)
    keyed = call.keyed
    idempotent = idempotent_tokenize(keyed, body, _one_answer(keyed.request_id if keyed else None))
    result = await call.tokens.tokenize_one(
        presented=call.presented, item=item, ctx=call.ctx, idempotent=idempotent
    )
    response.status_code = _tokenize_status(result)
    return _token_out(result)


@router.post(
    "/lookup",
    name="Lookup",
    **documented(
        "lookup",
        "Find tokens by value",
        errors=AUTHENTICATED,
        descriptions={
            422: "unknown_data_type, lookup_not_enabled (the type's lookup flag is off), "
            "invalid_value (never echoing the value), or an invalid body.",
            429: "rate_limited: this principal's lookups are over PIIVAULT_LOOKUP_RATE_PER_S.",
        },
    ),
)
async def lookup(body: LookupRequest, call: DataCallDep) -> LookupResponse:
    """The live records of data_type holding value (after the type's normaliser), of customer_id
    if given, that the caller's Lookup grants cover (each record decided on its own context).
    Rate-limited per principal and audited."""
    found = await call.tokens.lookup(
        presented=call.presented,
        data_type=body.data_type,
        value=body.value,
        customer_id=body.customer_id,
        ctx=call.ctx,
    )
    matches = [LookupMatch(token=m.token, customer_id=m.customer_id, created_at=m.created_at) for m in found]
    return LookupResponse(matches=matches)


@router.post(
    "/batch",
    name="TokenizeBatch",
    response_model_exclude_none=True,
    **documented(
        "tokenizeBatch",
        "Tokenize many values",
        errors=(*_BATCH_ERRORS, 409),
        descriptions={**_BATCH_503, **IDEMPOTENCY_409},
        headers=REPLAYED_HEADER,
    ),
)
async def tokenize_batch(
    body: BatchTokenizeRequest, vault: VaultDep, call: KeyedDataCallDep
) -> BatchTokenizeResponse:
    """Tokenize many values; results come in request order, each a token or its own error, which
    says whether it is retryable. When every item failed at the same dependency, 503 instead.
    With an Idempotency-Key, a retry gets the first answer again and stores nothing."""
    _check_batch_size(len(body.items), vault.settings.max_batch_items, "items")
    items = [_parse_item(index, raw) for index, raw in enumerate(body.items)]
    keyed = call.keyed
    idempotent = idempotent_tokenize(keyed, body, _batch_answer(keyed.request_id if keyed else None))
    results = await call.tokens.tokenize(
        presented=call.presented, items=items, ctx=call.ctx, idempotent=idempotent
    )
    batch_items("tokenize", (r.error.code if isinstance(r, ItemError) else "ok" for r in results))
    if (failure := whole_batch_failure(results)) is not None:
        raise failure
    return _batch_out(results)


@router.post(
    "/detokenize",
    name="DetokenizeBatch",
    response_model_exclude_none=True,
    **documented(
        "detokenizeBatch", "Reveal many tokens", errors=(*_BATCH_ERRORS, 400), descriptions=_BATCH_503
    ),
)
async def detokenize_batch(body: DetokenizeRequest, vault: VaultDep, call: DataCallDep) -> DetokenizeResponse:
    """Reveal many tokens; each result is the value or its own error (not_found, grant_required…),
    which says whether it is retryable. When every item failed at the same dependency, 503 instead."""
    _check_batch_size(len(body.tokens), vault.settings.max_batch_items, "tokens")
    results = await call.tokens.detokenize(
        presented=call.presented, tokens=body.tokens, ctx=call.ctx, reveal=body.reveal
    )
    batch_items("detokenize", (r.error.code if isinstance(r, ItemError) else "ok" for r in results))
    if (failure := whole_batch_failure(results)) is not None:
        raise failure
    return DetokenizeResponse(
        results=[
            BatchDetokenizeFailed(token=r.token or "", error=_item_error(r.error))
            if isinstance(r, ItemError)
            else BatchRevealed(
                token=r.token,
                customer_id=r.customer_id,
                data_type=r.data_type,
                value=r.value,
                value_masked=r.value_masked,
            )
            for r in results
        ]
    )


@router.delete(
    "/{token}",
    name="EraseToken",
    status_code=status.HTTP_204_NO_CONTENT,
    **documented("eraseToken", "Erase one record", errors=(*AUTHENTICATED, 400, 404)),
)
async def erase(
    token: Annotated[str, Path(max_length=128, examples=["tok_3q2-7wEvmn8CRTfF1ZrPuS9QoHgH4kDy"])],
    vault: VaultDep,
    call: DataCallDep,
) -> Response:
    """Erase a record (GDPR Art. 17): its ciphertext and wrapped data key are removed, a tombstone
    stays. Needs an active Erase grant matching the record's context; X-Access-Reason says why.
    Erasing an erased record is 204 again."""
    await vault.erasure.erase_token(presented=call.presented, token=token, ctx=call.ctx)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
