"""The master keys and what each wraps, for admins and auditors: how far a rotation has come."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter

from app.api.deps import AuditorDep, SessionDep, VaultDep
from app.api.openapi import AUTHENTICATED, documented
from app.api.schemas import KeyList, KeyUsageOut

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.get("", name="ListKeys", **documented("listKeys", "Records per master key", errors=AUTHENTICATED))
def list_keys(vault: VaultDep, session: SessionDep, auditor: AuditorDep) -> KeyList:
    """Records (and the vault's audit keys) per master key, with the allow-list's keys that wrap
    nothing. A key may leave PIIVAULT_KMS_DECRYPT_KEY_IDS once it wraps nothing: after
    `piivault keys rewrap --to NEW`, its counts are zero."""
    usage = vault.rotation.inventory(session)
    return KeyList(keys=[KeyUsageOut(**dataclasses.asdict(key)) for key in usage])
