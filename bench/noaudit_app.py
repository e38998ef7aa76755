"""The vault with its audit trail switched off, for one benchmark row only: what the audit costs.

Never a way to run the vault: it exists so `make bench` can measure tokenize with and without the
audit in the same run. Served with `uvicorn noaudit_app:create --factory`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

from app.container import build_vault
from app.db.repositories.data_path import DataPathRepository, RecordRow
from app.main import create_app
from app.settings import get_settings


def create() -> FastAPI:
    vault = build_vault(get_settings())

    def nothing(*_: Any) -> None:
        return None

    store = DataPathRepository(vault.database)

    async def records_only(records: Sequence[RecordRow], _: Any) -> None:
        await store.add_records_with_events(records, [])

    async def no_denials(*_: Any) -> None:
        return None

    vault.auditor.record = nothing  # type: ignore[method-assign,assignment]
    vault.auditor.record_on_its_own = nothing  # type: ignore[method-assign,assignment]
    vault.auditor.record_with_records = records_only  # type: ignore[method-assign,assignment]
    vault.auditor.record_denials = no_denials  # type: ignore[method-assign,assignment]
    return create_app(vault)
