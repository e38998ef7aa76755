"""Principals and their API keys (admin only)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status

from app.api.approvals import approval_out
from app.api.deps import AdminDep, CallerDep, ContextDep, KnownQueryOnly, SessionDep, VaultDep
from app.api.idempotency import REPLAYED_HEADER, IdempotencyDep, run_idempotent
from app.api.openapi import AUTHENTICATED, documented
from app.api.paging import CursorParam, Limit, decode_cursor, split_page
from app.api.schemas import (
    KEY_OUT_EXAMPLE,
    PRINCIPAL_CREATED_EXAMPLE,
    PRINCIPAL_EXAMPLE,
    ApiKeyCreated,
    ApiKeyOut,
    ApprovalOut,
    PrincipalCreate,
    PrincipalCreated,
    PrincipalList,
    PrincipalOut,
    RateLimitOut,
    RateLimitSet,
    Text,
)
from app.db.models import ApiKey, Approval, Principal

CURSOR_KIND = "p"

router = APIRouter(prefix="/v1/principals", tags=["principals"])


def principal_out(principal: Principal, keys: Sequence[ApiKey] = ()) -> PrincipalOut:
    return PrincipalOut(
        id=principal.id,
        name=principal.name,
        role=principal.role,
        created_at=principal.created_at,
        disabled_at=principal.disabled_at,
        keys=[key_out(k) for k in keys],
        rate_limit=(
            RateLimitOut(rps=principal.rate_limit_rps, burst=principal.rate_limit_burst)
            if principal.rate_limit_rps is not None and principal.rate_limit_burst is not None
            else None
        ),
    )


def key_out(key: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(
        key_id=key.id, created_at=key.created_at, revoked_at=key.revoked_at, issued_by=key.issued_by
    )


# Under dual control an admin's change to another admin waits for a second admin: 202 with the
# request (GET /v1/approvals), instead of the change.
def waits(route: dict[str, Any]) -> dict[str, Any]:
    """A route whose change may wait for a second admin (dual control): 202 with the request."""
    route["responses"][202] = {
        "model": ApprovalOut,
        "description": "waiting for a second admin (dual control)",
    }
    return route


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    name="CreatePrincipal",
    **waits(
        documented(
            "createPrincipal",
            "Register a caller and get its first API key",
            errors=(*AUTHENTICATED, 409, 413),
            descriptions={
                409: "A principal with this name exists; or (idempotency_in_flight) the first request "
                "with this Idempotency-Key has not answered yet: retry after Retry-After."
            },
            status=201,
            example=PRINCIPAL_CREATED_EXAMPLE,
            headers=REPLAYED_HEADER,
        )
    ),
)
def create_principal(
    body: PrincipalCreate,
    vault: VaultDep,
    session: SessionDep,
    admin: AdminDep,
    ctx: ContextDep,
    response: Response,
    keyed: IdempotencyDep,
) -> PrincipalCreated | ApprovalOut:
    """Register a caller. Its API key is in this response only; it is stored hashed. Under dual
    control an admin is not created here: 202 with the request a second admin must approve. With
    an Idempotency-Key, a retry gets the principal again with `"api_key": null` (the key was shown
    once; mint another with POST /v1/principals/{id}/keys)."""

    def create() -> PrincipalCreated | ApprovalOut:
        created = vault.principals.create(session, admin, body.name, body.role, ctx)
        if isinstance(created, Approval):
            response.status_code = status.HTTP_202_ACCEPTED
            return approval_out(created)
        principal, issued = created
        keys = vault.principals.keys_of(session, principal.id)
        out = principal_out(principal, keys)
        return PrincipalCreated(**out.model_dump(), key_id=issued.key_id, api_key=issued.secret_key)

    def answered(result: PrincipalCreated | ApprovalOut) -> int:
        return status.HTTP_202_ACCEPTED if isinstance(result, ApprovalOut) else status.HTTP_201_CREATED

    # The stored answer never holds the API key.
    return run_idempotent(
        vault, session, admin, keyed, body, answered, create,
        stored=lambda result: result.model_copy(update={"api_key": None})
        if isinstance(result, PrincipalCreated) else result,
    )  # fmt: skip


@router.get(
    "", name="ListPrincipals", **documented("listPrincipals", "List principals", errors=AUTHENTICATED)
)
def list_principals(
    vault: VaultDep,
    session: SessionDep,
    admin: AdminDep,
    _known: KnownQueryOnly,
    cursor: CursorParam = None,
    limit: Limit = 100,
) -> PrincipalList:
    """Principals, oldest first, a page at a time (follow `next_cursor`)."""
    after = decode_cursor(CURSOR_KIND, cursor)
    rows = vault.principals.list(session, after=after, limit=limit + 1)
    page, next_cursor = split_page(CURSOR_KIND, rows, limit)
    return PrincipalList(principals=[principal_out(p) for p in page], next_cursor=next_cursor)


@router.get(
    "/me",
    name="GetOwnPrincipal",
    **documented("getOwnPrincipal", "The caller itself, with its keys", errors=AUTHENTICATED),
)
def get_own_principal(vault: VaultDep, session: SessionDep, caller: CallerDep) -> PrincipalOut:
    """The caller itself, with its keys (who issued each): what a service needs to take over its
    own keys (mint one with POST /v1/principals/{id}/keys, revoke the one it was given)."""
    principal = vault.principals.get(session, caller.id)
    return principal_out(principal, vault.principals.keys_of(session, principal.id))


@router.get(
    "/{principal_id}",
    name="GetPrincipal",
    **documented("getPrincipal", "Get a principal and its keys", errors=(*AUTHENTICATED, 404)),
)
def get_principal(
    principal_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep
) -> PrincipalOut:
    principal = vault.principals.get(session, principal_id)
    return principal_out(principal, vault.principals.keys_of(session, principal.id))


@router.post(
    "/{principal_id}/keys",
    status_code=status.HTTP_201_CREATED,
    name="CreateApiKey",
    **documented("createApiKey", "Issue another API key", errors=(*AUTHENTICATED, 404, 409), status=201),
)
def create_key(
    principal_id: uuid.UUID, vault: VaultDep, session: SessionDep, caller: CallerDep, ctx: ContextDep
) -> ApiKeyCreated:
    """Issue another key (rotation): both work until the old one is deleted. A principal rotates
    its own keys; an admin may issue keys only to principals that hold no active or pending grant
    and are not admins (403 grantee_holds_grants; separation of duties)."""
    issued = vault.principals.add_key(session, caller, principal_id, ctx)
    return ApiKeyCreated(key_id=issued.key_id, api_key=issued.secret_key)


@router.delete(
    "/{principal_id}/keys/{key_id}",
    name="RevokeApiKey",
    **waits(
        documented("revokeApiKey", "Revoke an API key", errors=(*AUTHENTICATED, 404), example=KEY_OUT_EXAMPLE)
    ),
)
def revoke_key(
    principal_id: uuid.UUID,
    key_id: Annotated[Text, Path(max_length=64)],
    vault: VaultDep,
    session: SessionDep,
    caller: CallerDep,
    ctx: ContextDep,
    response: Response,
) -> ApiKeyOut | ApprovalOut:
    """Revoke a key (an admin, or the principal itself): it stops working at once. Under dual
    control another admin's key waits for a second admin (202 with the request)."""
    revoked = vault.principals.revoke_key(session, caller, principal_id, key_id, ctx)
    if isinstance(revoked, Approval):
        response.status_code = status.HTTP_202_ACCEPTED
        return approval_out(revoked)
    return key_out(revoked)


