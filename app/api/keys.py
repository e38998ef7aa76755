"""The master keys and what each wraps, for admins and auditors: how far a rotation has come."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter

from app.api.deps import AuditorDep, SessionDep, VaultDep
from app.api.schemas import ErrorResponse, KeyList, KeyUsageOut

router = APIRouter(
    prefix="/v1/keys",
    tags=["keys"],
    responses={
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        429: {"model": ErrorResponse, "description": "over the rate limit; see Retry-After"},
    },
)


@router.get("", name="ListKeys")
def list_keys(vault: VaultDep, session: SessionDep, auditor: AuditorDep) -> KeyList:
    """Records (and the vault's audit keys) per master key, with the allow-list's keys that wrap
    nothing. A key may leave PIIVAULT_KMS_DECRYPT_KEY_IDS once it wraps nothing: after
    `piivault keys rewrap --to NEW`, its counts are zero."""
    usage = vault.rotation.inventory(session)
    return KeyList(keys=[KeyUsageOut(**dataclasses.asdict(key)) for key in usage])
