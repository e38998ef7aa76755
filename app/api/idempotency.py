"""Idempotency-Key on the four POST routes that create something: the HTTP side only (reading
the header, rendering answers to store). The rules are app/services/idempotency.py's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.api.errors import error_body, status_of
from app.container import Vault
from app.db.session import on_rollback
from app.errors import VaultError
from app.services.context import Caller
from app.services.idempotency import HEADER, Answer, IdempotentRequest, parse_key
from app.services.tokens import IdempotentTokenize, ItemError, Tokenized

M = TypeVar("M", bound=BaseModel)

# For the OpenAPI document of the routes that take the header.
IDEMPOTENCY_409 = {
    409: "idempotency_in_flight: the first request with this Idempotency-Key has not answered yet; "
    "retry after Retry-After."
}
REPLAYED_HEADER = {
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored answer to an earlier request with the same "
        "Idempotency-Key and body.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}

_KEY_DESCRIPTION = (
    "1 to 255 printable ASCII characters, new for each logical request and the same on its retries: "
    "within 24 hours the same key and body get the first answer again (with `Idempotent-Replayed: "
    "true`), and nothing is done twice."
)
IdempotencyKeyHeader = Annotated[str | None, Header(alias=HEADER, description=_KEY_DESCRIPTION)]
# The same parameter as FastAPI documents IdempotencyKeyHeader, for the data path's routes, which
# read the header by hand (deps.get_keyed_data_call).
IDEMPOTENCY_KEY_PARAMETER = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "schema": {
        "anyOf": [{"type": "string"}, {"type": "null"}],
        "description": _KEY_DESCRIPTION,
        "title": HEADER,
    },
    "description": _KEY_DESCRIPTION,
}


@dataclass(frozen=True, slots=True)
class KeyedRoute:
    """A request that sent an Idempotency-Key: the key, where it went, its request id."""

    key: str
    method: str
    path: str
    request_id: str | None

    def request(self, body: BaseModel) -> IdempotentRequest:
        return IdempotentRequest(self.key, self.method, self.path, body.model_dump(mode="json"))


def keyed_route(request: Request, raw: str | None) -> KeyedRoute | None:
    key = parse_key(raw)
    if key is None:
        return None
    route = request.scope.get("route")
    path = getattr(route, "path", None) or request.url.path
    return KeyedRoute(key, request.method, path, getattr(request.state, "request_id", None))


async def get_keyed_route(
    request: Request, idempotency_key: IdempotencyKeyHeader = None
) -> KeyedRoute | None:
    return keyed_route(request, idempotency_key)


IdempotencyDep = Annotated[KeyedRoute | None, Depends(get_keyed_route)]


def _json(content: object) -> bytes:
    return bytes(JSONResponse(content).body)


def model_answer(status: int, model: BaseModel, *, exclude_none: bool = False) -> Answer:
    return Answer(status, _json(model.model_dump(mode="json", exclude_none=exclude_none)))


def error_answer(err: VaultError, request_id: str | None) -> Answer | None:
    """The error's answer as the error handler sends it; None for 500 and above (never stored)."""
    status = status_of(err)
    if status >= 500:
        return None
    return Answer(status, _json({"error": {**error_body(err), "request_id": request_id}}))


def idempotent_tokenize(
    keyed: KeyedRoute | None,
    body: BaseModel,
    render: Callable[[Sequence[Tokenized | ItemError]], Answer | None],
) -> IdempotentTokenize | None:
    return None if keyed is None else IdempotentTokenize(keyed.request(body), render)


def run_idempotent(
    vault: Vault,
    session: Session,
    caller: Caller,
    keyed: KeyedRoute | None,
    body: BaseModel,
    status: int | Callable[[M], int],
    work: Callable[[], M],
    stored: Callable[[M], BaseModel] = lambda model: model,
) -> M:
    """An admin route's work under its Idempotency-Key: the claim commits first (others see the
    key in flight); the answer `stored(result)` commits in the request's own transaction, with
    what it answers. A refusal (4xx) is stored beside it; a 5xx or a failed commit releases the key."""
    if keyed is None:
        return work()
    idempotency = vault.idempotency
    lease = idempotency.claim_sync(caller.id, keyed.request(body))
    # Whatever rolls the transaction back (a failed commit too) gives the key back; a no-op once
    # an answer is stored.
    on_rollback(session, lambda: idempotency.release_sync(lease))
    try:
        result = work()
    except VaultError as err:
        answer = error_answer(err, keyed.request_id)
        if answer is not None:
            idempotency.settle_on_its_own(lease, answer)
        raise
    answered = status(result) if callable(status) else status
    idempotency.complete_in(session, lease, model_answer(answered, stored(result)))
    return result