@router.delete(
    "/{principal_id}",
    name="DisablePrincipal",
    **waits(
        documented(
            "disablePrincipal",
            "Disable a principal and all its keys",
            errors=(*AUTHENTICATED, 404),
            example=PRINCIPAL_EXAMPLE,
        )
    ),
)
def disable_principal(
    principal_id: uuid.UUID,
    vault: VaultDep,
    session: SessionDep,
    admin: AdminDep,
    ctx: ContextDep,
    response: Response,
) -> PrincipalOut | ApprovalOut:
    """Disable a principal: every key of it stops working at once. Under dual control an admin
    waits for a second admin (202 with the request)."""
    disabled = vault.principals.disable(session, admin, principal_id, ctx)
    if isinstance(disabled, Approval):
        response.status_code = status.HTTP_202_ACCEPTED
        return approval_out(disabled)
    return principal_out(disabled, vault.principals.keys_of(session, disabled.id))


@router.put(
    "/{principal_id}/rate-limit",
    name="SetRateLimit",
    **documented("setRateLimit", "Set a principal's own request rate", errors=(*AUTHENTICATED, 404)),
)
def set_rate_limit(
    principal_id: uuid.UUID,
    body: RateLimitSet,
    vault: VaultDep,
    session: SessionDep,
    admin: AdminDep,
    ctx: ContextDep,
) -> PrincipalOut:
    """Set a principal's own request rate (`null`: the vault's defaults); effective at once."""
    limit = (body.rate_limit.rps, body.rate_limit.burst) if body.rate_limit else None
    principal = vault.principals.set_rate_limit(session, admin, principal_id, limit, ctx)
    return principal_out(principal, vault.principals.keys_of(session, principal.id))
